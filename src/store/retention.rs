//! Deleting old finished runs (and, by cascade, their events).

use std::time::Duration;

use sqlx::PgPool;

/// Deletes runs that finished more than `older_than` ago, `batch` rows per
/// statement so the queue is never blocked for long. Runs whose money is
/// not settled (`SUBMIT_RETRIES_EXHAUSTED`, `POLL_DEADLINE`) are kept: they
/// are the open questions of a billing dispute; so are runs whose callback
/// is still being delivered, and runs of a chain that a run not yet final
/// depends on (its outputs are that run's inputs). Returns how many were
/// deleted.
#[tracing::instrument(name = "prune_finished_runs", skip(pool), err)]
pub async fn prune_finished_runs(
    pool: &PgPool,
    older_than: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    loop {
        let done = sqlx::query(
            r#"
            DELETE FROM wfq.runs WHERE id IN (
                SELECT id FROM wfq.runs
                WHERE state IN ('succeeded', 'failed', 'canceled')
                  AND settled_at IS NOT NULL
                  AND callback_state IS DISTINCT FROM 'pending'
                  AND finished_at < now() - make_interval(secs => $1)
                  -- A run another one still waits for, or is about to
                  -- send, stays: its outputs are that run's inputs.
                  AND NOT EXISTS (
                      SELECT 1 FROM wfq.dependents_of(wfq.runs.id) d
                      WHERE d.state NOT IN ('succeeded', 'failed', 'canceled'))
                ORDER BY finished_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            "#,
        )
        .bind(older_than.as_secs_f64())
        .bind(batch)
        .execute(pool)
        .await?;
        deleted += done.rows_affected();
        if done.rows_affected() < batch.max(1) as u64 {
            return Ok(deleted);
        }
    }
}
