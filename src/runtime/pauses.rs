//! Provider profiles paused by what the provider said about the account.
//!
//! A refusal that is about the account, not the run, must not fail runs:
//! every queued run would fail in turn (an empty balance would empty the
//! queue into `failed` in seconds). So the profile pauses instead, its runs
//! wait as they are, and a probe per interval asks whether the account may
//! run again:
//!
//! - [`PauseKind::Key`]: 401/403, the key is refused. Every call would be,
//!   so nothing of the profile is claimed; the probe is a cheap read.
//! - [`PauseKind::Balance`]: the balance cannot cover a quote (chenyu); the
//!   probe reads the balance.
//! - [`PauseKind::Account`]: a refusal code listed as about the account
//!   (quota, runs at once, ...); [`PauseKind::Breaker`]: the same unlisted
//!   code for several runs of different workflows. The probe lets one run
//!   through: accepted, the profile resumes; refused alike, it waits on.
//! - [`PauseKind::Manual`]: an operator paused the profile
//!   (`wfq.provider_pauses`); it resumes when they say so.
//!
//! All but `Key` keep following the runs already at the provider (their
//! status checks go on); only new submits wait.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

/// The longest wait between two probes of a paused profile.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(300);

/// Why a profile is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseKind {
    /// The provider refused the API key.
    Key,
    /// The account's balance cannot cover a run's quote (`needed`).
    Balance {
        /// The smallest quote waiting.
        needed: Option<Decimal>,
    },
    /// A refusal code listed as about the account.
    Account {
        /// The provider's code.
        code: String,
    },
    /// One unlisted refusal code for several runs of different workflows.
    Breaker {
        /// The provider's code.
        code: String,
    },
    /// An operator paused the profile.
    Manual,
}

impl PauseKind {
    /// The `wfq.provider_pauses.kind` spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            PauseKind::Key => "key",
            PauseKind::Balance { .. } => "balance",
            PauseKind::Account { .. } => "account",
            PauseKind::Breaker { .. } => "breaker",
            PauseKind::Manual => "manual",
        }
    }

    /// Whether status checks stop too (only a refused key stops them).
    pub fn stops_status_checks(&self) -> bool {
        matches!(self, PauseKind::Key)
    }

    /// Whether a refusal with `code` is this pause's own (a probe run
    /// refused alike goes back to the queue instead of failing). A balance
    /// pause owns only refusals about money (`BALANCE`, `FUND` in the code,
    /// as [`crate::lifecycle::refusal_scope`] reads them): a run refused
    /// for its inputs while the profile waits for a top-up fails as usual.
    pub fn covers(&self, code: &str) -> bool {
        match self {
            PauseKind::Account { code: c } | PauseKind::Breaker { code: c } => c == code,
            PauseKind::Balance { .. } => crate::lifecycle::is_balance_code(code),
            PauseKind::Key | PauseKind::Manual => false,
        }
    }
}

/// What the probe of a balance pause does with what the balance read gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceProbe {
    /// The balance covers the smallest quote waiting: resume.
    Resume,
    /// Still too short: stay paused.
    Wait,
    /// The balance cannot be read (an error, an account or version without
    /// `balance/info`): let one run through, as for an account pause. The
    /// provider decides; accepted, the profile resumes. Only a successful
    /// read lifting the pause would keep it for ever.
    LetOneThrough,
}

/// Decides a balance pause's probe from the balance read (`None`: the
/// provider tells no balance; `Some(None)`: the read failed) and the
/// smallest quote waiting.
pub fn balance_probe(read: Option<Option<Decimal>>, needed: Option<Decimal>) -> BalanceProbe {
    match read {
        Some(Some(balance))
            if balance >= needed.unwrap_or(Decimal::ZERO) && balance > Decimal::ZERO =>
        {
            BalanceProbe::Resume
        }
        Some(Some(_)) => BalanceProbe::Wait,
        Some(None) | None => BalanceProbe::LetOneThrough,
    }
}

/// What a run whose quote the balance cannot cover does to its profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortBalance {
    /// Only the run waits: the balance still covers the smallest quote
    /// this process has seen for the profile, so smaller runs may go.
    HoldRun,
    /// The profile pauses for its balance until it covers `needed`.
    PauseProfile {
        /// The smallest quote seen: what a top-up must cover to resume.
        needed: Decimal,
    },
}

/// Decides what a quote the balance cannot cover does. One large run must
/// not stop every submit of the profile while smaller runs still fit (the
/// balance covers the smallest quote seen): then only that run waits, and
/// the smaller ones go on (a large run may so wait behind smaller ones
/// until a top-up; it is not starved by them for ever, since each one it
/// lets through brings the balance closer to the pause). Once the balance
/// covers no quote seen, the profile pauses, so a thousand queued runs are
/// not each claimed and held in turn.
pub fn short_balance(
    quote: Decimal,
    balance: Decimal,
    smallest_seen: Option<Decimal>,
) -> ShortBalance {
    let smallest = smallest_seen.map_or(quote, |s| s.min(quote));
    if smallest <= balance && smallest > Decimal::ZERO {
        ShortBalance::HoldRun
    } else {
        ShortBalance::PauseProfile { needed: smallest }
    }
}

#[derive(Debug, Clone)]
struct Pause {
    kind: PauseKind,
    /// A workflow the profile was using: what a key probe asks about.
    workflow_id: String,
    next_probe: Instant,
    interval: Duration,
}

/// A probe that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueProbe {
    /// The profile.
    pub profile: String,
    /// Why it is paused.
    pub kind: PauseKind,
    /// A workflow it was using.
    pub workflow_id: String,
}

/// The paused profiles of this worker process.
#[derive(Debug, Default)]
pub struct ProviderPauses {
    paused: Mutex<HashMap<String, Pause>>,
    /// Profiles resumed lately: when and with what probe interval.
    resumed: Mutex<HashMap<String, (Instant, Duration)>>,
}

impl ProviderPauses {
    /// Pauses `profile` for `kind`; the first probe follows after
    /// `first_probe`. True when it was not paused for this kind before.
    ///
    /// A profile paused again soon after a resume keeps the interval it had
    /// reached: a probe can pass while runs are still refused (an exhausted
    /// Dify quota does not show on `/parameters`), and the runs must not be
    /// tried every `first_probe` for ever. A refused key outranks the other
    /// kinds (nothing can be done until it works); a balance pause keeps
    /// the smallest quote it waits for.
    pub fn pause(
        &self,
        profile: &str,
        kind: PauseKind,
        workflow_id: &str,
        first_probe: Duration,
    ) -> bool {
        let mut paused = self.lock();
        if let Some(pause) = paused.get_mut(profile) {
            return match (&mut pause.kind, kind) {
                (PauseKind::Key, _) => false,
                (PauseKind::Balance { needed }, PauseKind::Balance { needed: more }) => {
                    *needed = match (*needed, more) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    false
                }
                (current, kind) if *current == kind => false,
                (current, kind) => {
                    *current = kind;
                    true
                }
            };
        }
        let now = Instant::now();
        let interval = match self.resumed_lock().remove(profile) {
            Some((at, interval)) if now.duration_since(at) < MAX_PROBE_INTERVAL => {
                (interval * 2).clamp(first_probe, MAX_PROBE_INTERVAL)
            }
            _ => first_probe,
        };
        paused.insert(
            profile.to_owned(),
            Pause {
                kind,
                workflow_id: workflow_id.to_owned(),
                next_probe: now + interval,
                interval,
            },
        );
        true
    }

    /// Why `profile` is paused, if it is.
    pub fn kind(&self, profile: &str) -> Option<PauseKind> {
        self.lock().get(profile).map(|p| p.kind.clone())
    }

    /// Whether `profile` is paused.
    pub fn is_paused(&self, profile: &str) -> bool {
        self.lock().contains_key(profile)
    }

    /// The profiles whose probe is due. Each one is rescheduled at once, so
    /// a slow probe is never started twice. A refused key's probe interval
    /// grows; the account's keep theirs (a top-up, a freed quota or a
    /// provider taking runs again should be noticed within one interval).
    pub fn due_probes(&self) -> Vec<DueProbe> {
        let now = Instant::now();
        let mut due = Vec::new();
        for (profile, pause) in self.lock().iter_mut() {
            if pause.kind == PauseKind::Manual {
                continue;
            }
            if pause.next_probe <= now {
                if pause.kind == PauseKind::Key {
                    pause.interval = (pause.interval * 2).min(MAX_PROBE_INTERVAL);
                }
                pause.next_probe = now + pause.interval;
                due.push(DueProbe {
                    profile: profile.clone(),
                    kind: pause.kind.clone(),
                    workflow_id: pause.workflow_id.clone(),
                });
            }
        }
        due
    }

    /// Lifts the pause. True when `profile` was paused.
    pub fn resume(&self, profile: &str) -> bool {
        let Some(pause) = self.lock().remove(profile) else {
            return false;
        };
        self.resumed_lock()
            .insert(profile.to_owned(), (Instant::now(), pause.interval));
        true
    }

    /// Lifts the pause only if it is of a kind `lift` accepts.
    pub fn resume_if(&self, profile: &str, lift: impl Fn(&PauseKind) -> bool) -> bool {
        let paused = self.lock().get(profile).is_some_and(|p| lift(&p.kind));
        paused && self.resume(profile)
    }

    fn resumed_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Duration)>> {
        self.resumed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pause>> {
        // Every operation leaves the map consistent, so poison is harmless.
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PauseKind {
        PauseKind::Key
    }

    #[test]
    fn a_pause_is_probed_with_growing_intervals_until_resumed() {
        let pauses = ProviderPauses::default();
        assert!(pauses.pause("p", key(), "wf", Duration::from_secs(10)));
        assert!(
            !pauses.pause("p", key(), "wf2", Duration::from_secs(10)),
            "already paused"
        );
        assert!(pauses.is_paused("p"));
        assert!(
            pauses.due_probes().is_empty(),
            "not before the first interval"
        );
        pauses.lock().get_mut("p").unwrap().next_probe = Instant::now();
        let due = pauses.due_probes();
        assert_eq!(due.len(), 1);
        assert_eq!(
            (due[0].profile.as_str(), due[0].workflow_id.as_str()),
            ("p", "wf")
        );
        assert_eq!(
            pauses.lock()["p"].interval,
            Duration::from_secs(20),
            "the interval doubles"
        );
        assert!(pauses.due_probes().is_empty(), "rescheduled, not due twice");
        assert!(pauses.resume("p"));
        assert!(!pauses.is_paused("p"));
        assert!(!pauses.resume("p"));
    }

    #[test]
    fn a_pause_soon_after_a_resume_keeps_growing() {
        let pauses = ProviderPauses::default();
        pauses.pause("p", key(), "wf", Duration::from_secs(10));
        pauses.lock().get_mut("p").unwrap().interval = Duration::from_secs(40);
        assert!(pauses.resume("p"));
        assert!(pauses.pause("p", key(), "wf", Duration::from_secs(10)));
        assert_eq!(pauses.lock()["p"].interval, Duration::from_secs(80));
    }

    #[test]
    fn probe_intervals_are_capped_and_account_probes_do_not_grow() {
        let pauses = ProviderPauses::default();
        pauses.pause("p", key(), "wf", MAX_PROBE_INTERVAL);
        pauses.lock().get_mut("p").unwrap().next_probe = Instant::now();
        pauses.due_probes();
        assert_eq!(pauses.lock()["p"].interval, MAX_PROBE_INTERVAL);
        let balance = PauseKind::Balance { needed: None };
        pauses.pause("b", balance, "wf", Duration::from_secs(15));
        pauses.lock().get_mut("b").unwrap().next_probe = Instant::now();
        assert_eq!(pauses.due_probes().len(), 1);
        assert_eq!(pauses.lock()["b"].interval, Duration::from_secs(15));
    }

    #[test]
    fn kinds_replace_each_other_but_a_refused_key_stays() {
        let pauses = ProviderPauses::default();
        let low = |n: i64| PauseKind::Balance {
            needed: Some(Decimal::new(n, 2)),
        };
        assert!(pauses.pause("p", low(50), "wf", Duration::from_secs(1)));
        assert!(!pauses.pause("p", low(30), "wf", Duration::from_secs(1)));
        assert_eq!(pauses.kind("p"), Some(low(30)), "the smallest quote waits");
        let breaker = PauseKind::Breaker { code: "E1".into() };
        assert!(pauses.pause("p", breaker.clone(), "wf", Duration::from_secs(1)));
        assert_eq!(pauses.kind("p"), Some(breaker.clone()));
        assert!(pauses.pause("p", key(), "wf", Duration::from_secs(1)));
        assert!(!pauses.pause("p", breaker, "wf", Duration::from_secs(1)));
        assert_eq!(pauses.kind("p"), Some(key()));
        assert!(!pauses.resume_if("p", |k| *k != PauseKind::Key));
        assert!(pauses.is_paused("p"));
    }

    #[test]
    fn what_each_kind_stops_and_covers() {
        assert!(key().stops_status_checks());
        assert!(!PauseKind::Manual.stops_status_checks());
        let account = PauseKind::Account {
            code: "QUOTA_EXCEEDED".into(),
        };
        assert!(account.covers("QUOTA_EXCEEDED"));
        assert!(!account.covers("INVALID_WORKFLOW_INPUT"));
        assert!(PauseKind::Balance { needed: None }.covers("INSUFFICIENT_BALANCE"));
        assert_eq!(account.as_str(), "account");
    }

    #[test]
    fn a_balance_pause_covers_money_refusals_only() {
        let balance = PauseKind::Balance { needed: None };
        // (code, covered)
        let table = [
            ("INSUFFICIENT_BALANCE", true),
            ("insufficient_funds", true),
            ("INVALID_WORKFLOW_INPUT", false),
            ("400001", false),
            ("ACCOUNT_ON_HOLD_7", false),
        ];
        for (code, covered) in table {
            assert_eq!(balance.covers(code), covered, "{code}");
        }
    }

    #[test]
    fn a_balance_probe_resumes_waits_or_lets_one_run_through() {
        let d = |n: i64| Decimal::new(n, 2);
        // (read, needed, decision)
        let table = [
            (Some(Some(d(50))), Some(d(30)), BalanceProbe::Resume),
            (Some(Some(d(30))), Some(d(30)), BalanceProbe::Resume),
            (Some(Some(d(10))), None, BalanceProbe::Resume),
            (Some(Some(d(20))), Some(d(30)), BalanceProbe::Wait),
            (Some(Some(d(0))), None, BalanceProbe::Wait),
            // Unreadable (an error, a 404): the provider decides.
            (Some(None), Some(d(30)), BalanceProbe::LetOneThrough),
            (None, None, BalanceProbe::LetOneThrough),
        ];
        for (read, needed, want) in table {
            assert_eq!(balance_probe(read, needed), want, "{read:?} {needed:?}");
        }
    }

    #[test]
    fn one_large_quote_holds_its_run_while_smaller_ones_fit() {
        let d = |n: i64| Decimal::new(n, 2);
        // (quote, balance, smallest seen, decision)
        let table = [
            // A video run (1.20) on 1.00 while image runs (0.03) fit.
            (d(120), d(100), Some(d(3)), ShortBalance::HoldRun),
            (d(120), d(3), Some(d(3)), ShortBalance::HoldRun),
            // Nothing seen fits any more: the profile pauses.
            (
                d(120),
                d(2),
                Some(d(3)),
                ShortBalance::PauseProfile { needed: d(3) },
            ),
            // Nothing smaller seen: pause for this quote.
            (
                d(120),
                d(100),
                None,
                ShortBalance::PauseProfile { needed: d(120) },
            ),
            (
                d(120),
                d(100),
                Some(d(150)),
                ShortBalance::PauseProfile { needed: d(120) },
            ),
        ];
        for (quote, balance, seen, want) in table {
            assert_eq!(
                short_balance(quote, balance, seen),
                want,
                "{quote} {balance} {seen:?}"
            );
        }
    }
}
