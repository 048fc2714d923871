//! A value that is expensive to produce (the series `/metrics` reads from
//! the database), reused for a while and produced by one caller at a time.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// The last value produced and when; see [`Cached::get`].
#[derive(Debug)]
pub struct Cached<T> {
    ttl: Duration,
    /// Held while a value is produced: callers that arrive meanwhile wait
    /// for that value instead of producing their own (single flight).
    slot: Mutex<Option<(Instant, T)>>,
}

impl<T: Clone> Cached<T> {
    /// An empty cache whose values are reused for `ttl` after they were
    /// produced.
    pub fn new(ttl: Duration) -> Self {
        Cached {
            ttl,
            slot: Mutex::new(None),
        }
    }

    /// The value produced less than `ttl` ago, or a new one from `produce`.
    ///
    /// Concurrent callers share one `produce`: the lock is held while it
    /// runs, and whoever waited for the lock finds the fresh value. A
    /// failure is a value like any other (`T` may be a `Result`), so a
    /// database that does not answer is asked once per `ttl` too, not once
    /// per scrape. A caller dropped while producing releases the lock and
    /// the next waiter produces instead.
    pub async fn get<F, Fut>(&self, produce: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let mut slot = self.slot.lock().await;
        if let Some((at, value)) = slot.as_ref()
            && at.elapsed() < self.ttl
        {
            return value.clone();
        }
        let value = produce().await;
        *slot = Some((Instant::now(), value.clone()));
        value
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures_util::future::join_all;

    use super::*;

    /// Produces `produced + 1`, after giving the other callers a chance to
    /// queue up behind it.
    async fn produce(produced: &AtomicU32) -> u32 {
        tokio::task::yield_now().await;
        produced.fetch_add(1, Ordering::SeqCst) + 1
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn concurrent_callers_share_one_value() {
        let cache = Cached::new(LONG);
        let produced = AtomicU32::new(0);
        let values = join_all((0..10).map(|_| cache.get(|| produce(&produced)))).await;
        assert_eq!(values, vec![1; 10]);
        assert_eq!(produced.load(Ordering::SeqCst), 1);
        assert_eq!(cache.get(|| produce(&produced)).await, 1);
        assert_eq!(produced.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_old_value_is_produced_again() {
        let cache = Cached::new(Duration::ZERO);
        let produced = AtomicU32::new(0);
        assert_eq!(cache.get(|| produce(&produced)).await, 1);
        assert_eq!(cache.get(|| produce(&produced)).await, 2);
    }

    #[tokio::test]
    async fn a_failure_is_reused_too() {
        let cache: Cached<Result<u32, String>> = Cached::new(LONG);
        let tries = AtomicU32::new(0);
        let fail = || async {
            tries.fetch_add(1, Ordering::SeqCst);
            Err("database: no answer".to_owned())
        };
        assert!(cache.get(fail).await.is_err());
        assert!(cache.get(fail).await.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_caller_dropped_while_producing_lets_the_next_one_produce() {
        let cache = Cached::new(LONG);
        let abandoned = cache.get(std::future::pending::<u32>);
        // Polled once: it holds the lock and waits forever; then dropped.
        assert!(futures_util::poll!(Box::pin(abandoned)).is_pending());
        assert_eq!(cache.get(|| async { 3 }).await, 3);
    }
}
