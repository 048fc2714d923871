//! The spend guard's statements: read what a profile has committed under a
//! per-profile lock, and either record the submit or hold the run.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;

use crate::lifecycle::{RunState, Transition};
use crate::spend::{self, Committed, SpendHold, SpendLimits};

/// What `begin_within_limits` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Guarded {
    /// The transition was applied (the new version), or the row had moved
    /// on without us (`None`).
    Applied(Option<i64>),
    /// A limit would be crossed: nothing was written.
    Held(SpendHold),
    /// The profile's spend lock was held by another transaction for long
    /// (`lock_timeout`): nothing was written; try again shortly.
    Busy,
}

/// How long a submit waits for the profile's spend lock. A holder that
/// hangs mid-transaction must not make every submit of every process wait
/// with a pool connection in hand.
const LOCK_TIMEOUT: &str = "5s";

/// The run the guard decides about.
#[derive(Debug, Clone, Copy)]
pub struct GuardedRun<'a> {
    /// `wfq.runs.id`.
    pub id: i64,
    /// Its version at claim time.
    pub version: i64,
    /// Its state at claim time.
    pub from: RunState,
    /// Its provider profile.
    pub provider: &'a str,
    /// Its quote (`None`: the provider quotes nothing).
    pub quote: Option<Decimal>,
}

/// Applies the `begin_submit` transition `t` only if the run's quote fits
/// the profile's limits. The per-profile advisory lock makes the read and
/// the write one decision for every worker process at once: two workers
/// racing for the last of a budget cannot both pass.
#[tracing::instrument(name = "begin_within_limits", skip(pool, t, limits), fields(run_id = run.id), err)]
#[allow(clippy::too_many_arguments)]
pub async fn begin_within_limits(
    pool: &PgPool,
    run: GuardedRun<'_>,
    worker: &str,
    lease: Duration,
    t: &Transition,
    limits: &SpendLimits,
    timezone: &str,
) -> Result<Guarded, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    let locked =
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('wfq.spend/' || $1, 0))")
            .bind(run.provider)
            .execute(&mut *tx)
            .await;
    match locked {
        Ok(_) => {}
        // 55P03: lock_not_available, raised by lock_timeout.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            return Ok(Guarded::Busy);
        }
        Err(e) => return Err(e),
    }
    let committed = committed(&mut tx, run.provider, timezone, limits.unknown_cost).await?;
    if let Err(hold) = spend::check(limits, committed, run.quote) {
        tx.rollback().await?;
        return Ok(Guarded::Held(hold));
    }
    let applied =
        super::apply_transition(&mut *tx, run.id, run.version, run.from, worker, lease, t).await?;
    tx.commit().await?;
    Ok(Guarded::Applied(applied))
}

/// What `provider` has committed right now, as the spend guard would read
/// it (without its lock): for the dashboard's budget bars.
#[tracing::instrument(name = "committed_now", skip(pool), err, level = "debug")]
pub async fn committed_now(
    pool: &PgPool,
    provider: &str,
    timezone: &str,
    unknown_cost: Option<Decimal>,
) -> Result<Committed, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    committed(&mut conn, provider, timezone, unknown_cost).await
}

/// What `provider` has outstanding and committed on the current budget day
/// (midnight to midnight in `timezone`, any name PostgreSQL knows).
/// `unknown_cost` is what a finished run of unknown cost counts when
/// nothing else estimates it.
async fn committed(
    tx: &mut sqlx::PgConnection,
    provider: &str,
    timezone: &str,
    unknown_cost: Option<Decimal>,
) -> Result<Committed, sqlx::Error> {
    // A run whose cost the provider did not report counts as its quote or
    // its estimate (the highest cost of the workflow lately), then as the
    // profile's `unknown_cost`; never as nothing: one that nothing
    // estimates is counted in `unpriced` (and holds the profile). A run
    // still at the provider without a quote counts once its cost is known.
    let (outstanding, unpriced_outstanding, today, unpriced_today, running): (
        Decimal,
        i64,
        Decimal,
        i64,
        i64,
    ) = sqlx::query_as(
        r#"
        WITH day AS (
            SELECT date_trunc('day', now() AT TIME ZONE $2) AT TIME ZONE $2 AS start
        ),
        outstanding AS (
            SELECT coalesce(sum(coalesce(frozen_amount, quote_amount, cost_estimate,
                                         CASE WHEN finished_at IS NOT NULL THEN $3::numeric END, 0)), 0) AS amount,
                   count(*) FILTER (WHERE finished_at IS NOT NULL
                       AND coalesce(frozen_amount, quote_amount, cost_estimate, $3::numeric) IS NULL) AS unpriced
            FROM wfq.runs
            WHERE provider = $1 AND settled_at IS NULL AND state NOT IN ('waiting', 'queued')
        ),
        today AS (
            SELECT coalesce(sum(CASE WHEN settled_at IS NOT NULL THEN coalesce(final_amount, 0)
                                     ELSE coalesce(frozen_amount, quote_amount, cost_estimate,
                                                   CASE WHEN finished_at IS NOT NULL THEN $3::numeric END, 0) END), 0) AS amount,
                   count(*) FILTER (WHERE settled_at IS NULL AND finished_at IS NOT NULL
                       AND coalesce(frozen_amount, quote_amount, cost_estimate, $3::numeric) IS NULL) AS unpriced
            FROM wfq.runs, day
            WHERE provider = $1
              AND (submitted_at >= day.start
                   -- Submits in flight, and failures whose money is not
                   -- known, count on the day they were last touched, not
                   -- on every day after.
                   OR (submitted_at IS NULL AND settled_at IS NULL AND state NOT IN ('waiting', 'queued')
                       AND updated_at >= day.start))
        )
        SELECT outstanding.amount, outstanding.unpriced, today.amount, today.unpriced,
            -- Two ranges of runs_claim_lane_idx: as many rows as runs at once.
            (SELECT count(*) FROM wfq.runs
             WHERE provider = $1 AND state IN ('submitting', 'running'))
        FROM outstanding, today
        "#,
    )
    .bind(provider)
    .bind(timezone)
    .bind(unknown_cost)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Committed {
        outstanding,
        today,
        running,
        unpriced_outstanding,
        unpriced_today,
    })
}

/// Gives a held run back with its reason, due again at `due_at`. The event
/// is written only when the reason changes, so a run held all day leaves
/// one line in its audit trail, not one per check.
#[tracing::instrument(name = "hold_run", skip(pool), err)]
pub async fn hold_run(
    pool: &PgPool,
    id: i64,
    version: i64,
    worker: &str,
    reason: &str,
    due_at: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let held: Option<i64> = sqlx::query_scalar(
        r#"
        WITH old AS (
            SELECT hold_reason FROM wfq.runs WHERE id = $1
        ),
        held AS (
            UPDATE wfq.runs
            SET hold_reason = $4, due_at = $5, lease_owner = NULL, lease_expires_at = NULL,
                version = version + 1, updated_at = now()
            WHERE id = $1 AND version = $2 AND lease_owner = $3 AND state = 'queued'
            RETURNING id
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker, detail)
            SELECT held.id, 'spend_hold', 'queued', 'queued', $3, jsonb_build_object('reason', $4::text)
            -- The numbers change at every check; the limit named first does not.
            FROM held, old
            WHERE split_part(old.hold_reason, ':', 1) IS DISTINCT FROM split_part($4::text, ':', 1)
        )
        SELECT id FROM held
        "#,
    )
    .bind(id)
    .bind(version)
    .bind(worker)
    .bind(reason)
    .bind(due_at)
    .fetch_optional(pool)
    .await?;
    Ok(held.is_some())
}

/// Checks that PostgreSQL knows `timezone` (the budget day's zone), so a
/// typo fails at start-up, not at the first submit.
pub async fn check_timezone(pool: &PgPool, timezone: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT now() AT TIME ZONE $1")
        .bind(timezone)
        .execute(pool)
        .await?;
    Ok(())
}

/// Stores `timezone` as the budget day's zone for SQL readers
/// (`wfq.budget_timezone()`, which `wfq.daily_costs` groups by), so the
/// view's days are the spend guard's. Returns the zone stored before, if
/// another one was (workers configured with different zones disagree on
/// the budget day: worth a warning).
#[tracing::instrument(name = "record_budget_timezone", skip(pool), err)]
pub async fn record_budget_timezone(
    pool: &PgPool,
    timezone: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        WITH old AS (
            SELECT value FROM wfq.settings WHERE name = 'budget_timezone'
        ),
        new AS (
            INSERT INTO wfq.settings (name, value) VALUES ('budget_timezone', $1)
            ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
        )
        SELECT value FROM old WHERE value <> $1
        "#,
    )
    .bind(timezone)
    .fetch_optional(pool)
    .await
}

/// When the next budget day begins (midnight in `timezone`): a run held by
/// the daily budget is due then, not every few seconds until then.
#[tracing::instrument(name = "next_budget_day", skip(pool), err, level = "debug")]
pub async fn next_budget_day(pool: &PgPool, timezone: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (date_trunc('day', now() AT TIME ZONE $1) + interval '1 day') AT TIME ZONE $1",
    )
    .bind(timezone)
    .fetch_one(pool)
    .await
}

/// Wakes runs held by a limit that the runs `finished` (final, or their
/// money settled) may have freed, in one statement: per profile, as many
/// held runs as it has runs in `finished` (each one frees a `max_running`
/// place and its frozen money: room for about one run of its size), at
/// least 8 (a large run's money may fit several small ones), oldest held
/// first; and tells the workers. A woken run that still does not fit is
/// held again under the profile's lock. Runs held by the daily budget are
/// left to their day. Returns how many were woken.
///
/// (A fixed handful per batch left the rest of a burst's freed room to
/// fresh runs, and the held ones waited for the hour's backstop.)
#[tracing::instrument(name = "wake_held_runs", skip(pool, finished), fields(finished = finished.len()), err, level = "debug")]
pub async fn wake_held_runs(pool: &PgPool, finished: &[i64]) -> Result<u64, sqlx::Error> {
    let woken = sqlx::query(
        r#"
        WITH freed AS (
            SELECT provider, count(*) AS runs FROM wfq.runs WHERE id = ANY($1) GROUP BY provider
        ),
        held AS (
            SELECT h.id
            FROM freed f
            CROSS JOIN LATERAL (
                SELECT id FROM wfq.runs
                WHERE provider = f.provider AND state = 'queued' AND hold_reason IS NOT NULL
                  AND due_at > now() AND lease_owner IS NULL
                  AND (hold_reason LIKE 'max_outstanding_frozen:%' OR hold_reason LIKE 'max_running:%'
                       OR hold_reason LIKE 'unknown_cost:%')
                ORDER BY due_at
                LIMIT greatest(f.runs, 8)
                FOR NO KEY UPDATE SKIP LOCKED
            ) h
        )
        UPDATE wfq.runs r SET due_at = now()
        FROM held WHERE r.id = held.id
        "#,
    )
    .bind(finished)
    .execute(pool)
    .await?
    .rows_affected();
    if woken > 0 {
        sqlx::query("SELECT pg_notify('wfq_runs_due', '')")
            .execute(pool)
            .await?;
    }
    Ok(woken)
}

/// Makes due now the runs of `profiles` held because a finished run's cost
/// is unknown (`unknown_cost: ...`): an operator's fix for them (settling
/// that run by hand, setting `unknown_cost` and restarting) wakes nothing
/// else, so a starting worker looks again at once. Returns how many.
#[tracing::instrument(name = "wake_unknown_cost_holds", skip(pool), err)]
pub async fn wake_unknown_cost_holds(
    pool: &PgPool,
    profiles: &[String],
) -> Result<u64, sqlx::Error> {
    // Bounded and in due order, skipping rows others hold (workers
    // starting together, a settlement's trigger): no deadlock, and the
    // runs left are woken by these runs' finishes or their own recheck.
    let woken = sqlx::query(
        "UPDATE wfq.runs SET due_at = now() \
         WHERE id IN ( \
           SELECT id FROM wfq.runs \
           WHERE provider = ANY($1) AND state = 'queued' AND hold_reason LIKE 'unknown_cost:%' \
             AND due_at > now() AND lease_owner IS NULL \
           ORDER BY due_at LIMIT 1000 \
           FOR NO KEY UPDATE SKIP LOCKED)",
    )
    .bind(profiles)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(woken)
}
