//! Measuring the worker: provider calls (through [`MeteredClient`]) and the
//! series read from the database at scrape time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use rust_decimal::Decimal;
use sqlx::PgPool;

use crate::lifecycle::RunState;
use crate::metrics::text::{Exposition, Kind};
use crate::metrics::{Call, MAX_PROVIDERS, Metrics};
use crate::providers::{
    FindOutcome, Manifest, ManifestError, PollOutcome, PollRequest, ProviderClient, RunStatus,
    StopOutcome, SubmitGuard, SubmitOutcome, SubmitRequest, Submitted, Unclear,
};

/// A provider profile's client that records every call's duration, outcome
/// and errors under the profile's name. Same methods as [`ProviderClient`].
#[derive(Debug, Clone)]
pub struct MeteredClient {
    inner: ProviderClient,
    profile: String,
    metrics: Arc<Metrics>,
}

impl MeteredClient {
    /// Wraps the client of profile `profile`.
    pub fn new(inner: ProviderClient, profile: &str, metrics: Arc<Metrics>) -> Self {
        MeteredClient {
            inner,
            profile: profile.to_owned(),
            metrics,
        }
    }

    /// The client itself (file uploads are measured by their own step).
    pub fn provider(&self) -> &ProviderClient {
        &self.inner
    }

    /// See [`ProviderClient::submit_guard`].
    pub fn submit_guard(&self) -> SubmitGuard {
        self.inner.submit_guard()
    }

    /// See [`ProviderClient::calls_per_poll`].
    pub fn calls_per_poll(&self) -> u32 {
        self.inner.calls_per_poll()
    }

    /// See [`ProviderClient::reads_balance`].
    pub fn reads_balance(&self) -> bool {
        self.inner.reads_balance()
    }

    /// See [`ProviderClient::balance`] (not measured: a read now and then).
    pub async fn balance(
        &self,
    ) -> Option<
        Result<crate::providers::chenyu::AccountBalance, crate::providers::chenyu::BalanceError>,
    > {
        self.inner.balance().await
    }

    /// See [`ProviderClient::can_stop`].
    pub fn can_stop(&self) -> bool {
        self.inner.can_stop()
    }

    /// See [`ProviderClient::probe`] (not measured: a paused profile's probe).
    pub async fn probe(&self, workflow_id: &str) -> Result<(), Unclear> {
        self.inner.probe(workflow_id).await
    }

    /// See [`ProviderClient::manifest`]; a provider without manifests makes
    /// no call and records nothing.
    pub async fn manifest(&self, workflow_id: &str) -> Result<Option<Manifest>, ManifestError> {
        let started = Instant::now();
        let result = self.inner.manifest(workflow_id).await;
        match &result {
            Ok(None) => return result,
            Ok(Some(_)) => {}
            Err(ManifestError::Rejected(e)) => self.error(&e.code),
            Err(ManifestError::Unclear(u)) => self.unclear(u),
        }
        self.took(Call::Manifest, started);
        result
    }

    /// See [`ProviderClient::submit`].
    pub async fn submit(&self, request: &SubmitRequest<'_>) -> Submitted {
        let started = Instant::now();
        let submitted = self.inner.submit(request).await;
        self.took(Call::Submit, started);
        let label = match &submitted.outcome {
            SubmitOutcome::Accepted(a) if a.idempotent_replay => "replayed",
            SubmitOutcome::Accepted(_) => "accepted",
            SubmitOutcome::Rejected(e) => {
                self.error(&e.code);
                "rejected"
            }
            SubmitOutcome::Unclear(u) => {
                self.unclear(u);
                "unclear"
            }
        };
        self.metrics.submit_outcome(&self.profile, label);
        submitted
    }

    /// See [`ProviderClient::find_submitted`]; an adopted run counts as a
    /// submit with outcome `adopted`.
    pub async fn find_submitted(
        &self,
        idempotency_key: &str,
        deadline: std::time::Instant,
    ) -> Option<FindOutcome> {
        let started = Instant::now();
        let found = self.inner.find_submitted(idempotency_key, deadline).await?;
        self.took(Call::Find, started);
        match &found {
            FindOutcome::Found(_) => self.metrics.submit_outcome(&self.profile, "adopted"),
            FindOutcome::NotFound => {}
            FindOutcome::Unclear(u) => self.unclear(u),
        }
        Some(found)
    }

    /// See [`ProviderClient::poll`].
    pub async fn poll(&self, request: &PollRequest<'_>) -> PollOutcome {
        let started = Instant::now();
        let outcome = self.inner.poll(request).await;
        self.took(Call::Poll, started);
        let label = match &outcome {
            PollOutcome::Report(r) => match r.status {
                RunStatus::Active => "active",
                RunStatus::Succeeded => "succeeded",
                RunStatus::Failed => "failed",
                RunStatus::Unknown(_) => "unknown_status",
            },
            PollOutcome::Rejected(e) => {
                self.error(&e.code);
                "rejected"
            }
            PollOutcome::Unclear(u) => {
                self.unclear(u);
                "unclear"
            }
        };
        self.metrics.poll_outcome(&self.profile, label);
        outcome
    }

    /// See [`ProviderClient::stop`].
    pub async fn stop(&self, request: &PollRequest<'_>) -> Option<StopOutcome> {
        let started = Instant::now();
        let stop = self.inner.stop(request).await?;
        self.took(Call::Stop, started);
        match &stop {
            StopOutcome::Requested => {}
            StopOutcome::Rejected(e) => self.error(&e.code),
            StopOutcome::Unclear(u) => self.unclear(u),
        }
        Some(stop)
    }

    fn took(&self, call: Call, started: Instant) {
        self.metrics
            .request_duration(&self.profile, call, started.elapsed());
    }

    fn error(&self, code: &str) {
        self.metrics.provider_error(&self.profile, code);
    }

    fn unclear(&self, u: &Unclear) {
        self.error(&unclear_code(u));
    }
}

/// The error code of an answer that could not be used: its HTTP status, or
/// that a 200 could not be read, or that no answer came at all.
fn unclear_code(u: &Unclear) -> String {
    match u.http_status {
        Some(200) => "UNREADABLE_ANSWER".to_owned(),
        Some(status) => format!("HTTP_{status}"),
        None => "NO_ANSWER".to_owned(),
    }
}

/// Everything `/metrics` reads from the database, written out: reads
/// bounded by the runs in flight and the unsettled ones (see
/// `store::metrics`), whatever the history kept.
pub(super) async fn encode_database(
    pool: &PgPool,
    configured: &[String],
) -> Result<String, sqlx::Error> {
    let (runs, frozen) = tokio::try_join!(
        crate::store::count_runs(pool),
        crate::store::outstanding_frozen(pool)
    )?;
    let mut out = Exposition::new();
    encode_runs(&mut out, configured, &runs, &frozen);
    Ok(out.finish())
}

/// `wfq_runs` (every active state of every configured profile, zeros
/// included) and `wfq_outstanding_frozen`. Final states are counted as
/// they happen (`wfq_runs_finished_total`), not read from the table.
fn encode_runs(
    out: &mut Exposition,
    configured: &[String],
    runs: &[(String, String, i64)],
    frozen: &[(String, String, Decimal)],
) {
    const ACTIVE: [RunState; 3] = [RunState::Queued, RunState::Submitting, RunState::Running];
    let mut names: BTreeSet<String> = configured.iter().cloned().collect();
    let mut bounded = |provider: &str| -> String {
        if names.contains(provider) || names.len() < MAX_PROVIDERS {
            names.insert(provider.to_owned());
            provider.to_owned()
        } else {
            "other".to_owned()
        }
    };

    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for provider in configured {
        for state in ACTIVE {
            counts.insert((provider.clone(), state.as_str().to_owned()), 0);
        }
    }
    for (provider, state, n) in runs {
        *counts
            .entry((bounded(provider), state.clone()))
            .or_default() += n;
    }
    out.header(
        "wfq_runs",
        Kind::Gauge,
        "Active runs (queued, submitting, running) in wfq.runs by provider profile and state (the whole table, every worker's).",
    );
    for ((provider, state), n) in &counts {
        out.sample("wfq_runs", &[("provider", provider), ("state", state)], n);
    }

    let mut sums: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for (provider, currency, amount) in frozen {
        *sums
            .entry((bounded(provider), currency.clone()))
            .or_default() += amount;
    }
    out.header(
        "wfq_outstanding_frozen",
        Kind::Gauge,
        "Sum of frozen_amount of runs whose money is not settled, by provider profile and currency.",
    );
    for ((provider, currency), amount) in &sums {
        out.sample(
            "wfq_outstanding_frozen",
            &[("provider", provider), ("currency", currency)],
            amount.normalize(),
        );
    }
}

/// `wfq_db_pool_connections`.
pub(super) fn encode_pool(out: &mut Exposition, pool: &PgPool) {
    let (size, idle) = (pool.size() as usize, pool.num_idle());
    out.header(
        "wfq_db_pool_connections",
        Kind::Gauge,
        "Connections of this worker's database pool by state.",
    );
    out.sample("wfq_db_pool_connections", &[("state", "idle")], idle);
    out.sample(
        "wfq_db_pool_connections",
        &[("state", "used")],
        size.saturating_sub(idle),
    );
}

/// What this process knows of each profile's push-back, from memory:
/// whether and why it is paused, the request rate it sends at (learned
/// from the provider's 429s, or configured), and the account balance
/// (chenyu).
pub(super) fn encode_profiles(out: &mut Exposition, engine: &super::Engine) {
    const KINDS: [&str; 5] = ["key", "balance", "account", "breaker", "manual"];
    let profiles = engine.provider_names();
    out.header(
        "wfq_provider_paused",
        Kind::Gauge,
        "1 while this process holds the profile's submits back, by why: key (refused API key; nothing is called), balance, account (a refusal about the account), breaker (one refusal for runs of several workflows), manual (an operator).",
    );
    for profile in &profiles {
        let paused = engine.pauses.kind(profile);
        for kind in KINDS {
            let on = paused.as_ref().is_some_and(|k| k.as_str() == kind);
            out.sample(
                "wfq_provider_paused",
                &[("provider", profile), ("kind", kind)],
                i64::from(on),
            );
        }
    }
    out.header(
        "wfq_provider_request_rate",
        Kind::Gauge,
        "Requests per second this process sends to the profile at most (learned from the provider's refusals, or requests_per_second); absent while unlimited.",
    );
    for profile in &profiles {
        if let Some(rate) = engine.throttles.current_rate(profile) {
            out.sample(
                "wfq_provider_request_rate",
                &[("provider", profile)],
                format!("{rate:.3}"),
            );
        }
    }
    out.header(
        "wfq_provider_balance",
        Kind::Gauge,
        "The account balance as this process last read it, minus the quotes it reserved since (chenyu).",
    );
    for profile in &profiles {
        if let Some(balance) = engine.balances.available(profile) {
            out.sample(
                "wfq_provider_balance",
                &[("provider", profile)],
                balance.normalize(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_configured_profiles_include_zeros_and_others_are_bounded() {
        let configured = vec!["chenyu".to_owned()];
        let mut runs = vec![("chenyu".to_owned(), "running".to_owned(), 3)];
        for i in 0..MAX_PROVIDERS + 5 {
            runs.push((format!("typo{i:03}"), "queued".to_owned(), 1));
        }
        let frozen = vec![
            (
                "chenyu".to_owned(),
                "CNY".to_owned(),
                Decimal::new(3_000_000, 8),
            ),
            ("chenyu".to_owned(), "".to_owned(), Decimal::new(1, 0)),
        ];
        let mut out = Exposition::new();
        encode_runs(&mut out, &configured, &runs, &frozen);
        let text = out.finish();
        assert!(
            text.contains("wfq_runs{provider=\"chenyu\",state=\"running\"} 3\n"),
            "{text}"
        );
        for state in ["queued", "submitting"] {
            let zero = format!("wfq_runs{{provider=\"chenyu\",state=\"{state}\"}} 0\n");
            assert!(text.contains(&zero), "{text}");
        }
        // Final states are not read from the table.
        for state in ["succeeded", "failed", "canceled"] {
            assert!(!text.contains(&format!("state=\"{state}\"")), "{text}");
        }
        // 1 configured + 49 others by name; the last 6 are `other`.
        assert!(
            text.contains("wfq_runs{provider=\"other\",state=\"queued\"} 6\n"),
            "{text}"
        );
        assert!(
            text.contains("wfq_runs{provider=\"typo048\",state=\"queued\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("typo049"), "{text}");
        assert!(
            text.contains("wfq_outstanding_frozen{provider=\"chenyu\",currency=\"CNY\"} 0.03\n"),
            "{text}"
        );
        assert!(
            text.contains("wfq_outstanding_frozen{provider=\"chenyu\",currency=\"\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn unclear_codes() {
        assert_eq!(unclear_code(&Unclear::new("x", Some(503))), "HTTP_503");
        assert_eq!(
            unclear_code(&Unclear::new("x", Some(200))),
            "UNREADABLE_ANSWER"
        );
        assert_eq!(unclear_code(&Unclear::new("x", None)), "NO_ANSWER");
    }
}
