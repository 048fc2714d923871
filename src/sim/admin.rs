//! Admin endpoints under `/_sim`: the same knobs `SimServer` offers in
//! process, for out-of-process tests and the `wfq sim` command. No auth:
//! the simulator is a development tool bound to a local address.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;

use super::faults::Faults;
use super::state::Shared;

/// The admin router, mounted at the root.
pub(crate) fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_sim/health", get(|| async { "ok" }))
        .route("/_sim/ledger", get(ledger))
        .route("/_sim/dify/ledger", get(dify_ledger))
        .route("/_sim/gptbots/ledger", get(gptbots_ledger))
        .route("/_sim/stats", get(stats))
        .route("/_sim/faults", get(get_faults).put(put_faults))
        .with_state(shared)
}

async fn ledger(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.ledger()).into_response()
}

async fn dify_ledger(State(shared): State<Arc<Shared>>) -> Response {
    Json(super::dify::ledger(&shared)).into_response()
}

async fn gptbots_ledger(State(shared): State<Arc<Shared>>) -> Response {
    Json(super::gptbots::ledger(&shared)).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.stats()).into_response()
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Response {
    let faults = shared.lock().faults.clone();
    Json(faults).into_response()
}

/// Replaces the faults (missing fields mean "no fault") and echoes them.
/// Parsed by hand so that a bad body gets a JSON explanation, whatever the
/// request's content type.
async fn put_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let faults = match serde_json::from_slice::<Faults>(&body) {
        Ok(faults) => faults,
        Err(e) => return bad_request(format!("invalid faults JSON: {e}")),
    };
    if let Err(e) = faults.check() {
        return bad_request(e);
    }
    shared.set_faults(faults.clone());
    Json(faults).into_response()
}

fn bad_request(error: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": error}))).into_response()
}
