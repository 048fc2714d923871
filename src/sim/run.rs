//! A run order as the simulator stores it, and its ledger entry.

use std::time::Instant;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::catalog::Workflow;
use super::money::{Settlement, settle};
use super::timeline::Phase;

/// The money trail of one idempotency key, as the simulator's "bank" sees
/// it. Tests use it to prove a client never paid twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The key the run was submitted with.
    pub idempotency_key: String,
    /// The workflow the run belongs to.
    pub workflow_id: String,
    /// The run created for this key.
    pub run_order_id: String,
    /// Frozen once, at the first accepted submit: the quote.
    pub frozen: Decimal,
    /// What was finally charged; `Some` once settled.
    pub final_amount: Option<Decimal>,
    /// What was given back; `Some` once settled.
    pub released: Option<Decimal>,
    /// Accepted submits for this key, the first one and every replay.
    pub submit_requests: u32,
    /// Times money was frozen for this key. Anything but 1 is a simulator bug.
    pub charges: u32,
}

/// One run order.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub run_order_id: String,
    pub workflow: &'static Workflow,
    pub idempotency_key: String,
    /// The `inputs` exactly as submitted (`{}` when absent), echoed by `run/info`.
    pub inputs: Value,
    pub task_id: String,
    pub prompt_id: String,
    pub billing_run_id: String,
    /// Monotonic submit time: the phase is computed from it.
    pub submitted: Instant,
    /// Wall-clock submit time, for `created_at` / `updated_at`.
    pub created_at: DateTime<Utc>,
    /// Decided at submit (it is deterministic per key), revealed once settled.
    pub settlement: Settlement,
    pub submit_requests: u32,
    pub charges: u32,
    /// Creation order, from 1: picks the hostile answer (`hostile`).
    pub seq: u64,
}

impl Run {
    /// A freshly accepted run: the quote is frozen once, here.
    pub(crate) fn new(
        run_order_id: String,
        workflow: &'static Workflow,
        idempotency_key: String,
        inputs: Value,
        submitted: Instant,
        seq: u64,
    ) -> Run {
        let created_at = Utc::now();
        let nanos = created_at.timestamp_nanos_opt().unwrap_or_default();
        Run {
            run_order_id,
            workflow,
            settlement: settle(workflow, &idempotency_key),
            idempotency_key,
            inputs,
            task_id: format!("task_{nanos}_{:016x}", fastrand::u64(..)),
            prompt_id: format!("prompt_{nanos}_{:016x}", fastrand::u64(..)),
            billing_run_id: format!("wfbill_{nanos}"),
            submitted,
            created_at,
            submit_requests: 1,
            charges: 1,
            seq,
        }
    }

    /// The ledger view of this run at `phase`.
    pub(crate) fn ledger_entry(&self, phase: Phase) -> LedgerEntry {
        let settled = phase == Phase::Settled;
        LedgerEntry {
            idempotency_key: self.idempotency_key.clone(),
            workflow_id: self.workflow.workflow_id.to_owned(),
            run_order_id: self.run_order_id.clone(),
            frozen: self.workflow.quote(),
            final_amount: settled.then_some(self.settlement.final_amount),
            released: settled.then_some(self.settlement.released),
            submit_requests: self.submit_requests,
            charges: self.charges,
        }
    }
}

/// A new run order id: `wfrun_` and 20 hex digits, like the real ones.
pub(crate) fn new_run_order_id() -> String {
    let high = fastrand::u16(..);
    let low = fastrand::u64(..);
    format!("wfrun_{high:04x}{low:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_order_ids_look_real() {
        let id = new_run_order_id();
        let hex = id.strip_prefix("wfrun_").expect("prefix");
        assert_eq!(hex.len(), 20);
        assert!(
            hex.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }
}
