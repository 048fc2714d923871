//! A submit that may be at the provider without its answer recorded (a lost
//! answer, or a worker that died mid-submit): repeated where the provider
//! replays keys, looked for where it can find runs, given up on otherwise.

use chrono::Utc;

use super::{
    Engine, LeaseClock, StepError, defer, lease_ran_out, progress, record, record_durably, unit,
};
use crate::lifecycle::{self, FindDecision, InDoubt};
use crate::providers::{FindOutcome, SubmitGuard};
use crate::runtime::{Admission, Answered, Class};
use crate::store::ClaimedRun;

/// What became of a submit in doubt.
pub(super) enum DoubtSettled {
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
pub(super) async fn settle_doubt(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &crate::runtime::Profile,
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
            let ticket = match engine
                .throttles
                .admit(&run.provider, Class::Poll, engine.lease / 4)
                .await
            {
                Admission::Go(ticket) => ticket,
                Admission::Defer(wait) => {
                    defer(engine, run, wait).await?;
                    return Ok(DoubtSettled::Done);
                }
            };
            let found = client
                .find_submitted(
                    &run.idempotency_key,
                    lease.deadline_for_calls_of(engine.call_timeout),
                )
                .await;
            ticket.answered(match &found {
                Some(FindOutcome::Unclear(u)) => Answered::status(u.http_status),
                Some(_) => Answered::Status(200),
                None => Answered::Nothing,
            });
            found
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
            // Measured by the database, which also wrote `since`.
            elapsed: run.ages.now(run.ages.in_doubt_for).unwrap_or_default(),
            window: profile.find_window,
            resubmits: run.resubmits,
            max_resubmits: profile.max_resubmits,
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
                // The only record of a run the provider bills: kept trying.
                record_durably(engine, run, run.state, run.version, &t, lease.deadline()).await?;
            } else {
                record(engine, run, run.state, run.version, &t).await?;
            }
            Ok(DoubtSettled::Done)
        }
    }
}
