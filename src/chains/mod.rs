//! Chains of runs: a run that waits for other runs (`wfq.runs.depends_on`)
//! and takes their outputs as inputs (`{"$output": {"run": ID, "key": K}}`).
//!
//! The database does the bookkeeping (migration `20261224000001_chains`):
//! triggers complete `depends_on` from the references, refuse missing runs,
//! cycles and missing keys at insert, keep a run `waiting` (outside every
//! claim index) until its last dependency succeeds, and fail or cancel the
//! chain below a run that fails, in the transaction that finishes it.
//! What is left for the worker is pure: putting the dependencies' outputs
//! in place of the references before a submit (`resolve`), and reading the
//! references a producer writes on the command line (`references`).

pub mod references;
pub mod resolve;

pub use references::{OUTPUT_MARKER, OutputRef, parse_run_input, references};
pub use resolve::{Dependency, Store, Unresolved, check_dependencies, resolve};
