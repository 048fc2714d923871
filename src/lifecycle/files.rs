//! Decisions about input files, before anything is submitted: a file that
//! cannot be used fails its run (nothing was frozen); an upload that got
//! no clear answer, or a file that cannot be read for now, is tried again
//! on the submit schedule, and given up after `submit.max_attempts`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::*;
use crate::backoff::RetryPolicy;

/// The run fails with `code` (e.g. `FILE_TOO_LARGE`) for input `key`.
pub fn file_failed(code: &str, key: &str, message: String, detail: Option<Value>) -> Transition {
    let detail = json!({ "key": key, "error": message, "provider": detail });
    Transition::failed(
        code,
        message,
        Some(detail.clone()),
        Event {
            kind: "file_failed",
            detail,
        },
    )
}

/// What to do after an upload of input `key` got no clear answer, its
/// `attempts`-th: try again later, or give up (`FILE_UPLOAD_FAILED`).
pub fn upload_unclear(
    state: RunState,
    key: &str,
    attempts: u32,
    reason: &str,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> Transition {
    if attempts >= policy.max_attempts {
        return file_failed(
            "FILE_UPLOAD_FAILED",
            key,
            format!(
                "inputs.{key}: the upload got no clear answer {attempts} times (last: {reason}); nothing was submitted"
            ),
            None,
        );
    }
    let wait: Duration = policy.delay(attempts.max(1), unit);
    Transition {
        due_at: Some(later(now, wait)),
        ..Transition::new(
            state,
            Event {
                kind: "upload_retry",
                detail: json!({ "key": key, "attempts": attempts, "reason": reason, "wait_ms": wait.as_millis() as u64 }),
            },
        )
    }
}

/// What to do after input `key` could not be read for now (a 5xx, a
/// timeout, a store that did not answer), its `attempts`-th try: read it
/// again later on the submit schedule, or give up (`FILE_UNREADABLE`,
/// naming the input and the file as `shown`)
/// after `submit.max_attempts`. Nothing was uploaded or frozen either way.
pub fn read_unclear(
    state: RunState,
    (key, shown): (&str, &str),
    attempts: u32,
    reason: &str,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> Transition {
    if attempts >= policy.max_attempts {
        return file_failed(
            "FILE_UNREADABLE",
            key,
            format!(
                "inputs.{key}: could not read {shown} in {attempts} attempts (last: {reason}); nothing was uploaded or submitted"
            ),
            None,
        );
    }
    let wait: Duration = policy.delay(attempts.max(1), unit);
    Transition {
        due_at: Some(later(now, wait)),
        ..Transition::new(
            state,
            Event {
                kind: "file_read_retry",
                detail: json!({ "key": key, "attempts": attempts, "reason": reason, "wait_ms": wait.as_millis() as u64 }),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unclear_uploads_are_retried_then_given_up() {
        let policy = RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.0,
        };
        let now = Utc::now();
        let t = upload_unclear(RunState::Queued, "image", 1, "HTTP 503", &policy, now, 0.5);
        assert_eq!(t.to, RunState::Queued);
        assert_eq!(t.due_at, Some(now + chrono::Duration::seconds(1)));
        let t = upload_unclear(RunState::Queued, "image", 3, "HTTP 503", &policy, now, 0.5);
        assert_eq!(t.to, RunState::Failed);
        assert_eq!(t.error.unwrap().code, "FILE_UPLOAD_FAILED");
        let t = file_failed(
            "FILE_TOO_LARGE",
            "image",
            "inputs.image: too large".into(),
            None,
        );
        assert_eq!(t.event.kind, "file_failed");
        let t = read_unclear(
            RunState::Queued,
            ("image", "x.png"),
            2,
            "HTTP 503",
            &policy,
            now,
            0.5,
        );
        assert_eq!((t.to, t.event.kind), (RunState::Queued, "file_read_retry"));
        assert_eq!(t.due_at, Some(now + chrono::Duration::seconds(2)));
        let t = read_unclear(
            RunState::Queued,
            ("image", "x.png"),
            3,
            "HTTP 503",
            &policy,
            now,
            0.5,
        );
        let error = t.error.unwrap();
        assert_eq!(error.code, "FILE_UNREADABLE");
        assert!(
            error
                .message
                .starts_with("inputs.image: could not read x.png in 3 attempts"),
            "{}",
            error.message
        );
    }
}
