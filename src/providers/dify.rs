//! Dify workflow service API: `/parameters`, `/workflows/run`,
//! `/workflows/run/{id}`, `/workflows/logs`, `/workflow/{id}/events`,
//! `/workflows/tasks/{task_id}/stop`.
//!
//! Dify has no idempotency keys: a repeated submit is a second, separately
//! billed run. So wfq sends `user` = a value derived from the run's key,
//! and a submit whose answer was lost is looked for in the logs filtered by
//! that user before anything is sent again (see `find_submitted`).
//!
//! Why the submit holds the stream: `workflow_started`, the stream's first
//! event, names the run, and the step records it at once (`running`). The
//! step then keeps reading the same stream to `workflow_finished`, renewing
//! its lease, and records the result and the nodes' prices from it. Several
//! Dify versions tie a workflow's progress to its stream: when the client
//! goes away the run stays `running` for good and is never logged (Dify
//! issues #12798, #19548, #20237, #23654, #26169), so letting go of the
//! stream would lose the run. Blocking mode is cut at 100 s by Dify cloud.
//! If the stream breaks anyway (network, worker restart), the run is
//! followed with `GET /workflows/run/{id}` on the durable schedule, which is
//! all a Dify that keeps running detached workflows needs.

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};

use std::collections::VecDeque;
use std::time::Duration;

use super::sse::EventReader;
use super::wire::{RawAnswer, audit_copy, non_empty, snippet, unreadable};
use super::{
    Accepted, FindOutcome, Manifest, ManifestError, ParamKind, Parameter, PollOutcome, PollRequest,
    ProviderError, RunReport, RunStatus, StopOutcome, SubmitOutcome, SubmitRequest, Unclear,
    end_user,
};
use crate::config::{ApiKey, HttpConfig};
use crate::money::{WireAmount, parse_amount};

/// Log pages read when looking for a lost submit (100 entries each).
const LOG_PAGES: u32 = 5;

/// Longest silence on a run's stream before it counts as lost (Dify sends
/// a `ping` every 10 s).
pub const STREAM_IDLE: Duration = Duration::from_secs(45);

/// A client for one Dify app (its API key selects the app).
#[derive(Debug, Clone)]
pub struct DifyClient {
    http: reqwest::Client,
    /// Without a whole-request timeout: a run's stream lasts as long as the
    /// run. Its parts are bounded one by one instead.
    stream_http: reqwest::Client,
    call_timeout: Duration,
    base_url: String,
    api_key: ApiKey,
}

impl DifyClient {
    /// A client with its own connection pool; `base_url` has no trailing slash.
    pub fn new(base_url: &str, api_key: ApiKey, http: &HttpConfig) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: super::wire::http_client(http)?,
            stream_http: reqwest::Client::builder()
                .connect_timeout(http.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("wfq/", env!("CARGO_PKG_VERSION")))
                .build()?,
            call_timeout: http.timeout,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<RawAnswer, Unclear> {
        super::wire::send(request, &self.api_key).await
    }

    /// `GET /parameters`: the app's input form as a manifest.
    pub async fn manifest(&self, workflow_id: &str) -> Result<Manifest, ManifestError> {
        let request = self
            .http
            .get(format!("{}/parameters", self.base_url))
            .query(&[("user", "wfq")]);
        let raw = self.send(request).await.map_err(ManifestError::Unclear)?;
        if !raw.status.is_success() {
            return Err(match classify_error(&raw) {
                Failure::Rejected(e) => ManifestError::Rejected(e),
                Failure::Unclear(u) => ManifestError::Unclear(u),
            });
        }
        parse_manifest(workflow_id, &raw.body).map_err(ManifestError::Unclear)
    }

    /// `POST /workflows/run` (or `/workflows/{revision}/run`) in streaming
    /// mode, read up to `workflow_started` within `http.timeout`; the rest
    /// of the stream comes back with an accepted run, to be followed.
    pub async fn submit(&self, run: &SubmitRequest<'_>) -> (SubmitOutcome, Option<RunStream>) {
        match tokio::time::timeout(self.call_timeout, self.submit_until_started(run)).await {
            Ok(answer) => answer,
            Err(_) => (
                SubmitOutcome::Unclear(Unclear::new(
                    "timed out before workflow_started; the run may exist",
                    Some(200),
                )),
                None,
            ),
        }
    }

    async fn submit_until_started(
        &self,
        run: &SubmitRequest<'_>,
    ) -> (SubmitOutcome, Option<RunStream>) {
        let url = match run.revision_id {
            Some(revision) => format!("{}/workflows/{revision}/run", self.base_url),
            None => format!("{}/workflows/run", self.base_url),
        };
        let body = json!({
            "inputs": run.inputs,
            "response_mode": "streaming",
            "user": end_user(run.idempotency_key),
        });
        let sent = self
            .stream_http
            .post(url)
            .bearer_auth(self.api_key.expose())
            .json(&body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => return (SubmitOutcome::Unclear(Unclear::from_transport(e)), None),
        };
        let status = response.status();
        if !status.is_success() || is_json(&response) {
            let raw = match read_answer(response).await {
                Ok(raw) => raw,
                Err(u) => return (SubmitOutcome::Unclear(u), None),
            };
            if !status.is_success() {
                return match classify_error(&raw) {
                    Failure::Rejected(e) => (SubmitOutcome::Rejected(e), None),
                    Failure::Unclear(u) => (SubmitOutcome::Unclear(u), None),
                };
            }
            // A JSON answer to a streaming request: a blocking-style body.
            return match parse_blocking(&raw.body) {
                Ok(accepted) => (SubmitOutcome::Accepted(accepted), None),
                Err(u) => (SubmitOutcome::Unclear(u), None),
            };
        }
        let mut reader = EventReader::default();
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    let u = Unclear::new(
                        "the stream ended before workflow_started; the run may exist",
                        Some(status.as_u16()),
                    );
                    return (SubmitOutcome::Unclear(u), None);
                }
                Err(e) => {
                    let u = Unclear {
                        http_status: Some(status.as_u16()),
                        ..Unclear::from_transport(e)
                    };
                    return (SubmitOutcome::Unclear(u), None);
                }
            };
            let mut events: VecDeque<String> = reader.push(&chunk).into();
            while let Some(data) = events.pop_front() {
                match read_stream_event(&data) {
                    StreamStart::Started(accepted) => {
                        let stream = RunStream {
                            response,
                            reader,
                            pending: events,
                            prices: PriceSum::default(),
                        };
                        return (SubmitOutcome::Accepted(accepted), Some(stream));
                    }
                    StreamStart::Failed(Failure::Rejected(e)) => {
                        return (SubmitOutcome::Rejected(e), None);
                    }
                    StreamStart::Failed(Failure::Unclear(u)) => {
                        return (SubmitOutcome::Unclear(u), None);
                    }
                    StreamStart::Other => {}
                }
            }
        }
    }

    /// `GET /workflows/logs?created_by_end_user_session_id=USER`: a run
    /// submitted under this key whose answer was lost.
    ///
    /// Every page is read only if it can end before `deadline` (the lease),
    /// and "not found" is said only once the whole list was read: a list cut
    /// short (pages or time ran out) is unclear, never a reason to resubmit.
    pub async fn find_submitted(
        &self,
        idempotency_key: &str,
        deadline: std::time::Instant,
    ) -> FindOutcome {
        let user = end_user(idempotency_key);
        let mut found: Vec<LogEntry> = Vec::new();
        let mut complete = false;
        for page in 1..=LOG_PAGES {
            if std::time::Instant::now() + self.call_timeout >= deadline {
                break;
            }
            let request = self
                .http
                .get(format!("{}/workflows/logs", self.base_url))
                .query(&[
                    ("created_by_end_user_session_id", user.as_str()),
                    ("page", &page.to_string()),
                    ("limit", "100"),
                ]);
            let raw = match self.send(request).await {
                Ok(raw) => raw,
                Err(u) => return FindOutcome::Unclear(u),
            };
            if !raw.status.is_success() {
                return FindOutcome::Unclear(match classify_error(&raw) {
                    Failure::Unclear(u) => u,
                    // A refusal of a read says nothing about the run.
                    Failure::Rejected(e) => Unclear::new(
                        format!("workflows/logs refused: {} ({})", e.message, e.code),
                        Some(e.http_status),
                    ),
                });
            }
            let logs: LogPage = match serde_json::from_slice(&raw.body) {
                Ok(logs) => logs,
                Err(e) => return FindOutcome::Unclear(unreadable("workflow logs", e)),
            };
            // The filter is checked again here: a Dify that ignored the
            // parameter would otherwise hand us somebody else's run.
            found.extend(logs.data.into_iter().filter(|entry| {
                entry
                    .created_by_end_user
                    .as_ref()
                    .and_then(|u| u.session_id.as_deref())
                    == Some(user.as_str())
            }));
            if !logs.has_more {
                complete = true;
                break;
            }
        }
        if found.is_empty() && !complete {
            return FindOutcome::Unclear(Unclear::new(
                format!(
                    "workflows/logs could not be read to the end (at most {LOG_PAGES} pages within the lease); the run may be further down"
                ),
                None,
            ));
        }
        adopt(found)
    }

    /// `GET /workflows/run/{id}`; once the run is over, its costs from the
    /// event replay.
    pub async fn poll(&self, run: &PollRequest<'_>) -> PollOutcome {
        let request = self.http.get(format!(
            "{}/workflows/run/{}",
            self.base_url, run.provider_run_id
        ));
        let raw = match self.send(request).await {
            Ok(raw) => raw,
            Err(u) => return PollOutcome::Unclear(u),
        };
        if !raw.status.is_success() {
            return match classify_error(&raw) {
                Failure::Rejected(e) => PollOutcome::Rejected(e),
                Failure::Unclear(u) => PollOutcome::Unclear(u),
            };
        }
        let mut report = match parse_run(&raw.body) {
            Ok(report) => report,
            Err(u) => return PollOutcome::Unclear(u),
        };
        if report.status.is_final() {
            let costs = self.costs(run).await;
            apply_costs(&mut report, costs);
        }
        PollOutcome::Report(Box::new(report))
    }

    /// Reads the run's events again (`GET /workflow/{id}/events`) and adds
    /// up the prices of its nodes: the run detail carries no price. Read up
    /// to `workflow_finished` only, so a stream kept open after the end
    /// cannot hold the step until the timeout.
    async fn costs(&self, run: &PollRequest<'_>) -> Costs {
        let sent = self
            .http
            .get(format!(
                "{}/workflow/{}/events",
                self.base_url, run.provider_run_id
            ))
            .query(&[("user", end_user(run.idempotency_key))])
            .bearer_auth(self.api_key.expose())
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => return Costs::Unclear(Unclear::from_transport(e)),
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = super::wire::retry_after(response.headers());
            let body = response
                .bytes()
                .await
                .map(|b| b.to_vec())
                .unwrap_or_default();
            let raw = RawAnswer {
                status,
                retry_after,
                body,
            };
            return match status.as_u16() {
                // An older Dify without the endpoint, or one that forgot the
                // run's events: the run is over, its price cannot be learned.
                400 | 404 | 405 | 410 => {
                    Costs::Unavailable(format!("HTTP {}: {}", raw.status, snippet(&raw.body)))
                }
                _ => Costs::Unclear(match classify_error(&raw) {
                    Failure::Unclear(u) => u,
                    Failure::Rejected(e) => Unclear::new(e.message, Some(e.http_status)),
                }),
            };
        }
        let mut reader = EventReader::default();
        let mut sum = PriceSum::default();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    for data in reader.push(&chunk) {
                        match sum.add(&data) {
                            Ok(true) => return sum.known(),
                            Ok(false) => {}
                            Err(u) => return Costs::Unclear(u),
                        }
                    }
                }
                // The replay ended without `workflow_finished` (cut short,
                // or expired): a partial sum is no price; ask again later.
                Ok(None) => {
                    for data in reader.push(b"\n\n") {
                        match sum.add(&data) {
                            Ok(true) => return sum.known(),
                            Ok(false) => {}
                            Err(u) => return Costs::Unclear(u),
                        }
                    }
                    return Costs::Unclear(Unclear::new(
                        "the event replay ended before workflow_finished",
                        Some(status.as_u16()),
                    ));
                }
                Err(e) => {
                    return Costs::Unclear(Unclear {
                        http_status: Some(status.as_u16()),
                        ..Unclear::from_transport(e)
                    });
                }
            }
        }
    }

    /// `POST /workflows/tasks/{task_id}/stop`.
    pub async fn stop(&self, run: &PollRequest<'_>) -> StopOutcome {
        let Some(task_id) = run.task_id else {
            return StopOutcome::Rejected(ProviderError {
                code: "NO_TASK_ID".into(),
                message: "the run has no task_id (it was found again through the logs, which do not carry one), so Dify cannot stop it".into(),
                detail: Value::Null,
                http_status: 0,
            });
        };
        let request = self
            .http
            .post(format!("{}/workflows/tasks/{task_id}/stop", self.base_url))
            .json(&json!({ "user": end_user(run.idempotency_key) }));
        match self.send(request).await {
            Ok(raw) if raw.status.is_success() => StopOutcome::Requested,
            Ok(raw) => match classify_error(&raw) {
                Failure::Rejected(e) => StopOutcome::Rejected(e),
                Failure::Unclear(u) => StopOutcome::Unclear(u),
            },
            Err(u) => StopOutcome::Unclear(u),
        }
    }
}

/// The rest of a run's stream after `workflow_started`.
pub struct RunStream {
    response: reqwest::Response,
    reader: EventReader,
    pending: VecDeque<String>,
    prices: PriceSum,
}

impl std::fmt::Debug for RunStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunStream")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// How a followed stream ended.
#[derive(Debug)]
pub enum StreamEnd {
    /// `workflow_finished`: the run's result with its money.
    Finished(Box<RunReport>),
    /// The stream broke, ended early or went quiet for [`STREAM_IDLE`]: the
    /// run is followed by status checks from here.
    Lost(Unclear),
}

impl RunStream {
    /// Reads to `workflow_finished`. Safe to poll from a `select!` loop as
    /// long as the same future is polled again (it keeps its place).
    pub async fn follow(&mut self) -> StreamEnd {
        loop {
            while let Some(data) = self.pending.pop_front() {
                if let Err(u) = self.prices.add(&data) {
                    return StreamEnd::Lost(u);
                }
                if let Some(finished) = finished_report(&data) {
                    return match finished {
                        Ok(mut report) => {
                            let prices = std::mem::take(&mut self.prices);
                            apply_costs(&mut report, prices.known());
                            StreamEnd::Finished(Box::new(report))
                        }
                        Err(u) => StreamEnd::Lost(u),
                    };
                }
            }
            match tokio::time::timeout(STREAM_IDLE, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.pending.extend(self.reader.push(&chunk)),
                Ok(Ok(None)) => {
                    return StreamEnd::Lost(Unclear::new(
                        "the run's stream ended before workflow_finished",
                        Some(200),
                    ));
                }
                Ok(Err(e)) => return StreamEnd::Lost(Unclear::from_transport(e)),
                Err(_) => {
                    return StreamEnd::Lost(Unclear::new(
                        format!("the run's stream was silent for {STREAM_IDLE:?}"),
                        Some(200),
                    ));
                }
            }
        }
    }
}

/// The report in a `workflow_finished` event (`None` for other events).
fn finished_report(data: &str) -> Option<Result<RunReport, Unclear>> {
    let event: StreamEvent = serde_json::from_str(data).ok()?;
    if event.event.as_deref() != Some("workflow_finished") {
        return None;
    }
    let Some(detail) = event.data else {
        return Some(Err(unreadable("workflow_finished event", "no data")));
    };
    let text = detail.to_string();
    Some(parse_run(text.as_bytes()).map(|mut report| {
        report.raw = serde_json::from_str(data).unwrap_or(Value::Null);
        report
    }))
}

/// Reads a whole (error or JSON) answer.
async fn read_answer(response: reqwest::Response) -> Result<RawAnswer, Unclear> {
    let status = response.status();
    let retry_after = super::wire::retry_after(response.headers());
    let body = response.bytes().await.map_err(|e| Unclear {
        http_status: Some(status.as_u16()),
        ..Unclear::from_transport(e)
    })?;
    Ok(RawAnswer {
        status,
        retry_after,
        body: body.to_vec(),
    })
}

fn is_json(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// A non-2xx answer, read.
#[derive(Debug, PartialEq)]
enum Failure {
    Rejected(ProviderError),
    Unclear(Unclear),
}

/// Dify's error body.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// The rules for an error answer, as a pure function.
fn classify_error(raw: &RawAnswer) -> Failure {
    let status = raw.status;
    let body: ErrorBody = serde_json::from_slice(&raw.body).unwrap_or_default();
    let code = non_empty(body.code);
    let message = non_empty(body.message).unwrap_or_else(|| snippet(&raw.body));
    failure(status.as_u16(), raw.retry_after, code, message, &raw.body)
}

fn failure(
    status: u16,
    retry_after: Option<std::time::Duration>,
    code: Option<String>,
    message: String,
    body: &[u8],
) -> Failure {
    let quota = code.as_deref() == Some("rate_limit_error");
    match super::wire::classify_error_status(status, retry_after, code, message, quota, body) {
        Ok(u) => Failure::Unclear(u),
        Err(e) => Failure::Rejected(e),
    }
}

/// One streamed event, as far as the submit cares.
enum StreamStart {
    Started(Accepted),
    Failed(Failure),
    Other,
}

#[derive(Debug, Deserialize)]
struct StreamEvent {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    workflow_run_id: Option<String>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

fn read_stream_event(data: &str) -> StreamStart {
    let event: StreamEvent = match serde_json::from_str(data) {
        Ok(event) => event,
        // A line we cannot read is skipped: the event we wait for names
        // itself, and a stream that never brings it ends as unclear.
        Err(_) => return StreamStart::Other,
    };
    match event.event.as_deref() {
        Some("workflow_started") => {
            let run_id = non_empty(event.workflow_run_id).or_else(|| {
                event
                    .data
                    .as_ref()
                    .and_then(|d| d.get("id"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
            match non_empty(run_id) {
                Some(provider_run_id) => StreamStart::Started(Accepted {
                    provider_run_id,
                    task_id: non_empty(event.task_id),
                    run_status: Some("running".into()),
                    raw: audit_copy(data),
                    ..Accepted::default()
                }),
                None => StreamStart::Failed(Failure::Unclear(unreadable(
                    "workflow_started event",
                    "no workflow_run_id",
                ))),
            }
        }
        Some("error") => StreamStart::Failed(failure(
            event.status.unwrap_or(500),
            None,
            non_empty(event.code),
            non_empty(event.message).unwrap_or_else(|| "error event".into()),
            data.as_bytes(),
        )),
        _ => StreamStart::Other,
    }
}

#[derive(Debug, Deserialize)]
struct BlockingAnswer {
    #[serde(default)]
    workflow_run_id: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    data: Option<RunDetail>,
}

fn parse_blocking(body: &[u8]) -> Result<Accepted, Unclear> {
    let answer: BlockingAnswer =
        serde_json::from_slice(body).map_err(|e| unreadable("run answer", e))?;
    let provider_run_id = non_empty(answer.workflow_run_id)
        .ok_or_else(|| unreadable("run answer", "no workflow_run_id"))?;
    Ok(Accepted {
        provider_run_id,
        task_id: non_empty(answer.task_id),
        run_status: answer.data.and_then(|d| non_empty(d.status)),
        raw: serde_json::from_slice(body).unwrap_or(Value::Null),
        ..Accepted::default()
    })
}

#[derive(Debug, Deserialize)]
struct LogPage {
    #[serde(default)]
    data: Vec<LogEntry>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct LogEntry {
    workflow_run: LogRun,
    #[serde(default)]
    created_by_end_user: Option<EndUser>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct LogRun {
    id: String,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct EndUser {
    #[serde(default)]
    session_id: Option<String>,
}

/// The run to adopt among the log entries of our user (newest first).
fn adopt(found: Vec<LogEntry>) -> FindOutcome {
    let count = found.len();
    // The oldest is the one our first lost submit created; more than one
    // means somebody submitted again outside wfq (or an earlier version
    // did): it is named in the event for an operator to look at.
    let Some(oldest) = found.last() else {
        return FindOutcome::NotFound;
    };
    FindOutcome::Found(Box::new(Accepted {
        provider_run_id: oldest.workflow_run.id.clone(),
        run_status: oldest.workflow_run.status.clone(),
        raw: json!({
            "found_in": "workflows/logs",
            "runs_of_this_user": count,
            "others": found[..count - 1].iter().map(|e| e.workflow_run.id.clone()).collect::<Vec<_>>(),
            "workflow_run": serde_json::to_value(&oldest.workflow_run).unwrap_or(Value::Null),
        }),
        ..Accepted::default()
    }))
}

#[derive(Debug, Deserialize)]
struct RunDetail {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    outputs: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    total_tokens: Option<Value>,
}

fn parse_run(body: &[u8]) -> Result<RunReport, Unclear> {
    let run: RunDetail = serde_json::from_slice(body).map_err(|e| unreadable("run detail", e))?;
    let run_status = non_empty(run.status).ok_or_else(|| unreadable("run detail", "no status"))?;
    let status = match run_status.as_str() {
        // `paused` waits for a person (human input): still the run's time.
        "running" | "paused" | "pending" | "waiting" => RunStatus::Active,
        "succeeded" | "partial-succeeded" => RunStatus::Succeeded,
        "failed" | "stopped" => RunStatus::Failed,
        other => RunStatus::Unknown(other.to_owned()),
    };
    let error_message = match run.error {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s),
        Some(Value::Null) | None => None,
        Some(Value::String(_)) => None,
        Some(other) => Some(other.to_string()),
    };
    let error_code = match run_status.as_str() {
        "stopped" => Some("PROVIDER_RUN_STOPPED".to_owned()),
        _ => None,
    };
    Ok(RunReport {
        outputs: match run.outputs {
            // Some versions send the outputs as a JSON string.
            Some(Value::String(text)) => serde_json::from_str(&text)
                .ok()
                .or(Some(Value::String(text))),
            Some(Value::Null) | None => None,
            Some(other) => Some(other),
        },
        total_tokens: run.total_tokens.as_ref().and_then(read_count),
        error_code,
        error_message,
        status,
        run_status: Some(run_status),
        raw: serde_json::from_slice(body).unwrap_or(Value::Null),
        ..RunReport::default()
    })
}

/// A count sent as a number or as a string of digits.
fn read_count(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// What the event replay said about money.
#[derive(Debug, PartialEq)]
enum Costs {
    /// The sum of the nodes' prices (`None`: no node named a price).
    Known {
        total_price: Option<Decimal>,
        currency: Option<String>,
    },
    /// The replay cannot be had; the price stays unknown for good.
    Unavailable(String),
    /// Ask again on the next status check.
    Unclear(Unclear),
}

#[derive(Debug, Deserialize)]
struct NodeFinished {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    data: Option<NodeData>,
}

#[derive(Debug, Deserialize)]
struct NodeData {
    #[serde(default)]
    execution_metadata: Option<ExecutionMetadata>,
    #[serde(default)]
    iteration_id: Option<Value>,
    #[serde(default)]
    loop_id: Option<Value>,
}

impl NodeData {
    fn is_inside_iteration_or_loop(&self) -> bool {
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        let meta = self.execution_metadata.as_ref();
        set(&self.iteration_id)
            || set(&self.loop_id)
            || meta.is_some_and(|m| set(&m.iteration_id) || set(&m.loop_id))
    }
}

#[derive(Debug, Deserialize)]
struct ExecutionMetadata {
    #[serde(default)]
    total_price: Option<WireAmount>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    iteration_id: Option<Value>,
    #[serde(default)]
    loop_id: Option<Value>,
}

/// The prices of a run's nodes, added up as its events are read.
#[derive(Debug, Default)]
struct PriceSum {
    total: Option<Decimal>,
    currency: Option<String>,
    /// Nodes priced in a second currency: no single total exists.
    mixed: bool,
}

impl PriceSum {
    /// Adds one event; `Ok(true)` once the run's last event has been read.
    fn add(&mut self, data: &str) -> Result<bool, Unclear> {
        let Ok(event) = serde_json::from_str::<NodeFinished>(data) else {
            return Ok(false);
        };
        match event.event.as_deref() {
            Some("workflow_finished") => return Ok(true),
            Some("node_finished") => {}
            _ => return Ok(false),
        }
        let Some(node) = event.data else {
            return Ok(false);
        };
        // Iteration and loop nodes report the total of their inner nodes,
        // which report their own prices too: count the inner ones once.
        if node.is_inside_iteration_or_loop() {
            return Ok(false);
        }
        let Some(meta) = node.execution_metadata else {
            return Ok(false);
        };
        if let Some(price) = parse_amount("total_price", meta.total_price.as_ref())
            .map_err(|e| unreadable("node price", e))?
        {
            let total = self
                .total
                .unwrap_or_default()
                .checked_add(price)
                .ok_or_else(|| unreadable("node prices", "their sum overflows"))?;
            self.total = Some(total);
        }
        match (non_empty(meta.currency), &self.currency) {
            (Some(currency), None) => self.currency = Some(currency),
            (Some(currency), Some(seen)) if currency != *seen => self.mixed = true,
            _ => {}
        }
        Ok(false)
    }

    fn known(self) -> Costs {
        if self.mixed {
            return Costs::Unavailable("the nodes are priced in more than one currency".into());
        }
        Costs::Known {
            total_price: self.total,
            currency: self.currency,
        }
    }
}

#[cfg(test)]
fn sum_node_prices(body: &[u8]) -> Costs {
    let mut reader = EventReader::default();
    let mut events = reader.push(body);
    events.extend(reader.push(b"\n\n"));
    let mut sum = PriceSum::default();
    for data in events {
        match sum.add(&data) {
            Ok(true) => break,
            Ok(false) => {}
            Err(u) => return Costs::Unclear(u),
        }
    }
    sum.known()
}

/// Puts the costs into a final report; the money is final once they are
/// known (Dify freezes nothing, so what the nodes cost is what is charged).
fn apply_costs(report: &mut RunReport, costs: Costs) {
    let note = match costs {
        Costs::Known {
            total_price,
            currency,
        } => {
            report.total_cost = total_price;
            report.final_amount = total_price;
            report.currency = currency;
            report.settled = true;
            json!({ "source": "node_finished execution_metadata", "total_price": total_price.map(|d| d.to_string()) })
        }
        Costs::Unavailable(why) => {
            report.settled = true;
            json!({ "source": "none", "unavailable": why })
        }
        Costs::Unclear(u) => {
            report.settled = false;
            json!({ "source": "pending", "unclear": u.reason })
        }
    };
    report.settlement_status = Some(
        if report.settled {
            "settled"
        } else {
            "unsettled"
        }
        .into(),
    );
    if let Value::Object(raw) = &mut report.raw {
        raw.insert("wfq_costs".into(), note);
    }
}

#[derive(Debug, Deserialize)]
struct Parameters {
    #[serde(default)]
    user_input_form: Vec<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
struct FormControl {
    variable: String,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    options: Vec<String>,
    #[serde(default)]
    max_length: Option<u64>,
}

fn parse_manifest(workflow_id: &str, body: &[u8]) -> Result<Manifest, Unclear> {
    let parameters: Parameters =
        serde_json::from_slice(body).map_err(|e| unreadable("app parameters", e))?;
    let mut out = Vec::new();
    for item in parameters.user_input_form {
        // Each item is `{"<control type>": {variable, required, ...}}`.
        let Some((control, spec)) = item.into_iter().next() else {
            continue;
        };
        let spec: FormControl = serde_json::from_value(spec)
            .map_err(|e| unreadable("app parameters", format!("{control}: {e}")))?;
        let kind = match control.as_str() {
            "text-input" | "paragraph" => ParamKind::String,
            "select" => ParamKind::Choice(spec.options),
            "number" => ParamKind::Float,
            "checkbox" => ParamKind::Bool,
            other => ParamKind::Other(other.to_owned()),
        };
        out.push(Parameter {
            key: spec.variable,
            kind,
            required: spec.required,
            // Dify fills its own defaults; sending them again adds nothing.
            default_value: None,
            max_chars: spec.max_length.filter(|n| *n > 0).map(|n| n as usize),
        });
    }
    Ok(Manifest {
        workflow_id: workflow_id.to_owned(),
        revision_id: None,
        currency: None,
        quote_amount: None,
        may_incur_external_cost: false,
        parameters: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::wire::test_answer as raw;

    #[test]
    fn error_answers_are_classified_by_status_and_code() {
        let table: [(u16, &str, &str); 8] = [
            (
                400,
                r#"{"code":"invalid_param","message":"query is required","status":400}"#,
                "rejected invalid_param",
            ),
            (
                400,
                r#"{"code":"provider_not_initialize","message":"no creds","status":400}"#,
                "rejected provider_not_initialize",
            ),
            (
                404,
                r#"{"code":"not_found","message":"no","status":404}"#,
                "rejected not_found",
            ),
            (
                401,
                r#"{"code":"unauthorized","message":"bad key","status":401}"#,
                "refused",
            ),
            (
                429,
                r#"{"code":"rate_limit_error","message":"quota","status":429}"#,
                "refused",
            ),
            (
                429,
                r#"{"code":"too_many_requests","message":"busy","status":429}"#,
                "retry-nothing-created",
            ),
            (
                500,
                r#"{"code":"internal_server_error","message":"boom","status":500}"#,
                "retry-maybe-created",
            ),
            (502, "<html>bad gateway</html>", "retry-maybe-created"),
        ];
        for (status, body, expected) in table {
            let got = match classify_error(&raw(status, body)) {
                Failure::Rejected(e) => format!("rejected {}", e.code),
                Failure::Unclear(u) if u.account_refused => "refused".to_owned(),
                Failure::Unclear(u) if u.nothing_created => "retry-nothing-created".to_owned(),
                Failure::Unclear(_) => "retry-maybe-created".to_owned(),
            };
            assert_eq!(got, expected, "{status} {body}");
        }
    }

    #[test]
    fn workflow_started_names_the_run_and_an_error_event_is_classified() {
        let started = r#"{"event":"workflow_started","task_id":"t1","workflow_run_id":"r1","data":{"id":"r1"}}"#;
        match read_stream_event(started) {
            StreamStart::Started(a) => {
                assert_eq!(a.provider_run_id, "r1");
                assert_eq!(a.task_id.as_deref(), Some("t1"));
            }
            _ => panic!("not started"),
        }
        let only_data = r#"{"event":"workflow_started","task_id":"t1","data":{"id":"r2"}}"#;
        assert!(
            matches!(read_stream_event(only_data), StreamStart::Started(a) if a.provider_run_id == "r2")
        );
        let error = r#"{"event":"error","status":400,"code":"invalid_param","message":"bad"}"#;
        assert!(matches!(
            read_stream_event(error),
            StreamStart::Failed(Failure::Rejected(e)) if e.code == "invalid_param"
        ));
        assert!(matches!(
            read_stream_event(r#"{"event":"ping"}"#),
            StreamStart::Other
        ));
    }

    #[test]
    fn statuses_map_to_the_lifecycle() {
        let table = [
            ("running", RunStatus::Active),
            ("paused", RunStatus::Active),
            ("succeeded", RunStatus::Succeeded),
            ("partial-succeeded", RunStatus::Succeeded),
            ("failed", RunStatus::Failed),
            ("stopped", RunStatus::Failed),
            ("exploded", RunStatus::Unknown("exploded".into())),
        ];
        for (status, expected) in table {
            let body = format!(
                r#"{{"id":"r","status":"{status}","inputs":"{{}}","outputs":null,"error":null,"total_tokens":12,"created_at":"Thu, 18 Jul 2024 03:17:40 -0000"}}"#
            );
            let report = parse_run(body.as_bytes()).unwrap();
            assert_eq!(report.status, expected, "{status}");
            assert_eq!(report.total_tokens, Some(12));
        }
        let stopped = parse_run(br#"{"status":"stopped","error":"stopped by user"}"#).unwrap();
        assert_eq!(stopped.error_code.as_deref(), Some("PROVIDER_RUN_STOPPED"));
        assert!(parse_run(br#"{"id":"r"}"#).is_err(), "no status is unclear");
    }

    #[test]
    fn node_prices_are_summed_exactly_from_strings_and_numbers() {
        let body = concat!(
            "data: {\"event\":\"workflow_started\",\"workflow_run_id\":\"r\"}\n\n",
            "data: {\"event\":\"node_finished\",\"data\":{\"execution_metadata\":{\"total_price\":\"0.0000001\",\"currency\":\"USD\"}}}\n\n",
            "data: {\"event\":\"node_finished\",\"data\":{\"execution_metadata\":{\"total_price\":99999999.99999999,\"currency\":\"USD\"}}}\n\n",
            "data: {\"event\":\"node_finished\",\"data\":{}}\n\n",
            "data: {\"event\":\"workflow_finished\",\"data\":{\"status\":\"succeeded\"}}",
        );
        assert_eq!(
            sum_node_prices(body.as_bytes()),
            Costs::Known {
                total_price: Some(Decimal::from_str_exact("100000000.00000009").unwrap()),
                currency: Some("USD".into())
            }
        );
        let bad = "data: {\"event\":\"node_finished\",\"data\":{\"execution_metadata\":{\"total_price\":\"lots\"}}}\n\n";
        assert!(matches!(sum_node_prices(bad.as_bytes()), Costs::Unclear(_)));
    }

    #[test]
    fn the_input_form_becomes_a_manifest() {
        let body = br#"{"user_input_form":[
            {"paragraph":{"label":"Query","variable":"query","required":true,"default":""}},
            {"select":{"label":"Tone","variable":"tone","required":false,"default":"","options":["formal","casual"]}},
            {"number":{"label":"Max","variable":"max_words","required":false}},
            {"text-input":{"label":"Title","variable":"title","required":false,"max_length":48}},
            {"file":{"label":"Doc","variable":"doc","required":false}}
        ],"file_upload":{},"system_parameters":{}}"#;
        let manifest = parse_manifest("app", body).unwrap();
        let kinds: Vec<_> = manifest
            .parameters
            .iter()
            .map(|p| (p.key.as_str(), p.kind.clone(), p.required, p.max_chars))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("query", ParamKind::String, true, None),
                (
                    "tone",
                    ParamKind::Choice(vec!["formal".into(), "casual".into()]),
                    false,
                    None
                ),
                ("max_words", ParamKind::Float, false, None),
                ("title", ParamKind::String, false, Some(48)),
                ("doc", ParamKind::Other("file".into()), false, None),
            ]
        );
        assert_eq!(manifest.revision_id, None);
    }

    #[test]
    fn only_runs_of_our_user_are_adopted_and_the_oldest_wins() {
        let entry = |id: &str| LogEntry {
            workflow_run: LogRun {
                id: id.into(),
                status: Some("succeeded".into()),
            },
            created_by_end_user: Some(EndUser {
                session_id: Some("wfq-k".into()),
            }),
        };
        assert_eq!(adopt(vec![]), FindOutcome::NotFound);
        match adopt(vec![entry("newer"), entry("older")]) {
            FindOutcome::Found(a) => {
                assert_eq!(a.provider_run_id, "older");
                assert_eq!(a.raw["runs_of_this_user"], 2);
            }
            other => panic!("{other:?}"),
        }
    }
}
