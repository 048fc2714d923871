//! Admin endpoints under `/_sim`: the same knobs `SimServer` offers in
//! process, for out-of-process tests and the `wfq sim` command. No auth:
//! the simulator is a development tool bound to a local address.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use rust_decimal::Decimal;
use serde_json::json;
use serde_json::value::RawValue;
use std::collections::HashMap;

use super::balance;
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
        .route("/_sim/uploads", get(uploads))
        .route("/_sim/faults", get(get_faults).put(put_faults))
        .route("/_sim/balance", get(get_balance).put(put_balance))
        .route("/_sim/balance/top_up", post(top_up))
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

async fn uploads(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock().uploads.clone()).into_response()
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

async fn get_balance(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({"balance": shared.balance()})).into_response()
}

/// `{"balance": "12.50"}` (a string or a number, read exactly; `null` for
/// unlimited) replaces the balance.
async fn put_balance(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let balance = match field(&body, "balance") {
        Ok(raw) if raw.get() == "null" => None,
        Ok(raw) => match balance::parse_amount(raw.get()) {
            Ok(amount) => Some(amount),
            Err(e) => return bad_request(format!("balance: {e}")),
        },
        Err(e) => return bad_request(e),
    };
    shared.set_balance(balance);
    Json(json!({"balance": shared.balance()})).into_response()
}

/// `{"amount": "5"}` adds a positive amount to a configured balance.
async fn top_up(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let amount = match field(&body, "amount").and_then(|raw| balance::parse_amount(raw.get())) {
        Ok(amount) if amount > Decimal::ZERO => amount,
        Ok(amount) => return bad_request(format!("amount must be positive, got {amount}")),
        Err(e) => return bad_request(format!("amount: {e}")),
    };
    match shared.top_up(amount) {
        Some(balance) => Json(json!({"balance": balance})).into_response(),
        None => (
            StatusCode::CONFLICT,
            Json(json!({"error": "the account is unlimited: set a balance first"})),
        )
            .into_response(),
    }
}

/// The raw JSON text of `name` in a JSON object body, for exact parsing.
fn field(body: &[u8], name: &str) -> Result<Box<RawValue>, String> {
    let mut object: HashMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON object: {e}"))?;
    object
        .remove(name)
        .ok_or_else(|| format!("{name} is required"))
}

fn bad_request(error: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": error}))).into_response()
}
