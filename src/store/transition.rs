//! Writing one step's [`Transition`] and its event in a single statement.

use std::time::Duration;

use sqlx::PgExecutor;

use crate::lifecycle::{RunState, SubmitDoubt, Transition};

/// Applies `t` to run `id` if this worker still holds it at `version`
/// (compare-and-set), and appends the event in the same statement.
///
/// Returns the new version, or `None` when the row moved on without us
/// (canceled, or the lease expired and another worker took it): the caller
/// then stops handling the run.
#[tracing::instrument(name = "apply_transition", skip(pool, t), fields(to = %t.to, event = t.event.kind), err)]
pub async fn apply_transition<'e>(
    pool: impl PgExecutor<'e>,
    id: i64,
    version: i64,
    from: RunState,
    worker: &str,
    lease: Duration,
    t: &Transition,
) -> Result<Option<i64>, sqlx::Error> {
    let f = &t.facts;
    let error = t.error.as_ref();
    sqlx::query_scalar(
        r#"
        WITH updated AS (
            UPDATE wfq.runs SET
                state = $3,
                version = version + 1,
                updated_at = now(),
                attempts = attempts + $4,
                polls = polls + $5,
                due_at = COALESCE($6, due_at),
                lease_owner = CASE WHEN $7 THEN lease_owner END,
                lease_expires_at = CASE WHEN $7 THEN now() + make_interval(secs => $8) END,
                submitted_at = CASE WHEN $9 THEN COALESCE(submitted_at, now()) ELSE submitted_at END,
                finished_at = CASE WHEN $3 IN ('succeeded', 'failed', 'canceled') THEN now() ELSE finished_at END,
                settled_at = CASE WHEN $10 THEN COALESCE(settled_at, now()) ELSE settled_at END,
                revision_id = COALESCE(revision_id, $11, $12),
                sent_inputs = COALESCE($13, sent_inputs),
                provider_run_id = COALESCE($14, provider_run_id),
                task_id = COALESCE($15, task_id),
                prompt_id = COALESCE($16, prompt_id),
                billing_run_id = COALESCE($17, billing_run_id),
                run_status = COALESCE($18, run_status),
                freeze_status = COALESCE($19, freeze_status),
                submission_status = COALESCE($20, submission_status),
                settlement_status = COALESCE($21, settlement_status),
                outputs = COALESCE($22, outputs),
                currency = COALESCE($23, currency),
                quote_amount = COALESCE($24, quote_amount),
                frozen_amount = COALESCE($25, frozen_amount),
                final_amount = COALESCE($26, final_amount),
                released_amount = COALESCE($27, released_amount),
                compute_cost = COALESCE($28, compute_cost),
                external_model_cost = COALESCE($29, external_model_cost),
                total_cost = COALESCE($30, total_cost),
                error_code = COALESCE($31, error_code),
                error_message = COALESCE($32, error_message),
                error_detail = COALESCE($33, error_detail),
                total_tokens = COALESCE($38, total_tokens),
                hold_reason = CASE WHEN $3 = 'queued' THEN hold_reason END,
                submit_in_doubt_since = CASE $39
                    WHEN 'set' THEN now()
                    WHEN 'clear' THEN NULL
                    ELSE submit_in_doubt_since END
            WHERE id = $1 AND version = $2 AND lease_owner = $34
            RETURNING id, version, state
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker, detail)
            SELECT id, $35, $36, state, $34, $37 FROM updated
        )
        SELECT version FROM updated
        "#,
    )
    .bind(id)
    .bind(version)
    .bind(t.to.as_str())
    .bind(t.attempts_delta)
    .bind(i32::from(t.counts_poll))
    .bind(t.due_at)
    .bind(t.keep_lease)
    .bind(lease.as_secs_f64())
    .bind(t.submitted)
    .bind(t.settled)
    .bind(&t.pin_revision)
    .bind(&f.revision_id)
    .bind(&t.sent_inputs)
    .bind(&f.provider_run_id)
    .bind(&f.task_id)
    .bind(&f.prompt_id)
    .bind(&f.billing_run_id)
    .bind(&f.run_status)
    .bind(&f.freeze_status)
    .bind(&f.submission_status)
    .bind(&f.settlement_status)
    .bind(&f.outputs)
    .bind(&f.currency)
    .bind(f.quote_amount)
    .bind(f.frozen_amount)
    .bind(f.final_amount)
    .bind(f.released_amount)
    .bind(f.compute_cost)
    .bind(f.external_model_cost)
    .bind(f.total_cost)
    .bind(error.map(|e| e.code.as_str()))
    .bind(error.map(|e| e.message.as_str()))
    .bind(error.and_then(|e| e.detail.as_ref()))
    .bind(worker)
    .bind(t.event.kind)
    .bind(from.as_str())
    .bind(&t.event.detail)
    .bind(f.total_tokens)
    .bind(match t.doubt {
        SubmitDoubt::Keep => "keep",
        SubmitDoubt::Set => "set",
        SubmitDoubt::Clear => "clear",
    })
    .fetch_optional(pool)
    .await
}
