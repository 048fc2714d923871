//! Provider profiles paused because the provider refused our API key.
//!
//! A 401/403 is not the run's fault, and retrying every run against a
//! refused key only fills the log (and may lock the account). So the whole
//! profile pauses: its runs are not claimed and stay as they are, nothing is
//! failed, and one cheap probe (`market/info`) per interval asks whether the
//! key works again (e.g. after the key was fixed and the worker reloaded).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest wait between two probes of a paused profile.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
struct Pause {
    /// A workflow the profile was using: what the probe asks about.
    workflow_id: String,
    next_probe: Instant,
    interval: Duration,
}

/// The paused profiles of this worker process.
#[derive(Debug, Default)]
pub struct ProviderPauses {
    paused: Mutex<HashMap<String, Pause>>,
    /// Profiles resumed lately: when and with what probe interval.
    resumed: Mutex<HashMap<String, (Instant, Duration)>>,
}

impl ProviderPauses {
    /// Pauses `profile`; the first probe follows after `first_probe`.
    /// True when it was not paused before.
    ///
    /// A profile paused again soon after a resume keeps the interval it had
    /// reached: a probe can pass while runs are still refused (an exhausted
    /// Dify quota does not show on `/parameters`), and the runs must not be
    /// tried every `first_probe` for ever.
    pub fn pause(&self, profile: &str, workflow_id: &str, first_probe: Duration) -> bool {
        let mut paused = self.lock();
        if paused.contains_key(profile) {
            return false;
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
                workflow_id: workflow_id.to_owned(),
                next_probe: now + interval,
                interval,
            },
        );
        true
    }

    /// Whether `profile` is paused.
    pub fn is_paused(&self, profile: &str) -> bool {
        self.lock().contains_key(profile)
    }

    /// The profiles whose probe is due, as (profile, workflow id). Each one
    /// is rescheduled at once, so a slow probe is never started twice.
    pub fn due_probes(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        let mut due = Vec::new();
        for (profile, pause) in self.lock().iter_mut() {
            if pause.next_probe <= now {
                pause.interval = (pause.interval * 2).min(MAX_PROBE_INTERVAL);
                pause.next_probe = now + pause.interval;
                due.push((profile.clone(), pause.workflow_id.clone()));
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

    #[test]
    fn a_pause_is_probed_with_growing_intervals_until_resumed() {
        let pauses = ProviderPauses::default();
        assert!(pauses.pause("p", "wf", Duration::from_secs(10)));
        assert!(
            !pauses.pause("p", "wf2", Duration::from_secs(10)),
            "already paused"
        );
        assert!(pauses.is_paused("p"));
        assert!(
            pauses.due_probes().is_empty(),
            "not before the first interval"
        );
        pauses.lock().get_mut("p").unwrap().next_probe = Instant::now();
        assert_eq!(pauses.due_probes(), vec![("p".to_owned(), "wf".to_owned())]);
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
        pauses.pause("p", "wf", Duration::from_secs(10));
        pauses.lock().get_mut("p").unwrap().interval = Duration::from_secs(40);
        assert!(pauses.resume("p"));
        assert!(pauses.pause("p", "wf", Duration::from_secs(10)));
        assert_eq!(pauses.lock()["p"].interval, Duration::from_secs(80));
    }

    #[test]
    fn probe_intervals_are_capped() {
        let pauses = ProviderPauses::default();
        pauses.pause("p", "wf", MAX_PROBE_INTERVAL);
        pauses.lock().get_mut("p").unwrap().next_probe = Instant::now();
        pauses.due_probes();
        assert_eq!(pauses.lock()["p"].interval, MAX_PROBE_INTERVAL);
    }
}
