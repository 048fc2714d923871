//! A status check of a submitted run (and a stop request, when one is due).

use chrono::Utc;
use serde_json::Value;

use super::{
    Engine, LeaseClock, StepError, defer, lease_ran_out, progress, record, unit, unknown_provider,
};
use crate::lifecycle;
use crate::lifecycle::RunState;
use crate::providers::{PollOutcome, PollRequest, StopOutcome, Unclear};
use crate::runtime::{Admission, Answered, Class};
use crate::store::ClaimedRun;

pub(super) async fn poll_step(
    engine: &Engine,
    run: ClaimedRun,
    lease: LeaseClock,
) -> Result<(), StepError> {
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
    let ticket = match engine
        .throttles
        .admit(&run.provider, Class::Poll, engine.lease / 4)
        .await
    {
        Admission::Go(ticket) => ticket,
        Admission::Defer(wait) => return defer(engine, &run, wait).await,
    };
    // Each call is started only if it ends before the lease does.
    let stop = match run.cancel_requested && client.can_stop() {
        true if !lease.allows(engine.call_timeout) => return lease_ran_out("stop"),
        true => client.stop(&request).await,
        false => None,
    };
    if let Some(stop) = &stop {
        engine.throttles.observe(
            &run.provider,
            match stop {
                StopOutcome::Requested => Answered::Status(200),
                StopOutcome::Rejected(e) => Answered::Status(e.http_status),
                StopOutcome::Unclear(u) => Answered::status(u.http_status),
            },
        );
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
    // A status check is never refused for the account: its 429 is the rate.
    ticket.answered(match &outcome {
        PollOutcome::Report(_) => Answered::Status(200),
        PollOutcome::Rejected(e) => Answered::Status(e.http_status),
        PollOutcome::Unclear(u) => Answered::status(u.http_status),
    });
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
    let recorded = record(engine, &run, RunState::Running, run.version, &t).await?;
    // Money a settled run released is back in the account.
    if recorded.is_some()
        && t.settled
        && client.reads_balance()
        && let PollOutcome::Report(report) = &outcome
        && let Some(released) = report.released_amount
    {
        engine.balances.credit(&run.provider, released);
    }
    Ok(())
}

pub(super) fn stop_detail(stop: &StopOutcome) -> Value {
    match stop {
        StopOutcome::Requested => serde_json::json!({ "requested": true }),
        StopOutcome::Rejected(e) => {
            serde_json::json!({ "requested": false, "code": e.code, "message": e.message })
        }
        StopOutcome::Unclear(u) => serde_json::json!({ "requested": false, "unclear": u.reason }),
    }
}
