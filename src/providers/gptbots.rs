//! GPTBots workflow API: `POST /v1/workflow/invoke` (asynchronous) and
//! `POST /v1/workflow/query/result`.
//!
//! GPTBots has no idempotency key, no way to list runs and no cancel
//! endpoint. A submit whose answer was lost cannot be found again, so the
//! lifecycle fails such a run `SUBMIT_OUTCOME_UNKNOWN` rather than risk a
//! second charge (see `SubmitGuard::Nothing`). The error format is not
//! documented; six-digit codes such as `403200` have been seen, so the
//! status line decides and the body only adds words.

use serde::Deserialize;
use serde_json::{Value, json};

use super::wire::{RawAnswer, audit_copy, non_empty, snippet, unreadable};
use super::{
    Accepted, PollOutcome, ProviderError, RunReport, RunStatus, SubmitOutcome, SubmitRequest,
    Unclear, end_user,
};
use crate::config::{ApiKey, HttpConfig};
use crate::money::{WireAmount, parse_amount};

/// What GPTBots bills in.
pub const CURRENCY: &str = "credits";

/// A client for one GPTBots workflow (its API key selects the workflow).
#[derive(Debug, Clone)]
pub struct GptbotsClient {
    http: reqwest::Client,
    base_url: String,
    api_key: ApiKey,
}

impl GptbotsClient {
    /// A client with its own connection pool; `base_url` has no trailing slash.
    pub fn new(base_url: &str, api_key: ApiKey, http: &HttpConfig) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: super::wire::http_client(http)?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<RawAnswer, Unclear> {
        super::wire::send(request, &self.api_key).await
    }

    /// `POST /v1/workflow/invoke` with `isAsync: true`.
    pub async fn submit(&self, run: &SubmitRequest<'_>) -> SubmitOutcome {
        let request = self
            .http
            .post(format!("{}/v1/workflow/invoke", self.base_url))
            .json(&json!({
                "userId": end_user(run.idempotency_key),
                "input": run.inputs,
                "isAsync": true,
            }));
        let raw = match self.send(request).await {
            Ok(raw) => raw,
            Err(u) => return SubmitOutcome::Unclear(u),
        };
        if !raw.status.is_success() {
            return match classify_error(&raw) {
                Err(e) => SubmitOutcome::Rejected(e),
                Ok(u) => SubmitOutcome::Unclear(u),
            };
        }
        if let Some(refusal) = refusal_in_success(&raw) {
            return SubmitOutcome::Rejected(refusal);
        }
        match parse_invoked(&raw.body) {
            Ok(accepted) => SubmitOutcome::Accepted(accepted),
            Err(u) => SubmitOutcome::Unclear(u),
        }
    }

    /// `POST /v1/workflow/query/result`.
    pub async fn poll(&self, workflow_run_id: &str) -> PollOutcome {
        let request = self
            .http
            .post(format!("{}/v1/workflow/query/result", self.base_url))
            .json(&json!({ "workflowRunId": workflow_run_id }));
        let raw = match self.send(request).await {
            Ok(raw) => raw,
            Err(u) => return PollOutcome::Unclear(u),
        };
        if !raw.status.is_success() {
            return match classify_error(&raw) {
                Err(e) => PollOutcome::Rejected(e),
                Ok(u) => PollOutcome::Unclear(u),
            };
        }
        if let Some(refusal) = refusal_in_success(&raw) {
            return PollOutcome::Rejected(refusal);
        }
        match parse_result(&raw.body) {
            Ok(report) => PollOutcome::Report(Box::new(report)),
            Err(u) => PollOutcome::Unclear(u),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    message: Option<String>,
}

/// A non-2xx answer: `Err` for a definite refusal, `Ok` for an unclear one.
fn classify_error(raw: &RawAnswer) -> Result<Unclear, ProviderError> {
    let body: ErrorBody = serde_json::from_slice(&raw.body).unwrap_or_default();
    let code = match body.code {
        Some(Value::String(code)) if !code.trim().is_empty() => Some(code),
        Some(Value::Number(code)) => Some(code.to_string()),
        _ => None,
    };
    let message = non_empty(body.message).unwrap_or_else(|| snippet(&raw.body));
    super::wire::classify_error_status(
        raw.status.as_u16(),
        raw.retry_after,
        code,
        message,
        false,
        &raw.body,
    )
}

/// An HTTP 200 whose body is an error object (`{code, message}` and no run
/// id or status): a refusal, as the same body with a 4xx would be. Seen
/// with six-digit codes; the status line alone would call it a success.
fn refusal_in_success(raw: &RawAnswer) -> Option<ProviderError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        code: Option<Value>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        workflow_run_id: Option<Value>,
        #[serde(default)]
        status: Option<Value>,
    }
    let probe: Probe = serde_json::from_slice(&raw.body).ok()?;
    let code = match probe.code? {
        Value::Number(n) if n.as_i64() != Some(0) => n.to_string(),
        Value::String(s) if !s.trim().is_empty() && s != "0" => s,
        _ => return None,
    };
    if probe.workflow_run_id.is_some() || probe.status.is_some() {
        return None;
    }
    Some(ProviderError {
        code,
        message: non_empty(probe.message).unwrap_or_else(|| snippet(&raw.body)),
        detail: serde_json::from_slice(&raw.body).unwrap_or(Value::Null),
        http_status: raw.status.as_u16(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Invoked {
    #[serde(default)]
    workflow_run_id: Option<String>,
    #[serde(default)]
    workflow_version: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

fn parse_invoked(body: &[u8]) -> Result<Accepted, Unclear> {
    let text = std::str::from_utf8(body).map_err(|e| unreadable("invoke answer", e))?;
    let invoked: Invoked =
        serde_json::from_str(text).map_err(|e| unreadable("invoke answer", e))?;
    // Accepted without a run id: the run may exist and cannot be followed.
    let provider_run_id = non_empty(invoked.workflow_run_id)
        .ok_or_else(|| unreadable("invoke answer", "no workflowRunId"))?;
    Ok(Accepted {
        provider_run_id,
        revision_id: non_empty(invoked.workflow_version),
        run_status: non_empty(invoked.status),
        raw: audit_copy(text),
        ..Accepted::default()
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryResult {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    total_cost: Option<WireAmount>,
    #[serde(default)]
    total_tokens: Option<Value>,
    #[serde(default)]
    error_message: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    message: Option<Value>,
}

fn parse_result(body: &[u8]) -> Result<RunReport, Unclear> {
    let text = std::str::from_utf8(body).map_err(|e| unreadable("query result", e))?;
    let result: QueryResult =
        serde_json::from_str(text).map_err(|e| unreadable("query result", e))?;
    let run_status =
        non_empty(result.status).ok_or_else(|| unreadable("query result", "no status"))?;
    let status = match run_status.as_str() {
        "PENDING" | "RUNNING" => RunStatus::Active,
        "SUCCEED" | "SUCCEEDED" | "SUCCESS" => RunStatus::Succeeded,
        "FAILED" | "FAIL" => RunStatus::Failed,
        other => RunStatus::Unknown(other.to_owned()),
    };
    let total_cost = parse_amount("totalCost", result.total_cost.as_ref())
        .map_err(|e| unreadable("query result", e))?;
    let settled = status.is_final();
    let error_message = if status == RunStatus::Failed {
        // Undocumented: take whichever of the usual names is there.
        [result.error_message, result.error, result.message]
            .into_iter()
            .flatten()
            .find_map(|v| match v {
                Value::String(s) if !s.trim().is_empty() => Some(s),
                Value::Null | Value::String(_) => None,
                other => Some(other.to_string()),
            })
    } else {
        None
    };
    Ok(RunReport {
        status,
        outputs: result.output.filter(|o| !o.is_null()),
        currency: total_cost.map(|_| CURRENCY.to_owned()),
        // Credits are charged as the run goes; nothing is frozen, so the
        // total is what was charged once the run is over.
        total_cost,
        final_amount: if settled { total_cost } else { None },
        total_tokens: result.total_tokens.as_ref().and_then(|v| match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }),
        settlement_status: Some(if settled { "settled" } else { "unsettled" }.into()),
        error_message,
        settled,
        run_status: Some(run_status),
        raw: audit_copy(text),
        ..RunReport::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::wire::test_answer as raw;
    use rust_decimal::Decimal;

    #[test]
    fn error_answers_are_classified_by_status() {
        let e = classify_error(&raw(
            400,
            r#"{"code":400001,"message":"input.topic is required"}"#,
        ))
        .unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("400001", "input.topic is required")
        );
        let u = classify_error(&raw(403, r#"{"code":403200,"message":"no"}"#)).unwrap();
        assert!(u.account_refused && u.nothing_created);
        let u = classify_error(&raw(429, "")).unwrap();
        assert!(u.nothing_created && !u.account_refused);
        let u = classify_error(&raw(502, "<html>")).unwrap();
        assert!(
            !u.nothing_created,
            "a 5xx may come after the run was created"
        );
        let e = classify_error(&raw(404, "not json")).unwrap_err();
        assert_eq!(e.code, "HTTP_404");
    }

    #[test]
    fn the_documented_result_is_read_exactly() {
        let body = r#"{"workflowId":"w","workflowName":"todayNews","workflowVersion":"1.0.1",
            "workflowRunId":"r","input":{"topic":"News"},"output":{"news":[]},
            "workflowExecutionTime":8347,"status":"SUCCEED","totalCost":0.6928,"totalTokens":1745,
            "startTime":1758765323024,"endTime":1758765331373}"#;
        let report = parse_result(body.as_bytes()).unwrap();
        assert_eq!(report.status, RunStatus::Succeeded);
        assert_eq!(
            report.total_cost,
            Some(Decimal::from_str_exact("0.6928").unwrap())
        );
        assert_eq!(report.final_amount, report.total_cost);
        assert_eq!(report.total_tokens, Some(1745));
        assert_eq!(report.currency.as_deref(), Some("credits"));
        assert!(report.settled);
    }

    #[test]
    fn statuses_and_failures() {
        let running = parse_result(br#"{"status":"RUNNING","totalCost":0}"#).unwrap();
        assert_eq!(running.status, RunStatus::Active);
        assert!(!running.settled);
        let failed = parse_result(
            br#"{"status":"FAILED","output":null,"errorMessage":"node broke","totalCost":"0.1"}"#,
        )
        .unwrap();
        assert_eq!(failed.status, RunStatus::Failed);
        assert_eq!(failed.error_message.as_deref(), Some("node broke"));
        let odd = parse_result(br#"{"status":"QUEUED_SOMEWHERE"}"#).unwrap();
        assert_eq!(odd.status, RunStatus::Unknown("QUEUED_SOMEWHERE".into()));
        assert!(parse_result(br#"{"status":"SUCCEED","totalCost":"many"}"#).is_err());
        assert!(parse_result(b"<html>").is_err());
    }

    #[test]
    fn an_error_object_with_http_200_is_a_refusal() {
        let e = refusal_in_success(&raw(
            200,
            r#"{"code":403200,"message":"workflow not published"}"#,
        ))
        .unwrap();
        assert_eq!((e.code.as_str(), e.http_status), ("403200", 200));
        assert!(
            refusal_in_success(&raw(200, r#"{"workflowRunId":"r","status":"PENDING"}"#)).is_none()
        );
        assert!(
            refusal_in_success(&raw(
                200,
                r#"{"code":0,"message":"ok","workflowRunId":"r"}"#
            ))
            .is_none()
        );
        assert!(refusal_in_success(&raw(200, "<html>")).is_none());
    }

    #[test]
    fn an_invoke_answer_without_a_run_id_is_unclear() {
        let ok =
            parse_invoked(br#"{"workflowRunId":"r1","status":"PENDING","workflowVersion":"1.0"}"#)
                .unwrap();
        assert_eq!(ok.provider_run_id, "r1");
        assert!(parse_invoked(br#"{"status":"PENDING"}"#).is_err());
    }
}
