//! `wfq bench --quick` runs end to end on tiny sizes and prints every wfq
//! figure. Values are never asserted: they depend on the machine.

use std::process::Command;

#[test]
fn bench_quick_prints_every_figure() {
    let out = Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args([
            "bench",
            "--quick",
            "--runs",
            "200",
            "--database",
            "wfq_bench_smoke",
        ])
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
        "stray_429_slowdown_short",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("figure={figure} value="))),
            "no {figure} line in:\n{stdout}"
        );
    }
}
