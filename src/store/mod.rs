//! Every SQL statement wfq runs. The store never speaks HTTP.
//!
//! Queries are built at runtime (`sqlx::query`), so a build never needs a live
//! database; the integration tests run each of them against PostgreSQL.

mod callbacks;
mod claim;
mod metrics;
mod pauses;
mod read;
mod requests;
mod retention;
mod spend;
mod stats;
mod transition;

pub use callbacks::{
    CallbackAttempt, ClaimedCallback, claim_due_callbacks, pending_callbacks,
    record_callback_attempts,
};
pub use claim::{
    CLAIM_DUE_RUNS_SQL, CLAIM_SETTINGS, ClaimConnection, ClaimScope, ClaimedRun, claim_due_runs,
    next_due_in, record_rescue, release_leases, renew_lease,
};
pub use metrics::{count_runs, outstanding_frozen, ping};
pub use pauses::{ProviderPause, pause_provider, paused_providers, resume_provider};
pub use read::{EventRow, RunRow, list_runs, run_events, show_run};
pub use requests::{
    CancelOutcome, NewRun, RequestError, RetryOutcome, cancel_run, enqueue_run, retry_run,
};
pub use retention::prune_finished_runs;
pub use spend::{Guarded, GuardedRun, begin_within_limits, check_timezone, hold_run};
pub use stats::{StateCount, queue_stats};
pub use transition::{TransitionWrite, apply_transition, apply_transitions};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::DatabaseConfig;

/// The states in which a run still needs a worker.
pub const ACTIVE_STATES: [&str; 3] = ["queued", "submitting", "running"];

/// Opens a pool to the configured database.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(config.url.expose())
        .await
}

/// Applies the migrations in `migrations/` (idempotent).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
}

/// Errors worth repeating the same statement for: the connection, not the
/// statement, was the problem.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P01..03: server shutting down / unavailable; 40001: serialization
            code.starts_with("08") || code.starts_with("57P") || code == "40001"
        }),
        _ => false,
    }
}
