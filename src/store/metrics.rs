//! What `/metrics` and `/readyz` read from the database.

use rust_decimal::Decimal;
use sqlx::PgPool;

/// Runs per provider profile and state: `(provider, state, runs)`.
#[tracing::instrument(name = "count_runs", skip(pool), err, level = "debug")]
pub async fn count_runs(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT provider, state, count(*)::int8 FROM wfq.runs GROUP BY provider, state ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
}

/// Money frozen at providers and not settled yet, per provider profile and
/// currency: `(provider, currency, sum of frozen_amount)`.
#[tracing::instrument(name = "outstanding_frozen", skip(pool), err, level = "debug")]
pub async fn outstanding_frozen(
    pool: &PgPool,
) -> Result<Vec<(String, String, Decimal)>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT provider, coalesce(currency, ''), sum(frozen_amount)
        FROM wfq.runs
        WHERE settled_at IS NULL AND frozen_amount IS NOT NULL
        GROUP BY 1, 2 ORDER BY 1, 2
        "#,
    )
    .fetch_all(pool)
    .await
}

/// The cheapest statement that proves the database answers.
#[tracing::instrument(name = "ping", skip(pool), err, level = "debug")]
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(drop)
}
