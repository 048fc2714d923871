//! Secrets stay secret: with a right and a wrong API key in play, neither
//! appears in the worker's logs (at trace level), in any row or event, or in
//! any error text.

mod common;

use std::process::Stdio;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::store::{self, NewRun};

const WRONG_KEY: &str = "sk-wrong-7f3a9c21d4e5b6a8";

#[sqlx::test]
async fn api_keys_appear_in_no_log_row_or_error(_: PgPoolOptions, connect: PgConnectOptions) {
    let url = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(0, 100, 50).await;
    let dir = std::env::temp_dir().join(format!("wfq-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let name = pool
        .connect_options()
        .get_database()
        .unwrap_or("db")
        .to_owned();
    let config = dir.join(format!("{name}.toml"));
    let log = dir.join(format!("{name}.log"));
    std::fs::write(
        &config,
        format!(
            "[worker]\nfallback_poll = \"200ms\"\n[poll]\ninitial = \"50ms\"\nmax = \"100ms\"\n\
             [providers.chenyu]\nkind = \"chenyu\"\nbase_url = \"{0}\"\napi_key_env = \"GOOD_KEY\"\n\
             [providers.chenyu_stale]\nkind = \"chenyu\"\nbase_url = \"{0}\"\napi_key_env = \"STALE_KEY\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    let good = enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({})).await;
    let refused = store::enqueue_run(
        &pool,
        &NewRun {
            provider: Some("chenyu_stale".into()),
            workflow_id: TEXT_TO_IMAGE.into(),
            inputs: serde_json::json!({}),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["worker", "--log-json", "--config"])
        .arg(&config)
        .env("DATABASE_URL", &url)
        .env("GOOD_KEY", API_KEY)
        .env("STALE_KEY", WRONG_KEY)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(
        &pool,
        &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {good})"),
        Duration::from_secs(30),
    )
    .await;
    wait_for(
        &pool,
        &format!("EXISTS (SELECT 1 FROM wfq.run_events WHERE run_id = {refused} AND kind = 'manifest_unclear')"),
        Duration::from_secs(30),
    )
    .await;
    let pid = worker.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(worker.wait().await.unwrap().success());

    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.len() > 1000, "trace logs were written");
    assert!(logs.contains("401"), "the refusal itself is logged");
    let everything: String = sqlx::query_scalar(
        "SELECT coalesce((SELECT string_agg(row_to_json(r)::text, '\n') FROM wfq.runs r), '') || \
                coalesce((SELECT string_agg(row_to_json(e)::text, '\n') FROM wfq.run_events e), '')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        everything.contains("\"account_refused\": true"),
        "the refusal is recorded"
    );
    for key in [API_KEY, WRONG_KEY] {
        assert!(!logs.contains(key), "an API key is in the logs");
        assert!(!everything.contains(key), "an API key is in the database");
    }
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&log);
    sim.shutdown().await;
}
