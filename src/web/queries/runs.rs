//! The runs list: keyset pages over `id`, each page a bounded walk of the
//! primary key (or of a filter's own index), never an OFFSET or a count.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::PgPool;

/// Ids searched per page at most: a filter that matches few runs reads a
/// window of this many ids, then offers to search the next one.
pub const WINDOW: i64 = 20_000;
/// Runs per page.
pub const PAGE: i64 = 50;

/// What the runs page filters by (every field optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFilter {
    /// Exact run id.
    pub id: Option<i64>,
    /// State.
    pub state: Option<String>,
    /// Provider profile.
    pub provider: Option<String>,
    /// Workflow id.
    pub workflow: Option<String>,
    /// Error code.
    pub error_code: Option<String>,
    /// Created at or after.
    pub created_from: Option<DateTime<Utc>>,
    /// Created before.
    pub created_to: Option<DateTime<Utc>>,
    /// Finished at or after.
    pub finished_from: Option<DateTime<Utc>>,
    /// Finished before.
    pub finished_to: Option<DateTime<Utc>>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// `metadata @>` this object (one key = value).
    pub metadata: Option<Value>,
}

/// One line of the runs list.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunSummary {
    /// Id.
    pub id: i64,
    /// Provider profile.
    pub provider: String,
    /// Workflow.
    pub workflow_id: String,
    /// State.
    pub state: String,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Currency.
    pub currency: Option<String>,
    /// Quote.
    pub quote_amount: Option<Decimal>,
    /// Frozen.
    pub frozen_amount: Option<Decimal>,
    /// Charged (final, else the total cost).
    pub charged: Option<Decimal>,
    /// Settled.
    pub settled_at: Option<DateTime<Utc>>,
    /// Error code.
    pub error_code: Option<String>,
    /// Error message.
    pub error_message: Option<String>,
    /// Why a queued run waits.
    pub hold_reason: Option<String>,
    /// Attempts.
    pub attempts: i32,
    /// Polls.
    pub polls: i32,
}

/// A page of runs and where the next one starts.
#[derive(Debug, Clone)]
pub struct RunPage {
    /// The runs, newest first.
    pub runs: Vec<RunSummary>,
    /// The ids searched: `[lowest, below)`.
    pub searched: Option<(i64, i64)>,
    /// The `before` of the next page (`None`: nothing older).
    pub next_before: Option<i64>,
}

macro_rules! summary_columns {
    () => {
        "id, provider, workflow_id, state, created_at, finished_at, currency, quote_amount, \
         frozen_amount, coalesce(final_amount, total_cost) AS charged, settled_at, error_code, \
         left(error_message, 300) AS error_message, hold_reason, attempts, polls"
    };
}

/// A page of runs matching `filter` with ids below `before` (the newest
/// when `None`). An id or an idempotency key is one index lookup; any
/// other filter walks at most [`WINDOW`] ids of the primary key.
/// `profiles` are the providers an idempotency key is looked up under when
/// the filter names none (the key is unique per provider).
#[tracing::instrument(name = "web_runs_page", skip(pool, filter), err)]
pub async fn runs_page(
    pool: &PgPool,
    filter: &RunFilter,
    before: Option<i64>,
    profiles: &[String],
) -> Result<RunPage, sqlx::Error> {
    if let Some(id) = filter.id {
        let runs = sqlx::query_as(concat!(
            "SELECT ",
            summary_columns!(),
            " FROM wfq.runs WHERE id = $1"
        ))
        .bind(id)
        .fetch_all(pool)
        .await?;
        return Ok(RunPage {
            runs,
            searched: None,
            next_before: None,
        });
    }
    if let Some(key) = &filter.idempotency_key {
        let providers: Vec<String> = match &filter.provider {
            Some(p) => vec![p.clone()],
            None => profiles.to_vec(),
        };
        let runs = sqlx::query_as(concat!(
            "SELECT ",
            summary_columns!(),
            " FROM wfq.runs WHERE provider = ANY($1) AND idempotency_key = $2 ORDER BY id DESC"
        ))
        .bind(&providers)
        .bind(key)
        .fetch_all(pool)
        .await?;
        return Ok(RunPage {
            runs,
            searched: None,
            next_before: None,
        });
    }
    let below = match (before, filter.created_to) {
        (Some(b), _) => b,
        // Start where runs were created before that time, not at the newest.
        (None, Some(to)) => last_id_created_before(pool, to)
            .await?
            .map_or(0, |id| id + 1),
        (None, None) => newest_id(pool).await?.map_or(0, |id| id + 1),
    };
    let lowest = (below - WINDOW).max(1);
    let runs: Vec<RunSummary> = sqlx::query_as(concat!(
        "SELECT ",
        summary_columns!(),
        r#" FROM wfq.runs
        WHERE id < $1 AND id >= $2
          AND ($3::text IS NULL OR state = $3)
          AND ($4::text IS NULL OR provider = $4)
          AND ($5::text IS NULL OR workflow_id = $5)
          AND ($6::text IS NULL OR error_code = $6)
          AND ($7::timestamptz IS NULL OR created_at >= $7)
          AND ($8::timestamptz IS NULL OR created_at < $8)
          AND ($9::timestamptz IS NULL OR finished_at >= $9)
          AND ($10::timestamptz IS NULL OR finished_at < $10)
          AND ($11::jsonb IS NULL OR metadata @> $11)
        ORDER BY id DESC
        LIMIT $12"#
    ))
    .bind(below)
    .bind(lowest)
    .bind(&filter.state)
    .bind(&filter.provider)
    .bind(&filter.workflow)
    .bind(&filter.error_code)
    .bind(filter.created_from)
    .bind(filter.created_to)
    .bind(filter.finished_from)
    .bind(filter.finished_to)
    .bind(&filter.metadata)
    .bind(PAGE)
    .fetch_all(pool)
    .await?;
    let full = runs.len() as i64 == PAGE;
    let next_before = match runs.last() {
        Some(last) if full => Some(last.id),
        _ if lowest > 1 => Some(lowest),
        _ => None,
    };
    Ok(RunPage {
        searched: (!full).then_some((lowest, below)),
        runs,
        next_before,
    })
}

/// The newest run's id (the primary key's last entry).
#[tracing::instrument(name = "web_newest_id", skip(pool), err, level = "debug")]
pub async fn newest_id(pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(id) FROM wfq.runs")
        .fetch_one(pool)
        .await
}

/// About the last id created before `at`: a binary search over the
/// primary key (ids are given out in time order, like `created_at`'s
/// default), about 20 index lookups on a million runs. Only where a page
/// starts: the filter itself is exact.
#[tracing::instrument(name = "web_last_id_created_before", skip(pool), err, level = "debug")]
pub async fn last_id_created_before(
    pool: &PgPool,
    at: DateTime<Utc>,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        WITH RECURSIVE search(lo, hi) AS (
            SELECT (SELECT min(id) FROM wfq.runs), (SELECT max(id) FROM wfq.runs)
            UNION ALL
            SELECT CASE WHEN probe.created_at < $1 THEN probe.id ELSE search.lo END,
                   CASE WHEN probe.created_at < $1 THEN search.hi ELSE mid.m - 1 END
            FROM search,
                 LATERAL (SELECT (search.lo + search.hi + 1) / 2 AS m) mid,
                 LATERAL (SELECT id, created_at FROM wfq.runs WHERE id >= mid.m
                          ORDER BY id LIMIT 1) probe
            WHERE search.lo < search.hi
        )
        SELECT lo FROM search WHERE lo >= hi LIMIT 1
        "#,
    )
    .bind(at)
    .fetch_optional(pool)
    .await
    .map(Option::flatten)
}

/// The runs of a selection, for the confirmation of a bulk action.
#[tracing::instrument(name = "web_runs_by_ids", skip(pool), err)]
pub async fn runs_by_ids(pool: &PgPool, ids: &[i64]) -> Result<Vec<RunSummary>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        summary_columns!(),
        " FROM wfq.runs WHERE id = ANY($1) ORDER BY id DESC"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// Provider profiles that ever submitted a run, one index descent each
/// (a loose scan of `runs_provider_submitted_idx`, not a walk of the table).
#[tracing::instrument(name = "web_submitting_providers", skip(pool), err, level = "debug")]
pub async fn submitting_providers(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        WITH RECURSIVE p(provider) AS (
            (SELECT provider FROM wfq.runs WHERE submitted_at IS NOT NULL
             ORDER BY provider LIMIT 1)
            UNION ALL
            SELECT (SELECT r.provider FROM wfq.runs r
                    WHERE r.submitted_at IS NOT NULL AND r.provider > p.provider
                    ORDER BY r.provider LIMIT 1)
            FROM p WHERE p.provider IS NOT NULL
        )
        SELECT provider FROM p WHERE provider IS NOT NULL
        "#,
    )
    .fetch_all(pool)
    .await
}
