//! Hold gates: requests (and Dify streams) that wait until a test lets them
//! go, so that a test can act while a request is provably in flight.
//!
//! The knobs live in `Faults`; this module mirrors them into a `watch`
//! channel whenever the faults are replaced, so that every waiter is woken
//! at once when its gate opens, and keeps the number of waiters in a second
//! channel that `SimServer::wait_until_held` watches. Nothing here polls.

use tokio::sync::watch;

use super::faults::Faults;
use super::state::Shared;

/// Which gate a request or stream waits at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// chenyu `run/submit`, Dify `workflows/run`, GPTBots `invoke`.
    Submits,
    /// chenyu `run/info` and `run/execution`; Dify run detail, events and
    /// logs; GPTBots `query/result`.
    StatusChecks,
    /// Dify run streams, before `workflow_finished`.
    Streams,
    /// The answers of accepted uploads, after they were recorded.
    UploadAnswers,
}

/// Which gates are closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Closed {
    submits: bool,
    status_checks: bool,
    streams: bool,
    upload_answers: bool,
}

impl Closed {
    fn of(faults: &Faults) -> Closed {
        Closed {
            submits: faults.hold_submits,
            status_checks: faults.hold_status_checks,
            streams: faults.hold_streams,
            upload_answers: faults.hold_upload_answers,
        }
    }

    fn holds(self, gate: Gate) -> bool {
        match gate {
            Gate::Submits => self.submits,
            Gate::StatusChecks => self.status_checks,
            Gate::Streams => self.streams,
            Gate::UploadAnswers => self.upload_answers,
        }
    }
}

/// The gates' state and the number of waiters, outside the state mutex so
/// that waiting never holds it.
#[derive(Debug)]
pub(crate) struct Holds {
    closed: watch::Sender<Closed>,
    waiting: watch::Sender<u64>,
}

impl Holds {
    /// Every gate open, nobody waiting.
    pub(crate) fn new() -> Holds {
        Holds {
            closed: watch::Sender::new(Closed::default()),
            waiting: watch::Sender::new(0),
        }
    }

    /// Opens and closes the gates as `faults` say; waiters at a gate that
    /// opens are woken together.
    pub(crate) fn apply(&self, faults: &Faults) {
        let closed = Closed::of(faults);
        self.closed.send_if_modified(|current| {
            let changed = *current != closed;
            *current = closed;
            changed
        });
    }

    /// Whether `gate` is closed right now.
    pub(crate) fn is_closed(&self, gate: Gate) -> bool {
        self.closed.borrow().holds(gate)
    }

    /// Resolves once `gate` is open (at once when it is).
    pub(crate) async fn opened(&self, gate: Gate) {
        let mut closed = self.closed.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = closed.wait_for(|c| !c.holds(gate)).await;
    }

    /// Requests and streams waiting at a gate right now.
    pub(crate) fn waiting(&self) -> u64 {
        *self.waiting.borrow()
    }

    /// Resolves once at least `n` are waiting.
    pub(crate) async fn until_waiting(&self, n: u64) {
        let mut waiting = self.waiting.subscribe();
        let _ = waiting.wait_for(|w| *w >= n).await;
    }
}

/// One waiter, counted from `enter` until dropped: a request whose client
/// goes away stops counting with it.
#[derive(Debug)]
pub(crate) struct Waiter {
    waiting: watch::Sender<u64>,
}

impl Waiter {
    /// Counts a new waiter in the gauge and in `SimStats::held_total`.
    pub(crate) fn enter(shared: &Shared) -> Waiter {
        shared.lock().stats.held_total += 1;
        let waiting = shared.holds.waiting.clone();
        waiting.send_modify(|w| *w += 1);
        Waiter { waiting }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.waiting.send_modify(|w| *w = w.saturating_sub(1));
    }
}

/// Waits at `gate` while it is closed, counted as a waiter meanwhile.
pub(crate) async fn pass(shared: &Shared, gate: Gate) {
    if !shared.holds.is_closed(gate) {
        return;
    }
    let _waiter = Waiter::enter(shared);
    shared.holds.opened(gate).await;
}
