//! Writing steps' [`Transition`]s and their events, one statement for a
//! whole batch of runs.

use std::time::Duration;

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::lifecycle::{Mark, RunState, Transition};

/// Applies `t` to run `id` if this worker still holds it at `version`
/// (compare-and-set), and appends the event in the same statement: a batch
/// of one for [`apply_transitions`].
///
/// Returns the new version, or `None` when the row moved on without us
/// (canceled, or the lease expired and another worker took it): the caller
/// then stops handling the run.
pub async fn apply_transition<'e>(
    executor: impl PgExecutor<'e>,
    id: i64,
    version: i64,
    from: RunState,
    worker: &str,
    lease: Duration,
    t: &Transition,
) -> Result<Option<i64>, sqlx::Error> {
    let write = TransitionWrite {
        id,
        version,
        from,
        transition: t.clone(),
        token: Uuid::new_v4(),
    };
    let applied = apply_transitions(executor, worker, lease, std::slice::from_ref(&write)).await?;
    Ok(applied.into_iter().next().flatten())
}

/// One transition of a batch: run `id` at `version`, moving from `from`.
#[derive(Debug, Clone)]
pub struct TransitionWrite {
    /// The run.
    pub id: i64,
    /// The version this worker holds.
    pub version: i64,
    /// The state the step started from (for the event).
    pub from: RunState,
    /// What to write.
    pub transition: Transition,
    /// Identifies this write: stored in `last_write`, so that after an
    /// error that leaves open whether the write landed (a lost COMMIT
    /// answer) the row can be read back instead of guessed about.
    pub token: Uuid,
}

/// Applies many runs' transitions, each with its own compare-and-set and
/// event, in one statement (and one commit, outside a transaction): one
/// round trip and one WAL flush per batch instead of per run.
/// The result lists the new version per write, in order (`None`: that run
/// moved on without us). A batch may hold two writes of one run (a step
/// that outlived its lease and the one that took over); at most one of
/// them matches the row's version.
#[tracing::instrument(name = "apply_transitions", skip(pool, writes), fields(batch = writes.len()), err)]
pub async fn apply_transitions<'e>(
    pool: impl PgExecutor<'e>,
    worker: &str,
    lease: Duration,
    writes: &[TransitionWrite],
) -> Result<Vec<Option<i64>>, sqlx::Error> {
    fn col<T, F: Fn(&TransitionWrite) -> T>(writes: &[TransitionWrite], f: F) -> Vec<T> {
        writes.iter().map(f).collect()
    }
    let facts = |w: &TransitionWrite| w.transition.facts.clone();
    let all_facts: Vec<_> = writes.iter().map(facts).collect();
    let fact = |f: fn(&crate::lifecycle::ProviderFacts) -> Option<String>| -> Vec<Option<String>> {
        all_facts.iter().map(f).collect()
    };
    let amount = |f: fn(&crate::lifecycle::ProviderFacts) -> Option<rust_decimal::Decimal>| {
        all_facts.iter().map(f).collect::<Vec<_>>()
    };
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        r#"
        WITH input AS (
            SELECT * FROM unnest(
                $1::int8[], $2::int8[], $3::text[], $4::int4[], $5::int4[], $6::timestamptz[],
                $7::bool[], $8::bool[], $9::bool[], $10::text[], $11::text[], $12::jsonb[],
                $13::text[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[],
                $19::text[], $20::text[], $21::jsonb[], $22::text[], $23::numeric[], $24::numeric[],
                $25::numeric[], $26::numeric[], $27::numeric[], $28::numeric[], $29::numeric[],
                $30::text[], $31::text[], $32::jsonb[], $33::text[], $34::text[], $35::jsonb[],
                $36::int8[], $37::text[], $40::uuid[], $41::bool[], $42::text[], $43::text[],
                $44::bool[], $45::text[], $46::int4[], $47::int4[], $48::uuid[]
            ) WITH ORDINALITY AS i(id, version, state, attempts_delta, polls_delta, due_at,
                   keep_lease, submitted, settled, pin_revision, revision_id, sent_inputs,
                   provider_run_id, task_id, prompt_id, billing_run_id, run_status, freeze_status,
                   submission_status, settlement_status, outputs, currency, quote_amount, frozen_amount,
                   final_amount, released_amount, compute_cost, external_model_cost, total_cost,
                   error_code, error_message, error_detail, kind, from_state, detail,
                   total_tokens, doubt, token, resubmitted, unknown_status, provider_finished,
                   estimate_cost, hold_reason, queue_position, queue_wait_secs, submit_token, n)
        ),
        updated AS (
            UPDATE wfq.runs r SET
                state = i.state,
                version = r.version + 1,
                updated_at = now(),
                last_write = i.token,
                attempts = r.attempts + i.attempts_delta,
                polls = r.polls + i.polls_delta,
                -- A run this worker keeps is due when its lease ends (see
                -- claim_due_runs); one it lets go without a schedule is due now.
                due_at = CASE
                    WHEN i.keep_lease THEN GREATEST(COALESCE(i.due_at, r.due_at), now() + make_interval(secs => $39))
                    WHEN i.due_at IS NOT NULL THEN i.due_at
                    ELSE LEAST(r.due_at, now()) END,
                lease_owner = CASE WHEN i.keep_lease THEN r.lease_owner END,
                lease_expires_at = CASE WHEN i.keep_lease THEN now() + make_interval(secs => $39) END,
                submitted_at = CASE WHEN i.submitted THEN COALESCE(r.submitted_at, now()) ELSE r.submitted_at END,
                finished_at = CASE WHEN i.state IN ('succeeded', 'failed', 'canceled') THEN now() ELSE r.finished_at END,
                settled_at = CASE WHEN i.settled THEN COALESCE(r.settled_at, now()) ELSE r.settled_at END,
                revision_id = COALESCE(r.revision_id, i.pin_revision, i.revision_id),
                sent_inputs = COALESCE(i.sent_inputs, r.sent_inputs),
                provider_run_id = COALESCE(i.provider_run_id, r.provider_run_id),
                task_id = COALESCE(i.task_id, r.task_id),
                prompt_id = COALESCE(i.prompt_id, r.prompt_id),
                billing_run_id = COALESCE(i.billing_run_id, r.billing_run_id),
                run_status = COALESCE(i.run_status, r.run_status),
                freeze_status = COALESCE(i.freeze_status, r.freeze_status),
                submission_status = COALESCE(i.submission_status, r.submission_status),
                settlement_status = COALESCE(i.settlement_status, r.settlement_status),
                outputs = COALESCE(i.outputs, r.outputs),
                currency = COALESCE(i.currency, r.currency),
                quote_amount = COALESCE(i.quote_amount, r.quote_amount),
                frozen_amount = COALESCE(i.frozen_amount, r.frozen_amount),
                final_amount = COALESCE(i.final_amount, r.final_amount),
                released_amount = COALESCE(i.released_amount, r.released_amount),
                compute_cost = COALESCE(i.compute_cost, r.compute_cost),
                external_model_cost = COALESCE(i.external_model_cost, r.external_model_cost),
                total_cost = COALESCE(i.total_cost, r.total_cost),
                error_code = COALESCE(i.error_code, r.error_code),
                error_message = COALESCE(i.error_message, r.error_message),
                error_detail = COALESCE(i.error_detail, r.error_detail),
                total_tokens = COALESCE(i.total_tokens, r.total_tokens),
                -- A status report says where the run is now: its queue
                -- place, or none once it left the queue.
                queue_position = CASE WHEN i.run_status IS NOT NULL THEN i.queue_position ELSE r.queue_position END,
                queue_wait_secs = CASE WHEN i.run_status IS NOT NULL THEN i.queue_wait_secs ELSE r.queue_wait_secs END,
                hold_reason = CASE WHEN i.state = 'queued' THEN COALESCE(i.hold_reason, r.hold_reason) END,
                submit_in_doubt_since = CASE i.doubt
                    WHEN 'set' THEN now()
                    WHEN 'clear' THEN NULL
                    ELSE r.submit_in_doubt_since END,
                -- The submit now in doubt, by name (see store::submits).
                submit_token = CASE i.doubt WHEN 'set' THEN i.submit_token ELSE r.submit_token END,
                resubmits = r.resubmits + CASE WHEN i.resubmitted THEN 1 ELSE 0 END,
                unknown_status_since = CASE i.unknown_status
                    WHEN 'set' THEN COALESCE(r.unknown_status_since, now())
                    WHEN 'clear' THEN NULL
                    ELSE r.unknown_status_since END,
                provider_finished_at = CASE i.provider_finished
                    WHEN 'set' THEN COALESCE(r.provider_finished_at, now())
                    WHEN 'clear' THEN NULL
                    ELSE r.provider_finished_at END,
                -- The highest cost a settled run of the same workflow had
                -- lately: a stand-in the spend guard can count, where the
                -- provider reported none (rare: only then is it looked up):
                -- asked for, or for any run that ends with its money not
                -- settled. Zero is no estimate (unknown is never counted as
                -- nothing); without one the guard falls back to the
                -- profile's `unknown_cost`, then holds the profile.
                cost_estimate = CASE WHEN i.estimate_cost
                        OR (i.state IN ('succeeded', 'failed', 'canceled') AND NOT i.settled
                            AND r.settled_at IS NULL AND r.cost_estimate IS NULL) THEN (
                    SELECT max(o.final_amount) FROM wfq.runs o
                    WHERE o.provider = r.provider AND o.submitted_at > now() - interval '30 days'
                      AND o.workflow_id = r.workflow_id AND o.settled_at IS NOT NULL
                      AND o.final_amount > 0
                ) ELSE r.cost_estimate END
            FROM input i
            WHERE r.id = i.id AND r.version = i.version AND r.lease_owner = $38
            RETURNING i.n, r.id, r.version, r.state, i.kind, i.from_state, i.detail
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker, detail)
            SELECT id, kind, from_state, state, $38, detail FROM updated ORDER BY id
        )
        SELECT n, version FROM updated
        "#,
    )
    .bind(col(writes, |w| w.id))
    .bind(col(writes, |w| w.version))
    .bind(col(writes, |w| w.transition.to.as_str()))
    .bind(col(writes, |w| w.transition.attempts_delta))
    .bind(col(writes, |w| i32::from(w.transition.counts_poll)))
    .bind(col(writes, |w| w.transition.due_at))
    .bind(col(writes, |w| w.transition.keep_lease))
    .bind(col(writes, |w| w.transition.submitted))
    .bind(col(writes, |w| w.transition.settled))
    .bind(col(writes, |w| w.transition.pin_revision.clone()))
    .bind(fact(|f| f.revision_id.clone()))
    .bind(col(writes, |w| w.transition.sent_inputs.clone()))
    .bind(fact(|f| f.provider_run_id.clone()))
    .bind(fact(|f| f.task_id.clone()))
    .bind(fact(|f| f.prompt_id.clone()))
    .bind(fact(|f| f.billing_run_id.clone()))
    .bind(fact(|f| f.run_status.clone()))
    .bind(fact(|f| f.freeze_status.clone()))
    .bind(fact(|f| f.submission_status.clone()))
    .bind(fact(|f| f.settlement_status.clone()))
    .bind(all_facts.iter().map(|f| f.outputs.clone()).collect::<Vec<_>>())
    .bind(fact(|f| f.currency.clone()))
    .bind(amount(|f| f.quote_amount))
    .bind(amount(|f| f.frozen_amount))
    .bind(amount(|f| f.final_amount))
    .bind(amount(|f| f.released_amount))
    .bind(amount(|f| f.compute_cost))
    .bind(amount(|f| f.external_model_cost))
    .bind(amount(|f| f.total_cost))
    .bind(col(writes, |w| w.transition.error.as_ref().map(|e| e.code.clone())))
    .bind(col(writes, |w| w.transition.error.as_ref().map(|e| e.message.clone())))
    .bind(col(writes, |w| w.transition.error.as_ref().and_then(|e| e.detail.clone())))
    .bind(col(writes, |w| w.transition.event.kind))
    .bind(col(writes, |w| w.from.as_str()))
    .bind(col(writes, |w| w.transition.event.detail.clone()))
    .bind(all_facts.iter().map(|f| f.total_tokens).collect::<Vec<_>>())
    .bind(col(writes, |w| mark(w.transition.doubt)))
    .bind(worker)
    .bind(lease.as_secs_f64())
    .bind(col(writes, |w| w.token))
    .bind(col(writes, |w| w.transition.resubmitted))
    .bind(col(writes, |w| mark(w.transition.unknown_status)))
    .bind(col(writes, |w| mark(w.transition.provider_finished)))
    .bind(col(writes, |w| w.transition.estimate_cost))
    .bind(col(writes, |w| w.transition.hold_reason.clone()))
    .bind(all_facts.iter().map(|f| f.queue_position).collect::<Vec<_>>())
    .bind(all_facts.iter().map(|f| f.queue_wait_secs).collect::<Vec<_>>())
    .bind(col(writes, |w| w.transition.submit_token))
    .fetch_all(pool)
    .await?;
    // By position in the batch, not by run id: two steps of one run (an
    // old one whose lease ran out, and its successor) may share a batch,
    // and only the one whose version matched was applied.
    let mut applied = vec![None; writes.len()];
    for (n, version) in rows {
        if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| applied.get_mut(i)) {
            *slot = Some(version);
        }
    }
    Ok(applied)
}

fn mark(mark: Mark) -> &'static str {
    match mark {
        Mark::Keep => "keep",
        Mark::Set => "set",
        Mark::Clear => "clear",
    }
}

/// Which of `writes` are in the database: after an error that leaves open
/// whether a write landed (the connection broke after the COMMIT was sent),
/// the row tells, by the write's token. The result lists, per write in
/// order, the version it produced (`None`: not applied).
#[tracing::instrument(name = "written_transitions", skip(db, writes), fields(batch = writes.len()), err)]
pub async fn written_transitions<'e>(
    db: impl PgExecutor<'e>,
    writes: &[TransitionWrite],
) -> Result<Vec<Option<i64>>, sqlx::Error> {
    let ids: Vec<i64> = writes.iter().map(|w| w.id).collect();
    let tokens: Vec<Uuid> = writes.iter().map(|w| w.token).collect();
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        r#"
        SELECT i.n, r.version
        FROM unnest($1::int8[], $2::uuid[]) WITH ORDINALITY AS i(id, token, n)
        JOIN wfq.runs r ON r.id = i.id AND r.last_write = i.token
        "#,
    )
    .bind(ids)
    .bind(tokens)
    .fetch_all(db)
    .await?;
    let mut written = vec![None; writes.len()];
    for (n, version) in rows {
        if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| written.get_mut(i)) {
            *slot = Some(version);
        }
    }
    Ok(written)
}
