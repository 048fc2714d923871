//! GPTBots takes files by URL: a file in an S3 store (moto) reaches it as a
//! presigned URL it can fetch, an http(s) input as it was given, and a
//! local file is refused before anything is sent. A presigned URL is as
//! good as a password for its file, so it must appear nowhere but in the
//! request: not in the database (runs, files, events) and not in the
//! worker's logs, which is why the worker here is a `wfq worker` process
//! logging at debug level.

mod common;

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::files::*;
use common::*;
use wfq::sim::SimServer;

const KEY_ENV: &str = "FILES_LINKS_KEY";

fn worker_toml(sim: &SimServer, s3: &S3Server, bucket: &str) -> String {
    format!(
        r#"
[worker]
id = "links"
concurrency = 4
lease = "30s"
fallback_poll = "250ms"
shutdown_grace = "2s"
[http]
timeout = "5s"
connect_timeout = "1s"
[poll]
initial = "50ms"
max = "200ms"
[storage]
url = "s3://{bucket}/media"
endpoint = "{}"
region = "us-east-1"
[providers.chenyu]
kind = "chenyu"
base_url = "{}"
api_key_env = "{KEY_ENV}"
[providers.gptbots]
kind = "gptbots"
base_url = "{}"
api_key_env = "{KEY_ENV}"
"#,
        s3.endpoint,
        sim.base_url(),
        sim.gptbots_base_url("news"),
    )
}

/// Whether any text of the run's rows, files or events contains `needle`.
async fn recorded_anywhere(pool: &PgPool, needle: &str) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM wfq.runs r WHERE r::text LIKE '%' || $1 || '%') \
         OR EXISTS (SELECT 1 FROM wfq.run_files f WHERE f::text LIKE '%' || $1 || '%') \
         OR EXISTS (SELECT 1 FROM wfq.run_events e WHERE e::text LIKE '%' || $1 || '%')",
    )
    .bind(needle)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn gptbots_gets_files_by_url_and_presigned_urls_are_never_recorded(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let Some(s3) = S3Server::find().await else {
        return;
    };
    let url = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let bucket = s3.bucket().await;
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend((0..3000).map(|i| (i % 253) as u8));
    // The producer put the picture into the store (moto takes an unsigned PUT).
    let object = format!("{}/{bucket}/media/inputs/boat.png", s3.endpoint);
    let put = reqwest::Client::new()
        .put(&object)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());

    let sim = start_sim(20, 50, 20).await;
    let stored = enqueue_on(
        &pool,
        "gptbots",
        "news",
        json!({"topic": "boats", "picture": {"$file": "inputs/boat.png"}}),
    )
    .await;
    let public = enqueue_on(
        &pool,
        "gptbots",
        "news",
        json!({"topic": "boats", "picture": {"$file": object}}),
    )
    .await;
    let local = enqueue_on(
        &pool,
        "gptbots",
        "news",
        json!({"topic": "boats", "picture": {"$file": "file:///tmp/boat.png"}}),
    )
    .await;

    let dir = temp_store();
    let config = dir.join("worker.toml");
    std::fs::write(&config, worker_toml(&sim, &s3, &bucket)).unwrap();
    let log = dir.join("worker.log");
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["worker", "--config"])
        .arg(&config)
        .env("DATABASE_URL", &url)
        .env(KEY_ENV, API_KEY)
        .env("AWS_ACCESS_KEY_ID", S3_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        .env("RUST_LOG", "debug,sqlx=warn,hyper=info,h2=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts");
    wait_all_final(&pool, Duration::from_secs(60)).await;
    let _ = worker.kill().await;
    let logs = std::fs::read_to_string(&log).unwrap_or_default();

    let ledger = sim.gptbots_ledger();
    assert_eq!(ledger.len(), 2, "two runs sent, the local file's not");
    let input_of = |id: i64, row: &wfq::store::RunRow| {
        ledger
            .iter()
            .find(|e| Some(e.workflow_run_id.as_str()) == row.provider_run_id.as_deref())
            .unwrap_or_else(|| panic!("run {id} not at GPTBots"))
            .input["picture"]
            .as_str()
            .expect("a URL")
            .to_owned()
    };

    // The store's file: a presigned URL GPTBots can fetch.
    let a = run(&pool, stored).await;
    assert_eq!(a.state, "succeeded", "{:?}\n{logs}", a.error_message);
    let presigned = input_of(stored, &a);
    assert!(
        presigned.starts_with(&format!("{}/{bucket}/media/inputs/boat.png?", s3.endpoint))
            && presigned.contains("X-Amz-Signature="),
        "{presigned}"
    );
    let fetched = reqwest::get(&presigned).await.unwrap();
    assert!(fetched.status().is_success(), "{}", fetched.status());
    assert_eq!(fetched.bytes().await.unwrap().to_vec(), bytes);
    // What is recorded is the file's location, never the URL.
    let location = format!("s3://{bucket}/media/inputs/boat.png");
    assert_eq!(a.sent_inputs.as_ref().unwrap()["picture"], json!(location));
    let signature = presigned
        .split("X-Amz-Signature=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();
    for secret in [
        "X-Amz-Signature",
        "X-Amz-Credential",
        signature.as_str(),
        S3_SECRET,
    ] {
        if recorded_anywhere(&pool, secret).await {
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT r::text FROM wfq.runs r WHERE r::text LIKE '%' || $1 || '%' UNION ALL                  SELECT e::text FROM wfq.run_events e WHERE e::text LIKE '%' || $1 || '%'",
            )
            .bind(secret)
            .fetch_all(&pool)
            .await
            .unwrap();
            panic!("{secret} recorded: {rows:#?}");
        }
        assert!(!logs.contains(secret), "{secret} logged:\n{logs}");
    }
    assert!(
        logs.contains("submit accepted"),
        "the log is the worker's: {logs}"
    );

    // An http(s) input: handed over as given.
    let b = run(&pool, public).await;
    assert_eq!(b.state, "succeeded", "{:?}", b.error_message);
    assert_eq!(input_of(public, &b), object);

    // A local file cannot be fetched by GPTBots: refused, nothing sent.
    let c = run(&pool, local).await;
    assert_eq!(c.error_code.as_deref(), Some("FILE_NEEDS_URL"));
    assert!(
        c.error_message
            .as_deref()
            .unwrap_or_default()
            .starts_with("inputs.picture: GPTBots takes files by URL only"),
        "{:?}",
        c.error_message
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    pool.close().await;
}

/// GPTBots cannot fetch the presigned URL it was given and fails the run
/// quoting it whole in its `errorMessage` (the simulator's `unfetchable`
/// workflow), besides echoing it in `input`. The run fails with the
/// message cut to the link's path, and nothing of the signature reaches a
/// row, an event or a log line.
#[sqlx::test]
async fn a_gptbots_failure_quoting_the_presigned_url_records_nothing_of_its_signature(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let Some(s3) = S3Server::find().await else {
        return;
    };
    let url = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let bucket = s3.bucket().await;
    let object = format!("{}/{bucket}/media/inputs/boat.png", s3.endpoint);
    let put = reqwest::Client::new()
        .put(&object)
        .body(b"\x89PNG\r\n\x1a\nboat".to_vec())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());

    let sim = start_sim(20, 50, 20).await;
    let id = enqueue_on(
        &pool,
        "gptbots_unfetchable",
        "unfetchable",
        json!({"topic": "boats", "picture": {"$file": "inputs/boat.png"}}),
    )
    .await;
    let dir = temp_store();
    let config = dir.join("worker.toml");
    let toml = format!(
        r#"{}
[providers.gptbots_unfetchable]
kind = "gptbots"
base_url = "{}"
api_key_env = "{KEY_ENV}"
"#,
        worker_toml(&sim, &s3, &bucket),
        sim.gptbots_base_url("unfetchable"),
    );
    std::fs::write(&config, toml).unwrap();
    let log = dir.join("worker.log");
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["worker", "--config"])
        .arg(&config)
        .env("DATABASE_URL", &url)
        .env(KEY_ENV, API_KEY)
        .env("AWS_ACCESS_KEY_ID", S3_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        .env("RUST_LOG", "debug,sqlx=warn,hyper=info,h2=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts");
    wait_all_final(&pool, Duration::from_secs(60)).await;
    let _ = worker.kill().await;
    let logs = std::fs::read_to_string(&log).unwrap_or_default();

    let ledger = sim.gptbots_ledger();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    let presigned = ledger[0].input["picture"]
        .as_str()
        .expect("a URL")
        .to_owned();
    assert!(presigned.contains("X-Amz-Signature="), "{presigned}");
    let failed = run(&pool, id).await;
    assert_eq!(failed.state, "failed", "{logs}");
    let path = presigned.split('?').next().unwrap();
    assert_eq!(
        failed.error_message.as_deref(),
        Some(format!("cannot fetch {path}: 403 Forbidden").as_str()),
        "the message says what failed, without the query"
    );
    let value_of = |name: &str| {
        presigned
            .split(&format!("{name}="))
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap()
            .to_owned()
    };
    let (signature, credential) = (value_of("X-Amz-Signature"), value_of("X-Amz-Credential"));
    for secret in [
        "X-Amz-Signature",
        signature.as_str(),
        credential.as_str(),
        S3_SECRET,
    ] {
        if recorded_anywhere(&pool, secret).await {
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT r::text FROM wfq.runs r WHERE r::text LIKE '%' || $1 || '%' UNION ALL \
                 SELECT e::text FROM wfq.run_events e WHERE e::text LIKE '%' || $1 || '%'",
            )
            .bind(secret)
            .fetch_all(&pool)
            .await
            .unwrap();
            panic!("{secret} recorded: {rows:#?}");
        }
        assert!(!logs.contains(secret), "{secret} logged:\n{logs}");
    }
    assert!(
        logs.contains("submit accepted"),
        "the log is the worker's: {logs}"
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    pool.close().await;
}
