//! `wfq.run_files`: input uploads and output mirrors, each a durable step.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

/// One row of `wfq.run_files`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunFileRow {
    /// Row id.
    pub id: i64,
    /// The run.
    pub run_id: i64,
    /// `input` or `output`.
    pub direction: String,
    /// The inputs or outputs key.
    pub key: String,
    /// Index within a list output.
    pub position: i32,
    /// The provider profile.
    pub profile: String,
    /// Where it came from.
    pub source: Option<String>,
    /// SHA-256, lowercase hex.
    pub sha256: Option<String>,
    /// Size.
    pub bytes: Option<i64>,
    /// Content type.
    pub content_type: Option<String>,
    /// What the provider calls it.
    pub provider_file_id: Option<String>,
    /// Until when the provider keeps it.
    pub provider_expires_at: Option<DateTime<Utc>>,
    /// Where wfq keeps it.
    pub stored_location: Option<String>,
    /// See the table's comment.
    pub state: String,
    /// Attempts so far.
    pub attempts: i32,
    /// Next attempt.
    pub due_at: DateTime<Utc>,
    /// Why it failed.
    pub error_code: Option<String>,
    /// Details.
    pub error: Option<String>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

const FILE_COLUMNS: &str = "id, run_id, direction, key, position, profile, source, sha256, bytes, \
    content_type, provider_file_id, provider_expires_at, stored_location, state, attempts, due_at, \
    error_code, error, updated_at";

/// Every file of a run, inputs first.
#[tracing::instrument(name = "run_files", skip(pool), err, level = "debug")]
pub async fn run_files(pool: &PgPool, run_id: i64) -> Result<Vec<RunFileRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {FILE_COLUMNS} FROM wfq.run_files WHERE run_id = $1 ORDER BY direction, key, position"
    )))
    .bind(run_id)
    .fetch_all(pool)
    .await
}

// ---------------------------------------------------------------- outputs

/// A succeeded run whose outputs have not been looked at.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnplannedRun {
    /// The run.
    pub id: i64,
    /// Its profile.
    pub provider: String,
    /// Its outputs.
    pub outputs: Option<Value>,
}

/// Succeeded runs (finished within `lookback`) with `media_state` NULL,
/// oldest first, skipping those another worker is planning.
#[tracing::instrument(name = "unplanned_runs", skip(tx), err, level = "debug")]
pub async fn unplanned_runs(
    tx: &mut sqlx::PgConnection,
    lookback: Duration,
    limit: i64,
) -> Result<Vec<UnplannedRun>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT id, provider, outputs FROM wfq.runs
        WHERE state = 'succeeded' AND media_state IS NULL
          AND finished_at > now() - make_interval(secs => $1)
        ORDER BY finished_at
        LIMIT $2
        FOR NO KEY UPDATE SKIP LOCKED
        "#,
    )
    .bind(lookback.as_secs_f64())
    .bind(limit)
    .fetch_all(tx)
    .await
}

/// One output file to copy.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedFile {
    /// The run.
    pub run_id: i64,
    /// The outputs key.
    pub key: String,
    /// Index within a list.
    pub position: i32,
    /// Where it sits in the outputs.
    pub json_path: Vec<String>,
    /// The run's profile.
    pub profile: String,
    /// The provider's URL.
    pub source: String,
}

/// Records the plan of a batch in one statement: the file rows, and each
/// run's `media_state` (`pending` with files, `none` without).
#[tracing::instrument(name = "record_plan", skip(tx, files, runs), fields(files = files.len(), runs = runs.len()), err)]
pub async fn record_plan(
    tx: &mut sqlx::PgConnection,
    files: &[PlannedFile],
    runs: &[(i64, &'static str)],
) -> Result<(), sqlx::Error> {
    let paths: Vec<Value> = files
        .iter()
        .map(|f| Value::from(f.json_path.clone()))
        .collect();
    sqlx::query(
        r#"
        WITH files AS (
            INSERT INTO wfq.run_files (run_id, direction, key, position, json_path, profile, source)
            SELECT f.run_id, 'output', f.key, f.position,
                   ARRAY(SELECT jsonb_array_elements_text(f.path)), f.profile, f.source
            FROM unnest($1::bigint[], $2::text[], $3::int[], $4::jsonb[], $5::text[], $6::text[])
                 AS f(run_id, key, position, path, profile, source)
            ON CONFLICT (run_id, direction, key, position) DO NOTHING
        )
        UPDATE wfq.runs r SET media_state = p.state
        FROM unnest($7::bigint[], $8::text[]) AS p(id, state)
        WHERE r.id = p.id AND r.media_state IS NULL
        "#,
    )
    .bind(files.iter().map(|f| f.run_id).collect::<Vec<_>>())
    .bind(files.iter().map(|f| f.key.clone()).collect::<Vec<_>>())
    .bind(files.iter().map(|f| f.position).collect::<Vec<_>>())
    .bind(paths)
    .bind(files.iter().map(|f| f.profile.clone()).collect::<Vec<_>>())
    .bind(files.iter().map(|f| f.source.clone()).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.0).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.1.to_owned()).collect::<Vec<_>>())
    .execute(tx)
    .await?;
    Ok(())
}

/// An output copy this worker holds a lease on.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedMirror {
    /// Row id.
    pub id: i64,
    /// The run.
    pub run_id: i64,
    /// The outputs key.
    pub key: String,
    /// Index within a list.
    pub position: i32,
    /// The provider's URL.
    pub source: Option<String>,
    /// Attempts before this one.
    pub attempts: i32,
    /// Where it sits in the outputs (`[key]`, `[key, n]`, `[key, "url"]`).
    pub json_path: Vec<String>,
    /// The run's provider profile.
    pub profile: String,
    /// The run's workflow (its output manifest says what is media).
    pub workflow_id: String,
}

/// Leases up to `limit` due output copies, oldest due first.
#[tracing::instrument(name = "claim_due_mirrors", skip(pool), err, level = "debug")]
pub async fn claim_due_mirrors(
    pool: &PgPool,
    worker: &str,
    limit: i64,
    lease: Duration,
) -> Result<Vec<ClaimedMirror>, sqlx::Error> {
    sqlx::query_as(
        r#"
        WITH due AS (
            SELECT id FROM wfq.run_files
            WHERE direction = 'output' AND state = 'pending' AND due_at <= now()
              AND (lease_expires_at IS NULL OR lease_expires_at <= now())
            ORDER BY due_at, id
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        UPDATE wfq.run_files f
        SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
        FROM due WHERE f.id = due.id
        RETURNING f.id, f.run_id, f.key, f.position, f.source, f.attempts, f.json_path, f.profile,
                  (SELECT r.workflow_id FROM wfq.runs r WHERE r.id = f.run_id) AS workflow_id
        "#,
    )
    .bind(worker)
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// When the next output copy is due (`None`: nothing pending).
#[tracing::instrument(name = "next_mirror_due", skip(pool), err, level = "debug")]
pub async fn next_mirror_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT min(GREATEST(due_at, COALESCE(lease_expires_at, due_at))) FROM wfq.run_files \
         WHERE direction = 'output' AND state = 'pending'",
    )
    .fetch_one(pool)
    .await
}

/// What one copy attempt decided.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorRecord {
    /// Row id.
    pub id: i64,
    /// The run.
    pub run_id: i64,
    /// `pending` (retry at `due_at`), `done`, `failed`, `expired` or `skipped`.
    pub state: &'static str,
    /// Attempts including this one.
    pub attempts: i32,
    /// The next attempt (`pending`).
    pub due_at: Option<DateTime<Utc>>,
    /// Where it was stored (`done`).
    pub stored_location: Option<String>,
    /// Its hash (`done`).
    pub sha256: Option<String>,
    /// Its size, when known.
    pub bytes: Option<i64>,
    /// Its content type, when known.
    pub content_type: Option<String>,
    /// Why not (`pending` after a failure, `failed`, `expired`, `skipped`).
    pub error_code: Option<String>,
    /// Details.
    pub error: Option<String>,
}

/// Records a batch of attempts in one statement (rows still leased by
/// `worker`), then, in a second, finishes the runs none of whose files is
/// pending any more: `media_state` done or failed, `mirrored_outputs`, and
/// one `media_mirrored` / `media_failed` event. Returns the runs finished.
#[tracing::instrument(name = "record_mirrors", skip(pool, records), fields(n = records.len()), err)]
pub async fn record_mirrors(
    pool: &PgPool,
    worker: &str,
    records: &[MirrorRecord],
) -> Result<Vec<(i64, String)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        r#"
        UPDATE wfq.run_files f
        SET state = r.state, attempts = r.attempts, due_at = COALESCE(r.due_at, f.due_at),
            stored_location = COALESCE(r.stored_location, f.stored_location),
            sha256 = COALESCE(r.sha256, f.sha256), bytes = COALESCE(r.bytes, f.bytes),
            content_type = COALESCE(r.content_type, f.content_type),
            error_code = r.error_code, error = r.error,
            lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
            finished_at = CASE WHEN r.state = 'pending' THEN NULL ELSE now() END
        FROM unnest($2::bigint[], $3::text[], $4::int[], $5::timestamptz[], $6::text[], $7::text[],
                    $8::bigint[], $9::text[], $10::text[], $11::text[])
             AS r(id, state, attempts, due_at, stored_location, sha256, bytes, content_type, error_code, error)
        WHERE f.id = r.id AND f.lease_owner = $1 AND f.state = 'pending'
        "#,
    )
    .bind(worker)
    .bind(records.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.state.to_owned()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.attempts).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.due_at).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.stored_location.clone()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.sha256.clone()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.bytes).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.content_type.clone()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.error_code.clone()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.error.clone()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    let mut runs: Vec<i64> = records.iter().map(|r| r.run_id).collect();
    runs.sort_unstable();
    runs.dedup();
    let finished: Vec<(i64, String)> = sqlx::query_as(
        r#"
        WITH done AS (
            UPDATE wfq.runs r
            SET media_state = CASE WHEN EXISTS (
                    SELECT 1 FROM wfq.run_files f WHERE f.run_id = r.id AND f.direction = 'output'
                      AND f.state IN ('failed', 'expired')) THEN 'failed' ELSE 'done' END,
                mirrored_outputs = wfq.mirrored_outputs(r.id)
            WHERE r.id = ANY($1) AND r.media_state = 'pending'
              AND NOT EXISTS (SELECT 1 FROM wfq.run_files f
                              WHERE f.run_id = r.id AND f.direction = 'output' AND f.state = 'pending')
            RETURNING r.id, r.media_state
        ), events AS (
            INSERT INTO wfq.run_events (run_id, kind, worker, detail)
            SELECT d.id, CASE d.media_state WHEN 'done' THEN 'media_mirrored' ELSE 'media_failed' END, $2,
                   (SELECT jsonb_build_object('files', jsonb_agg(jsonb_build_object(
                        'key', f.key, 'position', f.position, 'state', f.state,
                        'stored_location', f.stored_location, 'error_code', f.error_code)
                        ORDER BY f.key, f.position))
                    FROM wfq.run_files f WHERE f.run_id = d.id AND f.direction = 'output')
            FROM done d
        )
        SELECT id, media_state FROM done
        "#,
    )
    .bind(&runs)
    .bind(worker)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(finished)
}

/// Output copies by state (for `/metrics`): `retrying` counts pending
/// copies that failed at least once.
#[tracing::instrument(name = "mirror_counts", skip(pool), err, level = "debug")]
pub async fn mirror_counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT s.state, count(f.id)
        FROM unnest(ARRAY['retrying', 'failed', 'expired']) AS s(state)
        LEFT JOIN wfq.run_files f
          ON f.direction = 'output'
         AND ((s.state = 'retrying' AND f.state = 'pending' AND f.attempts > 0)
              OR (s.state <> 'retrying' AND f.state = s.state))
        GROUP BY s.state ORDER BY s.state
        "#,
    )
    .fetch_all(pool)
    .await
}

// ---------------------------------------------------------------- inputs

/// The run's upload row of input `key`, if any.
#[tracing::instrument(name = "input_file", skip(pool), err, level = "debug")]
pub async fn input_file(
    pool: &PgPool,
    run_id: i64,
    key: &str,
) -> Result<Option<RunFileRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {FILE_COLUMNS} FROM wfq.run_files \
         WHERE run_id = $1 AND direction = 'input' AND key = $2 AND position = 0"
    )))
    .bind(run_id)
    .bind(key)
    .fetch_optional(pool)
    .await
}

/// A finished upload of the same bytes to the same profile whose copy at
/// the provider stays valid for at least `margin`.
#[tracing::instrument(name = "reusable_upload", skip(pool), err, level = "debug")]
pub async fn reusable_upload(
    pool: &PgPool,
    profile: &str,
    sha256: &str,
    margin: Duration,
) -> Result<Option<RunFileRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {FILE_COLUMNS} FROM wfq.run_files \
         WHERE direction = 'input' AND state = 'done' AND profile = $1 AND sha256 = $2 \
           AND provider_file_id IS NOT NULL \
           AND (provider_expires_at IS NULL OR provider_expires_at > now() + make_interval(secs => $3)) \
         ORDER BY id DESC LIMIT 1"
    )))
    .bind(profile)
    .bind(sha256)
    .bind(margin.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// What an input file is, once read.
#[derive(Debug, Clone)]
pub struct InputFileFacts<'a> {
    /// The run.
    pub run_id: i64,
    /// The inputs key.
    pub key: &'a str,
    /// The profile.
    pub profile: &'a str,
    /// The location as written.
    pub source: &'a str,
    /// SHA-256.
    pub sha256: &'a str,
    /// Size.
    pub bytes: i64,
    /// Content type.
    pub content_type: &'a str,
}

/// Whether this worker may upload now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadClaim {
    /// The row (this id) is `uploading` under this worker's lease.
    Mine(i64),
    /// Another upload of the same bytes to the profile is in flight.
    Busy,
    /// The run's row is done already.
    Done,
}

/// How long a `done` upload must still be valid at the provider for
/// [`begin_upload`] to leave it alone. One that expires sooner (or has no
/// provider file id) is no use to the run's submit, so it is uploaded
/// again; otherwise a caller that declines to reuse a nearly expired
/// upload would be told `Done` forever. At least the margin a caller
/// reuses its own row with (10 minutes in `files::upload`), so that every
/// `done` row a caller declines is reclaimed.
pub const DONE_UPLOAD_RENEW_MARGIN: Duration = Duration::from_secs(3600);

/// Marks the run's input `key` as `uploading` by `worker` for `lease`,
/// unless it is done and valid for longer than
/// [`DONE_UPLOAD_RENEW_MARGIN`]. At most one upload of the same bytes per profile is
/// in flight (a unique index): a second one is `Busy`. An upload whose
/// worker died (seen dead in `wfq.workers`, or its lease ran out) is
/// marked failed first: its answer will never be recorded, and waiting for
/// its lease (twice the upload timeout) would hold the run for nothing.
#[tracing::instrument(name = "begin_upload", skip(pool, facts), fields(run_id = facts.run_id, key = facts.key), err)]
pub async fn begin_upload(
    pool: &PgPool,
    facts: &InputFileFacts<'_>,
    worker: &str,
    lease: Duration,
) -> Result<UploadClaim, sqlx::Error> {
    sqlx::query(
        "UPDATE wfq.run_files SET state = 'failed', error_code = 'UPLOAD_ABANDONED', \
         error = 'the worker uploading it stopped before it recorded the answer', \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE direction = 'input' AND state = 'uploading' AND profile = $1 AND sha256 = $2 \
           AND (lease_expires_at <= now() \
                OR lease_owner IN (SELECT id FROM wfq.workers WHERE died_at IS NOT NULL))",
    )
    .bind(facts.profile)
    .bind(facts.sha256)
    .execute(pool)
    .await?;
    let claimed: Result<Option<(i64, String)>, sqlx::Error> = sqlx::query_as(
        r#"
        INSERT INTO wfq.run_files (run_id, direction, key, position, profile, source, sha256, bytes,
                                   content_type, state, attempts, lease_owner, lease_expires_at)
        VALUES ($1, 'input', $2, 0, $3, $4, $5, $6, $7, 'uploading', 1, $8, now() + make_interval(secs => $9))
        ON CONFLICT (run_id, direction, key, position) DO UPDATE
        SET state = 'uploading', profile = EXCLUDED.profile, source = EXCLUDED.source,
            sha256 = EXCLUDED.sha256, bytes = EXCLUDED.bytes, content_type = EXCLUDED.content_type,
            attempts = wfq.run_files.attempts + 1, lease_owner = EXCLUDED.lease_owner,
            lease_expires_at = EXCLUDED.lease_expires_at, error_code = NULL, error = NULL,
            updated_at = now()
        WHERE (wfq.run_files.state <> 'done' OR wfq.run_files.provider_file_id IS NULL
               OR wfq.run_files.provider_expires_at <= now() + make_interval(secs => $10))
          AND (wfq.run_files.state <> 'uploading' OR wfq.run_files.lease_expires_at <= now()
               OR wfq.run_files.lease_owner = EXCLUDED.lease_owner)
        RETURNING id, state
        "#,
    )
    .bind(facts.run_id)
    .bind(facts.key)
    .bind(facts.profile)
    .bind(facts.source)
    .bind(facts.sha256)
    .bind(facts.bytes)
    .bind(facts.content_type)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .bind(DONE_UPLOAD_RENEW_MARGIN.as_secs_f64())
    .fetch_optional(pool)
    .await;
    match claimed {
        Ok(Some((id, _))) => Ok(UploadClaim::Mine(id)),
        Ok(None) => match input_file(pool, facts.run_id, facts.key).await? {
            Some(row) if row.state == "done" => Ok(UploadClaim::Done),
            _ => Ok(UploadClaim::Busy),
        },
        // run_files_one_upload_idx: the same bytes are being uploaded for another run.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {
            Ok(UploadClaim::Busy)
        }
        Err(e) => Err(e),
    }
}

/// Records a finished upload (`uploading` -> `done`) under `worker`'s lease.
#[tracing::instrument(name = "finish_upload", skip(pool), err)]
pub async fn finish_upload(
    pool: &PgPool,
    id: i64,
    worker: &str,
    provider_file_id: &str,
    expires_at: Option<DateTime<Utc>>,
    stored_location: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE wfq.run_files SET state = 'done', provider_file_id = $3, provider_expires_at = $4, \
         stored_location = COALESCE($5, stored_location), lease_owner = NULL, lease_expires_at = NULL, \
         finished_at = now(), updated_at = now() \
         WHERE id = $1 AND state = 'uploading' AND lease_owner = $2",
    )
    .bind(id)
    .bind(worker)
    .bind(provider_file_id)
    .bind(expires_at)
    .bind(stored_location)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a failed upload (`uploading` -> `failed`) under `worker`'s lease.
#[tracing::instrument(name = "fail_upload", skip(pool, error), err)]
pub async fn fail_upload(
    pool: &PgPool,
    id: i64,
    worker: &str,
    error_code: &str,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE wfq.run_files SET state = 'failed', error_code = $3, error = $4, \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 AND state = 'uploading' AND lease_owner = $2",
    )
    .bind(id)
    .bind(worker)
    .bind(error_code)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records that the run's input `key` reuses an earlier upload (`from`).
#[tracing::instrument(name = "reuse_upload", skip(pool, facts, from), fields(run_id = facts.run_id, key = facts.key), err)]
pub async fn reuse_upload(
    pool: &PgPool,
    facts: &InputFileFacts<'_>,
    from: &RunFileRow,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        INSERT INTO wfq.run_files (run_id, direction, key, position, profile, source, sha256, bytes,
                                   content_type, provider_file_id, provider_expires_at, stored_location,
                                   state, attempts, finished_at)
        VALUES ($1, 'input', $2, 0, $3, $4, $5, $6, $7, $8, $9, $10, 'done', 0, now())
        ON CONFLICT (run_id, direction, key, position) DO UPDATE
        SET state = 'done', sha256 = EXCLUDED.sha256, bytes = EXCLUDED.bytes,
            content_type = EXCLUDED.content_type, provider_file_id = EXCLUDED.provider_file_id,
            provider_expires_at = EXCLUDED.provider_expires_at, source = EXCLUDED.source,
            stored_location = EXCLUDED.stored_location, error_code = NULL, error = NULL,
            lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now()
        WHERE wfq.run_files.state <> 'uploading'
        "#,
    )
    .bind(facts.run_id)
    .bind(facts.key)
    .bind(facts.profile)
    .bind(facts.source)
    .bind(facts.sha256)
    .bind(facts.bytes)
    .bind(facts.content_type)
    .bind(&from.provider_file_id)
    .bind(from.provider_expires_at)
    .bind(&from.stored_location)
    .execute(pool)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------- retention

/// Finished runs older than `older_than` that have stored files, and
/// would be pruned (same rules as `prune_finished_runs`).
#[tracing::instrument(name = "prunable_runs_with_files", skip(pool), err)]
pub async fn prunable_runs_with_files(
    pool: &PgPool,
    older_than: Duration,
    limit: i64,
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        SELECT r.id FROM wfq.runs r
        WHERE r.state IN ('succeeded', 'failed', 'canceled')
          AND r.settled_at IS NOT NULL
          AND r.callback_state IS DISTINCT FROM 'pending'
          AND r.finished_at < now() - make_interval(secs => $1)
          AND EXISTS (SELECT 1 FROM wfq.run_files f WHERE f.run_id = r.id AND f.stored_location IS NOT NULL)
          -- A copy in progress keeps the run (prune_finished_runs): its
          -- files are deleted once it is over, all at once.
          AND NOT EXISTS (SELECT 1 FROM wfq.run_files f
                          WHERE f.run_id = r.id AND f.direction = 'output' AND f.state = 'pending')
          -- Kept for a chain (prune_finished_runs): its files stay with it.
          AND NOT EXISTS (SELECT 1 FROM wfq.dependents_of(r.id) d
                          WHERE d.state NOT IN ('succeeded', 'failed', 'canceled'))
        ORDER BY r.finished_at
        LIMIT $2
        "#,
    )
    .bind(older_than.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Forgets a run's stored locations once its files were deleted from the store.
#[tracing::instrument(name = "forget_stored_files", skip(pool), err)]
pub async fn forget_stored_files(pool: &PgPool, run_ids: &[i64]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE wfq.run_files SET stored_location = NULL, updated_at = now() \
         WHERE run_id = ANY($1) AND stored_location IS NOT NULL",
    )
    .bind(run_ids)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Gives back the leases of `worker`'s output copies (at shutdown).
#[tracing::instrument(name = "release_mirror_leases", skip(pool), err)]
pub async fn release_mirror_leases(pool: &PgPool, worker: &str) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE wfq.run_files SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE lease_owner = $1 AND direction = 'output' AND state = 'pending'",
    )
    .bind(worker)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Records that input `key` of run `run_id` could not be read for now;
/// returns how many reads (and uploads) of it failed so far. An upload
/// left `uploading` by a worker that stopped (its lease ran out, or it is
/// seen dead) is over: it is counted and marked failed here too, since
/// `begin_upload` (which would abandon it) is not reached while the file
/// cannot be read. A row that is done or being uploaded under a live
/// lease is left alone and its count returned as it is, so that the
/// caller's count never starts again at 1 (`None` only if there is no row).
#[tracing::instrument(name = "record_read_failure", skip(pool), err)]
pub async fn record_read_failure(
    pool: &PgPool,
    run_id: i64,
    key: &str,
    profile: &str,
    source: &str,
    error: &str,
) -> Result<Option<i32>, sqlx::Error> {
    let counted: Option<i32> = sqlx::query_scalar(
        r#"
        INSERT INTO wfq.run_files (run_id, direction, key, position, profile, source, state, attempts,
                                   error_code, error)
        VALUES ($1, 'input', $2, 0, $3, $4, 'failed', 1, 'READ_FAILED', $5)
        ON CONFLICT (run_id, direction, key, position) DO UPDATE
        SET attempts = wfq.run_files.attempts + 1, error_code = 'READ_FAILED', error = EXCLUDED.error,
            state = CASE WHEN wfq.run_files.state = 'uploading' THEN 'failed' ELSE wfq.run_files.state END,
            lease_owner = CASE WHEN wfq.run_files.state = 'uploading' THEN NULL
                               ELSE wfq.run_files.lease_owner END,
            lease_expires_at = CASE WHEN wfq.run_files.state = 'uploading' THEN NULL
                                    ELSE wfq.run_files.lease_expires_at END,
            updated_at = now()
        WHERE wfq.run_files.state IN ('failed', 'pending')
           OR (wfq.run_files.state = 'uploading'
               AND (wfq.run_files.lease_expires_at IS NULL OR wfq.run_files.lease_expires_at <= now()
                    OR wfq.run_files.lease_owner IN (SELECT id FROM wfq.workers WHERE died_at IS NOT NULL)))
        RETURNING attempts
        "#,
    )
    .bind(run_id)
    .bind(key)
    .bind(profile)
    .bind(source)
    .bind(error)
    .fetch_optional(pool)
    .await?;
    if counted.is_some() {
        return Ok(counted);
    }
    sqlx::query_scalar(
        "SELECT attempts FROM wfq.run_files \
         WHERE run_id = $1 AND direction = 'input' AND key = $2 AND position = 0",
    )
    .bind(run_id)
    .bind(key)
    .fetch_optional(pool)
    .await
}

/// Records that input `key` went to the provider as a link (GPTBots): an
/// http(s) link with its query left out (it may carry a signature), or the
/// store location of a file that is sent as a presigned URL.
#[tracing::instrument(name = "record_input_link", skip(pool), err)]
pub async fn record_input_link(
    pool: &PgPool,
    run_id: i64,
    key: &str,
    profile: &str,
    source: &str,
    link: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        INSERT INTO wfq.run_files (run_id, direction, key, position, profile, source, provider_file_id,
                                   state, attempts, finished_at)
        VALUES ($1, 'input', $2, 0, $3, $4, $5, 'done', 1, now())
        ON CONFLICT (run_id, direction, key, position) DO NOTHING
        "#,
    )
    .bind(run_id)
    .bind(key)
    .bind(profile)
    .bind(source)
    .bind(link)
    .execute(pool)
    .await?;
    Ok(())
}

/// `(media_state, mirrored_outputs)` of a run (`wfq show`).
#[tracing::instrument(name = "media_of_run", skip(pool), err, level = "debug")]
pub async fn media_of_run(
    pool: &PgPool,
    run_id: i64,
) -> Result<(Option<String>, Option<Value>), sqlx::Error> {
    Ok(
        sqlx::query_as("SELECT media_state, mirrored_outputs FROM wfq.runs WHERE id = $1")
            .bind(run_id)
            .fetch_optional(pool)
            .await?
            .unwrap_or((None, None)),
    )
}
