//! Paused provider profiles, as operators see them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// A provider profile that a worker paused.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ProviderPause {
    /// The profile name.
    pub profile: String,
    /// Since when.
    pub paused_at: DateTime<Utc>,
    /// Which worker paused it (the latest one to do so).
    pub worker: String,
    /// Why: `key`, `balance`, `account`, `breaker` or `manual`.
    pub kind: String,
    /// The provider's refusal (or the operator's note).
    pub reason: String,
}

/// Records that `worker` paused `profile`.
#[tracing::instrument(name = "pause_provider", skip(pool), err)]
pub async fn pause_provider(
    pool: &PgPool,
    profile: &str,
    worker: &str,
    kind: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    // An operator's pause is theirs to lift: a worker's finding does not
    // replace it.
    sqlx::query(
        r#"
        INSERT INTO wfq.provider_pauses (profile, worker, kind, reason) VALUES ($1, $2, $3, $4)
        ON CONFLICT (profile) DO UPDATE
        SET worker = EXCLUDED.worker, kind = EXCLUDED.kind, reason = EXCLUDED.reason
        WHERE wfq.provider_pauses.kind <> 'manual'
        "#,
    )
    .bind(profile)
    .bind(worker)
    .bind(kind)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Clears the pause a worker recorded for `profile` (an operator's manual
/// pause stays).
#[tracing::instrument(name = "resume_provider", skip(pool), err)]
pub async fn resume_provider(pool: &PgPool, profile: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM wfq.provider_pauses WHERE profile = $1 AND kind <> 'manual'")
        .bind(profile)
        .execute(pool)
        .await?;
    Ok(())
}

/// Every paused profile.
pub async fn paused_providers(pool: &PgPool) -> Result<Vec<ProviderPause>, sqlx::Error> {
    sqlx::query_as(
        "SELECT profile, paused_at, worker, kind, reason FROM wfq.provider_pauses ORDER BY profile",
    )
    .fetch_all(pool)
    .await
}

/// The profiles an operator paused by hand (every worker stops submitting
/// for them), with the operator's note.
#[tracing::instrument(name = "manual_pauses", skip(pool), err, level = "debug")]
pub async fn manual_pauses(pool: &PgPool) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT profile, reason FROM wfq.provider_pauses WHERE kind = 'manual'")
        .fetch_all(pool)
        .await
}

/// Puts back in the queue the runs of `profile` that a refusal with `code`
/// failed in the last `window` and that froze nothing (never accepted): the
/// breaker found the refusal to be about the account. Their failure's
/// callback, if not yet delivered, is withdrawn (it is armed again when the
/// run ends). Returns the runs put back.
///
/// A run is put back at most once per code (see [`given_back_for`]): one
/// that was put back for `code` before and is refused with it again after
/// the profile resumed is refused for itself, and its failure stands.
#[tracing::instrument(name = "requeue_refused", skip(pool), err)]
pub async fn requeue_refused(
    pool: &PgPool,
    profile: &str,
    code: &str,
    window: std::time::Duration,
    reason: &str,
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        WITH back AS (
            UPDATE wfq.runs
            SET state = 'queued', error_code = NULL, error_message = NULL, error_detail = NULL,
                finished_at = NULL, settled_at = NULL, due_at = now(), submit_in_doubt_since = NULL,
                attempts = greatest(attempts - 1, 0), hold_reason = $4,
                callback_state = CASE WHEN callback_state = 'pending' THEN NULL ELSE callback_state END,
                callback_due_at = CASE WHEN callback_state = 'pending' THEN NULL ELSE callback_due_at END,
                version = version + 1, updated_at = now()
            WHERE provider = $1 AND state = 'failed' AND error_code = $2
              AND finished_at > now() - make_interval(secs => $3)
              AND provider_run_id IS NULL AND lease_owner IS NULL
              AND NOT EXISTS (
                  SELECT 1 FROM wfq.run_events e
                  WHERE e.run_id = wfq.runs.id AND e.kind IN ('breaker_requeued', 'account_refused')
                    AND e.detail->>'code' = $2)
            RETURNING id
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
            SELECT id, 'breaker_requeued', 'failed', 'queued',
                   jsonb_build_object('code', $2::text, 'reason', $4::text)
            FROM back
        )
        SELECT id FROM back
        "#,
    )
    .bind(profile)
    .bind(code)
    .bind(window.as_secs_f64())
    .bind(reason)
    .fetch_all(pool)
    .await
}

/// Whether run `id` was given back to the queue for a refusal with `code`
/// before: put back by the breaker (`breaker_requeued`), or refused alike
/// as the probe of a pause for that code (`account_refused`). Such a run,
/// refused with `code` again while its profile runs, is refused for itself
/// (its inputs, say), not for the account: it fails for good and does not
/// count toward the breaker, which would otherwise trip, requeue it and
/// resume for ever. Asked only when a submit is refused (rare), through
/// `run_events_run_idx`.
#[tracing::instrument(name = "given_back_for", skip(pool), err, level = "debug")]
pub async fn given_back_for(pool: &PgPool, id: i64, code: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        SELECT EXISTS (
            SELECT 1 FROM wfq.run_events
            WHERE run_id = $1 AND kind IN ('breaker_requeued', 'account_refused')
              AND detail->>'code' = $2)
        "#,
    )
    .bind(id)
    .bind(code)
    .fetch_one(pool)
    .await
}
