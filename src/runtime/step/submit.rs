//! Submitting: the process's throttles, `submitting` recorded (with the
//! money limits, when the profile has any), the request sent and its answer
//! recorded.
//!
//! Recording `submitting`, sending and recording the answer run as a task
//! of their own, counted as in flight from before the worker's last look at
//! whether it is stopping: a worker that begins to stop waits for the task
//! (bounded) before it gives its leases back, and the task never sends once
//! it knows the worker is stopping. So no `submitting` lands after the
//! leases were given back, and no submit is cut off between the provider's
//! answer and its record. A `submitting` that is recorded but not followed
//! by a send (the worker is stopping, the lease is too short or the worker
//! cut off, or it cannot be told whether the write landed) is withdrawn by
//! the submit's token, so the run is never left in doubt for a request
//! nobody sent.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

use super::doubt::{self, DoubtSettled};
use super::prepare::{Prepared, Quote, begin_within_limits, prepare};
use super::stream::{self, Follow};
use super::{
    Engine, LeaseClock, Slot, StepError, defer, lease_ran_out, progress, record, record_answer,
    retry_transient, unit, unknown_provider,
};
use crate::lifecycle::{self, RefusalScope, RunProgress, RunState, Transition};
use crate::providers::{SubmitOutcome, SubmitRequest, Submitted};
use crate::runtime::account::QuoteCover;
use crate::runtime::pauses::ShortBalance;
use crate::runtime::shutdown::InFlightGuard;
use crate::runtime::{Admission, Answered, Class, PauseKind, Ticket};
use crate::store::{self, ClaimedRun};

pub(super) async fn submit_step(
    engine: &Arc<Engine>,
    run: ClaimedRun,
    lease: LeaseClock,
    slot: Slot,
) -> Result<(), StepError> {
    // Its lease is given back as the worker exits; nothing was sent.
    if engine.shutdown.has_begun() {
        return Ok(());
    }
    let Some(profile) = engine.provider(&run.provider) else {
        return unknown_provider(engine, &run).await;
    };

    // A repeated submit must send exactly what the first one sent, so it
    // reuses the recorded inputs instead of re-reading a manifest that may
    // have changed since (also after an operator reset the row to queued).
    // Its recorded quote goes with them: a run put back in the queue (an
    // account refusal, the breaker) is checked against the money limits and
    // the balance like a new one, never as a run without a quote.
    let recorded = match &run.sent_inputs {
        Some(Value::Object(sent)) => Some(Prepared {
            revision_id: run.revision_id.clone(),
            sent_inputs: sent.clone(),
            quote: run.quote_amount.map(Quote::recorded),
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
    // Names this submit, so that what becomes of it can be recorded also
    // after another worker took the run over.
    let token = Uuid::new_v4();
    let mut begin = lifecycle::begin_submit(
        revision_id.as_deref(),
        Value::Object(sent_inputs.clone()),
        token,
    );
    if let Some(quote) = &quote {
        begin.facts.quote_amount = quote.amount;
        begin.facts.currency = quote.currency.clone();
    }
    if let Some(since) = run.submit_in_doubt_since {
        match doubt::settle_doubt(engine, &run, profile, since, &lease).await? {
            DoubtSettled::Done => return Ok(()),
            DoubtSettled::Resubmit => {
                begin = lifecycle::begin_resubmit(
                    revision_id.as_deref(),
                    Value::Object(sent_inputs.clone()),
                    since,
                    token,
                );
            }
            DoubtSettled::Repeat => {}
        }
    }

    // The account's balance (chenyu): a quote it cannot cover waits queued,
    // and the profile pauses until a top-up, instead of every queued run
    // being refused (and failed) in turn.
    let reservation = match (run.state, quote.as_ref().and_then(|q| q.amount)) {
        (RunState::Queued, Some(amount)) => {
            match engine.cover_quote(&run.provider, profile, amount).await {
                QuoteCover::Reserved(amount) => {
                    Some(Reservation::new(engine, &run.provider, amount))
                }
                QuoteCover::Short { balance } => {
                    return hold_for_balance(engine, &run, amount, balance).await;
                }
                QuoteCover::Unknown => None,
            }
        }
        _ => None,
    };

    // Limits of this process first (a wait here must fit the lease, and
    // ends when the worker begins to stop), then the money limits shared
    // by every process, checked as `submitting` is recorded.
    let max_wait = engine.lease / 4;
    let admitted = tokio::select! {
        admitted = engine.throttles.admit(&run.provider, Class::Submit, max_wait) => admitted,
        () = engine.shutdown.begun() => return Ok(()),
    };
    let ticket = match admitted {
        Admission::Go(ticket) => ticket,
        Admission::Defer(wait) => return defer(engine, &run, wait).await,
    };
    let submit_slot = tokio::select! {
        slot = engine.throttles.submit_slot(&run.provider, max_wait) => slot,
        () = engine.shutdown.begun() => {
            ticket.unused();
            return Ok(());
        }
    };
    let Ok(submit_slot) = submit_slot else {
        ticket.unused();
        return defer(engine, &run, engine.submit.initial).await;
    };
    // The waits above count against the lease: a step that outlived it must
    // not record anything (its successor may hold the run by now).
    if !lease.allows(engine.call_timeout) {
        ticket.unused();
        return lease_ran_out("record the submit");
    }
    // Counted from before the shutdown check: a worker that begins to stop
    // after it waits for this submit before it gives its leases back, and
    // one that began before it records nothing.
    let in_flight = engine.submits_in_flight.enter();
    if engine.shutdown.has_begun() {
        ticket.unused();
        return Ok(());
    }
    let submit = Submit {
        begin,
        quote,
        send: Send {
            version: run.version,
            revision_id,
            sent_inputs,
            submit_slot,
            ticket,
            lease,
            quote: None,
            reservation,
            token,
        },
    };
    // From the `submitting` write on, a task of its own, which a stopping
    // worker waits for (bounded) and never aborts: a write handed to the
    // writer lands even if its step is dropped, and must be followed by the
    // send and its record, or by "not sent".
    let task = tokio::spawn(record_send_and_record(
        engine.clone(),
        run.clone(),
        submit,
        in_flight,
    ));
    let follow = match task.await {
        Ok(follow) => follow?,
        Err(e) => {
            tracing::error!(error = %e, "the submit task ended abnormally; the run is left to whoever takes it next");
            return Ok(());
        }
    };
    if let Some(follow) = follow {
        stream::follow_stream(engine, &run, profile, follow, slot).await?;
    }
    Ok(())
}

/// A submit whose `submitting` is about to be recorded.
struct Submit {
    /// The `submitting` write (`submit_started` or `resubmit_started`).
    begin: Transition,
    /// The manifest's quote, for the spend guard.
    quote: Option<Quote>,
    /// The rest, for the send (its `version` is the claim's until the
    /// write returns the new one).
    send: Send,
}

/// A submit about to be sent, with `submitting` recorded at `version`.
struct Send {
    version: i64,
    /// Names this submit (`wfq.runs.submit_token`).
    token: Uuid,
    revision_id: Option<String>,
    sent_inputs: serde_json::Map<String, Value>,
    /// Held until the request is answered (`max_submits_in_flight`).
    submit_slot: Option<OwnedSemaphorePermit>,
    /// The request's place in the profile's rate.
    ticket: Ticket,
    /// The run's quote, when known.
    quote: Option<rust_decimal::Decimal>,
    /// The quote reserved from the cached balance (given back unless the
    /// submit froze it).
    reservation: Option<Reservation>,
    /// Renewed by recording `submitting`.
    lease: LeaseClock,
}

/// What to do once `submitting` is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterBegin {
    /// Send the submit.
    Send,
    /// Send nothing, and record that: the worker began to stop while the
    /// write was on its way (its answer could be cut off before it is
    /// recorded, after its leases were given back).
    Stopping,
    /// Send nothing, and record that: the lease, as the write renewed it,
    /// is too short for the call, or the worker is cut off from the
    /// database (another worker may hold the run by now).
    NoLease,
}

impl AfterBegin {
    /// Decides from whether shutdown has begun and whether the lease
    /// allows a provider call now.
    fn decide(shutdown_begun: bool, lease_allows: bool) -> AfterBegin {
        match (shutdown_begun, lease_allows) {
            (true, _) => AfterBegin::Stopping,
            (false, false) => AfterBegin::NoLease,
            (false, true) => AfterBegin::Send,
        }
    }

    /// Why nothing was sent (the `submit_not_sent` event's reason).
    fn reason(self) -> &'static str {
        match self {
            AfterBegin::Send => "sent",
            AfterBegin::Stopping => "the worker began to stop while `submitting` was recorded",
            AfterBegin::NoLease => {
                "the lease was too short for the call, or the worker was cut off from the database, once `submitting` was recorded"
            }
        }
    }
}

/// Records `submitting`, then sends the submit and records its answer (the
/// run's stream, when it is to be read on), or records that nothing was
/// sent. Runs as a task of its own, counted by `in_flight`.
async fn record_send_and_record(
    engine: Arc<Engine>,
    run: ClaimedRun,
    submit: Submit,
    in_flight: InFlightGuard,
) -> Result<Option<Follow>, StepError> {
    let _in_flight = in_flight;
    let Some(profile) = engine.provider(&run.provider) else {
        return Ok(None);
    };
    let Submit {
        begin,
        quote,
        mut send,
    } = submit;
    let renewed_at = Instant::now();
    let mut ticket = Some(send.ticket);
    let recorded = if run.state == RunState::Queued && profile.spend.any() {
        begin_within_limits(&engine, &run, profile, quote.as_ref(), &begin, &mut ticket).await
    } else {
        record(&engine, &run, run.state, run.version, &begin).await
    };
    let recorded = match recorded {
        Ok(recorded) => recorded,
        Err(e) => {
            // The write may have landed without its answer reaching us: a
            // `submitting` with nothing sent must not stay in doubt (a
            // GPTBots run would fail SUBMIT_OUTCOME_UNKNOWN for nothing).
            not_sent(
                &engine,
                &run,
                (send.token, &send.lease),
                unsent_kind(&run, begin.resubmitted),
                "it could not be told whether `submitting` was recorded",
            )
            .await;
            return Err(e);
        }
    };
    let (Some(version), Some(ticket)) = (recorded, ticket) else {
        return Ok(None);
    };
    // Recording `submitting` renewed the lease: the run is progressing.
    send.lease.renewed_by_write(renewed_at, engine.lease);
    let next = AfterBegin::decide(
        engine.shutdown.has_begun(),
        send.lease.allows(engine.call_timeout),
    );
    if next != AfterBegin::Send {
        ticket.unused();
        let submit = (send.token, &send.lease);
        let kind = unsent_kind(&run, begin.resubmitted);
        not_sent(&engine, &run, submit, kind, next.reason()).await;
        return Ok(None);
    }
    send.version = version;
    send.ticket = ticket;
    send.quote = quote.and_then(|q| q.amount);
    send_and_record(engine, run, send).await
}

/// What an unsent submit of `run` came after: only a run claimed from
/// `queued` and not in doubt had no earlier submit that may have made a
/// run (chenyu's repeat of a key records a plain submit, not a resend).
fn unsent_kind(run: &ClaimedRun, resubmitted: bool) -> store::UnsentSubmit {
    if !resubmitted && run.state == RunState::Queued && run.submit_in_doubt_since.is_none() {
        store::UnsentSubmit::First
    } else {
        store::UnsentSubmit::AfterEarlier { resubmitted }
    }
}

/// Records that the submit recorded as about to be sent was not sent, by
/// its token (so also when the write's answer was lost, and whoever holds
/// the run now): its doubt is cleared and the attempt given back, so the
/// next worker submits it without a lookup, a wait or a failure. Tried
/// within the lease; a run left in doubt after all is settled by the next
/// worker as any lost answer.
async fn not_sent(
    engine: &Engine,
    run: &ClaimedRun,
    (token, lease): (Uuid, &LeaseClock),
    unsent: store::UnsentSubmit,
    reason: &str,
) {
    // Its main case is a worker cut off from the database: keep trying for
    // another lease, as for a late answer (a run given up on meanwhile is
    // still put back, see `record_unsent_submit`).
    let until = lease.deadline() + engine.lease;
    let written = retry_transient("record a submit that was not sent", until, || {
        store::record_unsent_submit(
            &engine.pool,
            run.id,
            token,
            unsent,
            &engine.worker_id,
            reason,
        )
    })
    .await;
    match written {
        Ok(Some(_)) => {
            tracing::info!(
                reason,
                "recorded `submitting` but sent nothing; the run is due again, not in doubt"
            )
        }
        // The write had not landed, or the run moved on: nothing to undo.
        Ok(None) => tracing::debug!(reason, "no submit of ours to withdraw"),
        Err(e) => {
            tracing::warn!(error = %e, reason, "could not record that nothing was sent; the run stays in doubt until the next worker settles it")
        }
    }
}

/// Sends the submit and records its answer; the run's stream, when it is to
/// be read on.
async fn send_and_record(
    engine: Arc<Engine>,
    run: ClaimedRun,
    send: Send,
) -> Result<Option<Follow>, StepError> {
    let Some(profile) = engine.provider(&run.provider) else {
        return Ok(None);
    };
    let client = &profile.client;
    // GPTBots gets files of an S3 store as presigned URLs, made now and
    // never recorded (the recorded inputs hold the files' locations).
    let signed =
        crate::files::upload::signed_inputs(&engine, &run, profile, &send.sent_inputs).await;
    let Submitted { outcome, stream } = client
        .submit(&SubmitRequest {
            workflow_id: &run.workflow_id,
            revision_id: send.revision_id.as_deref(),
            inputs: signed.as_ref().unwrap_or(&send.sent_inputs),
            idempotency_key: &run.idempotency_key,
            accept_external_cost_risk: run.accept_external_cost_risk,
            account_refusals: &profile.account_refusals,
        })
        .await;
    let refusal = match &outcome {
        SubmitOutcome::Rejected(e) => Some(refusal_of(&engine, profile, &run, e, send.quote).await),
        _ => None,
    };
    send.ticket.answered(match (&outcome, &refusal) {
        // Refused for the account, whatever the status line (a cap on runs
        // at once comes as HTTP 429): the profile pauses instead, and the
        // rate learns nothing it would slow down for.
        (_, Some(Refusal::Account { .. })) => Answered::AccountRefused,
        (SubmitOutcome::Accepted(_), _) => Answered::Status(200),
        (SubmitOutcome::Rejected(e), _) => Answered::Status(e.http_status),
        (SubmitOutcome::Unclear(u), _) => Answered::status(u.http_status),
    });
    match &outcome {
        SubmitOutcome::Accepted(a) => {
            tracing::info!(provider_run_id = %a.provider_run_id, replay = a.idempotent_replay, "submit accepted");
            if let Some(reservation) = send.reservation {
                reservation.keep();
            }
            engine.account_accepted(&run.provider).await;
        }
        SubmitOutcome::Unclear(u) if u.account_refused => {
            engine
                .provider_refused_key(&run.provider, &run.workflow_id, &u.reason)
                .await;
        }
        _ => {}
    }
    if let Some(Refusal::Account { kind, reason, .. }) = &refusal {
        engine
            .pause_for_account(&run.provider, kind.clone(), &run.workflow_id, reason)
            .await;
    }
    let progress = RunProgress {
        state: RunState::Submitting,
        attempts: run.attempts + 1,
        ..progress(&run)
    };
    let mut t = match &refusal {
        Some(Refusal::Account { transition, .. }) => (**transition).clone(),
        _ => lifecycle::after_submit(
            &progress,
            &outcome,
            client.submit_guard(),
            &engine.submit,
            &engine.poll,
            Utc::now(),
            unit(),
        ),
    };
    // A run followed on its stream stays ours while we read it, if the
    // worker's stream budget has room; otherwise it is followed by status
    // checks like any other.
    let stream = stream.filter(|_| t.to == RunState::Running);
    let permit = match &stream {
        Some(_) => match engine.streams.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                tracing::info!(
                    "every stream slot is taken (worker.max_streams); following the run by status checks"
                );
                None
            }
        },
        None => None,
    };
    let stream = stream.filter(|_| permit.is_some());
    t.keep_lease = stream.is_some();
    let renewed_at = Instant::now();
    // The only record of a run the provider may bill: tried within the
    // lease, and applied by the submit's token when the run was taken over
    // meanwhile (see `store::record_late_acceptance`).
    let recorded = record_answer(
        &engine,
        &run,
        send.version,
        &t,
        send.token,
        send.lease.deadline(),
    )
    .await;
    // A slot limits submits, not whole runs: a Dify run followed on its
    // stream must not keep it. It is given back once the answer is
    // recorded, not as it arrives, so that the next submit's `submitting`
    // is never recorded while this one's answer is not: a submit counts as
    // on the wire from its `submitting` to its answer's record.
    drop(send.submit_slot);
    let recorded = match recorded {
        Ok(recorded) => recorded,
        Err(e) => {
            if let SubmitOutcome::Accepted(a) = &outcome {
                tracing::error!(
                    provider_run_id = %a.provider_run_id,
                    error = %e,
                    "the provider accepted the run but its answer could not be recorded, within the lease nor by the submit's token after it; the worker that takes the run next replays it (chenyu), looks for it (Dify) or fails it SUBMIT_OUTCOME_UNKNOWN (GPTBots): this provider run id is the one to look for"
                );
            }
            return Err(e);
        }
    };
    if let (Some(Refusal::Run { trips }), SubmitOutcome::Rejected(e)) = (&refusal, &outcome) {
        // A refusal read as the run's before another one tripped the
        // breaker for the same code, and recorded after that trip put the
        // failed runs back, is put back too: otherwise it alone stays
        // failed for an account refusal.
        let tripped_meanwhile = engine
            .pauses
            .kind(&run.provider)
            .is_some_and(|k| matches!(k, PauseKind::Breaker { .. }) && k.covers(&e.code));
        if *trips || tripped_meanwhile {
            engine
                .trip_breaker(&run.provider, &e.code, &run.workflow_id)
                .await;
        }
    }
    match (stream, permit, recorded, outcome) {
        (Some(stream), Some(permit), Some(version), SubmitOutcome::Accepted(accepted)) => {
            Ok(Some(Follow {
                version,
                provider_run_id: accepted.provider_run_id,
                task_id: accepted.task_id,
                lease_from: renewed_at,
                lease: send.lease,
                stream,
                permit,
            }))
        }
        _ => Ok(None),
    }
}

/// What a refused submit was refused for.
enum Refusal {
    /// The account: the profile pauses for `kind` (`reason` says why), and
    /// the run goes back to the queue with `transition`.
    Account {
        kind: PauseKind,
        reason: String,
        transition: Box<lifecycle::Transition>,
    },
    /// The run: it fails; `trips`: the refusal tripped the breaker.
    Run { trips: bool },
}

/// Reads a refusal: a code listed as about the account, or the code of the
/// profile's current pause, puts the run back and pauses the profile; any
/// other counts toward the breaker.
async fn refusal_of(
    engine: &Engine,
    profile: &crate::runtime::Profile,
    run: &ClaimedRun,
    e: &crate::providers::ProviderError,
    quote: Option<rust_decimal::Decimal>,
) -> Refusal {
    let paused = engine.pauses.kind(&run.provider);
    let scope = lifecycle::refusal_scope(
        &e.code,
        &profile.account_refusals,
        profile.client.reads_balance(),
    );
    let kind = match (&paused, scope) {
        (Some(kind), _) if kind.covers(&e.code) => kind.clone(),
        (_, RefusalScope::Balance) => PauseKind::Balance { needed: quote },
        (_, RefusalScope::Account) => PauseKind::Account {
            code: e.code.clone(),
        },
        (_, RefusalScope::Run) => {
            // Given back for this code once already and refused alike while
            // the profile runs: the run's own fault. Counted, it would trip
            // the breaker again and again (requeued, resumed by a valid
            // probe, refused...), and never end.
            let given_back = store::given_back_for(&engine.pool, run.id, &e.code)
                .await
                .unwrap_or_else(|err| {
                    tracing::warn!(error = %err, "could not read whether the run was given back before; counting its refusal");
                    false
                });
            if given_back {
                tracing::info!(code = %e.code, "refused again with the code it was given back for: the run fails for good");
                return Refusal::Run { trips: false };
            }
            let trips = engine.breakers.refused(
                &run.provider,
                &e.code,
                &run.workflow_id,
                run.id,
                &profile.breaker,
                std::time::Instant::now(),
            );
            return Refusal::Run { trips };
        }
    };
    let reason = format!(
        "the provider refused the account ({}): {}",
        e.code, e.message
    );
    let transition = Box::new(lifecycle::account_refused(e, &reason, Utc::now()));
    Refusal::Account {
        kind,
        reason,
        transition,
    }
}

/// A quote from the cached balance, given back when dropped unless the
/// submit froze it ([`Reservation::keep`]).
struct Reservation {
    engine: Arc<Engine>,
    profile: String,
    amount: Option<rust_decimal::Decimal>,
}

impl Reservation {
    fn new(engine: &Arc<Engine>, profile: &str, amount: rust_decimal::Decimal) -> Self {
        Reservation {
            engine: engine.clone(),
            profile: profile.to_owned(),
            amount: Some(amount),
        }
    }

    /// The provider froze the quote: it stays spent.
    fn keep(mut self) {
        self.amount = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(amount) = self.amount.take() {
            self.engine.balances.credit(&self.profile, amount);
        }
    }
}

/// The balance cannot cover the run's quote: the run waits queued with the
/// reason. The profile pauses for its balance (a top-up is noticed within
/// one probe interval) only when the balance covers no quote seen; while it
/// still covers smaller runs, only this run waits (for one probe interval,
/// then it is checked again) and the others go on.
async fn hold_for_balance(
    engine: &Engine,
    run: &ClaimedRun,
    quote: rust_decimal::Decimal,
    balance: rust_decimal::Decimal,
) -> Result<(), StepError> {
    let reason = format!(
        "balance: the quote {quote} exceeds the account's balance {balance}; waiting for a top-up"
    );
    let smallest = engine.balances.smallest_quote(&run.provider);
    let due = match crate::runtime::pauses::short_balance(quote, balance, smallest) {
        ShortBalance::HoldRun => {
            tracing::info!(%quote, %balance, "the balance cannot cover the run's quote but covers smaller ones; holding this run only");
            let probe = engine
                .provider(&run.provider)
                .map_or(std::time::Duration::from_secs(15), |p| p.account_probe);
            Utc::now() + chrono::Duration::from_std(probe).unwrap_or(chrono::Duration::seconds(15))
        }
        ShortBalance::PauseProfile { needed } => {
            tracing::info!(%quote, %balance, "the balance cannot cover the run's quote; holding it");
            engine
                .pause_for_account(
                    &run.provider,
                    PauseKind::Balance {
                        needed: Some(needed),
                    },
                    &run.workflow_id,
                    &reason,
                )
                .await;
            // Not claimed while the profile is paused.
            Utc::now()
        }
    };
    store::hold_run(
        &engine.pool,
        run.id,
        run.version,
        &engine.worker_id,
        &reason,
        due,
    )
    .await
    .map_err(|source| StepError::Database {
        run_id: run.id,
        event: "balance_hold",
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_submit_is_sent_only_by_a_worker_that_is_not_stopping_and_holds_its_lease() {
        // (shutdown begun, lease allows the call, what follows the write)
        let table = [
            (false, true, AfterBegin::Send),
            (false, false, AfterBegin::NoLease),
            (true, true, AfterBegin::Stopping),
            (true, false, AfterBegin::Stopping),
        ];
        for (stopping, lease, next) in table {
            assert_eq!(
                AfterBegin::decide(stopping, lease),
                next,
                "stopping {stopping}, lease {lease}"
            );
        }
        assert_ne!(AfterBegin::Stopping.reason(), AfterBegin::NoLease.reason());
    }
}
