//! A Dify workflow run as the simulator stores it, the store of all runs,
//! and the ledger entry of a run.
//!
//! Like chenyu's runs, a run's state is a function of the clock (and of a
//! stop, if one came in time), never of a connection: a client that drops
//! the stream finds the run progressing all the same.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::apps::{DifyApp, Ending, NODE_FAILURE};
use crate::sim::hostile::Variant;
use crate::sim::money::stable_hash;
use crate::sim::timeline::Timing;

/// What one token costs, in `CURRENCY`.
pub(crate) const PRICE_PER_TOKEN: Decimal = Decimal::from_parts(2, 0, 0, false, 6);

/// The currency of every price.
pub(crate) const CURRENCY: &str = "USD";

/// One Dify run as the simulator's "bank" sees it. Dify has no
/// idempotency, so every run created is an entry, and a client that
/// resubmitted after a lost answer shows up as two entries for one user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DifyLedgerEntry {
    /// The app (the `/dify/{app}` path segment).
    pub app: String,
    /// The `user` the run was started with.
    pub user: String,
    /// The run's id.
    pub workflow_run_id: String,
    /// The run's task id (for the stop endpoint).
    pub task_id: String,
    /// The run's status now (`running`, `succeeded`, `failed`,
    /// `partial-succeeded`, `stopped`).
    pub status: String,
    /// Tokens billed: zero until the run ends.
    pub total_tokens: i64,
    /// `total_tokens` times the per-token price: what the run cost.
    pub total_price: Decimal,
    /// The currency of `total_price`.
    pub currency: String,
    /// When the run was created.
    pub created_at: DateTime<Utc>,
}

/// One workflow run.
#[derive(Debug, Clone)]
pub(crate) struct DifyRun {
    pub id: String,
    pub task_id: String,
    pub app: &'static DifyApp,
    pub user: String,
    pub inputs: Map<String, Value>,
    /// Per app, from 1, as Dify numbers runs.
    pub sequence_number: u64,
    /// Global creation order, for sorting.
    pub order: u64,
    /// Monotonic creation time: the state is computed from it.
    pub submitted: Instant,
    pub created_at: DateTime<Utc>,
    /// Tokens the run uses if it runs to the end.
    pub full_tokens: i64,
    /// When (after creation) it was stopped, if a stop came before the end.
    pub stopped_after: Option<Duration>,
    /// Left by its client on a Dify that stops with the stream: `running` for good.
    pub abandoned: bool,
    /// The id of its log entry, and of the end user who started it.
    pub log_id: String,
    pub end_user_id: String,
    /// The currency of its Start node's price, when not `CURRENCY`
    /// (`Faults::dify_start_node_currency`).
    pub start_node_currency: Option<String>,
}

impl DifyRun {
    /// When, after creation, the run ended or will end (never, once
    /// abandoned).
    pub(crate) fn ends_after(&self, timing: &Timing) -> Duration {
        if self.abandoned {
            return Duration::MAX;
        }
        self.stopped_after
            .unwrap_or_else(|| timing.queue.saturating_add(timing.run))
    }

    /// The client left the run's stream: on Dify versions that tie a run to
    /// its stream it never finishes (see `dify_runs_die_with_their_stream`).
    pub(crate) fn abandon(&mut self, timing: &Timing, elapsed: Duration) {
        if !self.is_over(timing, elapsed) {
            self.abandoned = true;
        }
    }

    /// Whether the run has ended `elapsed` after creation.
    pub(crate) fn is_over(&self, timing: &Timing, elapsed: Duration) -> bool {
        elapsed >= self.ends_after(timing)
    }

    /// The status `elapsed` after creation. Queued runs are `running` too:
    /// Dify has no queued status.
    pub(crate) fn status(&self, timing: &Timing, elapsed: Duration) -> &'static str {
        if self.stopped_after.is_some() {
            "stopped"
        } else if self.is_over(timing, elapsed) {
            self.app.final_status()
        } else {
            "running"
        }
    }

    /// Tokens billed once the run has ended: all of them, or for a stopped
    /// run the share of the run time it got through.
    pub(crate) fn billed_tokens(&self, timing: &Timing) -> i64 {
        match self.stopped_after {
            Some(at) => self.full_tokens * i64::from(timing.progress_percent(at)) / 100,
            None => self.full_tokens,
        }
    }

    /// Tokens reported `elapsed` after creation: zero until the end.
    pub(crate) fn tokens(&self, timing: &Timing, elapsed: Duration) -> i64 {
        if self.is_over(timing, elapsed) {
            self.billed_tokens(timing)
        } else {
            0
        }
    }

    /// Whether the run got past its queue (the LLM node started) by `elapsed`.
    pub(crate) fn started(&self, timing: &Timing, elapsed: Duration) -> bool {
        elapsed.min(self.ends_after(timing)) >= timing.queue
            && self.stopped_after.is_none_or(|at| at >= timing.queue)
    }

    /// Nodes run so far: start and LLM once started, plus the end node when
    /// the run got there (a failed LLM node ends the run).
    pub(crate) fn total_steps(&self, timing: &Timing, elapsed: Duration) -> u32 {
        if !self.started(timing, elapsed) {
            0
        } else if self.is_over(timing, elapsed)
            && self.stopped_after.is_none()
            && self.app.ending != Ending::Fails
        {
            3
        } else {
            2
        }
    }

    /// The outputs once the run ended with some: `None` otherwise.
    pub(crate) fn outputs(&self, timing: &Timing, elapsed: Duration) -> Option<Value> {
        let ended_well = self.is_over(timing, elapsed)
            && self.stopped_after.is_none()
            && self.app.ending != Ending::Fails;
        ended_well.then(|| self.app.outputs(&self.inputs))
    }

    /// The run's error once it failed or was stopped.
    pub(crate) fn error(&self, timing: &Timing, elapsed: Duration) -> Option<&'static str> {
        if self.stopped_after.is_some() {
            Some("stopped by user")
        } else if self.is_over(timing, elapsed) && self.app.ending == Ending::Fails {
            Some(NODE_FAILURE)
        } else {
            None
        }
    }

    /// Seconds since creation, up to the end.
    pub(crate) fn elapsed_time(&self, timing: &Timing, elapsed: Duration) -> f64 {
        elapsed.min(self.ends_after(timing)).as_secs_f64()
    }

    /// Wall-clock end, once over.
    pub(crate) fn finished_at(&self, timing: &Timing, elapsed: Duration) -> Option<DateTime<Utc>> {
        self.is_over(timing, elapsed)
            .then(|| self.created_at + self.ends_after(timing))
    }

    /// The hostile entry of this run when `hostile_outputs` is `on`: only
    /// runs that end with outputs or a failure carry one, not stopped ones.
    pub(crate) fn hostile(&self, on: bool) -> Option<Variant> {
        (on && self.stopped_after.is_none()).then(|| Variant::of_run(self.order))
    }

    /// Stops the run if it has not ended; false when there was nothing to stop.
    pub(crate) fn stop(&mut self, timing: &Timing, elapsed: Duration) -> bool {
        if self.is_over(timing, elapsed) {
            return false;
        }
        self.stopped_after = Some(elapsed);
        true
    }

    /// The ledger view of this run `elapsed` after creation.
    pub(crate) fn ledger_entry(&self, timing: &Timing, elapsed: Duration) -> DifyLedgerEntry {
        let tokens = self.tokens(timing, elapsed);
        DifyLedgerEntry {
            app: self.app.name.to_owned(),
            user: self.user.clone(),
            workflow_run_id: self.id.clone(),
            task_id: self.task_id.clone(),
            status: self.status(timing, elapsed).to_owned(),
            total_tokens: tokens,
            total_price: price(tokens),
            currency: CURRENCY.to_owned(),
            created_at: self.created_at,
        }
    }
}

/// The price of `tokens`, exact.
pub(crate) fn price(tokens: i64) -> Decimal {
    Decimal::from(tokens) * PRICE_PER_TOKEN
}

/// All Dify runs, with the indexes the endpoints need.
#[derive(Debug, Default)]
pub(crate) struct DifyStore {
    pub runs: HashMap<String, DifyRun>,
    /// `task_id` to run id.
    pub by_task: HashMap<String, String>,
    /// Last sequence number per app.
    sequences: HashMap<&'static str, u64>,
    /// `(app, user)` to the end user's id, stable like Dify's.
    end_users: HashMap<(&'static str, String), String>,
    created: u64,
}

impl DifyStore {
    /// Creates a run and returns its id.
    pub(crate) fn create(
        &mut self,
        app: &'static DifyApp,
        user: String,
        inputs: Map<String, Value>,
        now: Instant,
    ) -> String {
        let mut id = uuid::Uuid::new_v4().to_string();
        while self.runs.contains_key(&id) {
            id = uuid::Uuid::new_v4().to_string();
        }
        let task_id = uuid::Uuid::new_v4().to_string();
        let sequence = self.sequences.entry(app.name).or_default();
        *sequence += 1;
        let sequence_number = *sequence;
        self.created += 1;
        let end_user_id = self
            .end_users
            .entry((app.name, user.clone()))
            .or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .clone();
        let run = DifyRun {
            full_tokens: 200 + (stable_hash("dify-tokens", &id) % 1800) as i64,
            id: id.clone(),
            task_id: task_id.clone(),
            app,
            user,
            inputs,
            sequence_number,
            order: self.created,
            submitted: now,
            created_at: Utc::now(),
            stopped_after: None,
            abandoned: false,
            log_id: uuid::Uuid::new_v4().to_string(),
            end_user_id,
            start_node_currency: None,
        };
        self.by_task.insert(task_id, id.clone());
        self.runs.insert(id.clone(), run);
        id
    }

    /// Runs not over at `now` (abandoned ones never are).
    pub(crate) fn running(&self, timing: &Timing, now: Instant) -> usize {
        self.runs
            .values()
            .filter(|run| !run.is_over(timing, now.saturating_duration_since(run.submitted)))
            .count()
    }

    /// The ledger at `now`, in creation order.
    pub(crate) fn ledger(&self, timing: &Timing, now: Instant) -> Vec<DifyLedgerEntry> {
        let mut runs: Vec<&DifyRun> = self.runs.values().collect();
        runs.sort_by_key(|run| run.order);
        runs.iter()
            .map(|run| run.ledger_entry(timing, now.saturating_duration_since(run.submitted)))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sim::dify::apps::find;

    pub(crate) const T: Timing = Timing {
        queue: Duration::from_millis(100),
        run: Duration::from_millis(1000),
        settle: Duration::ZERO,
    };

    pub(crate) fn run(app: &str) -> DifyRun {
        let mut store = DifyStore::default();
        let mut inputs = Map::new();
        inputs.insert("query".into(), Value::String("a b c".into()));
        let id = store.create(find(app).expect("app"), "u1".into(), inputs, Instant::now());
        store.runs.remove(&id).expect("created")
    }

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_run_follows_the_clock() {
        let r = run("text");
        assert_eq!(r.status(&T, ms(0)), "running");
        assert_eq!(r.total_steps(&T, ms(50)), 0);
        assert_eq!(r.total_steps(&T, ms(200)), 2);
        assert_eq!(r.tokens(&T, ms(1099)), 0);
        assert_eq!(r.status(&T, ms(1100)), "succeeded");
        assert_eq!(r.total_steps(&T, ms(1100)), 3);
        assert_eq!(r.tokens(&T, ms(1100)), r.full_tokens);
        assert!(r.outputs(&T, ms(1100)).is_some());
        assert_eq!(r.error(&T, ms(1100)), None);
        let entry = r.ledger_entry(&T, ms(2000));
        assert_eq!(
            entry.total_price,
            Decimal::from(r.full_tokens) * PRICE_PER_TOKEN
        );
        assert_eq!(PRICE_PER_TOKEN.to_string(), "0.000002");
    }

    #[test]
    fn failures_still_bill() {
        let r = run("fails");
        assert_eq!(r.status(&T, ms(1100)), "failed");
        assert_eq!(r.error(&T, ms(1100)), Some(NODE_FAILURE));
        assert_eq!(r.outputs(&T, ms(1100)), None);
        assert_eq!(r.total_steps(&T, ms(1100)), 2);
        assert_eq!(r.tokens(&T, ms(1100)), r.full_tokens);
        let p = run("partial");
        assert_eq!(p.status(&T, ms(1100)), "partial-succeeded");
        assert!(p.outputs(&T, ms(1100)).is_some());
    }

    #[test]
    fn a_stop_bills_the_share_run_so_far() {
        let mut r = run("text");
        assert!(r.stop(&T, ms(600)));
        assert_eq!(r.status(&T, ms(600)), "stopped");
        assert!(r.is_over(&T, ms(600)));
        assert_eq!(r.tokens(&T, ms(600)), r.full_tokens * 50 / 100);
        assert!(!r.stop(&T, ms(700)), "already over");
        let mut queued = run("text");
        assert!(queued.stop(&T, ms(10)));
        assert_eq!(queued.tokens(&T, ms(10)), 0);
        assert_eq!(queued.total_steps(&T, ms(500)), 0);
        let mut done = run("text");
        assert!(!done.stop(&T, ms(1100)));
        assert_eq!(done.status(&T, ms(1200)), "succeeded");
    }
}
