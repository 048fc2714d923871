//! The wfq figures. Each starts a simulator and a worker, drives a load
//! through the database as producers would, and prints its lines.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::worker::{WorkerProcess, start_sim};
use super::{BenchError, Plan, figure};
use crate::backoff::PollPolicy;

/// A workflow of the simulator's catalog with one text input.
pub(crate) const WORKFLOW: &str = "wf_861ef31e94dcfb10e6e7";

/// `[poll]` for runs that settle on their first poll.
pub(crate) const FAST_POLL: &str = "initial = \"10ms\"\nmax = \"1s\"";

/// Inserts `n` runs in one statement, as a producer's batch would.
pub(crate) async fn insert_runs(pool: &PgPool, n: u32, tag: &str) -> Result<(), BenchError> {
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs)
         SELECT $1, jsonb_build_object('n6_text', $2 || g) FROM generate_series(1, $3) g",
    )
    .bind(WORKFLOW)
    .bind(format!("{tag} "))
    .bind(i64::from(n))
    .execute(pool)
    .await?;
    Ok(())
}

async fn active_runs(pool: &PgPool) -> Result<i64, BenchError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM wfq.runs WHERE state IN ('queued', 'submitting', 'running')",
    )
    .fetch_one(pool)
    .await?)
}

/// Waits until no run is active; fails after `limit` or if the worker dies.
pub(crate) async fn wait_all_final(
    pool: &PgPool,
    worker: &mut WorkerProcess,
    limit: Duration,
) -> Result<(), BenchError> {
    let started = Instant::now();
    loop {
        let active = active_runs(pool).await?;
        if active == 0 {
            return Ok(());
        }
        worker.check_alive()?;
        if started.elapsed() > limit {
            return Err(BenchError::Failed(format!(
                "{active} runs still active after {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn xact_commits(pool: &PgPool) -> Result<i64, BenchError> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

/// Fails unless every run succeeded.
pub(crate) async fn all_succeeded(pool: &PgPool, expected: u32) -> Result<(), BenchError> {
    let (succeeded, total): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), count(*) FROM wfq.runs",
    )
    .fetch_one(pool)
    .await?;
    if succeeded != i64::from(expected) || total != i64::from(expected) {
        let sample: Option<String> = sqlx::query_scalar(
            "SELECT state || ' ' || coalesce(error_code, '') || ' ' || coalesce(error_message, '') FROM wfq.runs WHERE state <> 'succeeded' LIMIT 1",
        )
        .fetch_optional(pool)
        .await?;
        return Err(BenchError::Failed(format!(
            "{succeeded} of {total} runs succeeded (expected {expected}); e.g. {sample:?}"
        )));
    }
    Ok(())
}

/// 20,000 runs in one INSERT, settled on their first poll: runs/s from the
/// insert to the last run final. Returns the rate.
pub(crate) async fn lifecycle(plan: &Plan, url: &str, pool: &PgPool) -> Result<f64, BenchError> {
    let n = plan.args.runs;
    let sim = start_sim(Duration::ZERO, Duration::ZERO, Duration::ZERO).await?;
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, FAST_POLL).await?;
    let commits_before = xact_commits(pool).await?;
    let started = Instant::now();
    insert_runs(pool, n, "lifecycle").await?;
    wait_all_final(
        pool,
        &mut worker,
        Duration::from_secs(60 + u64::from(n) / 50),
    )
    .await?;
    let wall = started.elapsed();
    let rss = worker.rss_kb();
    worker.stop().await?;
    all_succeeded(pool, n).await?;
    let seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8 FROM wfq.runs",
    )
    .fetch_one(pool)
    .await?;
    // Statistics reach pg_stat_database within a second of the commits.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let commits = xact_commits(pool).await? - commits_before;
    let stats = sim.stats();
    sim.shutdown().await;
    let rate = f64::from(n) / seconds;
    figure(
        "lifecycle_throughput",
        format!("{rate:.0}"),
        "runs/s",
        ">=2000",
        &format!(
            "runs={n} seconds={seconds:.2} wall={:.2} submits={} polls={} manifest_reads={} db_commits_per_run={:.2} worker_rss_mb={}",
            wall.as_secs_f64(),
            stats.submit_requests,
            stats.info_requests,
            stats.market_requests,
            commits as f64 / f64::from(n),
            rss.map_or("?".into(), |kb| (kb / 1024).to_string()),
        ),
    );
    Ok(rate)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// An idle worker; single-row inserts one after another; the time from each
/// INSERT's commit to its submit arriving at the simulator.
pub(crate) async fn pickup(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let n = plan.args.pickup;
    let sim = start_sim(Duration::ZERO, Duration::ZERO, Duration::ZERO).await?;
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, FAST_POLL).await?;
    // One run first so the manifest is cached, as in a worker that has been up a while.
    insert_runs(pool, 1, "warm-up").await?;
    wait_all_final(pool, &mut worker, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut committed = Vec::with_capacity(n as usize);
    let inputs = json!({"n6_text": "pick me up"});
    for i in 0..n {
        let key = format!("pickup-{i}");
        sqlx::query(
            "INSERT INTO wfq.runs (workflow_id, inputs, idempotency_key) VALUES ($1, $2, $3)",
        )
        .bind(WORKFLOW)
        .bind(&inputs)
        .bind(&key)
        .execute(pool)
        .await?;
        committed.push((key, Utc::now()));
    }
    wait_all_final(pool, &mut worker, Duration::from_secs(60)).await?;
    worker.stop().await?;
    let arrivals = sim.submit_arrivals();
    sim.shutdown().await;
    let mut ms: Vec<f64> = committed
        .iter()
        .filter_map(|(key, at)| {
            let arrived = arrivals.get(key)?;
            Some((*arrived - *at).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    if ms.len() != committed.len() {
        return Err(BenchError::Failed(format!(
            "only {} of {} submits reached the simulator",
            ms.len(),
            committed.len()
        )));
    }
    ms.sort_by(f64::total_cmp);
    let extra = format!(
        "inserts={n} p90_ms={:.2} max_ms={:.2} min_ms={:.2}",
        percentile(&ms, 90.0),
        ms.last().copied().unwrap_or(f64::NAN),
        ms.first().copied().unwrap_or(f64::NAN),
    );
    figure(
        "pickup_latency_p50",
        format!("{:.2}", percentile(&ms, 50.0)),
        "ms",
        "<5",
        &extra,
    );
    figure(
        "pickup_latency_p99",
        format!("{:.2}", percentile(&ms, 99.0)),
        "ms",
        "<20",
        &extra,
    );
    Ok(())
}

/// The default `[poll]` schedule.
fn default_poll() -> PollPolicy {
    PollPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.2,
        deadline: Duration::from_secs(24 * 3600),
        unknown_status_limit: Duration::from_secs(3600),
        settle_wait: Duration::from_secs(3600),
    }
}

/// Polls a run lasting `lasting` gets under `policy` when every delay is
/// drawn at `unit` (0: the shortest delays, 1: the longest): the first
/// poll at or after the end is the last.
pub(crate) fn schedule_polls(policy: &PollPolicy, lasting: Duration, unit: f64) -> u32 {
    let mut at = Duration::ZERO;
    let mut polls = 0;
    loop {
        at += policy.delay(polls, unit);
        polls += 1;
        if at >= lasting || polls > 100_000 {
            return polls;
        }
    }
}

/// Poll times (seconds after submit) within `[from, to]` under `policy` at
/// the centre of the jitter range.
fn schedule_points_between(policy: &PollPolicy, from: f64, to: f64) -> u64 {
    let mut at = 0.0;
    let mut n = 0;
    let mut k = 0;
    while at <= to {
        at += policy.delay(k, 0.5).as_secs_f64();
        k += 1;
        if at >= from && at <= to {
            n += 1;
        }
    }
    n
}

/// Polls per run under the default schedule: computed for 5 s, 60 s and
/// 600 s runs, and measured for 5 s runs (and 60 s runs unless `--quick`).
pub(crate) async fn polls_per_run(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let policy = default_poll();
    // A quick check only computes: measuring takes as long as the runs last.
    let measured: &[u64] = if plan.args.quick { &[] } else { &[5, 60] };
    for seconds in [5u64, 60, 600] {
        let lasting = Duration::from_secs(seconds);
        let mid = schedule_polls(&policy, lasting, 0.5);
        let most = schedule_polls(&policy, lasting, 0.0);
        let fewest = schedule_polls(&policy, lasting, 1.0);
        let mut extra = format!("schedule_min={fewest} schedule_max={most} source=schedule");
        if measured.contains(&seconds) {
            let runs = 200;
            let (avg, max, info) = measure_polls(plan, url, pool, lasting, runs).await?;
            extra = format!(
                "schedule_min={fewest} schedule_max={most} measured_runs={runs} measured_avg={avg:.2} measured_max={max} sim_status_requests_per_run={info:.2}"
            );
        }
        figure(
            &format!("polls_per_run_{seconds}s"),
            mid,
            "polls",
            &format!("<={most}"),
            &extra,
        );
    }
    Ok(())
}

async fn measure_polls(
    plan: &Plan,
    url: &str,
    pool: &PgPool,
    lasting: Duration,
    runs: u32,
) -> Result<(f64, i32, f64), BenchError> {
    super::reset(pool).await?;
    let sim = start_sim(Duration::ZERO, lasting, Duration::ZERO).await?;
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, "").await?;
    insert_runs(pool, runs, "polls").await?;
    wait_all_final(pool, &mut worker, lasting * 3 + Duration::from_secs(30)).await?;
    worker.stop().await?;
    all_succeeded(pool, runs).await?;
    let (avg, max): (f64, i32) =
        sqlx::query_as("SELECT avg(polls)::float8, max(polls) FROM wfq.runs")
            .fetch_one(pool)
            .await?;
    let info = sim.stats().info_requests as f64 / f64::from(runs);
    sim.shutdown().await;
    Ok((avg, max, info))
}

/// One batch INSERT of `--enqueue` rows from the client, against pgbench
/// inserting into a table like `wfq.runs` on the same server.
pub(crate) async fn enqueue(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let n = plan.args.enqueue;
    let workflows: Vec<&str> = vec![WORKFLOW; n as usize];
    let inputs: Vec<Value> = (0..n)
        .map(|i| json!({"n6_text": format!("enqueue {i}")}))
        .collect();
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) SELECT * FROM unnest($1::text[], $2::jsonb[])",
    )
    .bind(&workflows)
    .bind(&inputs)
    .execute(pool)
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let rate = f64::from(n) / seconds;
    super::reset(pool).await?;

    sqlx::query("DROP SCHEMA IF EXISTS bench_pgbench CASCADE")
        .execute(pool)
        .await?;
    sqlx::query("CREATE SCHEMA bench_pgbench")
        .execute(pool)
        .await?;
    sqlx::query("CREATE TABLE bench_pgbench.runs (LIKE wfq.runs INCLUDING ALL)")
        .execute(pool)
        .await?;
    let batch = 10_000;
    let s = plan.pgbench_seconds;
    let pg_batch = pgbench(
        url,
        &format!(
            "INSERT INTO bench_pgbench.runs (workflow_id, inputs) SELECT '{WORKFLOW}', jsonb_build_object('n6_text', 'pgbench ' || g) FROM generate_series(1, {batch}) g;"
        ),
        1,
        s,
    )
    .await?;
    let single = format!(
        "INSERT INTO bench_pgbench.runs (workflow_id, inputs) VALUES ('{WORKFLOW}', '{{\"n6_text\": \"pgbench\"}}');"
    );
    let pg_single = pgbench(url, &single, 8, s).await?;
    let wfq_single = pgbench(url, &single.replace("bench_pgbench.runs", "wfq.runs"), 8, s).await?;
    super::reset(pool).await?;
    sqlx::query("DROP SCHEMA bench_pgbench CASCADE")
        .execute(pool)
        .await?;

    let fmt = |tps: Option<f64>, rows: f64| {
        tps.map_or("unavailable".to_owned(), |t| format!("{:.0}", t * rows))
    };
    figure(
        "enqueue_batch",
        format!("{rate:.0}"),
        "rows/s",
        "reported",
        &format!(
            "rows={n} seconds={seconds:.2} pgbench_batch_rows_per_s={} (pgbench: INSERT..generate_series({batch}) into a LIKE-wfq.runs table, 1 client)",
            fmt(pg_batch, f64::from(batch))
        ),
    );
    figure(
        "enqueue_single_row",
        fmt(wfq_single, 1.0),
        "rows/s",
        "reported",
        &format!(
            "pgbench_plain_table_rows_per_s={} (pgbench, one INSERT per transaction, 8 clients, {s}s; wfq.runs has the per-statement NOTIFY trigger)",
            fmt(pg_single, 1.0)
        ),
    );
    Ok(())
}

/// Runs `script` with pgbench; its tps, `None` when pgbench is missing.
async fn pgbench(
    url: &str,
    script: &str,
    clients: u32,
    seconds: u32,
) -> Result<Option<f64>, BenchError> {
    let path = std::env::temp_dir().join(format!(
        "wfq-bench-{}-{:08x}.sql",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::write(&path, script)?;
    let out = tokio::process::Command::new("pgbench")
        .args(["-n", "-j", "2", "-c", &clients.to_string(), "-T"])
        .arg(seconds.to_string())
        .arg("-f")
        .arg(&path)
        .arg(url)
        .output()
        .await;
    let _ = std::fs::remove_file(&path);
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("# pgbench not found; its comparison figures are unavailable");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| t.parse().ok());
    if tps.is_none() {
        return Err(BenchError::Failed(format!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(tps)
}

/// `--inflight` runs that the simulator keeps running; once all are
/// submitted, measure for `--inflight-duration`: worker RSS, database
/// commits/s and status requests/s against what the schedule implies.
pub(crate) async fn inflight(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let n = plan.args.inflight;
    let policy = default_poll();
    let sim = start_sim(Duration::ZERO, Duration::from_secs(86_400), Duration::ZERO).await?;
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, "").await?;
    let idle_rss = worker.rss_kb().unwrap_or(0);
    let started = Instant::now();
    insert_runs(pool, n, "inflight").await?;
    let mut peak_rss = idle_rss;
    loop {
        let running: i64 =
            sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'running'")
                .fetch_one(pool)
                .await?;
        peak_rss = peak_rss.max(worker.rss_kb().unwrap_or(0));
        if running == i64::from(n) {
            break;
        }
        worker.check_alive()?;
        if started.elapsed() > Duration::from_secs(120 + u64::from(n) / 20) {
            return Err(BenchError::Failed(format!(
                "only {running} of {n} runs submitted after {:?}",
                started.elapsed()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let submit_seconds = started.elapsed().as_secs_f64();

    let snapshot = |pool: PgPool| async move {
        let (now, polls): (f64, i64) = sqlx::query_as(
            "SELECT extract(epoch FROM clock_timestamp())::float8, sum(polls)::int8 FROM wfq.runs",
        )
        .fetch_one(&pool)
        .await?;
        Ok::<_, BenchError>((now, polls, xact_commits(&pool).await?))
    };
    let (t0, polls0, commits0) = snapshot(pool.clone()).await?;
    let info0 = sim.stats().info_requests;
    let window = plan.inflight_duration;
    let mut samples = 0u64;
    let mut window_peak = 0;
    let until = Instant::now() + window;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1).min(window)).await;
        worker.check_alive()?;
        let rss = worker.rss_kb().unwrap_or(0);
        window_peak = window_peak.max(rss);
        samples += 1;
    }
    let (t1, polls1, commits1) = snapshot(pool.clone()).await?;
    let info1 = sim.stats().info_requests;
    let last_rss = worker.rss_kb().unwrap_or(0);
    worker.stop().await?;
    sim.shutdown().await;
    // Own statements in the window: two snapshots plus pgstat lag; small.
    let commits1 = commits1.max(commits0);

    let submitted: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM submitted_at)::float8 FROM wfq.runs WHERE submitted_at IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    let expected: u64 = submitted
        .iter()
        .map(|s| schedule_points_between(&policy, t0 - s, t1 - s))
        .sum();
    // Over each run's whole life so far: a worker that fell behind polls
    // late and then catches up inside the window, so the window alone can
    // exceed the schedule while the totals cannot.
    let schedule_total: u64 = submitted
        .iter()
        .map(|s| schedule_points_between(&policy, 0.0, t1 - s))
        .sum();
    let secs = (t1 - t0).max(1e-9);
    let polls_per_s = (polls1 - polls0) as f64 / secs;
    let expected_per_s = expected as f64 / secs;
    let commits_per_s = (commits1 - commits0) as f64 / secs;
    let info_per_s = (info1 - info0) as f64 / secs;
    let peak = peak_rss.max(window_peak);
    figure(
        "inflight_worker_rss",
        format!("{:.1}", peak as f64 / 1024.0),
        "MB",
        "<200",
        &format!(
            "runs_in_flight={n} window_s={secs:.0} idle_rss_mb={:.1} last_rss_mb={:.1} rss_samples={samples} submit_phase_s={submit_seconds:.1} submit_rate={:.0}/s",
            idle_rss as f64 / 1024.0,
            last_rss as f64 / 1024.0,
            f64::from(n) / submit_seconds,
        ),
    );
    figure(
        "inflight_polls_per_s",
        format!("{polls_per_s:.1}"),
        "polls/s",
        &format!("~{expected_per_s:.1} (schedule)"),
        &format!(
            "sim_status_requests_per_s={info_per_s:.1} runs_in_flight={n} total_polls={polls1} schedule_total={schedule_total}"
        ),
    );
    figure(
        "inflight_db_commits_per_s",
        format!("{commits_per_s:.1}"),
        "commits/s",
        "proportional to polls/s",
        &format!(
            "commits_per_poll={:.2} commits_per_run_in_flight_per_s={:.4}",
            commits_per_s / polls_per_s.max(1e-9),
            commits_per_s / f64::from(n)
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_polls_follow_the_default_schedule() {
        let p = default_poll();
        // 1, 3, 7: the third poll is the first at or after 5 s.
        assert_eq!(schedule_polls(&p, Duration::from_secs(5), 0.5), 3);
        // 1, 3, 7, 15, 31, 63.
        assert_eq!(schedule_polls(&p, Duration::from_secs(60), 0.5), 6);
        // 63 + 60 * 9 = 603.
        assert_eq!(schedule_polls(&p, Duration::from_secs(600), 0.5), 15);
        assert_eq!(schedule_points_between(&p, 0.0, 7.0), 3);
    }
}
