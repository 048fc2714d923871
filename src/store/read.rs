//! Reading runs and their events back (`wfq show`, `wfq list`, the demo).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

/// A run as stored, for display.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunRow {
    /// Run id.
    pub id: i64,
    /// Provider profile.
    pub provider: String,
    /// Workflow.
    pub workflow_id: String,
    /// Revision (pinned at submit when the producer gave none).
    pub revision_id: Option<String>,
    /// The producer's inputs.
    pub inputs: Value,
    /// The inputs as sent.
    pub sent_inputs: Option<Value>,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Consent to external-model costs.
    pub accept_external_cost_risk: bool,
    /// Higher first.
    pub priority: i32,
    /// Not submitted before.
    pub not_before: Option<DateTime<Utc>>,
    /// The producer's own data.
    pub metadata: Option<Value>,
    /// State.
    pub state: String,
    /// Submit attempts.
    pub attempts: i32,
    /// Status checks.
    pub polls: i32,
    /// Next step due.
    pub due_at: DateTime<Utc>,
    /// Lease holder.
    pub lease_owner: Option<String>,
    /// Lease end.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The run this one repeats.
    pub retry_of: Option<i64>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Accepted by the provider.
    pub submitted_at: Option<DateTime<Utc>>,
    /// Became final.
    pub finished_at: Option<DateTime<Utc>>,
    /// Money became final.
    pub settled_at: Option<DateTime<Utc>>,
    /// Last write.
    pub updated_at: DateTime<Utc>,
    /// Provider run id.
    pub provider_run_id: Option<String>,
    /// Engine task id.
    pub task_id: Option<String>,
    /// Engine prompt id.
    pub prompt_id: Option<String>,
    /// Billing record id.
    pub billing_run_id: Option<String>,
    /// Provider run status.
    pub run_status: Option<String>,
    /// Provider freeze status.
    pub freeze_status: Option<String>,
    /// Provider submission status.
    pub submission_status: Option<String>,
    /// Provider settlement status.
    pub settlement_status: Option<String>,
    /// Outputs.
    pub outputs: Option<Value>,
    /// Currency.
    pub currency: Option<String>,
    /// Quote.
    pub quote_amount: Option<Decimal>,
    /// Frozen.
    pub frozen_amount: Option<Decimal>,
    /// Charged.
    pub final_amount: Option<Decimal>,
    /// Given back.
    pub released_amount: Option<Decimal>,
    /// Compute cost.
    pub compute_cost: Option<Decimal>,
    /// External model cost.
    pub external_model_cost: Option<Decimal>,
    /// Total cost.
    pub total_cost: Option<Decimal>,
    /// Tokens used (Dify, GPTBots).
    pub total_tokens: Option<i64>,
    /// A submit may be at the provider without its answer since then.
    pub submit_in_doubt_since: Option<DateTime<Utc>>,
    /// `wfq cancel` asked for the running run to be stopped.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Error code.
    pub error_code: Option<String>,
    /// Error message.
    pub error_message: Option<String>,
    /// Structured error detail.
    pub error_detail: Option<Value>,
    /// The runs that must succeed before this one is submitted (chains).
    pub depends_on: Option<Vec<i64>>,
    /// `fail` or `cancel`: what a failed dependency does to this run.
    pub on_dependency_failure: String,
}

// A macro rather than a const so that `concat!` builds static SQL strings.
macro_rules! run_columns {
    () => {
        "id, provider, workflow_id, revision_id, inputs, sent_inputs, idempotency_key, \
         accept_external_cost_risk, priority, not_before, metadata, state, attempts, polls, \
         due_at, lease_owner, lease_expires_at, retry_of, created_at, submitted_at, finished_at, \
         settled_at, updated_at, provider_run_id, task_id, prompt_id, billing_run_id, run_status, \
         freeze_status, submission_status, settlement_status, outputs, currency, quote_amount, \
         frozen_amount, final_amount, released_amount, compute_cost, external_model_cost, \
         total_cost, total_tokens, submit_in_doubt_since, cancel_requested_at, error_code, \
         error_message, error_detail, depends_on, on_dependency_failure"
    };
}
pub(crate) use run_columns;

/// One run, or `None`.
pub async fn show_run(pool: &PgPool, id: i64) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        run_columns!(),
        " FROM wfq.runs WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// The newest runs, optionally of one state.
pub async fn list_runs(
    pool: &PgPool,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<RunRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        run_columns!(),
        " FROM wfq.runs WHERE ($1::text IS NULL OR state = $1) ORDER BY id DESC LIMIT $2"
    ))
    .bind(state)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One audit entry.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EventRow {
    /// When.
    pub at: DateTime<Utc>,
    /// What.
    pub kind: String,
    /// State before.
    pub from_state: Option<String>,
    /// State after.
    pub to_state: Option<String>,
    /// Which worker.
    pub worker: Option<String>,
    /// Provider answer or reason.
    pub detail: Option<Value>,
}

/// A run's audit trail, oldest first.
pub async fn run_events(pool: &PgPool, id: i64) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT at, kind, from_state, to_state, worker, detail FROM wfq.run_events \
         WHERE run_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}
