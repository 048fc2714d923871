//! The simulator's memory: runs, the idempotency index, counters and the
//! current faults, behind one mutex.
//!
//! A plain `std::sync::Mutex` is enough: every critical section is short and
//! synchronous, and handlers never hold the guard across an `.await`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::balance::{Account, Pending};
use super::dify::DifyStore;
use super::faults::{Faults, Injected};
use super::gptbots::GptbotsStore;
use super::hold::Holds;
use super::limits::Limiter;
use super::run::{LedgerEntry, Run};
use super::timeline::{Phase, Timing};

/// Request counters, for tests and `GET /_sim/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimStats {
    /// Authorised `run/submit` requests, whatever their outcome.
    pub submit_requests: u64,
    /// Submits that created a run and froze money.
    pub accepted_new: u64,
    /// Submits answered with an existing run (`idempotent_replay: true`).
    pub replays: u64,
    /// Replays whose `inputs` differed from the original submit.
    pub mismatched_replays: u64,
    /// Submits refused by validation (bad body, unknown workflow, inputs...).
    pub rejected: u64,
    /// Authorised `run/info` requests.
    pub info_requests: u64,
    /// Authorised `run/execution` requests.
    pub execution_requests: u64,
    /// Authorised `market/info` requests.
    pub market_requests: u64,
    /// Injected 5xx answers (deterministic and random).
    pub injected_5xx: u64,
    /// Injected 429 answers (deterministic and random).
    pub injected_429: u64,
    /// Accepted submits whose answer was deliberately lost.
    pub dropped_answers: u64,
    /// Requests refused for a missing or wrong bearer token.
    pub unauthorized: u64,
    /// Authorised Dify `workflows/run` requests, whatever their outcome.
    pub dify_run_requests: u64,
    /// Dify runs created (each one billed separately: Dify has no idempotency).
    pub dify_runs_created: u64,
    /// Dify run requests refused by validation (400) or for an unknown app
    /// or version (404).
    pub dify_rejected: u64,
    /// Dify run requests refused by `dify_quota_exceeded`.
    pub dify_quota_refusals: u64,
    /// Authorised Dify run-detail requests.
    pub dify_detail_requests: u64,
    /// Authorised Dify event-stream (resume) requests.
    pub dify_event_requests: u64,
    /// Authorised Dify `workflows/logs` requests.
    pub dify_log_requests: u64,
    /// Authorised Dify stop requests.
    pub dify_stop_requests: u64,
    /// Stop requests that changed nothing: unknown task, another user's
    /// task, or a run already finished.
    pub dify_stops_ignored: u64,
    /// Authorised GPTBots `workflow/invoke` requests, whatever their outcome.
    pub gptbots_invoke_requests: u64,
    /// GPTBots runs created.
    pub gptbots_runs_created: u64,
    /// GPTBots invokes refused by validation or for an unknown workflow.
    pub gptbots_rejected: u64,
    /// Authorised GPTBots `workflow/query/result` requests.
    pub gptbots_query_requests: u64,
    /// Requests (and Dify streams) waiting at a hold gate right now: a
    /// gauge, not a counter.
    pub held_requests: u64,
    /// Requests (and Dify streams) that ever waited at a hold gate.
    pub held_total: u64,
    /// API requests (any of the three APIs) that passed the key check.
    pub api_requests: u64,
    /// HTTP 429 answers from `rate_limit_rps` (stray 429s from
    /// `rate_limit_rate` are `injected_429`).
    pub limit_refusals: u64,
    /// New runs refused by `max_running_runs` (all three APIs).
    pub cap_refusals: u64,
    /// Runs refused for the balance: chenyu `INSUFFICIENT_BALANCE`, GPTBots
    /// `403200`.
    pub balance_refusals: u64,
    /// Authorised chenyu `balance/info` requests.
    pub balance_requests: u64,
    /// Answers that carried a `hostile_outputs` entry (a Dify stream counts
    /// once, for its `workflow_finished`).
    pub hostile_answers: u64,
    /// GPTBots answers that reported `gptbots_unknown_status`.
    pub gptbots_unknown_statuses: u64,
    /// GPTBots answers without `totalCost` (`gptbots_omit_total_cost`).
    pub gptbots_costs_omitted: u64,
    /// Output downloads (`GET /media/...`), whatever their outcome.
    pub media_requests: u64,
    /// Output downloads refused because the link had expired.
    pub media_expired: u64,
    /// Body bytes of output downloads actually sent.
    pub media_bytes_sent: u64,
    /// Upload requests (chenyu `/assets`, Dify `/files/upload`) that passed the key check.
    pub upload_requests: u64,
    /// Uploads accepted and recorded (see `SimServer::uploads`).
    pub uploads_accepted: u64,
}

/// Everything mutable, guarded by `Shared::inner`.
#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub runs: HashMap<String, Run>,
    /// `(workflow_id, idempotency_key)` to `run_order_id`.
    pub by_key: HashMap<(String, String), String>,
    pub stats: SimStats,
    pub faults: Faults,
    pub dify: DifyStore,
    pub gptbots: GptbotsStore,
    /// What each API key did, for `rate_limit_rps`.
    pub limiter: Limiter,
    /// The balance; not part of the faults.
    pub account: Account,
    /// chenyu runs created so far.
    pub chenyu_created: u64,
    /// Files uploaded (chenyu assets, Dify uploads), in arrival order.
    pub uploads: Vec<super::uploads::UploadEntry>,
}

impl Inner {
    /// Counts an injected fault in the stats.
    pub(crate) fn record_injected(&mut self, fault: Injected) {
        match fault {
            Injected::Unavailable | Injected::ServerError => self.stats.injected_5xx += 1,
            Injected::RateLimited { .. } => self.stats.injected_429 += 1,
        }
    }

    /// Applies the balance movements that are due at `now`: settled chenyu
    /// runs give their release back, ended GPTBots runs pay their cost.
    pub(crate) fn settle_account(&mut self, timing: &Timing, now: Instant) -> Option<Decimal> {
        let Inner {
            account,
            runs,
            gptbots,
            ..
        } = self;
        account.settle(|pending| match pending {
            Pending::Release { run_order_id } => runs.get(run_order_id).and_then(|run| {
                let phase = timing.phase_at(now.saturating_duration_since(run.submitted));
                (phase == Phase::Settled).then_some(run.settlement.released)
            }),
            Pending::Debit { run_id } => gptbots.runs.get(run_id).and_then(|run| {
                let elapsed = now.saturating_duration_since(run.submitted);
                run.is_over(timing, elapsed)
                    .then(|| -run.cost(timing, elapsed))
            }),
        });
        account.balance()
    }

    /// chenyu runs queued or running at `now`.
    pub(crate) fn chenyu_running(&self, timing: &Timing, now: Instant) -> usize {
        self.runs
            .values()
            .filter(|run| {
                timing.phase_at(now.saturating_duration_since(run.submitted)) <= Phase::Running
            })
            .count()
    }

    /// How many runs are queued ahead of `run` (for `queue_info.position`).
    pub(crate) fn queued_ahead(&self, run: &Run, timing: &Timing, now: Instant) -> usize {
        self.runs
            .values()
            .filter(|other| {
                let ahead =
                    (other.submitted, &other.run_order_id) < (run.submitted, &run.run_order_id);
                ahead
                    && timing.phase_at(now.saturating_duration_since(other.submitted))
                        == Phase::Queued
            })
            .count()
    }
}

/// State shared by every handler and by `SimServer`.
#[derive(Debug)]
pub(crate) struct Shared {
    pub timing: Timing,
    /// `None`: any non-empty bearer token is accepted.
    pub api_key: Option<String>,
    /// The hold gates, outside the mutex: waiters must not hold it.
    pub holds: Holds,
    inner: Mutex<Inner>,
}

impl Shared {
    /// Empty state.
    pub(crate) fn new(timing: Timing, api_key: Option<String>) -> Self {
        Shared {
            timing,
            api_key,
            holds: Holds::new(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Replaces the faults and opens or closes the hold gates to match.
    /// Under the lock, so two replacements cannot leave the gates and the
    /// faults disagreeing.
    pub(crate) fn set_faults(&self, faults: Faults) {
        let mut inner = self.lock();
        self.holds.apply(&faults);
        inner.faults = faults;
    }

    /// Sets the balance after applying what was due to the old one.
    pub(crate) fn set_balance(&self, balance: Option<Decimal>) {
        let mut inner = self.lock();
        inner.settle_account(&self.timing, Instant::now());
        inner.account.set(balance);
    }

    /// The balance now.
    pub(crate) fn balance(&self) -> Option<Decimal> {
        self.lock().settle_account(&self.timing, Instant::now())
    }

    /// Adds to the balance; the new one (`None` when unlimited).
    pub(crate) fn top_up(&self, amount: Decimal) -> Option<Decimal> {
        let mut inner = self.lock();
        inner.settle_account(&self.timing, Instant::now());
        inner.account.top_up(amount)
    }

    /// A snapshot of the stats, with the hold gauge filled in.
    pub(crate) fn stats(&self) -> SimStats {
        let mut stats = self.lock().stats.clone();
        stats.held_requests = self.holds.waiting();
        stats
    }

    /// Locks the state. A panic elsewhere cannot leave it half-updated in a
    /// way that matters to a simulator, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The phase of `run` right now.
    pub(crate) fn phase_now(&self, run: &Run, now: Instant) -> Phase {
        self.timing
            .phase_at(now.saturating_duration_since(run.submitted))
    }

    /// The ledger, sorted by `run_order_id`.
    pub(crate) fn ledger(&self) -> Vec<LedgerEntry> {
        let now = Instant::now();
        let inner = self.lock();
        let mut entries: Vec<LedgerEntry> = inner
            .runs
            .values()
            .map(|run| run.ledger_entry(self.phase_now(run, now)))
            .collect();
        entries.sort_by(|a, b| a.run_order_id.cmp(&b.run_order_id));
        entries
    }
}
