//! The worker registry (`wfq.workers`): registering with a session advisory
//! lock, the heartbeat, finding workers whose session is gone and making
//! their runs due, and the fleet as operators see it (`wfq.workers_live`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor, PgPool};

/// The first key of every worker's liveness lock,
/// `pg_advisory_lock(LIVENESS_LOCK_NAMESPACE, lock_id)` (the two-key form,
/// so it cannot meet the spend guard's one-key hashes). The view
/// `wfq.workers_live` spells the same number.
pub const LIVENESS_LOCK_NAMESPACE: i32 = 0x7766_7101;

/// A worker process as it registers.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// `worker.id`, its `lease_owner` name.
    pub id: String,
    /// The machine.
    pub host: String,
    /// The process id.
    pub pid: i32,
    /// The wfq version.
    pub version: String,
    /// When the process started.
    pub started_at: DateTime<Utc>,
    /// The provider profiles it serves.
    pub profiles: Vec<String>,
    /// `worker.concurrency`.
    pub concurrency: i32,
}

/// The TCP keepalive settings of the liveness session, set on the server's
/// side of the connection: they decide how soon PostgreSQL drops the
/// session (and the lock) of a machine that fell off the network.
#[derive(Debug, Clone, Copy)]
pub struct SessionKeepalives {
    /// Idle time before the first probe (`tcp_keepalives_idle`).
    pub idle: Duration,
    /// Between probes (`tcp_keepalives_interval`).
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (`tcp_keepalives_count`).
    pub count: u32,
    /// How long sent data may stay unacknowledged (`tcp_user_timeout`).
    pub user_timeout: Duration,
    /// How long taking the lock may wait (`lock_timeout`): a lock held by a
    /// session of the same worker id that PostgreSQL has not dropped yet.
    pub lock_wait: Duration,
}

/// Sets `settings` on this session; settings the server does not know
/// (`tcp_user_timeout` before PostgreSQL 12) are left out. Over a Unix
/// socket the TCP ones have no effect, which is fine: a local client that
/// dies closes its socket at once.
#[tracing::instrument(name = "configure_liveness_session", skip_all, err)]
pub async fn configure_liveness_session(
    conn: &mut PgConnection,
    settings: &SessionKeepalives,
) -> Result<(), sqlx::Error> {
    let names = [
        "tcp_keepalives_idle",
        "tcp_keepalives_interval",
        "tcp_keepalives_count",
        "tcp_user_timeout",
        "lock_timeout",
    ];
    let values = [
        settings.idle.as_secs().max(1).to_string(),
        settings.interval.as_secs().max(1).to_string(),
        settings.count.max(1).to_string(),
        settings.user_timeout.as_millis().to_string(),
        format!("{}ms", settings.lock_wait.as_millis().max(1)),
    ];
    sqlx::query(
        r#"
        SELECT count(set_config(v.name, v.value, false))
        FROM unnest($1::text[], $2::text[]) AS v(name, value)
        WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_settings s WHERE s.name = v.name)
        "#,
    )
    .bind(&names[..])
    .bind(&values[..])
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes worker `id`'s liveness lock on this session, waiting up to the
/// session's `lock_timeout` (a `55P03` error after that: another live
/// session holds it). Reuses the lock id the worker was registered with, or
/// draws a new one. Returns the lock id.
#[tracing::instrument(name = "lock_worker", skip(conn), err)]
pub async fn lock_worker(conn: &mut PgConnection, id: &str) -> Result<i32, sqlx::Error> {
    let (lock_id, _): (i32, String) = sqlx::query_as(
        r#"
        SELECT l.lock_id, pg_advisory_lock($2, l.lock_id)::text
        FROM (SELECT COALESCE((SELECT w.lock_id FROM wfq.workers w WHERE w.id = $1),
                              nextval('wfq.worker_lock_ids')::integer) AS lock_id) l
        "#,
    )
    .bind(id)
    .bind(LIVENESS_LOCK_NAMESPACE)
    .fetch_one(conn)
    .await?;
    Ok(lock_id)
}

/// Lets go of a liveness lock this session holds.
#[tracing::instrument(name = "unlock_worker", skip(conn), err)]
pub async fn unlock_worker(conn: &mut PgConnection, lock_id: i32) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(LIVENESS_LOCK_NAMESPACE)
        .bind(lock_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Writes the worker's row, alive (`died_at` cleared), with `lock_id`
/// (`None`: no session liveness). `false` when the row names another lock
/// id: a second registration of the same `worker.id` got there first.
#[tracing::instrument(name = "upsert_worker", skip(db, info), fields(id = %info.id), err)]
pub async fn upsert_worker<'e>(
    db: impl PgExecutor<'e>,
    info: &WorkerInfo,
    lock_id: Option<i32>,
) -> Result<bool, sqlx::Error> {
    let written: Option<String> = sqlx::query_scalar(
        r#"
        INSERT INTO wfq.workers AS w
            (id, host, pid, version, started_at, last_seen, profiles, concurrency, lock_id)
        VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8)
        ON CONFLICT (id) DO UPDATE SET
            host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version,
            started_at = EXCLUDED.started_at, last_seen = now(), profiles = EXCLUDED.profiles,
            concurrency = EXCLUDED.concurrency, lock_id = EXCLUDED.lock_id,
            died_at = NULL, died_cause = NULL
        WHERE w.lock_id IS NULL OR EXCLUDED.lock_id IS NULL OR w.lock_id = EXCLUDED.lock_id
        RETURNING w.id
        "#,
    )
    .bind(&info.id)
    .bind(&info.host)
    .bind(info.pid)
    .bind(&info.version)
    .bind(info.started_at)
    .bind(&info.profiles)
    .bind(info.concurrency)
    .bind(lock_id)
    .fetch_optional(db)
    .await?;
    Ok(written.is_some())
}

/// The heartbeat: `last_seen = now()`, skipped (not waited for) while
/// someone else holds the row locked. Returns the backend pid that answered
/// (a liveness session is always answered by the same one) and whether the
/// row still exists (an operator may have deleted it).
#[tracing::instrument(name = "worker_heartbeat", skip(db), err, level = "debug")]
pub async fn worker_heartbeat<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
) -> Result<(i32, bool), sqlx::Error> {
    sqlx::query_as(
        r#"
        WITH beat AS (
            UPDATE wfq.workers w SET last_seen = now()
            WHERE w.id = (SELECT l.id FROM wfq.workers l WHERE l.id = $1
                          FOR NO KEY UPDATE SKIP LOCKED)
            RETURNING w.id
        )
        SELECT pg_backend_pid(),
               EXISTS (SELECT 1 FROM beat) OR EXISTS (SELECT 1 FROM wfq.workers WHERE id = $1)
        "#,
    )
    .bind(id)
    .fetch_one(db)
    .await
}

/// Marks the worker as shut down (graceful stop).
#[tracing::instrument(name = "worker_stopped", skip(db), err)]
pub async fn worker_stopped<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE wfq.workers SET died_at = now(), died_cause = 'stopped', last_seen = now() WHERE id = $1",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// One registered worker as a rescuer found it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WorkerProbe {
    /// Its id.
    pub id: String,
    /// Already marked dead (and looked at again because it may still hold
    /// leases: a claim or write of its that committed after its death).
    pub marked_dead: bool,
    /// Its liveness lock was free: no session of it is alive.
    pub gone: bool,
}

/// Looks at every other registered worker with a liveness lock that is
/// alive, or died within `lease` and still holds unexpired leases, and tries
/// its lock for the length of this statement only. Cheap when all is well:
/// one pass over the small registry and a failed try per live worker.
#[tracing::instrument(name = "probe_workers", skip(pool), err, level = "debug")]
pub async fn probe_workers(
    pool: &PgPool,
    me: &str,
    lease: Duration,
) -> Result<Vec<WorkerProbe>, sqlx::Error> {
    // MATERIALIZED: the lock function must run on exactly these rows, never
    // on this worker's own (a session holding a lock gets it again).
    sqlx::query_as(
        r#"
        WITH candidates AS MATERIALIZED (
            SELECT w.id, w.lock_id, w.died_at IS NOT NULL AS marked_dead
            FROM wfq.workers w
            WHERE w.lock_id IS NOT NULL AND w.id <> $1
              AND (w.died_at IS NULL
                   OR (w.died_at > now() - make_interval(secs => $3)
                       AND EXISTS (SELECT 1 FROM wfq.runs r
                                   WHERE r.lease_owner = w.id
                                     AND r.state IN ('queued', 'submitting', 'running')
                                     AND r.lease_expires_at > now())))
        )
        SELECT c.id, c.marked_dead, pg_try_advisory_xact_lock($2, c.lock_id) AS gone
        FROM candidates c
        "#,
    )
    .bind(me)
    .bind(LIVENESS_LOCK_NAMESPACE)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// What [`rescue_workers`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rescued {
    /// Workers newly marked dead.
    pub died: Vec<String>,
    /// Runs whose leases were ended now.
    pub runs: i64,
    /// Runs with a submit in flight whose leases were shortened to the
    /// grace instead (see [`RescuePolicy::submit_grace`]).
    pub deferred: i64,
}

/// How [`rescue_workers`] hands on the runs of a worker that is gone.
#[derive(Debug, Clone, Copy)]
pub struct RescuePolicy<'a> {
    /// Profiles whose provider replays a submit sent again with its key
    /// (chenyu): their runs are taken over at once whatever their state.
    pub replaying_profiles: &'a [String],
    /// How long a run of any other profile with a submit in flight
    /// (`submitting` with `submit_in_doubt_since`) stays with its owner
    /// from the rescue on (never longer than its lease): a worker whose
    /// liveness session was cut while it is alive must be able to record
    /// an answer it is receiving; the next worker could only look for the
    /// run (Dify) or fail it `SUBMIT_OUTCOME_UNKNOWN` (GPTBots).
    pub submit_grace: Duration,
}

/// For each of `ids` whose liveness lock is (still) free, taken for this
/// statement: marks it dead (`crash`) unless it is already, and ends the
/// leases of its active runs (`lease_expires_at = due_at = now()`), so the
/// next claim takes them (recorded there as `lease_rescued`, cause
/// `crash`); then `NOTIFY wfq_runs_due`. A run with a submit in flight is
/// left to its owner for `policy.submit_grace` instead (unless its profile
/// replays keys); a later round leaves it as it is. A worker coming back
/// waits on its own lock until this commits, then clears `died_at`.
#[tracing::instrument(name = "rescue_workers", skip(pool, policy), err)]
pub async fn rescue_workers(
    pool: &PgPool,
    me: &str,
    ids: &[String],
    policy: RescuePolicy<'_>,
) -> Result<Rescued, sqlx::Error> {
    let (died, runs, deferred, _): (Option<Vec<String>>, i64, i64, i64) = sqlx::query_as(
        r#"
        WITH targets AS MATERIALIZED (
            SELECT w.id, w.lock_id, w.died_at IS NULL AS alive_before
            FROM wfq.workers w
            WHERE w.id = ANY($2) AND w.id <> $1 AND w.lock_id IS NOT NULL
        ),
        gone AS MATERIALIZED (
            SELECT t.id, t.alive_before FROM targets t
            WHERE pg_try_advisory_xact_lock($3, t.lock_id)
        ),
        marked AS (
            UPDATE wfq.workers w SET died_at = now(), died_cause = 'crash'
            FROM gone g
            WHERE w.id = g.id AND g.alive_before AND w.died_at IS NULL
            RETURNING w.id
        ),
        -- `in flight` below is one condition, spelled three times: a submit
        -- recorded as about to be sent, of a profile that cannot replay it.
        -- Such a run's lease ends at the grace's end (or its own, if
        -- sooner), every other run's now; a run whose lease ends by the
        -- grace's end already is left alone, so later rounds change nothing.
        expired AS (
            UPDATE wfq.runs r
            SET lease_expires_at = CASE
                    WHEN r.state = 'submitting' AND r.submit_in_doubt_since IS NOT NULL
                         AND r.provider <> ALL($4::text[])
                    THEN LEAST(r.lease_expires_at, now() + make_interval(secs => $5))
                    ELSE now() END,
                due_at = CASE
                    WHEN r.state = 'submitting' AND r.submit_in_doubt_since IS NOT NULL
                         AND r.provider <> ALL($4::text[])
                    THEN LEAST(r.lease_expires_at, now() + make_interval(secs => $5))
                    ELSE now() END
            WHERE r.lease_owner = ANY (ARRAY(SELECT g.id FROM gone g))
              AND r.state IN ('queued', 'submitting', 'running')
              AND r.lease_expires_at > now()
              AND NOT (r.state = 'submitting' AND r.submit_in_doubt_since IS NOT NULL
                       AND r.provider <> ALL($4::text[])
                       AND r.lease_expires_at <= now() + make_interval(secs => $5))
            RETURNING r.id, r.lease_expires_at > now() AS deferred
        ),
        notified AS (
            SELECT pg_notify('wfq_runs_due', '')
            FROM (SELECT 1 FROM expired WHERE NOT deferred LIMIT 1) e
        )
        SELECT (SELECT array_agg(m.id ORDER BY m.id) FROM marked m),
               (SELECT count(*) FROM expired WHERE NOT deferred),
               (SELECT count(*) FROM expired WHERE deferred),
               (SELECT count(*) FROM notified)
        "#,
    )
    .bind(me)
    .bind(ids)
    .bind(LIVENESS_LOCK_NAMESPACE)
    .bind(policy.replaying_profiles)
    .bind(policy.submit_grace.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(Rescued {
        died: died.unwrap_or_default(),
        runs,
        deferred,
    })
}

/// Deletes the rows of workers dead for longer than `older_than`.
#[tracing::instrument(name = "forget_dead_workers", skip(pool), err, level = "debug")]
pub async fn forget_dead_workers(pool: &PgPool, older_than: Duration) -> Result<u64, sqlx::Error> {
    let done =
        sqlx::query("DELETE FROM wfq.workers WHERE died_at < now() - make_interval(secs => $1)")
            .bind(older_than.as_secs_f64())
            .execute(pool)
            .await?;
    Ok(done.rows_affected())
}

/// A worker as `wfq workers` shows it (a row of `wfq.workers_live`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct WorkerRow {
    /// Its id (`lease_owner`).
    pub id: String,
    /// Its session holds its liveness lock; `None` without session liveness.
    pub alive: Option<bool>,
    /// Active runs whose `lease_owner` it is.
    pub runs_in_hand: i64,
    /// Its last heartbeat.
    pub last_seen: DateTime<Utc>,
    /// The machine.
    pub host: String,
    /// The process id.
    pub pid: i32,
    /// The wfq version.
    pub version: String,
    /// Provider profiles it serves.
    pub profiles: Vec<String>,
    /// `worker.concurrency`.
    pub concurrency: i32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it was found dead or stopped.
    pub died_at: Option<DateTime<Utc>>,
    /// `crash` or `stopped`.
    pub died_cause: Option<String>,
}

/// Every registered worker: live ones first, then by start, newest first.
#[tracing::instrument(name = "list_workers", skip(pool), err)]
pub async fn list_workers(pool: &PgPool) -> Result<Vec<WorkerRow>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT id, alive, runs_in_hand, last_seen, host, pid, version, profiles, concurrency,
               started_at, died_at, died_cause
        FROM wfq.workers_live
        ORDER BY died_at IS NOT NULL, started_at DESC, id
        "#,
    )
    .fetch_all(pool)
    .await
}
