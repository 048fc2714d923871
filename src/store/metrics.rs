//! What `/metrics` and `/readyz` read from the database.
//!
//! A scrape's reads must cost what the live part of the queue costs, never
//! what its history does: `wfq.runs` keeps every finished run until
//! `wfq prune`. So each statement here is answered from a partial index
//! that holds no finished (or no settled) run, and finished runs are not
//! counted here at all (see `Metrics::run_finished`).

use rust_decimal::Decimal;
use sqlx::PgPool;

/// Active runs (queued, submitting, running) per provider profile and
/// state: `(provider, state, runs)`, exact.
///
/// The predicate is that of the partial indexes `runs_due_idx` and
/// `runs_claim_idx`, so the planner walks one of them: the rows read are
/// the active runs, however many finished ones the table keeps (the
/// plan is checked in `tests/metrics.rs`). `provider` is not in those
/// indexes, so each active row is read from the heap; an index-only scan
/// over a new `(provider, state)` partial index would not save that (the
/// pages of runs in flight change all the time, so they are seldom
/// all-visible) and would cost every transition one more index write.
#[tracing::instrument(name = "count_runs", skip(pool), err, level = "debug")]
pub async fn count_runs(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT provider, state, count(*)::int8
        FROM wfq.runs
        WHERE state IN ('queued', 'submitting', 'running')
        GROUP BY 1, 2 ORDER BY 1, 2
        "#,
    )
    .fetch_all(pool)
    .await
}

/// Money frozen at providers and not settled yet, per provider profile and
/// currency: `(provider, currency, sum of frozen_amount)`.
///
/// `state NOT IN ('waiting', 'queued')` changes no sum (such a run was
/// never submitted, and `frozen_amount` comes only from a submit's answer;
/// no run goes back to `queued`), but it is what lets the planner use
/// `runs_unsettled_sent_idx`, the spend guard's index of unsettled money,
/// instead of scanning the table. That index holds the runs in flight and the finished runs whose
/// money is an open question (e.g. `SUBMIT_RETRIES_EXHAUSTED`,
/// `POLL_DEADLINE`; `wfq prune` keeps them): exactly the runs this sum is
/// about.
#[tracing::instrument(name = "outstanding_frozen", skip(pool), err, level = "debug")]
pub async fn outstanding_frozen(
    pool: &PgPool,
) -> Result<Vec<(String, String, Decimal)>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT provider, coalesce(currency, ''), sum(frozen_amount)
        FROM wfq.runs
        WHERE settled_at IS NULL AND state NOT IN ('waiting', 'queued') AND frozen_amount IS NOT NULL
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
