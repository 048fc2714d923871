//! What happens after one copy attempt: a pure function of the attempt
//! count, how it went, the retry policy and the clock.

use chrono::{DateTime, Utc};

use crate::backoff::RetryPolicy;
use crate::files::Stored;
use crate::store::MirrorRecord;

/// How one copy attempt went.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// The file is in the store.
    Stored {
        /// Where and what.
        stored: Stored,
        /// Its content type.
        content_type: String,
    },
    /// The answer is not media (by content type): nothing to keep.
    NotMedia {
        /// The content type.
        content_type: String,
    },
    /// The link is gone (HTTP 401, 403, 404, 410): temporary storage that
    /// expired before it could be copied. Retrying cannot help.
    Expired {
        /// The status.
        status: u16,
    },
    /// Refused for good (another 4xx, or not a URL one can request).
    Refused {
        /// Why.
        reason: String,
    },
    /// More than `max_file_bytes`: stopped, nothing kept.
    TooLarge {
        /// The limit.
        limit: u64,
        /// What was seen (announced or arrived) when it stopped.
        seen: u64,
    },
    /// Worth another try: no answer, a 5xx or 429, a broken or slow body,
    /// a store that refused.
    Transient {
        /// Why.
        reason: String,
    },
}

/// The row's next state after `attempt`, which was attempt number
/// `attempts` (1 = the first).
pub fn decide(
    id: i64,
    run_id: i64,
    attempts: i32,
    attempt: Attempt,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> MirrorRecord {
    let base = MirrorRecord {
        id,
        run_id,
        state: "failed",
        attempts,
        due_at: None,
        stored_location: None,
        sha256: None,
        bytes: None,
        content_type: None,
        error_code: None,
        error: None,
    };
    let fail = |code: &str, error: String| MirrorRecord {
        error_code: Some(code.to_owned()),
        error: Some(error),
        ..base.clone()
    };
    match attempt {
        Attempt::Stored {
            stored,
            content_type,
        } => MirrorRecord {
            state: "done",
            bytes: i64::try_from(stored.bytes).ok(),
            sha256: Some(stored.sha256),
            stored_location: Some(stored.location),
            content_type: Some(content_type),
            ..base
        },
        Attempt::NotMedia { content_type } => MirrorRecord {
            state: "skipped",
            error_code: Some("NOT_MEDIA".into()),
            error: Some(format!(
                "the answer is {content_type}, not media; nothing stored"
            )),
            content_type: Some(content_type),
            ..base
        },
        Attempt::Expired { status } => MirrorRecord {
            state: "expired",
            ..fail(
                "LINK_EXPIRED",
                format!(
                    "the provider's link answered HTTP {status}: its temporary storage expired before the copy"
                ),
            )
        },
        Attempt::Refused { reason } => fail("LINK_REFUSED", reason),
        Attempt::TooLarge { limit, seen } => fail(
            "TOO_LARGE",
            format!(
                "larger than storage.max_file_bytes ({limit} bytes; {seen} seen); nothing stored"
            ),
        ),
        Attempt::Transient { reason } if attempts >= policy.max_attempts as i32 => fail(
            "DOWNLOAD_FAILED",
            format!("gave up after {attempts} attempts: {reason}"),
        ),
        Attempt::Transient { reason } => {
            let wait = policy.delay(attempts.max(1) as u32, unit);
            MirrorRecord {
                state: "pending",
                due_at: Some(now + chrono::Duration::from_std(wait).unwrap_or_default()),
                error_code: Some("DOWNLOAD_RETRYING".into()),
                error: Some(reason),
                ..base
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_secs(10),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.0,
        }
    }

    #[test]
    fn each_outcome_has_its_state() {
        let now = Utc::now();
        let d = |attempts, a| decide(1, 2, attempts, a, &policy(), now, 0.5);
        let stored = Stored {
            location: "file:///m/2/a.png".into(),
            bytes: 5,
            sha256: "ab".into(),
        };
        let done = d(
            1,
            Attempt::Stored {
                stored,
                content_type: "image/png".into(),
            },
        );
        assert_eq!((done.state, done.bytes), ("done", Some(5)));
        let retry = d(
            1,
            Attempt::Transient {
                reason: "HTTP 503".into(),
            },
        );
        assert_eq!(retry.state, "pending");
        assert_eq!(retry.due_at, Some(now + chrono::Duration::seconds(10)));
        let retry = d(
            2,
            Attempt::Transient {
                reason: "HTTP 503".into(),
            },
        );
        assert_eq!(retry.due_at, Some(now + chrono::Duration::seconds(20)));
        let gave_up = d(
            3,
            Attempt::Transient {
                reason: "HTTP 503".into(),
            },
        );
        assert_eq!(
            (gave_up.state, gave_up.error_code.as_deref()),
            ("failed", Some("DOWNLOAD_FAILED"))
        );
        let expired = d(1, Attempt::Expired { status: 403 });
        assert_eq!(
            (expired.state, expired.error_code.as_deref()),
            ("expired", Some("LINK_EXPIRED"))
        );
        let big = d(
            1,
            Attempt::TooLarge {
                limit: 10,
                seen: 11,
            },
        );
        assert_eq!(
            (big.state, big.error_code.as_deref()),
            ("failed", Some("TOO_LARGE"))
        );
        assert_eq!(
            d(
                1,
                Attempt::NotMedia {
                    content_type: "text/html".into()
                }
            )
            .state,
            "skipped"
        );
    }
}
