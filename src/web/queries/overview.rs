//! The live numbers: what is active now (partial indexes of active runs)
//! and what finished lately (a range of `runs_finished_idx`), never a
//! count over the history.

use sqlx::PgPool;

/// Runs finished per provider and final state in the last hour:
/// `(provider, state, runs)`.
#[tracing::instrument(name = "web_finished_last_hour", skip(pool), err, level = "debug")]
pub async fn finished_last_hour(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT provider, state, count(*)::int8
        FROM wfq.runs
        WHERE state IN ('succeeded', 'failed', 'canceled')
          AND finished_at >= now() - interval '1 hour'
        GROUP BY 1, 2 ORDER BY 1, 2
        "#,
    )
    .fetch_all(pool)
    .await
}

/// Runs finished in each of the last 60 minutes: `(minutes ago, runs)`,
/// 0 being the current minute; minutes without a run are left out.
#[tracing::instrument(name = "web_finished_per_minute", skip(pool), err, level = "debug")]
pub async fn finished_per_minute(pool: &PgPool) -> Result<Vec<(i32, i64)>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT (extract(epoch FROM date_trunc('minute', now()) - date_trunc('minute', finished_at)) / 60)::int4,
               count(*)::int8
        FROM wfq.runs
        WHERE state IN ('succeeded', 'failed', 'canceled')
          AND finished_at >= date_trunc('minute', now()) - interval '59 minutes'
        GROUP BY 1 ORDER BY 1
        "#,
    )
    .fetch_all(pool)
    .await
}

/// Queued runs a limit of their profile holds back, per provider and kind
/// of hold (the part of `hold_reason` before its colon):
/// `(provider, hold, runs)`. Read from `runs_held_idx`.
#[tracing::instrument(name = "web_held_runs", skip(pool), err, level = "debug")]
pub async fn held_runs(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT provider, split_part(hold_reason, ':', 1), count(*)::int8
        FROM wfq.runs
        WHERE state = 'queued' AND hold_reason IS NOT NULL
        GROUP BY 1, 2 ORDER BY 1, 2
        "#,
    )
    .fetch_all(pool)
    .await
}

/// Failures of one provider and error code: `(provider, code, runs,
/// latest message)`.
pub type ErrorCount = (String, String, i64, Option<String>);

/// Failures of the last hour per provider and error code, most frequent
/// first.
#[tracing::instrument(name = "web_recent_errors", skip(pool), err, level = "debug")]
pub async fn recent_errors(pool: &PgPool) -> Result<Vec<ErrorCount>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT provider, coalesce(error_code, '-'), count(*)::int8,
               left((array_agg(error_message ORDER BY finished_at DESC))[1], 200)
        FROM wfq.runs
        WHERE state IN ('succeeded', 'failed', 'canceled')
          AND finished_at >= now() - interval '1 hour'
          AND state = 'failed'
        GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2
        LIMIT 50
        "#,
    )
    .fetch_all(pool)
    .await
}

/// Queued runs per provider that were due over 10 s ago and are still not
/// taken: the profile is held back (its rate, its submit slots, the
/// workers' capacity). Read from the partial indexes of active runs.
#[tracing::instrument(name = "web_overdue_runs", skip(pool), err, level = "debug")]
pub async fn overdue_runs(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT provider, count(*)::int8
        FROM wfq.runs
        WHERE state IN ('queued', 'submitting', 'running')
          AND state = 'queued' AND lease_owner IS NULL AND hold_reason IS NULL
          AND due_at < now() - interval '10 seconds'
        GROUP BY 1 ORDER BY 1
        "#,
    )
    .fetch_all(pool)
    .await
}
