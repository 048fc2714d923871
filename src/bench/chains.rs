//! The chains figure (issue 17): two-step chains end to end, the second
//! step taking the first one's output.

use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::figures::{WORKFLOW, percentile};
use super::worker::{WorkerProcess, start_sim};
use super::{BenchError, Plan, figure, reset};

/// `[poll]` for runs that settle on their first poll.
const FAST_POLL: &str = "initial = \"10ms\"\nmax = \"1s\"";

/// `--chains` two-step chains inserted in one statement (the second step of
/// each waits, taking the first's picture as its prompt), run to the end
/// against a simulator with no latency. Prints chains/s from the insert to
/// the last finish, the time the insert took (its triggers), and the
/// hand-off: from a first step's finish to its second step's accepted
/// submit (database clock), which in a batch includes waiting behind the
/// batch's other runs. Then the hand-off of chains inserted one at a time
/// (every 50 ms) on an idle worker: the release and pick-up alone.
pub(crate) async fn chains(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    batch(plan, url, pool).await?;
    reset(pool).await?;
    paced(plan, url, pool).await
}

const INSERT_CHAINS: &str = r#"
    WITH first AS (
        INSERT INTO wfq.runs (workflow_id, inputs)
        SELECT $1, jsonb_build_object('n6_text', 'chain ' || g) FROM generate_series(1, $2) g
        RETURNING id
    )
    INSERT INTO wfq.runs (workflow_id, inputs)
    SELECT $1, jsonb_build_object('n6_text',
               jsonb_build_object('$output', jsonb_build_object('run', id, 'key', 'n9_images')))
    FROM first
"#;

/// Waits until no run is waiting or active; fails after `limit` or if the
/// worker dies.
async fn until_done(
    pool: &PgPool,
    worker: &mut WorkerProcess,
    started: Instant,
    limit: Duration,
) -> Result<(), BenchError> {
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM wfq.runs WHERE state IN ('waiting', 'queued', 'submitting', 'running')",
        )
        .fetch_one(pool)
        .await?;
        if left == 0 {
            return Ok(());
        }
        worker.check_alive()?;
        if started.elapsed() > limit {
            return Err(BenchError::Failed(format!(
                "{left} runs of the chains still to do after {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every chain ran both steps, the second with the first one's output;
/// the hand-offs in ms, sorted.
async fn checked_handoffs(pool: &PgPool, n: u32) -> Result<Vec<f64>, BenchError> {
    let (chains_done, handed_on): (i64, i64) = sqlx::query_as(
        r#"
        SELECT count(*) FILTER (WHERE a.state = 'succeeded' AND b.state = 'succeeded'),
               count(*) FILTER (WHERE b.sent_inputs -> 'n6_text' = a.outputs -> 'n9_images')
        FROM wfq.runs b JOIN wfq.runs a ON a.id = b.depends_on[1]
        "#,
    )
    .fetch_one(pool)
    .await?;
    if chains_done != i64::from(n) || handed_on != i64::from(n) {
        return Err(BenchError::Failed(format!(
            "{chains_done} of {n} chains succeeded, {handed_on} passed the output on"
        )));
    }
    let mut handoff: Vec<f64> = sqlx::query_scalar(
        r#"
        SELECT extract(epoch FROM b.submitted_at - a.finished_at)::float8 * 1000
        FROM wfq.runs b JOIN wfq.runs a ON a.id = b.depends_on[1]
        "#,
    )
    .fetch_all(pool)
    .await?;
    handoff.sort_by(f64::total_cmp);
    Ok(handoff)
}

/// Chains one at a time on an idle worker.
async fn paced(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let n: u32 = if plan.args.quick { 20 } else { 200 };
    let sim = start_sim(Duration::ZERO, Duration::ZERO, Duration::ZERO).await?;
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, FAST_POLL).await?;
    let started = Instant::now();
    for _ in 0..n {
        sqlx::query(INSERT_CHAINS)
            .bind(WORKFLOW)
            .bind(1_i64)
            .execute(pool)
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_done(pool, &mut worker, started, Duration::from_secs(120)).await?;
    worker.stop().await?;
    sim.shutdown().await;
    let handoff = checked_handoffs(pool, n).await?;
    for (name, p) in [
        ("chain_handoff_idle_p50", 50.0),
        ("chain_handoff_idle_p99", 99.0),
    ] {
        figure(
            name,
            format!("{:.1}", percentile(&handoff, p)),
            "ms",
            "-",
            &format!(
                "chains={n} one every 50 ms on an idle worker; from a first step's finish to its second step's accepted submit"
            ),
        );
    }
    Ok(())
}

/// `--chains` chains in one statement.
async fn batch(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let n = plan.args.chains;
    let sim = start_sim(Duration::ZERO, Duration::ZERO, Duration::ZERO).await?;
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, FAST_POLL).await?;
    let started = Instant::now();
    sqlx::query(INSERT_CHAINS)
        .bind(WORKFLOW)
        .bind(i64::from(n))
        .execute(pool)
        .await?;
    let insert = started.elapsed();
    let limit = Duration::from_secs(120 + u64::from(n) / 25);
    until_done(pool, &mut worker, started, limit).await?;
    let wall = started.elapsed();
    worker.stop().await?;
    let stats = sim.stats();
    sim.shutdown().await;

    let handoff = checked_handoffs(pool, n).await?;
    let seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8 FROM wfq.runs",
    )
    .fetch_one(pool)
    .await?;
    let extra = format!(
        "chains={n} runs={} seconds={seconds:.2} wall={:.2} insert_seconds={:.2} submits={} polls={}",
        2 * n,
        wall.as_secs_f64(),
        insert.as_secs_f64(),
        stats.submit_requests,
        stats.info_requests,
    );
    figure(
        "chain_throughput",
        format!("{:.0}", f64::from(n) / seconds),
        "chains/s",
        "-",
        &extra,
    );
    for (name, p) in [("chain_handoff_p50", 50.0), ("chain_handoff_p99", 99.0)] {
        figure(
            name,
            format!("{:.1}", percentile(&handoff, p)),
            "ms",
            "-",
            &format!(
                "chains={n} in one batch; from a first step's finish to its second step's accepted submit"
            ),
        );
    }
    Ok(())
}
