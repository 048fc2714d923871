//! One claimed callback, start to end: its attempt, the decision after it,
//! the log line and the record. Each runs as a task of its own, so it waits
//! for no other delivery.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::decision::{AttemptOutcome, DeliveryDecision, after_delivery};
use super::record::{Recorded, Recorder};
use super::send::{Attempt, Sender, origin};
use crate::backoff::RetryPolicy;
use crate::store::{CallbackAttempt, ClaimedCallback};

/// What every delivery of one process shares.
pub struct Deliverer {
    /// The signing HTTP client.
    pub sender: Sender,
    /// The schedule of attempts.
    pub retry: RetryPolicy,
    /// The attempt writer.
    pub recorder: Recorder,
}

/// Sends `claimed` once, decides and records; returns when the next attempt
/// is due if a retry was recorded. Ends within the attempt's timeout plus
/// the record, which the claim's lease covers.
pub async fn deliver(with: Arc<Deliverer>, claimed: ClaimedCallback) -> Option<DateTime<Utc>> {
    let attempt = claimed.callback_attempts.max(0) as u32 + 1;
    // RunRow serializes money as exact decimal strings.
    let body = serde_json::to_vec(&claimed.run).expect("a run serializes");
    let sent = with
        .sender
        .send(&claimed.callback_url, claimed.run.id, attempt, body)
        .await;
    let decision = after_delivery(
        attempt,
        &sent.outcome,
        &with.retry,
        Utc::now(),
        fastrand::f64(),
    );
    log_attempt(&claimed, attempt, &sent, &decision);
    let (http_status, error) = match &sent.outcome {
        AttemptOutcome::Answered { status, .. } => (Some(i32::from(*status)), None),
        AttemptOutcome::NoAnswer(why) | AttemptOutcome::InvalidUrl(why) => {
            (None, Some(why.clone()))
        }
    };
    let record = CallbackAttempt {
        run_id: claimed.run.id,
        attempt: attempt as i32,
        started_at: sent.started_at,
        duration_ms: sent.duration.as_millis().min(i32::MAX as u128) as i32,
        http_status,
        error,
        result: decision.result(),
        state: decision.state(),
        next_attempt_at: decision.next_attempt_at(),
    };
    match with.recorder.record(record).await {
        Recorded::Written => decision.next_attempt_at(),
        Recorded::LeaseLost | Recorded::Failed => None,
    }
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
