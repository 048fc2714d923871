//! Completion callbacks: claiming due deliveries with a lease (per receiver,
//! so a busy one can be left out), and recording attempts with their
//! decisions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::read::{RunRow, run_columns};

/// A callback this worker holds a lease on: the run as it is sent, where to.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedCallback {
    /// The run, exactly as the body serializes it.
    #[sqlx(flatten)]
    pub run: RunRow,
    /// Where to POST it (may carry credentials: never log it whole).
    pub callback_url: String,
    /// Attempts made before this one.
    pub callback_attempts: i32,
    /// The receiver: the URL's scheme, host and port, lowercase, without
    /// user info or a default port (`https://hooks.example.com`). The claim
    /// computes it, so the names it is handed back as busy match it exactly.
    pub receiver: String,
}

/// The receiver of `callback_url`, in SQL. The column constraint
/// `runs_callback_url_http` guarantees `scheme://authority`; the user info
/// ends at the authority's last `@`.
macro_rules! receiver_of_callback_url {
    () => {
        r#"COALESCE(regexp_replace(
            lower(regexp_replace(callback_url, '^([a-z]+://)(?:[^/?#]*@)?([^/?#]*).*$', '\1\2', 'i')),
            '^(http://.*):80$|^(https://.*):443$', '\1\2'), '')"#
    };
}

/// Leases up to `limit` due callbacks of final runs for `worker`, oldest due
/// first, leaving out those of the receivers in `busy` (which have their
/// share of this worker's slots already). `SKIP LOCKED` keeps concurrent
/// workers out of each other's way; the lease keeps a callback theirs while
/// the POST is in flight and until it is recorded, so no two workers deliver
/// one callback at once. `NO KEY UPDATE` (rather than `UPDATE`) does not
/// block inserts of events that reference the run.
#[tracing::instrument(name = "claim_due_callbacks", skip(pool), err, level = "debug")]
pub async fn claim_due_callbacks(
    pool: &PgPool,
    worker: &str,
    limit: usize,
    lease: Duration,
    busy: &[String],
) -> Result<Vec<ClaimedCallback>, sqlx::Error> {
    sqlx::query_as(concat!(
        r#"
        WITH due AS (
            SELECT id AS due_id
            FROM wfq.runs
            WHERE callback_state = 'pending'
              AND callback_due_at <= now()
              AND (callback_lease_expires_at IS NULL OR callback_lease_expires_at <= now())
              AND state IN ('succeeded', 'failed', 'canceled')
              AND "#,
        receiver_of_callback_url!(),
        r#" <> ALL($4::text[])
            ORDER BY callback_due_at, id
            LIMIT $2
            FOR NO KEY UPDATE SKIP LOCKED
        )
        UPDATE wfq.runs r
        SET callback_lease_owner = $1,
            callback_lease_expires_at = now() + make_interval(secs => $3)
        FROM due
        WHERE r.id = due.due_id
        RETURNING "#,
        receiver_of_callback_url!(),
        r#" AS receiver, callback_url, callback_attempts, "#,
        run_columns!()
    ))
    .bind(worker)
    .bind(limit as i64)
    .bind(lease.as_secs_f64())
    .bind(busy)
    .fetch_all(pool)
    .await
}

/// One attempt and what was decided after it.
#[derive(Debug, Clone)]
pub struct CallbackAttempt {
    /// The run.
    pub run_id: i64,
    /// 1 for the first attempt.
    pub attempt: i32,
    /// When the request was sent.
    pub started_at: DateTime<Utc>,
    /// How long until the answer (or the error).
    pub duration_ms: i32,
    /// The receiver's status, when it answered.
    pub http_status: Option<i32>,
    /// Why no answer arrived (never contains the URL).
    pub error: Option<String>,
    /// `delivered`, `retry`, `exhausted`, `gone` or `invalid_url`.
    pub result: &'static str,
    /// The callback's state after it: `pending`, `delivered` or `failed`.
    pub state: &'static str,
    /// When the next attempt is due (`retry` only).
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Records attempts (those that ended together) in one statement: each becomes a row of
/// `wfq.callback_attempts`, and each callback still leased by `worker` at
/// the expected attempt count moves on (compare-and-set); a callback that
/// ends (delivered or failed) also gets one `wfq.run_events` entry. Returns
/// the ids whose state was written; the others had lost their lease (or the
/// run was finished again and re-armed) and are left as they are.
#[tracing::instrument(name = "record_callback_attempts", skip(pool, attempts), fields(n = attempts.len()), err)]
pub async fn record_callback_attempts(
    pool: &PgPool,
    worker: &str,
    attempts: &[CallbackAttempt],
) -> Result<Vec<i64>, sqlx::Error> {
    let col = |f: fn(&CallbackAttempt) -> i32| attempts.iter().map(f).collect::<Vec<_>>();
    sqlx::query_scalar(
        r#"
        WITH d AS (
            SELECT * FROM unnest($2::bigint[], $3::int[], $4::timestamptz[], $5::int[], $6::int[],
                                 $7::text[], $8::text[], $9::text[], $10::timestamptz[])
                AS d(run_id, attempt, started_at, duration_ms, http_status, error, result,
                     state, next_attempt_at)
        ),
        updated AS (
            UPDATE wfq.runs r SET
                callback_state = d.state,
                callback_attempts = d.attempt,
                callback_due_at = d.next_attempt_at,
                callback_lease_owner = NULL,
                callback_lease_expires_at = NULL,
                callback_finished_at = CASE WHEN d.state <> 'pending' THEN now() END
            FROM d
            WHERE r.id = d.run_id AND r.callback_state = 'pending'
              AND r.callback_lease_owner = $1 AND r.callback_attempts = d.attempt - 1
            RETURNING r.id, r.state AS run_state, d.*
        ),
        logged AS (
            INSERT INTO wfq.callback_attempts (run_id, attempt, worker, started_at, duration_ms,
                                               http_status, error, result, next_attempt_at)
            SELECT d.run_id, d.attempt, $1, d.started_at, d.duration_ms, d.http_status, d.error,
                   d.result, d.next_attempt_at
            FROM d WHERE EXISTS (SELECT 1 FROM wfq.runs r WHERE r.id = d.run_id)
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker, detail)
            SELECT id, 'callback_' || state, run_state, run_state, $1,
                   jsonb_build_object('attempts', attempt, 'result', result,
                                      'http_status', http_status, 'error', error)
            FROM updated WHERE state <> 'pending'
        )
        SELECT id FROM updated
        "#,
    )
    .bind(worker)
    .bind(attempts.iter().map(|a| a.run_id).collect::<Vec<_>>())
    .bind(col(|a| a.attempt))
    .bind(attempts.iter().map(|a| a.started_at).collect::<Vec<_>>())
    .bind(col(|a| a.duration_ms))
    .bind(attempts.iter().map(|a| a.http_status).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.error.clone()).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.result).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.state).collect::<Vec<_>>())
    .bind(
        attempts
            .iter()
            .map(|a| a.next_attempt_at)
            .collect::<Vec<_>>(),
    )
    .fetch_all(pool)
    .await
}

/// How many callbacks wait for delivery (to warn a worker without `[callbacks]`).
#[tracing::instrument(name = "pending_callbacks", skip(pool), err, level = "debug")]
pub async fn pending_callbacks(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE callback_state = 'pending'")
        .fetch_one(pool)
        .await
}
