//! The rate a profile sends at, learned from the provider's answers: pure,
//! driven by a clock it is given, so the control law is tested against a
//! modelled provider with a fake clock.
//!
//! The law. Answers are counted in windows of about a second (at least
//! [`MIN_ANSWERS`]); at the end of each:
//!
//! - **Over a limit** (more refused than the provider refuses whatever the
//!   rate, by [`TOLERANCE`]): the rate becomes what the provider *accepted*
//!   in that window. A provider's limit is exactly the rate it accepts while
//!   we ask for more, so this lands on the limit in one step, where halving
//!   (AIMD) undershoots it and needs many steps back.
//! - **Is it a limit?** The next window checks the cut: refusals that a
//!   slower rate does not reduce (a busy pool answering 429 to a share of
//!   all requests) are not a limit. Then the cut is undone and that share is
//!   remembered as the provider's stray refusals, which later windows
//!   tolerate; the refused requests themselves just wait their own
//!   `Retry-After`.
//! - **Probe the ceiling** while the rate is what holds requests back and
//!   the provider refuses nothing more than its strays: +1 %, then a step
//!   that doubles with every clean window (capped at +50 %), as TCP's slow
//!   start does after a loss. The first steps keep the steady state within
//!   a few percent of the limit (a few refusals per cycle, below 5 %); the
//!   doubling finds a raised limit within seconds (x1.8 in six windows).
//! - **Slow start** while no limit is known: at most [`INITIAL_FLIGHT`]
//!   requests in flight, one more per clean answer (as TCP's slow start)
//!   but at most doubling per [`FLIGHT_PERIOD`] (answers on loopback come
//!   back in microseconds), until the first [`FIRST_REFUSALS`] refusals
//!   show the limit or the window passes [`MAX_FLIGHT`] (then nothing
//!   limits the profile). A worker that claims a hundred runs at once
//!   against a limit of 5/s sends a few, not a hundred that would almost
//!   all be refused.
//! - A configured `requests_per_second` is a hard ceiling throughout.
//!
//! Measured against a modelled provider (tests below): goodput above 95 %
//! of limits from 5 to 500 per second with 2-3 % refused, a halved limit
//! found within 2 s, a restored one within 8 s; the old law (halve on a 429,
//! add a fiftieth of a ceiling per answer) averaged 16x the limit at 20/s
//! and 94 % of its requests refused.

use std::time::{Duration, Instant};

/// The slowest a learned rate goes (requests per second).
pub const MIN_RATE: f64 = 0.2;
/// Requests in flight at first while no limit is known.
pub const INITIAL_FLIGHT: f64 = 4.0;
/// The slow start's window doubles at most once in this long.
const FLIGHT_PERIOD: Duration = Duration::from_millis(100);
/// Past this many in flight without a refusal, no limit is looked for.
const MAX_FLIGHT: f64 = 1024.0;
/// While no limit is known, this many refusals in a row end the window at
/// once: a limit refuses everything once its burst is spent, while a busy
/// pool's stray refusals come between answered requests.
const FIRST_REFUSALS: u32 = 4;
/// A window ends after this long, once it has [`MIN_ANSWERS`] answers.
const WINDOW: Duration = Duration::from_secs(1);
/// Fewer answers than this say little about a refusal share (at 5/s a
/// window lasts two seconds).
const MIN_ANSWERS: u32 = 8;
/// ...but no window outlasts this.
const MAX_WINDOW: Duration = Duration::from_secs(4);
/// Refused share above the stray share that means "over a limit".
const TOLERANCE: f64 = 0.015;
/// A window with this many refusals making up half its answers ends at
/// once: a limit just fell (or was never known), and every request sent
/// until the window's end would be refused too.
const FAST_REFUSED: u32 = 16;
/// Strays are told from a limit only on this many answers: at a few
/// requests per second one refusal more or less is half the share.
const STRAY_EVIDENCE: u32 = 40;
/// A cut lands this far below what the provider accepted: the provider's
/// bucket refills a little, so the next probe's first steps are absorbed
/// instead of refused, and a burst the provider let through is not taken
/// for its rate.
const CUT_MARGIN: f64 = 0.98;
/// A refused share this high is never taken for strays.
const MAX_STRAY: f64 = 0.25;
/// The first probe step above a found limit, and the largest.
const FIRST_PROBE: f64 = 0.01;
const MAX_PROBE: f64 = 0.5;
/// The probe streak a first limit starts from (+8 % for the first probe).
const FIRST_LIMIT_STREAK: u32 = 3;
/// The rate counts as what held requests back when they were sent at
/// least this close to it.
const BOUND: f64 = 0.95;

/// Answers counted since the window began.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    answered: u32,
    refused: u32,
    /// Refusals since the last answered request.
    refused_in_a_row: u32,
    /// When the first refusal came, and what was accepted from then on:
    /// once a limiter refuses, its burst is spent and what it accepts is
    /// its rate, where the whole window's count includes the burst.
    first_refusal: Option<Instant>,
    accepted_since_refusal: u32,
}

impl Window {
    fn new(start: Instant) -> Self {
        Window {
            start,
            answered: 0,
            refused: 0,
            refused_in_a_row: 0,
            first_refusal: None,
            accepted_since_refusal: 0,
        }
    }
}

/// The shortest span after a first refusal whose accepted count is taken
/// for the provider's rate.
const MEASURED_SPAN: Duration = Duration::from_millis(250);

/// A cut whose effect the next window checks, at [`TRIAL_DEPTH`] of the
/// rate found: under a limit that rate is clean, while strays are refused
/// there as much as anywhere.
#[derive(Debug, Clone, Copy)]
struct Trial {
    /// The rate before the cut.
    previous: Option<f64>,
    /// The slow start's window before the cut, given back with an unknown
    /// rate if the refusals turn out to be strays: an unknown limit is
    /// still approached gradually, never with everything at once.
    previous_flight: Option<f64>,
    /// The refused share that made it.
    share: f64,
    /// The rate found, set once the check passes.
    found: f64,
}

/// A window sent at less than this share of the rate in force was held
/// back by the work at hand, not by the rate.
const DEMAND_BOUND: f64 = 0.8;

/// Whether `refused` of `answered` is more than the provider's stray share
/// explains: above the share by [`TOLERANCE`] and, once strays are known,
/// at least two refusals beyond two standard deviations of what the strays
/// would give (a small window with one stray more is noise). Without
/// strays, any refusal over the tolerance counts: a limit at a few
/// requests per second shows one refusal per window at a time.
fn significant(answered: u32, refused: u32, stray: f64) -> bool {
    let n = f64::from(answered.max(1));
    let k = f64::from(refused);
    if stray <= 0.0 {
        return refused >= 1 && k / n > TOLERANCE;
    }
    let spread = 2.0 * (n * stray * (1.0 - stray)).sqrt();
    refused >= 2 && k / n > stray + TOLERANCE && k > n * stray + spread
}

/// How far below the rate found a cut is checked. Deep enough that a rate
/// found a little high (a provider's burst counted in the first window)
/// is still clean there under a limit; otherwise the limit's refusals at
/// the trial rate look like strays and the cut is undone.
const TRIAL_DEPTH: f64 = 0.9;

/// What a window decided, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateChange {
    /// Over a limit: the rate is now what the provider accepted.
    Cut(f64),
    /// The refusals did not follow the rate: a cut undone, this share is
    /// tolerated from now on.
    Strays(f64),
    /// Probing above the limit found so far.
    Probe(f64),
}

/// The learned rate of one provider profile.
#[derive(Debug, Clone)]
pub struct RateControl {
    configured: Option<f64>,
    /// The rate in force; `None` is unlimited.
    limit: Option<f64>,
    window: Window,
    /// Requests sent in the window (tokens granted).
    sent: u32,
    trial: Option<Trial>,
    /// Clean windows in a row at the rate: the probe step doubles with each.
    streak: u32,
    /// The share of requests the provider refuses whatever the rate.
    stray: f64,
    /// A limit or strays have been seen: runs of refusals no longer end a
    /// window at once (strays come in runs, now and then).
    known: bool,
    /// While no limit is known: the most requests in flight (slow start),
    /// and what it was when its current doubling period began.
    flight: Option<f64>,
    flight_base: f64,
    flight_since: Instant,
    /// The most the provider accepted per second in a clean window since
    /// the last cut: a floor for a cut made in a window cut short by a flood
    /// of refusals (which measures almost nothing: the provider's bucket was
    /// already empty), and the rate below which refusals are not ours.
    last_accepted: Option<f64>,
    /// Bumped by every cut: answers to requests sent before it say nothing
    /// about the new rate (they were sent at the old one), so they cannot
    /// make a second cut.
    epoch: u64,
}

impl RateControl {
    /// A profile with `configured` requests per second (`None`: unlimited
    /// until the provider says otherwise).
    pub fn new(configured: Option<f64>, now: Instant) -> Self {
        RateControl {
            configured,
            limit: configured,
            window: Window::new(now),
            sent: 0,
            trial: None,
            streak: 0,
            stray: 0.0,
            known: configured.is_some(),
            flight: configured.is_none().then_some(INITIAL_FLIGHT),
            flight_base: INITIAL_FLIGHT,
            flight_since: now,
            last_accepted: None,
            epoch: 0,
        }
    }

    /// The current epoch, to be handed back with the answer of a request
    /// sent now.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The most requests in flight now (`None`: no such cap).
    pub fn flight_cap(&self) -> Option<u32> {
        self.flight.map(|f| f as u32)
    }

    /// The rate in force (`None`: unlimited).
    pub fn rate(&self) -> Option<f64> {
        self.limit
    }

    /// The provider's stray refusal share learned so far.
    pub fn stray_share(&self) -> f64 {
        self.stray
    }

    /// A request was sent (a token granted).
    pub fn sent(&mut self) {
        self.sent = self.sent.saturating_add(1);
    }

    /// An answer to a request sent in `epoch`: `refused` when the provider
    /// said 429.
    pub fn observe(&mut self, refused: bool, epoch: u64, now: Instant) -> Option<RateChange> {
        if epoch < self.epoch {
            return None;
        }
        if !refused && let Some(flight) = self.flight {
            if now.saturating_duration_since(self.flight_since) >= FLIGHT_PERIOD {
                self.flight_base = flight;
                self.flight_since = now;
            }
            let grown = (flight + 1.0).min(self.flight_base * 2.0);
            self.flight = (grown < MAX_FLIGHT).then_some(grown);
        }
        self.window.answered += 1;
        if refused {
            self.window.refused += 1;
            self.window.refused_in_a_row += 1;
            self.window.first_refusal.get_or_insert(now);
        } else {
            self.window.refused_in_a_row = 0;
            if self.window.first_refusal.is_some() {
                self.window.accepted_since_refusal += 1;
            }
        }
        let age = now.saturating_duration_since(self.window.start);
        let flooded = match self.known {
            false => self.window.refused_in_a_row >= FIRST_REFUSALS,
            true => {
                self.window.refused >= FAST_REFUSED
                    && self.window.refused * 2 >= self.window.answered
            }
        };
        // A window that checks a cut needs answers enough to tell strays
        // from a limit.
        let enough = match self.trial {
            Some(_) => STRAY_EVIDENCE,
            None => MIN_ANSWERS,
        };
        if (age >= WINDOW && self.window.answered >= enough) || age >= MAX_WINDOW || flooded {
            return self.close_window(now, flooded);
        }
        None
    }

    fn clamp(&self, rate: f64) -> f64 {
        let rate = rate.max(MIN_RATE);
        self.configured.map_or(rate, |c| rate.min(c))
    }

    /// Follows the stray share of clean windows (a moving average), so that
    /// it tracks a busy pool's refusals and fades once they stop, and an old
    /// share cannot hide a limit for ever.
    fn follow_strays(&mut self, share: f64) {
        if self.stray > 0.0 {
            self.stray = 0.9 * self.stray + 0.1 * share;
        }
    }

    /// Ends the window; `flooded`: it ended early on a run of refusals,
    /// which is a limit whatever the share.
    fn close_window(&mut self, now: Instant, flooded: bool) -> Option<RateChange> {
        let Window {
            start,
            answered,
            refused,
            first_refusal,
            accepted_since_refusal,
            ..
        } = self.window;
        // A window cut short by a flood still counts as a second: what the
        // provider accepted in it is about one second's budget (its burst).
        let seconds = now
            .saturating_duration_since(start)
            .as_secs_f64()
            .max(WINDOW.as_secs_f64());
        let sent = self.sent;
        self.window = Window::new(now);
        self.sent = 0;
        let share = f64::from(refused) / f64::from(answered.max(1));
        let accepted = match first_refusal.map(|at| now.saturating_duration_since(at)) {
            Some(span) if span >= MEASURED_SPAN => {
                f64::from(accepted_since_refusal) / span.as_secs_f64()
            }
            _ => f64::from(answered - refused) / seconds,
        };
        let over = flooded || significant(answered, refused, self.stray);
        let sent_rate = f64::from(sent) / seconds;
        let floor = self.last_accepted;
        if !over {
            // What the provider took cleanly: a rate it has shown it accepts.
            let clean = f64::from(answered - refused) / seconds;
            self.last_accepted = Some(floor.map_or(clean, |f| f.max(clean)));
        }
        // Refusals while sending well below our own rate and below what the
        // provider has cleanly taken: our rate did not cause them (a busy
        // pool refusing a share of everything). Taken for a limit, they
        // would cut the rate to the little that was asked (accepted is
        // what was asked, not what is allowed) and starve the profile. A
        // lowered limit still shows: it refuses more than `MAX_STRAY`.
        if over && !flooded && self.trial.is_none() && share < MAX_STRAY {
            let below_own = self
                .limit
                .is_none_or(|limit| sent_rate < DEMAND_BOUND * limit);
            let below_proven = floor.is_some_and(|proven| sent_rate <= DEMAND_BOUND * proven);
            // Strays already known explain refusals at a rate we are not
            // pushing, even before a clean window proved a rate.
            if below_own && (below_proven || self.stray > 0.0) {
                self.stray = if self.stray > 0.0 {
                    0.7 * self.stray + 0.3 * share
                } else {
                    share
                };
                self.known = true;
                self.streak = 0;
                return Some(RateChange::Strays(self.stray));
            }
        }
        if let Some(trial) = self.trial.take() {
            if over && answered >= STRAY_EVIDENCE && share < MAX_STRAY && share >= trial.share * 0.5
            {
                // A slower rate refused as many: not a limit. What it
                // accepted was taken despite the strays: a proven rate.
                let taken = f64::from(answered - refused) / seconds;
                self.last_accepted = Some(floor.map_or(taken, |f| f.max(taken)));
                self.limit = trial.previous;
                if trial.previous.is_none() {
                    self.flight = trial.previous_flight;
                }
                self.stray = share;
                self.streak = 0;
                self.known = true;
                return Some(RateChange::Strays(share));
            }
            if !over {
                // Clean below the rate found: it was a limit. A first limit
                // was measured in a short, bursty window (a flood of
                // refusals right after the slow start), so it may be well
                // below the real one: probe from a larger first step.
                self.limit = Some(trial.found);
                if trial.previous.is_none() {
                    self.streak = FIRST_LIMIT_STREAK;
                }
                return Some(RateChange::Cut(trial.found));
            }
            // Refused even there: the limit is lower still (cut below).
        }
        if over {
            // At most half in one window: a window cut short by a flood
            // right after a change can under-count what the provider takes.
            // A flood's short window measures almost nothing: what a full
            // window accepted before is the better guess of the limit.
            let accepted = match (flooded, floor) {
                (true, Some(floor)) => accepted.max(floor),
                _ => accepted,
            };
            let found = self.clamp(match self.limit {
                Some(limit) => (accepted * CUT_MARGIN).clamp(limit / 2.0, limit),
                None => accepted * CUT_MARGIN,
            });
            self.trial = Some(Trial {
                previous: self.limit,
                previous_flight: self.flight,
                share,
                found,
            });
            self.limit = Some(self.clamp(found * TRIAL_DEPTH));
            // Clean rates seen before a cut no longer prove anything.
            self.last_accepted = None;
            self.flight = None;
            self.known = true;
            self.epoch += 1;
            self.streak = 0;
            return Some(RateChange::Cut(found));
        }
        let bound = self
            .limit
            .is_some_and(|limit| f64::from(sent) / seconds >= BOUND * limit);
        match self.limit {
            Some(limit) if bound && self.configured.is_none_or(|c| limit < c) => {
                self.follow_strays(share);
                let step = (FIRST_PROBE * f64::from(1u32 << self.streak.min(16))).min(MAX_PROBE);
                self.streak += 1;
                let probed = self.clamp(limit * (1.0 + step));
                self.limit = Some(probed);
                Some(RateChange::Probe(probed))
            }
            _ => {
                self.streak = 0;
                self.follow_strays(share);
                None
            }
        }
    }
}

/// Tokens at the rate in force, with a small burst: requests go out evenly,
/// as a provider's own limiter wants them.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(now: Instant) -> Self {
        Bucket {
            tokens: 1.0,
            refilled: now,
        }
    }

    fn burst(rate: f64) -> f64 {
        (rate / 10.0).max(1.0)
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(Self::burst(rate));
        self.refilled = now;
    }

    /// How long until a token is there at `rate` (`None`: unlimited, now).
    pub fn wait(&mut self, rate: Option<f64>, now: Instant) -> Duration {
        let Some(rate) = rate else {
            self.tokens = 1.0;
            self.refilled = now;
            return Duration::ZERO;
        };
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / rate)
        }
    }

    /// Takes a token if one is there.
    pub fn take(&mut self, rate: Option<f64>, now: Instant) -> bool {
        if self.wait(rate, now).is_zero() {
            if rate.is_some() {
                self.tokens -= 1.0;
            }
            true
        } else {
            false
        }
    }

    /// Empties the bucket: no burst right after the rate was cut.
    pub fn drain(&mut self, now: Instant) {
        self.tokens = 0.0;
        self.refilled = now;
    }

    /// Gives back a token that was taken but not used.
    pub fn refund(&mut self, rate: Option<f64>) {
        if let Some(rate) = rate {
            self.tokens = (self.tokens + 1.0).min(Self::burst(rate));
        }
    }
}

#[cfg(test)]
mod tests;
