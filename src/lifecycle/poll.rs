//! What a status check means for the run.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::*;
use crate::backoff::PollPolicy;
use crate::providers::{PollOutcome, RunStatus};

/// Decides what a status check means for the run.
pub fn after_poll(
    run: &RunProgress,
    outcome: &PollOutcome,
    cancel_requested: bool,
    poll: &PollPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> Transition {
    let next = later(now, poll.delay(run.polls + 1, unit));
    let mut transition = match outcome {
        PollOutcome::Report(report) => {
            let mut t = after_report(run, report, cancel_requested, poll, next);
            t.event.detail = with_repairs(std::mem::take(&mut t.event.detail), &report.repairs);
            t
        }
        // The provider accepted this run earlier, so "not found" now is as
        // likely a glitch as the truth: keep asking until the deadline.
        PollOutcome::Rejected(e) => Transition {
            due_at: Some(next),
            ..Transition::new(
                RunState::Running,
                Event {
                    kind: "poll_rejected",
                    detail: provider_error_detail(e),
                },
            )
        },
        // Refused for the rate before anything was looked up: the check
        // goes again after its own `Retry-After` (capped), not after the
        // schedule's next, longer step, and it is no step of the schedule.
        PollOutcome::Unclear(u) if u.http_status == Some(429) && !u.account_refused => {
            let wait = u
                .retry_after
                .map_or_else(|| poll.delay(run.polls, unit), |asked| asked.min(poll.max));
            let mut t = Transition {
                due_at: Some(later(now, wait)),
                ..Transition::new(
                    RunState::Running,
                    Event {
                        kind: "poll_unclear",
                        detail: unclear_detail(u),
                    },
                )
            };
            t.counts_poll = false;
            return deadline(run, outcome, poll, t);
        }
        PollOutcome::Unclear(u) => {
            let wait = wait_after_unclear(u, poll.delay(run.polls + 1, unit), poll.max);
            Transition {
                due_at: Some(later(now, wait)),
                ..Transition::new(
                    RunState::Running,
                    Event {
                        kind: "poll_unclear",
                        detail: unclear_detail(u),
                    },
                )
            }
        }
    };
    transition.counts_poll = true;
    deadline(run, outcome, poll, transition)
}

/// Fails a run still not final at its deadline, with what was last known.
fn deadline(
    run: &RunProgress,
    outcome: &PollOutcome,
    poll: &PollPolicy,
    mut transition: Transition,
) -> Transition {
    // Measured on the database's clock from the submit, or from `wfq retry`
    // resuming the run (which gives it a deadline of its own).
    let past_deadline = run.since_submit.is_some_and(|d| d >= poll.deadline);
    if past_deadline && transition.to == RunState::Running {
        let message = format!(
            "not final and settled {} after submit (poll.deadline); last provider status: {}",
            humantime(poll.deadline),
            match outcome {
                PollOutcome::Report(r) => format!(
                    "run_status={}, settlement_status={}",
                    r.run_status.as_deref().unwrap_or("?"),
                    r.settlement_status.as_deref().unwrap_or("?")
                ),
                PollOutcome::Rejected(e) => e.message.clone(),
                PollOutcome::Unclear(u) => u.reason.clone(),
            }
        );
        transition.to = RunState::Failed;
        transition.due_at = None;
        transition.settled = false;
        transition.error = Some(RunError {
            code: "POLL_DEADLINE".to_owned(),
            message,
            detail: Some(transition.event.detail.clone()),
        });
    }
    transition
}

/// A readable status report.
fn after_report(
    run: &RunProgress,
    report: &RunReport,
    cancel_requested: bool,
    poll: &PollPolicy,
    next: DateTime<Utc>,
) -> Transition {
    let facts = ProviderFacts::from_report(report);
    if let RunStatus::Unknown(status) = &report.status {
        let detail = json!({ "status": status, "answer": report.raw });
        // A status nobody documented may mean "still going" or "over":
        // keep asking for a while, then say so instead of polling to the
        // deadline. The money is not known.
        if run
            .unknown_status_for
            .is_some_and(|d| d >= poll.unknown_status_limit)
        {
            return Transition {
                settled: false,
                facts,
                ..Transition::failed(
                    "UNKNOWN_RUN_STATUS",
                    format!(
                        "the provider has reported the status `{status}`, which wfq does not know, for {} (poll.unknown_status_limit); check the run at the provider",
                        humantime(poll.unknown_status_limit)
                    ),
                    Some(detail.clone()),
                    Event {
                        kind: "unknown_status",
                        detail,
                    },
                )
            };
        }
        return Transition {
            due_at: Some(next),
            facts,
            unknown_status: Mark::Set,
            ..Transition::new(
                RunState::Running,
                Event {
                    kind: "unknown_status",
                    detail,
                },
            )
        };
    }
    if report.status.is_final() && report.settled {
        return finished(report, cancel_requested, facts, "run_finished");
    }
    if report.status.is_final() && report.money_unknown {
        // Over, and the provider will never say what it cost: final now
        // (waiting would not tell more), the money not settled and counted
        // by an estimate, never as zero.
        let mut t = finished(report, cancel_requested, facts, "finished_unpriced");
        t.settled = false;
        t.estimate_cost = true;
        return t;
    }
    if report.status.is_final() {
        // Over at the provider, money not final yet: settlement follows
        // (chenyu settles shortly after the end). A provider that never
        // settles, or reports no cost at all, must not keep the run
        // polling to the deadline: after `settle_wait` the run is
        // recorded final with its money unknown, and its cost estimated
        // for the spend guard when the provider gave none.
        if run.unsettled_for.is_some_and(|d| d >= poll.settle_wait) {
            let mut t = finished(report, cancel_requested, facts, "finished_unsettled");
            t.settled = false;
            t.estimate_cost = report.final_amount.is_none() && report.total_cost.is_none();
            return t;
        }
        return Transition {
            due_at: Some(next),
            facts,
            unknown_status: Mark::Clear,
            provider_finished: Mark::Set,
            ..Transition::new(
                RunState::Running,
                Event {
                    kind: "polled",
                    detail: report.raw.clone(),
                },
            )
        };
    }
    Transition {
        due_at: Some(next),
        facts,
        unknown_status: Mark::Clear,
        ..Transition::new(
            RunState::Running,
            Event {
                kind: "polled",
                detail: report.raw.clone(),
            },
        )
    }
}

/// The provider's run is over: succeeded, stopped on request, or failed.
fn finished(
    report: &RunReport,
    cancel_requested: bool,
    facts: ProviderFacts,
    kind: &'static str,
) -> Transition {
    let event = Event {
        kind,
        detail: report.raw.clone(),
    };
    let mut t = if report.status == RunStatus::Succeeded {
        Transition::new(RunState::Succeeded, event)
    } else if cancel_requested {
        // Stopped on our request (or failed while being stopped): either
        // way the producer asked for it to end.
        Transition {
            error: Some(RunError {
                code: "CANCELED".to_owned(),
                message: format!(
                    "stopped at the provider on request (wfq cancel); provider status `{}`",
                    report.run_status.as_deref().unwrap_or("?")
                ),
                detail: Some(report.raw.clone()),
            }),
            ..Transition::new(RunState::Canceled, event)
        }
    } else {
        let code = report
            .error_code
            .clone()
            .unwrap_or_else(|| "PROVIDER_RUN_FAILED".to_owned());
        let message = report.error_message.clone().unwrap_or_else(|| {
            format!(
                "the provider's run ended with status `{}`",
                report.run_status.as_deref().unwrap_or("failed")
            )
        });
        Transition::failed(&code, message, Some(report.raw.clone()), event)
    };
    t.settled = true;
    t.facts = facts;
    t.unknown_status = Mark::Clear;
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::test_support::*;
    use crate::providers::Repairs;

    fn report(status: RunStatus, settled: bool) -> PollOutcome {
        PollOutcome::Report(Box::new(RunReport {
            status,
            settled,
            final_amount: settled.then(|| d("0.01")),
            released_amount: settled.then(|| d("0.02")),
            ..Default::default()
        }))
    }

    #[test]
    fn a_run_past_its_deadline_fails_with_what_was_last_known() {
        let mut r = run(RunState::Running, 1, 40);
        r.since_submit = Some(Duration::from_secs(7200));
        let t = after_poll(
            &r,
            &report(RunStatus::Active, false),
            false,
            &poll(),
            now(),
            0.5,
        );
        assert_eq!(t.to, RunState::Failed);
        assert_eq!(t.error.unwrap().code, "POLL_DEADLINE");
        // A settled answer arriving at the deadline still wins.
        let t = after_poll(
            &r,
            &report(RunStatus::Succeeded, true),
            false,
            &poll(),
            now(),
            0.5,
        );
        assert_eq!(t.to, RunState::Succeeded);
    }

    #[test]
    fn poll_answers_table() {
        let table: Vec<(PollOutcome, RunState, Option<&str>, Option<i64>)> = vec![
            (
                report(RunStatus::Active, false),
                RunState::Running,
                None,
                Some(4),
            ),
            (
                report(RunStatus::Succeeded, false),
                RunState::Running,
                None,
                Some(4),
            ),
            (
                report(RunStatus::Succeeded, true),
                RunState::Succeeded,
                None,
                None,
            ),
            (
                report(RunStatus::Failed, true),
                RunState::Failed,
                Some("PROVIDER_RUN_FAILED"),
                None,
            ),
            (
                report(RunStatus::Failed, false),
                RunState::Running,
                None,
                Some(4),
            ),
            (
                report(RunStatus::Unknown("paused".into()), true),
                RunState::Running,
                None,
                Some(4),
            ),
            (
                PollOutcome::Unclear(unclear(None, false)),
                RunState::Running,
                None,
                Some(4),
            ),
            (
                PollOutcome::Unclear(unclear(Some(9), false)),
                RunState::Running,
                None,
                Some(9),
            ),
        ];
        for (outcome, state, code, due) in table {
            let t = after_poll(
                &run(RunState::Running, 1, 1),
                &outcome,
                false,
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
            assert!(t.counts_poll);
            assert_eq!(t.settled, state.is_final());
        }
    }

    #[test]
    fn a_check_refused_for_the_rate_goes_again_after_its_retry_after() {
        let refused = |retry_after: Option<u64>| {
            PollOutcome::Unclear(Unclear {
                reason: "HTTP 429".into(),
                http_status: Some(429),
                retry_after: retry_after.map(Duration::from_secs),
                account_refused: false,
                nothing_created: true,
            })
        };
        // Third check due: the schedule's next step would be 4 s and more.
        let r = run(RunState::Running, 1, 3);
        let t = after_poll(&r, &refused(Some(1)), false, &poll(), now(), 0.5);
        assert_eq!(t.to, RunState::Running);
        assert_eq!(secs(&t), 1);
        assert!(!t.counts_poll, "a refused check is no step of the schedule");
        // Without a Retry-After: the step it was at, not the next one.
        let t = after_poll(&r, &refused(None), false, &poll(), now(), 0.5);
        assert_eq!(
            t.due_at.unwrap(),
            later(now(), poll().delay(3, 0.5)),
            "{t:?}"
        );
        // A wild header is capped by the schedule's own cap.
        let t = after_poll(&r, &refused(Some(86_400)), false, &poll(), now(), 0.5);
        assert_eq!(t.due_at.unwrap(), later(now(), poll().max));
        // The deadline still holds while checks are refused.
        let mut late = r.clone();
        late.since_submit = Some(Duration::from_secs(7200));
        let t = after_poll(&late, &refused(Some(1)), false, &poll(), now(), 0.5);
        assert_eq!(t.error.unwrap().code, "POLL_DEADLINE");
    }

    #[test]
    fn status_events_record_what_was_repaired_in_the_answer() {
        let repaired = Repairs {
            lone_surrogate: 1,
            number_as_text: 3,
            ..Default::default()
        };
        let expected = json!({"lone_surrogate": 1, "number_as_text": 3});
        let answer = |status: RunStatus, settled: bool, raw: Value, repairs: Repairs| {
            PollOutcome::Report(Box::new(RunReport {
                status,
                settled,
                raw,
                repairs,
                ..Default::default()
            }))
        };
        let mut r = run(RunState::Running, 1, 1);
        // (outcome, event kind, detail)
        let table = [
            (
                answer(
                    RunStatus::Active,
                    false,
                    json!({"status": "RUNNING"}),
                    repaired,
                ),
                "polled",
                json!({"status": "RUNNING", "wfq_repairs": expected}),
            ),
            (
                answer(RunStatus::Succeeded, true, json!({"output": "x"}), repaired),
                "run_finished",
                json!({"output": "x", "wfq_repairs": expected}),
            ),
            (
                answer(RunStatus::Failed, true, json!("not an object"), repaired),
                "run_finished",
                json!({"answer": "not an object", "wfq_repairs": expected}),
            ),
            (
                answer(
                    RunStatus::Unknown("ARCHIVED".into()),
                    false,
                    json!({"status": "ARCHIVED"}),
                    repaired,
                ),
                "unknown_status",
                json!({"status": "ARCHIVED", "answer": {"status": "ARCHIVED"}, "wfq_repairs": expected}),
            ),
            (
                answer(
                    RunStatus::Succeeded,
                    true,
                    json!({"output": "x"}),
                    Repairs::default(),
                ),
                "run_finished",
                json!({"output": "x"}),
            ),
        ];
        for (outcome, kind, detail) in table.clone() {
            let t = after_poll(&r, &outcome, false, &poll(), now(), 0.5);
            assert_eq!(t.event.kind, kind, "{outcome:?}");
            assert_eq!(t.event.detail, detail, "{outcome:?}");
        }
        // A run past its deadline keeps the note in its error detail too.
        r.since_submit = Some(Duration::from_secs(7200));
        let (outcome, _, detail) = table[0].clone();
        let t = after_poll(&r, &outcome, false, &poll(), now(), 0.5);
        assert_eq!(t.error.and_then(|e| e.detail), Some(detail));
    }

    #[test]
    fn a_stopped_run_with_a_cancel_request_ends_canceled_with_its_money() {
        let stopped = PollOutcome::Report(Box::new(RunReport {
            status: RunStatus::Failed,
            run_status: Some("stopped".into()),
            error_code: Some("PROVIDER_RUN_STOPPED".into()),
            settled: true,
            total_cost: Some(d("0.002")),
            ..Default::default()
        }));
        let r = run(RunState::Running, 1, 2);
        let t = after_poll(&r, &stopped, true, &poll(), now(), 0.5);
        assert_eq!(t.to, RunState::Canceled);
        assert_eq!(t.error.as_ref().unwrap().code, "CANCELED");
        assert!(t.settled);
        assert_eq!(t.facts.total_cost, Some(d("0.002")));
        let t = after_poll(&r, &stopped, false, &poll(), now(), 0.5);
        assert_eq!(t.to, RunState::Failed);
        assert_eq!(t.error.unwrap().code, "PROVIDER_RUN_STOPPED");
        // Finished before the stop arrived: it succeeded, and says so.
        let t = after_poll(
            &r,
            &report(RunStatus::Succeeded, true),
            true,
            &poll(),
            now(),
            0.5,
        );
        assert_eq!(t.to, RunState::Succeeded);
    }

    #[test]
    fn an_unknown_status_is_polled_for_a_while_then_ends_the_run() {
        let odd = PollOutcome::Report(Box::new(RunReport {
            status: RunStatus::Unknown("ARCHIVED".into()),
            run_status: Some("ARCHIVED".into()),
            ..Default::default()
        }));
        let mut r = run(RunState::Running, 1, 4);
        let t = after_poll(&r, &odd, false, &poll(), now(), 0.5);
        assert_eq!(t.to, RunState::Running);
        assert_eq!(t.event.kind, "unknown_status");
        assert_eq!(t.unknown_status, Mark::Set, "first seen now");
        assert!(t.due_at.is_some());
        r.unknown_status_for = Some(Duration::from_secs(599));
        assert_eq!(
            after_poll(&r, &odd, false, &poll(), now(), 0.5).to,
            RunState::Running
        );
        r.unknown_status_for = Some(Duration::from_secs(600));
        let t = after_poll(&r, &odd, false, &poll(), now(), 0.5);
        assert_eq!(t.to, RunState::Failed);
        let error = t.error.unwrap();
        assert_eq!(error.code, "UNKNOWN_RUN_STATUS");
        assert!(error.message.contains("ARCHIVED"), "{}", error.message);
        assert!(!t.settled, "nobody knows what it cost");
        // A known status again clears the mark.
        let t = after_poll(
            &r,
            &report(RunStatus::Active, false),
            false,
            &poll(),
            now(),
            0.5,
        );
        assert_eq!(t.unknown_status, Mark::Clear);
    }

    #[test]
    fn a_finished_run_whose_price_can_never_be_known_ends_unsettled_and_estimated() {
        // (status, money_unknown, settled, final, estimated)
        let table = [
            (RunStatus::Succeeded, true, false, true, true),
            (RunStatus::Failed, true, false, true, true),
            (RunStatus::Succeeded, false, true, true, false),
            // Still running: the price is not asked yet.
            (RunStatus::Active, false, false, false, false),
        ];
        for (status, money_unknown, settled, is_final, estimated) in table {
            let outcome = PollOutcome::Report(Box::new(RunReport {
                status: status.clone(),
                money_unknown,
                settled: settled && !money_unknown,
                ..RunReport::default()
            }));
            let t = after_poll(
                &run(RunState::Running, 1, 0),
                &outcome,
                false,
                &poll(),
                now(),
                1.0,
            );
            assert_eq!(t.to.is_final(), is_final, "{status:?} {money_unknown}");
            assert_eq!(
                t.settled, settled,
                "{status:?} {money_unknown}: unknown is not settled"
            );
            assert_eq!(t.estimate_cost, estimated, "{status:?} {money_unknown}");
        }
    }

    #[test]
    fn a_finished_run_whose_money_never_settles_ends_after_the_settle_wait() {
        let over = PollOutcome::Report(Box::new(RunReport {
            status: RunStatus::Succeeded,
            settled: false,
            outputs: Some(json!({"news": []})),
            ..Default::default()
        }));
        let mut r = run(RunState::Running, 1, 4);
        let t = after_poll(&r, &over, false, &poll(), now(), 0.5);
        assert_eq!(t.to, RunState::Running, "waiting for settlement");
        assert_eq!(t.provider_finished, Mark::Set);
        r.unsettled_for = Some(Duration::from_secs(900));
        let t = after_poll(&r, &over, false, &poll(), now(), 0.5);
        assert_eq!(t.to, RunState::Succeeded);
        assert_eq!(t.event.kind, "finished_unsettled");
        assert!(!t.settled, "the money is unknown, not zero");
        assert!(
            t.estimate_cost,
            "no cost reported: the spend guard needs an estimate"
        );
        assert_eq!(t.facts.final_amount, None);
        // With a cost but no settlement, nothing needs estimating.
        let costed = PollOutcome::Report(Box::new(RunReport {
            status: RunStatus::Failed,
            settled: false,
            total_cost: Some(d("0.5")),
            ..Default::default()
        }));
        let t = after_poll(&r, &costed, false, &poll(), now(), 0.5);
        assert_eq!(t.to, RunState::Failed);
        assert!(!t.estimate_cost);
    }

    #[test]
    fn a_resumed_run_has_a_deadline_of_its_own() {
        // `since_submit` counts from the resume: an hour and a half after
        // the original submit but a minute after `wfq retry`, it polls on.
        let mut r = run(RunState::Running, 1, 30);
        r.since_submit = Some(Duration::from_secs(60));
        let t = after_poll(
            &r,
            &report(RunStatus::Active, false),
            false,
            &poll(),
            now(),
            0.5,
        );
        assert_eq!(t.to, RunState::Running);
    }
}
