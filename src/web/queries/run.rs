//! One run's page: what `wfq show` reads, plus the columns it leaves out,
//! its callback attempts and the files the dashboard serves.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

/// Most events shown (the newest); a run polled for days has thousands.
pub const EVENTS_SHOWN: i64 = 300;

/// The columns of a run that `store::RunRow` does not carry.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct RunExtras {
    /// Where the run is POSTed when final (shown without its query string).
    pub callback_url: Option<String>,
    /// `pending`, `delivered`, `failed`.
    pub callback_state: Option<String>,
    /// Deliveries tried.
    pub callback_attempts: i32,
    /// Why a queued run waits.
    pub hold_reason: Option<String>,
    /// Mirroring of media outputs.
    pub media_state: Option<String>,
    /// Outputs with stored locations in place of the provider's URLs.
    pub mirrored_outputs: Option<Value>,
    /// Place in the provider's queue.
    pub queue_position: Option<i32>,
    /// The run's events (all of them, however many are shown).
    pub events: i64,
}

/// The extra columns of run `id`.
#[tracing::instrument(name = "web_run_extras", skip(pool), err, level = "debug")]
pub async fn run_extras(pool: &PgPool, id: i64) -> Result<Option<RunExtras>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT callback_url, callback_state, callback_attempts, hold_reason, media_state,
               mirrored_outputs, queue_position,
               (SELECT count(*) FROM wfq.run_events e WHERE e.run_id = r.id)::int8 AS events
        FROM wfq.runs r WHERE id = $1
        "#,
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// The newest [`EVENTS_SHOWN`] events of run `id`, oldest first.
#[tracing::instrument(name = "web_run_events", skip(pool), err, level = "debug")]
pub async fn recent_events(
    pool: &PgPool,
    id: i64,
) -> Result<Vec<crate::store::EventRow>, sqlx::Error> {
    let mut events: Vec<crate::store::EventRow> = sqlx::query_as(
        "SELECT at, kind, from_state, to_state, worker, detail FROM wfq.run_events \
         WHERE run_id = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(id)
    .bind(EVENTS_SHOWN)
    .fetch_all(pool)
    .await?;
    events.reverse();
    Ok(events)
}

/// One delivery of a completion callback.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallbackAttemptRow {
    /// 1, 2, ...
    pub attempt: i32,
    /// Which worker sent it.
    pub worker: String,
    /// When.
    pub started_at: DateTime<Utc>,
    /// How long.
    pub duration_ms: i32,
    /// The receiver's status.
    pub http_status: Option<i32>,
    /// Why no answer came.
    pub error: Option<String>,
    /// `delivered`, `retry`, ...
    pub result: String,
    /// The next try.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// The newest 50 callback deliveries of run `id`, oldest first.
#[tracing::instrument(name = "web_callback_attempts", skip(pool), err, level = "debug")]
pub async fn callback_attempts(
    pool: &PgPool,
    id: i64,
) -> Result<Vec<CallbackAttemptRow>, sqlx::Error> {
    let mut rows: Vec<CallbackAttemptRow> = sqlx::query_as(
        "SELECT attempt, worker, started_at, duration_ms, http_status, error, result, next_attempt_at \
         FROM wfq.callback_attempts WHERE run_id = $1 ORDER BY id DESC LIMIT 50",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    rows.reverse();
    Ok(rows)
}

/// A stored file the dashboard may serve.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ServedFile {
    /// Where wfq keeps it.
    pub stored_location: String,
    /// Its content type, when known.
    pub content_type: Option<String>,
}

/// The stored copy of file row `id` (`None` unless it was stored).
#[tracing::instrument(name = "web_stored_file", skip(pool), err, level = "debug")]
pub async fn stored_file(pool: &PgPool, id: i64) -> Result<Option<ServedFile>, sqlx::Error> {
    sqlx::query_as(
        "SELECT stored_location, content_type FROM wfq.run_files \
         WHERE id = $1 AND state = 'done' AND stored_location IS NOT NULL",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}
