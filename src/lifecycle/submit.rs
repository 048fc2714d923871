//! What a submit's answer means for the run.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::*;
use crate::backoff::RetryPolicy;
use crate::providers::{SubmitGuard, SubmitOutcome};

/// Decides what a submit's answer means for the run.
pub fn after_submit(
    run: &RunProgress,
    outcome: &SubmitOutcome,
    guard: SubmitGuard,
    retry: &RetryPolicy,
    poll: &crate::backoff::PollPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> Transition {
    let mut t = decide_submit(run, outcome, guard, retry, poll, now, unit);
    t.doubt = match outcome {
        SubmitOutcome::Unclear(u) if !u.nothing_created => Mark::Keep,
        _ => Mark::Clear,
    };
    t
}

pub(crate) fn decide_submit(
    run: &RunProgress,
    outcome: &SubmitOutcome,
    guard: SubmitGuard,
    retry: &RetryPolicy,
    poll: &crate::backoff::PollPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> Transition {
    match outcome {
        SubmitOutcome::Accepted(a) => Transition {
            due_at: Some(later(now, poll.delay(0, unit))),
            submitted: true,
            facts: ProviderFacts::from_accepted(a),
            ..Transition::new(
                RunState::Running,
                Event {
                    kind: "submit_accepted",
                    detail: with_repairs(a.raw.clone(), &a.repairs),
                },
            )
        },
        // A refused first submit froze nothing, so the money is final too.
        // After an unclear attempt that is no longer certain.
        SubmitOutcome::Rejected(e) => Transition {
            settled: run.attempts <= 1,
            ..Transition::failed(
                &e.code,
                e.message.clone(),
                Some(e.detail.clone()),
                Event {
                    kind: "submit_rejected",
                    detail: provider_error_detail(e),
                },
            )
        },
        // Without keys and without a way to find the run, the only answer
        // that cannot bill twice is to stop here and say so.
        SubmitOutcome::Unclear(u) if !u.nothing_created && guard == SubmitGuard::Nothing => {
            submit_outcome_unknown(&u.reason, Some(unclear_detail(u)))
        }
        SubmitOutcome::Unclear(u) if u.account_refused => Transition {
            // A refused key is not the run's fault: give the attempt back.
            attempts_delta: -1,
            due_at: Some(later(
                now,
                wait_after_unclear(u, retry.delay(run.attempts, unit), retry.max),
            )),
            ..Transition::new(
                RunState::Submitting,
                Event {
                    kind: "submit_unauthorized",
                    detail: unclear_detail(u),
                },
            )
        },
        // "Not now" about the account, not the run (a limit, a busy pool):
        // it never counts against the run's attempts, so no run fails for
        // the provider's rate limit. The profile's throttle slows down if
        // slowing down helps; the run waits its Retry-After (capped).
        SubmitOutcome::Unclear(u) if u.http_status == Some(429) => Transition {
            attempts_delta: -1,
            due_at: Some(later(
                now,
                u.retry_after
                    .unwrap_or_else(|| retry.delay(1, unit))
                    .min(retry.max),
            )),
            ..Transition::new(
                RunState::Submitting,
                Event {
                    kind: "submit_rate_limited",
                    detail: unclear_detail(u),
                },
            )
        },
        // The run may exist: the next step looks for it by its end user
        // (bounded by the find window), whatever the attempts so far.
        SubmitOutcome::Unclear(u) if !u.nothing_created && guard == SubmitGuard::FindByUser => {
            Transition {
                due_at: Some(later(
                    now,
                    wait_after_unclear(u, retry.delay(run.attempts, unit), retry.max),
                )),
                ..Transition::new(
                    RunState::Submitting,
                    Event {
                        kind: "submit_unclear",
                        detail: unclear_detail(u),
                    },
                )
            }
        }
        SubmitOutcome::Unclear(u) if retry.may_retry(run.attempts) => Transition {
            due_at: Some(later(
                now,
                wait_after_unclear(u, retry.delay(run.attempts, unit), retry.max),
            )),
            ..Transition::new(
                RunState::Submitting,
                Event {
                    kind: "submit_unclear",
                    detail: unclear_detail(u),
                },
            )
        },
        // Whether money was frozen is unknown, so it is not marked settled.
        SubmitOutcome::Unclear(u) => Transition {
            settled: false,
            ..Transition::failed(
                "SUBMIT_RETRIES_EXHAUSTED",
                format!(
                    "no clear answer after {} submit attempts (last: {}); the provider may still have accepted the run under this row's idempotency_key, which a later submit with the same key would replay",
                    run.attempts, u.reason
                ),
                Some(unclear_detail(u)),
                Event {
                    kind: "submit_unclear",
                    detail: unclear_detail(u),
                },
            )
        },
    }
}

/// A submit to a provider without idempotency keys may have created a run
/// that cannot be found: fail without settling, so an operator decides.
pub fn submit_outcome_unknown(reason: &str, detail: Option<Value>) -> Transition {
    Transition {
        settled: false,
        ..Transition::failed(
            "SUBMIT_OUTCOME_UNKNOWN",
            format!(
                "a submit was sent but its answer was lost ({reason}); the provider has no idempotency key and the run could not be found, so wfq does not send it again (that could be a second charge). Check the provider's console; `wfq retry` submits it again"
            ),
            detail.clone(),
            Event {
                kind: "submit_outcome_unknown",
                detail: detail.unwrap_or_else(|| json!({ "reason": reason })),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::test_support::*;
    use crate::providers::{Accepted, ProviderError, Repairs};
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn submit_answers_table() {
        let accepted = SubmitOutcome::Accepted(Accepted {
            provider_run_id: "wfrun_1".into(),
            quote_amount: Some(d("0.03")),
            frozen_amount: Some(d("0.03")),
            ..Default::default()
        });
        let rejected = SubmitOutcome::Rejected(ProviderError {
            code: "INVALID_WORKFLOW_INPUT".into(),
            message: "bad".into(),
            detail: json!({}),
            http_status: 400,
        });
        // (attempts so far, outcome, state, error code, seconds until due, attempts delta)
        type Row = (
            u32,
            SubmitOutcome,
            RunState,
            Option<&'static str>,
            Option<i64>,
            i32,
        );
        let table: Vec<Row> = vec![
            (1, accepted, RunState::Running, None, Some(1), 0),
            (
                1,
                rejected,
                RunState::Failed,
                Some("INVALID_WORKFLOW_INPUT"),
                None,
                0,
            ),
            (
                1,
                SubmitOutcome::Unclear(unclear(None, false)),
                RunState::Submitting,
                None,
                Some(2),
                0,
            ),
            (
                2,
                SubmitOutcome::Unclear(unclear(None, false)),
                RunState::Submitting,
                None,
                Some(4),
                0,
            ),
            (
                2,
                SubmitOutcome::Unclear(unclear(Some(30), false)),
                RunState::Submitting,
                None,
                Some(30),
                0,
            ),
            (
                3,
                SubmitOutcome::Unclear(unclear(None, false)),
                RunState::Failed,
                Some("SUBMIT_RETRIES_EXHAUSTED"),
                None,
                0,
            ),
            (
                3,
                SubmitOutcome::Unclear(unclear(None, true)),
                RunState::Submitting,
                None,
                Some(8),
                -1,
            ),
        ];
        for (attempts, outcome, state, code, due, delta) in table {
            let t = after_submit(
                &run(RunState::Submitting, attempts, 0),
                &outcome,
                SubmitGuard::IdempotencyKey,
                &retry(),
                &poll(),
                now(),
                0.5,
            );
            assert_eq!(t.to, state, "{outcome:?}");
            assert_eq!(
                t.error.as_ref().map(|e| e.code.as_str()),
                code,
                "{outcome:?}"
            );
            assert_eq!(t.due_at.map(|_| secs(&t)), due, "{outcome:?}");
            assert_eq!(t.attempts_delta, delta, "{outcome:?}");
            assert!(!t.keep_lease);
        }
    }

    #[test]
    fn an_accepted_submit_records_the_frozen_quote() {
        let t = after_submit(
            &run(RunState::Submitting, 1, 0),
            &SubmitOutcome::Accepted(Accepted {
                provider_run_id: "wfrun_1".into(),
                frozen_amount: Some(d("0.03")),
                idempotent_replay: true,
                ..Default::default()
            }),
            SubmitGuard::IdempotencyKey,
            &retry(),
            &poll(),
            now(),
            0.5,
        );
        assert!(t.submitted);
        assert_eq!(t.facts.provider_run_id.as_deref(), Some("wfrun_1"));
        assert_eq!(t.facts.frozen_amount, Some(d("0.03")));
    }

    #[test]
    fn an_accepted_answer_records_what_was_repaired_in_it() {
        let decide = |raw: Value, repairs: Repairs| {
            after_submit(
                &run(RunState::Submitting, 1, 0),
                &SubmitOutcome::Accepted(Accepted {
                    provider_run_id: "r".into(),
                    raw,
                    repairs,
                    ..Default::default()
                }),
                SubmitGuard::Nothing,
                &retry(),
                &poll(),
                now(),
                0.5,
            )
            .event
            .detail
        };
        let repaired = Repairs {
            nul: 2,
            cut_strings: 1,
            ..Default::default()
        };
        // Next to the answer's own members.
        assert_eq!(
            decide(
                json!({"workflowRunId": "r", "note": "a\u{fffd}b"}),
                repaired
            ),
            json!({"workflowRunId": "r", "note": "a\u{fffd}b", "wfq_repairs": {"nul": 2, "cut_strings": 1}})
        );
        // An answer that is not an object is wrapped.
        assert_eq!(
            decide(json!(["r"]), repaired),
            json!({"answer": ["r"], "wfq_repairs": {"nul": 2, "cut_strings": 1}})
        );
        // Nothing repaired: the answer as it came.
        assert_eq!(
            decide(json!({"workflowRunId": "r"}), Repairs::default()),
            json!({"workflowRunId": "r"})
        );
    }

    #[test]
    fn submit_doubt_is_set_before_sending_and_cleared_by_a_clear_answer() {
        assert_eq!(
            begin_submit(None, json!({}), uuid::Uuid::new_v4()).doubt,
            Mark::Set
        );
        let nothing_created = Unclear {
            nothing_created: true,
            ..unclear(None, false)
        };
        // (guard, outcome, state, error code, doubt afterwards)
        let table = [
            (
                SubmitGuard::IdempotencyKey,
                SubmitOutcome::Unclear(unclear(None, false)),
                RunState::Submitting,
                None,
                Mark::Keep,
            ),
            (
                SubmitGuard::FindByUser,
                SubmitOutcome::Unclear(unclear(None, false)),
                RunState::Submitting,
                None,
                Mark::Keep,
            ),
            (
                SubmitGuard::Nothing,
                SubmitOutcome::Unclear(unclear(None, false)),
                RunState::Failed,
                Some("SUBMIT_OUTCOME_UNKNOWN"),
                Mark::Keep,
            ),
            (
                SubmitGuard::Nothing,
                SubmitOutcome::Unclear(nothing_created.clone()),
                RunState::Submitting,
                None,
                Mark::Clear,
            ),
            (
                SubmitGuard::FindByUser,
                SubmitOutcome::Unclear(nothing_created),
                RunState::Submitting,
                None,
                Mark::Clear,
            ),
            (
                SubmitGuard::Nothing,
                SubmitOutcome::Accepted(Accepted {
                    provider_run_id: "r".into(),
                    ..Default::default()
                }),
                RunState::Running,
                None,
                Mark::Clear,
            ),
        ];
        for (guard, outcome, state, code, doubt) in table {
            let t = after_submit(
                &run(RunState::Submitting, 1, 0),
                &outcome,
                guard,
                &retry(),
                &poll(),
                now(),
                0.5,
            );
            assert_eq!(t.to, state, "{guard:?} {outcome:?}");
            assert_eq!(t.error.as_ref().map(|e| e.code.as_str()), code);
            assert_eq!(t.doubt, doubt, "{guard:?} {outcome:?}");
            if code == Some("SUBMIT_OUTCOME_UNKNOWN") {
                assert!(!t.settled, "money of an unknown submit is not final");
            }
        }
    }

    #[test]
    fn a_429_is_waited_out_and_never_counts_against_the_run() {
        let limited = Unclear {
            http_status: Some(429),
            retry_after: Some(Duration::from_secs(3)),
            nothing_created: true,
            ..unclear(None, false)
        };
        for guard in [
            SubmitGuard::IdempotencyKey,
            SubmitGuard::FindByUser,
            SubmitGuard::Nothing,
        ] {
            // Even with every attempt used up.
            let t = after_submit(
                &run(RunState::Submitting, 3, 0),
                &SubmitOutcome::Unclear(limited.clone()),
                guard,
                &retry(),
                &poll(),
                now(),
                0.5,
            );
            assert_eq!(t.to, RunState::Submitting, "{guard:?}");
            assert_eq!(t.attempts_delta, -1, "{guard:?}");
            assert_eq!(t.event.kind, "submit_rate_limited");
            assert_eq!(secs(&t), 3, "its own Retry-After");
            assert_eq!(t.doubt, Mark::Clear, "a 429 created nothing");
        }
        // A wild Retry-After is capped by the schedule.
        let wild = Unclear {
            retry_after: Some(Duration::from_secs(86_400)),
            ..limited
        };
        let t = after_submit(
            &run(RunState::Submitting, 1, 0),
            &SubmitOutcome::Unclear(wild),
            SubmitGuard::IdempotencyKey,
            &retry(),
            &poll(),
            now(),
            0.5,
        );
        assert_eq!(secs(&t), 300);
    }
}
