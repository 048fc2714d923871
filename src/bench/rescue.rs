//! The rescue figure: how long the runs of a worker killed with SIGKILL
//! wait before another worker takes them over, with the default
//! configuration (a 120 s lease).
//!
//! Two `wfq worker` children; `--rescue-runs` runs enqueued while the
//! simulator holds every status check, so that each run is in flight, its
//! lease held by one of the two, when one of them is killed; then the gate
//! opens. Per run of the victim: the time from the kill (read on the
//! database clock right after the process was reaped) to the other
//! worker's first step on it (its `lease_rescued` event, written as that
//! step starts, on the same clock). The victim is the worker holding more
//! of the runs. `--rescue-kills` rounds, each with a fresh worker in place
//! of the victim.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::figures::insert_runs;
use super::worker::{WorkerProcess, start_sim};
use super::{BenchError, Plan, figure};
use crate::sim::Faults;

/// Runs settle on their first poll once the gate opens.
const POLL: &str = "initial = \"10ms\"\nmax = \"1s\"";

/// One kill: its victim's runs' waits in seconds, and how long the death
/// took to be seen (kill to `died_at`).
struct Round {
    waits: Vec<f64>,
    seen_after: Option<f64>,
}

/// Prints `rescue_p50`, `rescue_p99` and `rescue_max`.
pub(crate) async fn rescue(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let runs = plan.args.rescue_runs.max(2);
    let kills = plan.args.rescue_kills.max(1);
    // Each run holds a slot of one of the two workers while its check waits.
    if runs as usize > 2 * plan.args.concurrency {
        return Err(BenchError::Failed(format!(
            "--rescue-runs {runs} needs --concurrency of at least {} (two workers hold them all)",
            (runs as usize).div_ceil(2)
        )));
    }
    let sim = start_sim(Duration::ZERO, Duration::from_millis(100), Duration::ZERO).await?;
    let mut pair = Vec::new();
    for _ in 0..2 {
        let mut worker = WorkerProcess::start(plan, url, pool, &sim, POLL).await?;
        let id = worker.wait_registered(pool).await?;
        pair.push((worker, id));
    }
    let mut rounds = Vec::new();
    for round in 0..kills {
        sim.set_faults(Faults {
            hold_status_checks: true,
            ..Default::default()
        });
        insert_runs(pool, runs, &format!("rescue-{round}")).await?;
        // Every run submitted, its status check claimed and in flight (held
        // at the simulator, or waiting in the throttle's slow-start window
        // for a place in flight): its lease held by one of the two.
        in_flight(pool, runs, &mut pair).await?;
        // The victim is the one holding more of the runs (one claim can
        // take them all).
        let mut in_hand = Vec::new();
        for (_, id) in &pair {
            in_hand.push(runs_in_hand(pool, id).await?);
        }
        let victim = usize::from(in_hand[1] > in_hand[0]);
        let (process, victim_id) = pair.remove(victim);
        let killed_at = kill(process, pool).await?;
        sim.set_faults(Faults::default());
        let outcome = measure(pool, &victim_id, killed_at, &mut pair[0].0).await?;
        rounds.push(outcome);
        let mut fresh = WorkerProcess::start(plan, url, pool, &sim, POLL).await?;
        let id = fresh.wait_registered(pool).await?;
        pair.push((fresh, id));
    }
    for (worker, _) in pair {
        worker.stop().await?;
    }
    sim.shutdown().await;

    let mut waits: Vec<f64> = rounds.iter().flat_map(|r| r.waits.clone()).collect();
    waits.sort_by(f64::total_cmp);
    let mut seen: Vec<f64> = rounds.iter().filter_map(|r| r.seen_after).collect();
    seen.sort_by(f64::total_cmp);
    let ms = |s: f64| format!("{:.0}", s * 1000.0);
    let extra = format!(
        "kills={kills} runs_in_flight={runs} rescued={} seen_max_ms={} seen_p50_ms={} lease_s=120",
        waits.len(),
        seen.last().map_or("?".into(), |s| ms(*s)),
        quantile(&seen, 0.5).map_or("?".into(), ms),
    );
    let value = |q: f64| quantile(&waits, q).map_or("?".into(), ms);
    figure("rescue_p50", value(0.5), "ms", "-", &extra);
    figure("rescue_p99", value(0.99), "ms", "<5000", &extra);
    figure(
        "rescue_max",
        waits.last().map_or("?".into(), |s| ms(*s)),
        "ms",
        "-",
        &extra,
    );
    Ok(())
}

/// The `q` quantile of ascending `sorted` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1);
    sorted.get(rank).copied()
}

/// Waits until all `runs` are `running` and leased.
async fn in_flight(
    pool: &PgPool,
    runs: u32,
    pair: &mut [(WorkerProcess, String)],
) -> Result<(), BenchError> {
    let started = Instant::now();
    loop {
        let leased: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM wfq.runs WHERE state = 'running' AND lease_owner IS NOT NULL",
        )
        .fetch_one(pool)
        .await?;
        if leased >= i64::from(runs) {
            return Ok(());
        }
        for (worker, _) in pair.iter_mut() {
            worker.check_alive()?;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Failed(format!(
                "only {leased} of {runs} runs were running and leased within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The active runs worker `id` holds.
async fn runs_in_hand(pool: &PgPool, id: &str) -> Result<i64, BenchError> {
    Ok(
        sqlx::query_scalar("SELECT runs_in_hand FROM wfq.workers_live WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

/// SIGKILLs `victim`; the database's clock right after it was reaped.
async fn kill(victim: WorkerProcess, pool: &PgPool) -> Result<DateTime<Utc>, BenchError> {
    victim.kill().await?;
    Ok(sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await?)
}

/// Waits until every run is final, then reads the victim's runs' rescues.
async fn measure(
    pool: &PgPool,
    victim: &str,
    killed_at: DateTime<Utc>,
    survivor: &mut WorkerProcess,
) -> Result<Round, BenchError> {
    let started = Instant::now();
    loop {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM wfq.runs WHERE state IN ('queued', 'submitting', 'running')",
        )
        .fetch_one(pool)
        .await?;
        if active == 0 {
            break;
        }
        survivor.check_alive()?;
        if started.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Failed(format!(
                "{active} runs still active 120 s after the kill (the lease is 120 s: were they rescued?)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waits: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM at - $2)::float8 FROM wfq.run_events \
         WHERE kind = 'lease_rescued' AND detail->>'previous_owner' = $1",
    )
    .bind(victim)
    .bind(killed_at)
    .fetch_all(pool)
    .await?;
    let seen_after: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM died_at - $2)::float8 FROM wfq.workers WHERE id = $1",
    )
    .bind(victim)
    .bind(killed_at)
    .fetch_one(pool)
    .await?;
    if waits.is_empty() {
        return Err(BenchError::Failed(format!(
            "no run of the killed worker {victim} was rescued"
        )));
    }
    Ok(Round { waits, seen_after })
}
