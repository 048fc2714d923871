//! The control law against a modelled provider, on a fake clock: a token
//! bucket of `limit` per second with one second of burst (as the simulator
//! and most API gateways enforce it), optionally refusing a share of all
//! requests whatever the rate, and a worker with more work than the limit
//! allows (every token it gets is used at once).

use super::*;

/// The worker's own top speed when nothing limits it (requests per second).
const WORKER_SPEED: f64 = 5_000.0;

struct Provider {
    /// Requests per second; `None`: no limit.
    limit: Option<f64>,
    tokens: f64,
    refilled: Duration,
    /// Share of requests refused whatever the rate.
    stray: f64,
    rng: fastrand::Rng,
}

impl Provider {
    fn new(limit: Option<f64>, stray: f64) -> Self {
        Provider {
            limit,
            tokens: limit.unwrap_or(0.0),
            refilled: Duration::ZERO,
            stray,
            rng: fastrand::Rng::with_seed(7),
        }
    }

    /// Whether the request sent at `at` is refused.
    fn refuses(&mut self, at: Duration) -> bool {
        if self.stray > 0.0 && self.rng.f64() < self.stray {
            return true;
        }
        let Some(limit) = self.limit else {
            return false;
        };
        let elapsed = (at - self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit).min(limit.max(1.0));
        self.refilled = at;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            false
        } else {
            true
        }
    }
}

/// What happened in one second of model time.
#[derive(Debug, Clone, Copy, Default)]
struct Second {
    answered: u32,
    refused: u32,
    rate_sum: f64,
    rate_n: u32,
}

struct Model {
    t0: Instant,
    control: RateControl,
    bucket: Bucket,
    provider: Provider,
    seconds: Vec<Second>,
    at: Duration,
    changes: Vec<RateChange>,
    /// The work at hand: requests per second the worker has to send.
    speed: f64,
}

impl Model {
    fn new(configured: Option<f64>, provider: Provider) -> Self {
        let t0 = Instant::now();
        Model {
            t0,
            control: RateControl::new(configured, t0),
            bucket: Bucket::new(t0),
            provider,
            seconds: Vec::new(),
            at: Duration::ZERO,
            changes: Vec::new(),
            speed: WORKER_SPEED,
        }
    }

    /// Sends as fast as the bucket allows until `until`.
    fn run_until(&mut self, until: Duration) {
        let step = Duration::from_secs_f64(1.0 / self.speed);
        while self.at < until {
            let now = self.t0 + self.at;
            let rate = self.control.rate();
            if !self.bucket.take(rate, now) {
                self.at += self.bucket.wait(rate, now).max(Duration::from_micros(1));
                continue;
            }
            self.control.sent();
            let refused = self.provider.refuses(self.at);
            let second = self.at.as_secs() as usize;
            if self.seconds.len() <= second {
                self.seconds.resize(second + 1, Second::default());
            }
            let s = &mut self.seconds[second];
            s.answered += 1;
            s.refused += u32::from(refused);
            s.rate_sum += rate.unwrap_or(WORKER_SPEED).min(WORKER_SPEED);
            s.rate_n += 1;
            let epoch = self.control.epoch();
            if let Some(change) = self.control.observe(refused, epoch, now) {
                if matches!(change, RateChange::Cut(_)) {
                    self.bucket.drain(now);
                }
                self.changes.push(change);
            }
            self.at += step;
        }
    }

    /// Accepted per second and refused share over whole seconds `from..to`.
    fn over(&self, from: usize, to: usize) -> (f64, f64) {
        let seconds = &self.seconds[from..to.min(self.seconds.len())];
        let answered: u32 = seconds.iter().map(|s| s.answered).sum();
        let refused: u32 = seconds.iter().map(|s| s.refused).sum();
        (
            f64::from(answered - refused) / seconds.len() as f64,
            f64::from(refused) / f64::from(answered.max(1)),
        )
    }

    /// The first second at or after `from` whose goodput reaches `level`.
    fn reaches(&self, from: usize, level: f64) -> Option<usize> {
        (from..self.seconds.len())
            .find(|&s| f64::from(self.seconds[s].answered - self.seconds[s].refused) >= level)
            .map(|s| s + 1 - from)
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn a_limit_from_5_to_500_per_second_is_used_with_few_refusals() {
    for limit in [5.0, 20.0, 100.0, 500.0] {
        let mut model = Model::new(None, Provider::new(Some(limit), 0.0));
        model.run_until(secs(60));
        // After the first seconds spent finding the limit.
        let (goodput, refused) = model.over(5, 60);
        let (_, refused_all) = model.over(0, 60);
        println!(
            "model: limit {limit}/s: goodput {:.1}% of it, refused {:.2}% ({:.2}% with the first seconds)",
            100.0 * goodput / limit,
            100.0 * refused,
            100.0 * refused_all
        );
        assert!(
            goodput >= 0.9 * limit,
            "limit {limit}: goodput {goodput:.1}/s"
        );
        assert!(
            refused <= 0.05,
            "limit {limit}: {:.1}% refused",
            refused * 100.0
        );
        assert!(
            refused_all <= 0.1,
            "limit {limit}: {:.1}% refused, first seconds included",
            refused_all * 100.0
        );
    }
}

#[test]
fn a_halved_limit_is_found_and_a_restored_one_used_again_within_seconds() {
    let mut model = Model::new(None, Provider::new(Some(100.0), 0.0));
    model.run_until(secs(20));
    model.provider.limit = Some(50.0);
    model.run_until(secs(40));
    model.provider.limit = Some(100.0);
    model.run_until(secs(60));
    let halved = model
        .reaches(20, 45.0)
        .expect("goodput back at the halved limit");
    // Under the halved limit, goodput stays up and refusals settle.
    let (goodput, refused) = model.over(22, 40);
    assert!(goodput >= 45.0 && refused <= 0.05, "{goodput} {refused}");
    let restored = model
        .reaches(40, 90.0)
        .expect("goodput back at the restored limit");
    println!("model: halved limit found in {halved} s, restored limit used in {restored} s");
    assert!(halved <= 10 && restored <= 10, "{halved} s, {restored} s");
    let (goodput, refused) = model.over(50, 60);
    assert!(goodput >= 90.0 && refused <= 0.05, "{goodput} {refused}");
}

#[test]
fn stray_refusals_do_not_cut_the_rate_for_good() {
    // 5 % refused whatever the rate: at most one cut, undone at the next
    // window, then the rate stays unlimited.
    let mut model = Model::new(None, Provider::new(None, 0.05));
    model.run_until(secs(30));
    assert_eq!(model.control.rate(), None, "{:?}", model.changes);
    let cuts = model
        .changes
        .iter()
        .filter(|c| matches!(c, RateChange::Cut(_)))
        .count();
    assert!(cuts <= 2, "{:?}", model.changes);
    assert!(
        model
            .changes
            .iter()
            .any(|c| matches!(c, RateChange::Strays(_)))
    );
    // The worker kept its speed: about WORKER_SPEED answers a second.
    let (goodput, _) = model.over(3, 30);
    assert!(goodput >= 0.9 * WORKER_SPEED * 0.95, "{goodput}");
}

#[test]
fn stray_refusals_while_little_is_asked_are_not_a_limit() {
    // 5 % refused whatever the rate, and work that comes and goes: a burst,
    // a trickle of status checks (5/s), a burst again. Refusals in the
    // trickle are no reason to cut to the trickle's rate.
    let mut model = Model::new(None, Provider::new(None, 0.05));
    model.speed = 300.0;
    model.run_until(secs(5));
    model.speed = 5.0;
    model.run_until(secs(35));
    model.speed = 300.0;
    model.run_until(secs(45));
    let lowest_cut = model
        .changes
        .iter()
        .filter_map(|c| match c {
            RateChange::Cut(rate) => Some(*rate),
            _ => None,
        })
        .fold(f64::INFINITY, f64::min);
    assert!(lowest_cut >= 100.0, "{:?}", model.changes);
    let (goodput, _) = model.over(37, 45);
    assert!(
        goodput >= 0.9 * 300.0 * 0.95,
        "{goodput} {:?}",
        model.changes
    );
}

#[test]
fn a_limit_is_still_found_beside_stray_refusals() {
    let mut model = Model::new(None, Provider::new(Some(100.0), 0.05));
    model.run_until(secs(60));
    let (goodput, refused) = model.over(10, 60);
    // 5 % are refused whatever the rate; the limit's own share stays small.
    assert!(goodput >= 0.85 * 100.0, "{goodput}");
    assert!(refused <= 0.12, "{refused}");
}

#[test]
fn a_configured_rate_is_a_hard_ceiling() {
    // The provider would take 100/s; the configuration says 50.
    let mut model = Model::new(Some(50.0), Provider::new(Some(100.0), 0.0));
    model.run_until(secs(30));
    for second in &model.seconds {
        assert!(second.answered <= 51, "{second:?}");
    }
    assert_eq!(model.control.rate(), Some(50.0));
    // Below the configured rate, the provider's own limit is learned.
    let mut model = Model::new(Some(50.0), Provider::new(Some(20.0), 0.0));
    model.run_until(secs(30));
    let (goodput, refused) = model.over(5, 30);
    assert!(goodput >= 18.0 && refused <= 0.05, "{goodput} {refused}");
}

#[test]
fn the_bucket_spaces_requests_and_refunds() {
    let t0 = Instant::now();
    let mut bucket = Bucket::new(t0);
    assert!(bucket.take(Some(2.0), t0));
    assert!(!bucket.take(Some(2.0), t0), "a burst of one at 2/s");
    assert_eq!(bucket.wait(Some(2.0), t0), Duration::from_millis(500));
    bucket.refund(Some(2.0));
    assert!(bucket.take(Some(2.0), t0));
    assert!(bucket.take(Some(2.0), t0 + Duration::from_millis(500)));
    assert!(bucket.take(None, t0), "unlimited");
}
