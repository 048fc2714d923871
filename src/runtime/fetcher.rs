//! The claim loop, as the stream of tasks apalis pulls from.
//!
//! Backpressure: the loop claims only as many runs as it has free slots
//! (semaphore permits), and each task carries its permit until its step is
//! done, so a claimed run never waits in memory while its lease runs down.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Engine;
use crate::store::{self, ClaimedRun};

/// One claimed run handed to apalis, with the slot it occupies.
#[derive(Debug)]
pub struct RunJob {
    /// The run and its lease.
    pub run: ClaimedRun,
    /// Released when the step ends, which lets the loop claim again.
    pub slot: OwnedSemaphorePermit,
}

/// Claim-loop settings.
#[derive(Debug, Clone)]
pub struct FetcherConfig {
    /// Runs handled at once.
    pub concurrency: usize,
    /// Most runs claimed per statement.
    pub claim_batch: usize,
    /// Longest sleep without a look at the table.
    pub fallback_poll: Duration,
}

/// The claim loop's state between batches.
pub struct Fetcher {
    engine: Arc<Engine>,
    slots: Arc<Semaphore>,
    config: FetcherConfig,
    /// The last claim found fewer due runs than it asked for: sleep first.
    drained: bool,
    db_failures: u32,
}

impl Fetcher {
    /// A loop over `engine`'s database.
    pub fn new(engine: Arc<Engine>, config: FetcherConfig) -> Self {
        Fetcher {
            engine,
            slots: Arc::new(Semaphore::new(config.concurrency)),
            config,
            drained: false,
            db_failures: 0,
        }
    }

    /// Waits for free slots and due runs, claims them and returns them.
    /// Never returns an empty batch: apalis reads "no task" as end of stream.
    pub async fn next_batch(&mut self) -> Vec<RunJob> {
        loop {
            if self.drained {
                self.sleep_until_due().await;
            }
            let Ok(first) = self.slots.clone().acquire_owned().await else {
                // The semaphore is never closed; wait for shutdown instead of spinning.
                std::future::pending::<()>().await;
                unreachable!()
            };
            let mut slots = vec![first];
            while slots.len() < self.config.claim_batch {
                match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => slots.push(slot),
                    Err(_) => break,
                }
            }
            let engine = &self.engine;
            match store::claim_due_runs(&engine.pool, &engine.worker_id, slots.len(), engine.lease)
                .await
            {
                Ok(runs) => {
                    if self.db_failures > 0 {
                        tracing::info!("database is back; claiming again");
                        self.db_failures = 0;
                    }
                    self.drained = runs.len() < slots.len();
                    if !runs.is_empty() {
                        tracing::debug!(claimed = runs.len(), "claimed due runs");
                        return runs
                            .into_iter()
                            .zip(slots)
                            .map(|(run, slot)| RunJob { run, slot })
                            .collect();
                    }
                }
                Err(e) => {
                    drop(slots);
                    self.db_failures += 1;
                    let pause = Duration::from_millis(250u64 << self.db_failures.min(7))
                        .min(Duration::from_secs(30));
                    tracing::warn!(error = %e, retry_in = ?pause, "claiming runs failed; is the database reachable?");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    async fn sleep_until_due(&mut self) {
        let now = Utc::now();
        let fallback = now
            + chrono::Duration::from_std(self.config.fallback_poll)
                .unwrap_or(chrono::Duration::seconds(5));
        let next = match store::next_due_at(&self.engine.pool).await {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, "reading the next due time failed; using the fallback poll");
                None
            }
        };
        let until = next.map_or(fallback, |n| n.min(fallback));
        // A run due "now" that the claim did not get is locked by another
        // worker's claim right now; a moment's pause avoids spinning on it.
        let until = until.max(now + chrono::Duration::milliseconds(5));
        self.engine.wake.sleep_until(until).await;
        self.drained = false;
    }
}
