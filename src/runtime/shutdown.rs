//! Shutdown as the steps see it: whether it has begun (no new submit may
//! start), and the submits under way (being recorded, or sent), which must
//! be finished before the worker gives its leases back.

use std::sync::Arc;

use tokio::sync::watch;

/// Whether the worker is shutting down.
#[derive(Debug)]
pub struct Shutdown {
    begun: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            begun: watch::channel(false).0,
        }
    }
}

impl Shutdown {
    /// Shutdown has begun: steps stop before recording a new `submitting`.
    pub fn begin(&self) {
        self.begun.send_replace(true);
    }

    /// Whether shutdown has begun.
    pub fn has_begun(&self) -> bool {
        *self.begun.borrow()
    }

    /// Resolves once shutdown has begun (at once if it has).
    pub async fn begun(&self) {
        let mut begun = self.begun.subscribe();
        // The sender lives as long as `self`, so this only ends on `true`.
        let _ = begun.wait_for(|b| *b).await;
    }
}

/// Work that must be finished before the worker lets go of its runs: a
/// submit from just before its `submitting` is recorded until its answer is
/// (or until it is recorded that it was not sent).
#[derive(Debug)]
pub struct InFlight {
    count: Arc<watch::Sender<usize>>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            count: Arc::new(watch::channel(0).0),
        }
    }
}

/// Counts one piece of work in flight until dropped; it may move into a
/// task of its own.
#[derive(Debug)]
pub struct InFlightGuard(Arc<watch::Sender<usize>>);

impl InFlight {
    /// Counts work until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard {
        self.count.send_modify(|n| *n += 1);
        InFlightGuard(self.count.clone())
    }

    /// How much is in flight.
    pub fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// Resolves once nothing is in flight.
    pub async fn idle(&self) {
        let mut count = self.count.subscribe();
        let _ = count.wait_for(|n| *n == 0).await;
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_the_last_guard() {
        let in_flight = InFlight::default();
        in_flight.idle().await;
        let a = in_flight.enter();
        let b = in_flight.enter();
        assert_eq!(in_flight.count(), 2);
        drop(a);
        let idle = in_flight.idle();
        tokio::pin!(idle);
        assert!(
            futures_util::poll!(&mut idle).is_pending(),
            "one guard is left"
        );
        drop(b);
        idle.await;
    }

    #[tokio::test]
    async fn begun_resolves_once_shutdown_begins() {
        let shutdown = Shutdown::default();
        assert!(!shutdown.has_begun());
        let begun = shutdown.begun();
        tokio::pin!(begun);
        assert!(futures_util::poll!(&mut begun).is_pending());
        shutdown.begin();
        begun.await;
        assert!(shutdown.has_begun());
        shutdown.begun().await;
    }
}
