//! Chains of runs: what a chained run's references resolve to, and where a
//! run sits in its chain. The bookkeeping itself (waiting, release, the
//! failure of a chain) is done by the triggers of migration
//! `20261224000001_chains`, in the transaction of each write.

use serde::Serialize;
use sqlx::PgExecutor;

use crate::chains::Dependency;

/// The runs `ids` as a chained run's references need them: state, outputs
/// and mirrored outputs.
#[tracing::instrument(name = "dependency_outputs", skip(db), err)]
pub async fn dependency_outputs<'e>(
    db: impl PgExecutor<'e>,
    ids: &[i64],
) -> Result<Vec<Dependency>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT id, state, error_code, outputs, mirrored_outputs, media_state,
               extract(epoch FROM now() - finished_at)::float8 AS finished_secs_ago
        FROM wfq.runs WHERE id = ANY($1)
        "#,
    )
    .bind(ids)
    .fetch_all(db)
    .await
}

/// A run next to the one shown: one it waits for, or one that waits for it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ChainLink {
    /// The other run.
    pub id: i64,
    /// Its workflow.
    pub workflow_id: String,
    /// Its state.
    pub state: String,
    /// Its error code, if it failed.
    pub error_code: Option<String>,
}

/// Where a run sits in its chain: the runs it depends on, and the runs that
/// depend on it (one level each way).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChainPlace {
    /// What it waits for (`depends_on`).
    pub waits_on: Vec<ChainLink>,
    /// What waits for it.
    pub waited_on_by: Vec<ChainLink>,
}

impl ChainPlace {
    /// Whether the run is in no chain.
    pub fn is_empty(&self) -> bool {
        self.waits_on.is_empty() && self.waited_on_by.is_empty()
    }
}

/// The runs `id` depends on and the runs that depend on it.
#[tracing::instrument(name = "chain_place", skip(db), err)]
pub async fn chain_place<'e>(
    db: impl PgExecutor<'e> + Copy,
    id: i64,
) -> Result<ChainPlace, sqlx::Error> {
    let waits_on = sqlx::query_as(
        r#"
        SELECT d.id, d.workflow_id, d.state, d.error_code
        FROM wfq.runs r CROSS JOIN LATERAL unnest(r.depends_on) dep
        JOIN wfq.runs d ON d.id = dep
        WHERE r.id = $1 ORDER BY d.id
        "#,
    )
    .bind(id)
    .fetch_all(db)
    .await?;
    let waited_on_by = sqlx::query_as(
        r#"
        SELECT c.id, c.workflow_id, c.state, c.error_code
        FROM wfq.runs c WHERE c.depends_on @> ARRAY[$1::bigint] ORDER BY c.id
        "#,
    )
    .bind(id)
    .fetch_all(db)
    .await?;
    Ok(ChainPlace {
        waits_on,
        waited_on_by,
    })
}

/// One chain of `wfq.pipeline_runs`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PipelineRow {
    /// The chain's root run.
    pub root_run_id: i64,
    /// succeeded, running, failed or canceled.
    pub state: String,
    /// Its runs.
    pub runs: i64,
    /// Of which succeeded.
    pub succeeded: i64,
    /// Of which failed.
    pub failed: i64,
    /// Of which were canceled.
    pub canceled: i64,
    /// The run whose failure came first (not a DEPENDENCY_FAILED one).
    pub failed_run_id: Option<i64>,
    /// Its error code.
    pub failed_error_code: Option<String>,
    /// The sum of its runs' total costs.
    pub total_cost: rust_decimal::Decimal,
    /// From the root's creation to the last finish (once all are final).
    pub duration_secs: Option<f64>,
}

/// The chain of which `root` is the root, from `wfq.pipeline_runs`.
#[tracing::instrument(name = "pipeline_of", skip(db), err)]
pub async fn pipeline_of<'e>(
    db: impl PgExecutor<'e>,
    root: i64,
) -> Result<Option<PipelineRow>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT root_run_id, state, runs, succeeded, failed, canceled, failed_run_id,
               failed_error_code, total_cost, extract(epoch FROM duration)::float8 AS duration_secs
        FROM wfq.pipeline_runs WHERE root_run_id = $1
        "#,
    )
    .bind(root)
    .fetch_optional(db)
    .await
}
