//! The open API v2 handlers, mounted under `/api/open/v2`.
//!
//! Every handler starts with `gate` (latency, then authentication), then
//! takes the state lock once, briefly, to count, inject faults and read or
//! write; responses are built after the lock is released where possible.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;

use super::balance;
use super::catalog;
use super::envelope::{self, ApiError};
use super::gate::{self, Denied, Endpoint, Params, param};
use super::hostile::{self, Variant};
use super::state::Shared;
use super::submit::{self, SubmitOutcome};
use super::timeline::Phase;
use super::views::{self, QueueInfo};

/// The API router; the caller nests it under `/api/open/v2`.
pub(crate) fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/workflow/market/info", get(market_info))
        .route("/workflow/run/submit", post(run_submit))
        .route("/workflow/run/info", get(run_info))
        .route("/workflow/run/execution", get(run_execution))
        .route("/balance/info", get(balance_info))
        .route("/assets", post(super::uploads::chenyu_assets))
        .fallback(|| async { envelope::plain(StatusCode::NOT_FOUND, "not found") })
        .with_state(shared)
}

/// The shared gate, rendered in chenyu's envelope.
async fn gate(shared: &Shared, headers: &HeaderMap, endpoint: Endpoint) -> Result<(), Response> {
    gate::check(shared, headers, endpoint)
        .await
        .map_err(|denied| match denied {
            Denied::Unauthorized => envelope::plain(StatusCode::UNAUTHORIZED, "invalid api key"),
            Denied::Malformed(n) => envelope::malformed(n),
            Denied::RateLimited { retry_after_secs } => envelope::with_retry_after(
                envelope::plain(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many requests: rate limit exceeded",
                ),
                retry_after_secs,
            ),
        })
}

async fn market_info(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    if let Err(denied) = gate(&shared, &headers, Endpoint::Other).await {
        return denied;
    }
    let fault = {
        let mut inner = shared.lock();
        inner.stats.market_requests += 1;
        let fault = inner.faults.random_fault();
        fault.inspect(|&f| inner.record_injected(f))
    };
    if let Some(fault) = fault {
        return envelope::injected(fault);
    }
    let workflow_id = param(&params, "workflow_id");
    match catalog::find(workflow_id) {
        Some(wf) => envelope::ok("查询成功", wf.market_info()),
        None => submit::workflow_not_found(workflow_id).into_response(),
    }
}

/// `GET /balance/info`: the account balance, as 8-place strings on odd
/// requests and as JSON numbers on even ones.
async fn balance_info(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(denied) = gate(&shared, &headers, Endpoint::Other).await {
        return denied;
    }
    let (fault, balance, as_numbers) = {
        let mut inner = shared.lock();
        inner.stats.balance_requests += 1;
        if inner.faults.balance_info_missing {
            return (
                StatusCode::NOT_FOUND,
                "404 page not found: this account has no balance/info",
            )
                .into_response();
        }
        let as_numbers = inner.stats.balance_requests.is_multiple_of(2);
        let fault = inner.faults.random_fault();
        fault.inspect(|&f| inner.record_injected(f));
        let balance = inner.settle_account(&shared.timing, Instant::now());
        (fault, balance, as_numbers)
    };
    if let Some(fault) = fault {
        return envelope::injected(fault);
    }
    envelope::json_text(balance::info_body(balance, as_numbers))
}

async fn run_submit(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(denied) = gate(&shared, &headers, Endpoint::Submit).await {
        return denied;
    }
    let request = submit::parse(&body);
    let outcome = submit::decide(&shared, &mut shared.lock(), request, Instant::now());
    match outcome {
        SubmitOutcome::Fault(fault) => envelope::injected(fault),
        SubmitOutcome::Rejected(error) => error.into_response(),
        SubmitOutcome::Accepted {
            drop_answer: true, ..
        } => envelope::lost_answer(),
        SubmitOutcome::Accepted { data, .. } => envelope::ok("提交成功", data),
    }
}

/// Which polling endpoint is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PollKind {
    Info,
    Execution,
}

async fn run_info(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    poll(&shared, &headers, &params, PollKind::Info).await
}

async fn run_execution(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    poll(&shared, &headers, &params, PollKind::Execution).await
}

async fn poll(shared: &Shared, headers: &HeaderMap, params: &Params, kind: PollKind) -> Response {
    if let Err(denied) = gate(shared, headers, Endpoint::StatusCheck).await {
        return denied;
    }
    let run_order_id = param(params, "run_order_id");
    let now = Instant::now();
    let mut inner = shared.lock();
    match kind {
        PollKind::Info => inner.stats.info_requests += 1,
        PollKind::Execution => inner.stats.execution_requests += 1,
    }
    if let Some(fault) = inner.faults.take_poll_fault() {
        inner.record_injected(fault);
        drop(inner);
        return envelope::injected(fault);
    }
    let Some(run) = inner.runs.get(run_order_id) else {
        drop(inner);
        return run_not_found(run_order_id).into_response();
    };
    let phase = shared.phase_now(run, now);
    let hostile = (inner.faults.hostile_outputs && phase >= Phase::Finished)
        .then(|| Variant::of_run(run.seq));
    let mut data = match kind {
        PollKind::Info => views::run_info(run, phase, &shared.timing, hostile.is_some()),
        PollKind::Execution => {
            let elapsed = now.saturating_duration_since(run.submitted);
            let queue = (phase == Phase::Queued).then(|| QueueInfo {
                position: inner.queued_ahead(run, &shared.timing, now) + 1,
                estimated_wait_sec: shared.timing.estimated_wait_secs(elapsed),
            });
            let progress = shared.timing.progress_percent(elapsed);
            views::execution(run, phase, progress, queue, hostile.is_some())
        }
    };
    inner.stats.hostile_answers += u64::from(hostile.is_some());
    drop(inner);
    super::media::link_outputs(&mut data, headers);
    match hostile {
        Some(variant) => envelope::json_text(hostile::splice(
            &envelope::ok_body("查询成功", data).to_string(),
            variant,
        )),
        None => envelope::ok("查询成功", data),
    }
}

fn run_not_found(run_order_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "run not found",
        "RUN_NOT_FOUND",
        format!("run order {run_order_id:?} does not exist"),
    )
}
