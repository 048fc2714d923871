//! The claim loop, as the stream of tasks apalis pulls from.
//!
//! Backpressure: the loop claims only as many runs as it has free slots
//! (semaphore permits), and each task carries its permit until its step is
//! done, so a claimed run never waits in memory while its lease runs down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Engine;
use super::step::LeaseClock;
use crate::store::{ClaimConnection, ClaimedRun};

/// One claimed run handed to apalis, with the slot it occupies.
#[derive(Debug)]
pub struct RunJob {
    /// The run and its lease.
    pub run: ClaimedRun,
    /// Released when the step ends, which lets the loop claim again.
    pub slot: OwnedSemaphorePermit,
    /// When this worker's lease on the run ends.
    pub lease: LeaseClock,
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
    /// Claims and due-time reads go over a connection of their own.
    db: ClaimConnection,
    slots: Arc<Semaphore>,
    config: FetcherConfig,
    /// The last claim found fewer due runs than it asked for: sleep first.
    drained: bool,
    /// Claims in a row that found nothing although a run looked due (it is
    /// row-locked by someone else): each doubles the next pause.
    empty_claims: u32,
    db_failures: u32,
    /// When the profiles with active runs were last looked up.
    profiles_seen: Option<Instant>,
    /// Profiles were left out of the last claim for their rate: look again
    /// after this long at most.
    room_in: Option<Duration>,
}

/// How often the claim loop looks for queued runs of profiles it does not
/// have (a loose index scan: one descent per profile with active runs).
const PROFILE_DISCOVERY: Duration = Duration::from_secs(5);

/// The shortest pause after a claim that found nothing.
const MIN_PAUSE: Duration = Duration::from_millis(5);

impl Fetcher {
    /// A loop over `engine`'s database.
    pub fn new(engine: Arc<Engine>, config: FetcherConfig) -> Self {
        Fetcher {
            db: ClaimConnection::new(&engine.pool),
            engine,
            slots: Arc::new(Semaphore::new(config.concurrency)),
            config,
            drained: false,
            empty_claims: 0,
            db_failures: 0,
            profiles_seen: None,
            room_in: None,
        }
    }

    /// Waits for free slots and due runs, claims them and returns them.
    /// Never returns an empty batch: apalis reads "no task" as end of stream.
    pub async fn next_batch(&mut self) -> Vec<RunJob> {
        loop {
            if self.drained {
                self.sleep_until_due().await;
            }
            let free_slot = self.slots.clone().acquire_owned();
            let Ok(first) = self.engine.metrics.waiting_for_slot(free_slot).await else {
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
            // Cut off from the database, other workers may be taking this
            // one's runs: claim nothing until the liveness session is back.
            if !self.engine.liveness.is_live() {
                self.engine.liveness.wait_live().await;
            }
            self.discover_profiles().await;
            let engine = &self.engine;
            let (scope, room_in) = engine.claim_scope_with_room();
            self.room_in = room_in;
            if scope.lanes.is_empty() {
                drop(slots);
                self.drained = true;
                continue;
            }
            let taken = Instant::now();
            match self
                .db
                .claim(&engine.worker_id, slots.len(), engine.lease, &scope)
                .await
            {
                Ok(runs) => {
                    let rescued = runs.iter().filter(|r| r.rescued_from.is_some()).count();
                    engine.metrics.claimed(runs.len(), rescued);
                    for cause in runs.iter().filter_map(|r| r.rescue_cause) {
                        engine.metrics.rescued(cause.as_str());
                    }
                    if self.db_failures > 0 {
                        tracing::info!("database is back; claiming again");
                        self.db_failures = 0;
                    }
                    self.drained = runs.len() < slots.len();
                    self.empty_claims = if runs.is_empty() {
                        self.empty_claims.saturating_add(1)
                    } else {
                        0
                    };
                    if !runs.is_empty() {
                        tracing::debug!(claimed = runs.len(), "claimed due runs");
                        return runs
                            .into_iter()
                            .zip(slots)
                            .map(|(run, slot)| RunJob {
                                lease: engine.leases.hold(run.id, taken),
                                run,
                                slot,
                            })
                            .collect();
                    }
                }
                Err(e) => {
                    drop(slots);
                    let pause = self.database_failed();
                    tracing::warn!(error = %e, retry_in = ?pause, "claiming runs failed; is the database reachable?");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Looks up the profiles with active runs now and then, so that queued
    /// runs of profiles this worker does not have come into its claims.
    async fn discover_profiles(&mut self) {
        if !self.engine.fails_unknown_providers()
            || self
                .profiles_seen
                .is_some_and(|at| at.elapsed() < PROFILE_DISCOVERY)
        {
            return;
        }
        self.profiles_seen = Some(Instant::now());
        match self.db.active_profiles().await {
            Ok(profiles) => self.engine.saw_active_profiles(profiles),
            Err(e) => {
                tracing::debug!(error = %e, "could not look up the profiles with active runs")
            }
        }
    }

    /// Counts a failed database call and returns how long to back off:
    /// 0.5 s doubling to 30 s, so an outage costs a few attempts, not a spin.
    fn database_failed(&mut self) -> Duration {
        self.db_failures = self.db_failures.saturating_add(1);
        Duration::from_millis(250u64 << self.db_failures.min(7)).min(Duration::from_secs(30))
    }

    async fn sleep_until_due(&mut self) {
        // A profile left out for its rate gets room as its requests go: look
        // again by then, whatever the other lanes say.
        let fallback = match self.room_in {
            Some(room) => self.config.fallback_poll.min(room.max(MIN_PAUSE)),
            None => self.config.fallback_poll,
        };
        let (scope, _) = self.engine.claim_scope_with_room();
        if scope.lanes.is_empty() {
            let until = Utc::now() + chrono::Duration::from_std(fallback).unwrap_or_default();
            self.engine.wake.sleep_until(until).await;
            self.drained = false;
            return;
        }
        let next = match self.db.next_due_in(&scope).await {
            Ok(next) => next,
            // Not the fallback poll: that may be long, and nothing else
            // wakes the loop when the database comes back.
            Err(e) => {
                let pause = self.database_failed();
                tracing::warn!(error = %e, retry_in = ?pause, "reading the next due time failed; is the database reachable?");
                tokio::time::sleep(pause).await;
                self.drained = false;
                return;
            }
        };
        // A run that is due but was not claimed is row-locked by someone
        // else (another worker's claim, a producer's open transaction). Back
        // off exponentially instead of asking again every few milliseconds.
        let wait = match next {
            // The last claim got runs and more have come due since (a
            // commit that landed after its snapshot, a poll whose time has
            // come): claim again at once.
            Some(n) if n.is_zero() && self.empty_claims == 0 => {
                self.drained = false;
                return;
            }
            Some(n) if n.is_zero() => {
                let pause = MIN_PAUSE
                    .saturating_mul(1 << self.empty_claims.saturating_sub(1).min(16))
                    .min(fallback);
                tracing::debug!(empty_claims = self.empty_claims, pause = ?pause, "a run is due but none could be claimed; pausing");
                pause
            }
            Some(n) => {
                self.empty_claims = 0;
                n.min(fallback)
            }
            None => {
                self.empty_claims = 0;
                fallback
            }
        };
        let until = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
        self.engine.wake.sleep_until(until).await;
        self.drained = false;
    }
}
