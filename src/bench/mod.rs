//! `wfq bench`: throughput, pick-up latency, in-flight scale, polls per run,
//! enqueue rate and the rescue of a killed worker's runs, of wfq against the built-in simulator (latency zero),
//! on a database of its own (`wfq_bench`, dropped and recreated on every
//! run), with the worker as a child process (`wfq worker`), plus the peers
//! under `benches/peers/` when they are installed.
//!
//! Every figure is one line on stdout:
//! `figure=NAME value=V unit=U target=T [key=value...]`. Nothing here is
//! asserted: timing depends on the machine (see BENCHMARKS.md).

mod busy_pickup;
mod chains;
mod figures;
mod limits;
mod peers;
mod rescue;
mod web;
mod worker;

use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::parse_duration;

/// `wfq bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Runs of the lifecycle-throughput figure (inserted in one statement).
    #[arg(long, default_value_t = 20_000)]
    pub runs: u32,
    /// Single-row inserts of the pick-up latency figure.
    #[arg(long, default_value_t = 1_000)]
    pub pickup: u32,
    /// Runs in flight (polled on the default schedule) while the busy
    /// pick-up figure inserts new ones.
    #[arg(long, default_value_t = 1_000)]
    pub busy_inflight: u32,
    /// Single-row inserts of the busy pick-up figure.
    #[arg(long, default_value_t = 600)]
    pub busy_inserts: u32,
    /// Inserts per second of the busy pick-up figure.
    #[arg(long, default_value_t = 20.0)]
    pub busy_rate: f64,
    /// Runs kept in flight by the simulator for the in-flight scale figure.
    #[arg(long, default_value_t = 100_000)]
    pub inflight: u32,
    /// How long the in-flight figure measures once every run is submitted (e.g. 10m, 90s).
    #[arg(long, default_value = "10m")]
    pub inflight_duration: String,
    /// Rows of the enqueue-rate figure (one batch INSERT).
    #[arg(long, default_value_t = 100_000)]
    pub enqueue: u32,
    /// Worker concurrency (`worker.concurrency`) for every figure (and the peers).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Worker pool size (`database.max_connections`).
    #[arg(long, default_value_t = 20)]
    pub max_connections: u32,
    /// Rate limits (requests per second) of the limit figures.
    #[arg(long, value_delimiter = ',', default_values_t = [5.0, 20.0, 100.0, 500.0])]
    pub limits: Vec<f64>,
    /// Runs in flight when a worker of the rescue figure is killed.
    #[arg(long, default_value_t = 200)]
    pub rescue_runs: u32,
    /// Kills of the rescue figure (one worker of two each time).
    #[arg(long, default_value_t = 5)]
    pub rescue_kills: u32,
    /// Two-step chains of the chains figure (inserted in one statement).
    #[arg(long, default_value_t = 10_000)]
    pub chains: u32,
    /// Only these figures (comma separated: lifecycle, pickup, busy, inflight, polls, enqueue, rescue, limits (or one of goodput, limit_change, strays), web, chains, peers).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Small sizes and short durations: an end-to-end check, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// The database to (re)create on the server; never an existing user database.
    #[arg(long, default_value = "wfq_bench")]
    pub database: String,
    /// Where the peer programs live (see benches/peers/README.md).
    #[arg(long, default_value = "benches/peers")]
    pub peers_dir: PathBuf,
    /// Jobs per peer figure (default: --runs).
    #[arg(long)]
    pub peer_jobs: Option<u32>,
}

/// Why the benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A database statement failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A process or file could not be used.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Anything else, explained.
    #[error("{0}")]
    Failed(String),
}

/// Sizes after `--quick` is applied.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub args: BenchArgs,
    pub inflight_duration: Duration,
    pub pgbench_seconds: u32,
}

impl Plan {
    fn new(mut args: BenchArgs) -> Result<Plan, BenchError> {
        let mut inflight_duration = parse_duration(&args.inflight_duration)
            .map_err(|e| BenchError::Failed(format!("--inflight-duration: {e}")))?;
        let mut pgbench_seconds = 5;
        if args.quick {
            args.runs = args.runs.min(200);
            args.pickup = args.pickup.min(50);
            args.busy_inflight = args.busy_inflight.min(100);
            args.busy_inserts = args.busy_inserts.min(20);
            args.inflight = args.inflight.min(300);
            args.enqueue = args.enqueue.min(2_000);
            args.rescue_runs = args.rescue_runs.min(20);
            args.rescue_kills = args.rescue_kills.min(2);
            args.chains = args.chains.min(100);
            // A limit of a few per second makes a minute of work of any
            // batch: an end-to-end check needs one limit, not the sweep.
            args.limits.retain(|&l| l >= 20.0);
            args.limits.truncate(1);
            if args.limits.is_empty() {
                args.limits.push(50.0);
            }
            inflight_duration = inflight_duration.min(Duration::from_secs(2));
            pgbench_seconds = 1;
        }
        Ok(Plan {
            args,
            inflight_duration,
            pgbench_seconds,
        })
    }

    pub fn wants(&self, figure: &str) -> bool {
        if self.args.only.is_empty() {
            // Peers are part of the default run, but not of a quick check.
            return !(self.args.quick && figure == "peers");
        }
        self.args.only.iter().any(|f| f == figure)
    }
}

/// Prints one figure line.
pub(crate) fn figure(name: &str, value: impl Display, unit: &str, target: &str, extra: &str) {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(" {extra}")
    };
    println!("figure={name} value={value} unit={unit} target={target}{extra}");
}

/// The server to create the bench database on: `WFQ_DATABASE_URL`, else
/// `DATABASE_URL`, else the local server.
fn server_url() -> String {
    ["WFQ_DATABASE_URL", "DATABASE_URL"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Drops and recreates `name` on the server, migrates it, and returns its
/// URL and a pool.
async fn fresh_database(name: &str) -> Result<(String, PgPool), BenchError> {
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        || !name.starts_with("wfq_bench")
    {
        return Err(BenchError::Failed(format!(
            "--database {name}: must start with wfq_bench and be lowercase letters, digits and _ (it is dropped)"
        )));
    }
    let server_url = server_url();
    let server = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&server_url)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&server)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&server)
        .await?;
    server.close().await;
    let mut url = url::Url::parse(&server_url)
        .map_err(|e| BenchError::Failed(format!("cannot read the database URL: {e}")))?;
    url.set_path(name);
    let url = url.to_string();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    crate::store::migrate(&pool).await?;
    Ok((url, pool))
}

/// Empties the queue between figures, so each starts from the same table.
pub(crate) async fn reset(pool: &PgPool) -> Result<(), BenchError> {
    sqlx::query("TRUNCATE wfq.run_events, wfq.runs, wfq.workers RESTART IDENTITY CASCADE")
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE wfq.runs").execute(pool).await?;
    Ok(())
}

/// Runs the selected figures and prints them.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let plan = Plan::new(args)?;
    let (url, pool) = fresh_database(&plan.args.database).await?;
    println!(
        "# wfq bench: database {} (recreated), worker = `{} worker` child, concurrency {}, pool {}{}",
        plan.args.database,
        worker::worker_exe()?.display(),
        plan.args.concurrency,
        plan.args.max_connections,
        if plan.args.quick { ", QUICK sizes" } else { "" }
    );
    let mut lifecycle_rate = None;
    if plan.wants("lifecycle") {
        reset(&pool).await?;
        lifecycle_rate = Some(figures::lifecycle(&plan, &url, &pool).await?);
    }
    if plan.wants("pickup") {
        reset(&pool).await?;
        figures::pickup(&plan, &url, &pool).await?;
    }
    if plan.wants("busy") {
        reset(&pool).await?;
        busy_pickup::busy_pickup(&plan, &url, &pool).await?;
    }
    if plan.wants("polls") {
        reset(&pool).await?;
        figures::polls_per_run(&plan, &url, &pool).await?;
    }
    if plan.wants("enqueue") {
        reset(&pool).await?;
        figures::enqueue(&plan, &url, &pool).await?;
    }
    if plan.wants("rescue") {
        reset(&pool).await?;
        rescue::rescue(&plan, &url, &pool).await?;
    }
    if plan.wants("inflight") {
        reset(&pool).await?;
        figures::inflight(&plan, &url, &pool).await?;
    }
    // `limits` is all three; each also runs alone by its own name.
    if plan.wants("limits") || plan.wants("goodput") {
        for &limit in &plan.args.limits {
            reset(&pool).await?;
            limits::goodput(&plan, &url, &pool, limit).await?;
        }
    }
    if plan.wants("limits") || plan.wants("limit_change") {
        reset(&pool).await?;
        limits::limit_change(&plan, &url, &pool, 100.0).await?;
    }
    if plan.wants("limits") || plan.wants("strays") {
        reset(&pool).await?;
        limits::stray_429s(&plan, &url, &pool).await?;
    }
    if plan.wants("web") {
        web::web(&plan, &url, &pool).await?;
    }
    if plan.wants("chains") {
        reset(&pool).await?;
        chains::chains(&plan, &url, &pool).await?;
    }
    if plan.wants("peers") {
        reset(&pool).await?;
        peers::run(&plan, &url, &pool, lifecycle_rate).await?;
    }
    pool.close().await;
    Ok(())
}
