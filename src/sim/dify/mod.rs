//! A simulator of Dify's workflow service API, for the apps in `apps`.
//!
//! Mounted at `/dify/{app}/v1` (the path segment stands for the app that a
//! real key selects). Runs follow the shared `SimConfig` clock: `running`
//! for queue + run time, then the app's ending, or `stopped`. There is no
//! idempotency, as in Dify: every accepted run request is a new, billed
//! run, which the ledger shows.
//!
//! Module map: `apps` (forms, endings, validation), `request` (run body),
//! `run` (run records, store, ledger), `events` (the event timeline),
//! `views` (detail, blocking answer, logs), `stream` (live SSE), `api`
//! (routes).

mod api;
mod apps;
mod events;
mod request;
mod run;
mod stream;
mod views;

use std::time::Instant;

pub use run::DifyLedgerEntry;

pub(crate) use api::routes;
pub(crate) use run::DifyStore;

use super::state::Shared;

/// The ledger, in creation order.
pub(crate) fn ledger(shared: &Shared) -> Vec<DifyLedgerEntry> {
    let now = Instant::now();
    shared.lock().dify.ledger(&shared.timing, now)
}
