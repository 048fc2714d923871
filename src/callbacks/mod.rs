//! Completion callbacks: once a run with a `callback_url` is final, the
//! worker POSTs the run there as JSON, signed with HMAC-SHA256
//! ([`signature`]), and tries again on a durable schedule until a 2xx or
//! `callbacks.max_attempts` ([`decision`]). The run itself is never touched.
//!
//! The schedule lives in `wfq.runs` (`callback_state`, `callback_due_at`,
//! `callback_attempts`); a trigger makes a callback due when its run becomes
//! final, whatever finished it. Deliveries are claimed with `SKIP LOCKED`
//! and a lease whenever a delivery slot is free, so many worker processes
//! share the work and no two send one callback at once. Each delivery is a
//! task of its own and is recorded as soon as it ends, so a receiver that
//! hangs until the timeout holds up nobody else; and it holds at most
//! `callbacks.per_receiver` of the slots. Delivery is at least once: a
//! worker that dies between a receiver's 2xx and the record sends it again
//! after the lease.

pub mod decision;
mod deliver;
mod record;
mod send;
pub mod signature;
mod slots;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use decision::{AttemptOutcome, DeliveryDecision, GiveUp, after_delivery};
pub use send::{Attempt, Sender, origin};
pub use signature::{SIGNATURE_HEADER, sign, verify};

use crate::config::CallbacksConfig;
use crate::runtime::Wake;
use crate::store;
use deliver::{Deliverer, deliver};
use record::Recorder;
use slots::Slots;

/// Channel that every final transition notifies (with the run id).
pub const RUN_FINISHED_CHANNEL: &str = "wfq_run_finished";

/// The longest the service sleeps without looking at the table.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// The lease of a claimed callback: its attempt starts at once and ends
/// within `timeout`, then the writer records it (after at most the write in
/// progress); a lease that runs out first would let another worker send the
/// same callback.
pub fn lease(config: &CallbacksConfig) -> Duration {
    config.timeout * 2 + Duration::from_secs(30)
}

/// Delivers due callbacks until `stop` turns true; then claims nothing more,
/// lets the deliveries in flight finish (each within the timeout) and be
/// recorded, and returns. With `listen`, final runs wake it at once through
/// `LISTEN wfq_run_finished`; without, it looks every second.
pub async fn deliver_callbacks(
    pool: PgPool,
    config: CallbacksConfig,
    worker_id: String,
    listen: bool,
    mut stop: watch::Receiver<bool>,
) {
    let sender = match Sender::new(config.secret.clone(), config.timeout) {
        Ok(sender) => sender,
        Err(e) => {
            tracing::error!(error = %e, "callbacks: cannot build the HTTP client; no callbacks are delivered by this worker");
            return;
        }
    };
    let wake = Arc::new(Wake::default());
    let listener =
        listen.then(|| tokio::spawn(listen_for_finished_runs(pool.clone(), wake.clone())));
    let (recorder, writer) = Recorder::start(pool.clone(), worker_id.clone());
    let deliverer = Arc::new(Deliverer {
        sender,
        retry: config.retry.clone(),
        recorder,
    });
    let mut service = Service {
        pool: &pool,
        worker_id: &worker_id,
        lease: lease(&config),
        deliverer,
        slots: Slots::new(config.concurrency, config.per_receiver),
        deliveries: JoinSet::new(),
        receivers: HashMap::new(),
        next_retry: None,
        failures: 0,
        claim_after: None,
    };
    tracing::info!(
        concurrency = config.concurrency,
        per_receiver = config.per_receiver,
        max_attempts = config.retry.max_attempts,
        "callback delivery started"
    );
    // A dropped sender (the worker is going away) stops the service too.
    while !*stop.borrow() && stop.has_changed().is_ok() {
        service.claim_while_room().await;
        let until = service.look_again_at();
        tokio::select! {
            Some(ended) = service.deliveries.join_next_with_id(), if !service.deliveries.is_empty() => {
                service.ended(ended);
            }
            _ = wake.sleep_until(until), if service.slots.room() > 0 => {}
            _ = stop.changed() => {}
        }
    }
    let in_flight = service.slots.in_use();
    if in_flight > 0 {
        tracing::info!(
            in_flight,
            "callbacks: stopping; waiting for the deliveries in flight"
        );
    }
    while let Some(ended) = service.deliveries.join_next_with_id().await {
        service.ended(ended);
    }
    // The last clone of the recorder: the writer ends after its last write.
    drop(service);
    if let Err(e) = writer.await {
        tracing::warn!(error = %e, "callbacks: the attempt writer failed");
    }
    if let Some(listener) = listener {
        listener.abort();
    }
    tracing::info!("callback delivery stopped");
}

/// The delivery loop's state: slots, the tasks in flight and when to look.
struct Service<'a> {
    pool: &'a PgPool,
    worker_id: &'a str,
    lease: Duration,
    deliverer: Arc<Deliverer>,
    slots: Slots,
    deliveries: JoinSet<Option<DateTime<Utc>>>,
    /// Whose slot each task holds: released even if the task panicked.
    receivers: HashMap<tokio::task::Id, String>,
    /// The earliest retry this worker recorded that it has not claimed for.
    next_retry: Option<DateTime<Utc>>,
    failures: u32,
    /// After a failed claim: no claim before this.
    claim_after: Option<DateTime<Utc>>,
}

type Ended = Result<(tokio::task::Id, Option<DateTime<Utc>>), tokio::task::JoinError>;

impl Service<'_> {
    /// Claims and starts deliveries while slots are free and due callbacks
    /// of receivers with room remain.
    async fn claim_while_room(&mut self) {
        let now = Utc::now();
        if self.claim_after.is_some_and(|at| now < at) {
            return;
        }
        self.claim_after = None;
        // The claims below take this retry if its receiver has room; if it
        // has none, the slot it frees brings the next claim.
        if self.next_retry.is_some_and(|at| at <= now) {
            self.next_retry = None;
        }
        loop {
            let room = self.slots.room();
            if room == 0 {
                return;
            }
            let busy = self.slots.full();
            let claimed = match store::claim_due_callbacks(
                self.pool,
                self.worker_id,
                room,
                self.lease,
                &busy,
            )
            .await
            {
                Ok(claimed) => claimed,
                Err(e) => {
                    self.failures += 1;
                    let pause = Duration::from_millis(500u64 << self.failures.min(6))
                        .min(Duration::from_secs(30));
                    tracing::warn!(error = %e, retry_in = ?pause, "callbacks: claiming due callbacks failed");
                    self.claim_after =
                        Some(Utc::now() + chrono::Duration::from_std(pause).unwrap_or_default());
                    return;
                }
            };
            self.failures = 0;
            let exhausted = claimed.len() < room;
            for callback in claimed {
                self.slots.take(&callback.receiver);
                let receiver = callback.receiver.clone();
                let task = self
                    .deliveries
                    .spawn(deliver(self.deliverer.clone(), callback));
                self.receivers.insert(task.id(), receiver);
            }
            if exhausted {
                return;
            }
        }
    }

    /// When to claim again without a wake-up: after a claim failure's pause,
    /// at the earliest own retry, and at least every second.
    fn look_again_at(&self) -> DateTime<Utc> {
        let poll = Utc::now() + chrono::Duration::from_std(FALLBACK_POLL).unwrap_or_default();
        match self.claim_after {
            Some(at) => at,
            None => self.next_retry.map_or(poll, |at| at.min(poll)),
        }
    }

    /// A delivery task ended: its slot frees.
    fn ended(&mut self, ended: Ended) {
        let id = match ended {
            Ok((id, next)) => {
                if let Some(at) = next {
                    self.next_retry = Some(self.next_retry.map_or(at, |t| t.min(at)));
                }
                id
            }
            Err(e) => {
                tracing::error!(error = %e, "callbacks: a delivery task failed; the callback is sent again once its lease ends");
                e.id()
            }
        };
        if let Some(receiver) = self.receivers.remove(&id) {
            self.slots.release(&receiver);
        }
    }
}

/// Wakes the service on every final transition until aborted; a lost
/// connection is retried with a growing pause (the fallback poll covers it).
async fn listen_for_finished_runs(pool: PgPool, wake: Arc<Wake>) {
    let mut failures: u32 = 0;
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(RUN_FINISHED_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match listener.await {
            Ok(listener) => listener,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "callbacks: LISTEN {RUN_FINISHED_CHANNEL} failed; relying on the fallback poll");
                tokio::time::sleep(Duration::from_millis(200u64 << failures.min(7))).await;
                continue;
            }
        };
        failures = 0;
        wake.now();
        // try_recv reconnects by itself; Ok(None) says the connection dropped.
        while let Ok(_notification) = listener.try_recv().await {
            wake.now();
        }
    }
}

/// Logs a warning when callbacks wait for delivery and this worker has no
/// `[callbacks]` to deliver them (they stay pending, nothing is lost).
pub async fn warn_if_undelivered(pool: PgPool) {
    match store::pending_callbacks(&pool).await {
        Ok(0) | Err(_) => {}
        Ok(n) => tracing::warn!(
            pending = n,
            "runs with a callback_url wait for delivery, but this worker has no [callbacks] section (and so no signing secret): they stay pending until a worker with [callbacks] runs"
        ),
    }
}
