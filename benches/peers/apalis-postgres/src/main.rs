//! apalis-postgres 1.0 peer of `wfq bench`: pushes JOBS jobs in bulk, runs
//! one worker with CONCURRENCY until the database shows every job done, and
//! prints `figure=peer_apalis_postgres_<KIND> value=<jobs/s> ...`.
//!
//! KIND=http: each job makes one HTTP request to the simulator
//! (`GET {SIM_URL}/workflow/market/info`); KIND=noop: the job does nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::layers::WorkerBuilderExt;
use apalis::prelude::*;
use apalis_postgres::{Config, PgPool, PostgresStorage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    n: u32,
}

struct Ctx {
    http: reqwest::Client,
    url: Option<String>,
    key: String,
}

async fn handle(_job: Job, ctx: Data<Arc<Ctx>>) -> Result<(), BoxDynError> {
    if let Some(url) = &ctx.url {
        let answer = ctx.http.get(url).bearer_auth(&ctx.key).send().await?;
        if !answer.status().is_success() {
            return Err(format!("simulator answered {}", answer.status()).into());
        }
        answer.bytes().await?;
    }
    Ok(())
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

#[tokio::main]
async fn main() -> Result<(), BoxDynError> {
    let jobs: u32 = env("JOBS").parse()?;
    let concurrency: usize = env("CONCURRENCY").parse()?;
    let kind = env("KIND");
    let pool = PgPool::connect(&env("DATABASE_URL")).await?;
    PostgresStorage::setup(&pool).await?;
    sqlx_delete(&pool).await?;
    let queue = format!("bench-{kind}");
    // batch_size as wfq's claim batch (min(concurrency, 100)); events on.
    let config = Config::default()
        .queue(&queue)
        .batch_size(concurrency.min(100));
    let mut backend = PostgresStorage::new(&pool).with_config(config);
    // As for wfq and graphile-worker: from the enqueue to the last job done.
    let started = Instant::now();
    backend
        .push_bulk((0..jobs).map(|n| Job { n }).collect())
        .await?;

    let ctx = Arc::new(Ctx {
        http: reqwest::Client::new(),
        url: (kind == "http").then(|| {
            format!(
                "{}/workflow/market/info?workflow_id=wf_861ef31e94dcfb10e6e7",
                env("SIM_URL")
            )
        }),
        key: env("SIM_API_KEY"),
    });
    let worker_ctx = WorkerContext::new("apalis-peer");
    let watch_pool = pool.clone();
    let stopper = worker_ctx.clone();
    let watch_queue = queue.clone();
    let watcher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status NOT IN ('Done', 'Failed', 'Killed')",
            )
            .bind(&watch_queue)
            .fetch_one(&watch_pool)
            .await
            .unwrap_or(1);
            if open == 0 {
                let elapsed = started.elapsed();
                let _ = stopper.stop();
                return elapsed;
            }
        }
    });
    let worker = WorkerBuilder::new(&worker_ctx)
        .backend(backend.with_pubsub())
        .concurrency(concurrency)
        .data(ctx)
        .build(handle);
    worker.run().await?;
    let elapsed = watcher.await?;
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status <> 'Done'",
    )
    .bind(&queue)
    .fetch_one(&pool)
    .await?;
    println!(
        "figure=peer_apalis_postgres_{kind} value={:.0} unit=jobs/s target=reported jobs={jobs} seconds={:.2} not_done={failed} concurrency={concurrency}",
        f64::from(jobs) / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

async fn sqlx_delete(pool: &PgPool) -> Result<(), BoxDynError> {
    sqlx::query("DELETE FROM apalis.jobs").execute(pool).await?;
    Ok(())
}
