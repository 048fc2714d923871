//! Every SQL statement wfq runs. The store never speaks HTTP.
//!
//! Queries are built at runtime (`sqlx::query`), so a build never needs a live
//! database; the integration tests run each of them against PostgreSQL.

mod claim;
mod pauses;
mod read;
mod requests;
mod retention;
mod transition;

pub use claim::{
    ClaimScope, ClaimedRun, claim_due_runs, next_due_in, record_rescue, release_leases,
};
pub use pauses::{ProviderPause, pause_provider, paused_providers, resume_provider};
pub use read::{EventRow, RunRow, list_runs, run_events, show_run};
pub use requests::{
    CancelOutcome, NewRun, RequestError, RetryOutcome, cancel_run, enqueue_run, retry_run,
};
pub use retention::prune_finished_runs;
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
