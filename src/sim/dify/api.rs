//! The Dify service API handlers, mounted under `/dify/{app}/v1`.
//!
//! Every handler passes the shared gate, then takes the state lock once,
//! briefly, to count, inject faults and read or write; waiting (blocking
//! mode, streams) happens outside the lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::apps::{self, DifyApp};
use super::request;
use super::{stream, views};
use crate::sim::envelope;
use crate::sim::faults::Injected;
use crate::sim::gate::{self, Denied, Endpoint, Params, param};
use crate::sim::hostile::{self, Variant};
use crate::sim::limits::under_cap;
use crate::sim::state::Shared;

/// How often a blocking request looks at its run.
const BLOCKING_RECHECK: Duration = Duration::from_millis(25);

/// Most log entries per page.
const MAX_LIMIT: usize = 100;

/// The API router; the caller nests it under `/dify/{app}/v1`.
pub(crate) fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/parameters", get(parameters))
        .route("/workflows/run", post(run_latest))
        .route("/workflows/{workflow_id}/run", post(run_pinned))
        .route("/workflows/run/{workflow_run_id}", get(detail))
        .route("/workflow/{workflow_run_id}/events", get(events))
        .route("/workflows/tasks/{task_id}/stop", post(stop))
        .route("/workflows/logs", get(logs))
        .route("/files/upload", post(crate::sim::uploads::dify_upload))
        .fallback(|| async { not_found("The requested URL was not found on the server.") })
        .with_state(shared)
}

/// The path parameters any route may carry.
#[derive(Debug, Deserialize)]
struct Segments {
    app: String,
    workflow_id: Option<String>,
    workflow_run_id: Option<String>,
    task_id: Option<String>,
}

/// Dify's error body, `{code, message, status}`, with that HTTP status.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"code": code, "message": message, "status": status.as_u16()});
    (status, Json(body)).into_response()
}

fn not_found(message: &str) -> Response {
    error(StatusCode::NOT_FOUND, "not_found", message)
}

fn invalid_param(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_param", message)
}

/// An injected fault in Dify's clothes (the 502 page is the proxy's).
fn injected(fault: Injected) -> Response {
    match fault {
        Injected::Unavailable => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "service unavailable (injected)",
        ),
        Injected::ServerError if fastrand::bool() => envelope::injected(fault),
        Injected::ServerError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            "The server encountered an internal error (injected).",
        ),
        Injected::RateLimited { retry_after_secs } => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "Too many requests. Please try again later. (injected)",
            );
            if let Some(secs) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            response
        }
    }
}

/// The gate, then the app of the path.
async fn enter(
    shared: &Shared,
    headers: &HeaderMap,
    app: &str,
    endpoint: Endpoint,
) -> Result<&'static DifyApp, Response> {
    gate::check(shared, headers, endpoint)
        .await
        .map_err(|denied| match denied {
            Denied::Unauthorized => error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Access token is invalid",
            ),
            Denied::Malformed(n) => envelope::malformed(n),
            Denied::RateLimited { retry_after_secs } => envelope::with_retry_after(
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    "Too many requests. Please try again later.",
                ),
                retry_after_secs,
            ),
        })?;
    apps::find(app).ok_or_else(|| not_found(&format!("App {app:?} not found")))
}

async fn parameters(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<Segments>,
    headers: HeaderMap,
) -> Response {
    let app = match enter(&shared, &headers, &path.app, Endpoint::Other).await {
        Ok(app) => app,
        Err(response) => return response,
    };
    let (fault, upload_limit) = {
        let mut inner = shared.lock();
        let fault = inner.faults.random_fault();
        (
            fault.inspect(|&f| inner.record_injected(f)),
            inner.faults.max_upload_bytes,
        )
    };
    match fault {
        Some(fault) => injected(fault),
        None => {
            let mut parameters = app.parameters();
            // The uploads' limit, as Dify states it: in MB, for every kind.
            if let Some(bytes) = upload_limit {
                let mb = bytes as f64 / (1024.0 * 1024.0);
                parameters["system_parameters"] = serde_json::json!({
                    "file_size_limit": mb,
                    "image_file_size_limit": mb,
                    "audio_file_size_limit": mb,
                    "video_file_size_limit": mb,
                });
            }
            Json(parameters).into_response()
        }
    }
}

async fn run_latest(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<Segments>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run(shared, path, headers, body).await
}

async fn run_pinned(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<Segments>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run(shared, path, headers, body).await
}

/// What a run request comes to, decided under the lock.
enum Start {
    Refused(Response),
    Created {
        run_id: String,
        streaming: bool,
        drop_answer: bool,
    },
}

async fn run(shared: Arc<Shared>, path: Segments, headers: HeaderMap, body: Bytes) -> Response {
    let app = match enter(&shared, &headers, &path.app, Endpoint::Submit).await {
        Ok(app) => app,
        Err(response) => return response,
    };
    let start = decide_run(&shared, app, path.workflow_id.as_deref(), &body);
    let (run_id, streaming) = match start {
        Start::Refused(response) => return response,
        Start::Created {
            drop_answer: true,
            streaming,
            run_id,
        } => {
            // Nobody reads this run's stream: where runs die with their
            // stream, this one never finishes.
            let timing = shared.timing;
            let mut inner = shared.lock();
            if inner.faults.dify_runs_die_with_their_stream
                && let Some(run) = inner.dify.runs.get_mut(&run_id)
            {
                run.abandon(&timing, Duration::ZERO);
            }
            drop(inner);
            return lost_answer(streaming);
        }
        Start::Created {
            run_id, streaming, ..
        } => (run_id, streaming),
    };
    if streaming {
        return stream::live(shared, run_id, true);
    }
    loop {
        let wait = {
            let mut inner = shared.lock();
            let Some(run) = inner.dify.runs.get(&run_id) else {
                return not_found("run vanished");
            };
            let elapsed = Instant::now().saturating_duration_since(run.submitted);
            if run.is_over(&shared.timing, elapsed) {
                let hostile = run.hostile(inner.faults.hostile_outputs);
                let body = views::blocking(run, &shared.timing, elapsed, hostile.is_some());
                inner.stats.hostile_answers += u64::from(hostile.is_some());
                return answer(&body, hostile);
            }
            run.ends_after(&shared.timing).saturating_sub(elapsed)
        };
        tokio::time::sleep(wait.min(BLOCKING_RECHECK)).await;
    }
}

/// Counts, applies faults, validates and creates, in one critical section,
/// in this order: version, quota, injected faults (nothing is created),
/// the body, the form, the run cap; then the run, then whether its answer
/// is lost.
fn decide_run(shared: &Shared, app: &'static DifyApp, pinned: Option<&str>, body: &[u8]) -> Start {
    let mut inner = shared.lock();
    inner.stats.dify_run_requests += 1;
    if let Some(version) = pinned
        && version != app.workflow_id
    {
        inner.stats.dify_rejected += 1;
        return Start::Refused(not_found(&format!("Workflow {version:?} not found")));
    }
    if inner.faults.dify_quota_exceeded {
        inner.stats.dify_quota_refusals += 1;
        return Start::Refused(error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "You have exceeded your request quota for this app (simulated).",
        ));
    }
    if let Some(fault) = inner.faults.take_submit_fault() {
        inner.record_injected(fault);
        return Start::Refused(injected(fault));
    }
    let uploads = &inner.uploads;
    let uploaded = |id: &str| {
        uploads
            .iter()
            .any(|u| u.api == "dify" && u.app.as_deref() == Some(app.name) && u.id == id)
    };
    let checked = request::parse_run(body)
        .and_then(|req| apps::validate(app, &req.inputs, &uploaded).map(|()| req));
    let req = match checked {
        Ok(req) => req,
        Err(message) => {
            inner.stats.dify_rejected += 1;
            return Start::Refused(invalid_param(&message));
        }
    };
    let now = Instant::now();
    if !under_cap(
        inner.dify.running(&shared.timing, now),
        inner.faults.max_running_runs,
    ) {
        inner.stats.cap_refusals += 1;
        return Start::Refused(error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "Too many concurrent runs: the app's concurrency limit is reached.",
        ));
    }
    let run_id = inner.dify.create(app, req.user, req.inputs, now);
    let start_node_currency = inner.faults.dify_start_node_currency.clone();
    if let Some(run) = inner.dify.runs.get_mut(&run_id) {
        run.start_node_currency = start_node_currency;
    }
    inner.stats.dify_runs_created += 1;
    let drop_answer = inner.faults.take_answer_drop();
    inner.stats.dropped_answers += u64::from(drop_answer);
    Start::Created {
        run_id,
        streaming: req.streaming,
        drop_answer,
    }
}

/// The answer lost after the run was created: for a stream, the head goes
/// out and the connection breaks before `workflow_started`, so the client
/// never learns the run id.
fn lost_answer(streaming: bool) -> Response {
    if !streaming {
        return envelope::lost_answer();
    }
    // A pending body flushes the head; then the break, with no event sent.
    let stream = futures_util::stream::once(async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Err::<Bytes, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated loss of the run stream",
        ))
    })
    .boxed();
    let mut response = Response::new(axum::body::Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

async fn detail(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<Segments>,
    headers: HeaderMap,
) -> Response {
    let app = match enter(&shared, &headers, &path.app, Endpoint::StatusCheck).await {
        Ok(app) => app,
        Err(response) => return response,
    };
    let run_id = path.workflow_run_id.unwrap_or_default();
    let mut inner = shared.lock();
    inner.stats.dify_detail_requests += 1;
    if let Some(fault) = inner.faults.take_poll_fault() {
        inner.record_injected(fault);
        return injected(fault);
    }
    match inner.dify.runs.get(&run_id).filter(|r| r.app == app) {
        Some(run) => {
            let elapsed = Instant::now().saturating_duration_since(run.submitted);
            let hostile = run
                .hostile(inner.faults.hostile_outputs)
                .filter(|_| run.is_over(&shared.timing, elapsed));
            let body = views::detail(run, &shared.timing, elapsed, hostile.is_some());
            inner.stats.hostile_answers += u64::from(hostile.is_some());
            answer(&body, hostile)
        }
        None => not_found("Workflow run not found"),
    }
}

/// A JSON answer, spliced with its hostile entry if it has one.
fn answer(body: &Value, hostile: Option<Variant>) -> Response {
    match hostile {
        Some(variant) => envelope::json_text(hostile::splice(&body.to_string(), variant)),
        None => Json(body).into_response(),
    }
}

async fn events(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<Segments>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    let app = match enter(&shared, &headers, &path.app, Endpoint::StatusCheck).await {
        Ok(app) => app,
        Err(response) => return response,
    };
    let run_id = path.workflow_run_id.unwrap_or_default();
    let user = param(&params, "user");
    {
        let mut inner = shared.lock();
        inner.stats.dify_event_requests += 1;
        if let Some(fault) = inner.faults.take_poll_fault() {
            inner.record_injected(fault);
            return injected(fault);
        }
        // Another user's run is as invisible as a missing one.
        let visible = inner
            .dify
            .runs
            .get(&run_id)
            .is_some_and(|r| r.app == app && !user.is_empty() && r.user == user);
        if !visible {
            return not_found("Workflow run not found");
        }
    }
    stream::live(shared, run_id, false)
}

/// Stops a run. As in Dify, the answer is `success` whatever happened: an
/// unknown task, another user's task or a finished run change nothing
/// (counted in `dify_stops_ignored`); only a missing `user` is refused.
async fn stop(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<Segments>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let app = match enter(&shared, &headers, &path.app, Endpoint::Other).await {
        Ok(app) => app,
        Err(response) => return response,
    };
    let task_id = path.task_id.unwrap_or_default();
    let user = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|mut v| v.get_mut("user").map(Value::take));
    let mut inner = shared.lock();
    inner.stats.dify_stop_requests += 1;
    if let Some(fault) = inner.faults.random_fault() {
        inner.record_injected(fault);
        return injected(fault);
    }
    let user = match request::parse_user(user) {
        Ok(user) => user,
        Err(message) => return invalid_param(&message),
    };
    let now = Instant::now();
    let timing = shared.timing;
    let run_id = inner
        .dify
        .by_task
        .get(&task_id)
        .cloned()
        .unwrap_or_default();
    let stopped = inner
        .dify
        .runs
        .get_mut(&run_id)
        .filter(|r| r.app == app && r.user == user)
        .is_some_and(|run| run.stop(&timing, now.saturating_duration_since(run.submitted)));
    inner.stats.dify_stops_ignored += u64::from(!stopped);
    Json(json!({"result": "success"})).into_response()
}

/// `GET /workflows/logs`, newest first. Runs still running are listed only
/// with the `dify_logs_include_running` knob (see `Faults`).
async fn logs(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<Segments>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    let app = match enter(&shared, &headers, &path.app, Endpoint::StatusCheck).await {
        Ok(app) => app,
        Err(response) => return response,
    };
    // The error is the parameter's name: a `Response` is too big to carry.
    let number = |name: &'static str, default: usize| match param(&params, name) {
        "" => Ok(default),
        text => text.parse::<usize>().ok().filter(|n| *n >= 1).ok_or(name),
    };
    let (page, limit) = match (number("page", 1), number("limit", 20)) {
        (Ok(page), Ok(limit)) => (page, limit.min(MAX_LIMIT)),
        (Err(name), _) | (_, Err(name)) => {
            return invalid_param(&format!("{name} must be a positive integer"));
        }
    };
    let session = param(&params, "created_by_end_user_session_id");
    let status = param(&params, "status");
    let keyword = param(&params, "keyword").to_lowercase();
    let now = Instant::now();
    let timing = shared.timing;
    let mut inner = shared.lock();
    inner.stats.dify_log_requests += 1;
    if let Some(fault) = inner.faults.take_poll_fault() {
        inner.record_injected(fault);
        return injected(fault);
    }
    let include_running = inner.faults.dify_logs_include_running;
    let mut runs: Vec<_> = inner
        .dify
        .runs
        .values()
        .filter(|run| {
            let elapsed = now.saturating_duration_since(run.submitted);
            run.app == app
                && (include_running || run.is_over(&timing, elapsed))
                && (session.is_empty() || run.user == session)
                && (status.is_empty() || run.status(&timing, elapsed) == status)
                && (keyword.is_empty() || mentions(run, &keyword))
        })
        .collect();
    runs.sort_by_key(|run| std::cmp::Reverse(run.order));
    let total = runs.len();
    let data: Vec<Value> = runs
        .iter()
        .skip((page - 1).saturating_mul(limit))
        .take(limit)
        .map(|run| {
            let elapsed = now.saturating_duration_since(run.submitted);
            views::log_entry(run, &timing, elapsed, include_running)
        })
        .collect();
    drop(inner);
    Json(json!({
        "page": page,
        "limit": limit,
        "total": total,
        "has_more": page.saturating_mul(limit) < total,
        "data": data,
    }))
    .into_response()
}

/// Whether `keyword` (lower case) appears in the run's inputs or user.
fn mentions(run: &super::run::DifyRun, keyword: &str) -> bool {
    let inputs = Value::Object(run.inputs.clone()).to_string().to_lowercase();
    inputs.contains(keyword) || run.user.to_lowercase().contains(keyword)
}
