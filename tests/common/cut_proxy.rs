//! A TCP proxy to PostgreSQL that can drop every connection of the
//! processes behind it and refuse new ones, until it is restored: a
//! database outage, or a network cut, for those processes only.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::postgres::PgConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy to PostgreSQL that can drop every connection and refuse new ones.
pub struct Proxy {
    /// The port to connect to instead of PostgreSQL's.
    pub port: u16,
    down: Arc<AtomicBool>,
    /// Connections accepted so far (refused ones included).
    pub attempts: Arc<AtomicUsize>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Forwards to `target` (`host:port`).
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicUsize::new(0));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (d, a, l) = (down.clone(), attempts.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                l.lock().unwrap().push(link);
            }
        });
        Proxy {
            port,
            down,
            attempts,
            links,
        }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// A proxy to the test's database and a URL through it.
pub async fn to_database(connect: &PgConnectOptions) -> (Proxy, String) {
    let proxy = Proxy::start(format!("{}:{}", connect.get_host(), connect.get_port())).await;
    let url = format!(
        "postgres://{}@127.0.0.1:{}/{}",
        connect.get_username(),
        proxy.port,
        connect.get_database().unwrap_or("postgres")
    );
    (proxy, url)
}
