//! The database goes away and comes back: a worker process behind a TCP
//! proxy that we can cut. It must not crash or spin while the database is
//! unreachable, and must reconnect, re-subscribe to LISTEN and finish every
//! run afterwards.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::cut_proxy::Proxy;
use common::*;

#[sqlx::test]
async fn workers_ride_out_a_database_outage(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect.clone())
        .await
        .unwrap();
    let proxy = Proxy::start(format!("{}:{}", connect.get_host(), connect.get_port())).await;
    let via_proxy = format!(
        "postgres://{}@127.0.0.1:{}/{}",
        connect.get_username(),
        proxy.port,
        connect.get_database().unwrap_or("postgres")
    );
    let sim = start_sim(0, 500, 100).await;
    let dir = std::env::temp_dir().join(format!("wfq-outage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!("{}.toml", connect.get_database().unwrap_or("db")));
    // A 60 s fallback poll: after the outage only LISTEN can wake the worker quickly.
    std::fs::write(
        &config,
        format!(
            "[worker]\nconcurrency = 16\nlease = \"3s\"\nfallback_poll = \"60s\"\n\
             [http]\ntimeout = \"1s\"\n[poll]\ninitial = \"100ms\"\nmax = \"300ms\"\n\
             [providers.chenyu]\nkind = \"chenyu\"\nbase_url = \"{}\"\napi_key_env = \"OUTAGE_KEY\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) \
         SELECT 'wf_861ef31e94dcfb10e6e7', jsonb_build_object('n3_seed', g) FROM generate_series(1, 100) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let log_path = dir.join(format!("{}.log", connect.get_database().unwrap_or("db")));
    // tokio's Command: the proxy and the simulator live on this test's
    // runtime, so waiting for the child must not block it.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["worker", "--config"])
        .arg(&config)
        .env("DATABASE_URL", &via_proxy)
        .env("OUTAGE_KEY", API_KEY)
        .env("RUST_LOG", "info,sqlx=error")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().expect("running").to_string();

    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE state = 'succeeded') >= 10",
        Duration::from_secs(30),
    )
    .await;
    proxy.cut();
    let before = proxy.attempts.load(Ordering::SeqCst);
    let cut_at = std::time::Instant::now();
    // The outage itself: about three seconds without a database (longer
    // on a busy machine: the rate below is per second actually measured).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = proxy.attempts.load(Ordering::SeqCst) - before;
    let outage = cut_at.elapsed().as_secs_f64();
    let restored_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    proxy.restore();
    let rate = during as f64 / outage;
    assert!(
        rate < 20.0,
        "{during} connection attempts in {outage:.1} s: the worker is spinning"
    );

    wait_all_final(&pool, Duration::from_secs(60)).await;
    // New rows after the outage are picked up through the re-established
    // LISTEN (the fallback poll is 60 s): once the worker listens again on
    // a session opened after the outage, a NOTIFY wakes it at once.
    wait_for(
        &pool,
        &format!(
            "EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
             AND query ILIKE 'LISTEN%wfq_runs_due%' AND backend_start > '{}'::timestamptz)",
            restored_at.to_rfc3339()
        ),
        Duration::from_secs(120),
    )
    .await;
    sqlx::query("INSERT INTO wfq.runs (workflow_id) SELECT 'wf_861ef31e94dcfb10e6e7' FROM generate_series(1, 5)")
        .execute(&pool)
        .await
        .unwrap();
    wait_all_final(&pool, Duration::from_secs(45)).await;

    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = child.wait().await.unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "exit 0 after SIGTERM\n{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        logs.contains("is the database reachable?") || logs.contains("LISTEN connection lost"),
        "the outage is logged clearly\n{logs}"
    );
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(succeeded, 105);
    assert!(sim.ledger().iter().all(|e| e.charges == 1));
    assert_eq!(sim.ledger().len(), 105);
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&log_path);
    sim.shutdown().await;
}
