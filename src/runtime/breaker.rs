//! The breaker for account refusals nobody listed: a refusal code a profile
//! does not know as being about the account fails the run it refused, as
//! any refusal does. But when the same code refuses several runs of
//! different workflows within a short while, it is the account, not the
//! runs (a quota, a suspended account, a code the provider added): the
//! profile pauses, the runs it failed go back to the queue, and one run per
//! probe interval is let through until the refusals stop.
//!
//! A run is given back at most once per code: refused with that code again
//! once the profile runs, it fails for good and is not counted here
//! (`store::given_back_for`), so runs that really are refused for
//! themselves cannot keep tripping the breaker for ever.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When the breaker trips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Runs refused with one code...
    pub runs: usize,
    /// ...of at least this many different workflows...
    pub workflows: usize,
    /// ...within this long.
    pub window: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            runs: 3,
            workflows: 2,
            window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
struct Refusal {
    at: Instant,
    code: String,
    workflow: String,
    run_id: i64,
}

/// Whether the refusals in `recent` (oldest first) make `code` an account
/// refusal by `config` at `now`.
fn trips(recent: &VecDeque<Refusal>, code: &str, config: &BreakerConfig, now: Instant) -> bool {
    let mut runs = Vec::new();
    let mut workflows = Vec::new();
    for r in recent
        .iter()
        .filter(|r| r.code == code && now.saturating_duration_since(r.at) <= config.window)
    {
        if !runs.contains(&r.run_id) {
            runs.push(r.run_id);
        }
        if !workflows.contains(&&r.workflow) {
            workflows.push(&r.workflow);
        }
    }
    runs.len() >= config.runs && workflows.len() >= config.workflows
}

/// The recent unlisted refusals of every profile of this process.
#[derive(Debug, Default)]
pub struct Breakers {
    recent: Mutex<HashMap<String, VecDeque<Refusal>>>,
}

impl Breakers {
    /// Counts a refusal of run `run_id` (of `workflow`) with `code`; true
    /// when it trips the profile's breaker for `code`.
    pub fn refused(
        &self,
        profile: &str,
        code: &str,
        workflow: &str,
        run_id: i64,
        config: &BreakerConfig,
        now: Instant,
    ) -> bool {
        let mut all = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let recent = all.entry(profile.to_owned()).or_default();
        while recent
            .front()
            .is_some_and(|r| now.saturating_duration_since(r.at) > config.window)
        {
            recent.pop_front();
        }
        recent.push_back(Refusal {
            at: now,
            code: code.to_owned(),
            workflow: workflow.to_owned(),
            run_id,
        });
        let tripped = trips(recent, code, config, now);
        if tripped {
            recent.retain(|r| r.code != code);
        }
        tripped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_code_over_several_workflows_trips_and_one_workflow_does_not() {
        let breakers = Breakers::default();
        let config = BreakerConfig::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // A workflow whose inputs are wrong: many runs, one workflow.
        for n in 0..10 {
            assert!(!breakers.refused("p", "INVALID_WORKFLOW_INPUT", "wf_a", n, &config, at(1)));
        }
        // The account: the same code across workflows.
        assert!(!breakers.refused("p", "ACCOUNT_FROZEN", "wf_a", 20, &config, at(2)));
        assert!(!breakers.refused("p", "ACCOUNT_FROZEN", "wf_b", 21, &config, at(3)));
        assert!(breakers.refused("p", "ACCOUNT_FROZEN", "wf_a", 22, &config, at(4)));
        // Counted afresh after it tripped.
        assert!(!breakers.refused("p", "ACCOUNT_FROZEN", "wf_b", 23, &config, at(5)));
        // Another profile is another breaker.
        assert!(!breakers.refused("q", "ACCOUNT_FROZEN", "wf_a", 30, &config, at(5)));
    }

    #[test]
    fn refusals_older_than_the_window_do_not_count() {
        let breakers = Breakers::default();
        let config = BreakerConfig::default();
        let t0 = Instant::now();
        assert!(!breakers.refused("p", "E", "wf_a", 1, &config, t0));
        assert!(!breakers.refused("p", "E", "wf_b", 2, &config, t0));
        let later = t0 + config.window + Duration::from_secs(1);
        assert!(!breakers.refused("p", "E", "wf_a", 3, &config, later));
        // The same run refused twice counts once.
        assert!(!breakers.refused("p", "E", "wf_b", 3, &config, later));
        assert!(!breakers.refused("p", "E", "wf_b", 4, &config, later));
        assert!(breakers.refused("p", "E", "wf_b", 5, &config, later));
    }
}
