//! One step of one run: the I/O around the pure lifecycle decisions.
//!
//! queued -> read the manifest, check the inputs, record `submitting`, submit.
//! submitting -> submit again with the recorded inputs and the same key.
//! running -> check the status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Map, Value};
use tracing::Instrument;

use super::{Admission, Engine};
use crate::inputs::complete_inputs;
use crate::lifecycle::{self, FindDecision, InDoubt, RunProgress, RunState, Transition};
use crate::providers::{
    FindOutcome, PollOutcome, PollRequest, RunStream, StopOutcome, StreamEnd, SubmitGuard,
    SubmitOutcome, SubmitRequest, Submitted, Unclear,
};
use crate::store::{self, ClaimedRun};

/// A step could not record its outcome. The run's lease then runs out and
/// another worker repeats the step, which is safe: submits carry the run's
/// idempotency key and polls change nothing at the provider.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The database refused or was unreachable.
    #[error("run {run_id}: could not record `{event}`: {source}")]
    Database {
        /// The run.
        run_id: i64,
        /// The event that was being recorded.
        event: &'static str,
        /// The database error.
        source: sqlx::Error,
    },
}

/// This worker's view of when its lease on a run ends, on the monotonic
/// clock (which keeps running while the process is stopped or starved, so a
/// worker that was frozen past its lease knows it).
#[derive(Debug, Clone, Copy)]
pub struct LeaseClock {
    deadline: Instant,
}

impl LeaseClock {
    /// A lease taken at `taken` (measured before the claim, so the local
    /// deadline is never later than the database's) for `lease`.
    pub fn new(taken: Instant, lease: Duration) -> Self {
        LeaseClock {
            deadline: taken + lease,
        }
    }

    /// When the lease ends, on the monotonic clock.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether a provider call of at most `call` ends before the lease does.
    /// A call that might outlive the lease is not started: by then another
    /// worker may hold the run, and two workers must never act on one run.
    fn allows(&self, call: Duration) -> bool {
        Instant::now() + call < self.deadline
    }
}

/// Handles one claimed run. Returns once its outcome is recorded.
pub async fn run_step(
    engine: Arc<Engine>,
    run: ClaimedRun,
    lease: LeaseClock,
) -> Result<(), StepError> {
    let span = tracing::info_span!("run", run_id = run.id, provider = %run.provider, workflow_id = %run.workflow_id);
    async move {
        if let Some(previous) = &run.rescued_from {
            tracing::info!(previous_owner = %previous, state = %run.state, "took over a run whose lease expired");
            // Audit only: a failure here must not stop the step.
            if let Err(e) = store::record_rescue(&engine.pool, run.id, run.state, previous, &engine.worker_id).await {
                tracing::warn!(error = %e, "could not record the rescue");
            }
        }
        match run.state {
            RunState::Queued | RunState::Submitting => submit_step(&engine, run, lease).await,
            RunState::Running => poll_step(&engine, run, lease).await,
            // Claims only return active runs.
            RunState::Succeeded | RunState::Failed | RunState::Canceled => Ok(()),
        }
    }
    .instrument(span)
    .await
}

fn progress(run: &ClaimedRun) -> RunProgress {
    RunProgress {
        state: run.state,
        attempts: run.attempts,
        polls: run.polls,
        submitted_at: run.submitted_at,
    }
}

/// Writes a transition; `None` when the run moved on without us.
async fn record(
    engine: &Engine,
    run: &ClaimedRun,
    from: RunState,
    version: i64,
    t: &Transition,
) -> Result<Option<i64>, StepError> {
    // The writer retries a database that is briefly away (failover,
    // restart, pool exhausted), for all waiting steps at once.
    let applied = engine
        .transitions
        .apply(run.id, version, from, t)
        .await
        .map_err(|source| StepError::Database {
            run_id: run.id,
            event: t.event.kind,
            source,
        })?;
    match applied {
        Some(_) => {
            log_transition(from, t);
            engine.metrics.run_finished(&run.provider, from, t.to);
            if let Some(due) = t.due_at {
                engine.wake.due_at(due);
            }
        }
        None => tracing::info!(
            event = t.event.kind,
            "run changed under us (canceled, or taken over after the lease expired); leaving it"
        ),
    }
    Ok(applied)
}

fn log_transition(from: RunState, t: &Transition) {
    match &t.error {
        Some(e) => {
            tracing::warn!(from = %from, to = %t.to, event = t.event.kind, error_code = %e.code, error = %e.message, "run failed")
        }
        None if t.to.is_final() => {
            tracing::info!(from = %from, to = %t.to, event = t.event.kind, "run finished")
        }
        None if from != t.to => {
            tracing::info!(from = %from, to = %t.to, event = t.event.kind, "run moved")
        }
        None => {
            tracing::debug!(state = %t.to, event = t.event.kind, due_at = ?t.due_at, "run rescheduled")
        }
    }
}

fn unit() -> f64 {
    fastrand::f64()
}

fn lease_ran_out(call: &str) -> Result<(), StepError> {
    tracing::warn!(
        call,
        "lease would end before the provider call could; leaving the run to whoever holds it next"
    );
    Ok(())
}

async fn submit_step(
    engine: &Engine,
    run: ClaimedRun,
    mut lease: LeaseClock,
) -> Result<(), StepError> {
    let Some(profile) = engine.provider(&run.provider) else {
        return unknown_provider(engine, &run).await;
    };
    let client = &profile.client;

    // A repeated submit must send exactly what the first one sent, so it
    // reuses the recorded inputs instead of re-reading a manifest that may
    // have changed since (also after an operator reset the row to queued).
    let recorded = match &run.sent_inputs {
        Some(Value::Object(sent)) => Some(Prepared {
            revision_id: run.revision_id.clone(),
            sent_inputs: sent.clone(),
            quote: None,
        }),
        _ => None,
    };
    let prepared = match recorded {
        Some(recorded) => recorded,
        None if !lease.allows(engine.call_timeout) => return lease_ran_out("manifest"),
        None => match prepare(engine, &run, profile).await {
            Ok(prepared) => prepared,
            Err(t) => {
                record(engine, &run, run.state, run.version, &t).await?;
                return Ok(());
            }
        },
    };

    let Prepared {
        revision_id,
        sent_inputs,
        quote,
    } = prepared;
    let mut begin =
        lifecycle::begin_submit(revision_id.as_deref(), Value::Object(sent_inputs.clone()));
    if let Some(quote) = &quote {
        begin.facts.quote_amount = quote.amount;
        begin.facts.currency = quote.currency.clone();
    }
    if let Some(since) = run.submit_in_doubt_since {
        match settle_doubt(engine, &run, profile, since, &lease).await? {
            DoubtSettled::Done => return Ok(()),
            DoubtSettled::Resubmit => {
                begin = lifecycle::begin_resubmit(
                    revision_id.as_deref(),
                    Value::Object(sent_inputs.clone()),
                    since,
                );
            }
            DoubtSettled::Repeat => {}
        }
    }

    // Limits of this process first (a wait here must fit the lease), then
    // the money limits shared by every process, checked as `submitting` is
    // recorded.
    let max_wait = engine.lease / 4;
    if let Admission::Defer(wait) = engine.throttles.admit(&run.provider, max_wait).await {
        return defer(engine, &run, wait).await;
    }
    let Ok(submit_slot) = engine.throttles.submit_slot(&run.provider, max_wait).await else {
        engine.throttles.refund(&run.provider);
        return defer(engine, &run, engine.submit.initial).await;
    };
    // The waits above count against the lease: a step that outlived it must
    // not record anything (its successor may hold the run by now).
    if !lease.allows(engine.call_timeout) {
        engine.throttles.refund(&run.provider);
        return lease_ran_out("record the submit");
    }
    let renewed_at = Instant::now();
    let recorded = if run.state == RunState::Queued && profile.spend.any() {
        begin_within_limits(engine, &run, profile, quote.as_ref(), &begin).await?
    } else {
        record(engine, &run, run.state, run.version, &begin).await?
    };
    let Some(version) = recorded else {
        return Ok(());
    };
    // Recording `submitting` renewed the lease: the run is progressing.
    lease = LeaseClock::new(renewed_at, engine.lease);
    if !lease.allows(engine.call_timeout) {
        return lease_ran_out("submit");
    }

    let Submitted { outcome, stream } = client
        .submit(&SubmitRequest {
            workflow_id: &run.workflow_id,
            revision_id: revision_id.as_deref(),
            inputs: &sent_inputs,
            idempotency_key: &run.idempotency_key,
            accept_external_cost_risk: run.accept_external_cost_risk,
        })
        .await;
    // A slot limits submit requests, not whole runs: a Dify run followed on
    // its stream must not keep it.
    drop(submit_slot);
    engine.throttles.observe(
        &run.provider,
        match &outcome {
            SubmitOutcome::Accepted(_) => Some(200),
            SubmitOutcome::Rejected(e) => Some(e.http_status),
            SubmitOutcome::Unclear(u) => u.http_status,
        },
    );
    match &outcome {
        SubmitOutcome::Accepted(a) => {
            tracing::info!(provider_run_id = %a.provider_run_id, replay = a.idempotent_replay, "submit accepted");
        }
        SubmitOutcome::Unclear(u) if u.account_refused => {
            engine
                .provider_refused_key(&run.provider, &run.workflow_id, &u.reason)
                .await;
        }
        _ => {}
    }
    let progress = RunProgress {
        state: RunState::Submitting,
        attempts: run.attempts + 1,
        ..progress(&run)
    };
    let mut t = lifecycle::after_submit(
        &progress,
        &outcome,
        client.submit_guard(),
        &engine.submit,
        &engine.poll,
        Utc::now(),
        unit(),
    );
    // A run followed on its stream stays ours while we read it.
    let stream = stream.filter(|_| t.to == RunState::Running);
    t.keep_lease = stream.is_some();
    let renewed_at = Instant::now();
    let recorded = record(engine, &run, RunState::Submitting, version, &t).await?;
    if let (Some(stream), Some(version), SubmitOutcome::Accepted(accepted)) =
        (stream, recorded, &outcome)
    {
        let followed = Followed {
            version,
            provider_run_id: &accepted.provider_run_id,
            task_id: accepted.task_id.as_deref(),
            lease_from: renewed_at,
        };
        follow_stream(engine, &run, profile, followed, stream).await?;
    }
    Ok(())
}

/// The run whose stream a step follows.
struct Followed<'a> {
    /// The row's version after `running` was recorded.
    version: i64,
    provider_run_id: &'a str,
    task_id: Option<&'a str>,
    /// When the lease was last renewed.
    lease_from: Instant,
}

/// Ends a background task with the step that started it, also when the
/// step itself is dropped (a worker stopping mid-stream).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the lease heartbeat tells the step reading a stream.
enum Heartbeat {
    /// `wfq cancel` asked for the run to be stopped.
    CancelRequested,
    /// The lease could not be renewed: the run is no longer ours.
    Lost,
}

/// Reads a Dify run's stream to its end, renewing the lease meanwhile, and
/// records the result (or, when the stream is lost, a status check due on
/// the schedule, so polling takes over).
async fn follow_stream(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &super::Profile,
    followed: Followed<'_>,
    mut stream: RunStream,
) -> Result<(), StepError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let heartbeat = AbortOnDrop(tokio::spawn(renew_while_streaming(
        engine.pool.clone(),
        run.id,
        followed.version,
        engine.worker_id.clone(),
        engine.lease,
        followed.lease_from,
        tx,
    )));
    let request = PollRequest {
        provider_run_id: followed.provider_run_id,
        task_id: followed.task_id,
        idempotency_key: &run.idempotency_key,
    };
    // Reading the stream changes nothing at the provider, and the final
    // write is a compare-and-set: so a lease that could not be renewed
    // (database blip, or the run taken over) does not end the reading,
    // which on some Dify versions would end the run. Only the stop needs
    // the run to be ours, and the poll deadline bounds the whole stream.
    let mut cancel_requested = false;
    let mut stop_sent = false;
    let mut heartbeat_alive = true;
    let deadline = tokio::time::Instant::now() + engine.poll.deadline;
    let end = {
        let follow = stream.follow();
        tokio::pin!(follow);
        loop {
            tokio::select! {
                end = &mut follow => break end,
                _ = tokio::time::sleep_until(deadline) => {
                    break StreamEnd::Lost(Unclear::new("the run's stream outlived poll.deadline", None));
                }
                signal = rx.recv(), if heartbeat_alive => match signal {
                    Some(Heartbeat::CancelRequested) => {
                        cancel_requested = true;
                        if !stop_sent && let Some(stop) = profile.client.stop(&request).await {
                            tracing::info!(stop = %stop_detail(&stop), "asked the provider to stop the run");
                            // Asked again on the next renewal unless taken.
                            stop_sent = matches!(stop, StopOutcome::Requested);
                        }
                    }
                    Some(Heartbeat::Lost) | None => {
                        heartbeat_alive = false;
                        tracing::warn!("could not renew the lease of a streamed run; reading on, the final write decides");
                    }
                },
            }
        }
    };
    drop(heartbeat);
    let outcome = match end {
        StreamEnd::Finished(report) => PollOutcome::Report(report),
        StreamEnd::Lost(u) => {
            tracing::warn!(reason = %u.reason, "the run's stream was lost; following it with status checks");
            PollOutcome::Unclear(u)
        }
    };
    let progress = RunProgress {
        state: RunState::Running,
        submitted_at: run.submitted_at.or(Some(Utc::now())),
        ..progress(run)
    };
    let t = lifecycle::after_poll(
        &progress,
        &outcome,
        cancel_requested || run.cancel_requested,
        &engine.poll,
        Utc::now(),
        unit(),
    );
    record(engine, run, RunState::Running, followed.version, &t).await?;
    Ok(())
}

/// Renews the lease of a run whose stream is being read, a third of a lease
/// after the last renewal, until told to stop (the task is aborted) or the
/// lease is lost; passes on cancel requests.
async fn renew_while_streaming(
    pool: sqlx::PgPool,
    id: i64,
    version: i64,
    worker: String,
    lease: Duration,
    mut renewed: Instant,
    signals: tokio::sync::mpsc::Sender<Heartbeat>,
) {
    loop {
        tokio::time::sleep_until((renewed + lease / 3).into()).await;
        let attempt = Instant::now();
        let renewal = tokio::time::timeout(
            lease / 3,
            store::renew_lease(&pool, id, version, &worker, lease),
        )
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
        match renewal {
            // Every renewal passes a cancel request on, so a stop that got
            // no clear answer is asked again.
            Ok(Some(cancel_requested)) => {
                renewed = attempt;
                if cancel_requested {
                    let _ = signals.send(Heartbeat::CancelRequested).await;
                }
            }
            Ok(None) => {
                let _ = signals.send(Heartbeat::Lost).await;
                return;
            }
            // A database blip: try again soon, while the lease still runs.
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the lease of a streamed run");
                if attempt + lease / 3 >= renewed + lease {
                    let _ = signals.send(Heartbeat::Lost).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// What a submit sends, once the inputs passed (or were recorded).
struct Prepared {
    revision_id: Option<String>,
    sent_inputs: Map<String, Value>,
    /// The manifest's quote, for the spend guard (`None` when the inputs
    /// were recorded earlier or the provider quotes nothing).
    quote: Option<Quote>,
}

/// A workflow's quote from its manifest.
struct Quote {
    amount: Option<rust_decimal::Decimal>,
    currency: Option<String>,
}

/// The profile is too busy for this step: the run goes back, due later.
async fn defer(engine: &Engine, run: &ClaimedRun, wait: Duration) -> Result<(), StepError> {
    tracing::debug!(wait = ?wait, "provider profile throttled; run deferred");
    let t = lifecycle::throttled(run.state, wait, Utc::now());
    record(engine, run, run.state, run.version, &t).await?;
    Ok(())
}

/// Records `begin` only if the run's quote fits the profile's money
/// limits; otherwise holds the run in `queued` with the reason.
async fn begin_within_limits(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &super::Profile,
    quote: Option<&Quote>,
    begin: &Transition,
) -> Result<Option<i64>, StepError> {
    let database = |source| StepError::Database {
        run_id: run.id,
        event: begin.event.kind,
        source,
    };
    let guarded = store::begin_within_limits(
        &engine.pool,
        store::GuardedRun {
            id: run.id,
            version: run.version,
            from: run.state,
            provider: &run.provider,
            quote: quote.and_then(|q| q.amount),
        },
        &engine.worker_id,
        engine.lease,
        begin,
        &profile.spend,
        &engine.budget_timezone,
    )
    .await
    .map_err(database)?;
    match guarded {
        store::Guarded::Applied(version) => {
            if version.is_some() {
                log_transition(run.state, begin);
            }
            Ok(version)
        }
        store::Guarded::Busy => {
            // Another worker holds the profile's spend lock for long: come
            // back shortly rather than tie up a connection waiting.
            engine.throttles.refund(&run.provider);
            let t = lifecycle::throttled(run.state, engine.budget_recheck, Utc::now());
            record(engine, run, run.state, run.version, &t).await?;
            Ok(None)
        }
        store::Guarded::Held(hold) if hold.never_fits() => {
            tracing::warn!(reason = %hold, "the run's quote alone exceeds a spend limit; failing it");
            let t = lifecycle::quote_above_limit(&hold.to_string());
            record(engine, run, run.state, run.version, &t).await?;
            Ok(None)
        }
        store::Guarded::Held(hold) => {
            tracing::info!(reason = %hold, "run held back by a spend limit");
            engine.throttles.refund(&run.provider);
            let due = Utc::now()
                + chrono::Duration::from_std(engine.budget_recheck)
                    .unwrap_or(chrono::Duration::seconds(30));
            store::hold_run(
                &engine.pool,
                run.id,
                run.version,
                &engine.worker_id,
                &hold.to_string(),
                due,
            )
            .await
            .map_err(database)?;
            Ok(None)
        }
    }
}

/// What became of a submit in doubt.
enum DoubtSettled {
    /// Recorded (adopted, failed, or wait and look again): the step is over.
    Done,
    /// The provider replays keys: send the same submit again.
    Repeat,
    /// Nothing was found for long enough: send it again, recorded as such.
    Resubmit,
}

/// A submit may be at the provider without its answer (a lost answer, or
/// a worker that died mid-submit). Repeating it is safe only where the
/// provider replays keys; elsewhere the run is looked for first, or the
/// run fails rather than risk a second charge.
async fn settle_doubt(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &super::Profile,
    since: chrono::DateTime<Utc>,
    lease: &LeaseClock,
) -> Result<DoubtSettled, StepError> {
    let client = &profile.client;
    let found = match client.submit_guard() {
        SubmitGuard::IdempotencyKey => return Ok(DoubtSettled::Repeat),
        SubmitGuard::Nothing => None,
        SubmitGuard::FindByUser if !lease.allows(engine.call_timeout) => {
            lease_ran_out("find the lost submit")?;
            return Ok(DoubtSettled::Done);
        }
        SubmitGuard::FindByUser => {
            if let Admission::Defer(wait) = engine
                .throttles
                .admit(&run.provider, engine.lease / 4)
                .await
            {
                defer(engine, run, wait).await?;
                return Ok(DoubtSettled::Done);
            }
            client
                .find_submitted(&run.idempotency_key, lease.deadline())
                .await
        }
    };
    let Some(found) = found else {
        tracing::warn!(in_doubt_since = %since, "a submit was sent without a recorded answer and the provider cannot find runs; failing the run rather than risking a second charge");
        let t = lifecycle::submit_outcome_unknown(
            "the worker stopped between sending the submit and recording its answer",
            Some(serde_json::json!({ "in_doubt_since": since })),
        );
        record(engine, run, run.state, run.version, &t).await?;
        return Ok(DoubtSettled::Done);
    };
    if let FindOutcome::Unclear(u) = &found
        && u.account_refused
    {
        engine
            .provider_refused_key(&run.provider, &run.workflow_id, &u.reason)
            .await;
    }
    let decision = lifecycle::after_find(
        &progress(run),
        &found,
        InDoubt {
            since,
            window: profile.find_window,
        },
        &engine.submit,
        &engine.poll,
        Utc::now(),
        unit(),
    );
    match decision {
        FindDecision::Resubmit => {
            tracing::warn!(in_doubt_since = %since, "the provider lists no run of this key since the earlier submit; submitting again");
            Ok(DoubtSettled::Resubmit)
        }
        FindDecision::Record(t) => {
            if let FindOutcome::Found(a) = &found {
                tracing::info!(provider_run_id = %a.provider_run_id, "found the run of a lost submit; adopted it");
            }
            record(engine, run, run.state, run.version, &t).await?;
            Ok(DoubtSettled::Done)
        }
    }
}

/// Reads the manifest and checks the inputs. `Err` is the transition that
/// ends this step without a submit.
async fn prepare(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &super::Profile,
) -> Result<Prepared, Transition> {
    let manifest = engine
        .manifests
        .get(
            &run.provider,
            &profile.client,
            &run.workflow_id,
            profile.manifest_ttl,
        )
        .await;
    if let Err(crate::providers::ManifestError::Unclear(u)) = &manifest
        && u.account_refused
    {
        engine
            .provider_refused_key(&run.provider, &run.workflow_id, &u.reason)
            .await;
    }
    let manifest = manifest.map_err(|e| {
        lifecycle::manifest_failed(
            &progress(run),
            &run.workflow_id,
            &e,
            &engine.submit,
            Utc::now(),
            unit(),
        )
    })?;
    let inputs = match &run.inputs {
        Value::Object(inputs) => inputs,
        // The CHECK constraint rules this out; fail the row, not the worker.
        other => {
            return Err(lifecycle::reject_inputs(
                &crate::inputs::InputError::WrongType {
                    key: "(inputs)".into(),
                    expected: "a JSON object".into(),
                    got: other.to_string(),
                },
            ));
        }
    };
    // market/info describes only the published revision. A run pinned to
    // another one is sent as the producer wrote it: checking it against a
    // manifest it does not follow could refuse a valid run, and the provider
    // still validates (its refusal fails the run with its own code).
    // Consent is checked after the inputs, so a run with both problems
    // reports the input problem (the one the producer must fix in the data).
    let Some(manifest) = manifest else {
        // No manifest to check against (GPTBots): the provider validates.
        crate::inputs::check_size(inputs).map_err(|e| lifecycle::reject_inputs(&e))?;
        return Ok(Prepared {
            revision_id: run.revision_id.clone(),
            sent_inputs: inputs.clone(),
            quote: None,
        });
    };
    let quote = Some(Quote {
        amount: manifest.quote_amount,
        currency: manifest.currency.clone(),
    });
    let lacks_consent = manifest.may_incur_external_cost && !run.accept_external_cost_risk;
    if let Some(pinned) = &run.revision_id
        && Some(pinned) != manifest.revision_id.as_ref()
    {
        crate::inputs::check_size(inputs).map_err(|e| lifecycle::reject_inputs(&e))?;
        if lacks_consent {
            return Err(lifecycle::external_cost_not_accepted(&run.workflow_id));
        }
        tracing::info!(pinned = %pinned, published = ?manifest.revision_id, "run pins an unpublished revision; inputs sent unchecked");
        return Ok(Prepared {
            revision_id: Some(pinned.clone()),
            sent_inputs: inputs.clone(),
            quote,
        });
    }
    let sent = complete_inputs(&manifest, inputs).map_err(|e| lifecycle::reject_inputs(&e))?;
    if lacks_consent {
        return Err(lifecycle::external_cost_not_accepted(&run.workflow_id));
    }
    Ok(Prepared {
        revision_id: run.revision_id.clone().or(manifest.revision_id.clone()),
        sent_inputs: sent,
        quote,
    })
}

async fn poll_step(engine: &Engine, run: ClaimedRun, lease: LeaseClock) -> Result<(), StepError> {
    let Some(profile) = engine.provider(&run.provider) else {
        return unknown_provider(engine, &run).await;
    };
    let client = &profile.client;
    let Some(provider_run_id) = run.provider_run_id.as_deref() else {
        // `running` is only ever written together with the provider run id,
        // so this row was edited by hand. Park it where people look.
        tracing::error!("running run without a provider run id; parked for an operator");
        let t = lifecycle::missing_provider_run_id(Utc::now());
        record(engine, &run, RunState::Running, run.version, &t).await?;
        return Ok(());
    };
    let request = PollRequest {
        provider_run_id,
        task_id: run.task_id.as_deref(),
        idempotency_key: &run.idempotency_key,
    };
    if let Admission::Defer(wait) = engine
        .throttles
        .admit(&run.provider, engine.lease / 4)
        .await
    {
        return defer(engine, &run, wait).await;
    }
    // Each call is started only if it ends before the lease does.
    let stop = match run.cancel_requested && client.can_stop() {
        true if !lease.allows(engine.call_timeout) => return lease_ran_out("stop"),
        true => client.stop(&request).await,
        false => None,
    };
    if let Some(stop) = &stop {
        match stop {
            StopOutcome::Requested => tracing::info!("asked the provider to stop the run"),
            StopOutcome::Rejected(e) => {
                tracing::warn!(code = %e.code, error = %e.message, "the provider refused to stop the run")
            }
            StopOutcome::Unclear(u) => {
                tracing::warn!(reason = %u.reason, "stop request without a clear answer; asking again on the next check")
            }
        }
    }
    let poll_budget = engine.call_timeout * client.calls_per_poll();
    let outcome = match lease.allows(poll_budget) {
        true => client.poll(&request).await,
        // The stop took most of the lease: record it, check on schedule.
        false if stop.is_some() => PollOutcome::Unclear(Unclear::new(
            "no time left in the lease for a status check after the stop request",
            None,
        )),
        false => return lease_ran_out("status check"),
    };
    engine.throttles.observe(
        &run.provider,
        match &outcome {
            PollOutcome::Report(_) => Some(200),
            PollOutcome::Rejected(e) => Some(e.http_status),
            PollOutcome::Unclear(u) => u.http_status,
        },
    );
    if let PollOutcome::Unclear(u) = &outcome
        && u.account_refused
    {
        engine
            .provider_refused_key(&run.provider, &run.workflow_id, &u.reason)
            .await;
    }
    if let PollOutcome::Report(report) = &outcome
        && report.settled
        && crate::money::settlement_balances(
            report.quote_amount,
            report.final_amount,
            report.released_amount,
        ) == Some(false)
    {
        tracing::warn!(
            quote = ?report.quote_amount,
            final_amount = ?report.final_amount,
            released = ?report.released_amount,
            "settlement does not add up: final + released differs from the quote"
        );
    }
    let mut t = lifecycle::after_poll(
        &progress(&run),
        &outcome,
        run.cancel_requested,
        &engine.poll,
        Utc::now(),
        unit(),
    );
    if let (Some(stop), Value::Object(detail)) = (&stop, &mut t.event.detail) {
        detail.insert("wfq_stop".into(), stop_detail(stop));
    }
    record(engine, &run, RunState::Running, run.version, &t).await?;
    Ok(())
}

fn stop_detail(stop: &StopOutcome) -> Value {
    match stop {
        StopOutcome::Requested => serde_json::json!({ "requested": true }),
        StopOutcome::Rejected(e) => {
            serde_json::json!({ "requested": false, "code": e.code, "message": e.message })
        }
        StopOutcome::Unclear(u) => serde_json::json!({ "requested": false, "unclear": u.reason }),
    }
}

/// The run names a profile this worker does not have. Only a queued run is
/// claimed in that case (see `ClaimScope`), and failing it is safe because
/// nothing was sent. A submitted run is left alone: it may hold money.
async fn unknown_provider(engine: &Engine, run: &ClaimedRun) -> Result<(), StepError> {
    if run.state != RunState::Queued || run.sent_inputs.is_some() {
        tracing::error!(
            "run of an unconfigured provider profile was claimed after submission; leaving it"
        );
        return Ok(());
    }
    let t = lifecycle::unknown_provider(&run.provider, &engine.provider_names());
    record(engine, run, run.state, run.version, &t).await?;
    Ok(())
}
