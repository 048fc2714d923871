//! Per provider profile, shared by the steps of one worker process: a cap on
//! requests per second that adapts to 429s, and a cap on submits in flight.
//!
//! The rate is a token bucket whose rate halves on every 429 and climbs back
//! by small steps on answers that are not 429 (additive increase,
//! multiplicative decrease), so a provider that starts refusing is slowed
//! down within a few requests and recovers within a minute or so once it
//! stops. A profile without a configured rate is unlimited until its first
//! 429, and becomes unlimited again once it has recovered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The slowest an adaptive rate goes (requests per second).
pub const MIN_RATE: f64 = 0.2;

/// Steps from a halved rate back to the ceiling.
const RECOVERY_STEPS: f64 = 50.0;

/// The rate state of one profile; pure, so it is tested with a fake clock.
#[derive(Debug, Clone)]
pub struct RateState {
    /// `requests_per_second` from the configuration.
    configured: Option<f64>,
    /// The rate in force; `None` is unlimited.
    current: Option<f64>,
    /// Where recovery ends: the configured rate, or twice the rate at
    /// which the provider said 429 (then unlimited again).
    ceiling: Option<f64>,
    /// Tokens in the bucket (negative: reserved ahead).
    tokens: f64,
    refilled: Instant,
    /// Requests in the current one-second window, to know the rate in
    /// force when an unlimited profile meets its first 429.
    window_start: Instant,
    window_count: u32,
    /// When the rate was last halved: a burst of 429s answering requests
    /// that were all sent at once halves it once, not once per answer.
    last_decrease: Option<Instant>,
}

impl RateState {
    /// A profile with `configured` requests per second (`None`: unlimited).
    pub fn new(configured: Option<f64>, now: Instant) -> Self {
        RateState {
            configured,
            current: configured,
            ceiling: configured,
            tokens: configured.map_or(0.0, |r| r.max(1.0)),
            refilled: now,
            window_start: now,
            window_count: 0,
            last_decrease: None,
        }
    }

    /// The rate in force (`None`: unlimited).
    pub fn rate(&self) -> Option<f64> {
        self.current
    }

    /// Takes a token for one request and says how long to wait before
    /// sending it (zero when one is there).
    pub fn reserve(&mut self, now: Instant) -> Duration {
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.window_count = 0;
        }
        self.window_count += 1;
        let Some(rate) = self.current else {
            return Duration::ZERO;
        };
        let burst = rate.max(1.0);
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }

    /// Gives back a token that was reserved but not used.
    pub fn refund(&mut self) {
        if let Some(rate) = self.current {
            self.tokens = (self.tokens + 1.0).min(rate.max(1.0));
        }
        self.window_count = self.window_count.saturating_sub(1);
    }

    /// Learns from an answer at `now`: 429 halves the rate (once per
    /// second at most), any other answer helps it recover.
    pub fn observe(&mut self, rate_limited: bool, now: Instant) {
        if rate_limited {
            if self
                .last_decrease
                .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
            {
                return;
            }
            self.last_decrease = Some(now);
            let in_force = self
                .current
                .unwrap_or_else(|| f64::from(self.window_count.max(1)));
            let halved = (in_force / 2.0).max(MIN_RATE);
            if self.configured.is_none() && self.current.is_none() {
                self.ceiling = Some((in_force * 2.0).max(MIN_RATE));
            }
            self.current = Some(halved);
            self.tokens = self.tokens.min(0.0);
            // The bucket starts now: no burst right after a 429.
            self.refilled = now;
            return;
        }
        let (Some(current), Some(ceiling)) = (self.current, self.ceiling) else {
            return;
        };
        let next = current + ceiling / RECOVERY_STEPS;
        if next < ceiling {
            self.current = Some(next);
        } else if self.configured.is_some() {
            self.current = self.configured;
        } else {
            // Recovered past the rate that drew the 429: unlimited again.
            self.current = None;
            self.ceiling = None;
        }
    }
}

struct ProfileThrottle {
    rate: Mutex<RateState>,
    submits: Option<Arc<Semaphore>>,
}

/// What a step must do before a provider call.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead (after the wait, if any, has been slept).
    Go,
    /// The profile is too busy for this step to wait within its lease:
    /// give the run back, due again after this long.
    Defer(Duration),
}

/// The throttles of every configured profile.
#[derive(Default)]
pub struct Throttles {
    profiles: HashMap<String, ProfileThrottle>,
}

impl std::fmt::Debug for Throttles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttles")
            .field("profiles", &self.profiles.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Throttles {
    /// Adds a profile's limits.
    pub fn add(&mut self, profile: &str, rate: Option<f64>, max_submits: Option<usize>) {
        self.profiles.insert(
            profile.to_owned(),
            ProfileThrottle {
                rate: Mutex::new(RateState::new(rate, Instant::now())),
                submits: max_submits.map(|n| Arc::new(Semaphore::new(n))),
            },
        );
    }

    fn rate(&self, profile: &str) -> Option<std::sync::MutexGuard<'_, RateState>> {
        let throttle = self.profiles.get(profile)?;
        // The state is a few numbers updated in one go: poison is harmless.
        Some(throttle.rate.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits for a request slot of `profile`, up to `max_wait`; a longer
    /// wait is not slept but returned as `Defer`.
    pub async fn admit(&self, profile: &str, max_wait: Duration) -> Admission {
        let wait = match self.rate(profile) {
            Some(mut rate) => {
                let wait = rate.reserve(Instant::now());
                if wait > max_wait {
                    rate.refund();
                    return Admission::Defer(wait);
                }
                wait
            }
            None => Duration::ZERO,
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Admission::Go
    }

    /// Gives back a request slot taken by [`Throttles::admit`] that was not
    /// used (the run was deferred or held before its call).
    pub fn refund(&self, profile: &str) {
        if let Some(mut rate) = self.rate(profile) {
            rate.refund();
        }
    }

    /// A submit slot of `profile` (`Ok(None)`: no cap), waited for up to
    /// `max_wait`; `Err` when none came free in time.
    pub async fn submit_slot(
        &self,
        profile: &str,
        max_wait: Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, ()> {
        let Some(semaphore) = self.profiles.get(profile).and_then(|t| t.submits.clone()) else {
            return Ok(None);
        };
        match tokio::time::timeout(max_wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(()),
        }
    }

    /// Learns from an answer of `profile` (its HTTP status; `None`, no
    /// answer at all, teaches nothing).
    pub fn observe(&self, profile: &str, http_status: Option<u16>) {
        let Some(status) = http_status else {
            return;
        };
        if let Some(mut rate) = self.rate(profile) {
            let before = rate.rate();
            rate.observe(status == 429, Instant::now());
            let after = rate.rate();
            if after != before && status == 429 {
                tracing::warn!(profile, rate = ?after, "the provider answered 429: slowing this profile down");
            } else if before.is_some() && after.is_none() {
                tracing::info!(
                    profile,
                    "the provider no longer rate-limits this profile: unthrottled"
                );
            }
        }
    }

    /// The rate in force for `profile` (`None`: unlimited), for tests and logs.
    pub fn current_rate(&self, profile: &str) -> Option<f64> {
        self.rate(profile).and_then(|r| r.rate())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_rate_spaces_requests_after_the_burst() {
        let t0 = Instant::now();
        let mut state = RateState::new(Some(2.0), t0);
        assert_eq!(state.reserve(t0), Duration::ZERO);
        assert_eq!(state.reserve(t0), Duration::ZERO, "a burst of one second");
        assert_eq!(state.reserve(t0), Duration::from_millis(500));
        assert_eq!(state.reserve(t0), Duration::from_millis(1000));
        state.refund();
        assert_eq!(state.reserve(t0), Duration::from_millis(1000));
        // Time refills the bucket.
        let mut state = RateState::new(Some(2.0), t0);
        state.reserve(t0);
        state.reserve(t0);
        assert_eq!(
            state.reserve(t0 + Duration::from_millis(500)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_429_halves_the_rate_and_answers_bring_it_back() {
        let t0 = Instant::now();
        let mut state = RateState::new(Some(10.0), t0);
        let second = Duration::from_secs(1);
        state.observe(true, t0);
        assert_eq!(state.rate(), Some(5.0));
        state.observe(true, t0 + Duration::from_millis(10));
        assert_eq!(
            state.rate(),
            Some(5.0),
            "one halving per second for a burst of 429s"
        );
        state.observe(true, t0 + second);
        assert_eq!(state.rate(), Some(2.5));
        for _ in 0..10 {
            state.observe(false, t0 + second);
        }
        let rate = state.rate().unwrap();
        assert!((rate - 4.5).abs() < 1e-9, "+ceiling/50 per answer: {rate}");
        for _ in 0..100 {
            state.observe(false, t0 + second);
        }
        assert_eq!(state.rate(), Some(10.0), "never above the configured rate");
        for n in 0..20 {
            state.observe(true, t0 + second * (n + 2));
        }
        assert_eq!(state.rate(), Some(MIN_RATE), "never below the floor");
    }

    #[test]
    fn an_unlimited_profile_is_throttled_by_its_first_429_and_freed_after() {
        let t0 = Instant::now();
        let mut state = RateState::new(None, t0);
        for _ in 0..8 {
            assert_eq!(state.reserve(t0), Duration::ZERO);
        }
        state.observe(true, t0);
        assert_eq!(
            state.rate(),
            Some(4.0),
            "half the 8 requests of this second"
        );
        assert_eq!(
            state.reserve(t0),
            Duration::from_millis(250),
            "no burst right after a 429"
        );
        for _ in 0..200 {
            state.observe(false, t0);
        }
        assert_eq!(
            state.rate(),
            None,
            "recovered past twice the rate of the 429"
        );
    }
}
