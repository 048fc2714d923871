//! The leases of the runs this process's steps are working on: one clock
//! per step ([`LeaseClock`]), renewed for all steps together by one
//! statement every third of `worker.lease`.
//!
//! Renewal is what lets a live worker keep a run through a long provider
//! call or a Dify stream held for minutes, while the lease stays the
//! backstop for what the liveness session cannot see: a worker behind a
//! pooler (no session of its own) and a frozen process (SIGSTOP), whose
//! session stays open but whose renewals stop. A step's local deadline is
//! extended only for the runs the renewal statement returned: a run that
//! another worker took over is never renewed here, so its old step runs
//! out of lease and starts nothing more.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::registry::Liveness;
use crate::store;

/// When a step's lease on its run ends, on the monotonic clock (which keeps
/// running while the process is stopped or starved, so a worker that was
/// frozen past its lease knows it), and whether the process may act on the
/// run at all ([`Liveness`]). Clones share one deadline.
#[derive(Debug, Clone)]
pub struct LeaseClock {
    deadline: Arc<Deadline>,
    /// A call is started only while more than this is left of the lease.
    margin: Duration,
    liveness: Option<Liveness>,
    /// Keeps the run in the renewal while any clone lives.
    _held: Option<Arc<Registration>>,
}

impl LeaseClock {
    /// A clock of its own for a lease taken (or renewed by a write) at
    /// `taken` (measured before the statement, so the local deadline is
    /// never later than the database's), for `lease`; not extended by the
    /// renewal. For a step whose run is renewed through its
    /// [`Leases::hold`] clock (which this does not replace).
    pub fn new(taken: Instant, lease: Duration) -> Self {
        LeaseClock {
            deadline: Arc::new(Deadline::new(taken, lease)),
            margin: lease / 2,
            liveness: None,
            _held: None,
        }
    }

    /// When the lease ends, on the monotonic clock (as last renewed).
    pub fn deadline(&self) -> Instant {
        self.deadline.get()
    }

    /// The deadline to hand a provider client that itself starts a call of
    /// `call` only while `now + call < deadline` (a multi-page read): the
    /// same rule as [`LeaseClock::allows`], which counts at most half the
    /// lease of a call, since renewals keep the lease ahead of a live
    /// step. Handing it the bare deadline would start nothing at all when
    /// `call` is as long as what is left of the lease.
    pub(crate) fn deadline_for_calls_of(&self, call: Duration) -> Instant {
        self.deadline() + call.saturating_sub(call.min(self.margin))
    }

    /// A write that keeps the lease (recorded at or after `at`, measured
    /// before it was sent) renewed it for `lease`: the deadline moves, for
    /// every clone of this clock.
    pub(crate) fn renewed_by_write(&self, at: Instant, lease: Duration) {
        self.deadline.extend_to(at + lease);
    }

    /// Whether a provider call of at most `call` may start now. Never while
    /// the process is cut off from the database (the other workers may
    /// hold its runs by now), nor once the lease, as last renewed, has no
    /// more than half of its length left: renewals come every third of it,
    /// so a live worker always has more, and one that lacks it has missed
    /// a renewal (frozen, or the database away) and may have lost the run.
    /// A call shorter than that margin must end before the lease does.
    pub(crate) fn allows(&self, call: Duration) -> bool {
        if let Some(liveness) = &self.liveness
            && !liveness.is_live()
        {
            tracing::debug!("cut off from the database: no provider call starts");
            return false;
        }
        Instant::now() + call.min(self.margin) < self.deadline()
    }
}

#[derive(Debug)]
struct Deadline {
    origin: Instant,
    /// Nanoseconds after `origin`.
    after: AtomicU64,
}

impl Deadline {
    fn new(taken: Instant, lease: Duration) -> Self {
        Deadline {
            origin: taken,
            after: AtomicU64::new(nanos(lease)),
        }
    }

    fn get(&self) -> Instant {
        self.origin + Duration::from_nanos(self.after.load(Ordering::Acquire))
    }

    /// Moves the deadline to `at` unless it is later already.
    fn extend_to(&self, at: Instant) {
        let after = nanos(at.saturating_duration_since(self.origin));
        self.after.fetch_max(after, Ordering::AcqRel);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A run's place in [`Leases`], removed when the last clone of its clock is
/// dropped (its step is over).
#[derive(Debug)]
struct Registration {
    key: u64,
    owner: Weak<Inner>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.upgrade() {
            owner.lock().remove(&self.key);
        }
    }
}

#[derive(Debug)]
struct Entry {
    run_id: i64,
    deadline: Weak<Deadline>,
}

#[derive(Debug)]
struct Inner {
    lease: Duration,
    liveness: Liveness,
    held: Mutex<HashMap<u64, Entry>>,
    next_key: AtomicU64,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // Entries are inserted and removed whole: poison is harmless.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The runs this process's steps hold, for the renewal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Leases {
    inner: Arc<Inner>,
}

impl Leases {
    /// Leases of `lease`, usable while `liveness` says so.
    pub fn new(lease: Duration, liveness: Liveness) -> Self {
        Leases {
            inner: Arc::new(Inner {
                lease,
                liveness,
                held: Mutex::default(),
                next_key: AtomicU64::new(0),
            }),
        }
    }

    /// The clock of a step on run `run_id`, whose lease was taken at
    /// `taken` (before the claim statement was sent); renewed until the
    /// last clone of it is dropped.
    pub fn hold(&self, run_id: i64, taken: Instant) -> LeaseClock {
        let deadline = Arc::new(Deadline::new(taken, self.inner.lease));
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().insert(
            key,
            Entry {
                run_id,
                deadline: Arc::downgrade(&deadline),
            },
        );
        LeaseClock {
            deadline,
            margin: self.inner.lease / 2,
            liveness: Some(self.inner.liveness.clone()),
            _held: Some(Arc::new(Registration {
                key,
                owner: Arc::downgrade(&self.inner),
            })),
        }
    }

    /// The runs whose steps are in flight, ascending, each once.
    pub fn in_flight(&self) -> Vec<i64> {
        let ids: BTreeSet<i64> = self.inner.lock().values().map(|e| e.run_id).collect();
        ids.into_iter().collect()
    }

    /// The renewal statement sent at `sent` renewed `ids`: their clocks now
    /// end a lease after `sent`. Others are left as they are.
    pub fn renewed(&self, ids: &[i64], sent: Instant) {
        let ids: BTreeSet<i64> = ids.iter().copied().collect();
        let until = sent + self.inner.lease;
        for entry in self.inner.lock().values() {
            if ids.contains(&entry.run_id)
                && let Some(deadline) = entry.deadline.upgrade()
            {
                deadline.extend_to(until);
            }
        }
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// The process's liveness.
    pub fn liveness(&self) -> &Liveness {
        &self.inner.liveness
    }
}

/// Renews the leases of every run a step of this process is working on,
/// every third of the lease, while the process is live (a worker cut off
/// from the database must let its runs go, not keep them). Each renewal is
/// one statement, bounded by the interval.
pub async fn renew_periodically(pool: PgPool, worker: String, leases: Leases) {
    let every = (leases.lease() / 3).max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !leases.liveness().is_live() {
            continue;
        }
        let ids = leases.in_flight();
        if ids.is_empty() {
            continue;
        }
        let sent = Instant::now();
        let renewal = store::renew_leases(&pool, &worker, &ids, leases.lease());
        match tokio::time::timeout(every, renewal).await {
            Ok(Ok(renewed)) => {
                tracing::debug!(
                    in_flight = ids.len(),
                    renewed = renewed.len(),
                    "renewed the leases of runs in flight"
                );
                leases.renewed(&renewed, sent);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not renew the leases of runs in flight")
            }
            Err(_) => tracing::warn!(
                limit = ?every,
                "renewing the leases of runs in flight took too long; trying again"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_runs_renewed_get_a_later_deadline() {
        let leases = Leases::new(Duration::from_secs(30), Liveness::always());
        let taken = Instant::now();
        let a = leases.hold(1, taken);
        let b = leases.hold(2, taken);
        let a_again = leases.hold(1, taken);
        assert_eq!(leases.in_flight(), [1, 2]);
        let later = taken + Duration::from_secs(10);
        leases.renewed(&[1], later);
        assert_eq!(a.deadline(), later + Duration::from_secs(30));
        assert_eq!(a_again.deadline(), later + Duration::from_secs(30));
        // Run 2 was taken over by another worker: its step keeps its old end.
        assert_eq!(b.deadline(), taken + Duration::from_secs(30));
        // A renewal answered late never moves a deadline back.
        leases.renewed(&[1], taken);
        assert_eq!(a.deadline(), later + Duration::from_secs(30));
    }

    #[test]
    fn a_run_leaves_the_renewal_with_the_last_clone_of_its_clock() {
        let leases = Leases::new(Duration::from_secs(30), Liveness::always());
        let clock = leases.hold(7, Instant::now());
        let copy = clock.clone();
        drop(clock);
        assert_eq!(leases.in_flight(), [7]);
        drop(copy);
        assert!(leases.in_flight().is_empty());
    }

    #[test]
    fn a_client_checking_its_own_calls_gets_the_same_rule_as_allows() {
        let leases = Leases::new(Duration::from_secs(30), Liveness::always());
        let now = Instant::now();
        // A call as long as the lease: `allows` lets it start (renewals
        // cover it), and so does `now + call < deadline_for_calls_of(call)`.
        let fresh = leases.hold(1, now);
        let call = Duration::from_secs(30);
        assert!(fresh.allows(call));
        assert!(now + call < fresh.deadline_for_calls_of(call));
        assert!(
            now + call >= fresh.deadline(),
            "the bare deadline would refuse it"
        );
        // Missed renewals, 10 s left: neither lets an 11 s call start.
        let stale = leases.hold(2, now - Duration::from_secs(20));
        let call = Duration::from_secs(11);
        assert!(!stale.allows(call));
        assert!(Instant::now() + call >= stale.deadline_for_calls_of(call));
    }

    #[test]
    fn calls_start_only_while_live_and_with_half_the_lease_left() {
        let liveness = Liveness::always();
        let leases = Leases::new(Duration::from_secs(30), liveness.clone());
        let now = Instant::now();
        let fresh = leases.hold(1, now);
        // A call longer than the lease is covered by the renewals.
        assert!(fresh.allows(Duration::from_secs(60)));
        assert!(fresh.allows(Duration::from_secs(1)));
        // Missed renewals: 10 s left of 30.
        let stale = leases.hold(2, now - Duration::from_secs(20));
        assert!(!stale.allows(Duration::from_secs(60)));
        assert!(
            stale.allows(Duration::from_secs(1)),
            "a short call still fits"
        );
        assert!(!stale.allows(Duration::from_secs(11)));
        // Cut off: nothing starts, whatever the lease says.
        liveness.set(false);
        assert!(!fresh.allows(Duration::from_millis(1)));
        liveness.set(true);
        assert!(fresh.allows(Duration::from_millis(1)));
        // A clock of its own knows no liveness and is never renewed.
        let own = LeaseClock::new(now - Duration::from_secs(40), Duration::from_secs(30));
        assert!(!own.allows(Duration::from_millis(1)));
    }
}
