//! This process in the worker registry (`wfq.workers`), and how it knows
//! whether it is still in touch with the database.
//!
//! With session liveness (the default) the worker opens a connection of its
//! own, outside the pool, takes a session-level advisory lock for its
//! registry row and keeps it for as long as it lives. PostgreSQL drops the
//! lock when that session ends: at once when the process dies, and after
//! the TCP keepalives set on the session when its machine drops off the
//! network. The other workers' rescuers read exactly that (see
//! `rescuer.rs`); no clock decides that a worker is dead.
//!
//! A heartbeat on the session every second tells the worker the other side
//! of it. While a heartbeat is unanswered (2 s) or failed, the worker counts
//! itself cut off: the other workers may already have taken its runs, so no
//! step starts a provider call ([`LeaseClock`](super::LeaseClock) checks
//! [`Liveness`]) and the claim loop waits. It reconnects with a growing
//! pause, takes the same lock again (waiting while a rescuer holds it for a
//! moment, or while PostgreSQL has not yet dropped its old session), clears
//! `died_at`, gives back the leases of runs its steps left meanwhile, and
//! goes on. Whatever it writes about runs a rescuer took over is refused by
//! the compare-and-set, which it logs as it drops them, but for the answer
//! to a submit it sent: the rescuer leaves a run with a submit in flight to
//! it for a grace (`rescuer.rs`), and an accepted answer recorded even
//! later is applied by the submit's token while the run still waits for it
//! (`step/late.rs`). The session is lost, not the process, and the answer
//! is the only record of a run the provider bills.
//!
//! Without session liveness (`worker.session_liveness = false`, behind a
//! pooler in transaction mode, where a session lock would be held by a
//! server connection shared with others) the row is kept through the pool
//! for operators, without a lock: such a worker's runs come back when their
//! leases end.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::leases::Leases;
use crate::store::{self, SessionKeepalives, WorkerInfo};

/// Whether this process is in touch with the database (its liveness
/// session answers), so that no other worker has reason to take its runs.
/// Cheap to clone; every clone sees the same state.
#[derive(Debug, Clone)]
pub struct Liveness {
    live: Arc<watch::Sender<bool>>,
}

impl Liveness {
    /// Always live: a worker without session liveness, or a test.
    pub fn always() -> Self {
        Liveness {
            live: Arc::new(watch::Sender::new(true)),
        }
    }

    /// Not live until the registry says so (a worker that has not
    /// registered yet).
    pub fn pending() -> Self {
        Liveness {
            live: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Whether the process may act on its runs now.
    pub fn is_live(&self) -> bool {
        *self.live.borrow()
    }

    /// Returns once the process is live.
    pub async fn wait_live(&self) {
        let mut rx = self.live.subscribe();
        // The sender lives in self: the wait cannot fail.
        let _ = rx.wait_for(|live| *live).await;
    }

    /// Sets the state; whether it changed.
    pub(crate) fn set(&self, live: bool) -> bool {
        self.live.send_if_modified(|current| {
            let changed = *current != live;
            *current = live;
            changed
        })
    }
}

/// Timings of the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Between heartbeats.
    pub heartbeat_every: Duration,
    /// A heartbeat unanswered this long cuts the process off (no provider
    /// call starts) until it is answered.
    pub slow_heartbeat: Duration,
    /// A heartbeat unanswered this long gives the session up: a new one is
    /// opened. Longer than the keepalives take to drop a lost session on
    /// the server, so that a slow server is waited for, not abandoned.
    pub give_up_after: Duration,
    /// The longest a connect may take.
    pub connect_timeout: Duration,
    /// The settings of the liveness session.
    pub keepalives: SessionKeepalives,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            heartbeat_every: Duration::from_secs(1),
            slow_heartbeat: Duration::from_secs(2),
            give_up_after: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            // About 10 s from a machine's last sign of life to PostgreSQL
            // dropping its session: 5 s idle, then 5 probes a second apart
            // (or 10 s of unacknowledged data).
            keepalives: SessionKeepalives {
                idle: Duration::from_secs(5),
                interval: Duration::from_secs(1),
                count: 5,
                user_timeout: Duration::from_secs(10),
                lock_wait: Duration::from_secs(5),
            },
        }
    }
}

/// Why registering failed (logged; the registry tries again).
#[derive(Debug, thiserror::Error)]
enum RegisterError {
    #[error("{0}")]
    Database(#[from] sqlx::Error),
    #[error("connecting took longer than {0:?}")]
    ConnectTimeout(Duration),
    #[error(
        "worker.id `{0}` is held by another live database session (a second process with the same worker.id, or this process's old session that PostgreSQL has not dropped yet)"
    )]
    HeldElsewhere(String),
}

/// The running registry of this process. Dropping it without
/// [`Registry::stop`] ends its session as a crash would (its lock is
/// released, the other workers take its runs).
#[derive(Debug)]
pub struct Registry {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Registry {
    /// Registers `info` and keeps it registered in the background: with a
    /// liveness session of its own when `session_liveness`, through `pool`
    /// otherwise. `liveness` follows the session; `leases` says which runs
    /// the process's steps are working on (the others are given back when
    /// the process comes back from being cut off).
    pub fn start(
        pool: &PgPool,
        info: WorkerInfo,
        session_liveness: bool,
        liveness: Liveness,
        leases: Leases,
        config: RegistryConfig,
    ) -> Registry {
        let (stop, stopped) = oneshot::channel();
        let task = if session_liveness {
            let name = store::session_name(&format!("wfq liveness {}", info.id), pool);
            let options = (*pool.connect_options()).clone().application_name(&name);
            let keeper = SessionKeeper {
                options,
                info,
                liveness,
                leases,
                config,
            };
            tokio::spawn(keeper.run(stopped))
        } else {
            tokio::spawn(keep_row_through_pool(pool.clone(), info, config, stopped))
        };
        Registry {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Marks the worker stopped and ends its session (graceful shutdown).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The pause before the `failures`-th attempt to register again: 250 ms
/// doubling to 5 s, so that a database that is away costs a few attempts.
pub fn reconnect_pause(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(5);
    (Duration::from_millis(250) * (1 << doublings)).min(Duration::from_secs(5))
}

/// What a heartbeat's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Beat {
    /// The session is alive and holds the lock.
    Answered,
    /// The session is alive but the row is gone (deleted by hand): write it
    /// again on the same session.
    RowGone,
    /// The session is lost: open a new one.
    Lost(String),
}

/// Reads a heartbeat's answer: `answer` is the backend pid that answered
/// and whether the row exists, or the error; `session_pid` the backend of
/// the session that took the lock. Another backend answering means a
/// pooler hands the "session" around, and the lock is not ours to rely on.
pub fn judge_heartbeat(answer: Result<(i32, bool), String>, session_pid: i32) -> Beat {
    match answer {
        Err(e) => Beat::Lost(e),
        Ok((pid, _)) if pid != session_pid => Beat::Lost(format!(
            "the liveness session was answered by backend {pid}, not {session_pid}: a pooler is in between (set worker.session_liveness = false behind PgBouncer in transaction mode)"
        )),
        Ok((_, false)) => Beat::RowGone,
        Ok((_, true)) => Beat::Answered,
    }
}

/// A liveness session that holds the lock.
struct Session {
    conn: PgConnection,
    backend_pid: i32,
    lock_id: i32,
}

struct SessionKeeper {
    options: PgConnectOptions,
    info: WorkerInfo,
    liveness: Liveness,
    leases: Leases,
    config: RegistryConfig,
}

impl SessionKeeper {
    async fn run(self, mut stop: oneshot::Receiver<()>) {
        let mut failures: u32 = 0;
        loop {
            let registered = tokio::select! {
                registered = self.register() => registered,
                _ = &mut stop => return,
            };
            let mut session = match registered {
                Ok(session) => session,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let pause = reconnect_pause(failures);
                    tracing::warn!(error = %e, retry_in = ?pause, "could not register this worker's liveness session; no provider call starts until it is back");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = &mut stop => return,
                    }
                }
            };
            self.back_in_touch(&mut session, failures > 0).await;
            let lost = loop {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.heartbeat_every) => {}
                    _ = &mut stop => {
                        self.sign_off(session).await;
                        return;
                    }
                }
                match self.beat(&mut session).await {
                    Beat::Answered => {
                        if !self.liveness.is_live() {
                            // A slow answer on the same session: the lock was
                            // held throughout.
                            self.back_in_touch(&mut session, true).await;
                        }
                    }
                    Beat::RowGone => {
                        let lock_id = session.lock_id;
                        match store::upsert_worker(&mut session.conn, &self.info, Some(lock_id))
                            .await
                        {
                            Ok(true) => {
                                tracing::warn!(
                                    "this worker's registry row was deleted; wrote it again"
                                )
                            }
                            Ok(false) => {
                                break "another registration took this worker.id".to_owned();
                            }
                            Err(e) => break format!("could not write the registry row again: {e}"),
                        }
                    }
                    Beat::Lost(why) => break why,
                }
            };
            self.liveness.set(false);
            tracing::warn!(reason = %lost, "cut off from the database: this worker starts no provider call and claims nothing until its liveness session is back; other workers may take its runs meanwhile");
            drop(session);
            failures = 1;
            tokio::select! {
                _ = tokio::time::sleep(reconnect_pause(failures)) => {}
                _ = &mut stop => return,
            }
        }
    }

    /// Opens the session, takes the lock and writes the row (in that order:
    /// the row is never there without the lock held).
    async fn register(&self) -> Result<Session, RegisterError> {
        let timeout = self.config.connect_timeout;
        let mut conn = tokio::time::timeout(timeout, PgConnection::connect_with(&self.options))
            .await
            .map_err(|_| RegisterError::ConnectTimeout(timeout))??;
        store::configure_liveness_session(&mut conn, &self.config.keepalives).await?;
        // Twice at most: the second time after another registration of the
        // same id moved the row to another lock id under us.
        for _ in 0..2 {
            let lock_id = match store::lock_worker(&mut conn, &self.info.id).await {
                Ok(lock_id) => lock_id,
                // 55P03: lock_not_available (lock_timeout).
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                    return Err(RegisterError::HeldElsewhere(self.info.id.clone()));
                }
                Err(e) => return Err(e.into()),
            };
            if store::upsert_worker(&mut conn, &self.info, Some(lock_id)).await? {
                let (backend_pid, _) = store::worker_heartbeat(&mut conn, &self.info.id).await?;
                return Ok(Session {
                    conn,
                    backend_pid,
                    lock_id,
                });
            }
            store::unlock_worker(&mut conn, lock_id).await?;
        }
        Err(RegisterError::HeldElsewhere(self.info.id.clone()))
    }

    /// Registered (again): give back the leases of runs no step of ours is
    /// working on (left while cut off, or held under this id by an earlier
    /// process), then let steps and claims go on. In this order, so that
    /// no run claimed from now on can be given back by mistake.
    async fn back_in_touch(&self, session: &mut Session, regained: bool) {
        let in_flight = self.leases.in_flight();
        match store::give_back_idle_leases(&mut session.conn, &self.info.id, &in_flight).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(
                    runs = n,
                    "gave back the leases of runs no step of this worker is working on"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not give back idle leases; they expire by themselves")
            }
        }
        self.liveness.set(true);
        if regained {
            tracing::info!("back in touch with the database: steps and claims go on");
        } else {
            tracing::info!(worker_id = %self.info.id, "registered in wfq.workers with a liveness session");
        }
    }

    /// One heartbeat: cut off while it is slow, lost when it fails or stays
    /// unanswered for `give_up_after`.
    async fn beat(&self, session: &mut Session) -> Beat {
        let pid = session.backend_pid;
        let answer = store::worker_heartbeat(&mut session.conn, &self.info.id);
        tokio::pin!(answer);
        let answered = match tokio::time::timeout(self.config.slow_heartbeat, &mut answer).await {
            Ok(answered) => answered,
            Err(_) => {
                if self.liveness.set(false) {
                    tracing::warn!(waited = ?self.config.slow_heartbeat, "the database is slow to answer the liveness heartbeat: no provider call starts until it does");
                }
                let rest = self
                    .config
                    .give_up_after
                    .saturating_sub(self.config.slow_heartbeat);
                match tokio::time::timeout(rest, answer).await {
                    Ok(answered) => answered,
                    Err(_) => {
                        return Beat::Lost(format!(
                            "no answer to the liveness heartbeat within {:?}",
                            self.config.give_up_after
                        ));
                    }
                }
            }
        };
        judge_heartbeat(answered.map_err(|e| e.to_string()), pid)
    }

    /// Graceful stop: the row says `stopped`, the session ends.
    async fn sign_off(&self, mut session: Session) {
        if let Err(e) = store::worker_stopped(&mut session.conn, &self.info.id).await {
            tracing::warn!(error = %e, "could not mark this worker stopped in wfq.workers");
        }
        let _ = session.conn.close().await;
    }
}

/// The registry row without a session of its own: written and refreshed
/// through the pool, so that `wfq workers` shows the worker; no lock.
async fn keep_row_through_pool(
    pool: PgPool,
    info: WorkerInfo,
    config: RegistryConfig,
    mut stop: oneshot::Receiver<()>,
) {
    let mut registered = false;
    let mut failures: u32 = 0;
    loop {
        let pause = if registered {
            config.heartbeat_every
        } else {
            reconnect_pause(failures.max(1))
        };
        let first = !registered && failures == 0;
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = &mut stop => break,
            }
        }
        let result = if registered {
            store::worker_heartbeat(&pool, &info.id)
                .await
                .map(|(_, exists)| exists)
        } else {
            store::upsert_worker(&pool, &info, None).await
        };
        match result {
            Ok(ok) => {
                registered = ok;
                failures = 0;
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not refresh this worker's registry row");
                failures = failures.saturating_add(1);
            }
        }
    }
    if let Err(e) = store::worker_stopped(&pool, &info.id).await {
        tracing::warn!(error = %e, "could not mark this worker stopped in wfq.workers");
    }
}

/// The machine's name, as the registry shows it.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_answered_only_by_the_session_that_holds_the_lock() {
        assert_eq!(judge_heartbeat(Ok((42, true)), 42), Beat::Answered);
        assert_eq!(judge_heartbeat(Ok((42, false)), 42), Beat::RowGone);
        assert!(matches!(
            judge_heartbeat(Ok((43, true)), 42),
            Beat::Lost(why) if why.contains("session_liveness = false")
        ));
        assert!(matches!(
            judge_heartbeat(Err("connection reset".into()), 42),
            Beat::Lost(why) if why == "connection reset"
        ));
    }

    #[test]
    fn reconnecting_backs_off_to_five_seconds() {
        let pauses: Vec<u64> = (1..=8)
            .map(|n| reconnect_pause(n).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(reconnect_pause(0), Duration::from_millis(250));
        assert_eq!(reconnect_pause(u32::MAX), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn liveness_wakes_its_waiters() {
        let liveness = Liveness::pending();
        assert!(!liveness.is_live());
        let waiter = tokio::spawn({
            let liveness = liveness.clone();
            async move { liveness.wait_live().await }
        });
        assert!(liveness.set(true));
        assert!(!liveness.set(true), "no change the second time");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(Liveness::always().is_live());
    }
}
