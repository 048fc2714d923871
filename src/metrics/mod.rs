//! The worker's metrics: a small registry of atomics and fixed-bucket
//! histograms, shared by the steps, the claim loop and the `/metrics`
//! endpoint (see `runtime::health`), written in the Prometheus text format.
//!
//! Labels are few and bounded: provider profile names (from the
//! configuration), fixed outcome and call names, and provider error codes
//! capped per profile. Never a run id.

pub mod cache;
pub mod text;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::watch;

use crate::lifecycle::RunState;
use text::{Exposition, HistogramSnapshot, Kind};

/// `[metrics]`: where the worker serves `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address to listen on; port 0 picks a free port (see [`Metrics::bound_addr`]).
    pub listen: SocketAddr,
}

/// The `[metrics]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetricsConfig {
    listen: String,
}

impl RawMetricsConfig {
    /// Checks the table; `Err` is the message for `metrics.listen`.
    pub(crate) fn parse(self) -> Result<MetricsConfig, String> {
        let listen = self.listen.trim().parse().map_err(|_| {
            format!(
                "`{}` is not an IP address with a port (e.g. \"127.0.0.1:9187\", \"0.0.0.0:9187\")",
                self.listen
            )
        })?;
        Ok(MetricsConfig { listen })
    }
}

/// Distinct error codes kept per provider profile; the rest count as `other`.
pub const MAX_ERROR_CODES_PER_PROVIDER: usize = 50;

/// Distinct provider names kept in a series labelled by the `provider` of
/// a run (which may be a name no profile has); further names count as
/// `other`. Declared profiles always keep theirs.
pub const MAX_PROVIDERS: usize = 50;

/// The final states, in the order their series are written.
pub const FINAL_STATES: [RunState; 3] = [RunState::Succeeded, RunState::Failed, RunState::Canceled];

/// Upper bounds of `wfq_provider_request_duration_seconds`.
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds of `wfq_claim_batch_size` (`0`: a claim that found nothing).
pub const BATCH_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

/// A monotonic count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Observations counted into fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus the `+Inf` rest.
    counts: Box<[AtomicU64]>,
    sum_bits: AtomicU64,
}

impl Histogram {
    /// An empty histogram with these ascending upper bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// The current state (the count is the sum of the buckets, so `+Inf`
    /// and `_count` always agree).
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

/// One metric's series by label values (in the order of its label names).
#[derive(Debug)]
struct Family<T> {
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, Arc<T>>>,
}

impl<T> Family<T> {
    fn new(labels: &'static [&'static str]) -> Self {
        Family {
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<String>, Arc<T>>> {
        // Every change is one insert: a panic cannot leave the map half-written.
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The series of `values`, created with `make` if new.
    fn get(&self, values: &[&str], make: impl FnOnce() -> T) -> Arc<T> {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        self.lock()
            .entry(key)
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    fn each(&self, mut f: impl FnMut(&[(&str, &str)], &T)) {
        for (values, series) in self.lock().iter() {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            f(&labels, series);
        }
    }
}

/// A provider call whose duration is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// The parameter manifest (chenyu `market/info`, Dify `/parameters`).
    Manifest,
    /// A run request.
    Submit,
    /// A status check.
    Poll,
    /// Looking for the run of a lost submit (Dify logs).
    Find,
    /// A stop request (Dify).
    Stop,
}

impl Call {
    fn as_str(self) -> &'static str {
        match self {
            Call::Manifest => "manifest",
            Call::Submit => "submit",
            Call::Poll => "poll",
            Call::Find => "find",
            Call::Stop => "stop",
        }
    }
}

/// The registry of one worker process.
#[derive(Debug)]
pub struct Metrics {
    submits: Family<Counter>,
    polls: Family<Counter>,
    provider_errors: Family<Counter>,
    runs_finished: Family<Counter>,
    media_copies: Family<Counter>,
    request_duration: Family<Histogram>,
    claim_batch_size: Histogram,
    lease_rescues: Counter,
    rescues: Family<Counter>,
    steps_in_flight: AtomicI64,
    started: Instant,
    /// Milliseconds after `started` of the last successful claim, plus one
    /// (0: none yet).
    last_claim: AtomicU64,
    waiting_for_slot: AtomicBool,
    stopping: AtomicBool,
    bound: watch::Sender<Option<SocketAddr>>,
}

/// The causes of `wfq_rescues_total`, written from the start at 0.
pub const RESCUE_CAUSES: [&str; 2] = ["crash", "lease_expiry"];

impl Default for Metrics {
    fn default() -> Self {
        let rescues = Family::new(&["cause"]);
        for cause in RESCUE_CAUSES {
            rescues.get(&[cause], Counter::default);
        }
        Metrics {
            submits: Family::new(&["provider", "outcome"]),
            polls: Family::new(&["provider", "outcome"]),
            provider_errors: Family::new(&["provider", "code"]),
            runs_finished: Family::new(&["provider", "state"]),
            media_copies: Family::new(&["outcome"]),
            request_duration: Family::new(&["provider", "call"]),
            claim_batch_size: Histogram::new(BATCH_BUCKETS),
            lease_rescues: Counter::default(),
            rescues,
            steps_in_flight: AtomicI64::new(0),
            started: Instant::now(),
            last_claim: AtomicU64::new(0),
            waiting_for_slot: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            bound: watch::Sender::new(None),
        }
    }
}

/// Counts a step in flight until dropped.
#[must_use = "the step counts as in flight until this is dropped"]
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts a submit's outcome (`accepted`, `replayed`, `rejected`,
    /// `unclear`, `adopted`).
    pub fn submit_outcome(&self, provider: &str, outcome: &'static str) {
        self.submits
            .get(&[provider, outcome], Counter::default)
            .add(1);
    }

    /// Counts an output copy attempt by the state it left the file in:
    /// `done`, `pending` (counted as `retry`), `failed`, `expired`, `skipped`.
    pub fn media_copy(&self, state: &str) {
        let outcome = match state {
            "done" => "done",
            "pending" => "retry",
            "expired" => "expired",
            "skipped" => "skipped",
            _ => "failed",
        };
        self.media_copies.get(&[outcome], Counter::default).add(1);
    }

    /// Counts a status check's outcome.
    pub fn poll_outcome(&self, provider: &str, outcome: &'static str) {
        self.polls
            .get(&[provider, outcome], Counter::default)
            .add(1);
    }

    /// Counts a provider error; past [`MAX_ERROR_CODES_PER_PROVIDER`]
    /// distinct codes of one profile, new codes count as `other`.
    pub fn provider_error(&self, provider: &str, code: &str) {
        let code: String = code.chars().take(64).collect();
        let counter = {
            let mut series = self.provider_errors.lock();
            let key = vec![provider.to_owned(), code];
            let key = if series.contains_key(&key)
                || series.keys().filter(|k| k[0] == provider).count() < MAX_ERROR_CODES_PER_PROVIDER
            {
                key
            } else {
                vec![provider.to_owned(), "other".to_owned()]
            };
            series.entry(key).or_default().clone()
        };
        counter.add(1);
    }

    /// Counts a run this process moved from `from` to `to`, once the write
    /// was applied; only a move from an active state into a final one
    /// counts (a run finishes once, whichever worker writes it).
    ///
    /// Why counters, and not a count of final rows in `wfq.runs`: that
    /// count only grows until `wfq prune` (tens of millions of rows), so
    /// it cannot be read at scrape time without a scan of the history, nor
    /// kept in a counter table without a write in every run's final
    /// transaction plus a compaction job; and dashboards want the rate of
    /// finishes, which `rate()` takes from a counter and which a gauge that
    /// drops at every prune gives badly.
    pub fn run_finished(&self, provider: &str, from: RunState, to: RunState) {
        if from.is_final() || !to.is_final() {
            return;
        }
        let counter = {
            let mut series = self.runs_finished.lock();
            let providers: BTreeSet<&str> = series.keys().map(|k| k[0].as_str()).collect();
            let name = if providers.contains(provider) || providers.len() < MAX_PROVIDERS {
                provider
            } else {
                "other"
            };
            let key = vec![name.to_owned(), to.as_str().to_owned()];
            series.entry(key).or_default().clone()
        };
        counter.add(1);
    }

    /// Writes `wfq_runs_finished_total` of these profiles from the start,
    /// at 0, so that `rate()` sees their first finish (a series that only
    /// appears with its first increment loses that increment).
    pub fn declare_providers(&self, profiles: &[String]) {
        let mut series = self.runs_finished.lock();
        for profile in profiles {
            for state in FINAL_STATES {
                series
                    .entry(vec![profile.clone(), state.as_str().to_owned()])
                    .or_default();
            }
        }
    }

    /// Records how long a provider call took.
    pub fn request_duration(&self, provider: &str, call: Call, took: Duration) {
        self.request_duration
            .get(&[provider, call.as_str()], || {
                Histogram::new(DURATION_BUCKETS)
            })
            .observe(took.as_secs_f64());
    }

    /// A claim statement succeeded with `batch` runs, `rescued` of them
    /// taken over from an expired lease. The claim loop is alive.
    pub fn claimed(&self, batch: usize, rescued: usize) {
        self.claim_batch_size.observe(batch as f64);
        self.lease_rescues.add(rescued as u64);
        let now = self.started.elapsed().as_millis() as u64 + 1;
        self.last_claim.store(now, Ordering::Relaxed);
    }

    /// Counts a run taken over from another worker, by why its lease had
    /// ended: `crash` (its owner's session was gone) or `lease_expiry`.
    pub fn rescued(&self, cause: &'static str) {
        self.rescues.get(&[cause], Counter::default).add(1);
    }

    /// Awaits `wait` (the claim loop waiting for a free slot) while telling
    /// `/readyz` that the loop is busy, not stuck.
    pub async fn waiting_for_slot<F: Future>(&self, wait: F) -> F::Output {
        self.waiting_for_slot.store(true, Ordering::Relaxed);
        let out = wait.await;
        self.waiting_for_slot.store(false, Ordering::Relaxed);
        out
    }

    /// Counts a step as in flight until the guard is dropped.
    pub fn step_started(&self) -> InFlight<'_> {
        self.steps_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.steps_in_flight)
    }

    /// The worker stopped claiming: `/readyz` answers 503 from now on.
    pub fn shutting_down(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The claim loop's state for `/readyz`.
    pub fn claim_loop(&self) -> ClaimLoop {
        if self.stopping.load(Ordering::Relaxed) {
            return ClaimLoop::Stopping;
        }
        if self.waiting_for_slot.load(Ordering::Relaxed) {
            return ClaimLoop::WaitingForSlot;
        }
        match self.last_claim.load(Ordering::Relaxed) {
            0 => ClaimLoop::NotYet,
            at => {
                let at = Duration::from_millis(at - 1);
                ClaimLoop::LastClaim(self.started.elapsed().saturating_sub(at))
            }
        }
    }

    /// Publishes where the metrics server listens.
    pub fn set_bound_addr(&self, addr: SocketAddr) {
        self.bound.send_replace(Some(addr));
    }

    /// Where the metrics server listens, once it does (`None`: not yet, or
    /// no `[metrics]` section).
    pub fn listening(&self) -> Option<SocketAddr> {
        *self.bound.borrow()
    }

    /// Waits until the metrics server listens and returns its address (the
    /// real port when `listen` asked for port 0).
    pub async fn bound_addr(&self) -> SocketAddr {
        let mut rx = self.bound.subscribe();
        let addr = rx
            .wait_for(Option::is_some)
            .await
            .expect("sender lives in self");
        addr.expect("waited for Some")
    }

    /// Writes the series this process keeps in memory.
    pub fn encode(&self, out: &mut Exposition) {
        out.header("wfq_build_info", Kind::Gauge, "Always 1; the wfq version.");
        out.sample(
            "wfq_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        let counters = [
            (
                "wfq_submits_total",
                "Submits by outcome: accepted, replayed (the provider replayed the key), rejected, unclear (retried), adopted (a lost submit's run found).",
                &self.submits,
            ),
            (
                "wfq_polls_total",
                "Status checks by outcome: active, succeeded, failed, unknown_status, rejected, unclear.",
                &self.polls,
            ),
            (
                "wfq_provider_errors_total",
                "Provider errors by code: the provider's code, HTTP_<status>, UNREADABLE_ANSWER or NO_ANSWER; capped per provider, the rest as other.",
                &self.provider_errors,
            ),
            (
                "wfq_runs_finished_total",
                "Runs this process moved into a final state (succeeded, failed, canceled), by provider profile and state.",
                &self.runs_finished,
            ),
            (
                "wfq_media_copies_total",
                "Output copies to [storage] by outcome: done, retry (failed, tried again later), failed (gave up, too large, refused), expired (the link was gone), skipped (not media).",
                &self.media_copies,
            ),
        ];
        for (name, help, family) in counters {
            out.header(name, Kind::Counter, help);
            family.each(|labels, c| out.sample(name, labels, c.get()));
        }
        let name = "wfq_provider_request_duration_seconds";
        out.header(
            name,
            Kind::Histogram,
            "Duration of provider calls by call: manifest, submit, poll, find, stop.",
        );
        self.request_duration
            .each(|labels, h| out.histogram(name, labels, &h.snapshot()));
        out.header(
            "wfq_claim_batch_size",
            Kind::Histogram,
            "Runs claimed per claim statement (0: nothing was due).",
        );
        out.histogram(
            "wfq_claim_batch_size",
            &[],
            &self.claim_batch_size.snapshot(),
        );
        out.header(
            "wfq_lease_rescues_total",
            Kind::Counter,
            "Runs this worker took over from another worker, whatever the cause (see wfq_rescues_total).",
        );
        out.sample("wfq_lease_rescues_total", &[], self.lease_rescues.get());
        out.header(
            "wfq_rescues_total",
            Kind::Counter,
            "Runs this worker took over from another worker, by cause: crash (the owner's database session was gone), lease_expiry (its lease ran out).",
        );
        self.rescues
            .each(|labels, c| out.sample("wfq_rescues_total", labels, c.get()));
        out.header(
            "wfq_steps_in_flight",
            Kind::Gauge,
            "Steps of runs being handled by this worker now.",
        );
        out.sample(
            "wfq_steps_in_flight",
            &[],
            self.steps_in_flight.load(Ordering::Relaxed),
        );
    }
}

/// What the claim loop is doing, as far as `/readyz` cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimLoop {
    /// No claim has succeeded yet.
    NotYet,
    /// The last successful claim was this long ago.
    LastClaim(Duration),
    /// Every slot is busy; the loop claims again when one frees up.
    WaitingForSlot,
    /// The worker is shutting down.
    Stopping,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_capped_per_provider() {
        let m = Metrics::default();
        for i in 0..MAX_ERROR_CODES_PER_PROVIDER + 10 {
            m.provider_error("a", &format!("CODE_{i}"));
        }
        m.provider_error("a", "CODE_0");
        m.provider_error("b", "CODE_X");
        let mut out = Exposition::new();
        m.encode(&mut out);
        let text = out.finish();
        let a_codes = text
            .lines()
            .filter(|l| l.starts_with("wfq_provider_errors_total{provider=\"a\""))
            .count();
        assert_eq!(a_codes, MAX_ERROR_CODES_PER_PROVIDER + 1, "{text}");
        assert!(text.contains("wfq_provider_errors_total{provider=\"a\",code=\"other\"} 10\n"));
        assert!(text.contains("wfq_provider_errors_total{provider=\"a\",code=\"CODE_0\"} 2\n"));
        assert!(text.contains("wfq_provider_errors_total{provider=\"b\",code=\"CODE_X\"} 1\n"));
    }

    #[test]
    fn finished_runs_count_moves_into_a_final_state_by_bounded_provider() {
        let m = Metrics::default();
        m.declare_providers(&["chenyu".to_owned()]);
        m.run_finished("chenyu", RunState::Running, RunState::Succeeded);
        m.run_finished("chenyu", RunState::Queued, RunState::Canceled);
        m.run_finished("chenyu", RunState::Queued, RunState::Submitting);
        m.run_finished("chenyu", RunState::Failed, RunState::Failed);
        for i in 0..MAX_PROVIDERS + 5 {
            m.run_finished(&format!("typo{i:03}"), RunState::Queued, RunState::Failed);
        }
        let mut out = Exposition::new();
        m.encode(&mut out);
        let text = out.finish();
        let sample = |provider: &str, state: &str| {
            format!("wfq_runs_finished_total{{provider=\"{provider}\",state=\"{state}\"}}")
        };
        assert!(
            text.contains("# TYPE wfq_runs_finished_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains(&(sample("chenyu", "succeeded") + " 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&(sample("chenyu", "canceled") + " 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&(sample("chenyu", "failed") + " 0\n")),
            "{text}"
        );
        assert!(!text.contains("state=\"submitting\""), "{text}");
        // chenyu and 49 others by name; the last 6 are `other`.
        assert!(
            text.contains(&(sample("typo048", "failed") + " 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&(sample("other", "failed") + " 6\n")),
            "{text}"
        );
        assert!(!text.contains("typo049"), "{text}");
    }

    #[test]
    fn histogram_observations_land_in_their_buckets() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0, 100.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, vec![2, 1, 2]);
        assert_eq!(s.sum, 106.0);
    }

    #[test]
    fn claim_loop_state() {
        let m = Metrics::default();
        assert_eq!(m.claim_loop(), ClaimLoop::NotYet);
        m.claimed(3, 1);
        m.rescued("crash");
        assert!(matches!(m.claim_loop(), ClaimLoop::LastClaim(d) if d < Duration::from_secs(5)));
        {
            let _a = m.step_started();
            let _b = m.step_started();
            assert_eq!(m.steps_in_flight.load(Ordering::Relaxed), 2);
        }
        assert_eq!(m.steps_in_flight.load(Ordering::Relaxed), 0);
        m.shutting_down();
        assert_eq!(m.claim_loop(), ClaimLoop::Stopping);
        let mut out = Exposition::new();
        m.encode(&mut out);
        let text = out.finish();
        assert!(text.contains("wfq_lease_rescues_total 1\n"), "{text}");
        assert!(
            text.contains("wfq_rescues_total{cause=\"crash\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("wfq_rescues_total{cause=\"lease_expiry\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("wfq_claim_batch_size_count 1\n"), "{text}");
        assert!(text.contains("wfq_claim_batch_size_sum 3\n"), "{text}");
    }

    #[test]
    fn listen_addresses() {
        let ok = RawMetricsConfig {
            listen: "127.0.0.1:0".into(),
        };
        assert_eq!(ok.parse().unwrap().listen.port(), 0);
        let bad = RawMetricsConfig {
            listen: "localhost".into(),
        };
        assert!(bad.parse().unwrap_err().contains("localhost"));
    }
}
