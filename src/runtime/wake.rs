//! What wakes the claim loop: `LISTEN wfq_runs_due`, a run of this process
//! that became due earlier than the loop planned to sleep, and the fallback
//! timer (which alone is enough to be correct, e.g. behind PgBouncer).

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;

/// The claim loop's alarm clock.
#[derive(Debug, Default)]
pub struct Wake {
    notify: Notify,
    sleeping_until: Mutex<Option<DateTime<Utc>>>,
}

impl Wake {
    /// Wakes the claim loop now (or makes its next sleep return at once).
    pub fn now(&self) {
        self.notify.notify_one();
    }

    /// A run becomes due at `at`: wake the loop if it sleeps past that.
    pub fn due_at(&self, at: DateTime<Utc>) {
        let wake = self.lock().is_some_and(|until| at < until);
        if wake {
            self.now();
        }
    }

    /// Sleeps until `until` or until woken.
    pub async fn sleep_until(&self, until: DateTime<Utc>) {
        let delay = (until - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        *self.lock() = Some(until);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.notify.notified() => {}
        }
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<DateTime<Utc>>> {
        self.sleeping_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Channel that every INSERT into `wfq.runs` notifies (once per statement).
pub const RUNS_DUE_CHANNEL: &str = "wfq_runs_due";

/// Forwards `NOTIFY wfq_runs_due` to `wake` until the process ends. A lost
/// connection is logged and retried with a growing pause; meanwhile the
/// fallback poll keeps the worker correct.
pub async fn listen_for_new_runs(pool: PgPool, wake: std::sync::Arc<Wake>) {
    let mut failures: u32 = 0;
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "LISTEN connection failed; relying on the fallback poll");
                tokio::time::sleep(pause(failures)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(RUNS_DUE_CHANNEL).await {
            failures += 1;
            tracing::warn!(error = %e, "LISTEN {RUNS_DUE_CHANNEL} failed; relying on the fallback poll");
            tokio::time::sleep(pause(failures)).await;
            continue;
        }
        if failures > 0 {
            tracing::info!("LISTEN {RUNS_DUE_CHANNEL} is back");
            // Rows may have arrived while we were deaf.
            wake.now();
        }
        failures = 0;
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => wake.now(),
                // The connection dropped and the next call reconnects (and
                // re-subscribes). Rows may have arrived in between.
                Ok(None) => {
                    tracing::warn!("LISTEN connection lost; reconnecting");
                    wake.now();
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                    tokio::time::sleep(pause(failures)).await;
                    break;
                }
            }
        }
    }
}

fn pause(failures: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << failures.min(8))).min(Duration::from_secs(30))
}
