//! Writes finished attempts to the database. One writer task per process:
//! whatever has finished while the previous statement ran goes into the
//! next one, so a finished attempt waits for at most one write in progress,
//! never for an attempt still in flight, and a burst of short deliveries
//! costs a few statements rather than one each.

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::store::{self, CallbackAttempt};

/// Whether an attempt's record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The attempt and its decision are in the database.
    Written,
    /// Refused by the compare-and-set: the lease was lost (the run was
    /// finished again and re-armed, or another worker took it over).
    LeaseLost,
    /// The statement failed; the callback is sent again once its lease ends.
    Failed,
}

type Entry = (CallbackAttempt, oneshot::Sender<Recorded>);

/// Hands finished attempts to the writer task. Cloned into every delivery;
/// the writer ends once every clone is dropped and the last write is done.
#[derive(Clone)]
pub struct Recorder {
    queue: mpsc::UnboundedSender<Entry>,
}

impl Recorder {
    /// Starts the writer for `worker` on `pool`.
    pub fn start(pool: PgPool, worker: String) -> (Recorder, JoinHandle<()>) {
        // Unbounded, yet holding at most one entry per delivery slot: every
        // delivery waits for its own record before its slot frees.
        let (queue, entries) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write(pool, worker, entries));
        (Recorder { queue }, writer)
    }

    /// Records `attempt` and returns once it is written (or refused).
    pub async fn record(&self, attempt: CallbackAttempt) -> Recorded {
        let (done, written) = oneshot::channel();
        if self.queue.send((attempt, done)).is_err() {
            tracing::warn!(
                "callbacks: the attempt writer is gone; the attempt is sent again once its lease ends"
            );
            return Recorded::Failed;
        }
        written.await.unwrap_or(Recorded::Failed)
    }
}

async fn write(pool: PgPool, worker: String, mut entries: mpsc::UnboundedReceiver<Entry>) {
    while let Some(first) = entries.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = entries.try_recv() {
            batch.push(more);
        }
        let (attempts, waiting): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let outcomes: Vec<Recorded> = match store::record_callback_attempts(
            &pool, &worker, &attempts,
        )
        .await
        {
            Ok(written) => {
                let lost = attempts.len() - written.len();
                if lost > 0 {
                    tracing::warn!(
                        lost,
                        "callbacks: some deliveries lost their lease before they were recorded (their runs were finished again, or the lease ran out)"
                    );
                }
                attempts
                    .iter()
                    .map(|a| {
                        if written.contains(&a.run_id) {
                            Recorded::Written
                        } else {
                            Recorded::LeaseLost
                        }
                    })
                    .collect()
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "callbacks: recording delivery attempts failed; they are sent again once their lease ends"
                );
                vec![Recorded::Failed; attempts.len()]
            }
        };
        for (done, outcome) in waiting.into_iter().zip(outcomes) {
            // A delivery aborted meanwhile (the worker gave up waiting) no longer listens.
            let _ = done.send(outcome);
        }
    }
}
