//! Provider push-back that depends on how much a client does: the per-key
//! request rate limit and the cap on runs at once.
//!
//! The rate decision is a pure function of a key's state, the limit and
//! the time, so it is tested with made-up instants. Each key keeps both a
//! token bucket and the times of its recent requests, updated on every
//! admitted request whatever the mode, so that switching modes or rates at
//! run time keeps what the key already did.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How `Faults::rate_limit_rps` is enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    /// A bucket of `rate_limit_burst` tokens refilled at the rate; each
    /// request takes one.
    #[default]
    TokenBucket,
    /// At most ⌊rate⌋ requests in any one second; below one request per
    /// second, one request per `1/rate` seconds.
    SlidingWindow,
}

impl FromStr for RateLimitMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "token_bucket" => Ok(RateLimitMode::TokenBucket),
            "sliding_window" => Ok(RateLimitMode::SlidingWindow),
            other => Err(format!(
                "rate limit mode must be token_bucket or sliding_window, got {other:?}"
            )),
        }
    }
}

/// A rate limit in force.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limit {
    /// Requests per second, positive and finite.
    pub rps: f64,
    /// The bucket's size, at least 1.
    pub burst: f64,
    pub mode: RateLimitMode,
}

impl Limit {
    /// The limit of `rps` with an optional burst (default one second's
    /// worth, at least 1).
    pub(crate) fn new(rps: f64, burst: Option<f64>, mode: RateLimitMode) -> Limit {
        Limit {
            rps,
            burst: burst.unwrap_or(rps).max(1.0),
            mode,
        }
    }

    /// The sliding window's length and how many requests it admits.
    fn window(&self) -> (Duration, usize) {
        if self.rps >= 1.0 {
            // Truncation is the point: 2.5 rps admits 2 per second.
            (Duration::from_secs(1), self.rps.floor() as usize)
        } else {
            (Duration::from_secs_f64(1.0 / self.rps), 1)
        }
    }
}

/// What one key has done.
#[derive(Debug, Clone)]
pub(crate) struct KeyState {
    tokens: f64,
    refilled: Instant,
    /// Admitted requests, oldest first, as far back as a window reaches.
    recent: VecDeque<Instant>,
}

impl KeyState {
    /// A key seen for the first time: a full bucket, no history.
    pub(crate) fn new(limit: &Limit, now: Instant) -> KeyState {
        KeyState {
            tokens: limit.burst,
            refilled: now,
            recent: VecDeque::new(),
        }
    }
}

/// The decision on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Admitted,
    /// Refused; `Retry-After` in whole seconds (rounded up, at least 1).
    Refused {
        retry_after_secs: u64,
    },
}

/// Decides one request of a key at `now` and records it if admitted.
pub(crate) fn admit(state: &mut KeyState, limit: &Limit, now: Instant) -> Admission {
    let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
    state.tokens = (state.tokens + elapsed * limit.rps).min(limit.burst);
    state.refilled = now.max(state.refilled);
    let (window, admits) = limit.window();
    while state
        .recent
        .front()
        .is_some_and(|&t| now.saturating_duration_since(t) >= window)
    {
        state.recent.pop_front();
    }
    let wait = match limit.mode {
        RateLimitMode::TokenBucket if state.tokens >= 1.0 => None,
        RateLimitMode::TokenBucket => Some((1.0 - state.tokens) / limit.rps),
        RateLimitMode::SlidingWindow if state.recent.len() < admits => None,
        RateLimitMode::SlidingWindow => {
            // The request that frees a slot is the one `admits` back.
            let freeing = state.recent[state.recent.len() - admits];
            Some((window - now.saturating_duration_since(freeing)).as_secs_f64())
        }
    };
    if let Some(secs) = wait {
        return Admission::Refused {
            retry_after_secs: whole_seconds(secs),
        };
    }
    // Both representations are kept current, whatever the mode.
    state.tokens = (state.tokens - 1.0).max(0.0);
    state.recent.push_back(now);
    Admission::Admitted
}

/// Seconds rounded up, at least 1.
fn whole_seconds(secs: f64) -> u64 {
    // A finite, non-negative wait well within u64.
    (secs.ceil() as u64).max(1)
}

/// The state of every key, by bearer token.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    keys: HashMap<String, KeyState>,
}

impl Limiter {
    /// Decides a request of `key` under `limit` at `now`.
    pub(crate) fn admit(&mut self, key: &str, limit: &Limit, now: Instant) -> Admission {
        let state = self
            .keys
            .entry(key.to_owned())
            .or_insert_with(|| KeyState::new(limit, now));
        admit(state, limit, now)
    }
}

/// Whether a new run may start with `running` runs of its kind queued or
/// running, under `cap`.
pub(crate) fn under_cap(running: usize, cap: Option<u32>) -> bool {
    cap.is_none_or(|cap| running < cap as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs `at` (milliseconds after a fixed start) through one key.
    fn decisions(limit: Limit, at: &[u64]) -> Vec<Admission> {
        let t0 = Instant::now();
        let mut state = KeyState::new(&limit, t0);
        at.iter()
            .map(|&m| admit(&mut state, &limit, t0 + ms(m)))
            .collect()
    }

    const OK: Admission = Admission::Admitted;
    const fn no(secs: u64) -> Admission {
        Admission::Refused {
            retry_after_secs: secs,
        }
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let limit = Limit::new(2.0, Some(3.0), RateLimitMode::TokenBucket);
        assert_eq!(
            decisions(limit, &[0, 0, 0, 0, 250, 500, 501, 1001]),
            [OK, OK, OK, no(1), no(1), OK, no(1), OK]
        );
    }

    #[test]
    fn burst_defaults_to_one_second_and_at_least_one() {
        assert_eq!(Limit::new(5.0, None, RateLimitMode::TokenBucket).burst, 5.0);
        assert_eq!(Limit::new(0.1, None, RateLimitMode::TokenBucket).burst, 1.0);
        assert_eq!(
            Limit::new(2.0, Some(0.2), RateLimitMode::TokenBucket).burst,
            1.0
        );
    }

    #[test]
    fn retry_after_is_the_wait_for_a_token_rounded_up() {
        let slow = Limit::new(0.25, None, RateLimitMode::TokenBucket);
        assert_eq!(decisions(slow, &[0, 0, 1500]), [OK, no(4), no(3)]);
        let fast = Limit::new(100.0, Some(1.0), RateLimitMode::TokenBucket);
        assert_eq!(decisions(fast, &[0, 0]), [OK, no(1)], "at least 1");
    }

    #[test]
    fn sliding_window_counts_the_last_second() {
        let limit = Limit::new(2.0, None, RateLimitMode::SlidingWindow);
        assert_eq!(
            decisions(limit, &[0, 100, 200, 999, 1000, 1050, 1100, 1101]),
            [OK, OK, no(1), no(1), OK, no(1), OK, no(1)]
        );
        // Fractions below one stretch the window: one per 1/rate seconds.
        let slow = Limit::new(0.1, None, RateLimitMode::SlidingWindow);
        assert_eq!(decisions(slow, &[0, 2500, 10_000]), [OK, no(8), OK]);
        // 2.5 per second admits 2.
        let frac = Limit::new(2.5, None, RateLimitMode::SlidingWindow);
        assert_eq!(decisions(frac, &[0, 0, 0]), [OK, OK, no(1)]);
    }

    #[test]
    fn switching_modes_keeps_what_the_key_did() {
        let t0 = Instant::now();
        let bucket = Limit::new(0.1, Some(2.0), RateLimitMode::TokenBucket);
        let window = Limit::new(0.1, Some(2.0), RateLimitMode::SlidingWindow);
        let mut state = KeyState::new(&bucket, t0);
        assert_eq!(admit(&mut state, &window, t0), OK);
        assert_eq!(admit(&mut state, &window, t0 + ms(1)), no(10));
        // The bucket was charged by the window's admitted request.
        assert_eq!(admit(&mut state, &bucket, t0 + ms(2)), OK);
        assert_eq!(admit(&mut state, &bucket, t0 + ms(3)), no(10));
        // And the window saw the bucket's.
        assert_eq!(admit(&mut state, &window, t0 + ms(9_000)), no(2));
    }

    #[test]
    fn keys_are_limited_apart() {
        let limit = Limit::new(1.0, None, RateLimitMode::TokenBucket);
        let mut limiter = Limiter::default();
        let now = Instant::now();
        assert_eq!(limiter.admit("a", &limit, now), OK);
        assert_eq!(limiter.admit("a", &limit, now), no(1));
        assert_eq!(limiter.admit("b", &limit, now), OK);
    }

    #[test]
    fn the_cap_counts_runs_of_a_kind() {
        assert!(under_cap(1000, None));
        assert!(under_cap(1, Some(2)));
        assert!(!under_cap(2, Some(2)));
        assert!(!under_cap(0, Some(0)));
    }

    #[test]
    fn modes_parse_from_their_wire_names() {
        assert_eq!("sliding_window".parse(), Ok(RateLimitMode::SlidingWindow));
        assert!("leaky".parse::<RateLimitMode>().is_err());
        assert_eq!(
            serde_json::to_value(RateLimitMode::TokenBucket).expect("serialize"),
            "token_bucket"
        );
    }
}
