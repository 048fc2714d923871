//! Money by budget day (as `wfq.daily_costs`, but only for a chosen range,
//! read through `runs_provider_submitted_idx`), and the dashboard's own
//! writes: an operator's pause of a profile and its end.

use chrono::NaiveDate;
use rust_decimal::Decimal;
use sqlx::PgPool;

/// One day, provider profile, workflow and currency.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CostRow {
    /// The budget day's date in `wfq.budget_timezone()`.
    pub budget_date: NaiveDate,
    /// Provider profile.
    pub provider: String,
    /// Workflow.
    pub workflow_id: String,
    /// Currency (empty when the provider named none).
    pub currency: String,
    /// Runs submitted that day.
    pub runs: i64,
    /// Of which succeeded.
    pub succeeded: i64,
    /// Of which failed.
    pub failed: i64,
    /// Sum of `final_amount` (charged, chenyu).
    pub final_amount: Decimal,
    /// Sum of `total_cost` (what Dify and GPTBots report).
    pub total_cost: Decimal,
    /// Sum of `frozen_amount`.
    pub frozen: Decimal,
    /// Sum of `released_amount`.
    pub released: Decimal,
    /// Frozen and not settled yet.
    pub outstanding_frozen: Decimal,
}

impl CostRow {
    /// What was charged: the final amounts, or the total cost for
    /// providers that report only that.
    pub fn charged(&self) -> Decimal {
        if self.final_amount.is_zero() {
            self.total_cost
        } else {
            self.final_amount
        }
    }
}

/// The zone of the budget days (`worker.budget_timezone`, as stored).
#[tracing::instrument(name = "web_budget_timezone", skip(pool), err, level = "debug")]
pub async fn budget_timezone(pool: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT wfq.budget_timezone()")
        .fetch_one(pool)
        .await
}

/// Money of runs of `providers` submitted on budget days `from..=to`
/// (dates in `timezone`), per day, provider, workflow and currency.
#[tracing::instrument(name = "web_costs", skip(pool), err)]
pub async fn costs(
    pool: &PgPool,
    providers: &[String],
    from: NaiveDate,
    to: NaiveDate,
    timezone: &str,
) -> Result<Vec<CostRow>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT (submitted_at AT TIME ZONE $4)::date AS budget_date, provider, workflow_id,
               coalesce(currency, '') AS currency,
               count(*)::int8 AS runs,
               count(*) FILTER (WHERE state = 'succeeded')::int8 AS succeeded,
               count(*) FILTER (WHERE state = 'failed')::int8 AS failed,
               coalesce(sum(final_amount), 0) AS final_amount,
               coalesce(sum(total_cost), 0) AS total_cost,
               coalesce(sum(frozen_amount), 0) AS frozen,
               coalesce(sum(released_amount), 0) AS released,
               coalesce(sum(frozen_amount) FILTER (WHERE settled_at IS NULL), 0) AS outstanding_frozen
        FROM wfq.runs
        WHERE provider = ANY($1)
          AND submitted_at >= ($2::date::timestamp AT TIME ZONE $4)
          AND submitted_at < (($3::date + 1)::timestamp AT TIME ZONE $4)
        GROUP BY 1, 2, 3, 4
        ORDER BY 1, 2, 3, 4
        "#,
    )
    .bind(providers)
    .bind(from)
    .bind(to)
    .bind(timezone)
    .fetch_all(pool)
    .await
}

/// Pauses `profile` by hand: every worker stops submitting its runs
/// (within 2 s; runs already at the provider are still followed) until
/// the pause is lifted. Replaces a pause a worker recorded.
#[tracing::instrument(name = "web_pause_profile", skip(pool), err)]
pub async fn pause_profile(
    pool: &PgPool,
    profile: &str,
    by: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        INSERT INTO wfq.provider_pauses (profile, worker, kind, reason)
        VALUES ($1, $2, 'manual', $3)
        ON CONFLICT (profile) DO UPDATE
        SET kind = 'manual', worker = EXCLUDED.worker, reason = EXCLUDED.reason, paused_at = now()
        "#,
    )
    .bind(profile)
    .bind(by)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Lifts an operator's pause of `profile`; false when there was none.
#[tracing::instrument(name = "web_resume_profile", skip(pool), err)]
pub async fn resume_profile(pool: &PgPool, profile: &str) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("DELETE FROM wfq.provider_pauses WHERE profile = $1 AND kind = 'manual'")
            .bind(profile)
            .execute(pool)
            .await?;
    Ok(done.rows_affected() > 0)
}
