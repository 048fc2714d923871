//! What happens after one delivery attempt: a pure function of the attempt
//! count, the receiver's answer, the retry policy and the clock.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::backoff::RetryPolicy;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    /// The receiver answered with this status (and maybe a `Retry-After`).
    Answered {
        /// HTTP status.
        status: u16,
        /// The receiver's wait hint.
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused, timeout, TLS failure, a reset.
    NoAnswer(String),
    /// The URL cannot be requested at all (not an http(s) URL after all).
    InvalidUrl(String),
}

/// Why a callback is given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// `max_attempts` were made without a 2xx.
    Exhausted,
    /// The receiver answered 410 Gone: it wants no more.
    Gone,
    /// The URL cannot be requested.
    InvalidUrl,
}

/// What to do with the callback after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryDecision {
    /// A 2xx arrived: done.
    Delivered,
    /// Try again at this time (stored in `callback_due_at`).
    RetryAt(DateTime<Utc>),
    /// Done without success; the run itself is untouched.
    Failed(GiveUp),
}

impl DeliveryDecision {
    /// The attempt's `result` column.
    pub fn result(&self) -> &'static str {
        match self {
            DeliveryDecision::Delivered => "delivered",
            DeliveryDecision::RetryAt(_) => "retry",
            DeliveryDecision::Failed(GiveUp::Exhausted) => "exhausted",
            DeliveryDecision::Failed(GiveUp::Gone) => "gone",
            DeliveryDecision::Failed(GiveUp::InvalidUrl) => "invalid_url",
        }
    }

    /// The run's `callback_state` after it.
    pub fn state(&self) -> &'static str {
        match self {
            DeliveryDecision::Delivered => "delivered",
            DeliveryDecision::RetryAt(_) => "pending",
            DeliveryDecision::Failed(_) => "failed",
        }
    }

    /// When the next attempt is due.
    pub fn next_attempt_at(&self) -> Option<DateTime<Utc>> {
        match self {
            DeliveryDecision::RetryAt(at) => Some(*at),
            _ => None,
        }
    }
}

/// Decides after attempt number `attempts` (1 = the first) ended with
/// `outcome`. Any 2xx delivers. 410 Gone stops at once. Every other answer
/// (3xx, which is not followed; 4xx; 5xx) and every missing answer is tried
/// again on `policy`'s schedule until `policy.max_attempts`: a 401, 403 or
/// 404 from a receiver is usually a deployment that is not finished yet, and
/// giving up early would lose a notification about money for good. A
/// `Retry-After` longer than the schedule's delay is honoured, up to
/// `policy.max`. `unit` in `[0, 1)` is the jitter's randomness.
pub fn after_delivery(
    attempts: u32,
    outcome: &AttemptOutcome,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> DeliveryDecision {
    let retry_after = match outcome {
        AttemptOutcome::Answered { status, .. } if (200..300).contains(status) => {
            return DeliveryDecision::Delivered;
        }
        AttemptOutcome::Answered { status: 410, .. } => {
            return DeliveryDecision::Failed(GiveUp::Gone);
        }
        AttemptOutcome::InvalidUrl(_) => return DeliveryDecision::Failed(GiveUp::InvalidUrl),
        AttemptOutcome::Answered { retry_after, .. } => *retry_after,
        AttemptOutcome::NoAnswer(_) => None,
    };
    if !policy.may_retry(attempts) {
        return DeliveryDecision::Failed(GiveUp::Exhausted);
    }
    let scheduled = policy.delay(attempts, unit);
    let delay = match retry_after {
        Some(hint) => scheduled.max(hint.min(policy.max)),
        None => scheduled,
    };
    DeliveryDecision::RetryAt(now + chrono::Duration::from_std(delay).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial: Duration::from_secs(10),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }

    fn answered(status: u16) -> AttemptOutcome {
        AttemptOutcome::Answered {
            status,
            retry_after: None,
        }
    }

    #[test]
    fn decision_table() {
        let now = DateTime::parse_from_rfc3339("2026-11-25T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |secs: i64| DeliveryDecision::RetryAt(now + chrono::Duration::seconds(secs));
        let no_answer = AttemptOutcome::NoAnswer("connection refused".into());
        let hint = |status: u16, secs: u64| AttemptOutcome::Answered {
            status,
            retry_after: Some(Duration::from_secs(secs)),
        };
        use DeliveryDecision::{Delivered, Failed};
        // (attempts made, outcome, decision); unit 0.5 = no jitter
        let table = [
            (1, answered(200), Delivered),
            (1, answered(204), Delivered),
            (4, answered(299), Delivered),
            (1, answered(500), at(10)),
            (2, answered(503), at(20)),
            (3, no_answer.clone(), at(40)),
            (4, answered(500), Failed(GiveUp::Exhausted)),
            (4, no_answer.clone(), Failed(GiveUp::Exhausted)),
            (9, answered(500), Failed(GiveUp::Exhausted)),
            (1, answered(410), Failed(GiveUp::Gone)),
            (4, answered(410), Failed(GiveUp::Gone)),
            (1, answered(400), at(10)),
            (1, answered(401), at(10)),
            (1, answered(404), at(10)),
            (1, answered(408), at(10)),
            (1, answered(301), at(10)),
            (1, answered(100), at(10)),
            // Retry-After: honoured when longer than the schedule, capped at max
            (1, hint(429, 30), at(30)),
            (1, hint(429, 5), at(10)),
            (1, hint(503, 3600), at(60)),
            (4, hint(429, 1), Failed(GiveUp::Exhausted)),
            (
                1,
                AttemptOutcome::InvalidUrl("relative URL".into()),
                Failed(GiveUp::InvalidUrl),
            ),
        ];
        for (attempts, outcome, expected) in table {
            assert_eq!(
                after_delivery(attempts, &outcome, &policy(), now, 0.5),
                expected,
                "attempt {attempts}: {outcome:?}"
            );
        }
    }

    #[test]
    fn jitter_spreads_the_retry_within_the_policy() {
        let now = Utc::now();
        let early = after_delivery(1, &answered(500), &policy(), now, 0.0);
        let late = after_delivery(1, &answered(500), &policy(), now, 0.999);
        assert_eq!(
            early,
            DeliveryDecision::RetryAt(now + chrono::Duration::seconds(8))
        );
        let late = late.next_attempt_at().unwrap() - now;
        assert!(
            late > chrono::Duration::milliseconds(11_900) && late <= chrono::Duration::seconds(12)
        );
    }

    #[test]
    fn columns_of_each_decision() {
        let now = Utc::now();
        let cases = [
            (DeliveryDecision::Delivered, "delivered", "delivered"),
            (DeliveryDecision::RetryAt(now), "retry", "pending"),
            (
                DeliveryDecision::Failed(GiveUp::Exhausted),
                "exhausted",
                "failed",
            ),
            (DeliveryDecision::Failed(GiveUp::Gone), "gone", "failed"),
            (
                DeliveryDecision::Failed(GiveUp::InvalidUrl),
                "invalid_url",
                "failed",
            ),
        ];
        for (decision, result, state) in cases {
            assert_eq!((decision.result(), decision.state()), (result, state));
            assert_eq!(decision.next_attempt_at().is_some(), result == "retry");
        }
    }
}
