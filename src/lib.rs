//! wfq: a durable PostgreSQL queue and long-lived worker for paid
//! workflow-run APIs.
//!
//! Producers `INSERT INTO wfq.runs`; `wfq worker` submits each run once with a
//! stable idempotency key, polls it on a schedule stored in the database and
//! writes outputs and money back. See README.md and DESIGN.md.

pub mod backoff;
pub mod bench;
pub mod callbacks;
pub mod chains;
pub mod config;
pub mod demo;
pub mod files;
pub mod inputs;
pub mod lifecycle;
pub mod metrics;
pub mod money;
pub mod providers;
pub mod runtime;
pub mod scratch_postgres;
pub mod sim;
pub mod spend;
pub mod store;
pub mod table;
pub mod telemetry;
pub mod terminal;
pub mod web;
