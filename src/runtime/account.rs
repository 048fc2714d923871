//! The worker's side of account-level push-back: pausing a profile (for a
//! refused key, a balance, an account refusal code, a tripped breaker, or
//! an operator), probing it, and resuming it. The pauses themselves are in
//! `pauses`, the balances in `balances`, the breaker's decision in
//! `breaker`; this is where they meet the provider and the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

use super::pauses::{BalanceProbe, balance_probe};
use super::{Coverage, Engine, PauseKind, Profile, run_step};
use crate::lifecycle::RunState;
use crate::store::{self, ClaimScope};

/// How often the operators' manual pauses are read.
const MANUAL_PAUSES_EVERY: Duration = Duration::from_secs(2);

/// What the balance says about a run's quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuoteCover {
    /// Reserved from the balance (give it back if nothing is frozen).
    Reserved(Decimal),
    /// The balance cannot cover it.
    Short {
        /// The balance seen.
        balance: Decimal,
    },
    /// Unknown (the provider tells no balance, or the read failed): the
    /// provider decides.
    Unknown,
}

impl Engine {
    /// The provider refused the key of `profile`: pause the profile (once)
    /// and say so loudly, in the log and in `wfq.provider_pauses`.
    pub async fn provider_refused_key(&self, profile: &str, workflow_id: &str, reason: &str) {
        if !self
            .pauses
            .pause(profile, PauseKind::Key, workflow_id, self.auth_probe)
        {
            return;
        }
        tracing::error!(
            profile,
            reason,
            probe_in = ?self.auth_probe,
            "the provider refused the API key: pausing this provider profile (its runs wait, none is failed) until a probe succeeds; check the key in its api_key_env"
        );
        self.record_pause(profile, &PauseKind::Key, reason).await;
    }

    /// The provider refused the account (not the run): pause `profile` for
    /// `kind`; runs at the provider are still followed, none is submitted.
    pub async fn pause_for_account(
        &self,
        profile: &str,
        kind: PauseKind,
        workflow_id: &str,
        reason: &str,
    ) {
        let Some(probe) = self.provider(profile).map(|p| p.account_probe) else {
            return;
        };
        if !self.pauses.pause(profile, kind.clone(), workflow_id, probe) {
            return;
        }
        tracing::warn!(
            profile,
            reason,
            pause = kind.as_str(),
            probe_in = ?probe,
            "the provider refused the account, not the run: this profile submits nothing until a probe passes (its runs wait queued, none is failed; runs at the provider are still followed)"
        );
        self.record_pause(profile, &kind, reason).await;
    }

    async fn record_pause(&self, profile: &str, kind: &PauseKind, reason: &str) {
        if let Err(e) =
            store::pause_provider(&self.pool, profile, &self.worker_id, kind.as_str(), reason).await
        {
            tracing::warn!(error = %e, profile, "could not record the pause");
        }
    }

    /// Lifts a pause of `profile` that `lift` accepts, in memory and in the
    /// database, and wakes the claim loop.
    pub async fn resume_profile(&self, profile: &str, lift: impl Fn(&PauseKind) -> bool) {
        if !self.pauses.resume_if(profile, lift) {
            return;
        }
        tracing::info!(profile, "provider profile resumed");
        if let Err(e) = store::resume_provider(&self.pool, profile).await {
            tracing::warn!(error = %e, "could not clear the recorded pause");
        }
        self.wake.now();
    }

    /// A submit of `profile` was accepted: a pause about the account (the
    /// probe run got through) is over.
    pub async fn account_accepted(&self, profile: &str) {
        self.resume_profile(profile, |k| {
            matches!(
                k,
                PauseKind::Account { .. } | PauseKind::Breaker { .. } | PauseKind::Balance { .. }
            )
        })
        .await;
    }

    /// A refusal with `code` that nobody listed tripped the breaker of
    /// `profile`: pause it, and put back the runs the same code failed
    /// lately (they froze nothing), each at most once per code.
    pub async fn trip_breaker(&self, profile: &str, code: &str, workflow_id: &str) {
        let Some(window) = self.provider(profile).map(|p| p.breaker.window) else {
            return;
        };
        let reason = format!(
            "refusal `{code}` for runs of different workflows: taken for the account's, not the runs'"
        );
        self.pause_for_account(
            profile,
            PauseKind::Breaker {
                code: code.to_owned(),
            },
            workflow_id,
            &reason,
        )
        .await;
        match store::requeue_refused(
            &self.pool,
            profile,
            code,
            window,
            &format!("paused: {reason}"),
        )
        .await
        {
            Ok(back) => tracing::warn!(
                profile,
                code,
                requeued = back.len(),
                "the breaker put the runs this refusal failed back in the queue"
            ),
            Err(e) => tracing::warn!(error = %e, profile, "could not put refused runs back"),
        }
    }

    /// Whether `profile`'s balance covers `quote`, reserving it if so
    /// (a balance read when the cache cannot tell).
    pub async fn cover_quote(
        &self,
        profile_name: &str,
        profile: &Profile,
        quote: Decimal,
    ) -> QuoteCover {
        if !profile.client.reads_balance() {
            return QuoteCover::Unknown;
        }
        match self.balances.reserve(profile_name, quote, Instant::now()) {
            Coverage::Reserved => return QuoteCover::Reserved(quote),
            Coverage::Short(balance) => return QuoteCover::Short { balance },
            Coverage::ReadFirst => {}
        }
        let lock = self.balances.read_lock(profile_name);
        let _reading = lock.lock().await;
        // Read by another step meanwhile?
        match self.balances.reserve(profile_name, quote, Instant::now()) {
            Coverage::Reserved => return QuoteCover::Reserved(quote),
            Coverage::Short(balance) => return QuoteCover::Short { balance },
            Coverage::ReadFirst => {}
        }
        match profile.client.balance().await {
            Some(Ok(read)) => {
                self.balances
                    .read(profile_name, read.balance, Instant::now());
                match self.balances.reserve(profile_name, quote, Instant::now()) {
                    Coverage::Reserved => QuoteCover::Reserved(quote),
                    Coverage::Short(balance) => QuoteCover::Short { balance },
                    // Just read: cannot be stale.
                    Coverage::ReadFirst => QuoteCover::Unknown,
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, profile = profile_name, "could not read the balance; the provider decides");
                QuoteCover::Unknown
            }
            None => QuoteCover::Unknown,
        }
    }
}

/// Probes paused profiles once a second at most, each on its own interval,
/// and lifts a pause as soon as the provider takes the account again; reads
/// the operators' manual pauses.
pub(super) async fn probe_paused_profiles(engine: Arc<Engine>) {
    // One probe run at a time, outside the claim loop's slots.
    let probe_slot = Arc::new(tokio::sync::Semaphore::new(1));
    // Read once before the first claim (`read_manual_pauses_at_start`).
    let mut manual_read = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if manual_read.elapsed() >= MANUAL_PAUSES_EVERY {
            manual_read = Instant::now();
            sync_manual_pauses(&engine).await;
        }
        for due in engine.pauses.due_probes() {
            let Some(profile) = engine.provider(&due.profile) else {
                continue;
            };
            match &due.kind {
                PauseKind::Key => match profile.client.probe(&due.workflow_id).await {
                    Err(u) => {
                        tracing::warn!(profile = %due.profile, reason = %u.reason, "provider profile still paused: probe failed");
                    }
                    // A readable answer, even a refusal about the workflow,
                    // means the key is accepted again.
                    Ok(()) => {
                        tracing::info!(profile = %due.profile, "the provider accepts the API key again");
                        engine
                            .resume_profile(&due.profile, |k| *k == PauseKind::Key)
                            .await;
                    }
                },
                PauseKind::Balance { needed } => {
                    let read = match profile.client.balance().await {
                        Some(Ok(read)) => {
                            engine
                                .balances
                                .read(&due.profile, read.balance, Instant::now());
                            Some(Some(read.balance))
                        }
                        Some(Err(e)) => {
                            tracing::warn!(profile = %due.profile, error = %e, "could not read the balance of a profile paused for it; letting one run through instead");
                            Some(None)
                        }
                        None => None,
                    };
                    match balance_probe(read, *needed) {
                        BalanceProbe::Resume => {
                            tracing::info!(profile = %due.profile, balance = ?read.flatten(), "the balance covers the waiting runs again");
                            engine
                                .resume_profile(&due.profile, |k| {
                                    matches!(k, PauseKind::Balance { .. })
                                })
                                .await;
                        }
                        BalanceProbe::Wait => {}
                        BalanceProbe::LetOneThrough => {
                            let_one_through(&engine, &due.profile, &probe_slot).await;
                        }
                    }
                }
                PauseKind::Account { .. } | PauseKind::Breaker { .. } => {
                    let_one_through(&engine, &due.profile, &probe_slot).await;
                }
                PauseKind::Manual => {}
            }
        }
    }
}

/// The probe of an account refusal (or of a balance that cannot be read):
/// one queued run of `profile` is submitted. Accepted, the profile resumes ([`Engine::account_accepted`]);
/// refused alike, the run goes back to the queue and the pause stays.
async fn let_one_through(engine: &Arc<Engine>, profile: &str, slot: &Arc<tokio::sync::Semaphore>) {
    let Ok(permit) = slot.clone().try_acquire_owned() else {
        return;
    };
    let mut scope = ClaimScope::default();
    scope.add(profile, &[RunState::Queued]);
    let taken = Instant::now();
    let claimed =
        store::claim_due_runs(&engine.pool, &engine.worker_id, 1, engine.lease, &scope).await;
    let run = match claimed {
        Ok(mut runs) => match runs.pop() {
            Some(run) => run,
            None => return,
        },
        Err(e) => {
            tracing::warn!(error = %e, profile, "could not claim a probe run");
            return;
        }
    };
    tracing::info!(
        profile,
        run_id = run.id,
        "letting one run through to see whether the account may run again"
    );
    let engine = engine.clone();
    // Renewed with the steps of the claim loop while it runs.
    let lease = engine.leases.hold(run.id, taken);
    tokio::spawn(async move {
        if let Err(e) = run_step(engine, run, lease, permit).await {
            tracing::warn!(error = %e, "the probe run's step was not recorded");
        }
    });
}

/// Reads the operators' manual pauses before the worker claims anything:
/// a worker that started claiming first could submit runs of a profile an
/// operator paused, in the second before its first periodic read. A
/// database that does not answer is asked again a few times (the claim
/// loop could not claim from it either); then the periodic read takes over.
pub(super) async fn read_manual_pauses_at_start(engine: &Engine) {
    let mut wait = Duration::from_millis(100);
    for _ in 0..6 {
        if sync_manual_pauses(engine).await {
            return;
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    tracing::warn!("could not read the manual pauses at start-up; they are read again every 2 s");
}

/// Follows `wfq.provider_pauses` rows of kind `manual`: an operator's pause
/// stops every worker from submitting for the profile until it is removed.
/// False when they could not be read.
async fn sync_manual_pauses(engine: &Engine) -> bool {
    let manual = match store::manual_pauses(&engine.pool).await {
        Ok(manual) => manual,
        Err(e) => {
            tracing::debug!(error = %e, "could not read the manual pauses");
            return false;
        }
    };
    for profile in engine.provider_names() {
        let wanted = manual.iter().find(|(p, _)| *p == profile);
        let paused = engine.pauses.kind(&profile) == Some(PauseKind::Manual);
        match (wanted, paused) {
            (Some((_, note)), false)
                if engine.pauses.pause(
                    &profile,
                    PauseKind::Manual,
                    "",
                    Duration::from_secs(86_400),
                ) =>
            {
                tracing::warn!(profile = %profile, note = %note, "an operator paused this profile: no new submits until it is resumed");
            }
            (None, true) if engine.pauses.resume(&profile) => {
                tracing::info!(profile = %profile, "an operator resumed this profile");
                engine.wake.now();
            }
            _ => {}
        }
    }
    true
}
