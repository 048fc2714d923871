//! The GPTBots workflow API handlers, mounted under `/gptbots/{workflow}`.
//!
//! The error format is undocumented; the simulator answers
//! `{"code": <six digits>, "message"}` with a matching HTTP status, as seen
//! in the wild, and chenyu's injected 5xx answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::views::{self, Oddities};
use super::workflows::{self, GptWorkflow};
use crate::sim::envelope;
use crate::sim::faults::Injected;
use crate::sim::gate::{self, Denied, Endpoint};
use crate::sim::hostile::Variant;
use crate::sim::limits::under_cap;
use crate::sim::state::{Inner, Shared};
use crate::sim::timeline::Timing;

/// How often a synchronous invoke looks at its run.
const SYNC_RECHECK: Duration = Duration::from_millis(25);

/// The API router; the caller nests it under `/gptbots/{workflow}`.
pub(crate) fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/workflow/invoke", post(invoke))
        .route("/v1/workflow/query/result", post(query_result))
        .fallback(|| async { error(StatusCode::NOT_FOUND, 404_000, "not found") })
        .with_state(shared)
}

#[derive(Debug, Deserialize)]
struct Segments {
    workflow: String,
}

/// The error body `{code, message}` with HTTP `status`.
fn error(status: StatusCode, code: u32, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

fn injected(fault: Injected) -> Response {
    match fault {
        Injected::RateLimited { retry_after_secs } => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                429_000,
                "too many requests (injected)",
            );
            if let Some(secs) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            response
        }
        other => envelope::injected(other),
    }
}

/// A serialized JSON body with HTTP 200.
fn json_text(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The gate, then the workflow of the path.
async fn enter(
    shared: &Shared,
    headers: &HeaderMap,
    workflow: &str,
    endpoint: Endpoint,
) -> Result<&'static GptWorkflow, Response> {
    gate::check(shared, headers, endpoint)
        .await
        .map_err(|denied| match denied {
            Denied::Unauthorized => error(
                StatusCode::UNAUTHORIZED,
                401_001,
                "invalid or missing API key",
            ),
            Denied::Malformed(n) => envelope::malformed(n),
            Denied::RateLimited { retry_after_secs } => envelope::with_retry_after(
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    429_000,
                    "too many requests: rate limit exceeded",
                ),
                retry_after_secs,
            ),
        })?;
    workflows::find(workflow)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, 404_002, "workflow not found"))
}

/// What an invoke comes to, decided under the lock.
enum Start {
    Refused(Response),
    Created {
        run_id: String,
        is_async: bool,
        drop_answer: bool,
    },
}

async fn invoke(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<Segments>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let workflow = match enter(&shared, &headers, &path.workflow, Endpoint::Submit).await {
        Ok(wf) => wf,
        Err(response) => return response,
    };
    let (run_id, is_async) = match decide(&shared, workflow, &body) {
        Start::Refused(response) => return response,
        Start::Created {
            drop_answer: true, ..
        } => return envelope::lost_answer(),
        Start::Created {
            run_id, is_async, ..
        } => (run_id, is_async),
    };
    loop {
        let wait = {
            let mut inner = shared.lock();
            let Some(run) = inner.gptbots.runs.get(&run_id) else {
                return error(StatusCode::NOT_FOUND, 404_001, "workflow run not found");
            };
            if is_async {
                return Json(views::pending(run)).into_response();
            }
            let elapsed = Instant::now().saturating_duration_since(run.submitted);
            if run.is_over(&shared.timing, elapsed) {
                let text = result_text(&mut inner, &shared.timing, &run_id, elapsed);
                return json_text(text.unwrap_or_default());
            }
            (shared.timing.queue + shared.timing.run).saturating_sub(elapsed)
        };
        tokio::time::sleep(wait.min(SYNC_RECHECK)).await;
    }
}

/// Counts, injects faults (before anything is created), validates, checks
/// the run cap and the credits, creates, and decides whether the answer is
/// lost, under one lock.
fn decide(shared: &Shared, workflow: &'static GptWorkflow, body: &[u8]) -> Start {
    let mut inner = shared.lock();
    inner.stats.gptbots_invoke_requests += 1;
    if let Some(fault) = inner.faults.take_submit_fault() {
        inner.record_injected(fault);
        return Start::Refused(injected(fault));
    }
    let invoke = match workflows::parse_invoke(body) {
        Ok(invoke) => invoke,
        Err(message) => {
            inner.stats.gptbots_rejected += 1;
            return Start::Refused(error(StatusCode::BAD_REQUEST, 400_001, &message));
        }
    };
    let now = Instant::now();
    if !under_cap(
        inner.gptbots.running(&shared.timing, now),
        inner.faults.max_running_runs,
    ) {
        inner.stats.cap_refusals += 1;
        return Start::Refused(error(
            StatusCode::TOO_MANY_REQUESTS,
            429_001,
            "too many concurrent workflow runs",
        ));
    }
    inner.settle_account(&shared.timing, now);
    if !inner.account.has_credits() {
        inner.stats.balance_refusals += 1;
        return Start::Refused(error(StatusCode::OK, 403_200, "insufficient credits"));
    }
    let run_id = inner
        .gptbots
        .create(workflow, invoke.user_id, invoke.input, now);
    inner.account.debit_at_end(&run_id);
    inner.stats.gptbots_runs_created += 1;
    let drop_answer = inner.faults.take_answer_drop();
    inner.stats.dropped_answers += u64::from(drop_answer);
    Start::Created {
        run_id,
        is_async: invoke.is_async,
        drop_answer,
    }
}

async fn query_result(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<Segments>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let workflow = match enter(&shared, &headers, &path.workflow, Endpoint::StatusCheck).await {
        Ok(wf) => wf,
        Err(response) => return response,
    };
    let run_id = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.get("workflowRunId")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let mut inner = shared.lock();
    inner.stats.gptbots_query_requests += 1;
    if let Some(fault) = inner.faults.take_poll_fault() {
        inner.record_injected(fault);
        return injected(fault);
    }
    let Some(run_id) = run_id.filter(|id| !id.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            400_001,
            "workflowRunId is required",
        );
    };
    let elapsed = match inner
        .gptbots
        .runs
        .get(&run_id)
        .filter(|r| r.workflow == workflow)
    {
        Some(run) => Instant::now().saturating_duration_since(run.submitted),
        None => return error(StatusCode::NOT_FOUND, 404_001, "workflow run not found"),
    };
    let text = result_text(&mut inner, &shared.timing, &run_id, elapsed);
    json_text(text.unwrap_or_default())
}

/// The result body of a run `elapsed` after its creation, bent by the
/// faults' oddities once it is over, each counted in the stats.
fn result_text(
    inner: &mut Inner,
    timing: &Timing,
    run_id: &str,
    elapsed: Duration,
) -> Option<String> {
    let run = inner.gptbots.runs.get(run_id)?;
    let faults = &inner.faults;
    let odd = Oddities {
        hostile: faults.hostile_outputs.then(|| Variant::of_run(run.order)),
        unknown_status: faults.gptbots_unknown_status.as_deref(),
        omit_total_cost: faults.gptbots_omit_total_cost,
    };
    let text = views::result(run, timing, elapsed, &odd);
    if run.is_over(timing, elapsed) {
        let stats = &mut inner.stats;
        stats.hostile_answers += u64::from(odd.hostile.is_some());
        stats.gptbots_unknown_statuses += u64::from(odd.unknown_status.is_some());
        stats.gptbots_costs_omitted += u64::from(odd.omit_total_cost);
    }
    Some(text)
}
