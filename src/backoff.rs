//! The poll and retry schedules. They produce delays that the lifecycle turns
//! into `due_at` timestamps, so a schedule survives any restart.
//!
//! Pure functions: randomness comes in as a number in `[0, 1)` so that tests
//! can pin it.

use std::time::Duration;

/// How an unclear submit (timeout, 5xx, 429) is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Submit attempts before the run fails (`SUBMIT_RETRIES_EXHAUSTED`).
    pub max_attempts: u32,
    /// Delay after the first unclear attempt.
    pub initial: Duration,
    /// Cap of the exponential schedule.
    pub max: Duration,
    /// Growth per attempt.
    pub multiplier: f64,
    /// Relative spread, e.g. 0.2 for +-20%.
    pub jitter: f64,
}

impl RetryPolicy {
    /// The delay after `attempts` unclear attempts (1 = the first one failed).
    pub fn delay(&self, attempts: u32, unit: f64) -> Duration {
        exponential(
            self.initial,
            self.max,
            self.multiplier,
            attempts.saturating_sub(1),
            self.jitter,
            unit,
        )
    }

    /// Whether another attempt is allowed after `attempts` have been made.
    pub fn may_retry(&self, attempts: u32) -> bool {
        attempts < self.max_attempts
    }
}

/// The durable status-check schedule of a submitted run.
#[derive(Debug, Clone, PartialEq)]
pub struct PollPolicy {
    /// First check after the submit.
    pub initial: Duration,
    /// Cap of the exponential schedule.
    pub max: Duration,
    /// Growth per poll.
    pub multiplier: f64,
    /// Relative spread, e.g. 0.2 for +-20%.
    pub jitter: f64,
    /// A run still not final and settled this long after its submit fails with `POLL_DEADLINE`.
    pub deadline: Duration,
    /// A run whose provider keeps answering with a status wfq does not
    /// know fails `UNKNOWN_RUN_STATUS` after this long.
    pub unknown_status_limit: Duration,
    /// A run the provider reports over but whose money it does not settle
    /// is recorded final after this long, its money unknown.
    pub settle_wait: Duration,
}

impl PollPolicy {
    /// The delay before the next check when `polls_done` checks were made.
    pub fn delay(&self, polls_done: u32, unit: f64) -> Duration {
        exponential(
            self.initial,
            self.max,
            self.multiplier,
            polls_done,
            self.jitter,
            unit,
        )
    }
}

/// `initial * multiplier^step`, capped at `max`, then spread by `jitter`
/// without ever exceeding `max` (so a configured cap is a promise).
fn exponential(
    initial: Duration,
    max: Duration,
    multiplier: f64,
    step: u32,
    jitter: f64,
    unit: f64,
) -> Duration {
    let base = initial.as_secs_f64() * multiplier.powi(step.min(1000) as i32);
    let capped = base.min(max.as_secs_f64());
    let spread = 1.0 + jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
    let seconds = (capped * spread).min(max.as_secs_f64()).max(0.0);
    Duration::from_secs_f64(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll() -> PollPolicy {
        PollPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
            deadline: Duration::from_secs(3600),
            unknown_status_limit: Duration::from_secs(3600),
            settle_wait: Duration::from_secs(3600),
        }
    }

    #[test]
    fn poll_schedule_without_jitter_doubles_up_to_the_cap() {
        let p = poll();
        let mid = 0.5; // the centre of the jitter range: no spread
        let delays: Vec<u64> = (0..9).map(|n| p.delay(n, mid).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn jitter_spreads_within_bounds_and_never_past_the_cap() {
        let p = poll();
        assert_eq!(p.delay(0, 0.0), Duration::from_millis(800));
        assert_eq!(p.delay(0, 1.0), Duration::from_millis(1200));
        assert_eq!(p.delay(20, 1.0), Duration::from_secs(60));
        assert_eq!(p.delay(20, 0.0), Duration::from_secs(48));
    }

    #[test]
    fn huge_step_counts_do_not_overflow() {
        assert_eq!(poll().delay(u32::MAX, 0.5), Duration::from_secs(60));
    }

    #[test]
    fn retry_schedule_starts_at_initial_after_the_first_failure() {
        let r = RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_secs(2),
            max: Duration::from_secs(300),
            multiplier: 3.0,
            jitter: 0.0,
        };
        assert_eq!(r.delay(1, 0.3), Duration::from_secs(2));
        assert_eq!(r.delay(2, 0.3), Duration::from_secs(6));
        assert_eq!(r.delay(3, 0.3), Duration::from_secs(18));
        assert!(r.may_retry(2));
        assert!(!r.may_retry(3));
    }
}
