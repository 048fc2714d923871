//! Completion callbacks: a finished run with a `callback_url` is POSTed
//! there once, signed; failures are retried on the stored schedule and
//! recorded; the run itself never changes; two workers never deliver one
//! callback twice. A small axum receiver on loopback counts what arrives.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::backoff::RetryPolicy;
use wfq::config::{ApiKey, CallbacksConfig, Config};
use wfq::store::{self, NewRun};

const SECRET: &str = "whsec-test-5b7e1d0c9a";

/// A pool big enough for two workers (each holds LISTEN connections).
async fn pool(connect: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(24)
        .connect_with(connect)
        .await
        .expect("test database")
}

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Receipt {
    run_id: i64,
    attempt: u32,
    signature: String,
    body: Bytes,
}

#[derive(Default)]
struct Receiver {
    receipts: Mutex<Vec<Receipt>>,
}

impl Receiver {
    fn receipts(&self) -> Vec<Receipt> {
        self.receipts.lock().unwrap().clone()
    }

    fn of(&self, run_id: i64) -> Vec<Receipt> {
        self.receipts()
            .into_iter()
            .filter(|r| r.run_id == run_id)
            .collect()
    }
}

/// `POST /hook/{mode}`: `ok` answers 204, `flaky` 500 twice per run and then
/// 200, `down` always 503, `gone` 410, `slow` 200 after 20 ms.
async fn hook(
    State(receiver): State<Arc<Receiver>>,
    Path(mode): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
    let receipt = Receipt {
        run_id: header("wfq-run-id").parse().unwrap(),
        attempt: header("wfq-attempt").parse().unwrap(),
        signature: header("wfq-signature"),
        body,
    };
    let earlier = {
        let mut receipts = receiver.receipts.lock().unwrap();
        let earlier = receipts
            .iter()
            .filter(|r| r.run_id == receipt.run_id)
            .count();
        receipts.push(receipt);
        earlier
    };
    match mode.as_str() {
        "ok" => StatusCode::NO_CONTENT,
        "flaky" if earlier < 2 => StatusCode::INTERNAL_SERVER_ERROR,
        "flaky" => StatusCode::OK,
        "down" => StatusCode::SERVICE_UNAVAILABLE,
        "gone" => StatusCode::GONE,
        "slow" => {
            tokio::time::sleep(Duration::from_millis(20)).await;
            StatusCode::OK
        }
        _ => StatusCode::NOT_FOUND,
    }
}

/// Starts the receiver; returns it and its base URL.
async fn start_receiver() -> (Arc<Receiver>, String) {
    let receiver = Arc::new(Receiver::default());
    let app = Router::new()
        .route("/hook/{mode}", post(hook))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, url)
}

/// The test configuration plus `[callbacks]` with a fast schedule.
fn with_callbacks(mut config: Config, max_attempts: u32, concurrency: usize) -> Config {
    config.callbacks = Some(CallbacksConfig {
        secret: ApiKey::new(SECRET),
        retry: RetryPolicy {
            max_attempts,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(300),
            multiplier: 2.0,
            jitter: 0.1,
        },
        timeout: Duration::from_secs(2),
        concurrency,
    });
    config
}

async fn enqueue_with_callback(pool: &PgPool, workflow: &str, url: Option<String>) -> i64 {
    store::enqueue_run(
        pool,
        &NewRun {
            workflow_id: workflow.to_owned(),
            inputs: json!({}),
            callback_url: url,
            ..Default::default()
        },
    )
    .await
    .expect("enqueue")
}

/// Checks `wfq-signature` the way a receiver would, independently of wfq's code.
fn assert_signed(receipt: &Receipt) {
    let parts: HashMap<&str, &str> = receipt
        .signature
        .split(',')
        .filter_map(|p| p.split_once('='))
        .collect();
    let t: i64 = parts["t"].parse().unwrap();
    assert!(
        (Utc::now().timestamp() - t).abs() < 60,
        "fresh timestamp: {t}"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&receipt.body);
    let expected = hex::encode(mac.finalize().into_bytes());
    assert_eq!(parts["v1"], expected, "signature of run {}", receipt.run_id);
    assert!(wfq::callbacks::verify(
        SECRET.as_bytes(),
        &receipt.signature,
        &receipt.body,
        Utc::now().timestamp(),
        300
    ));
}

#[derive(Debug, sqlx::FromRow)]
struct AttemptRow {
    attempt: i32,
    http_status: Option<i32>,
    error: Option<String>,
    result: String,
    started_at: DateTime<Utc>,
    next_attempt_at: Option<DateTime<Utc>>,
    duration_ms: i32,
}

async fn attempts(pool: &PgPool, run_id: i64) -> Vec<AttemptRow> {
    sqlx::query_as(
        "SELECT attempt, http_status, error, result, started_at, next_attempt_at, duration_ms \
         FROM wfq.callback_attempts WHERE run_id = $1 ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn callback_state(pool: &PgPool, run_id: i64) -> (Option<String>, i32) {
    sqlx::query_as("SELECT callback_state, callback_attempts FROM wfq.runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn every_final_state_gets_one_signed_callback_with_the_run(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    let (receiver, base) = start_receiver().await;
    // A token in the query string, as receivers often want.
    let url = Some(format!("{base}/hook/ok?token=tok-91c2"));
    let succeeded = enqueue_with_callback(&pool, TEXT_TO_IMAGE, url.clone()).await;
    let failed = enqueue_with_callback(&pool, ALWAYS_FAILS, url.clone()).await;
    let canceled = enqueue_with_callback(&pool, TEXT_TO_IMAGE, url.clone()).await;
    store::cancel_run(&pool, canceled, Some("not needed"), &[])
        .await
        .unwrap();

    let worker = start_worker(with_callbacks(config(&sim, "w1", ""), 5, 8), pool.clone());
    wait_for(
        &pool,
        "NOT EXISTS (SELECT 1 FROM wfq.runs WHERE callback_state IS DISTINCT FROM 'delivered')",
        Duration::from_secs(30),
    )
    .await;
    worker.stop().await;

    assert_eq!(receiver.receipts().len(), 3, "{:?}", receiver.receipts());
    for (id, state) in [
        (succeeded, "succeeded"),
        (failed, "failed"),
        (canceled, "canceled"),
    ] {
        let got = receiver.of(id);
        assert_eq!(got.len(), 1, "one callback for run {id}");
        assert_eq!(got[0].attempt, 1);
        assert_signed(&got[0]);
        // The body is the run as stored (`wfq show --json` without events).
        let body: Value = serde_json::from_slice(&got[0].body).unwrap();
        assert_eq!(body["id"], json!(id));
        assert_eq!(body["state"], json!(state));
        assert_eq!(body, serde_json::to_value(run(&pool, id).await).unwrap());

        assert_eq!(
            callback_state(&pool, id).await,
            (Some("delivered".into()), 1)
        );
        let rows = attempts(&pool, id).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].http_status, rows[0].result.as_str()),
            (Some(204), "delivered")
        );
        assert!(rows[0].next_attempt_at.is_none() && rows[0].error.is_none());
        assert!(
            event_kinds(&pool, id)
                .await
                .contains(&"callback_delivered".to_owned())
        );
    }

    // Money arrives as exact decimal strings, digit for digit as stored.
    let body: Value = serde_json::from_slice(&receiver.of(succeeded)[0].body).unwrap();
    let stored: (String, String, String) = sqlx::query_as(
        "SELECT frozen_amount::text, final_amount::text, released_amount::text FROM wfq.runs WHERE id = $1",
    )
    .bind(succeeded)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (
            body["frozen_amount"].as_str().unwrap(),
            body["final_amount"].as_str().unwrap(),
            body["released_amount"].as_str().unwrap()
        ),
        (stored.0.as_str(), stored.1.as_str(), stored.2.as_str())
    );
    assert_eq!(
        body["outputs"],
        run(&pool, succeeded).await.outputs.unwrap()
    );

    // `wfq retry` of the failed run keeps its callback_url.
    let store::RetryOutcome::NewRun(again) = store::retry_run(&pool, failed, &[]).await.unwrap()
    else {
        panic!("a settled failure is retried as a new run");
    };
    let copied: Option<String> =
        sqlx::query_scalar("SELECT callback_url FROM wfq.runs WHERE id = $1")
            .bind(again)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(copied, url);
}

#[sqlx::test]
async fn a_receiver_that_fails_twice_gets_three_attempts_on_the_stored_schedule(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 50, 20).await;
    let (receiver, base) = start_receiver().await;
    let id = enqueue_with_callback(&pool, TEXT_TO_IMAGE, Some(format!("{base}/hook/flaky"))).await;

    let worker = start_worker(with_callbacks(config(&sim, "w1", ""), 5, 8), pool.clone());
    wait_for(
        &pool,
        &format!("(SELECT callback_state = 'delivered' FROM wfq.runs WHERE id = {id})"),
        Duration::from_secs(30),
    )
    .await;
    worker.stop().await;

    let got = receiver.of(id);
    assert_eq!(
        got.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for receipt in &got {
        assert_signed(receipt);
        assert_eq!(
            receipt.body, got[0].body,
            "every attempt sends the same run"
        );
    }
    assert_eq!(
        callback_state(&pool, id).await,
        (Some("delivered".into()), 3)
    );

    let rows = attempts(&pool, id).await;
    let summary: Vec<(i32, Option<i32>, &str, bool)> = rows
        .iter()
        .map(|r| {
            (
                r.attempt,
                r.http_status,
                r.result.as_str(),
                r.next_attempt_at.is_some(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, Some(500), "retry", true),
            (2, Some(500), "retry", true),
            (3, Some(200), "delivered", false),
        ]
    );
    // The schedule came from the database: each retry waited for its due
    // time (100 ms, then 200 ms, +-10%).
    for pair in rows.windows(2) {
        let due = pair[0].next_attempt_at.unwrap();
        let planned = due - pair[0].started_at;
        assert!(
            planned >= chrono::Duration::milliseconds(90),
            "planned {planned}"
        );
        assert!(
            pair[1].started_at >= due - chrono::Duration::milliseconds(5),
            "attempt {} at {} before its due time {due}",
            pair[1].attempt,
            pair[1].started_at
        );
    }
    assert!(rows.iter().all(|r| r.duration_ms >= 0));
}

#[sqlx::test]
async fn a_receiver_that_never_succeeds_ends_failed_and_the_run_stays_as_it_was(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 50, 20).await;
    let (receiver, base) = start_receiver().await;
    let down = enqueue_with_callback(&pool, TEXT_TO_IMAGE, Some(format!("{base}/hook/down"))).await;
    let gone = enqueue_with_callback(&pool, TEXT_TO_IMAGE, Some(format!("{base}/hook/gone"))).await;
    // Nothing listens here: no answer at all.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = enqueue_with_callback(
        &pool,
        TEXT_TO_IMAGE,
        Some(format!("http://127.0.0.1:{port}/hook?token=tok-77e1")),
    )
    .await;

    // First the runs alone, to see them as they were before any callback.
    work_until_idle(&pool, config(&sim, "w1", "")).await;
    type Snapshot = (i64, DateTime<Utc>, Value);
    let snapshot = |id: i64| {
        let pool = pool.clone();
        async move {
            let (version, updated_at): (i64, DateTime<Utc>) =
                sqlx::query_as("SELECT version, updated_at FROM wfq.runs WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            let row = serde_json::to_value(run(&pool, id).await).unwrap();
            (version, updated_at, row) as Snapshot
        }
    };
    let before = snapshot(down).await;
    assert_eq!(before.2["state"], json!("succeeded"));
    // A worker without [callbacks] left them pending.
    assert_eq!(
        callback_state(&pool, down).await,
        (Some("pending".into()), 0)
    );

    let worker = start_worker(with_callbacks(config(&sim, "w2", ""), 3, 8), pool.clone());
    wait_for(
        &pool,
        "NOT EXISTS (SELECT 1 FROM wfq.runs WHERE callback_state = 'pending')",
        Duration::from_secs(30),
    )
    .await;
    worker.stop().await;

    assert_eq!(receiver.of(down).len(), 3);
    assert_eq!(
        callback_state(&pool, down).await,
        (Some("failed".into()), 3)
    );
    let results: Vec<(Option<i32>, String)> = attempts(&pool, down)
        .await
        .into_iter()
        .map(|r| (r.http_status, r.result))
        .collect();
    assert_eq!(
        results,
        vec![
            (Some(503), "retry".into()),
            (Some(503), "retry".into()),
            (Some(503), "exhausted".into())
        ]
    );
    assert!(
        event_kinds(&pool, down)
            .await
            .contains(&"callback_failed".to_owned())
    );
    assert_eq!(snapshot(down).await, before, "the run itself is untouched");

    // 410 Gone: no more attempts.
    assert_eq!(receiver.of(gone).len(), 1);
    assert_eq!(
        callback_state(&pool, gone).await,
        (Some("failed".into()), 1)
    );
    assert_eq!(attempts(&pool, gone).await[0].result, "gone");

    // No answer at all: recorded as an error without the URL.
    let rows = attempts(&pool, unreachable).await;
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let error = row.error.as_deref().unwrap();
        assert!(row.http_status.is_none());
        assert!(error.starts_with("connection failed"), "{error}");
        assert!(!error.contains("tok-77e1"), "{error}");
    }
    assert_eq!(
        callback_state(&pool, unreachable).await,
        (Some("failed".into()), 3)
    );
}

#[sqlx::test]
async fn a_run_without_callback_url_sends_nothing(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 50, 20).await;
    let (receiver, base) = start_receiver().await;
    let silent = enqueue_with_callback(&pool, TEXT_TO_IMAGE, None).await;
    let loud = enqueue_with_callback(&pool, TEXT_TO_IMAGE, Some(format!("{base}/hook/ok"))).await;

    let worker = start_worker(with_callbacks(config(&sim, "w1", ""), 5, 8), pool.clone());
    wait_for(
        &pool,
        &format!(
            "NOT EXISTS (SELECT 1 FROM wfq.runs WHERE state IN ('queued', 'submitting', 'running')) \
             AND (SELECT callback_state = 'delivered' FROM wfq.runs WHERE id = {loud})"
        ),
        Duration::from_secs(30),
    )
    .await;
    worker.stop().await;

    assert_eq!(run(&pool, silent).await.state, "succeeded");
    assert_eq!(callback_state(&pool, silent).await, (None, 0));
    assert!(attempts(&pool, silent).await.is_empty());
    let ids: Vec<i64> = receiver.receipts().iter().map(|r| r.run_id).collect();
    assert_eq!(ids, vec![loud]);
}

#[sqlx::test]
async fn two_workers_never_deliver_one_callback_twice(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 50, 20).await;
    let (receiver, base) = start_receiver().await;
    // Producers' INSERTs, finished by hand: the trigger makes 60 callbacks
    // due at once, and both workers race for them.
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, callback_url) \
         SELECT 'wf_' || n, $1 FROM generate_series(1, 60) AS n",
    )
    .bind(format!("{base}/hook/slow"))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE wfq.runs SET state = 'succeeded', finished_at = now()")
        .execute(&pool)
        .await
        .unwrap();

    let a = start_worker(with_callbacks(config(&sim, "wa", ""), 5, 4), pool.clone());
    let b = start_worker(with_callbacks(config(&sim, "wb", ""), 5, 4), pool.clone());
    wait_for(
        &pool,
        "NOT EXISTS (SELECT 1 FROM wfq.runs WHERE callback_state IS DISTINCT FROM 'delivered')",
        Duration::from_secs(60),
    )
    .await;
    a.stop().await;
    b.stop().await;

    let mut per_run: HashMap<i64, usize> = HashMap::new();
    for receipt in receiver.receipts() {
        *per_run.entry(receipt.run_id).or_default() += 1;
    }
    assert_eq!(per_run.len(), 60);
    assert!(
        per_run.values().all(|&n| n == 1),
        "duplicates: {:?}",
        per_run.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    let by_worker: Vec<(String, i64)> = sqlx::query_as(
        "SELECT worker, count(*) FROM wfq.callback_attempts GROUP BY worker ORDER BY worker",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    eprintln!("deliveries per worker: {by_worker:?}");
    assert_eq!(by_worker.iter().map(|(_, n)| n).sum::<i64>(), 60);
}

#[sqlx::test]
async fn callback_urls_must_be_http_and_not_too_long(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(connect).await;
    for (url, constraint) in [
        ("ftp://example.com/x".to_owned(), "runs_callback_url_http"),
        ("example.com/hook".to_owned(), "runs_callback_url_http"),
        ("https://exa mple.com/".to_owned(), "runs_callback_url_http"),
        (
            format!("https://example.com/{}", "a".repeat(2100)),
            "runs_callback_url_length",
        ),
    ] {
        let err = store::enqueue_run(
            &pool,
            &NewRun {
                workflow_id: TEXT_TO_IMAGE.into(),
                inputs: json!({}),
                callback_url: Some(url.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains(constraint), "{url}: {err}");
    }
    let ok = enqueue_with_callback(
        &pool,
        TEXT_TO_IMAGE,
        Some("https://user:pw@hooks.example.com:8443/h?token=x".into()),
    )
    .await;
    // Not final yet: nothing is due.
    assert_eq!(callback_state(&pool, ok).await, (None, 0));
}

#[sqlx::test]
async fn pruning_keeps_runs_whose_callback_is_pending(pool: PgPool) {
    let with =
        enqueue_with_callback(&pool, TEXT_TO_IMAGE, Some("http://127.0.0.1:1/h".into())).await;
    let without = enqueue_with_callback(&pool, TEXT_TO_IMAGE, None).await;
    sqlx::query(
        "UPDATE wfq.runs SET state = 'succeeded', finished_at = now() - interval '2 days', \
         settled_at = now() - interval '2 days'",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        callback_state(&pool, with).await,
        (Some("pending".into()), 0)
    );
    let day = Duration::from_secs(86_400);
    assert_eq!(store::prune_finished_runs(&pool, day, 10).await.unwrap(), 1);
    assert!(store::show_run(&pool, without).await.unwrap().is_none());
    sqlx::query("UPDATE wfq.runs SET callback_state = 'delivered' WHERE id = $1")
        .bind(with)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(store::prune_finished_runs(&pool, day, 10).await.unwrap(), 1);
}
