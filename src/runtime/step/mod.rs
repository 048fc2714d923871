//! One step of one run: the I/O around the pure lifecycle decisions, one
//! file per phase.
//!
//! queued -> read the manifest, check the inputs, record `submitting`, submit
//! (`prepare`, `submit`). submitting -> settle a submit in doubt, or submit
//! again with the recorded inputs and the same key (`doubt`, `submit`).
//! running -> check the status (`poll`), or read a Dify run's stream
//! (`stream`).

mod doubt;
mod late;
mod poll;
mod prepare;
mod stream;
mod submit;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;
use uuid::Uuid;

use super::Engine;
use crate::lifecycle::{self, RunProgress, RunState, Transition};
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

pub use crate::runtime::leases::LeaseClock;

/// The slot in the worker's concurrency a claimed run occupies; a step that
/// goes on to read a Dify run's stream gives it back (streams have a budget
/// of their own), so long runs of one profile cannot take every slot.
pub type Slot = OwnedSemaphorePermit;

/// Handles one claimed run. Returns once its outcome is recorded.
pub async fn run_step(
    engine: Arc<Engine>,
    run: ClaimedRun,
    lease: LeaseClock,
    slot: Slot,
) -> Result<(), StepError> {
    let span = tracing::info_span!("run", run_id = run.id, provider = %run.provider, workflow_id = %run.workflow_id);
    async move {
        if let Some(previous) = &run.rescued_from {
            let cause = run.rescue_cause.unwrap_or(store::RescueCause::LeaseExpiry);
            tracing::info!(previous_owner = %previous, state = %run.state, cause = cause.as_str(), "took over a run from another worker");
            // Audit only: a failure here must not stop the step.
            if let Err(e) = store::record_rescue(&engine.pool, run.id, run.state, previous, cause, &engine.worker_id).await {
                tracing::warn!(error = %e, "could not record the rescue");
            }
        }
        match run.state {
            RunState::Queued | RunState::Submitting => {
                submit::submit_step(&engine, run, lease, slot).await
            }
            RunState::Running => poll::poll_step(&engine, run, lease).await,
            // Claims only return active runs.
            RunState::Succeeded | RunState::Failed | RunState::Canceled => Ok(()),
        }
    }
    .instrument(span)
    .await
}

/// What the lifecycle needs to know about `run`, with its ages as of now
/// (database clock at the claim, plus the time since).
fn progress(run: &ClaimedRun) -> RunProgress {
    let ages = &run.ages;
    RunProgress {
        state: run.state,
        attempts: run.attempts,
        polls: run.polls,
        since_submit: ages.now(ages.since_submit),
        unknown_status_for: ages.now(ages.unknown_status_for),
        unsettled_for: ages.now(ages.unsettled_for),
    }
}

/// How hard a step tries to record its outcome.
#[derive(Debug, Clone, Copy)]
enum Persistence {
    /// The writer's own retries (a database away for a few seconds): a
    /// lost write is repeated by whoever takes the run next.
    Normal,
    /// An answer the provider acted on: keep trying until this instant
    /// (the lease's end), resolving lost COMMIT answers by reading back.
    Durable(Instant),
    /// The answer to the submit named by the token: [`Persistence::Durable`],
    /// and then, for an accepted answer that the compare-and-set refused
    /// (the run was taken over) or that could not be written within the
    /// lease, recorded by the submit's token ([`late`]).
    Answer(Instant, Uuid),
}

/// Writes a transition; `None` when the run moved on without us.
async fn record(
    engine: &Engine,
    run: &ClaimedRun,
    from: RunState,
    version: i64,
    t: &Transition,
) -> Result<Option<i64>, StepError> {
    write(engine, run, from, version, t, Persistence::Normal).await
}

/// [`record`] for the answer to a submit (named by `submit_token`): tried
/// until the lease ends, and an accepted answer then recorded even if the
/// run was taken over meanwhile, as long as it still waits for this
/// submit's outcome.
async fn record_answer(
    engine: &Engine,
    run: &ClaimedRun,
    version: i64,
    t: &Transition,
    submit_token: Uuid,
    until: Instant,
) -> Result<Option<i64>, StepError> {
    let persistence = Persistence::Answer(until, submit_token);
    write(engine, run, RunState::Submitting, version, t, persistence).await
}

/// [`record`] for an answer the provider acted on (an accepted submit, a
/// run found again): tried until the lease ends.
async fn record_durably(
    engine: &Engine,
    run: &ClaimedRun,
    from: RunState,
    version: i64,
    t: &Transition,
    until: Instant,
) -> Result<Option<i64>, StepError> {
    write(engine, run, from, version, t, Persistence::Durable(until)).await
}

async fn write(
    engine: &Engine,
    run: &ClaimedRun,
    from: RunState,
    version: i64,
    t: &Transition,
    persistence: Persistence,
) -> Result<Option<i64>, StepError> {
    let database = |source| StepError::Database {
        run_id: run.id,
        event: t.event.kind,
        source,
    };
    let applied = match persistence {
        Persistence::Normal => engine.transitions.apply(run.id, version, from, t).await,
        Persistence::Durable(until) => {
            engine
                .transitions
                .apply_durably(run.id, version, from, t, until)
                .await
        }
        Persistence::Answer(until, submit_token) => {
            let applied = engine
                .transitions
                .apply_durably(run.id, version, from, t, until)
                .await;
            if late::records_late(t, &applied) {
                late::record_late(engine, run, t, submit_token).await
            } else {
                applied
            }
        }
    };
    let applied = match applied {
        // PostgreSQL refused the answer's data itself. Repeating the same
        // write can never succeed, and the next step would bring the same
        // data: the run fails with what can be kept, instead of being
        // retried for ever.
        Err(e) if store::is_data_error(&e) => {
            tracing::error!(error = %e, event = t.event.kind, "the database refused the provider's answer; failing the run UNSTORABLE_ANSWER");
            let unstorable = lifecycle::unstorable_answer(t, &e.to_string());
            engine
                .transitions
                .apply(run.id, version, from, &unstorable)
                .await
                .map_err(database)?
        }
        other => other.map_err(database)?,
    };
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
            "run changed under us (canceled, or taken over by another worker): dropped this step's outcome"
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

/// Runs `attempt` until it answers, fails for good, or the next try would
/// start after `until`, pausing 250 ms doubling to the writer's longest
/// pause after errors of the connection (a database that is briefly away).
async fn retry_transient<T, F, Fut>(
    what: &'static str,
    until: Instant,
    mut attempt: F,
) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut pause = Duration::from_millis(250);
    loop {
        match attempt().await {
            Err(e) if store::is_transient(&e) && Instant::now() + pause < until => {
                tracing::warn!(error = %e, retry_in = ?pause, what, "could not reach the database; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(super::writer::LONGEST_PAUSE);
            }
            other => return other,
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

/// The profile is too busy for this step: the run goes back, due later.
async fn defer(engine: &Engine, run: &ClaimedRun, wait: Duration) -> Result<(), StepError> {
    tracing::debug!(wait = ?wait, "provider profile throttled; run deferred");
    let t = lifecycle::throttled(run.state, wait, Utc::now());
    record(engine, run, run.state, run.version, &t).await?;
    Ok(())
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
