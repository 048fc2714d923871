//! Provider clients: HTTP on one side, the typed reports the lifecycle
//! understands on the other. Providers never touch the database.

pub mod chenyu;

use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Map, Value};

pub use chenyu::ChenyuClient;

/// A workflow's published parameter manifest, as the worker needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The workflow it describes.
    pub workflow_id: String,
    /// The published revision; pinned on a run that has none.
    pub revision_id: String,
    /// The quote's currency, e.g. `CNY`.
    pub currency: Option<String>,
    /// The quote: what will be frozen at submit.
    pub quote_amount: Option<Decimal>,
    /// Whether a submit must accept the external-model cost risk.
    pub may_incur_external_cost: bool,
    /// The editable inputs.
    pub parameters: Vec<Parameter>,
}

/// One editable input of a workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    /// The key to use in `inputs`.
    pub key: String,
    /// What the value must look like.
    pub kind: ParamKind,
    /// Whether the provider needs a value (ours or the default).
    pub required: bool,
    /// Filled in when the producer leaves the key out.
    pub default_value: Option<Value>,
}

/// The type of an editable input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamKind {
    /// Any JSON string.
    String,
    /// A whole number.
    Int,
    /// Any number.
    Float,
    /// `true` or `false`.
    Bool,
    /// A media file (`image`, `video`, `audio`, ...): an http(s) URL or an `asset://` URI.
    Media(String),
    /// A type wfq does not know yet: accepted as is, the provider decides.
    Other(String),
}

impl ParamKind {
    /// Reads a manifest's `type` string.
    pub fn parse(kind: &str) -> ParamKind {
        match kind {
            "string" | "text" => ParamKind::String,
            "int" | "integer" => ParamKind::Int,
            "float" | "number" => ParamKind::Float,
            "bool" | "boolean" => ParamKind::Bool,
            "image" | "video" | "audio" | "file" | "media" => ParamKind::Media(kind.to_owned()),
            other => ParamKind::Other(other.to_owned()),
        }
    }
}

/// What a submit sends.
#[derive(Debug, Clone)]
pub struct SubmitRequest<'a> {
    /// The workflow to run.
    pub workflow_id: &'a str,
    /// The revision to run.
    pub revision_id: &'a str,
    /// The complete inputs (defaults filled in).
    pub inputs: &'a Map<String, Value>,
    /// The run's key, identical on every attempt.
    pub idempotency_key: &'a str,
    /// The producer's consent to external-model costs.
    pub accept_external_cost_risk: bool,
}

/// The provider's answer to a submit, as far as it can be known.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmitOutcome {
    /// The run exists at the provider (new, or replayed for the same key).
    Accepted(Accepted),
    /// The provider refused the run; trying again cannot help.
    Rejected(ProviderError),
    /// The answer is unknown or says "later": retry with the same key.
    Unclear(Unclear),
}

/// A run the provider accepted.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Accepted {
    /// The provider's run id (chenyu `run_order_id`).
    pub provider_run_id: String,
    /// Revision that runs.
    pub revision_id: Option<String>,
    /// Engine task id.
    pub task_id: Option<String>,
    /// Engine prompt id.
    pub prompt_id: Option<String>,
    /// Billing record id.
    pub billing_run_id: Option<String>,
    /// Currency of the amounts.
    pub currency: Option<String>,
    /// The quote.
    pub quote_amount: Option<Decimal>,
    /// What was frozen: the quote, when `freeze_status` says frozen.
    pub frozen_amount: Option<Decimal>,
    /// Provider's freeze status, verbatim.
    pub freeze_status: Option<String>,
    /// Provider's run status, verbatim.
    pub run_status: Option<String>,
    /// True when the provider replayed an earlier submit of the same key.
    pub idempotent_replay: bool,
    /// The answer's data object, for the audit trail.
    pub raw: Value,
}

/// A definite refusal from the provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderError {
    /// A stable code: the provider's `engine_code`, else `PROVIDER_CODE_<n>`.
    pub code: String,
    /// Human-readable reason and detail.
    pub message: String,
    /// The provider's error object, verbatim.
    pub detail: Value,
    /// The HTTP status it came with.
    pub http_status: u16,
}

/// Why an answer could not be used; the call is safe to repeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Unclear {
    /// What happened, for the log and the events (never contains the API key).
    pub reason: String,
    /// The HTTP status, when an answer arrived at all.
    pub http_status: Option<u16>,
    /// The provider's own wait hint (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// The provider refused our credentials: not the run's fault, so the
    /// attempt does not count against the run.
    pub unauthorized: bool,
}

/// The provider's answer to a status check.
#[derive(Debug, Clone, PartialEq)]
pub enum PollOutcome {
    /// A readable status report (boxed: it is much larger than the others).
    Report(Box<RunReport>),
    /// The provider says the run does not exist or cannot be read.
    Rejected(ProviderError),
    /// No usable answer this time.
    Unclear(Unclear),
}

/// The provider's view of a run, as typed values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunReport {
    /// Where the run is.
    pub status: RunStatus,
    /// Provider's run status, verbatim.
    pub run_status: Option<String>,
    /// Freeze status, verbatim.
    pub freeze_status: Option<String>,
    /// Submission status, verbatim.
    pub submission_status: Option<String>,
    /// Settlement status, verbatim.
    pub settlement_status: Option<String>,
    /// Engine task id.
    pub task_id: Option<String>,
    /// Engine prompt id.
    pub prompt_id: Option<String>,
    /// Outputs (an object), once there are any.
    pub outputs: Option<Value>,
    /// Currency of the amounts.
    pub currency: Option<String>,
    /// The quote.
    pub quote_amount: Option<Decimal>,
    /// Compute cost.
    pub compute_cost: Option<Decimal>,
    /// External model cost.
    pub external_model_cost: Option<Decimal>,
    /// Total cost.
    pub total_cost: Option<Decimal>,
    /// What was finally charged.
    pub final_amount: Option<Decimal>,
    /// What was given back.
    pub released_amount: Option<Decimal>,
    /// The provider's error code for a failed run.
    pub error_code: Option<String>,
    /// The provider's error message for a failed run.
    pub error_message: Option<String>,
    /// Whether the money is final.
    pub settled: bool,
    /// The answer's data object, for the audit trail.
    pub raw: Value,
}

/// A provider run's status, reduced to what the lifecycle decides on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RunStatus {
    /// Waiting or executing at the provider.
    #[default]
    Active,
    /// Finished with outputs.
    Succeeded,
    /// Finished without success.
    Failed,
    /// A status value wfq does not know; it keeps polling until the deadline.
    Unknown(String),
}

impl RunStatus {
    /// Whether the provider's run has ended.
    pub fn is_final(&self) -> bool {
        matches!(self, RunStatus::Succeeded | RunStatus::Failed)
    }
}

/// Why the manifest could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum ManifestError {
    /// The provider refused (e.g. unknown workflow).
    Rejected(ProviderError),
    /// No usable answer this time.
    Unclear(Unclear),
}

/// A client for one provider profile.
#[derive(Debug, Clone)]
pub enum ProviderClient {
    /// chenyu open API v2.
    Chenyu(ChenyuClient),
}

impl ProviderClient {
    /// Reads the published manifest of a workflow.
    pub async fn manifest(&self, workflow_id: &str) -> Result<Manifest, ManifestError> {
        match self {
            ProviderClient::Chenyu(c) => c.manifest(workflow_id).await,
        }
    }

    /// Submits a run.
    pub async fn submit(&self, request: &SubmitRequest<'_>) -> SubmitOutcome {
        match self {
            ProviderClient::Chenyu(c) => c.submit(request).await,
        }
    }

    /// Checks a run's status.
    pub async fn poll(&self, provider_run_id: &str) -> PollOutcome {
        match self {
            ProviderClient::Chenyu(c) => c.poll(provider_run_id).await,
        }
    }
}
