//! Files: a worker configuration with `[storage]`, an S3-compatible server
//! (moto) for the tests that need one, and reads of `wfq.run_files`.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use wfq::config::{Config, Environment};
use wfq::sim::SimServer;

use super::API_KEY;

/// Test credentials for moto (it accepts any).
pub const S3_KEY_ID: &str = "wfq-test-key-id";
/// The secret that must never show up anywhere.
pub const S3_SECRET: &str = "wfq-test-secret-5d1e9c0b7a";

struct Env(HashMap<String, String>);

impl Environment for Env {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// A configuration like `common::config`, plus `storage` (TOML lines of
/// `[storage]`, without the header) and `extra` TOML at the end.
pub fn config_with_storage(sim: &SimServer, worker_id: &str, storage: &str, extra: &str) -> Config {
    let text = format!(
        r#"
        [worker]
        id = "{worker_id}"
        concurrency = 16
        lease = "3s"
        fallback_poll = "250ms"
        shutdown_grace = "5s"
        [http]
        timeout = "2s"
        connect_timeout = "500ms"
        [poll]
        initial = "50ms"
        max = "200ms"
        jitter = 0.1
        [submit]
        initial = "100ms"
        max = "400ms"
        max_attempts = 6
        [storage]
        initial = "50ms"
        max = "200ms"
        jitter = 0.0
        {storage}
        [providers.chenyu]
        kind = "chenyu"
        base_url = "{}"
        api_key_env = "TEST_CHENYU_KEY"
        {extra}
        "#,
        sim.base_url()
    );
    let env = Env(HashMap::from([
        ("TEST_CHENYU_KEY".to_owned(), API_KEY.to_owned()),
        ("AWS_ACCESS_KEY_ID".to_owned(), S3_KEY_ID.to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), S3_SECRET.to_owned()),
    ]));
    Config::from_toml(&text, "test config", &env).expect("test config is valid")
}

/// A fresh local store directory.
pub fn temp_store() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wfq-test-store-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// An S3-compatible server: `WFQ_TEST_S3_ENDPOINT` when set (CI starts
/// moto there), else a moto_server of our own when one is installed.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _child: Option<tokio::process::Child>,
}

/// Whether the S3 tests must run: in CI (`CI` set, not `0`/`false`), or
/// when `.ci/run` started a server for them (`WFQ_TEST_S3_REQUIRED=1`).
fn s3_required() -> bool {
    let set = |name: &str| {
        std::env::var(name)
            .is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
    };
    set("CI") || set("WFQ_TEST_S3_REQUIRED")
}

/// No S3-compatible server: a failure where one is required, else `None`
/// (the test is skipped, with a note).
fn no_s3(why: &str) -> Option<S3Server> {
    if s3_required() {
        panic!(
            "the S3 tests need an S3-compatible server ({why}): set WFQ_TEST_S3_ENDPOINT, or install moto_server (pip install 'moto[server]')"
        );
    }
    eprintln!(
        "skipping: {why}; `pip install 'moto[server]'` (or set WFQ_TEST_S3_ENDPOINT) to run the S3 tests"
    );
    None
}

impl S3Server {
    /// `None` (the test is skipped, with a note) when neither is available
    /// and none is required; where one is required (CI, or `.ci/run`
    /// started one) a missing or silent server fails the test.
    pub async fn find() -> Option<S3Server> {
        if let Ok(endpoint) = std::env::var("WFQ_TEST_S3_ENDPOINT")
            && !endpoint.trim().is_empty()
        {
            return Some(S3Server {
                endpoint: endpoint.trim().trim_end_matches('/').to_owned(),
                _child: None,
            });
        }
        if std::env::var("WFQ_TEST_S3_REQUIRED").is_ok_and(|v| v.trim() == "1") {
            panic!("WFQ_TEST_S3_REQUIRED=1 but WFQ_TEST_S3_ENDPOINT is not set");
        }
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            listener.local_addr().expect("addr").port()
        };
        let child = tokio::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => return no_s3(&format!("no WFQ_TEST_S3_ENDPOINT and no moto_server ({e})")),
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        // Ready when it answers; bounded by its start-up, not by a window.
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if http
                .get(format!("{endpoint}/moto-api/"))
                .send()
                .await
                .is_ok()
            {
                return Some(S3Server {
                    endpoint,
                    _child: Some(child),
                });
            }
            // A pyenv shim for a version without moto starts and exits.
            if let Ok(Some(status)) = child.try_wait() {
                return no_s3(&format!("moto_server exited ({status}) without serving"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto_server did not start on port {port} within 30 s");
    }

    /// Creates a bucket of its own for one test.
    pub async fn bucket(&self) -> String {
        let name = format!("wfq-test-{}", uuid::Uuid::new_v4().simple());
        let status = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint))
            .send()
            .await
            .expect("create bucket")
            .status();
        assert!(status.is_success(), "create bucket: {status}");
        name
    }

    /// The bytes of an object (moto serves them without a signature).
    pub async fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        let response = reqwest::Client::new()
            .get(format!("{}/{bucket}/{key}", self.endpoint))
            .send()
            .await
            .expect("get object");
        assert!(response.status().is_success(), "{}", response.status());
        response.bytes().await.expect("body").to_vec()
    }
}

/// The run's files, as `(direction, key, position, state, error_code,
/// stored_location, sha256, attempts)`.
pub type FileFacts = (
    String,
    String,
    i32,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i32,
);

/// Reads the run's files.
pub async fn files_of(pool: &PgPool, run_id: i64) -> Vec<FileFacts> {
    sqlx::query_as(
        "SELECT direction, key, position, state, error_code, stored_location, sha256, attempts \
         FROM wfq.run_files WHERE run_id = $1 ORDER BY direction, key, position",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .expect("run files")
}

/// Waits until the run's media outputs are settled (not NULL, not pending).
pub async fn wait_media_settled(pool: &PgPool, run_id: i64) {
    super::wait_for(
        pool,
        &format!(
            "(SELECT media_state IS NOT NULL AND media_state <> 'pending' FROM wfq.runs WHERE id = {run_id})"
        ),
        Duration::from_secs(60),
    )
    .await;
}

/// `(media_state, mirrored_outputs)` of a run.
pub async fn media_of(pool: &PgPool, run_id: i64) -> (Option<String>, Option<serde_json::Value>) {
    sqlx::query_as("SELECT media_state, mirrored_outputs FROM wfq.runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(pool)
        .await
        .expect("run")
}

/// SHA-256 of bytes, lowercase hex.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
