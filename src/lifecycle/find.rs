//! A submit in doubt, looked for at a provider that can find runs.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::submit::decide_submit;
use super::*;
use crate::backoff::{PollPolicy, RetryPolicy};
use crate::providers::{FindOutcome, SubmitGuard, SubmitOutcome};

/// A submit in doubt: since when, and how long the provider may take to
/// list the run it created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InDoubt {
    /// When the submit went out (`submit_in_doubt_since`), for the record.
    pub since: DateTime<Utc>,
    /// How long ago that was, on the database's clock (which also wrote
    /// `since`): the decisions use this, so a worker whose clock is off
    /// cannot shorten the window.
    pub elapsed: Duration,
    /// The profile's `find_window`.
    pub window: Duration,
    /// How often this run was sent again already (`resubmits`).
    pub resubmits: u32,
    /// The most it may be sent again (`max_resubmits`).
    pub max_resubmits: u32,
}

/// What to do about a submit in doubt after looking for its run.
#[derive(Debug, Clone, PartialEq)]
pub enum FindDecision {
    /// Record this (adopted, or wait and look again).
    Record(Box<Transition>),
    /// Nothing was found for long enough: send the submit again.
    Resubmit,
}

/// Decides on a lookup for a submit in doubt (providers that can find runs
/// by end user). Runs are listed late (Dify lists a run in its logs only
/// once it finished, as far as anyone can tell), so "not found" means "not
/// yet" until `window` has passed since the submit went out.
pub fn after_find(
    run: &RunProgress,
    outcome: &FindOutcome,
    doubt: InDoubt,
    retry: &RetryPolicy,
    poll: &PollPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> FindDecision {
    let look_again = |kind: &'static str, wait: Duration, detail: Value| {
        FindDecision::Record(Box::new(Transition {
            due_at: Some(later(now, wait.max(Duration::from_secs(1)))),
            ..Transition::new(RunState::Submitting, Event { kind, detail })
        }))
    };
    match outcome {
        FindOutcome::Found(a) => {
            let mut t = decide_submit(
                run,
                &SubmitOutcome::Accepted((**a).clone()),
                SubmitGuard::FindByUser,
                retry,
                poll,
                now,
                unit,
            );
            t.doubt = Mark::Clear;
            t.event.kind = "submit_adopted";
            FindDecision::Record(Box::new(t))
        }
        FindOutcome::NotFound if doubt.elapsed >= doubt.window => {
            if doubt.resubmits < doubt.max_resubmits {
                return FindDecision::Resubmit;
            }
            // Every resend is a new run at a provider without keys; a
            // submit that keeps getting lost (a 5xx or a timeout before
            // the run is named, every time) must not be resent for ever.
            FindDecision::Record(Box::new(submit_outcome_unknown(
                &format!(
                    "no run of this key is listed {} after the submit, and it was sent again {} time(s) already (max_resubmits)",
                    humantime(doubt.window),
                    doubt.resubmits
                ),
                Some(json!({
                    "in_doubt_since": doubt.since,
                    "resubmits": doubt.resubmits,
                    "max_resubmits": doubt.max_resubmits,
                })),
            )))
        }
        FindOutcome::NotFound => {
            let left = doubt.window.saturating_sub(doubt.elapsed);
            look_again(
                "submit_not_found_yet",
                lookup_pause(doubt, retry).min(left),
                json!({
                    "in_doubt_since": doubt.since,
                    "resubmit_after": later(now, left),
                    "resubmits": doubt.resubmits,
                }),
            )
        }
        // Unanswered lookups cannot go on for ever (a Dify without a
        // usable logs endpoint would keep the run here): well past the
        // window the outcome is declared unknown rather than guessed.
        FindOutcome::Unclear(u) if doubt.elapsed >= doubt.window * 2 => {
            FindDecision::Record(Box::new(submit_outcome_unknown(
                &format!(
                    "the provider's run list could not be read for {}: {}",
                    humantime(doubt.window * 2),
                    u.reason
                ),
                Some(unclear_detail(u)),
            )))
        }
        FindOutcome::Unclear(u) => look_again(
            "find_unclear",
            wait_after_unclear(u, lookup_pause(doubt, retry), retry.max),
            unclear_detail(u),
        ),
    }
}

/// How long to wait before looking for a lost submit's run again: a
/// quarter of the time it has been in doubt (at least 2 s, at most the
/// retry cap). A run that has not shown up for a while will not show up in
/// the next second either, so the lookups thin out instead of costing a
/// claim and an event every two seconds for the whole window.
fn lookup_pause(doubt: InDoubt, retry: &RetryPolicy) -> Duration {
    (doubt.elapsed / 4).clamp(
        Duration::from_secs(2),
        retry.max.max(Duration::from_secs(2)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::test_support::*;

    #[test]
    fn a_run_that_can_be_found_is_looked_for_instead_of_given_up() {
        // Attempts are used up, but a Dify run may exist: no
        // SUBMIT_RETRIES_EXHAUSTED, the next step looks for it.
        let t = after_submit(
            &run(RunState::Submitting, 3, 0),
            &SubmitOutcome::Unclear(unclear(None, false)),
            SubmitGuard::FindByUser,
            &retry(),
            &poll(),
            now(),
            0.5,
        );
        assert_eq!(t.to, RunState::Submitting);
        assert_eq!(t.doubt, Mark::Keep);
    }

    /// A submit in doubt for `secs` (database clock), window ten minutes,
    /// never resent so far, one resend allowed.
    fn in_doubt_for(secs: u64) -> InDoubt {
        InDoubt {
            since: now() - chrono::Duration::seconds(secs as i64),
            elapsed: Duration::from_secs(secs),
            window: Duration::from_secs(600),
            resubmits: 0,
            max_resubmits: 1,
        }
    }

    #[test]
    fn a_lookup_adopts_waits_within_the_window_then_resubmits() {
        let doubt = in_doubt_for(60);
        let decide = |outcome: FindOutcome, doubt: InDoubt| {
            after_find(
                &run(RunState::Submitting, 1, 0),
                &outcome,
                doubt,
                &retry(),
                &poll(),
                now(),
                0.5,
            )
        };
        let found = FindOutcome::Found(Box::new(Accepted {
            provider_run_id: "run-1".into(),
            ..Default::default()
        }));
        match decide(found, doubt) {
            FindDecision::Record(t) => {
                assert_eq!(t.to, RunState::Running);
                assert_eq!(t.event.kind, "submit_adopted");
                assert_eq!(t.doubt, Mark::Clear);
                assert!(t.submitted);
                assert_eq!(t.facts.provider_run_id.as_deref(), Some("run-1"));
            }
            other => panic!("{other:?}"),
        }
        match decide(FindOutcome::NotFound, doubt) {
            FindDecision::Record(t) => {
                assert_eq!(t.to, RunState::Submitting);
                assert_eq!(t.event.kind, "submit_not_found_yet");
                assert_eq!(t.doubt, Mark::Keep);
                assert_eq!(t.attempts_delta, 0, "looking is not submitting");
                assert_eq!(secs(&t), 15, "a quarter of the minute in doubt");
            }
            other => panic!("{other:?}"),
        }
        // Near the end of the window the wait shrinks to what is left.
        let almost = in_doubt_for(599);
        match decide(FindOutcome::NotFound, almost) {
            FindDecision::Record(t) => assert_eq!(secs(&t), 1),
            other => panic!("{other:?}"),
        }
        let over = in_doubt_for(600);
        assert_eq!(decide(FindOutcome::NotFound, over), FindDecision::Resubmit);
        match decide(FindOutcome::Unclear(unclear(Some(30), false)), over) {
            FindDecision::Record(t) => {
                assert_eq!(t.event.kind, "find_unclear");
                assert_eq!(
                    t.to,
                    RunState::Submitting,
                    "an unclear lookup never resubmits"
                );
                assert_eq!(secs(&t), 150, "a quarter of the ten minutes in doubt");
            }
            other => panic!("{other:?}"),
        }
        let long_over = in_doubt_for(1200);
        match decide(FindOutcome::Unclear(unclear(None, false)), long_over) {
            FindDecision::Record(t) => {
                assert_eq!(t.to, RunState::Failed);
                assert_eq!(t.error.unwrap().code, "SUBMIT_OUTCOME_UNKNOWN");
                assert!(!t.settled);
            }
            other => panic!("{other:?}"),
        }
        let token = uuid::Uuid::new_v4();
        let again = begin_resubmit(None, json!({}), doubt.since, token);
        assert_eq!(again.event.kind, "resubmit_started");
        assert_eq!((again.attempts_delta, again.doubt), (1, Mark::Set));
        assert_eq!(
            again.submit_token,
            Some(token),
            "a resubmit is a submit of its own"
        );
    }

    #[test]
    fn an_adopted_run_records_what_was_repaired_in_the_answer_that_found_it() {
        let found = FindOutcome::Found(Box::new(Accepted {
            provider_run_id: "run-1".into(),
            raw: json!({"id": "log-1"}),
            repairs: crate::providers::Repairs {
                control_char: 1,
                ..Default::default()
            },
            ..Default::default()
        }));
        match after_find(
            &run(RunState::Submitting, 1, 0),
            &found,
            in_doubt_for(60),
            &retry(),
            &poll(),
            now(),
            0.5,
        ) {
            FindDecision::Record(t) => {
                assert_eq!(t.event.kind, "submit_adopted");
                assert_eq!(
                    t.event.detail,
                    json!({"id": "log-1", "wfq_repairs": {"control_char": 1}})
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_run_is_resent_at_most_max_resubmits_times() {
        let decide = |doubt: InDoubt| {
            after_find(
                &run(RunState::Submitting, 2, 0),
                &FindOutcome::NotFound,
                doubt,
                &retry(),
                &poll(),
                now(),
                0.5,
            )
        };
        let resent_once = InDoubt {
            resubmits: 1,
            ..in_doubt_for(600)
        };
        match decide(resent_once) {
            FindDecision::Record(t) => {
                assert_eq!(t.to, RunState::Failed);
                let error = t.error.unwrap();
                assert_eq!(error.code, "SUBMIT_OUTCOME_UNKNOWN");
                assert!(error.message.contains("max_resubmits"), "{}", error.message);
                assert!(!t.settled, "the money of two possible runs is unknown");
            }
            other => panic!("{other:?}"),
        }
        let never = InDoubt {
            max_resubmits: 0,
            ..in_doubt_for(600)
        };
        assert!(matches!(decide(never), FindDecision::Record(t) if t.to == RunState::Failed));
        let more = InDoubt {
            resubmits: 1,
            max_resubmits: 2,
            ..in_doubt_for(600)
        };
        assert_eq!(decide(more), FindDecision::Resubmit);
    }

    #[test]
    fn the_window_is_measured_on_the_database_clock() {
        // The worker's clock runs an hour behind the database's: by its
        // own clock the submit was sent in the future. What counts is the
        // elapsed time the database measured.
        let skewed = InDoubt {
            since: now() + chrono::Duration::hours(1),
            ..in_doubt_for(600)
        };
        let decision = after_find(
            &run(RunState::Submitting, 1, 0),
            &FindOutcome::NotFound,
            skewed,
            &retry(),
            &poll(),
            now(),
            0.5,
        );
        assert_eq!(decision, FindDecision::Resubmit);
        // And the other way round: a worker clock an hour ahead does not
        // end the window early.
        let early = InDoubt {
            since: now() - chrono::Duration::hours(1),
            ..in_doubt_for(60)
        };
        let decision = after_find(
            &run(RunState::Submitting, 1, 0),
            &FindOutcome::NotFound,
            early,
            &retry(),
            &poll(),
            now(),
            0.5,
        );
        assert!(
            matches!(decision, FindDecision::Record(t) if t.event.kind == "submit_not_found_yet")
        );
    }
}
