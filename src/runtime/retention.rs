//! The worker's periodic prune of old finished runs (`[retention]`).

use std::time::Duration;

use sqlx::PgPool;

use crate::config::RetentionConfig;
use crate::store;

/// Prunes every `config.every` until the task is aborted. Several workers
/// may prune at once: `SKIP LOCKED` batches keep them out of each other's way.
pub async fn prune_periodically(pool: PgPool, config: RetentionConfig) {
    loop {
        match store::prune_finished_runs(&pool, config.finished_before, config.batch).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "pruned old finished runs"),
            Err(e) => {
                tracing::warn!(error = %e, "pruning old finished runs failed; trying again later")
            }
        }
        // Jitter, so that a fleet started together does not prune together.
        let spread = config.every.mul_f64(0.1 * fastrand::f64());
        tokio::time::sleep(config.every + spread.min(Duration::from_secs(600))).await;
    }
}
