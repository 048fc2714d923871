//! Figures against a provider that pushes back: goodput under a per-key
//! rate limit, recovery when that limit changes, and a batch under stray
//! 429s. The simulator enforces the limit (`rate_limit_rps`, a token
//! bucket with one second's burst, submits and status checks counted
//! together) and counts what it answered and refused; the worker learns
//! the limit from the 429s alone (no `requests_per_second` configured).

use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::figures::insert_runs;
use super::worker::{WorkerProcess, start_sim};
use super::{BenchError, Plan, figure};
use crate::sim::{Faults, SimServer, SimStats};

/// The default poll schedule's start: status checks are half the load.
const POLL: &str = "initial = \"1s\"\nmax = \"4s\"";

/// One look at the simulator's counters and the queue.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    /// Requests answered without a 429 (or an injected error).
    answered: u64,
    /// Requests refused by the rate limit.
    refused: u64,
    /// Runs not accepted by the provider yet (queued, or submitting after
    /// a refusal).
    queued: i64,
    active: i64,
}

fn answered(stats: &SimStats) -> u64 {
    stats
        .api_requests
        .saturating_sub(stats.limit_refusals + stats.injected_429 + stats.injected_5xx)
}

async fn sample(pool: &PgPool, sim: &SimServer, started: Instant) -> Result<Sample, BenchError> {
    let stats = sim.stats();
    let (queued, active): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state IN ('queued', 'submitting')), \
                count(*) FILTER (WHERE state IN ('queued', 'submitting', 'running')) FROM wfq.runs",
    )
    .fetch_one(pool)
    .await?;
    Ok(Sample {
        at: started.elapsed(),
        answered: answered(&stats),
        refused: stats.limit_refusals,
        queued,
        active,
    })
}

/// Answered per second and the refused share between two samples.
fn rates(from: &Sample, to: &Sample) -> (f64, f64) {
    let seconds = (to.at - from.at).as_secs_f64().max(1e-9);
    let answered = to.answered - from.answered;
    let refused = to.refused - from.refused;
    let share = refused as f64 / (answered + refused).max(1) as f64;
    (answered as f64 / seconds, share)
}

/// Goodput against a limit of `limit` requests per second: answered
/// requests per second while runs are still waiting to be submitted (a
/// backlog), and the share of all requests refused.
pub(crate) async fn goodput(
    plan: &Plan,
    url: &str,
    pool: &PgPool,
    limit: f64,
) -> Result<(), BenchError> {
    let sim = start_sim(Duration::ZERO, Duration::from_secs(2), Duration::ZERO).await?;
    sim.set_faults(Faults {
        rate_limit_rps: Some(limit),
        ..Faults::default()
    });
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, POLL).await?;
    // About a minute of work at the limit (a run is a submit and two or
    // three status checks), at least 200 runs: the first second's
    // discovery (about one burst of the provider's refused) is part of it.
    let runs = if plan.args.quick {
        60
    } else {
        ((limit * 60.0 / 3.0) as u32).max(200)
    };
    let started = Instant::now();
    insert_runs(pool, runs, "limit").await?;
    let mut samples = vec![sample(pool, &sim, started).await?];
    let give_up = Duration::from_secs(60 + (f64::from(runs) * 4.0 / limit) as u64);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        worker.check_alive()?;
        let s = sample(pool, &sim, started).await?;
        samples.push(s);
        if s.active == 0 || s.at > give_up {
            break;
        }
    }
    let log = worker.log_text();
    worker.stop().await?;
    sim.shutdown().await;
    // The backlog: from the first answered request to the last sample with
    // runs still queued (the tail, when only status checks are left, asks
    // less than the limit and says nothing about how it is used).
    let first = samples
        .iter()
        .position(|s| s.answered > 0)
        .unwrap_or_default();
    let last = samples
        .iter()
        .rposition(|s| s.queued > 0)
        .unwrap_or(samples.len() - 1)
        .max(first + 1)
        .min(samples.len() - 1);
    let (rate, share) = rates(&samples[first], &samples[last]);
    let (_, all_share) = rates(&samples[0], &samples[samples.len() - 1]);
    let slowdowns = log.matches("slowing this profile down").count();
    let unthrottled = log.matches("no longer rate-limits").count();
    figure(
        "limit_goodput",
        format!("{:.1}", 100.0 * rate / limit),
        "%_of_limit",
        ">=90",
        &format!(
            "limit={limit} goodput={rate:.1}/s refused={:.1}% refused_all={:.1}% backlog_s={:.1} runs={runs} slowdowns={slowdowns} unthrottled={unthrottled}",
            100.0 * share,
            100.0 * all_share,
            (samples[last].at - samples[first].at).as_secs_f64()
        ),
    );
    Ok(())
}

/// The limit is halved for a while, then restored: how long until the
/// goodput (over one second) is back above 90 % of the new limit, and the
/// refused share in each phase.
pub(crate) async fn limit_change(
    plan: &Plan,
    url: &str,
    pool: &PgPool,
    limit: f64,
) -> Result<(), BenchError> {
    let phase = if plan.args.quick {
        Duration::from_secs(4)
    } else {
        Duration::from_secs(15)
    };
    let sim = start_sim(Duration::ZERO, Duration::from_secs(2), Duration::ZERO).await?;
    let set_limit = |rps: f64| {
        let mut faults = sim.faults();
        faults.rate_limit_rps = Some(rps);
        sim.set_faults(faults);
    };
    set_limit(limit);
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, POLL).await?;
    // More than three phases of work, so the backlog never runs dry.
    let runs = ((limit * phase.as_secs_f64() * 3.0 / 2.0) as u32).max(300);
    let started = Instant::now();
    insert_runs(pool, runs, "limit-change").await?;
    let mut samples = vec![sample(pool, &sim, started).await?];
    let changes = [(phase, limit / 2.0), (phase * 2, limit)];
    let mut next_change = 0;
    while started.elapsed() < phase * 3 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        worker.check_alive()?;
        if let Some(&(at, rps)) = changes.get(next_change)
            && started.elapsed() >= at
        {
            set_limit(rps);
            next_change += 1;
        }
        samples.push(sample(pool, &sim, started).await?);
    }
    worker.stop().await?;
    sim.shutdown().await;
    for (n, (at, rps)) in changes.iter().enumerate() {
        // The first one-second window after the change whose goodput is
        // at least 90 % of the new limit.
        let recovered = samples.windows(5).find_map(|w| {
            let (first, last) = (&w[0], &w[4]);
            (first.at >= *at && rates(first, last).0 >= 0.9 * rps).then(|| last.at - *at)
        });
        let end = changes.get(n + 1).map_or(phase * 3, |c| c.0);
        let within: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at >= *at && s.at <= end)
            .collect();
        let (rate, share) = match (within.first(), within.last()) {
            (Some(a), Some(b)) => rates(a, b),
            _ => (0.0, 0.0),
        };
        figure(
            if *rps < limit {
                "limit_halved_recovery"
            } else {
                "limit_restored_recovery"
            },
            recovered.map_or("never".to_owned(), |d| format!("{:.1}", d.as_secs_f64())),
            "s",
            "<=10",
            &format!(
                "limit={rps} phase_goodput={rate:.1}/s phase_refused={:.1}%",
                100.0 * share
            ),
        );
    }
    Ok(())
}

/// A batch of runs against a provider that refuses 5 % of all requests
/// whatever the rate (429 + `Retry-After: 1`), against the same batch
/// without refusals: how much longer it takes. Two batches:
///
/// - `stray_429_slowdown`: 1,000 runs (quick: 200) under a configured
///   ceiling of 100 requests per second, so the batch is bound by the rate
///   (about 30 s of requests): a rate cut for the strays would show in full,
///   while each refused request costs only its own second's wait.
/// - `stray_429_slowdown_short`: 300 runs with no ceiling, about 4 s of
///   work; here the unluckiest run's refused requests (a second each) make
///   most of the difference, whatever the rate does.
pub(crate) async fn stray_429s(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let bound = if plan.args.quick { 200 } else { 1_000 };
    stray_batch(
        plan,
        url,
        pool,
        "stray_429_slowdown",
        bound,
        "requests_per_second = 100",
    )
    .await?;
    let short = if plan.args.quick { 100 } else { 300 };
    stray_batch(plan, url, pool, "stray_429_slowdown_short", short, "").await
}

async fn stray_batch(
    plan: &Plan,
    url: &str,
    pool: &PgPool,
    name: &str,
    runs: u32,
    profile: &str,
) -> Result<(), BenchError> {
    let mut seconds = Vec::new();
    for rate in [0.0, 0.05] {
        super::reset(pool).await?;
        let sim = start_sim(Duration::ZERO, Duration::from_secs(2), Duration::ZERO).await?;
        sim.set_faults(Faults {
            rate_limit_rate: rate,
            retry_after_secs: Some(1),
            ..Faults::default()
        });
        let mut worker = WorkerProcess::start_with(plan, url, pool, &sim, POLL, profile).await?;
        let started = Instant::now();
        insert_runs(pool, runs, "stray").await?;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            worker.check_alive()?;
            if sample(pool, &sim, started).await?.active == 0 {
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err(BenchError::Failed(
                    "stray 429s: runs still active after 600 s".into(),
                ));
            }
        }
        seconds.push(started.elapsed().as_secs_f64());
        worker.stop().await?;
        let stats = sim.stats();
        sim.shutdown().await;
        if rate > 0.0 {
            figure(
                name,
                format!("{:.2}", seconds[1] / seconds[0]),
                "x",
                if profile.is_empty() { "-" } else { "<=1.25" },
                &format!(
                    "runs={runs} without={:.1}s with={:.1}s refused={} ceiling={}",
                    seconds[0],
                    seconds[1],
                    stats.injected_429,
                    if profile.is_empty() { "none" } else { "100/s" }
                ),
            );
        }
    }
    Ok(())
}
