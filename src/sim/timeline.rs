//! Where a run is in its life at a given moment.
//!
//! A run's state is a pure function of the time elapsed since it was
//! submitted, so the simulator needs no background tasks and the rules can be
//! tested with fixed durations.

use std::time::Duration;

/// The phase durations, copied from `SimConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    pub queue: Duration,
    pub run: Duration,
    pub settle: Duration,
}

/// The phase of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Queued,
    Running,
    /// Finished (succeeded or failed) but not yet settled.
    Finished,
    /// Finished and settled: money released.
    Settled,
}

impl Timing {
    fn run_ends(&self) -> Duration {
        self.queue.saturating_add(self.run)
    }

    fn settles(&self) -> Duration {
        self.run_ends().saturating_add(self.settle)
    }

    /// The phase after `elapsed` since submit. Boundaries belong to the later
    /// phase: at exactly `queue` the run is already running.
    pub(crate) fn phase_at(&self, elapsed: Duration) -> Phase {
        if elapsed < self.queue {
            Phase::Queued
        } else if elapsed < self.run_ends() {
            Phase::Running
        } else if elapsed < self.settles() {
            Phase::Finished
        } else {
            Phase::Settled
        }
    }

    /// When the run entered `phase`, as an offset from submit (`updated_at`).
    pub(crate) fn entered(&self, phase: Phase) -> Duration {
        match phase {
            Phase::Queued => Duration::ZERO,
            Phase::Running => self.queue,
            Phase::Finished => self.run_ends(),
            Phase::Settled => self.settles(),
        }
    }

    /// Execution progress in whole percent: 0 while queued, linear while
    /// running, 100 once finished.
    pub(crate) fn progress_percent(&self, elapsed: Duration) -> u32 {
        match self.phase_at(elapsed) {
            Phase::Queued => 0,
            Phase::Running => {
                let done = elapsed.saturating_sub(self.queue).as_micros();
                let total = self.run.as_micros().max(1);
                u32::try_from((done * 100 / total).min(99)).unwrap_or(99)
            }
            Phase::Finished | Phase::Settled => 100,
        }
    }

    /// Whole seconds (rounded up) until a queued run starts.
    pub(crate) fn estimated_wait_secs(&self, elapsed: Duration) -> u64 {
        let left = self.queue.saturating_sub(elapsed);
        left.as_secs() + u64::from(left.subsec_nanos() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const T: Timing = Timing {
        queue: ms(500),
        run: ms(2000),
        settle: ms(500),
    };

    #[test]
    fn phases_follow_the_clock() {
        let table = [
            (0, Phase::Queued),
            (499, Phase::Queued),
            (500, Phase::Running),
            (2499, Phase::Running),
            (2500, Phase::Finished),
            (2999, Phase::Finished),
            (3000, Phase::Settled),
            (1_000_000, Phase::Settled),
        ];
        for (at, phase) in table {
            assert_eq!(T.phase_at(ms(at)), phase, "at {at}ms");
        }
    }

    #[test]
    fn zero_durations_skip_phases() {
        let t = Timing {
            queue: ms(0),
            run: ms(100),
            settle: ms(0),
        };
        assert_eq!(t.phase_at(ms(0)), Phase::Running);
        assert_eq!(t.phase_at(ms(100)), Phase::Settled);
    }

    #[test]
    fn progress_and_wait() {
        assert_eq!(T.progress_percent(ms(100)), 0);
        assert_eq!(T.progress_percent(ms(1500)), 50);
        assert_eq!(T.progress_percent(ms(2499)), 99);
        assert_eq!(T.progress_percent(ms(2500)), 100);
        assert_eq!(T.estimated_wait_secs(ms(0)), 1);
        assert_eq!(T.estimated_wait_secs(ms(500)), 0);
        assert_eq!(T.entered(Phase::Settled), ms(3000));
    }
}
