//! The run state machine as pure functions: (run, provider answer, now) ->
//! [`Transition`]. No I/O here; the store applies a transition in one
//! statement and the runtime does the HTTP.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::providers::{Accepted, ERROR_REPAIRS_KEY, ProviderError, Repairs, RunReport, Unclear};

mod account;
mod files;
mod find;
mod poll;
mod prepare;
mod submit;
#[cfg(test)]
mod test_support;

pub use account::{RefusalScope, account_refused, is_balance_code, refusal_scope};
pub use files::{file_failed, read_unclear, upload_unclear};
pub use find::{FindDecision, InDoubt, after_find};
pub use poll::after_poll;
pub use prepare::{
    begin_resubmit, begin_submit, external_cost_not_accepted, manifest_failed,
    missing_provider_run_id, quote_above_limit, reject_inputs, throttled, unknown_provider,
    unresolved_inputs,
};
pub use submit::{after_submit, submit_outcome_unknown};

/// Where a run a worker handles is. The strings are the values of
/// `wfq.runs.state`. One more value belongs to the database alone:
/// `waiting`, a chained run whose dependencies have not all succeeded,
/// which no claim ever returns (its triggers make it `queued` or end it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Waiting to be submitted.
    Queued,
    /// A submit has been (or is being) sent; its outcome is not recorded yet.
    Submitting,
    /// Accepted by the provider; being polled.
    Running,
    /// Final: the provider's run succeeded and its money is settled.
    Succeeded,
    /// Final: rejected, failed at the provider, or given up on.
    Failed,
    /// Final: withdrawn before submission.
    Canceled,
}

impl RunState {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Submitting => "submitting",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Canceled => "canceled",
        }
    }

    /// Reads the database spelling.
    pub fn parse(text: &str) -> Option<RunState> {
        Some(match text {
            "queued" => RunState::Queued,
            "submitting" => RunState::Submitting,
            "running" => RunState::Running,
            "succeeded" => RunState::Succeeded,
            "failed" => RunState::Failed,
            "canceled" => RunState::Canceled,
            _ => return None,
        })
    }

    /// Whether nothing more will happen to the run.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Canceled
        )
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the decisions need to know about the run being handled.
#[derive(Debug, Clone, PartialEq)]
pub struct RunProgress {
    /// Its state when claimed.
    pub state: RunState,
    /// Submit attempts so far (including the one being decided on).
    pub attempts: u32,
    /// Status checks so far (excluding the one being decided on).
    pub polls: u32,
    /// How long ago the provider accepted it (or `wfq retry` resumed it),
    /// on the database's clock: what `poll.deadline` is measured against.
    pub since_submit: Option<Duration>,
    /// How long the provider has been answering with a status wfq does not
    /// know (database clock).
    pub unknown_status_for: Option<Duration>,
    /// How long ago the provider first said the run was over while its
    /// money is not final yet (database clock).
    pub unsettled_for: Option<Duration>,
}

/// Provider facts to record; `None` keeps what the row has.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProviderFacts {
    /// Provider run id.
    pub provider_run_id: Option<String>,
    /// Revision that runs.
    pub revision_id: Option<String>,
    /// Engine task id.
    pub task_id: Option<String>,
    /// Engine prompt id.
    pub prompt_id: Option<String>,
    /// Billing record id.
    pub billing_run_id: Option<String>,
    /// Verbatim run status.
    pub run_status: Option<String>,
    /// Verbatim freeze status.
    pub freeze_status: Option<String>,
    /// Verbatim submission status.
    pub submission_status: Option<String>,
    /// Verbatim settlement status.
    pub settlement_status: Option<String>,
    /// Outputs.
    pub outputs: Option<Value>,
    /// Currency.
    pub currency: Option<String>,
    /// Quote.
    pub quote_amount: Option<Decimal>,
    /// Frozen at submit.
    pub frozen_amount: Option<Decimal>,
    /// Charged.
    pub final_amount: Option<Decimal>,
    /// Given back.
    pub released_amount: Option<Decimal>,
    /// Compute cost.
    pub compute_cost: Option<Decimal>,
    /// External model cost.
    pub external_model_cost: Option<Decimal>,
    /// Total cost.
    pub total_cost: Option<Decimal>,
    /// Tokens used.
    pub total_tokens: Option<i64>,
    /// Place in the provider's queue (replaced whenever a status is known).
    pub queue_position: Option<i32>,
    /// The provider's estimate of the queue wait, in seconds.
    pub queue_wait_secs: Option<i32>,
}

impl ProviderFacts {
    pub(crate) fn from_accepted(a: &Accepted) -> Self {
        ProviderFacts {
            provider_run_id: Some(a.provider_run_id.clone()),
            revision_id: a.revision_id.clone(),
            task_id: a.task_id.clone(),
            prompt_id: a.prompt_id.clone(),
            billing_run_id: a.billing_run_id.clone(),
            run_status: a.run_status.clone(),
            freeze_status: a.freeze_status.clone(),
            currency: a.currency.clone(),
            quote_amount: a.quote_amount,
            frozen_amount: a.frozen_amount,
            ..Default::default()
        }
    }

    pub(crate) fn from_report(r: &RunReport) -> Self {
        ProviderFacts {
            task_id: r.task_id.clone(),
            prompt_id: r.prompt_id.clone(),
            run_status: r.run_status.clone(),
            freeze_status: r.freeze_status.clone(),
            submission_status: r.submission_status.clone(),
            settlement_status: r.settlement_status.clone(),
            outputs: r.outputs.clone(),
            currency: r.currency.clone(),
            quote_amount: r.quote_amount,
            final_amount: r.final_amount,
            released_amount: r.released_amount,
            compute_cost: r.compute_cost,
            external_model_cost: r.external_model_cost,
            total_cost: r.total_cost,
            total_tokens: r.total_tokens,
            frozen_amount: r.frozen_amount,
            queue_position: r.queue_position,
            queue_wait_secs: r.queue_wait_secs,
            ..Default::default()
        }
    }
}

/// What a step does to one of the run's "since when" timestamps
/// (`submit_in_doubt_since`, `unknown_status_since`, `provider_finished_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mark {
    /// Leave it as it is.
    #[default]
    Keep,
    /// Set it to now, unless it is set already (`submit_in_doubt_since`
    /// is set anew: every submit starts its own doubt).
    Set,
    /// Clear it.
    Clear,
}

/// Why a run failed, as written to `error_code`, `error_message`, `error_detail`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunError {
    /// A stable, documented code.
    pub code: String,
    /// What happened, naming the field when there is one.
    pub message: String,
    /// Structured detail (the provider's error object, ...).
    pub detail: Option<Value>,
}

/// One entry for `wfq.run_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// What happened, e.g. `submit_accepted`.
    pub kind: &'static str,
    /// The provider's answer or the reason.
    pub detail: Value,
}

/// Everything one step changes on a run, applied atomically by the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The new state.
    pub to: RunState,
    /// When the next step is due (active states only).
    pub due_at: Option<DateTime<Utc>>,
    /// Added to `attempts`.
    pub attempts_delta: i32,
    /// Whether this step was a status check.
    pub counts_poll: bool,
    /// Keep the lease: the same worker goes on with the run right away.
    pub keep_lease: bool,
    /// Stamp `submitted_at` (first acceptance only).
    pub submitted: bool,
    /// Stamp `settled_at`: the money is final.
    pub settled: bool,
    /// Pin this revision when the row has none.
    pub pin_revision: Option<String>,
    /// The inputs as actually sent.
    pub sent_inputs: Option<Value>,
    /// Whether a submit may be at the provider without its answer recorded
    /// (`submit_in_doubt_since`; `Set` marks a submit about to be sent).
    pub doubt: Mark,
    /// Names the submit this write records as about to be sent (with
    /// `doubt: Set`; stored as `submit_token`), so that its sender can
    /// record what became of it even after another worker took the run
    /// over (see `store::submits`).
    pub submit_token: Option<Uuid>,
    /// This submit is sent again after the earlier one's run could not be
    /// found: counts in `resubmits`.
    pub resubmitted: bool,
    /// Whether the provider answers with a status wfq does not know
    /// (`unknown_status_since`).
    pub unknown_status: Mark,
    /// Whether the provider said the run is over while its money is not
    /// final (`provider_finished_at`).
    pub provider_finished: Mark,
    /// The provider reported no cost for a finished run: record the highest
    /// known cost of the workflow as `cost_estimate`, for the spend guard.
    pub estimate_cost: bool,
    /// Why a run that goes back to `queued` waits (`hold_reason`; `None`
    /// keeps what the row has).
    pub hold_reason: Option<String>,
    /// Facts from the provider.
    pub facts: ProviderFacts,
    /// Set on failure.
    pub error: Option<RunError>,
    /// The audit entry.
    pub event: Event,
}

impl Transition {
    pub(crate) fn new(to: RunState, event: Event) -> Self {
        Transition {
            to,
            due_at: None,
            attempts_delta: 0,
            counts_poll: false,
            keep_lease: false,
            submitted: false,
            settled: false,
            pin_revision: None,
            sent_inputs: None,
            doubt: Mark::Keep,
            submit_token: None,
            resubmitted: false,
            unknown_status: Mark::Keep,
            provider_finished: Mark::Keep,
            estimate_cost: false,
            hold_reason: None,
            facts: ProviderFacts::default(),
            error: None,
            event,
        }
    }

    /// A failure before anything was frozen: the money is final (none).
    pub(crate) fn failed(code: &str, message: String, detail: Option<Value>, event: Event) -> Self {
        Transition {
            settled: true,
            error: Some(RunError {
                code: code.to_owned(),
                message,
                detail,
            }),
            ..Transition::new(RunState::Failed, event)
        }
    }
}

/// PostgreSQL refused to store `t` (its data: a NUL character, a value
/// too large...), so the same write would fail on every attempt and the run
/// would never end. The run fails `UNSTORABLE_ANSWER` with what can always
/// be stored: the provider's ids, the money and the state change's counts;
/// the provider's outputs and answer are left out (the event names the
/// database's reason). The money is final only where `t` said so.
pub fn unstorable_answer(t: &Transition, reason: &str) -> Transition {
    let text = |s: &Option<String>| s.as_deref().map(|s| s.replace('\0', "\u{fffd}"));
    let f = &t.facts;
    let facts = ProviderFacts {
        provider_run_id: text(&f.provider_run_id),
        task_id: text(&f.task_id),
        currency: text(&f.currency),
        quote_amount: f.quote_amount,
        frozen_amount: f.frozen_amount,
        final_amount: f.final_amount,
        released_amount: f.released_amount,
        compute_cost: f.compute_cost,
        external_model_cost: f.external_model_cost,
        total_cost: f.total_cost,
        total_tokens: f.total_tokens,
        ..Default::default()
    };
    let reason = reason.replace('\0', "\u{fffd}");
    let detail = json!({ "reason": reason, "event": t.event.kind });
    Transition {
        attempts_delta: t.attempts_delta,
        counts_poll: t.counts_poll,
        submitted: t.submitted,
        settled: t.settled && t.to.is_final(),
        // A submit whose answer names the run is no longer in doubt.
        doubt: if facts.provider_run_id.is_some() {
            Mark::Clear
        } else {
            t.doubt
        },
        facts,
        ..Transition::failed(
            "UNSTORABLE_ANSWER",
            format!(
                "the database refused to store the provider's answer ({reason}); the run is failed instead of being retried for ever. The provider's ids and amounts are kept; see the run's events and the provider's console"
            ),
            Some(detail.clone()),
            Event {
                kind: "unstorable_answer",
                detail,
            },
        )
    }
}

pub(crate) fn later(now: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now + chrono::Duration::days(1))
}

pub(crate) fn unclear_detail(u: &Unclear) -> Value {
    json!({
        "reason": u.reason,
        "http_status": u.http_status,
        "retry_after_secs": u.retry_after.map(|d| d.as_secs()),
        "account_refused": u.account_refused,
        "nothing_created": u.nothing_created,
    })
}

/// An event's detail (the provider's answer) with what the client had to
/// repair in it to store it (`wfq_repairs`, next to the answer's members;
/// a non-object detail is wrapped as `{"answer": ..}`): the stored answer
/// differs from what the provider sent, and the audit trail says where.
pub(crate) fn with_repairs(detail: Value, repairs: &Repairs) -> Value {
    if repairs.is_empty() {
        return detail;
    }
    let mut map = match detail {
        Value::Object(map) => map,
        other => serde_json::Map::from_iter([("answer".to_owned(), other)]),
    };
    map.insert(ERROR_REPAIRS_KEY.to_owned(), repairs.to_json());
    Value::Object(map)
}

pub(crate) fn provider_error_detail(e: &ProviderError) -> Value {
    json!({ "code": e.code, "message": e.message, "http_status": e.http_status, "error": e.detail })
}

/// The schedule's delay, stretched to the provider's `Retry-After` but never
/// past the schedule's own cap: a wild header must not park a run for years.
/// (A refused key needs no longer wait here: the worker pauses the whole
/// provider profile, so the run is not claimed until the key works again.)
pub(crate) fn wait_after_unclear(u: &Unclear, scheduled: Duration, cap: Duration) -> Duration {
    let asked = u.retry_after.unwrap_or_default().min(cap);
    scheduled.max(asked)
}

/// `90s` -> `1m30s`, for messages.
pub fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in [
            RunState::Queued,
            RunState::Submitting,
            RunState::Running,
            RunState::Succeeded,
            RunState::Failed,
            RunState::Canceled,
        ] {
            assert_eq!(RunState::parse(s.as_str()), Some(s));
        }
        assert_eq!(RunState::parse("done"), None);
    }

    #[test]
    fn an_unstorable_answer_fails_the_run_keeping_ids_and_money() {
        let accepted = Transition {
            submitted: true,
            doubt: Mark::Clear,
            facts: ProviderFacts {
                provider_run_id: Some("run\0-1".into()),
                outputs: Some(json!({"text": "x"})),
                run_status: Some("RUNNING".into()),
                frozen_amount: Some(Decimal::new(3, 2)),
                ..Default::default()
            },
            ..Transition::new(
                RunState::Running,
                Event {
                    kind: "submit_accepted",
                    detail: json!({"huge": "..."}),
                },
            )
        };
        let t = unstorable_answer(&accepted, "unsupported Unicode escape sequence");
        assert_eq!(t.to, RunState::Failed);
        assert_eq!(t.error.as_ref().unwrap().code, "UNSTORABLE_ANSWER");
        assert_eq!(t.facts.provider_run_id.as_deref(), Some("run\u{fffd}-1"));
        assert_eq!(t.facts.frozen_amount, Some(Decimal::new(3, 2)));
        assert_eq!(
            t.facts.outputs, None,
            "the provider's data is what was refused"
        );
        assert!(t.submitted);
        assert!(!t.settled, "an accepted run's money is not known");
        assert_eq!(t.doubt, Mark::Clear);
        assert_eq!(t.event.kind, "unstorable_answer");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(humantime(Duration::from_secs(90)), "1m30s");
        assert_eq!(humantime(Duration::from_secs(86400)), "24h");
        assert_eq!(humantime(Duration::from_secs(5)), "5s");
    }
}
