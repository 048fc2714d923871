//! GPTBots workflow API: `POST /v1/workflow/invoke` (asynchronous) and
//! `POST /v1/workflow/query/result`.
//!
//! GPTBots has no idempotency key, no way to list runs and no cancel
//! endpoint. A submit whose answer was lost cannot be found again, so the
//! lifecycle fails such a run `SUBMIT_OUTCOME_UNKNOWN` rather than risk a
//! second charge (see `SubmitGuard::Nothing`). The error format is not
//! documented; six-digit codes such as `403200` have been seen, so the
//! status line decides, except that a submit's code the profile lists as
//! about the account (`403200`, or `429001` for too many runs at once,
//! which comes with HTTP 429) refuses the account whatever the status below 500.
//!
//! Every body is repaired before it is parsed (see [`super::storable`]);
//! `totalCost` is read from the repaired text, whose numbers keep their
//! exact digits.

use serde::Deserialize;
use serde_json::{Value, json};

use super::edge::Storable;
use super::storable::AnswerLimits;
use super::wire::{
    Call, ErrorAnswer, RawAnswer, audit_copy, error_detail, non_empty, repaired, snippet,
    unreadable,
};
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
    limits: AnswerLimits,
}

impl GptbotsClient {
    /// A client with its own connection pool; `base_url` has no trailing slash.
    pub fn new(base_url: &str, api_key: ApiKey, http: &HttpConfig) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: super::wire::http_client(http)?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            limits: AnswerLimits::from(http),
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<RawAnswer, Unclear> {
        super::wire::send(request, &self.api_key, self.limits.max_value_bytes).await
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
        let outcome = match self.send(request).await {
            Ok(raw) => submit_outcome(&raw, run.account_refusals, &self.limits),
            Err(u) => SubmitOutcome::Unclear(u),
        };
        outcome.storable(&self.limits)
    }

    /// `POST /v1/workflow/query/result`.
    pub async fn poll(&self, workflow_run_id: &str) -> PollOutcome {
        let request = self
            .http
            .post(format!("{}/v1/workflow/query/result", self.base_url))
            .json(&json!({ "workflowRunId": workflow_run_id }));
        let outcome = match self.send(request).await {
            Ok(raw) => poll_outcome(&raw, &self.limits),
            Err(u) => PollOutcome::Unclear(u),
        };
        outcome.storable(&self.limits)
    }
}

/// What an invoke answer means, read against the profile's refusal codes
/// about the account (pure: the client's unit tests feed it bodies).
fn submit_outcome(
    raw: &RawAnswer,
    account_refusals: &[String],
    limits: &AnswerLimits,
) -> SubmitOutcome {
    if !raw.status.is_success() {
        return match classify_error(raw, Call::Submit { account_refusals }, limits) {
            Err(e) => SubmitOutcome::Rejected(e),
            Ok(u) => SubmitOutcome::Unclear(u),
        };
    }
    if let Some(refusal) = refusal_in_success(raw, limits) {
        return SubmitOutcome::Rejected(refusal);
    }
    match parse_invoked(&raw.body, limits) {
        Ok(accepted) => SubmitOutcome::Accepted(accepted),
        Err(u) => SubmitOutcome::Unclear(u),
    }
}

/// What a query/result answer means.
fn poll_outcome(raw: &RawAnswer, limits: &AnswerLimits) -> PollOutcome {
    if !raw.status.is_success() {
        return match classify_error(raw, Call::Other, limits) {
            Err(e) => PollOutcome::Rejected(e),
            Ok(u) => PollOutcome::Unclear(u),
        };
    }
    if let Some(refusal) = refusal_in_success(raw, limits) {
        return PollOutcome::Rejected(refusal);
    }
    match parse_result(&raw.body, limits) {
        Ok(report) => PollOutcome::Report(Box::new(report)),
        Err(u) => PollOutcome::Unclear(u),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    message: Option<String>,
}

/// A non-2xx answer to `call`: `Err` for a definite refusal, `Ok` for an
/// unclear one.
fn classify_error(
    raw: &RawAnswer,
    call: Call<'_>,
    limits: &AnswerLimits,
) -> Result<Unclear, ProviderError> {
    let body: ErrorBody = serde_json::from_str(&repaired(&raw.body, limits).0).unwrap_or_default();
    let code = match body.code {
        Some(Value::String(code)) if !code.trim().is_empty() => Some(code),
        Some(Value::Number(code)) => Some(code.to_string()),
        _ => None,
    };
    let message = non_empty(body.message).unwrap_or_else(|| snippet(&raw.body));
    let classified = super::wire::classify_error_status(
        ErrorAnswer {
            status: raw.status.as_u16(),
            retry_after: raw.retry_after,
            code: code.as_deref(),
            message: &message,
            body: &raw.body,
        },
        call,
        false,
        limits,
    );
    classified
        .map(|mut u| {
            u.reason = crate::files::redact_signed_urls_in_text(&u.reason);
            u
        })
        .map_err(without_signed_urls)
}

/// A refusal with the signed URLs it may quote (a presigned link to a
/// file of ours it could not fetch) cut to their path: such a URL is as
/// good as a password and must not be recorded.
fn without_signed_urls(mut e: ProviderError) -> ProviderError {
    e.message = crate::files::redact_signed_urls_in_text(&e.message);
    crate::files::redact_signed_urls(&mut e.detail);
    e
}

/// An HTTP 200 whose body is an error object (`{code, message}` and no run
/// id or status): a refusal, as the same body with a 4xx would be. Seen
/// with six-digit codes; the status line alone would call it a success.
fn refusal_in_success(raw: &RawAnswer, limits: &AnswerLimits) -> Option<ProviderError> {
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
    let probe: Probe = serde_json::from_str(&repaired(&raw.body, limits).0).ok()?;
    let code = match probe.code? {
        Value::Number(n) if n.as_i64() != Some(0) => n.to_string(),
        Value::String(s) if !s.trim().is_empty() && s != "0" => s,
        _ => return None,
    };
    if probe.workflow_run_id.is_some() || probe.status.is_some() {
        return None;
    }
    Some(without_signed_urls(ProviderError {
        code,
        message: non_empty(probe.message).unwrap_or_else(|| snippet(&raw.body)),
        detail: error_detail(&raw.body, limits),
        http_status: raw.status.as_u16(),
    }))
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

fn parse_invoked(body: &[u8], limits: &AnswerLimits) -> Result<Accepted, Unclear> {
    let (text, repairs) = repaired(body, limits);
    let invoked: Invoked =
        serde_json::from_str(&text).map_err(|e| unreadable("invoke answer", e))?;
    // Accepted without a run id: the run may exist and cannot be followed.
    let provider_run_id = non_empty(invoked.workflow_run_id)
        .ok_or_else(|| unreadable("invoke answer", "no workflowRunId"))?;
    Ok(Accepted {
        provider_run_id,
        revision_id: non_empty(invoked.workflow_version),
        run_status: non_empty(invoked.status),
        raw: audit_copy_without_signed_urls(&text),
        repairs,
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

/// An answer as recorded, with every signed URL in it cut to its path:
/// GPTBots echoes the `input` it was sent, where a file of an S3 store is
/// a presigned URL, and may quote that URL anywhere else (an
/// `errorMessage` saying it cannot fetch it, an `output`, an `error`
/// object), all of which goes to the run's row and events.
fn audit_copy_without_signed_urls(text: &str) -> Value {
    let mut raw = audit_copy(text);
    crate::files::redact_signed_urls(&mut raw);
    raw
}

fn parse_result(body: &[u8], limits: &AnswerLimits) -> Result<RunReport, Unclear> {
    let (text, repairs) = repaired(body, limits);
    let result: QueryResult =
        serde_json::from_str(&text).map_err(|e| unreadable("query result", e))?;
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
    // The cost is what was charged once the run is over. Before that it is
    // the cost so far (0 early on), which must not stay in the row as the
    // run's cost when the final answer has none; and a final answer
    // without `totalCost` leaves the money unknown (not settled, so the
    // lifecycle waits `poll.settle_wait` and records it estimated), never 0.
    let total_cost = total_cost.filter(|_| status.is_final());
    let settled = status.is_final() && total_cost.is_some();
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
            .map(|m| crate::files::redact_signed_urls_in_text(&m))
    } else {
        None
    };
    Ok(RunReport {
        status,
        outputs: result.output.filter(|o| !o.is_null()).map(|mut o| {
            crate::files::redact_signed_urls(&mut o);
            o
        }),
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
        raw: audit_copy_without_signed_urls(&text),
        repairs,
        ..RunReport::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::wire::test_answer as raw;
    use rust_decimal::Decimal;

    fn l() -> AnswerLimits {
        AnswerLimits::default()
    }

    fn listed() -> Vec<String> {
        crate::config::default_account_refusals(crate::config::ProviderKind::Gptbots)
    }

    #[test]
    fn error_answers_are_classified_by_status() {
        let submit = |r: &RawAnswer| {
            let listed = listed();
            classify_error(
                r,
                Call::Submit {
                    account_refusals: &listed,
                },
                &l(),
            )
        };
        let e = submit(&raw(
            400,
            r#"{"code":400001,"message":"input.topic is required"}"#,
        ))
        .unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("400001", "input.topic is required")
        );
        let u = submit(&raw(401, r#"{"code":401001,"message":"no"}"#)).unwrap();
        assert!(u.account_refused && u.nothing_created);
        let u = submit(&raw(429, "")).unwrap();
        assert!(u.nothing_created && !u.account_refused);
        let u = submit(&raw(502, "<html>")).unwrap();
        assert!(
            !u.nothing_created,
            "a 5xx may come after the run was created"
        );
        let e = submit(&raw(404, "not json")).unwrap_err();
        assert_eq!(e.code, "HTTP_404");
    }

    /// The simulator's answers (`sim::gptbots`) and what a submit and a
    /// status check make of them with the default `account_refusals`.
    #[test]
    fn listed_codes_refuse_the_account_on_a_submit_and_never_on_a_status_check() {
        let cap = raw(
            429,
            r#"{"code":429001,"message":"too many concurrent workflow runs"}"#,
        );
        let rate = raw(
            429,
            r#"{"code":429000,"message":"too many requests: rate limit exceeded"}"#,
        );
        let credits_403 = raw(403, r#"{"code":403200,"message":"insufficient credits"}"#);
        let credits_200 = raw(200, r#"{"code":403200,"message":"insufficient credits"}"#);
        let submit = |r: &RawAnswer| match submit_outcome(r, &listed(), &l()) {
            SubmitOutcome::Rejected(e) => format!("refused {} ({})", e.code, e.http_status),
            SubmitOutcome::Unclear(u) if u.account_refused => "key".to_owned(),
            SubmitOutcome::Unclear(u) if u.http_status == Some(429) => "rate".to_owned(),
            other => format!("{other:?}"),
        };
        let poll = |r: &RawAnswer| match poll_outcome(r, &l()) {
            PollOutcome::Rejected(e) => format!("refused {} ({})", e.code, e.http_status),
            PollOutcome::Unclear(u) if u.account_refused => "key".to_owned(),
            PollOutcome::Unclear(u) if u.http_status == Some(429) => "rate".to_owned(),
            other => format!("{other:?}"),
        };
        let table = [
            (&cap, "refused 429001 (429)", "rate"),
            (&rate, "rate", "rate"),
            (&credits_403, "refused 403200 (403)", "key"),
            (&credits_200, "refused 403200 (200)", "refused 403200 (200)"),
        ];
        for (answer, on_submit, on_poll) in table {
            assert_eq!(submit(answer), on_submit, "submit: {answer:?}");
            assert_eq!(poll(answer), on_poll, "status check: {answer:?}");
        }
        // A profile that lists nothing reads the cap as the rate.
        assert!(matches!(
            submit_outcome(&cap, &[], &l()),
            SubmitOutcome::Unclear(u) if u.http_status == Some(429) && !u.account_refused
        ));
    }

    #[test]
    fn the_documented_result_is_read_exactly() {
        let body = r#"{"workflowId":"w","workflowName":"todayNews","workflowVersion":"1.0.1",
            "workflowRunId":"r","input":{"topic":"News"},"output":{"news":[]},
            "workflowExecutionTime":8347,"status":"SUCCEED","totalCost":0.6928,"totalTokens":1745,
            "startTime":1758765323024,"endTime":1758765331373}"#;
        let report = parse_result(body.as_bytes(), &l()).unwrap();
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
        let running = parse_result(br#"{"status":"RUNNING","totalCost":0}"#, &l()).unwrap();
        assert_eq!(running.status, RunStatus::Active);
        assert!(!running.settled);
        assert_eq!(
            running.total_cost, None,
            "a cost so far is not the run's cost"
        );
        // Over, but without a cost: the money is unknown, not zero.
        let costless = parse_result(br#"{"status":"SUCCEED","output":{"news":[]}}"#, &l()).unwrap();
        assert_eq!(costless.status, RunStatus::Succeeded);
        assert!(!costless.settled);
        assert_eq!((costless.total_cost, costless.final_amount), (None, None));
        assert_eq!(costless.settlement_status.as_deref(), Some("unsettled"));
        let failed = parse_result(
            br#"{"status":"FAILED","output":null,"errorMessage":"node broke","totalCost":"0.1"}"#,
            &l(),
        )
        .unwrap();
        assert_eq!(failed.status, RunStatus::Failed);
        assert_eq!(failed.error_message.as_deref(), Some("node broke"));
        // A presigned link to one of our files, quoted or echoed, is cut
        // to its path before anything is recorded.
        let quoted = parse_result(
            br#"{"status":"FAILED","input":{"img":"https://b.s3.x/k.png?X-Amz-Signature=s1"},"errorMessage":"cannot fetch https://b.s3.x/k.png?X-Amz-Signature=s1"}"#,
            &l(),
        )
        .unwrap();
        assert_eq!(
            quoted.error_message.as_deref(),
            Some("cannot fetch https://b.s3.x/k.png")
        );
        assert_eq!(quoted.raw["input"]["img"], "https://b.s3.x/k.png");
        assert!(!quoted.raw.to_string().contains("s1"), "{}", quoted.raw);
        // Anywhere in the answer: the error members, the outputs, and a
        // link in an escaped or encoded form.
        let everywhere = parse_result(
            br#"{"status":"FAILED","error":{"url":"https://b/k?X-Amz-Signature=s3"},"message":"see https:\/\/b\/k?X-Amz-Credential=AK&X-Amz-Signature=s4","output":{"tried":["https://b/k?X-Amz-Security-Token=s5","u=https%3A%2F%2Fb%3FX-Amz-Signature%3Ds6"]},"errorMessage":"cannot fetch"}"#,
            &l(),
        )
        .unwrap();
        let recorded = format!(
            "{} {} {:?}",
            everywhere.raw,
            everywhere.outputs.as_ref().expect("outputs"),
            everywhere.error_message
        );
        for secret in ["s3", "s4", "AK", "s5", "s6"] {
            assert!(
                !recorded.contains(&format!("={secret}"))
                    && !recorded.contains(&format!("%3D{secret}")),
                "{secret}: {recorded}"
            );
        }
        let invoked = parse_invoked(
            br#"{"workflowRunId":"r1","status":"PENDING","input":{"img":"https://b/k?X-Amz-Signature=s7"}}"#,
            &l(),
        )
        .unwrap();
        assert!(!invoked.raw.to_string().contains("s7"), "{}", invoked.raw);
        let refused = refusal_in_success(
            &raw(
                200,
                r#"{"code":400001,"message":"bad https://b/k?X-Amz-Signature=s2"}"#,
            ),
            &l(),
        )
        .unwrap();
        assert!(!refused.message.contains("s2") && !refused.detail.to_string().contains("s2"));
        let odd = parse_result(br#"{"status":"QUEUED_SOMEWHERE"}"#, &l()).unwrap();
        assert_eq!(odd.status, RunStatus::Unknown("QUEUED_SOMEWHERE".into()));
        assert!(parse_result(br#"{"status":"SUCCEED","totalCost":"many"}"#, &l()).is_err());
        assert!(parse_result(b"<html>", &l()).is_err());
    }

    #[test]
    fn an_error_object_with_http_200_is_a_refusal() {
        let e = refusal_in_success(
            &raw(200, r#"{"code":403200,"message":"workflow not published"}"#),
            &l(),
        )
        .unwrap();
        assert_eq!((e.code.as_str(), e.http_status), ("403200", 200));
        assert!(
            refusal_in_success(
                &raw(200, r#"{"workflowRunId":"r","status":"PENDING"}"#),
                &l()
            )
            .is_none()
        );
        assert!(
            refusal_in_success(
                &raw(200, r#"{"code":0,"message":"ok","workflowRunId":"r"}"#),
                &l()
            )
            .is_none()
        );
        assert!(refusal_in_success(&raw(200, "<html>"), &l()).is_none());
    }

    #[test]
    fn a_hostile_query_result_becomes_a_storable_report_with_exact_money() {
        use crate::providers::wire::hostile;
        let limits = l();
        let body = format!(
            r#"{{"workflowId":"w","workflowRunId":"r","status":"SUCCEED","totalCost":0.00028780,"totalTokens":1745,"output":{}}}"#,
            hostile::outputs()
        );
        let outcome = poll_outcome(&raw(200, &body), &limits).storable(&limits);
        let PollOutcome::Report(report) = outcome else {
            panic!("not a report: {outcome:?}");
        };
        assert_eq!(report.status, RunStatus::Succeeded);
        assert_eq!(report.total_cost.unwrap().to_string(), "0.00028780");
        assert_eq!(report.final_amount, report.total_cost);
        assert!(report.settled);
        hostile::assert_outputs_repaired(&report, &limits);
        assert_eq!(report.repairs, hostile::repairs());
    }

    #[test]
    fn hostile_bodies_that_are_not_utf8_or_refusals_are_storable() {
        let limits = l();
        let mut body = br#"{"workflowRunId":"r1","status":"PENDING","note":""#.to_vec();
        body.extend_from_slice(b"\xff\x00\"}");
        let answer = RawAnswer {
            body,
            ..raw(200, "")
        };
        let SubmitOutcome::Accepted(a) =
            submit_outcome(&answer, &listed(), &limits).storable(&limits)
        else {
            panic!("not accepted");
        };
        assert_eq!(a.provider_run_id, "r1");
        assert_eq!(a.raw["note"], "\u{FFFD}\u{FFFD}");
        assert_eq!((a.repairs.invalid_utf8, a.repairs.nul), (1, 1));
        let outcome = poll_outcome(
            &raw(200, r#"{"code":403200,"message":"no\u0000"}"#),
            &limits,
        )
        .storable(&limits);
        let PollOutcome::Rejected(e) = outcome else {
            panic!("not rejected: {outcome:?}");
        };
        assert_eq!(e.message, "no\u{FFFD}");
        assert_eq!(
            e.detail[crate::providers::ERROR_REPAIRS_KEY],
            serde_json::json!({"nul": 1})
        );
    }

    #[test]
    fn an_invoke_answer_without_a_run_id_is_unclear() {
        let ok = parse_invoked(
            br#"{"workflowRunId":"r1","status":"PENDING","workflowVersion":"1.0"}"#,
            &l(),
        )
        .unwrap();
        assert_eq!(ok.provider_run_id, "r1");
        assert!(parse_invoked(br#"{"status":"PENDING"}"#, &l()).is_err());
    }
}
