//! A TCP proxy to PostgreSQL that, when armed, loses the answer to one
//! statement: the client message holding a given byte pattern is passed on,
//! the server executes (and, outside a transaction, commits) it, and its
//! answer is dropped; once the server says it is ready for the next query
//! the connection is closed. The client sees a broken connection after a
//! COMMIT that did land, which a lost network packet or a server restart
//! at the wrong moment produces, deterministically.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// PostgreSQL's ReadyForQuery message, up to its status byte: the end of
/// the server's answer to a synced statement.
const READY_FOR_QUERY: &[u8] = b"Z\0\0\0\x05";

#[derive(Default)]
struct Shared {
    /// The pattern of the client message whose answer is to be lost.
    armed: Mutex<Option<Vec<u8>>>,
    /// Answers lost so far.
    fired: AtomicUsize,
    lost: Notify,
}

/// See the module documentation.
pub struct LossyProxy {
    port: u16,
    shared: Arc<Shared>,
}

impl LossyProxy {
    /// Listens on a loopback port and forwards to `target` (`host:port`).
    pub async fn start(target: String) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = target.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&target).await {
                        link(client, server, s).await;
                    }
                });
            }
        });
        LossyProxy { port, shared }
    }

    /// The port to connect to instead of PostgreSQL's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next client message containing `pattern` (on any connection)
    /// gets no answer: it is executed, its answer is dropped, and its
    /// connection is closed.
    pub fn arm(&self, pattern: &[u8]) {
        *self.shared.armed.lock().unwrap() = Some(pattern.to_vec());
    }

    /// How many answers were lost.
    pub fn fired(&self) -> usize {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// Returns once an answer was lost (at once if one was).
    pub async fn wait_fired(&self) {
        loop {
            let lost = self.shared.lost.notified();
            if self.fired() > 0 {
                return;
            }
            lost.await;
        }
    }
}

async fn link(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let dropping = Arc::new(AtomicBool::new(false));
    let up = {
        let (dropping, shared) = (dropping.clone(), shared.clone());
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                {
                    let mut armed = shared.armed.lock().unwrap();
                    if armed
                        .as_deref()
                        .is_some_and(|p| chunk.windows(p.len()).any(|w| w == p))
                    {
                        *armed = None;
                        // Before the message goes on: its answer cannot
                        // come back ahead of this.
                        dropping.store(true, Ordering::SeqCst);
                    }
                }
                if server_write.write_all(chunk).await.is_err() {
                    break;
                }
            }
            let _ = server_write.shutdown().await;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen: Vec<u8> = Vec::new();
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !dropping.load(Ordering::SeqCst) {
                if client_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                continue;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen
                .windows(READY_FOR_QUERY.len())
                .any(|w| w == READY_FOR_QUERY)
            {
                // The statement is over (committed, outside a transaction);
                // its answer is gone with the connection.
                shared.fired.fetch_add(1, Ordering::SeqCst);
                shared.lost.notify_waiters();
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    // The client sees its connection end; its own close ends the other half.
    tokio::join!(up, down);
}
