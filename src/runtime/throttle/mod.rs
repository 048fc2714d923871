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

use rate::Bucket;
pub use rate::{RateChange, RateControl};

/// How far ahead of the rate the claim loop takes a limited profile's runs:
/// enough that a request is always ready when a token is, little enough
/// that a claimed run never waits long with its lease.
const CLAIM_HORIZON: Duration = Duration::from_secs(2);

/// How soon the claim loop looks again at a profile whose slow-start window
/// is full (room comes with answers, which are not timed).
const ROOM_RECHECK: Duration = Duration::from_millis(50);

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
#[derive(Debug)]
pub enum Admission {
    /// Go ahead: a token is taken; the ticket is held until the answer.
    Go(Ticket),
    /// The profile's rate is taken for longer than the step can wait within
    /// its lease: give the run back, due again after this long.
    Defer(Duration),
}

impl Admission {
    /// Whether the step may go ahead.
    pub fn is_go(&self) -> bool {
        matches!(self, Admission::Go(_))
    }
}

/// What the answer to a request tells its profile's learned rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// No answer arrived (the request failed in transport): nothing to learn.
    Nothing,
    /// An answer with this HTTP status: a 429 is a refusal over the rate,
    /// anything else a request the rate let through.
    Status(u16),
    /// A refusal of the account (a balance, a quota, a cap on runs at
    /// once), whatever its status line: the provider's rate let the request
    /// through, so it counts as taken, never as over the rate. GPTBots and
    /// Dify refuse a cap on runs at once with HTTP 429, and sending slower
    /// does not lift a cap; the profile pauses instead.
    AccountRefused,
}

impl Answered {
    /// An answer with `http_status` (`None`: no answer arrived).
    pub fn status(http_status: Option<u16>) -> Self {
        http_status.map_or(Answered::Nothing, Answered::Status)
    }

    /// Whether the provider refused the request over its rate (`None`:
    /// nothing to learn).
    fn over_the_rate(self) -> Option<bool> {
        match self {
            Answered::Nothing => None,
            Answered::Status(status) => Some(status == 429),
            Answered::AccountRefused => Some(false),
        }
    }
}

/// A request's place in its profile's rate and in-flight window: held
/// until the request is answered, then told what the answer was
/// ([`Ticket::answered`]). Dropped unanswered (the step gave up before
/// sending), it frees its place in the window.
#[derive(Debug)]
#[must_use = "a ticket is held until its request is answered"]
pub struct Ticket {
    throttle: Option<Arc<ProfileThrottle>>,
    /// The rate's epoch when the request was let go.
    epoch: u64,
}

impl Ticket {
    /// A ticket of a profile without a throttle.
    fn free() -> Self {
        Ticket {
            throttle: None,
            epoch: 0,
        }
    }

    /// The request was answered (see [`Answered`]).
    pub fn answered(mut self, answer: Answered) {
        if let (Some(throttle), Some(over)) = (&self.throttle, answer.over_the_rate()) {
            throttle.learn(over, self.epoch);
        }
        self.release();
    }

    /// The request was not sent: its token goes back too.
    pub fn unused(mut self) {
        if let Some(throttle) = &self.throttle {
            let mut inner = throttle.lock();
            let rate = inner.control.rate();
            inner.bucket.refund(rate);
        }
        self.release();
    }

    fn release(&mut self) {
        if let Some(throttle) = self.throttle.take() {
            throttle.lock().in_flight -= 1;
            // A waiter held back by the in-flight window may go now.
            throttle.answered.notify_one();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

struct Inner {
    control: RateControl,
    bucket: Bucket,
    /// Waiters per class, in arrival order.
    /// A waiter is sent its ticket: a ticket the waiter no longer takes
    /// (it timed out between the send and its drop) is dropped with the
    /// channel and gives its place in flight back.
    queues: [VecDeque<oneshot::Sender<Ticket>>; 2],
    /// The class served next when both wait.
    turn: usize,
    /// A task hands out tokens to the queues.
    dispatching: bool,
    /// Requests sent and not answered yet (tickets held).
    in_flight: u32,
    /// Turns promised to deferred steps of each class run up to here: each
    /// deferral books its class's next turn after the queues and the turns
    /// booked before it.
    booked_until: [Option<Instant>; 2],
}

impl Inner {
    fn waiting(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Whether the slow start's in-flight window has room.
    fn room_in_flight(&self) -> bool {
        self.control
            .flight_cap()
            .is_none_or(|cap| self.in_flight < cap)
    }

    /// Takes a token and a place in flight if both are there.
    fn take(&mut self, now: Instant) -> bool {
        if !self.room_in_flight() {
            return false;
        }
        let rate = self.control.rate();
        if self.bucket.take(rate, now) {
            self.control.sent();
            self.in_flight += 1;
            true
        } else {
            false
        }
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

    /// See [`Throttles::claim_room`]: room while what waits in the queues
    /// is served within `horizon` (at most [`CLAIM_HORIZON`]) at the rate in force, or, while no
    /// rate is known, while fewer wait than the slow start lets fly. Turns
    /// booked by deferred steps do not count: their runs stay in the table
    /// until then, and the rate meanwhile is for whoever is due now.
    fn claim_room(&self, horizon: Duration) -> Option<Duration> {
        match (self.control.rate(), self.control.flight_cap()) {
            (Some(rate), _) => {
                let ahead = Duration::from_secs_f64(self.waiting() as f64 / rate);
                ahead
                    .checked_sub(horizon.min(CLAIM_HORIZON))
                    .filter(|over| !over.is_zero())
            }
            (None, Some(cap)) if self.waiting() >= cap as usize => Some(ROOM_RECHECK),
            (None, _) => None,
        }
    }

    /// Books a turn for a step that will not wait for one: the first turn
    /// after the queues and after every turn booked before, so that steps
    /// deferred together come back one turn apart, at the rate in force,
    /// instead of all at once after the same estimate (the rate would sit
    /// unused until then, and the whole backlog would collide again).
    /// Returns how long until that turn.
    ///
    /// Each class books at half the rate: the classes take turns when both
    /// have work, so a class's deferred steps come back at its share, and a
    /// backlog of one class booked far ahead never pushes the other's turns
    /// behind it.
    fn book(&mut self, class: Class, now: Instant) -> Duration {
        let Some(rate) = self.control.rate() else {
            return Duration::ZERO;
        };
        let queued = now + self.expected_wait(class);
        let booked = &mut self.booked_until[class.index()];
        let start = booked.map_or(queued, |until| until.max(queued));
        *booked = Some(start + Duration::from_secs_f64(2.0 / rate));
        start.saturating_duration_since(now)
    }
}

/// One profile's throttle.
#[derive(Debug)]
struct ProfileThrottle {
    /// The profile's name, for the log.
    name: String,
    inner: Mutex<Inner>,
    submits: Option<Arc<Semaphore>>,
    /// Woken by every answer (a place in flight came free).
    answered: tokio::sync::Notify,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("rate", &self.control.rate())
            .field("in_flight", &self.in_flight)
            .field("waiting", &self.waiting())
            .finish()
    }
}

impl ProfileThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A few numbers and queues, each update complete: poison is harmless.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Learns from an answer: `over`, the provider refused it over its rate.
    fn learn(&self, over: bool, epoch: u64) {
        let change = {
            let mut inner = self.lock();
            let now = now();
            let change = inner.control.observe(over, epoch, now);
            tracing::trace!(profile = %self.name, over, epoch, in_flight = inner.in_flight, cap = ?inner.control.flight_cap(), rate = ?inner.control.rate(), "answer");
            if matches!(change, Some(RateChange::Cut(_))) {
                // No burst right after a cut.
                inner.bucket.drain(now);
            }
            change
        };
        log_change(&self.name, change);
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
            if !inner.room_in_flight() {
                // The slow start's window is full: an answer frees a place.
                None
            } else {
                let rate = inner.control.rate();
                let wait = inner.bucket.wait(rate, now);
                if wait.is_zero() {
                    inner.take(now);
                    let class = inner.next_class().expect("someone waits");
                    let ticket = Ticket {
                        throttle: Some(throttle.clone()),
                        epoch: inner.control.epoch(),
                    };
                    if let Some(tx) = inner.queues[class].pop_front()
                        && let Err(mut ticket) = tx.send(ticket)
                    {
                        // It gave up just now: its place goes back, here,
                        // under the lock the ticket's own drop would take.
                        ticket.throttle = None;
                        inner.in_flight -= 1;
                        let rate = inner.control.rate();
                        inner.bucket.refund(rate);
                    }
                    continue;
                }
                Some(wait)
            }
        };
        match pause {
            Some(wait) => tokio::time::sleep(wait).await,
            // Bounded: a waiter whose step gave up is dropped meanwhile.
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(1), throttle.answered.notified())
                    .await;
            }
        }
    }
}

/// Logs what an answer changed.
fn log_change(profile: &str, change: Option<RateChange>) {
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
            tracing::debug!(
                profile,
                rate = format!("{rate:.2}/s"),
                "probing for a higher limit"
            )
        }
        None => {}
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
                name: profile.to_owned(),
                inner: Mutex::new(Inner {
                    control: RateControl::new(rate, now),
                    bucket: Bucket::new(now),
                    queues: [VecDeque::new(), VecDeque::new()],
                    turn: 0,
                    dispatching: false,
                    in_flight: 0,
                    booked_until: [None, None],
                }),
                submits: max_submits.map(|n| Arc::new(Semaphore::new(n))),
                answered: tokio::sync::Notify::new(),
            }),
        );
    }

    /// Waits for a request token of `profile` for a request of `class`, up
    /// to `max_wait`; when the turn would come later, returns at once with
    /// `Defer` (and how long until then). Cancel-safe: a step dropped while
    /// it waits takes nothing from the others.
    pub async fn admit(&self, profile: &str, class: Class, max_wait: Duration) -> Admission {
        let Some(throttle) = self.profiles.get(profile) else {
            return Admission::Go(Ticket::free());
        };
        let ticket = |epoch| Ticket {
            throttle: Some(throttle.clone()),
            epoch,
        };
        let granted = {
            let mut inner = throttle.lock();
            let now = now();
            if inner.waiting() == 0 && inner.take(now) {
                return Admission::Go(ticket(inner.control.epoch()));
            }
            // Only the queue counts here, not the turns booked by deferred
            // steps: those runs are in the table until their turn, and a
            // turn nobody claims now would go unused.
            if inner.expected_wait(class) > max_wait {
                return Admission::Defer(inner.book(class, now));
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
            Ok(Ok(ticket)) => Admission::Go(ticket),
            // The rate fell while it waited: come back at a turn of its own.
            _ => Admission::Defer(throttle.lock().book(class, now())),
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

    /// Learns from the answer to a request made beside a ticket's (a stop
    /// request before a status check).
    pub fn observe(&self, profile: &str, answer: Answered) {
        let (Some(over), Some(throttle)) = (answer.over_the_rate(), self.profiles.get(profile))
        else {
            return;
        };
        let epoch = throttle.lock().control.epoch();
        throttle.learn(over, epoch);
    }

    /// Whether the claim loop should take more runs of `profile` now:
    /// `None` when it should, else about how long until it should. A run
    /// claimed beyond what the rate serves soon would only wait in a queue
    /// with its lease running down, then be given back (a write each); left
    /// in the table it keeps its place in due order, and a rate found
    /// higher later is used at once.
    ///
    /// `horizon`: how much of the rate's time may wait in the queues (the
    /// claim loop keeps it below what a step may wait within its lease, so
    /// that claimed runs go, not come back deferred).
    pub fn claim_room(&self, profile: &str, horizon: Duration) -> Option<Duration> {
        let throttle = self.profiles.get(profile)?;
        let inner = throttle.lock();
        inner.claim_room(horizon)
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
    use super::rate::INITIAL_FLIGHT;
    use super::*;

    /// A profile limited to `rate` per second, as if learned.
    fn limited(rate: f64) -> Throttles {
        let mut throttles = Throttles::default();
        throttles.add("p", Some(rate), None);
        throttles
    }

    async fn go(throttles: &Throttles, class: Class, max_wait: Duration) -> bool {
        throttles.admit("p", class, max_wait).await.is_go()
    }

    #[tokio::test(start_paused = true)]
    async fn submits_and_status_checks_take_turns_under_a_limit() {
        let throttles = Arc::new(limited(10.0));
        // The first token goes at once.
        assert!(go(&throttles, Class::Poll, Duration::from_secs(60)).await);
        // A backlog of status checks, then submits arriving behind it.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (class, count) in [(Class::Poll, 20), (Class::Submit, 5)] {
            for _ in 0..count {
                let (throttles, tx) = (throttles.clone(), tx.clone());
                tasks.push(tokio::spawn(async move {
                    let admitted = go(&throttles, class, Duration::from_secs(60)).await;
                    let _ = tx.send((class, admitted));
                }));
                tokio::task::yield_now().await;
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        drop(tx);
        let mut order = Vec::new();
        while let Some((class, admitted)) = rx.recv().await {
            assert!(admitted);
            order.push(class);
        }
        // The five submits are among the first grants, not after all twenty
        // status checks.
        let last_submit = order.iter().rposition(|c| *c == Class::Submit).unwrap();
        assert!(last_submit < 11, "{order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_beyond_the_wait_is_deferred_at_once_with_its_time() {
        let throttles = Arc::new(limited(1.0));
        assert!(go(&throttles, Class::Submit, Duration::from_secs(2)).await);
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let throttles = throttles.clone();
                tokio::spawn(
                    async move { go(&throttles, Class::Submit, Duration::from_secs(5)).await },
                )
            })
            .collect();
        tokio::task::yield_now().await;
        // Two are queued (a second each): the third would wait three.
        match throttles
            .admit("p", Class::Submit, Duration::from_secs(2))
            .await
        {
            Admission::Defer(wait) => assert_eq!(wait, Duration::from_secs(3)),
            other => panic!("{other:?}"),
        }
        for w in waiting {
            assert!(w.await.unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn steps_deferred_together_get_turns_one_period_apart() {
        let throttles = Arc::new(limited(2.0));
        assert!(go(&throttles, Class::Submit, Duration::from_secs(1)).await);
        // Two wait their turn (half a second each) ...
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let throttles = throttles.clone();
                tokio::spawn(
                    async move { go(&throttles, Class::Submit, Duration::from_secs(5)).await },
                )
            })
            .collect();
        tokio::task::yield_now().await;
        // ... and the next four, which cannot wait a second, are each given
        // a turn of their own after the queue, at their class's half of the
        // rate: a second apart.
        let mut waits = Vec::new();
        for _ in 0..4 {
            match throttles
                .admit("p", Class::Submit, Duration::from_millis(1000))
                .await
            {
                Admission::Defer(wait) => waits.push(wait.as_millis()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits, vec![1500, 2500, 3500, 4500]);
        for w in waiting {
            assert!(w.await.unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_that_time_out_together_come_back_turns_apart() {
        let throttles = Arc::new(limited(1.0));
        assert!(go(&throttles, Class::Poll, Duration::from_secs(1)).await);
        // Three wait up to 1.5 s at one per second: one is let through, two
        // time out at the same moment and are given different turns.
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let throttles = throttles.clone();
                tokio::spawn(async move {
                    throttles
                        .admit("p", Class::Poll, Duration::from_millis(1500))
                        .await
                })
            })
            .collect();
        let mut deferred = Vec::new();
        let mut went = 0;
        for task in tasks {
            match task.await.unwrap() {
                Admission::Go(_) => went += 1,
                Admission::Defer(wait) => deferred.push(wait),
            }
        }
        assert_eq!(went, 1);
        deferred.sort();
        assert_eq!(deferred.len(), 2);
        // Apart by their class's share of the rate (half of one per second).
        assert_eq!(
            deferred[1] - deferred[0],
            Duration::from_secs(2),
            "{deferred:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_is_dropped_takes_no_token() {
        let throttles = Arc::new(limited(1.0));
        assert!(go(&throttles, Class::Poll, Duration::from_secs(5)).await);
        let dropped = {
            let throttles = throttles.clone();
            tokio::spawn(async move { go(&throttles, Class::Poll, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        dropped.abort();
        let _ = dropped.await;
        let started = tokio::time::Instant::now();
        assert!(go(&throttles, Class::Poll, Duration::from_secs(5)).await);
        assert!(
            started.elapsed() <= Duration::from_secs(1),
            "the next token was not given to the dropped waiter"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_limit_starts_with_a_small_window_in_flight() {
        let mut throttles = Throttles::default();
        throttles.add("p", None, None);
        // Sixteen go at once; the seventeenth waits for an answer.
        let mut tickets = Vec::new();
        for _ in 0..INITIAL_FLIGHT as usize {
            match throttles
                .admit("p", Class::Submit, Duration::from_secs(5))
                .await
            {
                Admission::Go(ticket) => tickets.push(ticket),
                other => panic!("{other:?}"),
            }
        }
        let throttles = Arc::new(throttles);
        let next = {
            let throttles = throttles.clone();
            tokio::spawn(async move { go(&throttles, Class::Submit, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "the window is full");
        // One clean answer frees a place and widens the window.
        tickets.pop().unwrap().answered(Answered::Status(200));
        assert!(next.await.unwrap());
        assert!(go(&throttles, Class::Submit, Duration::from_secs(5)).await);
    }

    /// Refusals of the account come with HTTP 429 from GPTBots and Dify (a
    /// cap on runs at once): answered as such, they never cut the rate,
    /// where the same number of rate refusals does.
    #[tokio::test(start_paused = true)]
    async fn an_account_refusal_does_not_cut_the_rate() {
        for (answer, cut) in [
            (Answered::AccountRefused, false),
            (Answered::Status(429), true),
        ] {
            for configured in [None, Some(20.0)] {
                let mut throttles = Throttles::default();
                throttles.add("p", configured, None);
                for _ in 0..40 {
                    let Admission::Go(ticket) = throttles
                        .admit("p", Class::Submit, Duration::from_secs(60))
                        .await
                    else {
                        panic!("deferred");
                    };
                    tokio::time::advance(Duration::from_millis(50)).await;
                    ticket.answered(answer);
                }
                let rate = throttles.current_rate("p");
                assert_eq!(
                    rate != configured,
                    cut,
                    "{answer:?} with {configured:?} per second: the rate is {rate:?}"
                );
                if !cut {
                    assert_eq!(throttles.stray_share("p"), 0.0);
                }
            }
        }
    }

    #[tokio::test]
    async fn an_unknown_profile_never_waits() {
        let throttles = Throttles::default();
        for _ in 0..100 {
            assert!(
                throttles
                    .admit("nobody", Class::Poll, Duration::ZERO)
                    .await
                    .is_go()
            );
        }
    }
}
