//! Group commit for step outcomes: concurrent steps hand their transitions
//! to a few writer tasks, and each writer applies everything waiting in one
//! statement and one commit. A step still waits until its own transition is
//! committed (nothing is acknowledged before it is durable); what changes is
//! that 50 steps finishing together cost one WAL flush instead of 50, which
//! is what bounds a worker on a disk that syncs in about a millisecond.
//!
//! Every write carries a token that the row keeps (`last_write`). An error
//! that leaves open whether a write landed (the connection broke after the
//! COMMIT was sent) is resolved by reading the rows back, never by applying
//! the write again: its compare-and-set would fail against its own earlier
//! success and tell the step "changed under us" about a run it still holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use crate::lifecycle::{RunState, Transition};
use crate::store::{self, TransitionWrite};

/// Most transitions per statement.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<Option<i64>, sqlx::Error>>;

/// A write handed to a writer task.
struct Request {
    write: TransitionWrite,
    /// An earlier attempt of this very write (same token) may have landed:
    /// read the row back before applying it.
    uncertain: bool,
    reply: Reply,
}

/// Hands transitions to the writer tasks.
#[derive(Debug)]
pub struct TransitionWriter {
    tx: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.write.id)
            .field("uncertain", &self.uncertain)
            .finish()
    }
}

impl TransitionWriter {
    /// Starts `writers` writer tasks on `pool` (each holds at most one
    /// connection at a time). They end when the writer is dropped.
    /// `wakes_held`: some profile has a limit that holds runs until money
    /// is released or a run ends (`max_outstanding_frozen`, `max_running`),
    /// so batches that finish runs wake a few held ones.
    pub fn start(
        pool: PgPool,
        worker: String,
        lease: Duration,
        writers: usize,
        wakes_held: bool,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(
                pool.clone(),
                worker.clone(),
                lease,
                rx.clone(),
                wakes_held,
            ));
        }
        TransitionWriter { tx }
    }

    /// Applies `t` to run `id` if this worker still holds it at `version`,
    /// like `store::apply_transition`, batched with other steps' writes. A
    /// database that is briefly away is waited for (a few seconds).
    pub async fn apply(
        &self,
        id: i64,
        version: i64,
        from: RunState,
        t: &Transition,
    ) -> Result<Option<i64>, sqlx::Error> {
        self.send(write(id, version, from, t), false).await
    }

    /// [`TransitionWriter::apply`] for an answer the provider has acted on
    /// (an accepted submit of a provider that cannot replay it): the write
    /// is tried again, with the same token, until it is known to have
    /// landed or not, or until `until` (the end of the step's lease).
    pub async fn apply_durably(
        &self,
        id: i64,
        version: i64,
        from: RunState,
        t: &Transition,
        until: Instant,
    ) -> Result<Option<i64>, sqlx::Error> {
        let write = write(id, version, from, t);
        let mut uncertain = false;
        let mut pause = Duration::from_millis(250);
        loop {
            match self.send(write.clone(), uncertain).await {
                Err(e) if store::is_transient(&e) && Instant::now() + pause < until => {
                    tracing::warn!(error = %e, retry_in = ?pause, event = t.event.kind, "could not record an answer the provider acted on; trying again within the lease");
                    uncertain = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Hands `write` to a writer task as a write whose earlier attempt,
    /// under the same token, may have landed without its answer reaching
    /// us: the path [`TransitionWriter::apply_durably`] and the batch
    /// retries take after a transient error. For tests, which cannot lose
    /// a COMMIT's answer on demand.
    #[doc(hidden)]
    pub async fn apply_uncertain(
        &self,
        write: TransitionWrite,
    ) -> Result<Option<i64>, sqlx::Error> {
        self.send(write, true).await
    }

    async fn send(
        &self,
        write: TransitionWrite,
        uncertain: bool,
    ) -> Result<Option<i64>, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            write,
            uncertain,
            reply,
        };
        if self.tx.send(request).is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        answer.await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

fn write(id: i64, version: i64, from: RunState, t: &Transition) -> TransitionWrite {
    TransitionWrite {
        id,
        version,
        from,
        transition: t.clone(),
        token: Uuid::new_v4(),
    }
}

type Queue = Arc<Mutex<mpsc::UnboundedReceiver<Request>>>;

async fn write_batches(pool: PgPool, worker: String, lease: Duration, rx: Queue, wakes_held: bool) {
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
        let uncertain = batch.iter().any(|r| r.uncertain);
        let (writes, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|r| (r.write, r.reply)).unzip();
        // Runs that ended or settled free what a limit held back.
        let freeing: Vec<Option<i64>> = writes
            .iter()
            .map(|w| (w.transition.to.is_final() || w.transition.settled).then_some(w.id))
            .collect();
        let results = write_batch(&pool, &worker, lease, writes, uncertain).await;
        let freed: Vec<i64> = freeing
            .into_iter()
            .zip(results.iter())
            .filter_map(|(id, r)| id.filter(|_| matches!(r, Ok(Some(_)))))
            .collect();
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
        if wakes_held
            && !freed.is_empty()
            && let Err(e) = store::wake_held_runs(&pool, &freed).await
        {
            tracing::debug!(error = %e, "could not wake runs held by a limit; they come due by themselves");
        }
    }
}

/// How many times a batch is tried while the database is away, and how long
/// the pauses between tries grow: a few writers waiting with a growing
/// pause, not every step in flight (which would hammer a server that is
/// coming back).
const BATCH_TRIES: u32 = 7;
const FIRST_PAUSE: Duration = Duration::from_millis(200);
pub(crate) const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// Applies `writes`, one answer per write in order. `uncertain`: some may
/// have landed already (an earlier attempt's answer was lost).
async fn write_batch(
    pool: &PgPool,
    worker: &str,
    lease: Duration,
    writes: Vec<TransitionWrite>,
    mut uncertain: bool,
) -> Vec<Result<Option<i64>, sqlx::Error>> {
    let mut results: Vec<Option<Result<Option<i64>, sqlx::Error>>> =
        writes.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..writes.len()).collect();
    let mut pause = FIRST_PAUSE;
    let mut tries = 0;
    let pick = |pending: &[usize]| -> Vec<TransitionWrite> {
        pending.iter().map(|&i| writes[i].clone()).collect()
    };
    loop {
        tries += 1;
        let attempt = async {
            if uncertain {
                let written = store::written_transitions(pool, &pick(&pending)).await?;
                let mut still = Vec::new();
                for (&i, version) in pending.iter().zip(written) {
                    match version {
                        Some(version) => results[i] = Some(Ok(Some(version))),
                        None => still.push(i),
                    }
                }
                pending = still;
                uncertain = false;
            }
            if pending.is_empty() {
                return Ok(Vec::new());
            }
            store::apply_transitions(pool, worker, lease, &pick(&pending)).await
        };
        match attempt.await {
            Ok(applied) => {
                for (&i, version) in pending.iter().zip(applied) {
                    results[i] = Some(Ok(version));
                }
                break;
            }
            Err(e) if store::is_transient(&e) => {
                // The COMMIT may have landed without its answer reaching us.
                uncertain = true;
                if tries >= BATCH_TRIES {
                    for &i in &pending {
                        results[i] = Some(Err(copy_error(&e)));
                    }
                    break;
                }
                tracing::warn!(error = %e, retry_in = ?pause, batch = pending.len(), "recording steps failed; retrying");
                tokio::time::sleep(with_jitter(pause)).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
            // The statement itself failed: each write gets its own answer,
            // so one run's bad write does not fail the others.
            Err(e) => {
                tracing::debug!(error = %e, batch = pending.len(), "batched write failed; writing one by one");
                for &i in &pending {
                    results[i] = Some(write_alone(pool, worker, lease, &writes[i]).await);
                }
                break;
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or(Err(sqlx::Error::PoolClosed)))
        .collect()
}

/// One write on its own, after its batch's statement failed (most likely
/// for another run's data). A write whose own attempt breaks off is read
/// back before it is given up.
async fn write_alone(
    pool: &PgPool,
    worker: &str,
    lease: Duration,
    write: &TransitionWrite,
) -> Result<Option<i64>, sqlx::Error> {
    let batch = std::slice::from_ref(write);
    match store::apply_transitions(pool, worker, lease, batch).await {
        Ok(applied) => Ok(applied.into_iter().next().flatten()),
        Err(e) if store::is_transient(&e) => match store::written_transitions(pool, batch).await {
            Ok(written) if written.first().is_some_and(Option::is_some) => {
                Ok(written.into_iter().next().flatten())
            }
            _ => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// ±20 %, so that writers that failed together do not come back together.
fn with_jitter(pause: Duration) -> Duration {
    pause.mul_f64(0.8 + fastrand::f64() * 0.4)
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
