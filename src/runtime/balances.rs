//! What this process knows of each profile's account balance (chenyu), so
//! that a run whose quote the balance cannot cover waits `queued` instead
//! of being refused and failed.
//!
//! A read is cached and kept current as runs are submitted (their quote is
//! reserved before the submit, so a hundred steps checking at once cannot
//! all pass on one balance) and settled (what is released comes back); it
//! is read again once it is older than [`REFRESH`], or when it looks short
//! and was read more than [`SHORT_RECHECK`] ago (a top-up). Other worker
//! processes spend from the same account: the provider's own refusal
//! (`INSUFFICIENT_BALANCE`) stays the last word and pauses the profile too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

/// A cached balance older than this is read again before it is relied on.
pub const REFRESH: Duration = Duration::from_secs(30);
/// A balance that looks too short is read again if older than this.
pub const SHORT_RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Known {
    /// The balance minus what this process reserved since.
    available: Decimal,
    read_at: Instant,
}

/// Whether a quote fits what the cache knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Reserved from the cached balance.
    Reserved,
    /// Too short by the cache; the balance it shows.
    Short(Decimal),
    /// Read the balance first (nothing cached, or too old to rely on).
    ReadFirst,
}

/// The balances of every profile of this process.
#[derive(Debug, Default)]
pub struct Balances {
    known: Mutex<HashMap<String, Known>>,
    /// One read at a time per profile: steps that find the cache stale at
    /// once wait for one read instead of each reading (and each reserving
    /// from the same fresh balance).
    reading: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    /// The smallest quote this process has been asked to cover, per
    /// profile: whether a balance too short for one run still covers
    /// others (see [`crate::runtime::pauses::short_balance`]).
    smallest: Mutex<HashMap<String, Decimal>>,
}

impl Balances {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        // One number per profile, replaced in one go: poison is harmless.
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `quote` if the cached balance covers it.
    pub fn reserve(&self, profile: &str, quote: Decimal, now: Instant) -> Coverage {
        {
            let mut smallest = self.smallest.lock().unwrap_or_else(|p| p.into_inner());
            let seen = smallest.entry(profile.to_owned()).or_insert(quote);
            *seen = (*seen).min(quote);
        }
        let mut known = self.lock();
        let Some(k) = known.get_mut(profile) else {
            return Coverage::ReadFirst;
        };
        let age = now.saturating_duration_since(k.read_at);
        if age > REFRESH {
            return Coverage::ReadFirst;
        }
        if k.available >= quote {
            k.available -= quote;
            return Coverage::Reserved;
        }
        if age > SHORT_RECHECK {
            Coverage::ReadFirst
        } else {
            Coverage::Short(k.available)
        }
    }

    /// The lock a balance read of `profile` is made under.
    pub fn read_lock(&self, profile: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(profile.to_owned())
            .or_default()
            .clone()
    }

    /// Records a balance just read.
    pub fn read(&self, profile: &str, balance: Decimal, now: Instant) {
        self.lock().insert(
            profile.to_owned(),
            Known {
                available: balance,
                read_at: now,
            },
        );
    }

    /// Gives back a reservation whose submit froze nothing, or money a
    /// settled run released.
    pub fn credit(&self, profile: &str, amount: Decimal) {
        if let Some(k) = self.lock().get_mut(profile) {
            k.available += amount;
        }
    }

    /// The smallest quote this process has been asked to cover for
    /// `profile`.
    pub fn smallest_quote(&self, profile: &str) -> Option<Decimal> {
        self.smallest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(profile)
            .copied()
    }

    /// The balance as this process sees it (for `/metrics`).
    pub fn available(&self, profile: &str) -> Option<Decimal> {
        self.lock().get(profile).map(|k| k.available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: i64) -> Decimal {
        Decimal::new(n, 2)
    }

    #[test]
    fn reservations_share_one_read_and_a_short_balance_is_read_again_later() {
        let balances = Balances::default();
        let t0 = Instant::now();
        assert_eq!(balances.reserve("p", d(3), t0), Coverage::ReadFirst);
        balances.read("p", d(10), t0);
        // Three steps checking at once: only what the balance covers passes.
        assert_eq!(balances.reserve("p", d(3), t0), Coverage::Reserved);
        assert_eq!(balances.reserve("p", d(3), t0), Coverage::Reserved);
        assert_eq!(balances.reserve("p", d(3), t0), Coverage::Reserved);
        assert_eq!(balances.reserve("p", d(3), t0), Coverage::Short(d(1)));
        // A submit that froze nothing gives its reservation back.
        balances.credit("p", d(3));
        assert_eq!(balances.reserve("p", d(3), t0), Coverage::Reserved);
        // Short for a while: read again (a top-up may have come).
        let later = t0 + SHORT_RECHECK + Duration::from_millis(1);
        assert_eq!(balances.reserve("p", d(3), later), Coverage::ReadFirst);
        // Old: read again whatever it shows.
        balances.read("p", d(100), t0);
        assert_eq!(
            balances.reserve("p", d(3), t0 + REFRESH + Duration::from_secs(1)),
            Coverage::ReadFirst
        );
        assert_eq!(balances.available("p"), Some(d(100)));
    }
}
