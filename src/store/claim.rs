//! Claiming due runs with per-run leases, and giving leases back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgExecutor, PgPool};

use crate::lifecycle::RunState;

/// A run this worker holds a lease on, with what a step needs to know.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    /// `wfq.runs.id`.
    pub id: i64,
    /// Provider profile name.
    pub provider: String,
    /// Workflow to run.
    pub workflow_id: String,
    /// Pinned revision, if any.
    pub revision_id: Option<String>,
    /// The producer's inputs.
    pub inputs: Value,
    /// The inputs as sent by an earlier attempt.
    pub sent_inputs: Option<Value>,
    /// The quote recorded by an earlier attempt (with `sent_inputs`): a run
    /// put back in the queue is checked against the money limits and the
    /// balance with it, as its first submit was.
    pub quote_amount: Option<rust_decimal::Decimal>,
    /// The run's idempotency key.
    pub idempotency_key: String,
    /// The producer's consent to external-model costs.
    pub accept_external_cost_risk: bool,
    /// State at claim time.
    pub state: RunState,
    /// Submit attempts so far.
    pub attempts: u32,
    /// Status checks so far.
    pub polls: u32,
    /// The row version after the claim: every later write compares against it.
    pub version: i64,
    /// Provider run id, once submitted.
    pub provider_run_id: Option<String>,
    /// When the provider accepted it.
    pub submitted_at: Option<DateTime<Utc>>,
    /// The worker whose expired lease this claim took over, if any.
    pub rescued_from: Option<String>,
    /// Why that lease had ended (set exactly when `rescued_from` is).
    pub rescue_cause: Option<RescueCause>,
    /// Since when a submit may be at the provider without its answer.
    pub submit_in_doubt_since: Option<DateTime<Utc>>,
    /// `wfq cancel` asked for the running run to be stopped.
    pub cancel_requested: bool,
    /// The provider's task id (Dify stops runs by it).
    pub task_id: Option<String>,
    /// How often a lost submit was sent again (`resubmits`).
    pub resubmits: u32,
    /// The runs it waits for (`depends_on`): each must have succeeded
    /// before anything is sent.
    pub depends_on: Vec<i64>,
    /// How long things have been so, measured by the database at the claim
    /// (the clock that wrote the timestamps), not by this worker's clock.
    pub ages: RunAges,
}

/// How long ago something happened to a run, on the database's clock at
/// claim time; [`RunAges::now`] adds the time since the claim.
#[derive(Debug, Clone, Copy)]
pub struct RunAges {
    /// When the claim's statement was sent (this worker's monotonic clock).
    pub claimed: std::time::Instant,
    /// Since `submitted_at`, or since `wfq retry` resumed the run.
    pub since_submit: Option<Duration>,
    /// Since `submit_in_doubt_since`.
    pub in_doubt_for: Option<Duration>,
    /// Since `unknown_status_since`.
    pub unknown_status_for: Option<Duration>,
    /// Since `provider_finished_at` while the money is not settled.
    pub unsettled_for: Option<Duration>,
}

impl RunAges {
    /// `age` as of now: what the database measured, plus the time since.
    pub fn now(&self, age: Option<Duration>) -> Option<Duration> {
        age.map(|a| a + self.claimed.elapsed())
    }
}

#[derive(sqlx::FromRow)]
struct ClaimRow {
    id: i64,
    provider: String,
    workflow_id: String,
    revision_id: Option<String>,
    inputs: Value,
    sent_inputs: Option<Value>,
    quote_amount: Option<rust_decimal::Decimal>,
    idempotency_key: String,
    accept_external_cost_risk: bool,
    state: String,
    attempts: i32,
    polls: i32,
    version: i64,
    provider_run_id: Option<String>,
    submitted_at: Option<DateTime<Utc>>,
    previous_owner: Option<String>,
    owner_marked_dead: Option<bool>,
    submit_in_doubt_since: Option<DateTime<Utc>>,
    cancel_requested: bool,
    task_id: Option<String>,
    resubmits: i32,
    depends_on: Option<Vec<i64>>,
    since_submit: Option<f64>,
    in_doubt_for: Option<f64>,
    unknown_status_for: Option<f64>,
    unsettled_for: Option<f64>,
}

/// Why a claim took a run over from another worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RescueCause {
    /// Its owner is marked dead: its session ended (`wfq.workers.died_at`).
    Crash,
    /// Its owner's lease ran out (a frozen or cut-off worker, or one
    /// without session liveness).
    LeaseExpiry,
}

impl RescueCause {
    /// The cause of a rescue whose previous owner is (or is not) marked dead.
    pub fn of(owner_marked_dead: bool) -> Self {
        if owner_marked_dead {
            RescueCause::Crash
        } else {
            RescueCause::LeaseExpiry
        }
    }

    /// `crash` or `lease_expiry` (the `lease_rescued` event's `cause`, the
    /// `wfq_rescues_total` label).
    pub fn as_str(self) -> &'static str {
        match self {
            RescueCause::Crash => "crash",
            RescueCause::LeaseExpiry => "lease_expiry",
        }
    }
}

/// Which runs a worker may take, as lanes of (provider profile, state):
/// every state of its active profiles; only submitted runs (to poll them)
/// of a profile that may not submit now (its balance, a breaker); only
/// queued runs (to fail them `UNKNOWN_PROVIDER`) of profiles it does not
/// have at all. Each lane is one range of `runs_claim_lane_idx` per
/// priority, so runs outside every lane cost a claim nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimScope {
    /// The lanes to claim from.
    pub lanes: Vec<(String, RunState)>,
}

impl ClaimScope {
    /// Every active state of each of `profiles`.
    pub fn all_of(profiles: &[String]) -> Self {
        let mut scope = ClaimScope::default();
        for profile in profiles {
            scope.add(
                profile,
                &[RunState::Queued, RunState::Submitting, RunState::Running],
            );
        }
        scope
    }

    /// Adds the lanes of `profile` in `states`.
    pub fn add(&mut self, profile: &str, states: &[RunState]) {
        for &state in states {
            self.lanes.push((profile.to_owned(), state));
        }
    }

    fn columns(&self) -> (Vec<String>, Vec<&'static str>) {
        self.lanes
            .iter()
            .map(|(profile, state)| (profile.clone(), state.as_str()))
            .unzip()
    }
}

/// Leases up to `limit` due runs for `worker`, highest priority first, then
/// oldest due. `SKIP LOCKED` lets many workers claim at once without waiting
/// on each other; the lease is what keeps a run theirs after the commit.
///
/// A leased run's `due_at` is moved to its lease's end: that is when
/// another worker may take it over, and it takes the run out of the range
/// of due runs that every claim walks. (Were its index entry left at the
/// front, every claim would step over the entries of runs in flight, and
/// each claim's new entries would keep the front leaf pages changing, which
/// stops index scans from marking dead entries: measured, a claim of 100
/// runs took 12-25 ms in the middle of a 20,000-run burst, 0.2 ms once the
/// front was quiet.)
///
/// Runs in a transaction of its own with [`CLAIM_SETTINGS`] (set for that
/// transaction only, so they never outlive it on a pooled connection and
/// work behind PgBouncer in transaction mode). The worker's claim loop
/// claims the same way over a [`ClaimConnection`].
#[tracing::instrument(name = "claim_due_runs", skip(pool, scope), err)]
pub async fn claim_due_runs(
    pool: &PgPool,
    worker: &str,
    limit: usize,
    lease: Duration,
    scope: &ClaimScope,
) -> Result<Vec<ClaimedRun>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    claim_with_settings(&mut conn, worker, limit, lease, scope).await
}

async fn claim_with_settings(
    conn: &mut PgConnection,
    worker: &str,
    limit: usize,
    lease: Duration,
    scope: &ClaimScope,
) -> Result<Vec<ClaimedRun>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let settings: Vec<String> = CLAIM_SETTINGS
        .iter()
        .map(|(name, value)| format!("set_config('{name}', '{value}', true)"))
        .collect();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {}",
        settings.join(", ")
    )))
    .execute(&mut *tx)
    .await?;
    let runs = claim_on(&mut tx, worker, limit, lease, scope).await?;
    tx.commit().await?;
    Ok(runs)
}

/// The settings a claim runs with, and why:
///
/// - `synchronous_commit = off`: a claim commits without waiting for the
///   WAL flush. A lease that a database crash forgets is harmless: nothing
///   is sent to a provider before the step's next write (`submitting`,
///   flushed, and flushing this one with it), and a poll changes nothing at
///   the provider.
/// - `enable_sort = off`: the planner walks `runs_claim_idx` in claim order
///   even when its statistics still describe an empty table (after a burst
///   of inserts it otherwise sorted every due run for each claim: 25 ms per
///   claim of 100 in a 20,000-run burst).
/// - `plan_cache_mode = force_custom_plan`: a plan per claim. A worker that
///   starts on an empty table otherwise keeps the generic plan it made then
///   (a nested loop over a sequential scan: 250-400 ms per claim once
///   20,000 runs had arrived).
/// - `enable_seqscan`, `enable_hashjoin`, `enable_mergejoin = off`: the
///   claimed rows are updated through their primary key, one by one. With
///   a hundred runs to claim and statistics from an emptier table, the
///   planner otherwise hashed them against a scan of the whole table.
/// - `jit = off`: the one sort left (of the few candidates the lanes
///   yield) carries the "disabled" cost of `enable_sort = off`, which would
///   otherwise make every claim compile its plan to machine code.
pub const CLAIM_SETTINGS: [(&str, &str); 7] = [
    ("synchronous_commit", "off"),
    ("enable_sort", "off"),
    ("plan_cache_mode", "force_custom_plan"),
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("jit", "off"),
];

/// The claim loop's own connection, outside the pool: a claim never waits
/// for a pooled connection behind the transition writers. It asks for
/// [`CLAIM_SETTINGS`] for its whole session at connect time, so a claim is
/// one round trip (measured: pick-up p50 4.6-4.9 ms and p99 12-18 ms this
/// way, 4.8-5.2 ms and 32-46 ms with the settings set per transaction).
/// Where the server does not take them (a pooler such as PgBouncer refuses
/// or ignores startup options), it falls back to setting them in each
/// claim's transaction. A connection that fails is dropped and opened again
/// on the next call.
pub struct ClaimConnection {
    options: PgConnectOptions,
    conn: Option<Session>,
}

struct Session {
    conn: PgConnection,
    /// Whether the session runs with [`CLAIM_SETTINGS`].
    has_settings: bool,
}

impl ClaimConnection {
    /// A connection to `pool`'s database, opened on first use. Its
    /// `application_name` is `wfq claim loop`, followed by the pool's own in
    /// parentheses when the pool has one (so one worker's sessions can be
    /// told apart in `pg_stat_activity`).
    pub fn new(pool: &PgPool) -> Self {
        let name = session_name("wfq claim loop", pool);
        let options = (*pool.connect_options()).clone().application_name(&name);
        ClaimConnection {
            options,
            conn: None,
        }
    }

    async fn connect(&self) -> Result<Session, sqlx::Error> {
        let with_settings = self.options.clone().options(CLAIM_SETTINGS);
        let mut conn = match PgConnection::connect_with(&with_settings).await {
            Ok(conn) => conn,
            // A pooler that refuses startup options (PgBouncer answers
            // 08P01 "unsupported startup parameter"): try without. Other
            // errors (unreachable, too many clients, starting up) are
            // retried with the options on the next call.
            Err(sqlx::Error::Database(e))
                if refuses_startup_options(e.code().as_deref(), e.message()) =>
            {
                tracing::info!(error = %e, "the server refused session settings for claims; setting them per claim");
                return Ok(Session {
                    conn: PgConnection::connect_with(&self.options).await?,
                    has_settings: false,
                });
            }
            Err(e) => return Err(e),
        };
        let checks: Vec<String> = CLAIM_SETTINGS
            .iter()
            .map(|(name, value)| format!("current_setting('{name}') = '{value}'"))
            .collect();
        let has_settings: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {}",
            checks.join(" AND ")
        )))
        .fetch_one(&mut conn)
        .await?;
        if !has_settings {
            tracing::info!(
                "the server ignored session settings for claims; setting them per claim"
            );
        }
        Ok(Session { conn, has_settings })
    }

    async fn with_session<T, F>(&mut self, f: F) -> Result<T, sqlx::Error>
    where
        F: AsyncFnOnce(&mut Session) -> Result<T, sqlx::Error>,
    {
        let session = match &mut self.conn {
            Some(session) => session,
            None => {
                let session =
                    within_call_timeout(CLAIM_CALL_TIMEOUT, "connecting", self.connect()).await?;
                self.conn.insert(session)
            }
        };
        let result =
            within_call_timeout(CLAIM_CALL_TIMEOUT, "a claim-loop statement", f(session)).await;
        if result.is_err() {
            // A statement error leaves the session usable, but a broken
            // connection does not say so; a new one costs one connect.
            self.conn = None;
        }
        result
    }

    /// [`claim_due_runs`] on this connection.
    #[tracing::instrument(name = "claim_due_runs", skip(self, scope), err)]
    pub async fn claim(
        &mut self,
        worker: &str,
        limit: usize,
        lease: Duration,
        scope: &ClaimScope,
    ) -> Result<Vec<ClaimedRun>, sqlx::Error> {
        self.with_session(async |session| {
            if session.has_settings {
                claim_on(&mut session.conn, worker, limit, lease, scope).await
            } else {
                claim_with_settings(&mut session.conn, worker, limit, lease, scope).await
            }
        })
        .await
    }

    /// [`next_due_in`] on this connection.
    pub async fn next_due_in(
        &mut self,
        scope: &ClaimScope,
    ) -> Result<Option<Duration>, sqlx::Error> {
        self.with_session(async |session| next_due_in(&mut session.conn, scope).await)
            .await
    }

    /// [`active_profiles`] on this connection.
    pub async fn active_profiles(&mut self) -> Result<Vec<String>, sqlx::Error> {
        self.with_session(async |session| active_profiles(&mut session.conn).await)
            .await
    }

    /// Whether claims run with session-wide settings (one round trip) or set
    /// them per claim. Opens the connection if needed.
    pub async fn has_session_settings(&mut self) -> Result<bool, sqlx::Error> {
        self.with_session(async |session| Ok(session.has_settings))
            .await
    }
}

/// `base`, with `pool`'s `application_name` in parentheses when it has one.
pub fn session_name(base: &str, pool: &PgPool) -> String {
    match pool.connect_options().get_application_name() {
        Some(name) if !name.is_empty() => format!("{base} ({name})"),
        _ => base.to_owned(),
    }
}

/// The longest a connect or statement of the claim loop may take: a host
/// that stopped answering (a failover leaving a half-open connection) must
/// not stall claiming until TCP gives up.
const CLAIM_CALL_TIMEOUT: Duration = Duration::from_secs(30);

async fn within_call_timeout<T>(
    limit: Duration,
    what: &str,
    call: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} took longer than {limit:?}"),
        ))),
    }
}

/// Whether a connect error means the server (a pooler) will not take
/// startup options, as opposed to being away or busy: PgBouncer answers
/// 08P01 "unsupported startup parameter: options".
fn refuses_startup_options(code: Option<&str>, message: &str) -> bool {
    code == Some("08P01") || message.contains("startup parameter")
}

/// The claim statement (`$1` worker, `$2` limit, `$3` lease in seconds,
/// `$4`/`$5` the lanes' profiles and states); public so tests can look at
/// its plan.
pub const CLAIM_DUE_RUNS_SQL: &str = r#"
        -- Each lane's priorities, highest first, one index descent each (a
        -- loose index scan); then each (lane, priority) is one range of
        -- `runs_claim_lane_idx` that ends at the first run not yet due, so a
        -- claim costs the runs it looks at, not every run in flight, and
        -- nothing for runs outside its lanes.
        WITH RECURSIVE lanes AS (
            SELECT * FROM unnest($4::text[], $5::text[]) AS l(provider, state)
        ),
        priorities AS (
            SELECT l.provider, l.state,
                   (SELECT r.priority FROM wfq.runs r
                    WHERE r.provider = l.provider AND r.state = l.state
                      AND r.state IN ('queued', 'submitting', 'running')
                    ORDER BY r.priority DESC LIMIT 1) AS priority
            FROM lanes l
            UNION ALL
            SELECT p.provider, p.state,
                   (SELECT r.priority FROM wfq.runs r
                    WHERE r.provider = p.provider AND r.state = p.state
                      AND r.state IN ('queued', 'submitting', 'running')
                      AND r.priority < p.priority
                    ORDER BY r.priority DESC LIMIT 1)
            FROM priorities p
            WHERE p.priority IS NOT NULL
        ),
        -- Rows are locked as they are read, so that claims running at once
        -- each skip what the others took and go on to the next runs. NO KEY
        -- UPDATE is enough (the key never changes) and does not block the
        -- key-share locks that inserts of run_events take on the row. A
        -- lane's rows read but not chosen stay locked until this claim
        -- commits (a few milliseconds).
        candidates AS (
            SELECT c.id, c.priority, c.due_at, c.previous_owner, p.provider, p.state
            FROM priorities p
            CROSS JOIN LATERAL (
                SELECT r.id, r.priority, r.due_at, r.lease_owner AS previous_owner
                FROM wfq.runs r
                WHERE r.provider = p.provider AND r.state = p.state
                  AND r.state IN ('queued', 'submitting', 'running')
                  AND r.priority = p.priority
                  AND r.due_at <= now()
                  AND (r.lease_expires_at IS NULL OR r.lease_expires_at <= now())
                ORDER BY r.due_at, r.id
                LIMIT $2
                FOR NO KEY UPDATE SKIP LOCKED
            ) c
            WHERE p.priority IS NOT NULL
        ),
        -- The lanes take turns within a priority: a claim is shared between
        -- a profile's runs to submit and its runs to check, so that when a
        -- profile's rate lets only a few be claimed at a time, a backlog of
        -- one kind cannot hold the other back (longest due first in each).
        turns AS (
            SELECT candidates.*, row_number() OVER (
                       PARTITION BY candidates.provider, candidates.state, candidates.priority
                       ORDER BY candidates.due_at, candidates.id) AS turn
            FROM candidates
        ),
        due AS (
            SELECT id, priority, due_at AS was_due, previous_owner
            FROM turns ORDER BY priority DESC, turn, due_at, id LIMIT $2
        ),
        claimed AS (
            UPDATE wfq.runs r
            SET lease_owner = $1,
                lease_expires_at = now() + make_interval(secs => $3),
                due_at = now() + make_interval(secs => $3),
                version = r.version + 1
            FROM due
            WHERE r.id = due.id
            RETURNING due.priority, due.was_due, r.id, r.provider, r.workflow_id, r.revision_id, r.inputs, r.sent_inputs,
                  r.quote_amount, r.idempotency_key, r.accept_external_cost_risk, r.state, r.attempts, r.polls,
                  r.version, r.provider_run_id, r.submitted_at, due.previous_owner,
                  r.submit_in_doubt_since, r.cancel_requested_at IS NOT NULL AS cancel_requested,
                  r.task_id, r.resubmits, r.depends_on,
                  extract(epoch FROM now() - GREATEST(r.submitted_at, r.resumed_at))::float8 AS since_submit,
                  extract(epoch FROM now() - r.submit_in_doubt_since)::float8 AS in_doubt_for,
                  extract(epoch FROM now() - r.unknown_status_since)::float8 AS unknown_status_for,
                  extract(epoch FROM now() - r.provider_finished_at)::float8 AS unsettled_for
        )
        -- Handed out in claim order: highest priority, then longest due.
        -- Whether a rescued run's previous owner is marked dead is looked
        -- up for rescued rows only (a CASE runs its subquery only when it
        -- gets there), so an ordinary claim pays nothing for it.
        SELECT claimed.*,
               CASE WHEN claimed.previous_owner IS NULL THEN NULL
                    ELSE EXISTS (SELECT 1 FROM wfq.workers w
                                 WHERE w.id = claimed.previous_owner AND w.died_at IS NOT NULL)
               END AS owner_marked_dead
        FROM claimed ORDER BY priority DESC, was_due, id
        "#;

async fn claim_on(
    conn: &mut PgConnection,
    worker: &str,
    limit: usize,
    lease: Duration,
    scope: &ClaimScope,
) -> Result<Vec<ClaimedRun>, sqlx::Error> {
    let (profiles, states) = scope.columns();
    let claimed = std::time::Instant::now();
    let rows: Vec<ClaimRow> = sqlx::query_as(CLAIM_DUE_RUNS_SQL)
        .bind(worker)
        .bind(limit as i64)
        .bind(lease.as_secs_f64())
        .bind(profiles)
        .bind(states)
        .fetch_all(conn)
        .await?;
    let age = |secs: Option<f64>| secs.map(|s| Duration::from_secs_f64(s.clamp(0.0, 1e9)));
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            // The CHECK constraint makes an unknown state impossible; a row
            // that has one anyway is skipped rather than crashing the batch.
            let state = RunState::parse(&row.state)?;
            Some(ClaimedRun {
                id: row.id,
                provider: row.provider,
                workflow_id: row.workflow_id,
                revision_id: row.revision_id,
                inputs: row.inputs,
                sent_inputs: row.sent_inputs,
                quote_amount: row.quote_amount,
                idempotency_key: row.idempotency_key,
                accept_external_cost_risk: row.accept_external_cost_risk,
                state,
                attempts: row.attempts.max(0) as u32,
                polls: row.polls.max(0) as u32,
                version: row.version,
                provider_run_id: row.provider_run_id,
                submitted_at: row.submitted_at,
                rescue_cause: row
                    .previous_owner
                    .as_ref()
                    .map(|_| RescueCause::of(row.owner_marked_dead.unwrap_or(false))),
                rescued_from: row.previous_owner,
                submit_in_doubt_since: row.submit_in_doubt_since,
                cancel_requested: row.cancel_requested,
                task_id: row.task_id,
                resubmits: row.resubmits.max(0) as u32,
                depends_on: row.depends_on.unwrap_or_default(),
                ages: RunAges {
                    claimed,
                    since_submit: age(row.since_submit),
                    in_doubt_for: age(row.in_doubt_for),
                    unknown_status_for: age(row.unknown_status_for),
                    unsettled_for: age(row.unsettled_for),
                },
            })
        })
        .collect())
}

/// How long until the next unleased run in `scope` becomes due, measured on
/// the database's clock so a skewed worker clock cannot make the loop spin
/// (`None`: nothing waiting). Leased runs are left out (their `due_at` is
/// their lease's end); a lease that runs out is found by the fallback poll.
/// Walks the claim lanes like the claim: one index descent per (lane,
/// priority).
#[tracing::instrument(name = "next_due_in", skip(db, scope), err, level = "debug")]
pub async fn next_due_in<'e>(
    db: impl PgExecutor<'e>,
    scope: &ClaimScope,
) -> Result<Option<Duration>, sqlx::Error> {
    let (profiles, states) = scope.columns();
    let seconds: Option<f64> = sqlx::query_scalar(
        r#"
        WITH RECURSIVE lanes AS (
            SELECT * FROM unnest($1::text[], $2::text[]) AS l(provider, state)
        ),
        priorities AS (
            SELECT l.provider, l.state,
                   (SELECT r.priority FROM wfq.runs r
                    WHERE r.provider = l.provider AND r.state = l.state
                      AND r.state IN ('queued', 'submitting', 'running')
                    ORDER BY r.priority DESC LIMIT 1) AS priority
            FROM lanes l
            UNION ALL
            SELECT p.provider, p.state,
                   (SELECT r.priority FROM wfq.runs r
                    WHERE r.provider = p.provider AND r.state = p.state
                      AND r.state IN ('queued', 'submitting', 'running')
                      AND r.priority < p.priority
                    ORDER BY r.priority DESC LIMIT 1)
            FROM priorities p
            WHERE p.priority IS NOT NULL
        )
        SELECT extract(epoch FROM min(f.due_at) - now())::float8
        FROM priorities p
        CROSS JOIN LATERAL (
            SELECT r.due_at FROM wfq.runs r
            WHERE r.provider = p.provider AND r.state = p.state
              AND r.state IN ('queued', 'submitting', 'running')
              AND r.priority = p.priority AND r.lease_owner IS NULL
            ORDER BY r.due_at LIMIT 1
        ) f
        WHERE p.priority IS NOT NULL
        "#,
    )
    .bind(profiles)
    .bind(states)
    .fetch_one(db)
    .await?;
    Ok(seconds.map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0))))
}

/// The provider profiles that have active runs, one index descent each
/// (a loose scan of `runs_claim_lane_idx`): how a worker finds queued runs
/// of profiles it does not have, to fail them `UNKNOWN_PROVIDER`.
#[tracing::instrument(name = "active_profiles", skip(db), err, level = "debug")]
pub async fn active_profiles<'e>(db: impl PgExecutor<'e>) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        WITH RECURSIVE profiles AS (
            (SELECT provider FROM wfq.runs
             WHERE state IN ('queued', 'submitting', 'running')
             ORDER BY provider LIMIT 1)
            UNION ALL
            SELECT (SELECT r.provider FROM wfq.runs r
                    WHERE r.state IN ('queued', 'submitting', 'running') AND r.provider > p.provider
                    ORDER BY r.provider LIMIT 1)
            FROM profiles p
            WHERE p.provider IS NOT NULL
        )
        SELECT provider FROM profiles WHERE provider IS NOT NULL
        "#,
    )
    .fetch_all(db)
    .await
}

/// Gives back every lease `worker` still holds, so another worker can go on
/// at once instead of waiting for the leases to expire. Used at shutdown.
#[tracing::instrument(name = "release_leases", skip(pool), err)]
pub async fn release_leases(pool: &PgPool, worker: &str) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        r#"
        WITH released AS (
            UPDATE wfq.runs
            SET lease_owner = NULL, lease_expires_at = NULL, due_at = now(),
                version = version + 1, updated_at = now()
            WHERE lease_owner = $1 AND state IN ('queued', 'submitting', 'running')
            RETURNING id, state
        )
        INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker)
        SELECT id, 'lease_released', state, state, $1 FROM released
        "#,
    )
    .bind(worker)
    .execute(pool)
    .await?;
    let released = done.rows_affected();
    if released > 0 {
        // Other workers may be asleep until their fallback poll; these runs
        // are due now.
        sqlx::query("SELECT pg_notify('wfq_runs_due', '')")
            .execute(pool)
            .await?;
    }
    Ok(released)
}

/// Records that `worker` took over run `id` from `previous`, and why (the
/// audit trail of rescues; the claim itself writes no event). Written as
/// the rescuing step starts: its time is when the run moved on.
#[tracing::instrument(name = "record_rescue", skip(pool), err)]
pub async fn record_rescue(
    pool: &PgPool,
    id: i64,
    state: RunState,
    previous: &str,
    cause: RescueCause,
    worker: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker, detail)
        VALUES ($1, 'lease_rescued', $2, $2, $3,
                jsonb_build_object('previous_owner', $4::text, 'cause', $5::text))
        "#,
    )
    .bind(id)
    .bind(state.as_str())
    .bind(worker)
    .bind(previous)
    .bind(cause.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Extends the lease of a run whose step is still working on it (reading a
/// Dify run's stream), if `worker` still holds it at `version`. Returns
/// whether a cancel was requested meanwhile; `None` when the run is no
/// longer ours.
#[tracing::instrument(name = "renew_lease", skip(pool), err, level = "debug")]
pub async fn renew_lease(
    pool: &PgPool,
    id: i64,
    version: i64,
    worker: &str,
    lease: Duration,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        UPDATE wfq.runs SET lease_expires_at = now() + make_interval(secs => $4),
                            due_at = now() + make_interval(secs => $4)
        WHERE id = $1 AND version = $2 AND lease_owner = $3
        RETURNING cancel_requested_at IS NOT NULL
        "#,
    )
    .bind(id)
    .bind(version)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rescue_is_a_crash_exactly_when_the_owner_is_marked_dead() {
        assert_eq!(RescueCause::of(true), RescueCause::Crash);
        assert_eq!(RescueCause::of(false), RescueCause::LeaseExpiry);
        assert_eq!(RescueCause::Crash.as_str(), "crash");
        assert_eq!(RescueCause::LeaseExpiry.as_str(), "lease_expiry");
    }

    #[test]
    fn only_a_refused_startup_option_turns_session_settings_off() {
        let cases = [
            (
                Some("08P01"),
                "unsupported startup parameter: options",
                true,
            ),
            (None, "unsupported startup parameter: options", true),
            (Some("08P01"), "protocol violation", true),
            (Some("53300"), "sorry, too many clients already", false),
            (Some("57P03"), "the database system is starting up", false),
            (Some("28P01"), "password authentication failed", false),
            (None, "connection refused", false),
        ];
        for (code, message, refused) in cases {
            assert_eq!(
                refuses_startup_options(code, message),
                refused,
                "{code:?} {message}"
            );
        }
    }

    #[tokio::test]
    async fn a_claim_loop_call_that_hangs_ends_in_a_timeout_error() {
        let hung = std::future::pending::<Result<(), sqlx::Error>>();
        let err = tokio::time::timeout(
            Duration::from_secs(5),
            within_call_timeout(Duration::from_millis(20), "a claim", hung),
        )
        .await
        .expect("the call limit ends the wait, not this test's")
        .unwrap_err();
        let sqlx::Error::Io(io) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            err.to_string().contains("a claim took longer than"),
            "{err}"
        );
        // A call that answers in time passes its answer through.
        let answered =
            within_call_timeout(Duration::from_secs(5), "a claim", async { Ok(7) }).await;
        assert_eq!(answered.unwrap(), 7);
    }
}
