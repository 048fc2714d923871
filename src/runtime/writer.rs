//! Group commit for step outcomes: concurrent steps hand their transitions
//! to a few writer tasks, and each writer applies everything waiting in one
//! statement and one commit. A step still waits until its own transition is
//! committed (nothing is acknowledged before it is durable); what changes is
//! that 50 steps finishing together cost one WAL flush instead of 50, which
//! is what bounds a worker on a disk that syncs in about a millisecond.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::lifecycle::{RunState, Transition};
use crate::store::{self, TransitionWrite};

/// Most transitions per statement.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<Option<i64>, sqlx::Error>>;

/// Hands transitions to the writer tasks.
#[derive(Debug)]
pub struct TransitionWriter {
    tx: mpsc::UnboundedSender<(TransitionWrite, Reply)>,
}

impl TransitionWriter {
    /// Starts `writers` writer tasks on `pool` (each holds at most one
    /// connection at a time). They end when the writer is dropped.
    pub fn start(pool: PgPool, worker: String, lease: Duration, writers: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(
                pool.clone(),
                worker.clone(),
                lease,
                rx.clone(),
            ));
        }
        TransitionWriter { tx }
    }

    /// Applies `t` to run `id` if this worker still holds it at `version`,
    /// like `store::apply_transition`, batched with other steps' writes.
    pub async fn apply(
        &self,
        id: i64,
        version: i64,
        from: RunState,
        t: &Transition,
    ) -> Result<Option<i64>, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        let write = TransitionWrite {
            id,
            version,
            from,
            transition: t.clone(),
        };
        if self.tx.send((write, reply)).is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        answer.await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

type Queue = Arc<Mutex<mpsc::UnboundedReceiver<(TransitionWrite, Reply)>>>;

async fn write_batches(pool: PgPool, worker: String, lease: Duration, rx: Queue) {
    loop {
        // Take whatever is waiting (at least one); the next writer then
        // gathers the next batch while this one is committing.
        let mut batch = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        let (writes, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        // A database that is away is waited for by the batch as a whole,
        // with a growing pause: a few writers retrying, not every step in
        // flight (which would hammer a server that is coming back).
        let attempt = || store::apply_transitions(&pool, &worker, lease, &writes);
        let outcome = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(6)
                    .with_jitter(),
            )
            .when(store::is_transient)
            .notify(|e, wait| tracing::warn!(error = %e, retry_in = ?wait, batch = writes.len(), "recording steps failed; retrying"))
            .await;
        match outcome {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
                continue;
            }
            Err(e) if writes.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
                continue;
            }
            Err(e) if store::is_transient(&e) => {
                for reply in replies {
                    let _ = reply.send(Err(copy_error(&e)));
                }
                continue;
            }
            // The statement itself failed: each write gets its own answer,
            // so one run's bad write does not fail the others.
            Err(e) => {
                tracing::debug!(error = %e, batch = writes.len(), "batched write failed; writing one by one")
            }
        }
        for (write, reply) in writes.into_iter().zip(replies) {
            let result = store::apply_transition(
                &pool,
                write.id,
                write.version,
                write.from,
                &worker,
                lease,
                &write.transition,
            )
            .await;
            let _ = reply.send(result);
        }
    }
}

/// The same error for every write of a failed batch (`sqlx::Error` is not
/// `Clone`); the kind that callers and logs look at is kept.
fn copy_error(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        other => sqlx::Error::Io(std::io::Error::other(other.to_string())),
    }
}
