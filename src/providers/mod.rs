//! Provider clients: HTTP on one side, the typed reports the lifecycle
//! understands on the other. Providers never touch the database.

pub mod chenyu;
pub mod dify;
mod edge;
pub mod files;
pub mod gptbots;
mod sse;
pub mod storable;
mod wire;

use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Map, Value};

pub use chenyu::ChenyuClient;
pub use dify::{DifyClient, RunStream, StreamEnd};
pub use edge::ERROR_REPAIRS_KEY;
pub use files::{FileLimits, UploadOutcome, UploadSource};
pub use gptbots::GptbotsClient;
pub use storable::{AnswerLimits, Repairs};

/// A workflow's published parameter manifest, as the worker needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The workflow it describes.
    pub workflow_id: String,
    /// The published revision; pinned on a run that has none (`None`: the
    /// provider does not name revisions, the run goes to what is published).
    pub revision_id: Option<String>,
    /// The quote's currency, e.g. `CNY`.
    pub currency: Option<String>,
    /// The quote: what will be frozen at submit.
    pub quote_amount: Option<Decimal>,
    /// Whether a submit must accept the external-model cost risk.
    pub may_incur_external_cost: bool,
    /// The editable inputs.
    pub parameters: Vec<Parameter>,
    /// The output manifest: each output key with its type (chenyu
    /// `candidate_output_manifest`, e.g. `("n9_images", "image")`); empty
    /// when the provider states none.
    pub output_types: Vec<(String, String)>,
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
    /// The longest string the provider takes (Dify `max_length`).
    pub max_chars: Option<usize>,
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
    /// One of a fixed list of strings (Dify `select`).
    Choice(Vec<String>),
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

/// What a submit sends, and how its refusal is read.
#[derive(Debug, Clone)]
pub struct SubmitRequest<'a> {
    /// The workflow to run.
    pub workflow_id: &'a str,
    /// The revision to run (`None`: the published one).
    pub revision_id: Option<&'a str>,
    /// The complete inputs (defaults filled in).
    pub inputs: &'a Map<String, Value>,
    /// The run's key, identical on every attempt.
    pub idempotency_key: &'a str,
    /// The producer's consent to external-model costs.
    pub accept_external_cost_risk: bool,
    /// The profile's refusal codes about the account (`account_refusals`):
    /// an answer carrying one refuses the account, whatever its status
    /// line (GPTBots and Dify refuse a cap on runs at once with HTTP 429),
    /// and is read as [`SubmitOutcome::Rejected`] with that code.
    pub account_refusals: &'a [String],
}

/// Whether `code` is one of a profile's refusal codes about the account
/// (`account_refusals`), compared as providers spell codes either way.
pub fn is_account_refusal(code: &str, account_refusals: &[String]) -> bool {
    account_refusals
        .iter()
        .any(|listed| listed.eq_ignore_ascii_case(code))
}

/// The provider's answer to a submit, as far as it can be known.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per submit, moved a few times; boxing `Accepted` would change every caller"
)]
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
    /// What was changed in the answer to make it storable (empty: nothing).
    pub repairs: Repairs,
}

/// A definite refusal from the provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderError {
    /// A stable code: the provider's `engine_code`, else `PROVIDER_CODE_<n>`.
    pub code: String,
    /// Human-readable reason and detail.
    pub message: String,
    /// The provider's error object, verbatim but storable: what had to be
    /// changed is counted under [`ERROR_REPAIRS_KEY`].
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
    /// The provider refused our account (a wrong key, or Dify's quota
    /// `rate_limit_error`): not the run's fault, so the attempt does not
    /// count against the run, and the worker pauses the provider profile.
    pub account_refused: bool,
    /// The provider certainly created nothing (refused before any work:
    /// a connection that never opened, a 429). Only this makes a repeat
    /// safe for a provider without idempotency keys.
    pub nothing_created: bool,
}

impl Unclear {
    /// An unclear answer with only a reason and maybe a status.
    pub fn new(reason: impl Into<String>, http_status: Option<u16>) -> Self {
        Unclear {
            reason: reason.into(),
            http_status,
            retry_after: None,
            account_refused: false,
            nothing_created: false,
        }
    }

    /// Turns a transport error into an unclear answer. A connection that
    /// could not be opened carried no request, so nothing was created.
    pub fn from_transport(e: reqwest::Error) -> Self {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "could not connect"
        } else if e.is_body() || e.is_decode() {
            "the answer broke off"
        } else {
            "request failed"
        };
        // A connection that never opened (refused, or timed out while
        // connecting) carried no request bytes.
        let nothing_created = e.is_connect();
        Unclear {
            nothing_created,
            // Without the URL: a query string has no business in the logs.
            ..Unclear::new(format!("{what}: {}", e.without_url()), None)
        }
    }
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
    /// Tokens used (Dify, GPTBots).
    pub total_tokens: Option<i64>,
    /// What was finally charged.
    pub final_amount: Option<Decimal>,
    /// What was given back.
    pub released_amount: Option<Decimal>,
    /// What is frozen for the run, where the answer tells (chenyu: the
    /// quote, once `freeze_status` says it was frozen).
    pub frozen_amount: Option<Decimal>,
    /// Its place in the provider's queue while it waits there (chenyu).
    pub queue_position: Option<i32>,
    /// The provider's estimate of that wait, in seconds.
    pub queue_wait_secs: Option<i32>,
    /// The provider's error code for a failed run.
    pub error_code: Option<String>,
    /// The provider's error message for a failed run.
    pub error_message: Option<String>,
    /// Whether the money is final.
    pub settled: bool,
    /// The provider will never tell what this finished run cost (Dify:
    /// nodes priced in two currencies, no event replay): the run is final
    /// with its money unknown (not settled), and counted by an estimate.
    pub money_unknown: bool,
    /// The answer's data object, for the audit trail.
    pub raw: Value,
    /// What was changed in the answer to make it storable (empty: nothing).
    pub repairs: Repairs,
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

/// A submit's answer and, for a provider whose runs are followed on their
/// stream (Dify), the rest of that stream.
#[derive(Debug)]
pub struct Submitted {
    /// What the answer means.
    pub outcome: SubmitOutcome,
    /// The accepted run's event stream, to be read to its end.
    pub stream: Option<RunStream>,
}

/// What a status check needs to know about the run.
#[derive(Debug, Clone, Copy)]
pub struct PollRequest<'a> {
    /// The provider's run id.
    pub provider_run_id: &'a str,
    /// The provider's task id, when known (Dify's stop endpoint needs it).
    pub task_id: Option<&'a str>,
    /// The run's idempotency key (Dify and GPTBots derive the end user from it).
    pub idempotency_key: &'a str,
}

/// What a provider can find out about a submit whose answer was lost.
#[derive(Debug, Clone, PartialEq)]
pub enum FindOutcome {
    /// The provider holds a run submitted under this key: adopt it
    /// (boxed: it is much larger than the others).
    Found(Box<Accepted>),
    /// The provider lists no such run (yet).
    NotFound,
    /// No usable answer this time.
    Unclear(Unclear),
}

/// The answer to a request to stop a running run.
#[derive(Debug, Clone, PartialEq)]
pub enum StopOutcome {
    /// The provider took the request; a status check shows the result.
    Requested,
    /// The provider refused (e.g. the run is unknown or already over).
    Rejected(ProviderError),
    /// No usable answer this time.
    Unclear(Unclear),
}

/// How a provider protects against a submit being billed twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitGuard {
    /// The provider replays a repeated key (chenyu): repeating is safe.
    IdempotencyKey,
    /// No keys, but runs can be found by the end user wfq sends (Dify):
    /// a lost answer is looked for before anything is sent again.
    FindByUser,
    /// No keys and no way to find a run (GPTBots): a lost answer cannot be
    /// resolved, so the run fails `SUBMIT_OUTCOME_UNKNOWN` instead of
    /// risking a second charge.
    Nothing,
}

/// The end user wfq names in Dify's `user` and GPTBots' `userId`: derived
/// from the idempotency key, so that a run can be found again by it.
pub fn end_user(idempotency_key: &str) -> String {
    format!("wfq-{idempotency_key}")
}

/// A client for one provider profile.
#[derive(Debug, Clone)]
pub enum ProviderClient {
    /// chenyu open API v2.
    Chenyu(ChenyuClient),
    /// Dify workflow service API.
    Dify(DifyClient),
    /// GPTBots workflow API.
    Gptbots(GptbotsClient),
}

impl ProviderClient {
    /// How this provider guards against double billing.
    pub fn submit_guard(&self) -> SubmitGuard {
        match self {
            ProviderClient::Chenyu(_) => SubmitGuard::IdempotencyKey,
            ProviderClient::Dify(_) => SubmitGuard::FindByUser,
            ProviderClient::Gptbots(_) => SubmitGuard::Nothing,
        }
    }

    /// Provider calls one status check can make (each bounded by
    /// `http.timeout`): Dify reads a finished run's costs with a second one.
    pub fn calls_per_poll(&self) -> u32 {
        match self {
            ProviderClient::Dify(_) => 2,
            ProviderClient::Chenyu(_) | ProviderClient::Gptbots(_) => 1,
        }
    }

    /// Whether the provider tells the account's balance (chenyu).
    pub fn reads_balance(&self) -> bool {
        matches!(self, ProviderClient::Chenyu(_))
    }

    /// The account's balance; `None` when the provider does not tell it.
    pub async fn balance(&self) -> Option<Result<chenyu::AccountBalance, chenyu::BalanceError>> {
        match self {
            ProviderClient::Chenyu(c) => Some(c.balance().await),
            ProviderClient::Dify(_) | ProviderClient::Gptbots(_) => None,
        }
    }

    /// Whether running runs can be stopped (`wfq cancel`).
    pub fn can_stop(&self) -> bool {
        matches!(self, ProviderClient::Dify(_))
    }

    /// Reads the workflow's parameter manifest; `Ok(None)` when the provider
    /// publishes none (GPTBots): the inputs are then sent as written and the
    /// provider validates them.
    pub async fn manifest(&self, workflow_id: &str) -> Result<Option<Manifest>, ManifestError> {
        match self {
            ProviderClient::Chenyu(c) => c.manifest(workflow_id).await.map(Some),
            ProviderClient::Dify(c) => c.manifest(workflow_id).await.map(Some),
            ProviderClient::Gptbots(_) => Ok(None),
        }
    }

    /// The cheapest call that shows whether the provider accepts our key
    /// again (a paused profile's probe): `Err` while it does not answer or
    /// still refuses. A readable refusal about the workflow or run counts as
    /// accepted: the key got past authentication.
    pub async fn probe(&self, workflow_id: &str) -> Result<(), Unclear> {
        let manifest = match self {
            ProviderClient::Chenyu(c) => c.manifest(workflow_id).await.map(drop),
            ProviderClient::Dify(c) => c.manifest(workflow_id).await.map(drop),
            ProviderClient::Gptbots(c) => {
                return match c.poll("wfq-probe").await {
                    PollOutcome::Unclear(u) => Err(u),
                    PollOutcome::Report(_) | PollOutcome::Rejected(_) => Ok(()),
                };
            }
        };
        match manifest {
            Ok(()) | Err(ManifestError::Rejected(_)) => Ok(()),
            Err(ManifestError::Unclear(u)) => Err(u),
        }
    }

    /// Submits a run.
    pub async fn submit(&self, request: &SubmitRequest<'_>) -> Submitted {
        let (outcome, stream) = match self {
            ProviderClient::Chenyu(c) => (c.submit(request).await, None),
            ProviderClient::Dify(c) => c.submit(request).await,
            ProviderClient::Gptbots(c) => (c.submit(request).await, None),
        };
        Submitted { outcome, stream }
    }

    /// Looks for a run submitted under `idempotency_key` whose answer was
    /// lost, starting no call that could end after `deadline`; `None` when
    /// the provider offers no way to (see [`SubmitGuard`]).
    pub async fn find_submitted(
        &self,
        idempotency_key: &str,
        deadline: std::time::Instant,
    ) -> Option<FindOutcome> {
        match self {
            ProviderClient::Dify(c) => Some(c.find_submitted(idempotency_key, deadline).await),
            ProviderClient::Chenyu(_) | ProviderClient::Gptbots(_) => None,
        }
    }

    /// Checks a run's status.
    pub async fn poll(&self, request: &PollRequest<'_>) -> PollOutcome {
        match self {
            ProviderClient::Chenyu(c) => c.poll(request.provider_run_id).await,
            ProviderClient::Dify(c) => c.poll(request).await,
            ProviderClient::Gptbots(c) => c.poll(request.provider_run_id).await,
        }
    }

    /// Asks the provider to stop a running run; `None` when it cannot.
    pub async fn stop(&self, request: &PollRequest<'_>) -> Option<StopOutcome> {
        match self {
            ProviderClient::Dify(c) => Some(c.stop(request).await),
            ProviderClient::Chenyu(_) | ProviderClient::Gptbots(_) => None,
        }
    }
}
