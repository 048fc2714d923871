//! Completion callbacks: once a run with a `callback_url` is final, the
//! worker POSTs the run there as JSON, signed with HMAC-SHA256
//! ([`signature`]), and tries again on a durable schedule until a 2xx or
//! `callbacks.max_attempts` ([`decision`]). The run itself is never touched.
//!
//! The schedule lives in `wfq.runs` (`callback_state`, `callback_due_at`,
//! `callback_attempts`); a trigger makes a callback due when its run becomes
//! final, whatever finished it. Deliveries are claimed in batches with
//! `SKIP LOCKED` and a lease, so many worker processes share the work and no
//! two send one callback at once; each batch's attempts and decisions are
//! written in one statement. Delivery is at least once: a worker that dies
//! between a receiver's 2xx and the record sends it again after the lease.

pub mod decision;
mod send;
pub mod signature;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

pub use decision::{AttemptOutcome, DeliveryDecision, GiveUp, after_delivery};
pub use send::{Attempt, Sender, origin};
pub use signature::{SIGNATURE_HEADER, sign, verify};

use crate::config::CallbacksConfig;
use crate::runtime::Wake;
use crate::store::{self, CallbackAttempt, ClaimedCallback};

/// Channel that every final transition notifies (with the run id).
pub const RUN_FINISHED_CHANNEL: &str = "wfq_run_finished";

/// The longest the service sleeps without looking at the table.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// The lease of a claimed batch: its attempts run at once, each within
/// `timeout`, then one statement records them; a lease that runs out first
/// would let another worker send the same callback.
pub fn lease(config: &CallbacksConfig) -> Duration {
    config.timeout * 2 + Duration::from_secs(30)
}

/// Delivers due callbacks until `stop` turns true; then finishes (and
/// records) the batch in flight and returns. With `listen`, final runs wake
/// it at once through `LISTEN wfq_run_finished`; without, it looks every
/// second.
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
    let lease = lease(&config);
    let mut failures: u32 = 0;
    tracing::info!(
        concurrency = config.concurrency,
        max_attempts = config.retry.max_attempts,
        "callback delivery started"
    );
    // A dropped sender (the worker is going away) stops the service too.
    while !*stop.borrow() && stop.has_changed().is_ok() {
        let batch = match store::claim_due_callbacks(&pool, &worker_id, config.concurrency, lease)
            .await
        {
            Ok(batch) => {
                failures = 0;
                batch
            }
            Err(e) => {
                failures += 1;
                let pause =
                    Duration::from_millis(500u64 << failures.min(6)).min(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in = ?pause, "callbacks: claiming due callbacks failed");
                sleep_or_stop(&wake, &mut stop, pause).await;
                continue;
            }
        };
        let full = batch.len() >= config.concurrency;
        let next_own = deliver_batch(&pool, &sender, &config, &worker_id, batch).await;
        if full {
            continue; // more may be due
        }
        let mut pause = FALLBACK_POLL;
        if let Some(at) = next_own {
            pause = pause.min((at - Utc::now()).to_std().unwrap_or(Duration::ZERO));
        }
        sleep_or_stop(&wake, &mut stop, pause).await;
    }
    if let Some(listener) = listener {
        listener.abort();
    }
    tracing::info!("callback delivery stopped");
}

async fn sleep_or_stop(wake: &Wake, stop: &mut watch::Receiver<bool>, pause: Duration) {
    let until = Utc::now() + chrono::Duration::from_std(pause).unwrap_or_default();
    tokio::select! {
        _ = wake.sleep_until(until) => {}
        _ = stop.changed() => {}
    }
}

/// Sends a claimed batch at once, decides and records; returns the earliest
/// retry it scheduled.
async fn deliver_batch(
    pool: &PgPool,
    sender: &Sender,
    config: &CallbacksConfig,
    worker_id: &str,
    batch: Vec<ClaimedCallback>,
) -> Option<chrono::DateTime<Utc>> {
    if batch.is_empty() {
        return None;
    }
    let sends = batch.iter().map(|c| async move {
        let attempt = c.callback_attempts.max(0) as u32 + 1;
        // RunRow serializes money as exact decimal strings.
        let body = serde_json::to_vec(&c.run).expect("a run serializes");
        (
            attempt,
            sender.send(&c.callback_url, c.run.id, attempt, body).await,
        )
    });
    let done = futures_util::future::join_all(sends).await;
    let mut records = Vec::with_capacity(done.len());
    for (c, (attempt, sent)) in batch.iter().zip(done) {
        let decision = after_delivery(
            attempt,
            &sent.outcome,
            &config.retry,
            Utc::now(),
            fastrand::f64(),
        );
        log_attempt(c, attempt, &sent, &decision);
        let (http_status, error) = match &sent.outcome {
            AttemptOutcome::Answered { status, .. } => (Some(i32::from(*status)), None),
            AttemptOutcome::NoAnswer(why) | AttemptOutcome::InvalidUrl(why) => {
                (None, Some(why.clone()))
            }
        };
        records.push(CallbackAttempt {
            run_id: c.run.id,
            attempt: attempt as i32,
            started_at: sent.started_at,
            duration_ms: sent.duration.as_millis().min(i32::MAX as u128) as i32,
            http_status,
            error,
            result: decision.result(),
            state: decision.state(),
            next_attempt_at: decision.next_attempt_at(),
        });
    }
    let next = records.iter().filter_map(|r| r.next_attempt_at).min();
    match store::record_callback_attempts(pool, worker_id, &records).await {
        Ok(written) if written.len() < records.len() => tracing::warn!(
            lost = records.len() - written.len(),
            "callbacks: some deliveries lost their lease before they were recorded (their runs were finished again, or the lease ran out)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "callbacks: recording delivery attempts failed; they are sent again once their lease ends"
        ),
    }
    next
}

fn log_attempt(c: &ClaimedCallback, attempt: u32, sent: &Attempt, decision: &DeliveryDecision) {
    let receiver = origin(&c.callback_url);
    let (status, error) = match &sent.outcome {
        AttemptOutcome::Answered { status, .. } => (Some(*status), None),
        AttemptOutcome::NoAnswer(why) | AttemptOutcome::InvalidUrl(why) => {
            (None, Some(why.as_str()))
        }
    };
    let run_id = c.run.id;
    let took = sent.duration;
    match decision {
        DeliveryDecision::Delivered => {
            tracing::debug!(run_id, %receiver, attempt, status, ?took, "callback delivered")
        }
        DeliveryDecision::RetryAt(at) => tracing::info!(
            run_id, %receiver, attempt, status, error, ?took, next_attempt_at = %at,
            "callback not accepted; trying again later"
        ),
        DeliveryDecision::Failed(why) => tracing::warn!(
            run_id, %receiver, attempt, status, error, ?took, reason = ?why,
            "callback failed: giving up (the run itself is unchanged)"
        ),
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
