//! The terminal views as users run them: `wfq top --once` and
//! `wfq enqueue --wait` as child processes against the test database, a
//! worker and the simulator in-process, and the chenyu progress client.

mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::Command;

use wfq::config::{ApiKey, HttpConfig};
use wfq::providers::chenyu::ChenyuClient;
use wfq::providers::{SubmitOutcome, SubmitRequest};
use wfq::sim::SimServer;

use common::*;

/// `wfq ARGS` with the test database; waited on asynchronously, because the
/// simulator and the worker run on this test's runtime.
async fn wfq(database_url: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wfq"));
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("WFQ_DATABASE_URL")
        .env_remove("WFQ_CONFIG")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        command.env(k, v);
    }
    let child = command.spawn().expect("wfq starts");
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("wfq ends within a minute")
        .expect("wfq runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A worker.toml naming the simulator's chenyu, its key in `TEST_KEY_VAR`.
fn config_file(pool: &PgPool, sim: &SimServer) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wfq-terminal-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "worker-{}.toml",
        pool.connect_options().get_database().unwrap_or("x")
    ));
    std::fs::write(
        &path,
        format!(
            "[providers.chenyu]\nkind = \"chenyu\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY_VAR\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    path
}

#[sqlx::test]
async fn top_once_prints_counts_by_provider_and_state(pool: PgPool) {
    let db = database_url(&pool.connect_options());
    for _ in 0..3 {
        enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({})).await;
    }
    let canceled = enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({})).await;
    wfq::store::cancel_run(&pool, canceled, None, &[])
        .await
        .unwrap();
    enqueue_on(&pool, "news", "news", serde_json::json!({})).await;
    let running = enqueue(&pool, VIDEO, serde_json::json!({})).await;
    sqlx::query(
        "UPDATE wfq.runs SET state = 'running', provider_run_id = 'wfrun_x', currency = 'CNY', \
         frozen_amount = 0.50000000, submitted_at = now() WHERE id = $1",
    )
    .bind(running)
    .execute(&pool)
    .await
    .unwrap();

    // A profile paused for its balance shows with its kind and what ends it.
    wfq::store::pause_provider(&pool, "chenyu", "w1", "balance", "INSUFFICIENT_BALANCE")
        .await
        .unwrap();

    let out = wfq(&db, &["top", "--once"], &[]).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("PAUSED: provider profile `chenyu` (balance)")
            && stdout.contains("until the account's balance covers them"),
        "{stdout}"
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !stdout.contains('\x1b'),
        "no ANSI when not a terminal: {stdout:?}"
    );
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` row in:\n{stdout}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        line("provider").starts_with(
            "provider waiting queued submitting running succeeded failed canceled finished/1m"
        ),
        "{stdout}"
    );
    //                 waiting queued submitting running succeeded failed canceled finished/1m frozen
    assert_eq!(line("chenyu"), "chenyu 0 3 0 1 0 0 1 1 0.50000000 CNY");
    assert_eq!(line("news"), "news 0 1 0 0 0 0 0 0 -");
    assert_eq!(line("total"), "total 0 4 0 1 0 0 1 1 0.50000000 CNY");
}

#[sqlx::test]
async fn enqueue_wait_follows_a_run_to_success_with_progress(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let db = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(200, 1000, 100).await;
    // The first worker submits the run and then leaves it alone: its first
    // status check is an hour away, so the run stays `running` in wfq while
    // the CLI re-reads it and asks chenyu for its progress, however slow
    // the machine. A second worker finishes it once that was shown.
    let mut submitter = config(
        &sim,
        "terminal-submitter",
        "[poll]\ninitial = \"1h\"\nmax = \"1h\"\n",
    );
    submitter.worker.concurrency = 1;
    let first = start_worker(submitter, pool.clone());
    let config_path = config_file(&pool, &sim);
    let mut child = Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args([
            "enqueue",
            "--config",
            config_path.to_str().unwrap(),
            "--workflow",
            TEXT_TO_IMAGE,
            "--inputs",
            r#"{"n6_text": "a lighthouse"}"#,
            "--wait",
        ])
        .env("DATABASE_URL", &db)
        .env("TEST_KEY_VAR", API_KEY)
        .env_remove("WFQ_DATABASE_URL")
        .env_remove("WFQ_CONFIG")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wfq starts");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stderr_reader = {
        let stderr = child.stderr.take().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = lines_tx.send(line);
            }
        })
    };
    // Running, with the provider's progress (or its queue place).
    let mut seen = Vec::new();
    let shown = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.recv().await {
            let progress = line.contains("(chenyu): running")
                && (line.contains('%') || line.contains("queued at the provider"));
            seen.push(line);
            if progress {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(shown, Ok(true), "no progress line: {seen:?}");
    first.stop().await;
    sqlx::query("UPDATE wfq.runs SET due_at = now() WHERE state = 'running'")
        .execute(&pool)
        .await
        .unwrap();
    let worker = start_worker(config(&sim, "terminal-test", ""), pool.clone());
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("wfq ends within a minute")
        .expect("wfq runs");
    stderr_reader.await.unwrap();
    while let Ok(line) = lines.try_recv() {
        seen.push(line);
    }
    let stderr = seen.join("\n") + "\n";
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        !stderr.contains('\r'),
        "plain lines when not a terminal: {stderr:?}"
    );
    assert!(
        stderr.lines().any(|l| l.contains("(chenyu): running")),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains('%') || l.contains("queued at the provider")),
        "the provider's progress is shown: {stderr}"
    );
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or("")
            .contains("(chenyu): succeeded"),
        "{stderr}"
    );
    assert!(sim.stats().execution_requests > 0);
    // The final run, as `wfq show` prints it: outputs whole, and the money.
    let field = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no `{name}` in:\n{stdout}"))
            .to_owned()
    };
    assert!(field("state").contains("succeeded"));
    assert!(field("outputs").contains("n9_images"), "{stdout}");
    assert!(field("final_amount").contains("0."), "{stdout}");
    assert!(field("released_amount").contains('.'), "{stdout}");
    assert!(!stderr.contains(API_KEY) && !stdout.contains(API_KEY));

    worker.stop().await;
    let _ = std::fs::remove_file(&config_path);
    sim.shutdown().await;
}

#[sqlx::test]
async fn enqueue_wait_exits_non_zero_for_a_failed_run_without_a_key(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let db = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(0, 200, 50).await;
    let worker = start_worker(config(&sim, "terminal-test", ""), pool.clone());
    let config = config_file(&pool, &sim);
    // No TEST_KEY_VAR for the child: no progress, but the wait works.
    let out = wfq(
        &db,
        &[
            "enqueue",
            "--config",
            config.to_str().unwrap(),
            "--workflow",
            TEXT_TO_IMAGE,
            "--inputs",
            r#"{"n6_txt": "typo"}"#,
            "--wait",
            "--json",
        ],
        &[],
    )
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("showing the state only"), "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or("")
            .contains("(chenyu): failed"),
        "{stderr}"
    );
    let shown: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(shown["state"], "failed");
    assert_eq!(shown["error_code"], "INVALID_INPUT");
    assert!(shown["events"].as_array().is_some_and(|e| !e.is_empty()));

    worker.stop().await;
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_chenyu_client_reads_queue_place_and_progress() {
    let http = HttpConfig {
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        ..HttpConfig::default()
    };
    let inputs = serde_json::Map::new();
    let submit = |key: &'static str| SubmitRequest {
        workflow_id: TEXT_TO_IMAGE,
        revision_id: None,
        inputs: &inputs,
        idempotency_key: key,
        accept_external_cost_risk: false,
        account_refusals: &[],
    };
    let accepted = |outcome: SubmitOutcome| match outcome {
        SubmitOutcome::Accepted(a) => a.provider_run_id,
        other => panic!("not accepted: {other:?}"),
    };

    // A long queue: two runs wait, the second behind the first.
    let sim = start_sim(60_000, 1000, 100).await;
    let client = ChenyuClient::new(&sim.base_url(), ApiKey::new(API_KEY), &http).unwrap();
    accepted(client.submit(&submit("first")).await);
    let second = accepted(client.submit(&submit("second")).await);
    let p = client.progress(&second).await.unwrap();
    assert_eq!(p.status.as_deref(), Some("queued"));
    assert_eq!(p.queue_position, Some(2));
    assert!(p.estimated_wait_sec.is_some_and(|s| s > 0), "{p:?}");
    let unknown = client.progress("wfrun_nope").await.unwrap_err();
    assert!(unknown.to_string().contains("RUN_NOT_FOUND"), "{unknown}");
    let wrong_key = ChenyuClient::new(&sim.base_url(), ApiKey::new("wrong"), &http).unwrap();
    let refused = wrong_key.progress(&second).await.unwrap_err();
    assert!(
        matches!(refused, wfq::providers::chenyu::ProgressError::Unclear(ref u) if u.account_refused),
        "{refused:?}"
    );
    sim.shutdown().await;

    // No queue, a long run: running with a percentage.
    let sim = start_sim(0, 60_000, 100).await;
    let client = ChenyuClient::new(&sim.base_url(), ApiKey::new(API_KEY), &http).unwrap();
    let run = accepted(client.submit(&submit("third")).await);
    let p = client.progress(&run).await.unwrap();
    assert_eq!(p.status.as_deref(), Some("running"));
    assert_eq!(p.queue_position, None);
    assert!(
        p.progress_percent
            .is_some_and(|x| (0.0..100.0).contains(&x)),
        "{p:?}"
    );
    sim.shutdown().await;
}
