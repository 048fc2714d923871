//! Shared fixtures of the lifecycle's table tests.
#![allow(dead_code)]

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::{RunProgress, RunState, Transition};
use crate::backoff::{PollPolicy, RetryPolicy};
use crate::providers::Unclear;

pub(crate) fn retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial: Duration::from_secs(2),
        max: Duration::from_secs(300),
        multiplier: 2.0,
        jitter: 0.0,
    }
}

pub(crate) fn poll() -> PollPolicy {
    PollPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.0,
        deadline: Duration::from_secs(3600),
        unknown_status_limit: Duration::from_secs(600),
        settle_wait: Duration::from_secs(900),
    }
}

pub(crate) fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

pub(crate) fn run(state: RunState, attempts: u32, polls: u32) -> RunProgress {
    RunProgress {
        state,
        attempts,
        polls,
        since_submit: Some(Duration::from_secs(10)),
        unknown_status_for: None,
        unsettled_for: None,
    }
}

pub(crate) fn unclear(retry_after: Option<u64>, account_refused: bool) -> Unclear {
    Unclear {
        reason: "HTTP 503".into(),
        http_status: Some(503),
        retry_after: retry_after.map(Duration::from_secs),
        account_refused,
        nothing_created: false,
    }
}

pub(crate) fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

pub(crate) fn secs(t: &Transition) -> i64 {
    (t.due_at.unwrap() - now()).num_seconds()
}
