//! SIGTERM: stop claiming, let steps in flight finish within the grace
//! period, give back the leases of what did not finish, exit 0.

mod common;

use std::process::Stdio;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::sim::{Faults, SimServer};

fn write_config(sim: &SimServer, name: &str, grace: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wfq-shutdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    // A long lease: if it were not given back, nobody could continue for two minutes.
    std::fs::write(
        &path,
        format!(
            "[worker]\nconcurrency = 8\nlease = \"120s\"\nfallback_poll = \"200ms\"\nshutdown_grace = \"{grace}\"\n\
             [http]\ntimeout = \"5s\"\n[poll]\ninitial = \"100ms\"\nmax = \"200ms\"\n\
             [providers.chenyu]\nkind = \"chenyu\"\nbase_url = \"{}\"\napi_key_env = \"SHUTDOWN_KEY\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    path
}

fn spawn(config: &std::path::Path, database_url: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["worker", "--config"])
        .arg(config)
        .env("DATABASE_URL", database_url)
        .env("SHUTDOWN_KEY", API_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn sigterm(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the worker exits after SIGTERM")
        .unwrap()
}

async fn leased(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE lease_owner IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn steps_in_flight_finish_within_the_grace_period(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(0, 60_000, 100).await;
    // Every answer takes a second: SIGTERM lands while submits are in flight.
    sim.set_faults(Faults {
        latency: Duration::from_secs(1),
        ..Default::default()
    });
    for _ in 0..8 {
        enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({})).await;
    }
    let config = write_config(&sim, "grace", "10s");
    let mut worker = spawn(&config, &url);
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE state = 'submitting') = 8",
        Duration::from_secs(30),
    )
    .await;
    let status = sigterm(&mut worker).await;
    assert!(status.success(), "{status:?}");
    // Each submit in flight completed and was recorded before the exit.
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'running'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(running, 8);
    assert_eq!(leased(&pool).await, 0);
    assert_eq!(sim.ledger().len(), 8);
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

#[sqlx::test]
async fn steps_past_the_grace_period_are_given_back_at_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(0, 200, 100).await;
    sim.set_faults(Faults {
        latency: Duration::from_secs(3),
        ..Default::default()
    });
    for _ in 0..4 {
        enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({})).await;
    }
    let config = write_config(&sim, "short", "200ms");
    let mut first = spawn(&config, &url);
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE state = 'submitting') = 4",
        Duration::from_secs(30),
    )
    .await;
    let status = sigterm(&mut first).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        leased(&pool).await,
        0,
        "unfinished runs are given back, not left to a 120 s lease"
    );

    // The next worker continues at once, with the same keys: no second charge.
    sim.set_faults(Faults::default());
    let mut second = spawn(&config, &url);
    wait_all_final(&pool, Duration::from_secs(30)).await;
    assert!(sigterm(&mut second).await.success());
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 4);
    assert!(ledger.iter().all(|e| e.charges == 1));
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}
