//! `wfq bench --quick` runs end to end on tiny sizes and prints every wfq
//! figure. Values are never asserted: they depend on the machine.

use std::process::Command;

use sqlx::Connection;

/// The server `wfq bench` creates its database on (as it chooses it).
fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Drops the bench's database when the test ends, passed or not.
struct DropDatabase(String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let name = self.0.clone();
        let dropped = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async move {
                let mut conn = sqlx::postgres::PgConnection::connect(&server_url()).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .map(|_| ())
            });
        if let Err(e) = dropped {
            eprintln!("could not drop database {}: {e}", self.0);
        }
    }
}

#[test]
fn bench_quick_prints_every_figure() {
    // A database of this test process's own: the bench drops and recreates
    // it, so a fixed name would be shared with any other suite running on
    // the same server at the same time.
    let database = format!("wfq_bench_smoke_{}", std::process::id());
    let _cleanup = DropDatabase(database.clone());
    let out = Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["bench", "--quick", "--runs", "200", "--database", &database])
        .env_remove("WFQ_DATABASE_URL")
        .env_remove("WFQ_CONFIG")
        .output()
        .expect("wfq runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wfq bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for figure in [
        "lifecycle_throughput",
        "pickup_latency_p50",
        "pickup_latency_p99",
        "pickup_busy_p50",
        "pickup_busy_p99",
        "polls_per_run_5s",
        "polls_per_run_60s",
        "polls_per_run_600s",
        "enqueue_batch",
        "enqueue_single_row",
        "inflight_worker_rss",
        "inflight_polls_per_s",
        "inflight_db_commits_per_s",
        "rescue_p50",
        "rescue_p99",
        "rescue_max",
        "limit_goodput",
        "limit_halved_recovery",
        "limit_restored_recovery",
        "stray_429_slowdown",
        "chain_throughput",
        "chain_handoff_p50",
        "chain_handoff_p99",
        "chain_handoff_idle_p50",
        "chain_handoff_idle_p99",
        "stray_429_slowdown_short",
        "web_worker_throughput_without_dashboards",
        "web_worker_throughput_with_10_dashboards",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("figure={figure} value="))),
            "no {figure} line in:\n{stdout}"
        );
    }
}
