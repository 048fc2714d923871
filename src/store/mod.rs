//! Every SQL statement wfq runs. The store never speaks HTTP.
//!
//! Queries are built at runtime (`sqlx::query`), so a build never needs a live
//! database; the integration tests run each of them against PostgreSQL.

mod callbacks;
mod chains;
mod claim;
mod files;
mod leases;
mod metrics;
mod pauses;
mod read;
mod requests;
mod retention;
mod spend;
mod stats;
mod submits;
mod transition;
mod workers;

pub use callbacks::{
    CallbackAttempt, ClaimedCallback, claim_due_callbacks, pending_callbacks,
    record_callback_attempts,
};
pub use chains::{
    ChainLink, ChainPlace, PipelineRow, chain_place, dependency_outputs, pipeline_of,
};
pub use claim::{
    CLAIM_DUE_RUNS_SQL, CLAIM_SETTINGS, ClaimConnection, ClaimScope, ClaimedRun, RescueCause,
    RunAges, active_profiles, claim_due_runs, next_due_in, record_rescue, release_leases,
    renew_lease, session_name,
};
pub use files::{
    ClaimedMirror, DONE_UPLOAD_RENEW_MARGIN, InputFileFacts, MirrorRecord, PlannedFile, RunFileRow,
    UnplannedRun, UploadClaim, begin_upload, claim_due_mirrors, fail_upload, finish_upload,
    forget_stored_files, input_file, media_of_run, mirror_counts, next_mirror_due,
    prunable_runs_with_files, record_input_link, record_mirrors, record_plan, record_read_failure,
    release_mirror_leases, reusable_upload, reuse_upload, run_files, unplanned_runs,
};
pub use leases::{give_back_idle_leases, renew_leases};
pub use metrics::{count_runs, outstanding_frozen, ping};
pub use pauses::{
    ProviderPause, given_back_for, manual_pauses, pause_provider, paused_providers,
    requeue_refused, resume_provider,
};
pub use read::{EventRow, RunRow, list_runs, run_events, show_run};
pub use requests::{
    CancelOutcome, NewRun, RequestError, RetryOutcome, cancel_run, enqueue_run, retry_run,
};
pub use retention::{prune_finished_runs, runs_kept_for_their_files};
pub use spend::{
    Guarded, GuardedRun, begin_within_limits, check_timezone, committed_now, hold_run,
    next_budget_day, record_budget_timezone, wake_held_runs, wake_unknown_cost_holds,
};
pub use stats::{StateCount, queue_stats};
pub use submits::{LateAnswer, UnsentSubmit, record_late_acceptance, record_unsent_submit};
pub use transition::{TransitionWrite, apply_transition, apply_transitions, written_transitions};
pub use workers::{
    LIVENESS_LOCK_NAMESPACE, RescuePolicy, Rescued, SessionKeepalives, WorkerInfo, WorkerProbe,
    WorkerRow, configure_liveness_session, forget_dead_workers, list_workers, lock_worker,
    probe_workers, rescue_workers, unlock_worker, upsert_worker, worker_heartbeat, worker_stopped,
};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::DatabaseConfig;

/// Every state of a run, in lifecycle order (`waiting`: a chained run
/// whose dependencies have not all succeeded).
pub const RUN_STATES: [&str; 7] = [
    "waiting",
    "queued",
    "submitting",
    "running",
    "succeeded",
    "failed",
    "canceled",
];

/// The states in which a run is not final yet (a `waiting` run is not
/// claimed, but will be once its dependencies succeed).
pub const ACTIVE_STATES: [&str; 4] = ["waiting", "queued", "submitting", "running"];

/// Opens a pool to the configured database.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(config.url.expose())
        .await
}

/// Applies the migrations in `migrations/` (idempotent), safely on a live,
/// large table: migrations take their locks with a short `lock_timeout`
/// (waiting behind a long transaction would queue every producer and
/// worker behind the migration), so one that times out is tried again
/// after a pause; and an index left invalid by an interrupted
/// `CREATE INDEX CONCURRENTLY` is dropped first, so its migration builds
/// it again instead of keeping a useless index.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    const TRIES: u32 = 30;
    let mut pause = std::time::Duration::from_secs(1);
    for attempt in 1.. {
        drop_invalid_indexes(pool).await?;
        match sqlx::migrate!("./migrations").run(pool).await {
            Err(e) if attempt < TRIES && timed_out_on_a_lock(&e) => {
                tracing::warn!(error = %e, retry_in = ?pause, "a migration waited too long for a lock (a long transaction holds the table); trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(30));
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

fn timed_out_on_a_lock(e: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    let (MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _)) = e else {
        return false;
    };
    // 55P03: lock_not_available (lock_timeout).
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// Drops the indexes of the `wfq` schema that an interrupted concurrent
/// build left invalid (none is being built right now).
async fn drop_invalid_indexes(pool: &PgPool) -> Result<(), sqlx::Error> {
    let invalid: Vec<String> = sqlx::query_scalar(
        r#"
        SELECT format('%I.%I', n.nspname, c.relname)
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'wfq' AND NOT i.indisvalid
          AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                          WHERE p.index_relid = i.indexrelid)
        "#,
    )
    .fetch_all(pool)
    .await?;
    for index in invalid {
        tracing::warn!(index = %index, "dropping an index an interrupted build left invalid; the migration builds it again");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {index}"
        )))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Errors where PostgreSQL refused the data itself (a NUL character, a
/// value too large, a number out of range): repeating the same write can
/// never succeed. Class 22 is "data exception", 54 "program limit exceeded".
pub fn is_data_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|code| code.starts_with("22") || code.starts_with("54")))
}

/// Errors worth repeating the same statement for: the connection, not the
/// statement, was the problem.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P01..03: server shutting down /
            // unavailable; 40001: serialization; 40P01: a deadlock (two
            // finishes releasing the same chained run from opposite ends)
            // aborted the statement, which holds no lock any more.
            code.starts_with("08") || code.starts_with("57P") || code == "40001" || code == "40P01"
        }),
        _ => false,
    }
}
