//! A simulator of the GPTBots workflow API (`invoke`, `query/result`), for
//! the workflows in `workflows`.
//!
//! Mounted at `/gptbots/{workflow}` (the path segment stands for the
//! workflow a real key selects). Runs follow the shared `SimConfig` clock:
//! `PENDING`, `RUNNING`, then `SUCCEED` or `FAILED`. No idempotency, no
//! cancel, webhooks accepted but never called.
//!
//! Module map: `workflows` (catalog, invoke body), `run` (run records,
//! store, ledger), `views` (answer bodies), `api` (routes).

mod api;
mod run;
mod views;
mod workflows;

use std::time::Instant;

pub use run::GptbotsLedgerEntry;

pub(crate) use api::routes;
pub(crate) use run::GptbotsStore;

use super::state::Shared;

/// The ledger, in creation order.
pub(crate) fn ledger(shared: &Shared) -> Vec<GptbotsLedgerEntry> {
    let now = Instant::now();
    shared.lock().gptbots.ledger(&shared.timing, now)
}
