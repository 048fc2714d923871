//! chenyu open API v2: `market/info`, `run/submit`, `run/info`, and
//! `run/execution` for progress displays ([`ChenyuClient::progress`]).
//!
//! Every body is `{code, msg, data}` and the body decides, not the status
//! line: a non-zero `code` can arrive with HTTP 200. What cannot be read with
//! certainty is `Unclear`, because repeating a submit with the same
//! idempotency key is safe while guessing "rejected" would lose a run the
//! provider may have accepted and charged.
//!
//! Every body is repaired before it is parsed (see [`super::storable`]):
//! the envelope, and so the `data` text the amounts are read from, is the
//! repaired text, whose numbers keep their exact digits.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::edge::{Storable, note_repairs};
use super::storable::{AnswerLimits, Repairs};
use super::wire::{Call, RawAnswer, audit_copy, non_empty, repaired, snippet, unreadable};
use super::{
    Accepted, Manifest, ManifestError, ParamKind, Parameter, PollOutcome, ProviderError, RunReport,
    RunStatus, SubmitOutcome, SubmitRequest, Unclear,
};
use crate::config::{ApiKey, HttpConfig};
use crate::money::{WireAmount, parse_amount};

mod assets;
mod balance;
mod progress;

pub use balance::{AccountBalance, BalanceError};
pub use progress::{ProgressError, RunProgressReport};

/// A client for one chenyu provider profile.
#[derive(Debug, Clone)]
pub struct ChenyuClient {
    http: reqwest::Client,
    base_url: String,
    api_key: ApiKey,
    limits: AnswerLimits,
}

impl ChenyuClient {
    /// A client with its own connection pool; `base_url` has no trailing slash.
    pub fn new(base_url: &str, api_key: ApiKey, http: &HttpConfig) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: super::wire::http_client(http)?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            limits: AnswerLimits::from(http),
        })
    }

    /// `GET /workflow/market/info`.
    pub async fn manifest(&self, workflow_id: &str) -> Result<Manifest, ManifestError> {
        let request = self
            .http
            .get(format!("{}/workflow/market/info", self.base_url))
            .query(&[("workflow_id", workflow_id)]);
        match self.classify(Call::Other, self.send(request).await) {
            Answer::Data { data, .. } => parse_manifest(&data).map_err(ManifestError::Unclear),
            Answer::Rejected(e) => Err(ManifestError::Rejected(e)),
            Answer::Unclear(u) => Err(ManifestError::Unclear(u)),
        }
        .storable(&self.limits)
    }

    /// `POST /workflow/run/submit`.
    pub async fn submit(&self, run: &SubmitRequest<'_>) -> SubmitOutcome {
        let body = json!({
            "workflow_id": run.workflow_id,
            "revision_id": run.revision_id,
            "inputs": run.inputs,
            "idempotency_key": run.idempotency_key,
            "accept_external_cost_risk": run.accept_external_cost_risk,
        });
        let request = self
            .http
            .post(format!("{}/workflow/run/submit", self.base_url))
            .json(&body);
        let call = Call::Submit {
            account_refusals: run.account_refusals,
        };
        match self.classify(call, self.send(request).await) {
            Answer::Data { data, repairs } => match parse_accepted(&data) {
                Ok(accepted) => SubmitOutcome::Accepted(Accepted {
                    repairs,
                    ..accepted
                }),
                Err(unclear) => SubmitOutcome::Unclear(unclear),
            },
            Answer::Rejected(e) => SubmitOutcome::Rejected(e),
            Answer::Unclear(u) => SubmitOutcome::Unclear(u),
        }
        .storable(&self.limits)
    }

    /// `GET /workflow/run/info`; while the run waits in chenyu's queue,
    /// `run/execution` too, for its place and the estimated wait.
    pub async fn poll(&self, run_order_id: &str) -> PollOutcome {
        let request = self
            .http
            .get(format!("{}/workflow/run/info", self.base_url))
            .query(&[("run_order_id", run_order_id)]);
        let mut outcome = poll_outcome(self.classify(Call::Other, self.send(request).await))
            .storable(&self.limits);
        if let PollOutcome::Report(report) = &mut outcome
            && report.run_status.as_deref() == Some("queued")
            && let Ok(progress) = self.progress(run_order_id).await
        {
            report.queue_position = progress.queue_position.and_then(|p| i32::try_from(p).ok());
            report.queue_wait_secs = progress
                .estimated_wait_sec
                .and_then(|w| i32::try_from(w).ok());
        }
        outcome
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<RawAnswer, Unclear> {
        super::wire::send(request, &self.api_key, self.limits.max_value_bytes).await
    }

    fn classify(&self, call: Call<'_>, answer: Result<RawAnswer, Unclear>) -> Answer {
        match answer {
            Ok(raw) => classify_raw(call, raw.status, raw.retry_after, &raw.body, &self.limits),
            Err(unclear) => Answer::Unclear(unclear),
        }
    }
}

/// An answer, interpreted by the rules every chenyu endpoint shares.
#[derive(Debug, PartialEq)]
enum Answer {
    /// The `data` member's JSON text as repaired, whose numbers keep their
    /// exact digits, and what the repair changed.
    Data {
        data: String,
        repairs: Repairs,
    },
    Rejected(ProviderError),
    Unclear(Unclear),
}

#[derive(Debug, Deserialize)]
struct Envelope {
    code: i64,
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorObject {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    engine_code: Option<String>,
    #[serde(default)]
    status_code: Option<i64>,
}

/// What a `run/info` answer means.
fn poll_outcome(answer: Answer) -> PollOutcome {
    match answer {
        Answer::Data { data, repairs } => match parse_report(&data) {
            Ok(report) => PollOutcome::Report(Box::new(RunReport { repairs, ..report })),
            Err(unclear) => PollOutcome::Unclear(unclear),
        },
        Answer::Rejected(e) => PollOutcome::Rejected(e),
        Answer::Unclear(u) => PollOutcome::Unclear(u),
    }
}

/// The shared rules, as a pure function of the call, the status,
/// `Retry-After` and the body.
///
/// The body decides before the status line in one case: on a submit, an
/// error whose `engine_code` the profile lists as about the account
/// (`account_refusals`) refuses the account whatever the status (a cap on
/// runs at once may come as HTTP 429, a suspended account as 403). A
/// status check never refuses the account.
fn classify_raw(
    call: Call<'_>,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    limits: &AnswerLimits,
) -> Answer {
    let unclear = |reason: String| {
        Answer::Unclear(Unclear {
            reason,
            http_status: Some(status.as_u16()),
            retry_after,
            account_refused: false,
            nothing_created: false,
        })
    };
    let (text, repairs) = repaired(body, limits);
    let envelope = serde_json::from_str::<Envelope>(&text);
    let refused = match &envelope {
        Ok(envelope) if envelope.code != 0 => Some(refusal(status, envelope, repairs)),
        _ => None,
    };
    if let Some(refused) = &refused
        && call.refuses_account(Some(&refused.error.code))
    {
        return Answer::Rejected(refused.error.clone());
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Answer::Unclear(Unclear {
            reason: format!("HTTP {status}: the provider refused the API key"),
            http_status: Some(status.as_u16()),
            retry_after,
            account_refused: true,
            nothing_created: false,
        });
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return unclear(format!("HTTP {status}: rate limited"));
    }
    // 409/423/425: the same key is still being worked on (the IETF
    // idempotency-key draft answers an in-flight duplicate with 409), so the
    // first attempt may exist: ask again later with the same key.
    if status.is_server_error() || matches!(status.as_u16(), 408 | 409 | 423 | 425) {
        return unclear(format!("HTTP {status}: {}", snippet(body)));
    }
    let envelope = match envelope {
        Ok(envelope) => envelope,
        Err(e) => {
            return unclear(format!(
                "HTTP {status}: not a chenyu answer ({e}): {}",
                snippet(body)
            ));
        }
    };
    let Some(Refused {
        error,
        reported_status,
    }) = refused
    else {
        return if status.is_success() {
            Answer::Data {
                data: envelope
                    .data
                    .map_or_else(|| "null".to_owned(), |d| d.get().to_owned()),
                repairs,
            }
        } else {
            unclear(format!("HTTP {status} with code 0"))
        };
    };
    // An engine failure reported inside a 200 (scheduling, instance
    // crashes) says nothing about our request: it may have been created.
    if reported_status.is_some_and(|code| code >= 500) {
        return unclear(format!(
            "HTTP {status}, code {}: provider-side failure {}",
            envelope.code, error.detail
        ));
    }
    Answer::Rejected(error)
}

/// A non-zero `code`: the refusal it states, and the status its body
/// reports.
struct Refused {
    error: ProviderError,
    reported_status: Option<i64>,
}

/// Reads the refusal of an envelope whose `code` is not 0.
fn refusal(status: StatusCode, envelope: &Envelope, repairs: Repairs) -> Refused {
    let mut detail = envelope
        .data
        .as_ref()
        .and_then(|d| serde_json::from_str::<Value>(d.get()).ok())
        .and_then(|d| d.get("error").cloned())
        .unwrap_or_else(|| json!({ "code": envelope.code, "msg": envelope.msg }));
    let error: ErrorObject = serde_json::from_value(detail.clone()).unwrap_or_default();
    note_repairs(&mut detail, repairs);
    let code =
        non_empty(error.engine_code).unwrap_or_else(|| format!("PROVIDER_CODE_{}", envelope.code));
    let reason = non_empty(error.reason)
        .or_else(|| non_empty(envelope.msg.clone()))
        .unwrap_or_else(|| format!("provider error code {}", envelope.code));
    let message = match non_empty(error.detail) {
        Some(detail) if detail != reason => format!("{reason}: {detail}"),
        _ => reason,
    };
    Refused {
        error: ProviderError {
            code,
            message,
            detail,
            http_status: status.as_u16(),
        },
        reported_status: error.status_code,
    }
}

#[derive(Debug, Deserialize)]
struct MarketInfo {
    workflow_id: String,
    revision_id: String,
    #[serde(default)]
    quote_currency: Option<String>,
    #[serde(default)]
    quote_amount: Option<WireAmount>,
    #[serde(default)]
    may_incur_external_model_cost: bool,
    #[serde(default)]
    editable_parameter_manifest: Vec<ManifestEntry>,
    /// Entries may be empty objects (the documented example has `[{}]`).
    #[serde(default)]
    candidate_output_manifest: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct ManifestEntry {
    key: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    default_value: Option<Value>,
}

fn parse_manifest(data: &str) -> Result<Manifest, Unclear> {
    let info: MarketInfo =
        serde_json::from_str(data).map_err(|e| unreadable("workflow manifest", e))?;
    let quote = parse_amount("quote_amount", info.quote_amount.as_ref())
        .map_err(|e| unreadable("workflow manifest", e))?;
    Ok(Manifest {
        workflow_id: info.workflow_id,
        revision_id: Some(info.revision_id),
        currency: non_empty(info.quote_currency),
        quote_amount: quote,
        may_incur_external_cost: info.may_incur_external_model_cost,
        output_types: info
            .candidate_output_manifest
            .iter()
            .filter_map(|entry| {
                let key = entry.get("key")?.as_str()?.trim();
                let kind = entry.get("type")?.as_str()?.trim();
                (!key.is_empty() && !kind.is_empty()).then(|| (key.to_owned(), kind.to_owned()))
            })
            .collect(),
        parameters: info
            .editable_parameter_manifest
            .into_iter()
            .map(|p| Parameter {
                kind: ParamKind::parse(p.kind.as_deref().unwrap_or("string")),
                key: p.key,
                required: p.required,
                default_value: p.default_value.filter(|v| !v.is_null()),
                max_chars: None,
            })
            .collect(),
    })
}

#[derive(Debug, Deserialize)]
struct SubmitData {
    #[serde(default)]
    run_order_id: Option<String>,
    #[serde(default)]
    revision_id: Option<String>,
    #[serde(default)]
    quote_currency: Option<String>,
    #[serde(default)]
    quote_amount: Option<WireAmount>,
    #[serde(default)]
    freeze_status: Option<String>,
    #[serde(default)]
    run_status: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    prompt_id: Option<String>,
    #[serde(default)]
    billing_run_id: Option<String>,
    #[serde(default)]
    idempotent_replay: bool,
}

fn parse_accepted(data: &str) -> Result<Accepted, Unclear> {
    let submit: SubmitData =
        serde_json::from_str(data).map_err(|e| unreadable("submit answer", e))?;
    // Accepted but without a run id: we cannot follow it, but the same key
    // will fetch it again, so this is worth a retry, not a failure.
    let provider_run_id = non_empty(submit.run_order_id)
        .ok_or_else(|| unreadable("submit answer", "no run_order_id"))?;
    let quote = parse_amount("quote_amount", submit.quote_amount.as_ref())
        .map_err(|e| unreadable("submit answer", e))?;
    let freeze_status = non_empty(submit.freeze_status);
    // chenyu freezes the quote at every accepted submit. A replay that
    // arrives after settlement says `released`, which means the quote was
    // frozen and has since been settled, so it still counts as frozen.
    let frozen_amount = match freeze_status.as_deref() {
        None | Some("frozen" | "released" | "settled") => quote,
        Some(_) => None,
    };
    Ok(Accepted {
        provider_run_id,
        revision_id: non_empty(submit.revision_id),
        task_id: non_empty(submit.task_id),
        prompt_id: non_empty(submit.prompt_id),
        billing_run_id: non_empty(submit.billing_run_id),
        currency: non_empty(submit.quote_currency),
        quote_amount: quote,
        frozen_amount,
        freeze_status,
        run_status: non_empty(submit.run_status),
        idempotent_replay: submit.idempotent_replay,
        raw: audit_copy(data),
        repairs: Repairs::default(),
    })
}

#[derive(Debug, Deserialize)]
struct RunInfo {
    #[serde(default)]
    run_status: Option<String>,
    #[serde(default)]
    freeze_status: Option<String>,
    #[serde(default)]
    submission_status: Option<String>,
    #[serde(default)]
    settlement_status: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    prompt_id: Option<String>,
    #[serde(default)]
    outputs: Option<Value>,
    #[serde(default)]
    quote_currency: Option<String>,
    #[serde(default)]
    quote_amount: Option<WireAmount>,
    #[serde(default)]
    compute_cost: Option<WireAmount>,
    #[serde(default)]
    external_model_cost: Option<WireAmount>,
    #[serde(default)]
    total_cost: Option<WireAmount>,
    #[serde(default)]
    final_amount: Option<WireAmount>,
    #[serde(default)]
    released_amount: Option<WireAmount>,
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    error_message: Option<String>,
}

/// Maps chenyu's `run_status`. Only `queued` and `running` are documented as
/// non-final; words that plainly mean "ended badly" are final failures, and
/// anything else is kept polling (until the deadline) rather than guessed.
fn run_status(value: Option<&str>) -> RunStatus {
    match value.unwrap_or("") {
        "" | "queued" | "pending" | "running" | "submitted" => RunStatus::Active,
        "succeeded" | "success" => RunStatus::Succeeded,
        "failed" | "canceled" | "cancelled" | "timeout" | "error" => RunStatus::Failed,
        other => RunStatus::Unknown(other.to_owned()),
    }
}

fn parse_report(data: &str) -> Result<RunReport, Unclear> {
    let info: RunInfo = serde_json::from_str(data).map_err(|e| unreadable("run info", e))?;
    let amount = |field: &'static str, raw: &Option<WireAmount>| {
        parse_amount(field, raw.as_ref()).map_err(|e| unreadable("run info", e))
    };
    let final_amount = amount("final_amount", &info.final_amount)?;
    let released_amount = amount("released_amount", &info.released_amount)?;
    let settlement_status = non_empty(info.settlement_status);
    let freeze_status = non_empty(info.freeze_status);
    let freeze_status_text = freeze_status.clone();
    let quote_amount = amount("quote_amount", &info.quote_amount)?;
    // Settled means both amounts are known and the provider says so; either
    // signal alone has been seen before the money was final.
    let settled = final_amount.is_some()
        && released_amount.is_some()
        && (matches!(settlement_status.as_deref(), Some("settled" | "released"))
            || freeze_status.as_deref() == Some("released"));
    let run_status_text = non_empty(info.run_status);
    Ok(RunReport {
        status: run_status(run_status_text.as_deref()),
        run_status: run_status_text,
        freeze_status,
        submission_status: non_empty(info.submission_status),
        settlement_status,
        task_id: non_empty(info.task_id),
        prompt_id: non_empty(info.prompt_id),
        outputs: info
            .outputs
            .filter(|o| o.as_object().is_some_and(|m| !m.is_empty())),
        currency: non_empty(info.quote_currency),
        quote_amount,
        compute_cost: amount("compute_cost", &info.compute_cost)?,
        external_model_cost: amount("external_model_cost", &info.external_model_cost)?,
        total_cost: amount("total_cost", &info.total_cost)?,
        // As at submit: a quote that the answer says was frozen is what is
        // frozen, also when the submit's own answer did not say so.
        frozen_amount: match freeze_status_text.as_deref() {
            Some("frozen" | "released" | "settled") => quote_amount,
            _ => None,
        },
        final_amount,
        released_amount,
        error_code: non_empty(info.error_code),
        error_message: non_empty(info.error_message),
        settled,
        raw: audit_copy(data),
        total_tokens: None,
        repairs: Repairs::default(),
        queue_position: None,
        queue_wait_secs: None,
        money_unknown: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn a_non_zero_code_on_http_200_is_a_rejection_with_the_engine_code() {
        let body = br#"{"code":1,"msg":"Workflow input content is invalid.","data":{"error":{"reason":"Workflow input content is invalid.","detail":"input n4_video must be an uploaded file URL or file id","engine_code":"INVALID_WORKFLOW_INPUT","status_code":400}}}"#;
        let Answer::Rejected(e) = classify_raw(
            Call::Other,
            StatusCode::OK,
            None,
            body,
            &AnswerLimits::default(),
        ) else {
            panic!("expected a rejection");
        };
        assert_eq!(e.code, "INVALID_WORKFLOW_INPUT");
        assert_eq!(
            e.message,
            "Workflow input content is invalid.: input n4_video must be an uploaded file URL or file id"
        );
        assert_eq!(e.detail["status_code"], 400);
    }

    #[test]
    fn server_errors_rate_limits_and_html_are_unclear() {
        let cases: &[(u16, &[u8])] = &[
            (500, br#"{"code":500,"msg":"boom"}"#),
            (502, b"<html><body>502 Bad Gateway</body></html>"),
            (429, br#"{"code":429,"msg":"slow down"}"#),
            (200, b"<html>maintenance</html>"),
            (200, b""),
            (404, b"<html>not found</html>"),
            (409, br#"{"code":409,"msg":"a request with this key is in progress"}"#),
            (200, br#"{"code":1,"msg":"no instance","data":{"error":{"reason":"scheduling failed","engine_code":"INSTANCE_UNAVAILABLE","status_code":503}}}"#),
        ];
        for (status, body) in cases {
            let status = StatusCode::from_u16(*status).unwrap();
            assert!(
                matches!(classify_raw(Call::Other, status, Some(Duration::from_secs(3)), body, &AnswerLimits::default()), Answer::Unclear(ref u) if u.retry_after == Some(Duration::from_secs(3)) && !u.account_refused),
                "{status} {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// What a submit and a status check make of refusals, with chenyu's
    /// default `account_refusals`.
    #[test]
    fn listed_codes_refuse_the_account_on_a_submit_whatever_the_status() {
        let listed = crate::config::default_account_refusals(crate::config::ProviderKind::Chenyu);
        let submit = Call::Submit {
            account_refusals: &listed,
        };
        let envelope = |engine_code: &str, status: u16| {
            format!(
                r#"{{"code":1,"msg":"refused","data":{{"error":{{"reason":"refused","engine_code":"{engine_code}","status_code":{status}}}}}}}"#
            )
        };
        let read = |call: Call<'_>, status: u16, body: &str| {
            let status = StatusCode::from_u16(status).unwrap();
            match classify_raw(
                call,
                status,
                None,
                body.as_bytes(),
                &AnswerLimits::default(),
            ) {
                Answer::Rejected(e) => format!("refused {} ({})", e.code, e.http_status),
                Answer::Unclear(u) if u.account_refused => "key".to_owned(),
                Answer::Unclear(_) if status == StatusCode::TOO_MANY_REQUESTS => "rate".to_owned(),
                Answer::Unclear(_) => "again".to_owned(),
                Answer::Data { .. } => "data".to_owned(),
            }
        };
        let cap = envelope("CONCURRENT_RUN_LIMIT_EXCEEDED", 429);
        let suspended = envelope("ACCOUNT_SUSPENDED", 403);
        let balance = envelope("INSUFFICIENT_BALANCE", 402);
        let unlisted = envelope("SOMETHING_NEW", 429);
        let table: &[(Call<'_>, u16, &str, &str)] = &[
            (
                submit,
                429,
                &cap,
                "refused CONCURRENT_RUN_LIMIT_EXCEEDED (429)",
            ),
            (
                submit,
                200,
                &cap,
                "refused CONCURRENT_RUN_LIMIT_EXCEEDED (200)",
            ),
            (submit, 403, &suspended, "refused ACCOUNT_SUSPENDED (403)"),
            (submit, 503, &balance, "refused INSUFFICIENT_BALANCE (503)"),
            (submit, 429, &unlisted, "rate"),
            (
                submit,
                429,
                r#"{"code":429,"msg":"slow down","data":null}"#,
                "rate",
            ),
            (submit, 429, "", "rate"),
            (
                submit,
                401,
                r#"{"code":401,"msg":"bad key","data":null}"#,
                "key",
            ),
            (Call::Other, 429, &cap, "rate"),
            (Call::Other, 403, &suspended, "key"),
            (Call::Other, 503, &balance, "again"),
        ];
        for &(call, status, body, expected) in table {
            assert_eq!(
                read(call, status, body),
                expected,
                "{call:?} {status} {body}"
            );
        }
    }

    #[test]
    fn bad_credentials_are_unclear_and_flagged() {
        let Answer::Unclear(u) = classify_raw(
            Call::Other,
            StatusCode::UNAUTHORIZED,
            None,
            b"{}",
            &AnswerLimits::default(),
        ) else {
            panic!("expected unclear");
        };
        assert!(u.account_refused);
    }

    #[test]
    fn the_documented_submit_answer_is_accepted_with_the_quote_frozen() {
        let data = json!({
            "run_order_id": "wfrun_314ff7d8b7a5beff1388", "workflow_id": "wf_861ef31e94dcfb10e6e7",
            "revision_id": "wfr_f9f2a2dcb99d73b0c3aa", "quote_currency": "CNY", "quote_amount": "0.03000000",
            "freeze_status": "frozen", "run_status": "queued", "task_id": "task_1", "prompt_id": "prompt_1",
            "billing_run_id": "wfbill_1", "idempotent_replay": false
        });
        let a = parse_accepted(&data.to_string()).unwrap();
        assert_eq!(a.provider_run_id, "wfrun_314ff7d8b7a5beff1388");
        assert_eq!(a.frozen_amount, Some(d("0.03")));
        assert_eq!(a.billing_run_id.as_deref(), Some("wfbill_1"));
        assert!(!a.idempotent_replay);
    }

    #[test]
    fn an_accepted_answer_without_a_run_id_is_unclear() {
        assert!(parse_accepted(r#"{"run_order_id": ""}"#).is_err());
        assert!(parse_accepted("null").is_err());
    }

    #[test]
    fn the_documented_run_info_is_final_and_settled() {
        let data = json!({
            "run_order_id": "wfrun_1", "quote_amount": "0.03000000", "quote_currency": "CNY",
            "freeze_status": "released", "submission_status": "submitted", "run_status": "succeeded",
            "settlement_status": "settled", "outputs": {"n9_images": "https://x/y"},
            "compute_cost": "0.00028780", "external_model_cost": "0.00000000", "total_cost": "0.00028780",
            "final_amount": "0.00028780", "released_amount": "0.02971220", "error_code": "", "error_message": ""
        });
        let r = parse_report(&data.to_string()).unwrap();
        assert_eq!(r.status, RunStatus::Succeeded);
        assert!(r.settled);
        assert_eq!(r.final_amount, Some(d("0.00028780")));
        assert_eq!(r.released_amount, Some(d("0.02971220")));
        assert_eq!(r.error_code, None);
    }

    #[test]
    fn a_finished_run_without_amounts_is_not_settled() {
        let r = parse_report(
            &json!({"run_status": "succeeded", "settlement_status": "unsettled",
            "final_amount": "", "released_amount": ""})
            .to_string(),
        )
        .unwrap();
        assert!(r.status.is_final());
        assert!(!r.settled);
        let r = parse_report(
            &json!({"run_status": "succeeded", "settlement_status": "pending",
            "final_amount": "0.1", "released_amount": "0.2"})
            .to_string(),
        )
        .unwrap();
        assert!(!r.settled, "amounts alone are not a settlement");
    }

    #[test]
    fn a_late_replay_still_records_the_frozen_quote() {
        let a = parse_accepted(r#"{"run_order_id":"r","quote_amount":"0.50000000","freeze_status":"released","idempotent_replay":true}"#).unwrap();
        assert_eq!(a.frozen_amount, Some(d("0.5")));
    }

    #[test]
    fn money_in_json_numbers_is_exact() {
        let r =
            parse_report(r#"{"final_amount": 12345678.12345678, "released_amount": "0"}"#).unwrap();
        assert_eq!(r.final_amount, Some(d("12345678.12345678")));
    }

    #[test]
    fn unknown_statuses_and_bad_amounts_are_handled_without_guessing() {
        let r = parse_report(&json!({"run_status": "paused_for_review"}).to_string()).unwrap();
        assert_eq!(r.status, RunStatus::Unknown("paused_for_review".into()));
        assert!(parse_report(&json!({"final_amount": "12,5"}).to_string()).is_err());
        let r = parse_report(
            &json!({"final_amount": 0.0003, "released_amount": 0.0297,
            "settlement_status": "settled", "run_status": "failed"})
            .to_string(),
        )
        .unwrap();
        assert_eq!(r.final_amount, Some(d("0.0003")));
        assert!(r.settled);
    }

    #[test]
    fn a_hostile_run_info_becomes_a_storable_report_with_exact_money() {
        use crate::providers::wire::hostile;
        let limits = AnswerLimits::default();
        let body = format!(
            r#"{{"code":0,"msg":"ok","data":{{"run_order_id":"wfrun_1","run_status":"succeeded","settlement_status":"settled",
            "quote_amount":"0.03000000","final_amount":"0.00028780","released_amount":0.02971220,
            "task_id":"task\u0000","outputs":{}}}}}"#,
            hostile::outputs()
        );
        let outcome = poll_outcome(classify_raw(
            Call::Other,
            StatusCode::OK,
            None,
            body.as_bytes(),
            &limits,
        ))
        .storable(&limits);
        let PollOutcome::Report(report) = outcome else {
            panic!("not a report: {outcome:?}");
        };
        assert_eq!(report.status, RunStatus::Succeeded);
        assert!(report.settled);
        assert_eq!(report.final_amount.unwrap().to_string(), "0.00028780");
        assert_eq!(report.released_amount.unwrap().to_string(), "0.02971220");
        assert_eq!(report.task_id.as_deref(), Some("task\u{FFFD}"));
        hostile::assert_outputs_repaired(&report, &limits);
        // The task id's NUL counts too.
        let mut expected = hostile::repairs();
        expected.nul += 1;
        assert_eq!(report.repairs, expected);
    }

    #[test]
    fn hostile_submit_answers_and_refusals_are_storable() {
        let limits = AnswerLimits::default();
        let body = br#"{"code":0,"data":{"run_order_id":"wfrun_1","quote_amount":"0.03000000","freeze_status":"frozen","run_status":"queued\u0000","extra":1e400}}"#;
        let Answer::Data { data, repairs } =
            classify_raw(Call::Other, StatusCode::OK, None, body, &limits)
        else {
            panic!("not data");
        };
        assert_eq!((repairs.nul, repairs.number_as_text), (1, 1));
        let a = parse_accepted(&data).unwrap();
        assert_eq!(a.frozen_amount, Some(d("0.03")));
        assert_eq!(a.run_status.as_deref(), Some("queued\u{FFFD}"));
        assert_eq!(a.raw["extra"], "1e400");

        // A run id the provider sent with a NUL cannot address the run.
        let body = br#"{"code":0,"data":{"run_order_id":"wfrun_\u0000","quote_amount":"0.03"}}"#;
        let Answer::Data { data, repairs } =
            classify_raw(Call::Other, StatusCode::OK, None, body, &limits)
        else {
            panic!("not data");
        };
        let outcome = SubmitOutcome::Accepted(Accepted {
            repairs,
            ..parse_accepted(&data).unwrap()
        })
        .storable(&limits);
        assert!(matches!(outcome, SubmitOutcome::Unclear(u) if u.reason.contains("run id")));

        let body = br#"{"code":1,"msg":"bad\u0000","data":{"error":{"reason":"no\ud800","engine_code":"INVALID_WORKFLOW_INPUT","status_code":400}}}"#;
        let Answer::Rejected(e) = classify_raw(Call::Other, StatusCode::OK, None, body, &limits)
        else {
            panic!("not a rejection");
        };
        let e = e.storable(&limits);
        assert_eq!(e.message, "no\u{FFFD}");
        assert_eq!(
            e.detail[crate::providers::ERROR_REPAIRS_KEY],
            json!({"nul": 1, "lone_surrogate": 1})
        );
    }

    #[test]
    fn manifest_types_and_defaults_are_read() {
        let m = parse_manifest(&json!({
            "workflow_id": "wf", "revision_id": "wfr", "quote_amount": "0.03000000",
            "editable_parameter_manifest": [
                {"key": "n6_text", "type": "string", "required": true, "default_value": "x"},
                {"key": "n3_seed", "type": "int", "required": true, "default_value": 156680208700286u64},
                {"key": "img", "type": "image"},
                {"key": "odd", "type": "matrix", "default_value": null}
            ],
            "candidate_output_manifest": [{}, {"key": "n9_images", "type": "image"}, {"key": "x"}]
        }).to_string())
        .unwrap();
        assert_eq!(m.quote_amount, Some(d("0.03")));
        assert_eq!(m.parameters[1].kind, ParamKind::Int);
        assert_eq!(m.parameters[2].kind, ParamKind::Media("image".into()));
        assert!(!m.parameters[2].required);
        assert_eq!(m.parameters[3].kind, ParamKind::Other("matrix".into()));
        assert_eq!(m.parameters[3].default_value, None);
        assert_eq!(
            m.output_types,
            vec![("n9_images".to_owned(), "image".to_owned())]
        );
    }
}
