//! Per provider profile, shared by the steps of one worker process: the
//! request rate the provider allows (learned from its answers, see
//! [`rate`]), handed out fairly between submits and status checks, and a
//! cap on submits in flight.
//!
//! Requests wait for a token in two queues, one per [`Class`], served in
//! turn while both hold waiters: under a limit, a backlog of status checks
//! cannot keep new runs from being submitted, nor the reverse. A step whose
//! turn would come later than it can wait within its lease is not made to
//! wait at all: it is told when its turn would be ([`Admission::Defer`])
//! and its run is given back due then, so the schedule slips by exactly the
//! limit's backlog and no worker slot sits idle in a queue.

mod rate;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

pub use rate::{Bucket, MIN_RATE, RateChange, RateControl};

/// Now, on tokio's clock (which tests can pause and advance).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What a request is for: each gets its share of a limited rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A submit (and what prepares one).
    Submit,
    /// A status check, a stop request, a lookup of a lost submit.
    Poll,
}

impl Class {
    fn index(self) -> usize {
        match self {
            Class::Submit => 0,
            Class::Poll => 1,
        }
    }
}

/// What a step must do before a provider call.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead: a token is taken.
    Go,
    /// The profile's rate is taken for longer than the step can wait within
    /// its lease: give the run back, due again after this long.
    Defer(Duration),
}

struct Inner {
    control: RateControl,
    bucket: Bucket,
    /// Waiters per class, in arrival order.
    queues: [VecDeque<oneshot::Sender<()>>; 2],
    /// The class served next when both wait.
    turn: usize,
    /// A task hands out tokens to the queues.
    dispatching: bool,
}

impl Inner {
    fn waiting(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Forgets waiters that gave up (timed out, or their step was dropped).
    fn drop_gone(&mut self) {
        for queue in &mut self.queues {
            queue.retain(|tx| !tx.is_closed());
        }
    }

    /// The class whose turn it is, among those with waiters.
    fn next_class(&mut self) -> Option<usize> {
        let class = (0..2)
            .map(|k| (self.turn + k) % 2)
            .find(|&c| !self.queues[c].is_empty())?;
        self.turn = (class + 1) % 2;
        Some(class)
    }

    /// How long a new waiter of `class` would wait: its place in its queue,
    /// at its share of the rate (half while the other class waits too).
    fn expected_wait(&self, class: Class) -> Duration {
        let Some(rate) = self.control.rate() else {
            return Duration::ZERO;
        };
        let own = self.queues[class.index()].len() + 1;
        let other = &self.queues[1 - class.index()];
        let shares = if other.is_empty() { 1.0 } else { 2.0 };
        Duration::from_secs_f64(own as f64 * shares / rate)
    }
}

/// One profile's throttle.
struct ProfileThrottle {
    inner: Mutex<Inner>,
    submits: Option<Arc<Semaphore>>,
}

impl ProfileThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A few numbers and queues, each update complete: poison is harmless.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands out tokens to waiting steps at the rate in force, the classes in
/// turn, until no one waits.
async fn dispatch(throttle: Arc<ProfileThrottle>) {
    loop {
        let pause = {
            let mut inner = throttle.lock();
            inner.drop_gone();
            if inner.waiting() == 0 {
                inner.dispatching = false;
                return;
            }
            let now = now();
            let rate = inner.control.rate();
            let wait = inner.bucket.wait(rate, now);
            if wait.is_zero() {
                inner.bucket.take(rate, now);
                let class = inner.next_class().expect("someone waits");
                let granted = inner.queues[class]
                    .pop_front()
                    .is_some_and(|tx| tx.send(()).is_ok());
                if granted {
                    inner.control.sent();
                } else {
                    inner.bucket.refund(rate);
                }
                continue;
            }
            wait
        };
        tokio::time::sleep(pause).await;
    }
}

/// The throttles of every configured profile.
#[derive(Default)]
pub struct Throttles {
    profiles: HashMap<String, Arc<ProfileThrottle>>,
}

impl std::fmt::Debug for Throttles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttles")
            .field("profiles", &self.profiles.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Throttles {
    /// Adds a profile's limits: a hard ceiling of `rate` requests per second
    /// (`None`: as fast as the provider allows) and `max_submits` in flight.
    pub fn add(&mut self, profile: &str, rate: Option<f64>, max_submits: Option<usize>) {
        let now = now();
        self.profiles.insert(
            profile.to_owned(),
            Arc::new(ProfileThrottle {
                inner: Mutex::new(Inner {
                    control: RateControl::new(rate, now),
                    bucket: Bucket::new(now),
                    queues: [VecDeque::new(), VecDeque::new()],
                    turn: 0,
                    dispatching: false,
                }),
                submits: max_submits.map(|n| Arc::new(Semaphore::new(n))),
            }),
        );
    }

    /// Waits for a request token of `profile` for a request of `class`, up
    /// to `max_wait`; when the turn would come later, returns at once with
    /// `Defer` (and how long until then). Cancel-safe: a step dropped while
    /// it waits takes nothing from the others.
    pub async fn admit(&self, profile: &str, class: Class, max_wait: Duration) -> Admission {
        let Some(throttle) = self.profiles.get(profile) else {
            return Admission::Go;
        };
        let granted = {
            let mut inner = throttle.lock();
            let now = now();
            let rate = inner.control.rate();
            if inner.waiting() == 0 && inner.bucket.take(rate, now) {
                inner.control.sent();
                return Admission::Go;
            }
            let wait = inner.expected_wait(class);
            if wait > max_wait {
                return Admission::Defer(wait);
            }
            let (tx, rx) = oneshot::channel();
            inner.queues[class.index()].push_back(tx);
            if !inner.dispatching {
                inner.dispatching = true;
                tokio::spawn(dispatch(throttle.clone()));
            }
            rx
        };
        match tokio::time::timeout(max_wait, granted).await {
            Ok(Ok(())) => Admission::Go,
            // The rate fell while it waited: come back when a turn is likely.
            _ => Admission::Defer(throttle.lock().expected_wait(class)),
        }
    }

    /// Gives back a token taken by [`Throttles::admit`] that was not used
    /// (the run was deferred or held before its call).
    pub fn refund(&self, profile: &str) {
        if let Some(throttle) = self.profiles.get(profile) {
            let mut inner = throttle.lock();
            let rate = inner.control.rate();
            inner.bucket.refund(rate);
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
        let Some(throttle) = self.profiles.get(profile) else {
            return;
        };
        let change = {
            let mut inner = throttle.lock();
            let now = now();
            let change = inner.control.observe(status == 429, now);
            if matches!(change, Some(RateChange::Cut(_))) {
                // No burst right after a cut.
                inner.bucket.drain(now);
            }
            change
        };
        match change {
            Some(RateChange::Cut(rate)) => tracing::warn!(
                profile,
                rate = format!("{rate:.2}/s"),
                "the provider refused requests over its limit: sending at the rate it accepted"
            ),
            Some(RateChange::Strays(share)) => tracing::info!(
                profile,
                refused = format!("{:.1}%", share * 100.0),
                "the provider refuses this share of requests whatever the rate: not slowing down for it (refused requests wait their Retry-After)"
            ),
            Some(RateChange::Probe(rate)) => {
                tracing::debug!(profile, rate = format!("{rate:.2}/s"), "probing for a higher limit")
            }
            None => {}
        }
    }

    /// The rate in force for `profile` (`None`: unlimited).
    pub fn current_rate(&self, profile: &str) -> Option<f64> {
        self.profiles
            .get(profile)
            .and_then(|t| t.lock().control.rate())
    }

    /// The share of `profile`'s requests refused whatever the rate, as
    /// learned (0 when none).
    pub fn stray_share(&self, profile: &str) -> f64 {
        self.profiles
            .get(profile)
            .map_or(0.0, |t| t.lock().control.stray_share())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile limited to `rate` per second, as if learned.
    fn limited(rate: f64) -> Throttles {
        let mut throttles = Throttles::default();
        throttles.add("p", Some(rate), None);
        throttles
    }

    #[tokio::test(start_paused = true)]
    async fn submits_and_status_checks_take_turns_under_a_limit() {
        let throttles = Arc::new(limited(10.0));
        // The first token goes at once.
        assert_eq!(
            throttles.admit("p", Class::Poll, Duration::from_secs(60)).await,
            Admission::Go
        );
        // A backlog of status checks, then submits arriving behind it.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for n in 0..20 {
            let (throttles, tx) = (throttles.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let a = throttles.admit("p", Class::Poll, Duration::from_secs(60)).await;
                let _ = tx.send(("poll", n, a));
            }));
            tokio::task::yield_now().await;
        }
        for n in 0..5 {
            let (throttles, tx) = (throttles.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let a = throttles.admit("p", Class::Submit, Duration::from_secs(60)).await;
                let _ = tx.send(("submit", n, a));
            }));
            tokio::task::yield_now().await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        drop(tx);
        let mut order = Vec::new();
        while let Some((class, _, admission)) = rx.recv().await {
            assert_eq!(admission, Admission::Go);
            order.push(class);
        }
        // The five submits are among the first ten grants, not after all
        // twenty status checks.
        let last_submit = order.iter().rposition(|c| *c == "submit").unwrap();
        assert!(last_submit < 11, "{order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_beyond_the_wait_is_deferred_at_once_with_its_time() {
        let throttles = Arc::new(limited(1.0));
        assert_eq!(
            throttles.admit("p", Class::Submit, Duration::from_secs(2)).await,
            Admission::Go
        );
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let throttles = throttles.clone();
                tokio::spawn(async move {
                    throttles.admit("p", Class::Submit, Duration::from_secs(5)).await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        // Two are queued (a second each): the third would wait three.
        match throttles.admit("p", Class::Submit, Duration::from_secs(2)).await {
            Admission::Defer(wait) => assert_eq!(wait, Duration::from_secs(3)),
            other => panic!("{other:?}"),
        }
        for w in waiting {
            assert_eq!(w.await.unwrap(), Admission::Go);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_is_dropped_takes_no_token() {
        let throttles = Arc::new(limited(1.0));
        assert_eq!(
            throttles.admit("p", Class::Poll, Duration::from_secs(5)).await,
            Admission::Go
        );
        let dropped = {
            let throttles = throttles.clone();
            tokio::spawn(async move { throttles.admit("p", Class::Poll, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        dropped.abort();
        let _ = dropped.await;
        let started = tokio::time::Instant::now();
        assert_eq!(
            throttles.admit("p", Class::Poll, Duration::from_secs(5)).await,
            Admission::Go
        );
        assert!(
            started.elapsed() <= Duration::from_secs(1),
            "the next token was not given to the dropped waiter"
        );
    }

    #[tokio::test]
    async fn an_unknown_or_unlimited_profile_never_waits() {
        let mut throttles = Throttles::default();
        throttles.add("free", None, None);
        for _ in 0..100 {
            assert_eq!(
                throttles.admit("free", Class::Submit, Duration::ZERO).await,
                Admission::Go
            );
        }
        assert_eq!(
            throttles.admit("nobody", Class::Poll, Duration::ZERO).await,
            Admission::Go
        );
    }
}
