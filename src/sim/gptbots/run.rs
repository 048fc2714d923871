//! A GPTBots workflow run, the store of runs, and the ledger entry.
//!
//! The status is a function of the clock: `PENDING` for the queue time,
//! `RUNNING` for the run time, then `SUCCEED` or `FAILED`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::workflows::GptWorkflow;
use crate::sim::money::stable_hash;
use crate::sim::timeline::{Phase, Timing};

/// Credits per token.
pub(crate) const CREDITS_PER_TOKEN: Decimal = Decimal::from_parts(4, 0, 0, false, 4);

/// One GPTBots run as the simulator's "bank" sees it. There is no
/// idempotency: every run created is an entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptbotsLedgerEntry {
    /// The workflow (the `/gptbots/{workflow}` path segment).
    pub workflow: String,
    /// The `userId` sent with the invoke, if any.
    pub user_id: Option<String>,
    /// The run's id.
    pub workflow_run_id: String,
    /// The status now: `PENDING`, `RUNNING`, `SUCCEED` or `FAILED`.
    pub status: String,
    /// Credits charged: zero until the run ends.
    pub total_cost: Decimal,
    /// Tokens used: zero until the run ends.
    pub total_tokens: i64,
    /// The `input` the run was invoked with (file inputs arrive as URLs).
    #[serde(default)]
    pub input: Value,
}

/// One run.
#[derive(Debug, Clone)]
pub(crate) struct GptRun {
    pub id: String,
    pub workflow: &'static GptWorkflow,
    pub user_id: Option<String>,
    pub input: Value,
    pub submitted: Instant,
    pub created_at: DateTime<Utc>,
    pub order: u64,
    /// Tokens the run uses (failed runs too).
    pub full_tokens: i64,
}

impl GptRun {
    /// The status `elapsed` after creation.
    pub(crate) fn status(&self, timing: &Timing, elapsed: Duration) -> &'static str {
        match timing.phase_at(elapsed) {
            Phase::Queued => "PENDING",
            Phase::Running => "RUNNING",
            Phase::Finished | Phase::Settled if self.workflow.fails => "FAILED",
            Phase::Finished | Phase::Settled => "SUCCEED",
        }
    }

    /// Whether the run has ended.
    pub(crate) fn is_over(&self, timing: &Timing, elapsed: Duration) -> bool {
        timing.phase_at(elapsed) >= Phase::Finished
    }

    /// Tokens reported: zero until the end.
    pub(crate) fn tokens(&self, timing: &Timing, elapsed: Duration) -> i64 {
        if self.is_over(timing, elapsed) {
            self.full_tokens
        } else {
            0
        }
    }

    /// Credits reported: the tokens at the fixed rate, exact.
    pub(crate) fn cost(&self, timing: &Timing, elapsed: Duration) -> Decimal {
        Decimal::from(self.tokens(timing, elapsed)) * CREDITS_PER_TOKEN
    }

    /// The ledger view `elapsed` after creation.
    pub(crate) fn ledger_entry(&self, timing: &Timing, elapsed: Duration) -> GptbotsLedgerEntry {
        GptbotsLedgerEntry {
            workflow: self.workflow.name.to_owned(),
            user_id: self.user_id.clone(),
            workflow_run_id: self.id.clone(),
            status: self.status(timing, elapsed).to_owned(),
            total_cost: self.cost(timing, elapsed),
            total_tokens: self.tokens(timing, elapsed),
            input: self.input.clone(),
        }
    }
}

/// All GPTBots runs.
#[derive(Debug, Default)]
pub(crate) struct GptbotsStore {
    pub runs: HashMap<String, GptRun>,
    created: u64,
}

impl GptbotsStore {
    /// Creates a run and returns its id (24 hex digits, like an ObjectId).
    pub(crate) fn create(
        &mut self,
        workflow: &'static GptWorkflow,
        user_id: Option<String>,
        input: Value,
        now: Instant,
    ) -> String {
        let mut id = new_run_id();
        while self.runs.contains_key(&id) {
            id = new_run_id();
        }
        self.created += 1;
        let run = GptRun {
            full_tokens: 500 + (stable_hash("gptbots-tokens", &id) % 2000) as i64,
            id: id.clone(),
            workflow,
            user_id,
            input,
            submitted: now,
            created_at: Utc::now(),
            order: self.created,
        };
        self.runs.insert(id.clone(), run);
        id
    }

    /// Runs not over (pending or running) at `now`.
    pub(crate) fn running(&self, timing: &Timing, now: Instant) -> usize {
        self.runs
            .values()
            .filter(|run| !run.is_over(timing, now.saturating_duration_since(run.submitted)))
            .count()
    }

    /// The ledger at `now`, in creation order.
    pub(crate) fn ledger(&self, timing: &Timing, now: Instant) -> Vec<GptbotsLedgerEntry> {
        let mut runs: Vec<&GptRun> = self.runs.values().collect();
        runs.sort_by_key(|run| run.order);
        runs.iter()
            .map(|run| run.ledger_entry(timing, now.saturating_duration_since(run.submitted)))
            .collect()
    }
}

fn new_run_id() -> String {
    format!("{:08x}{:016x}", fastrand::u32(..), fastrand::u64(..))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sim::gptbots::workflows::find;
    use serde_json::json;

    pub(crate) const T: Timing = Timing {
        queue: Duration::from_millis(100),
        run: Duration::from_millis(1000),
        settle: Duration::ZERO,
    };

    pub(crate) fn run(name: &str) -> GptRun {
        let mut store = GptbotsStore::default();
        let wf = find(name).expect("workflow");
        let id = store.create(wf, Some("u".into()), json!({"topic": "t"}), Instant::now());
        assert_eq!(id.len(), 24);
        store.runs.remove(&id).expect("created")
    }

    #[test]
    fn statuses_and_cost_follow_the_clock() {
        let r = run("news");
        let ms = Duration::from_millis;
        assert_eq!(r.status(&T, ms(0)), "PENDING");
        assert_eq!(r.status(&T, ms(100)), "RUNNING");
        assert_eq!(r.cost(&T, ms(500)), Decimal::ZERO);
        assert_eq!(r.status(&T, ms(1100)), "SUCCEED");
        assert_eq!(
            r.cost(&T, ms(1100)),
            Decimal::from(r.full_tokens) * Decimal::new(4, 4)
        );
        assert_eq!(run("fails").status(&T, ms(5000)), "FAILED");
        let entry = r.ledger_entry(&T, ms(1100));
        assert_eq!(entry.total_tokens, r.full_tokens);
    }
}
