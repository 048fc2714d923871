//! The queues users would pick instead, on the same server and database,
//! against the same simulator: graphile-worker (Node) and apalis-postgres
//! (Rust), each with a job that makes one HTTP request to the simulator and
//! a no-op job. The programs live in `benches/peers/` (see its README); a
//! peer that is not installed is reported as skipped, with the reason.

use std::path::Path;
use std::time::Duration;

use sqlx::PgPool;
use tokio::process::Command;

use super::worker::{API_KEY, start_sim};
use super::{BenchError, Plan, figure};

struct Peer {
    name: &'static str,
    program: std::path::PathBuf,
    args: Vec<String>,
    /// Why it cannot run, when it cannot.
    missing: Option<String>,
}

fn peers(dir: &Path) -> Vec<Peer> {
    let graphile = dir.join("graphile-worker");
    let graphile_missing = if !graphile.join("node_modules/graphile-worker").is_dir() {
        Some(format!(
            "not installed: run `npm install` in {}",
            graphile.display()
        ))
    } else {
        None
    };
    let apalis = dir.join("apalis-postgres");
    let apalis_bin = apalis.join("target/release/apalis-peer");
    let apalis_missing = if !apalis_bin.is_file() {
        Some(format!(
            "not built: run `cargo build --release` in {}",
            apalis.display()
        ))
    } else {
        None
    };
    vec![
        Peer {
            name: "graphile-worker",
            program: "node".into(),
            args: vec![graphile.join("bench.js").display().to_string()],
            missing: graphile_missing,
        },
        Peer {
            name: "apalis-postgres",
            program: apalis_bin,
            args: vec![],
            missing: apalis_missing,
        },
    ]
}

/// Runs each installed peer with both jobs; prints their figures and the
/// ratio of wfq's lifecycle rate to graphile-worker's one-request job rate.
pub(crate) async fn run(
    plan: &Plan,
    url: &str,
    pool: &PgPool,
    wfq_rate: Option<f64>,
) -> Result<(), BenchError> {
    let jobs = plan.args.peer_jobs.unwrap_or(plan.args.runs);
    let sim = start_sim(Duration::ZERO, Duration::ZERO, Duration::ZERO).await?;
    let mut graphile_http = None;
    for peer in peers(&plan.args.peers_dir) {
        for kind in ["http", "noop"] {
            let name = format!("peer_{}_{kind}", peer.name.replace('-', "_"));
            if let Some(why) = &peer.missing {
                figure(
                    &name,
                    "skipped",
                    "jobs/s",
                    "reported",
                    &format!("reason=\"{why}\""),
                );
                continue;
            }
            super::reset(pool).await?;
            let out = Command::new(&peer.program)
                .args(&peer.args)
                .env("DATABASE_URL", url)
                .env("SIM_URL", sim.base_url())
                .env("SIM_API_KEY", API_KEY)
                .env("JOBS", jobs.to_string())
                .env("CONCURRENCY", plan.args.concurrency.to_string())
                .env("KIND", kind)
                .kill_on_drop(true)
                .output()
                .await;
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    figure(
                        &name,
                        "skipped",
                        "jobs/s",
                        "reported",
                        &format!("reason=\"cannot start {}: {e}\"", peer.program.display()),
                    );
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().find(|l| l.starts_with("figure="));
            match (out.status.success(), line) {
                (true, Some(line)) => {
                    println!("{line}");
                    let value = line
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("value="))
                        .and_then(|v| v.parse::<f64>().ok());
                    if peer.name == "graphile-worker" && kind == "http" {
                        graphile_http = value;
                    }
                }
                _ => {
                    let err = String::from_utf8_lossy(&out.stderr);
                    let last = err.lines().last().unwrap_or("").replace('"', "'");
                    figure(
                        &name,
                        "failed",
                        "jobs/s",
                        "reported",
                        &format!("reason=\"{} {last}\"", out.status),
                    );
                }
            }
        }
    }
    sim.shutdown().await;
    // Peers create their own schemas in the bench database; leave them for
    // inspection: the next `wfq bench` drops the whole database.
    match (wfq_rate, graphile_http) {
        (Some(wfq), Some(graphile)) if graphile > 0.0 => figure(
            "wfq_vs_graphile_http",
            format!("{:.2}", wfq / graphile),
            "x",
            ">=1.5",
            &format!(
                "wfq_runs_per_s={wfq:.0} (2 provider calls per run) graphile_jobs_per_s={graphile:.0} (1 request per job)"
            ),
        ),
        _ => figure(
            "wfq_vs_graphile_http",
            "unavailable",
            "x",
            ">=1.5",
            "reason=\"needs the lifecycle figure and the graphile-worker http figure in the same run\"",
        ),
    }
    Ok(())
}
