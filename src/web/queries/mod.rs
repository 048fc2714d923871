//! Every statement the dashboard runs that the store does not have already.
//! Each is bounded and index-backed on a table of a million runs
//! (`tests/web_plans.rs` checks their plans).

pub mod money;
pub mod overview;
pub mod run;
pub mod runs;
