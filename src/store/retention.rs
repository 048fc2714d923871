//! Deleting old finished runs (and, by cascade, their events).

use std::time::Duration;

use sqlx::PgPool;

/// Deletes runs that finished more than `older_than` ago, `batch` rows per
/// statement so the queue is never blocked for long. Runs whose money is
/// not settled (`SUBMIT_RETRIES_EXHAUSTED`, `POLL_DEADLINE`) are kept: they
/// are the open questions of a billing dispute; so are runs whose callback
/// is still being delivered. So are runs whose files are not done with:
/// a file still in the store (`run_files.stored_location`), which must be
/// deleted first (`wfq prune` with `[storage]`) or the cascade would lose
/// the only record of it, or an output copy still in progress. The
/// database enforces "files first, then rows", whatever pass or process
/// ran before, and a prune that kept them can simply run again. Runs of
/// a chain that a run not yet final depends on stay too (their outputs
/// are that run's inputs). Returns how many were deleted.
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
                  -- Files first, then rows (see above).
                  AND NOT EXISTS (
                      SELECT 1 FROM wfq.run_files f
                      WHERE f.run_id = wfq.runs.id
                        AND (f.stored_location IS NOT NULL
                             OR (f.direction = 'output' AND f.state = 'pending')))
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

/// How many runs `prune_finished_runs` would delete but keeps for their
/// files (in the store, or an output copy in progress): what `wfq prune`
/// without `[storage]` must warn about.
#[tracing::instrument(name = "runs_kept_for_their_files", skip(pool), err)]
pub async fn runs_kept_for_their_files(
    pool: &PgPool,
    older_than: Duration,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        SELECT count(*) FROM wfq.runs r
        WHERE r.state IN ('succeeded', 'failed', 'canceled')
          AND r.settled_at IS NOT NULL
          AND r.callback_state IS DISTINCT FROM 'pending'
          AND r.finished_at < now() - make_interval(secs => $1)
          AND EXISTS (
              SELECT 1 FROM wfq.run_files f
              WHERE f.run_id = r.id
                AND (f.stored_location IS NOT NULL
                     OR (f.direction = 'output' AND f.state = 'pending')))
        "#,
    )
    .bind(older_than.as_secs_f64())
    .fetch_one(pool)
    .await
}
