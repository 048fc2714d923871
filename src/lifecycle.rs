//! The run state machine as pure functions: (run, provider answer, now) ->
//! [`Transition`]. No I/O here; the store applies a transition in one
//! statement and the runtime does the HTTP.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::backoff::{PollPolicy, RetryPolicy};
use crate::inputs::InputError;
use crate::providers::{
    Accepted, FindOutcome, ManifestError, PollOutcome, ProviderError, RunReport, RunStatus,
    SubmitGuard, SubmitOutcome, Unclear,
};

/// Where a run is. The strings are the values of `wfq.runs.state`.
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
    /// When the provider accepted it.
    pub submitted_at: Option<DateTime<Utc>>,
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
}

impl ProviderFacts {
    fn from_accepted(a: &Accepted) -> Self {
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

    fn from_report(r: &RunReport) -> Self {
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
            ..Default::default()
        }
    }
}

/// What a step does to `submit_in_doubt_since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubmitDoubt {
    /// Leave it as it is.
    #[default]
    Keep,
    /// A submit is about to be sent: set it to now.
    Set,
    /// The submit's outcome is known (or it certainly created nothing).
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
    /// Whether a submit may be at the provider without its answer recorded.
    pub doubt: SubmitDoubt,
    /// Facts from the provider.
    pub facts: ProviderFacts,
    /// Set on failure.
    pub error: Option<RunError>,
    /// The audit entry.
    pub event: Event,
}

impl Transition {
    fn new(to: RunState, event: Event) -> Self {
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
            doubt: SubmitDoubt::Keep,
            facts: ProviderFacts::default(),
            error: None,
            event,
        }
    }

    /// A failure before anything was frozen: the money is final (none).
    fn failed(code: &str, message: String, detail: Option<Value>, event: Event) -> Self {
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

fn later(now: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now + chrono::Duration::days(1))
}

fn unclear_detail(u: &Unclear) -> Value {
    json!({
        "reason": u.reason,
        "http_status": u.http_status,
        "retry_after_secs": u.retry_after.map(|d| d.as_secs()),
        "account_refused": u.account_refused,
        "nothing_created": u.nothing_created,
    })
}

fn provider_error_detail(e: &ProviderError) -> Value {
    json!({ "code": e.code, "message": e.message, "http_status": e.http_status, "error": e.detail })
}

/// The inputs passed the manifest: record what will be sent and count the
/// attempt *before* sending, so a crash mid-submit is visible and bounded.
/// From here until its answer is recorded the submit is in doubt.
pub fn begin_submit(revision_id: Option<&str>, sent_inputs: Value) -> Transition {
    Transition {
        attempts_delta: 1,
        keep_lease: true,
        pin_revision: revision_id.map(str::to_owned),
        sent_inputs: Some(sent_inputs),
        doubt: SubmitDoubt::Set,
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
) -> Transition {
    let mut t = begin_submit(revision_id, sent_inputs);
    t.event = Event {
        kind: "resubmit_started",
        detail: json!({
            "revision_id": revision_id,
            "reason": "the provider lists no run of this key since the earlier submit",
            "in_doubt_since": in_doubt_since,
        }),
    };
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

/// The schedule's delay, stretched to the provider's `Retry-After` but never
/// past the schedule's own cap: a wild header must not park a run for years.
/// (A refused key needs no longer wait here: the worker pauses the whole
/// provider profile, so the run is not claimed until the key works again.)
fn wait_after_unclear(u: &Unclear, scheduled: Duration, cap: Duration) -> Duration {
    let asked = u.retry_after.unwrap_or_default().min(cap);
    scheduled.max(asked)
}

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
        SubmitOutcome::Unclear(u) if !u.nothing_created => SubmitDoubt::Keep,
        _ => SubmitDoubt::Clear,
    };
    t
}

fn decide_submit(
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
                    detail: a.raw.clone(),
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

/// A submit in doubt: since when, and how long the provider may take to
/// list the run it created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InDoubt {
    /// When the submit went out (`submit_in_doubt_since`).
    pub since: DateTime<Utc>,
    /// The profile's `find_window`.
    pub window: Duration,
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
            t.doubt = SubmitDoubt::Clear;
            t.event.kind = "submit_adopted";
            FindDecision::Record(Box::new(t))
        }
        FindOutcome::NotFound => {
            let deadline = later(doubt.since, doubt.window);
            if now >= deadline {
                return FindDecision::Resubmit;
            }
            let left = (deadline - now).to_std().unwrap_or_default();
            look_again(
                "submit_not_found_yet",
                lookup_pause(doubt, retry, now).min(left),
                json!({ "in_doubt_since": doubt.since, "resubmit_after": deadline }),
            )
        }
        // Unanswered lookups cannot go on for ever (a Dify without a
        // usable logs endpoint would keep the run here): well past the
        // window the outcome is declared unknown rather than guessed.
        FindOutcome::Unclear(u) if now >= later(doubt.since, doubt.window * 2) => {
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
            wait_after_unclear(u, lookup_pause(doubt, retry, now), retry.max),
            unclear_detail(u),
        ),
    }
}

/// How long to wait before looking for a lost submit's run again: a
/// quarter of the time it has been in doubt (at least 2 s, at most the
/// retry cap). A run that has not shown up for a while will not show up in
/// the next second either, so the lookups thin out instead of costing a
/// claim and an event every two seconds for the whole window.
fn lookup_pause(doubt: InDoubt, retry: &RetryPolicy, now: DateTime<Utc>) -> Duration {
    let in_doubt = (now - doubt.since).to_std().unwrap_or_default();
    (in_doubt / 4).clamp(
        Duration::from_secs(2),
        retry.max.max(Duration::from_secs(2)),
    )
}

/// Decides what a status check means for the run.
pub fn after_poll(
    run: &RunProgress,
    outcome: &PollOutcome,
    cancel_requested: bool,
    poll: &PollPolicy,
    now: DateTime<Utc>,
    unit: f64,
) -> Transition {
    let next = Some(later(now, poll.delay(run.polls + 1, unit)));
    let past_deadline = run
        .submitted_at
        .is_some_and(|at| now >= later(at, poll.deadline));
    let mut transition = match outcome {
        PollOutcome::Report(report) => {
            let facts = ProviderFacts::from_report(report);
            if report.status.is_final() && report.settled {
                let event = Event {
                    kind: "run_finished",
                    detail: report.raw.clone(),
                };
                let mut t = if report.status == RunStatus::Succeeded {
                    Transition::new(RunState::Succeeded, event)
                } else if cancel_requested {
                    // Stopped on our request (or failed while being
                    // stopped): either way the producer asked for it to end.
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
                t.counts_poll = true;
                return t;
            }
            Transition {
                due_at: next,
                facts,
                ..Transition::new(
                    RunState::Running,
                    Event {
                        kind: "polled",
                        detail: report.raw.clone(),
                    },
                )
            }
        }
        // The provider accepted this run earlier, so "not found" now is as
        // likely a glitch as the truth: keep asking until the deadline.
        PollOutcome::Rejected(e) => Transition {
            due_at: next,
            ..Transition::new(
                RunState::Running,
                Event {
                    kind: "poll_rejected",
                    detail: provider_error_detail(e),
                },
            )
        },
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
    if past_deadline {
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
    use std::str::FromStr;

    fn retry() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_secs(2),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.0,
        }
    }

    fn poll() -> PollPolicy {
        PollPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.0,
            deadline: Duration::from_secs(3600),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn run(state: RunState, attempts: u32, polls: u32) -> RunProgress {
        RunProgress {
            state,
            attempts,
            polls,
            submitted_at: Some(now() - chrono::Duration::seconds(10)),
        }
    }

    fn unclear(retry_after: Option<u64>, account_refused: bool) -> Unclear {
        Unclear {
            reason: "HTTP 503".into(),
            http_status: Some(503),
            retry_after: retry_after.map(Duration::from_secs),
            account_refused,
            nothing_created: false,
        }
    }

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn secs(t: &Transition) -> i64 {
        (t.due_at.unwrap() - now()).num_seconds()
    }

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
    fn a_run_past_its_deadline_fails_with_what_was_last_known() {
        let mut r = run(RunState::Running, 1, 40);
        r.submitted_at = Some(now() - chrono::Duration::hours(2));
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
        let t = begin_submit(Some("wfr_1"), json!({"a": 1}));
        assert_eq!(t.to, RunState::Submitting);
        assert_eq!(t.attempts_delta, 1);
        assert!(t.keep_lease);
        assert_eq!(t.pin_revision.as_deref(), Some("wfr_1"));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(humantime(Duration::from_secs(90)), "1m30s");
        assert_eq!(humantime(Duration::from_secs(86400)), "24h");
        assert_eq!(humantime(Duration::from_secs(5)), "5s");
    }

    #[test]
    fn submit_doubt_is_set_before_sending_and_cleared_by_a_clear_answer() {
        assert_eq!(begin_submit(None, json!({})).doubt, SubmitDoubt::Set);
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
                SubmitDoubt::Keep,
            ),
            (
                SubmitGuard::FindByUser,
                SubmitOutcome::Unclear(unclear(None, false)),
                RunState::Submitting,
                None,
                SubmitDoubt::Keep,
            ),
            (
                SubmitGuard::Nothing,
                SubmitOutcome::Unclear(unclear(None, false)),
                RunState::Failed,
                Some("SUBMIT_OUTCOME_UNKNOWN"),
                SubmitDoubt::Keep,
            ),
            (
                SubmitGuard::Nothing,
                SubmitOutcome::Unclear(nothing_created.clone()),
                RunState::Submitting,
                None,
                SubmitDoubt::Clear,
            ),
            (
                SubmitGuard::FindByUser,
                SubmitOutcome::Unclear(nothing_created),
                RunState::Submitting,
                None,
                SubmitDoubt::Clear,
            ),
            (
                SubmitGuard::Nothing,
                SubmitOutcome::Accepted(Accepted {
                    provider_run_id: "r".into(),
                    ..Default::default()
                }),
                RunState::Running,
                None,
                SubmitDoubt::Clear,
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
        assert_eq!(t.doubt, SubmitDoubt::Keep);
    }

    #[test]
    fn a_lookup_adopts_waits_within_the_window_then_resubmits() {
        let doubt = InDoubt {
            since: now() - chrono::Duration::seconds(60),
            window: Duration::from_secs(600),
        };
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
                assert_eq!(t.doubt, SubmitDoubt::Clear);
                assert!(t.submitted);
                assert_eq!(t.facts.provider_run_id.as_deref(), Some("run-1"));
            }
            other => panic!("{other:?}"),
        }
        match decide(FindOutcome::NotFound, doubt) {
            FindDecision::Record(t) => {
                assert_eq!(t.to, RunState::Submitting);
                assert_eq!(t.event.kind, "submit_not_found_yet");
                assert_eq!(t.doubt, SubmitDoubt::Keep);
                assert_eq!(t.attempts_delta, 0, "looking is not submitting");
                assert_eq!(secs(&t), 15, "a quarter of the minute in doubt");
            }
            other => panic!("{other:?}"),
        }
        // Near the end of the window the wait shrinks to what is left.
        let almost = InDoubt {
            since: now() - chrono::Duration::seconds(599),
            ..doubt
        };
        match decide(FindOutcome::NotFound, almost) {
            FindDecision::Record(t) => assert_eq!(secs(&t), 1),
            other => panic!("{other:?}"),
        }
        let over = InDoubt {
            since: now() - chrono::Duration::seconds(600),
            ..doubt
        };
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
        let long_over = InDoubt {
            since: now() - chrono::Duration::seconds(1200),
            ..doubt
        };
        match decide(FindOutcome::Unclear(unclear(None, false)), long_over) {
            FindDecision::Record(t) => {
                assert_eq!(t.to, RunState::Failed);
                assert_eq!(t.error.unwrap().code, "SUBMIT_OUTCOME_UNKNOWN");
                assert!(!t.settled);
            }
            other => panic!("{other:?}"),
        }
        let again = begin_resubmit(None, json!({}), doubt.since);
        assert_eq!(again.event.kind, "resubmit_started");
        assert_eq!((again.attempts_delta, again.doubt), (1, SubmitDoubt::Set));
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
}
