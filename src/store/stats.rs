//! Live counts for `wfq top`: one grouped query per refresh.

use rust_decimal::Decimal;
use sqlx::PgPool;

/// One group of runs: a provider profile, a state and a currency.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StateCount {
    /// Provider profile.
    pub provider: String,
    /// Run state.
    pub state: String,
    /// Currency of the money columns (`None` before the provider named one).
    pub currency: Option<String>,
    /// Runs in the group.
    pub runs: i64,
    /// Frozen money not settled yet (as `wfq.daily_costs.outstanding_frozen`).
    pub outstanding_frozen: Decimal,
    /// Runs of the group that became final in the last minute.
    pub finished_last_minute: i64,
}

/// Counts of runs by provider, state and currency, with the outstanding
/// frozen money and the runs finished in the last minute. One scan of
/// `wfq.runs`, so `wfq top` costs one statement per refresh.
#[tracing::instrument(name = "queue_stats", skip(pool), err)]
pub async fn queue_stats(pool: &PgPool) -> Result<Vec<StateCount>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT provider, state, currency,
               count(*) AS runs,
               coalesce(sum(frozen_amount) FILTER (WHERE settled_at IS NULL), 0) AS outstanding_frozen,
               count(*) FILTER (WHERE finished_at >= now() - interval '1 minute') AS finished_last_minute
        FROM wfq.runs
        GROUP BY provider, state, currency
        ORDER BY provider, state, currency
        "#,
    )
    .fetch_all(pool)
    .await
}
