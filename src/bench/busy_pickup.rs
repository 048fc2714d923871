//! Pick-up latency of a busy worker: `--busy-inflight` runs in flight (the
//! simulator keeps them running for a day), polled on the default
//! schedule, while new runs are inserted one per statement at
//! `--busy-rate` per second from separate connections. Per new run: the
//! time from its INSERT's commit (the producer's clock, right after the
//! statement returned) to its submit arriving at the simulator.
//!
//! The inserts start right after the last of the in-flight runs was
//! submitted, so they meet the first, densest waves of status checks (at
//! about 1, 3, 7, 15 and 31 s after each submit), not a quiet worker.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::figures::{WORKFLOW, insert_runs, percentile};
use super::worker::{WorkerProcess, start_sim};
use super::{BenchError, Plan, figure};

/// Prints `pickup_busy_p50` and `pickup_busy_p99`.
pub(crate) async fn busy_pickup(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let inflight = plan.args.busy_inflight;
    let inserts = plan.args.busy_inserts;
    let rate = plan.args.busy_rate.max(0.1);
    let sim = start_sim(Duration::ZERO, Duration::from_secs(86_400), Duration::ZERO).await?;
    // The default `[poll]` schedule.
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, "").await?;
    insert_runs(pool, inflight, "busy").await?;
    let started = Instant::now();
    loop {
        let running: i64 =
            sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'running'")
                .fetch_one(pool)
                .await?;
        if running == i64::from(inflight) {
            break;
        }
        worker.check_alive()?;
        if started.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Failed(format!(
                "only {running} of {inflight} runs running after 120 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let polls_before = sim.stats().info_requests;

    // Producers: separate connections, one INSERT each at its tick.
    let producers = PgPoolOptions::new().max_connections(8).connect(url).await?;
    let period = Duration::from_secs_f64(1.0 / rate);
    let first = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::with_capacity(inserts as usize);
    for i in 0..inserts {
        let producers = producers.clone();
        let at = first + period * i;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let key = format!("busy-pickup-{i}");
            sqlx::query(
                "INSERT INTO wfq.runs (workflow_id, inputs, idempotency_key) VALUES ($1, $2, $3)",
            )
            .bind(WORKFLOW)
            .bind(json!({"n6_text": "pick me up"}))
            .bind(&key)
            .execute(&producers)
            .await?;
            Ok::<(String, DateTime<Utc>), BenchError>((key, Utc::now()))
        }));
    }
    let mut committed = Vec::with_capacity(tasks.len());
    for task in tasks {
        committed.push(
            task.await
                .map_err(|e| BenchError::Failed(format!("an insert task failed: {e}")))??,
        );
    }
    let window = first.elapsed().as_secs_f64();
    // Every new run submitted.
    let wanted = i64::from(inflight) + i64::from(inserts);
    let started = Instant::now();
    loop {
        let running: i64 =
            sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'running'")
                .fetch_one(pool)
                .await?;
        if running == wanted {
            break;
        }
        worker.check_alive()?;
        if started.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Failed(format!(
                "only {running} of {wanted} runs running 60 s after the last insert"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let polls = sim.stats().info_requests - polls_before;
    worker.stop().await?;
    producers.close().await;
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
        "runs_in_flight={inflight} inserts={inserts} insert_rate={rate}/s p90_ms={:.2} max_ms={:.2} status_checks_per_s={:.0} concurrency={}",
        percentile(&ms, 90.0),
        ms.last().copied().unwrap_or(f64::NAN),
        polls as f64 / window.max(1e-9),
        plan.args.concurrency,
    );
    figure(
        "pickup_busy_p50",
        format!("{:.2}", percentile(&ms, 50.0)),
        "ms",
        "<5",
        &extra,
    );
    figure(
        "pickup_busy_p99",
        format!("{:.2}", percentile(&ms, 99.0)),
        "ms",
        "<25",
        &extra,
    );
    Ok(())
}
