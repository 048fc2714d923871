//! Leases of runs whose steps are in flight: renewed together, one
//! statement per worker process, and given back when no step holds them.

use std::time::Duration;

use sqlx::PgExecutor;

/// Renews the leases of `ids` that `worker` still holds, to `lease` from
/// now (and their `due_at` with them: a leased run is due when its lease
/// ends). The version is left alone: renewing is not a step's write, and
/// the step's compare-and-set must still match. Rows locked right now (a
/// step writing its outcome, which renews or releases the lease itself)
/// are skipped rather than waited for: waiting could deadlock with a batch
/// of step writes that locks the same rows in another order. Returns the
/// ids renewed; a run missing from them was finished, given back, taken
/// over or skipped.
#[tracing::instrument(name = "renew_leases", skip(db, ids), fields(runs = ids.len()), err, level = "debug")]
pub async fn renew_leases<'e>(
    db: impl PgExecutor<'e>,
    worker: &str,
    ids: &[i64],
    lease: Duration,
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        WITH mine AS (
            SELECT id FROM wfq.runs
            WHERE id = ANY($2) AND lease_owner = $1
              AND state IN ('queued', 'submitting', 'running')
            FOR NO KEY UPDATE SKIP LOCKED
        )
        UPDATE wfq.runs r
        SET lease_expires_at = now() + make_interval(secs => $3),
            due_at = now() + make_interval(secs => $3)
        FROM mine
        WHERE r.id = mine.id
        RETURNING r.id
        "#,
    )
    .bind(worker)
    .bind(ids)
    .bind(lease.as_secs_f64())
    .fetch_all(db)
    .await
}

/// Gives back the leases `worker` holds on runs none of its steps is
/// working on (`in_flight` lists those that are), so that they are due at
/// once: after the worker was cut off from the database its steps left
/// their runs instead of calling the provider. Bumps the version (no step
/// of ours may write these runs any more), records `lease_released`, and
/// notifies `wfq_runs_due`.
#[tracing::instrument(name = "give_back_idle_leases", skip(db, in_flight), err)]
pub async fn give_back_idle_leases<'e>(
    db: impl PgExecutor<'e>,
    worker: &str,
    in_flight: &[i64],
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        WITH released AS (
            UPDATE wfq.runs
            SET lease_owner = NULL, lease_expires_at = NULL, due_at = now(),
                version = version + 1, updated_at = now()
            WHERE lease_owner = $1 AND state IN ('queued', 'submitting', 'running')
              AND id <> ALL($2)
            RETURNING id, state
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker, detail)
            SELECT id, 'lease_released', state, state, $1,
                   '{"reason": "no step of this worker was working on it"}'::jsonb
            FROM released
        ),
        notified AS (
            SELECT pg_notify('wfq_runs_due', '') FROM (SELECT 1 FROM released LIMIT 1) r
        )
        SELECT (SELECT count(*) FROM released) + 0 * (SELECT count(*) FROM notified)
        "#,
    )
    .bind(worker)
    .bind(in_flight)
    .fetch_one(db)
    .await
}
