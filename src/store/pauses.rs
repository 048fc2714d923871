//! Paused provider profiles, as operators see them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// A provider profile that a worker paused.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ProviderPause {
    /// The profile name.
    pub profile: String,
    /// Since when.
    pub paused_at: DateTime<Utc>,
    /// Which worker paused it (the latest one to do so).
    pub worker: String,
    /// The provider's refusal.
    pub reason: String,
}

/// Records that `worker` paused `profile`.
#[tracing::instrument(name = "pause_provider", skip(pool), err)]
pub async fn pause_provider(
    pool: &PgPool,
    profile: &str,
    worker: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        INSERT INTO wfq.provider_pauses (profile, worker, reason) VALUES ($1, $2, $3)
        ON CONFLICT (profile) DO UPDATE SET worker = EXCLUDED.worker, reason = EXCLUDED.reason
        "#,
    )
    .bind(profile)
    .bind(worker)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Clears the pause of `profile`.
#[tracing::instrument(name = "resume_provider", skip(pool), err)]
pub async fn resume_provider(pool: &PgPool, profile: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM wfq.provider_pauses WHERE profile = $1")
        .bind(profile)
        .execute(pool)
        .await?;
    Ok(())
}

/// Every paused profile.
pub async fn paused_providers(pool: &PgPool) -> Result<Vec<ProviderPause>, sqlx::Error> {
    sqlx::query_as(
        "SELECT profile, paused_at, worker, reason FROM wfq.provider_pauses ORDER BY profile",
    )
    .fetch_all(pool)
    .await
}
