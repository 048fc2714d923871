//! Decisions before anything is sent: the inputs, consent, limits, the manifest.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::*;
use crate::backoff::RetryPolicy;
use crate::inputs::InputError;
use crate::providers::ManifestError;

/// The inputs passed the manifest: record what will be sent and count the
/// attempt *before* sending, so a crash mid-submit is visible and bounded.
/// From here until its answer is recorded the submit is in doubt.
/// `submit_token` names this submit (see [`Transition::submit_token`]).
pub fn begin_submit(
    revision_id: Option<&str>,
    sent_inputs: Value,
    submit_token: uuid::Uuid,
) -> Transition {
    Transition {
        attempts_delta: 1,
        keep_lease: true,
        pin_revision: revision_id.map(str::to_owned),
        sent_inputs: Some(sent_inputs),
        doubt: Mark::Set,
        submit_token: Some(submit_token),
        ..Transition::new(
            RunState::Submitting,
            Event {
                kind: "submit_started",
                detail: json!({ "revision_id": revision_id }),
            },
        )
    }
}

/// A provider without idempotency keys lists no run for this key, long
/// enough after the submit in doubt that it would be listed by now: the
/// submit is sent again. Recorded as its own event, because it is the one
/// decision that could bill twice if the provider's listing were wrong.
pub fn begin_resubmit(
    revision_id: Option<&str>,
    sent_inputs: Value,
    in_doubt_since: DateTime<Utc>,
    submit_token: uuid::Uuid,
) -> Transition {
    let mut t = begin_submit(revision_id, sent_inputs, submit_token);
    t.event = Event {
        kind: "resubmit_started",
        detail: json!({
            "revision_id": revision_id,
            "reason": "the provider lists no run of this key since the earlier submit",
            "in_doubt_since": in_doubt_since,
        }),
    };
    t.resubmitted = true;
    t
}

/// The inputs do not fit the manifest: fail without submitting.
pub fn reject_inputs(error: &InputError) -> Transition {
    Transition::failed(
        "INVALID_INPUT",
        error.to_string(),
        Some(json!({ "error": error.to_string() })),
        Event {
            kind: "inputs_rejected",
            detail: json!({ "error": error.to_string() }),
        },
    )
}

/// The workflow may bill an external model and the producer did not accept that.
pub fn external_cost_not_accepted(workflow_id: &str) -> Transition {
    let message = format!(
        "accept_external_cost_risk: workflow `{workflow_id}` may incur external model costs; set accept_external_cost_risk = true on the run to allow them"
    );
    Transition::failed(
        "EXTERNAL_COST_NOT_ACCEPTED",
        message.clone(),
        None,
        Event {
            kind: "inputs_rejected",
            detail: json!({ "error": message }),
        },
    )
}

/// A `running` row without a provider run id cannot be polled; park it for
/// an hour with an event an operator will find, instead of re-claiming it
/// every lease period.
pub fn missing_provider_run_id(now: DateTime<Utc>) -> Transition {
    Transition {
        due_at: Some(later(now, Duration::from_secs(3600))),
        ..Transition::new(
            RunState::Running,
            Event {
                kind: "missing_provider_run_id",
                detail: json!({ "error": "state is running but provider_run_id is empty; set it, or fail the run by hand" }),
            },
        )
    }
}

/// The run's quote alone is above a spend limit of its profile: it could
/// wait for ever, so it fails (nothing was sent, nothing is owed).
pub fn quote_above_limit(reason: &str) -> Transition {
    Transition::failed(
        "QUOTE_ABOVE_LIMIT",
        format!(
            "the run's quote alone exceeds a spend limit ({reason}); raise the limit or split the work"
        ),
        None,
        Event {
            kind: "spend_refused",
            detail: json!({ "reason": reason }),
        },
    )
}

/// The provider profile is too busy in this process (its request rate or
/// submit slots): the run keeps its state and comes back after `wait`.
/// Nothing was sent, so nothing counts against the run.
pub fn throttled(state: RunState, wait: Duration, now: DateTime<Utc>) -> Transition {
    Transition {
        due_at: Some(later(now, wait)),
        ..Transition::new(
            state,
            Event {
                kind: "throttled",
                detail: json!({ "wait_ms": wait.as_millis() as u64 }),
            },
        )
    }
}

/// How soon a run whose input file is being copied to the store looks again.
pub const MIRROR_RECHECK: Duration = Duration::from_secs(1);

/// The dependencies of a chained run are not all there and succeeded, or
/// its `{"$output": ...}` inputs could not be resolved: a dependency that
/// failed, is gone (deleted) or lacks the output named fails the run
/// before anything is sent; one that has not succeeded yet (the run was
/// made due by hand, past the database's release) puts it back for
/// `wait`.
pub fn unresolved_inputs(
    why: &crate::chains::Unresolved,
    wait: Duration,
    now: DateTime<Utc>,
) -> Transition {
    use crate::chains::Unresolved;
    let detail = json!({ "error": why.to_string() });
    let event = |kind| Event {
        kind,
        detail: detail.clone(),
    };
    match why {
        Unresolved::NotFinished { .. } => Transition {
            due_at: Some(later(now, wait)),
            ..Transition::new(RunState::Queued, event("dependency_not_ready"))
        },
        // A copy takes seconds: look again soon.
        Unresolved::MirrorPending { .. } => Transition {
            due_at: Some(later(now, MIRROR_RECHECK)),
            ..Transition::new(RunState::Queued, event("waiting_for_mirror"))
        },
        Unresolved::Failed { .. } => Transition::failed(
            "DEPENDENCY_FAILED",
            why.to_string(),
            Some(detail.clone()),
            event("dependency_failed"),
        ),
        Unresolved::MissingDependency { .. } => Transition::failed(
            "DEPENDENCY_MISSING",
            why.to_string(),
            Some(detail.clone()),
            event("dependency_missing"),
        ),
        Unresolved::MissingRun { .. } | Unresolved::MissingKey { .. } => Transition::failed(
            "DEPENDENCY_OUTPUT_MISSING",
            why.to_string(),
            Some(detail.clone()),
            event("dependency_output_missing"),
        ),
    }
}

/// The row names a provider profile this worker does not have.
pub fn unknown_provider(profile: &str, known: &[String]) -> Transition {
    let message = format!(
        "provider: no provider profile `{profile}` in the worker's configuration (configured: {})",
        if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        }
    );
    Transition::failed(
        "UNKNOWN_PROVIDER",
        message.clone(),
        None,
        Event {
            kind: "unknown_provider",
            detail: json!({ "error": message }),
        },
    )
}

/// The manifest could not be read before the first submit.
pub fn manifest_failed(
    run: &RunProgress,
    workflow_id: &str,
    error: &ManifestError,
    retry: &RetryPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> Transition {
    match error {
        ManifestError::Rejected(e) => {
            let code = if e.code.contains("NOT_FOUND") || e.http_status == 404 {
                "UNKNOWN_WORKFLOW"
            } else {
                "WORKFLOW_UNAVAILABLE"
            };
            Transition::failed(
                code,
                format!("workflow_id: `{workflow_id}`: {} ({})", e.message, e.code),
                Some(e.detail.clone()),
                Event {
                    kind: "manifest_rejected",
                    detail: provider_error_detail(e),
                },
            )
        }
        // Nothing was sent, so nothing counts against the run's attempts;
        // the wait still grows with the attempts made so far.
        ManifestError::Unclear(u) => Transition {
            due_at: Some(later(
                now,
                wait_after_unclear(u, retry.delay(run.attempts + 1, unit), retry.max),
            )),
            ..Transition::new(
                run.state,
                Event {
                    kind: "manifest_unclear",
                    detail: unclear_detail(u),
                },
            )
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::test_support::*;

    #[test]
    fn manifest_problems_fail_or_wait_without_counting_an_attempt() {
        let r = run(RunState::Queued, 0, 0);
        let not_found = ManifestError::Rejected(ProviderError {
            code: "WORKFLOW_NOT_FOUND".into(),
            message: "workflow not found".into(),
            detail: json!({}),
            http_status: 404,
        });
        let t = manifest_failed(&r, "wf_x", &not_found, &retry(), now(), 0.5);
        assert_eq!(t.to, RunState::Failed);
        assert_eq!(t.error.unwrap().code, "UNKNOWN_WORKFLOW");
        let t = manifest_failed(
            &r,
            "wf_x",
            &ManifestError::Unclear(unclear(None, false)),
            &retry(),
            now(),
            0.5,
        );
        assert_eq!(t.to, RunState::Queued);
        assert_eq!(t.attempts_delta, 0);
        assert_eq!(secs(&t), 2);
    }

    #[test]
    fn begin_submit_counts_the_attempt_and_keeps_the_lease() {
        let token = uuid::Uuid::new_v4();
        let t = begin_submit(Some("wfr_1"), json!({"a": 1}), token);
        assert_eq!(t.to, RunState::Submitting);
        assert_eq!(t.attempts_delta, 1);
        assert!(t.keep_lease);
        assert_eq!((t.doubt, t.submit_token), (Mark::Set, Some(token)));
        assert_eq!(t.pin_revision.as_deref(), Some("wfr_1"));
    }
}
