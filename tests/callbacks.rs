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
use tokio::sync::watch;

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

/// The test configuration plus `[callbacks]` with a fast schedule; each
/// receiver gets half the slots, as by default. The attempt timeout is long
/// (10 s): a slow answer on a busy machine must not turn into a retry.
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
        timeout: Duration::from_secs(10),
        concurrency,
        per_receiver: (concurrency / 2).max(1),
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
    // Nothing listens here: no answer at all. The port stays bound (without
    // listening, so a connection is refused) for the whole test: nothing
    // else can take it meanwhile.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = reserved.local_addr().unwrap().port();
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
    drop(reserved);
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

/// A receiver that holds every request open until the test releases it:
/// it counts what arrived and what is still held, so a test can tell that
/// other deliveries went on while it hung.
struct Hanging {
    /// Run ids in the order their requests arrived.
    arrived: watch::Sender<Vec<i64>>,
    /// Requests held open right now, and the most ever at once.
    held: Mutex<(usize, usize)>,
    /// Turned true by the test: every held request (and any later one) is
    /// answered 200.
    release: watch::Sender<bool>,
}

impl Hanging {
    /// Waits until `n` requests have arrived (bounded, in case they never do).
    async fn wait_for_arrivals(&self, n: usize) {
        let mut arrived = self.arrived.subscribe();
        tokio::time::timeout(
            Duration::from_secs(30),
            arrived.wait_for(|ids| ids.len() >= n),
        )
        .await
        .unwrap_or_else(|_| panic!("{n} requests never reached the hanging receiver"))
        .expect("receiver alive");
    }

    fn arrived(&self) -> Vec<i64> {
        self.arrived.borrow().clone()
    }

    fn held(&self) -> (usize, usize) {
        *self.held.lock().unwrap()
    }
}

/// Counts a held request until its handler returns or is dropped.
struct Held<'a>(&'a Hanging);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.lock().unwrap().0 -= 1;
    }
}

async fn hang(State(hanging): State<Arc<Hanging>>, headers: HeaderMap) -> StatusCode {
    let run_id: i64 = headers["wfq-run-id"].to_str().unwrap().parse().unwrap();
    let mut release = hanging.release.subscribe();
    let _held = {
        let mut held = hanging.held.lock().unwrap();
        held.0 += 1;
        held.1 = held.1.max(held.0);
        Held(&hanging)
    };
    hanging.arrived.send_modify(|ids| ids.push(run_id));
    let _ = release.wait_for(|released| *released).await;
    StatusCode::OK
}

/// Starts a hanging receiver on a port of its own (so a receiver of its own).
async fn start_hanging_receiver() -> (Arc<Hanging>, String) {
    let hanging = Arc::new(Hanging {
        arrived: watch::channel(Vec::new()).0,
        held: Mutex::new((0, 0)),
        release: watch::channel(false).0,
    });
    let app = Router::new()
        .route("/hook", post(hang))
        .with_state(hanging.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hanging, url)
}

/// `n` runs with `url`, made final by hand in one statement: their
/// callbacks are due together, after those of runs finished before.
async fn finished_runs(pool: &PgPool, url: &str, n: i32) -> Vec<i64> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO wfq.runs (workflow_id, callback_url) \
         SELECT 'wf_' || n, $1 FROM generate_series(1, $2) AS n RETURNING id",
    )
    .bind(url)
    .bind(n)
    .fetch_all(pool)
    .await
    .unwrap();
    sqlx::query("UPDATE wfq.runs SET state = 'succeeded', finished_at = now() WHERE id = ANY($1)")
        .bind(&ids)
        .execute(pool)
        .await
        .unwrap();
    ids
}

/// `[callbacks]` with `concurrency` slots, `per_receiver` of them per
/// receiver, and an attempt timeout of `timeout`.
fn with_slots(
    config: Config,
    concurrency: usize,
    per_receiver: usize,
    timeout: Duration,
) -> Config {
    let mut config = with_callbacks(config, 5, concurrency);
    let callbacks = config.callbacks.as_mut().unwrap();
    callbacks.per_receiver = per_receiver;
    callbacks.timeout = timeout;
    config
}

/// Every run id's callback was recorded delivered, with exactly one attempt.
async fn assert_delivered_once(pool: &PgPool, ids: &[i64]) {
    for &id in ids {
        assert_eq!(
            callback_state(pool, id).await,
            (Some("delivered".into()), 1),
            "run {id}"
        );
        let rows = attempts(pool, id).await;
        assert_eq!(rows.len(), 1, "run {id}");
        assert_eq!(rows[0].result, "delivered");
    }
}

/// The condition "all of `ids` delivered", for `wait_for`.
fn all_delivered(ids: &[i64]) -> String {
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!(
        "NOT EXISTS (SELECT 1 FROM wfq.runs WHERE id IN ({}) \
         AND callback_state IS DISTINCT FROM 'delivered')",
        ids.join(", ")
    )
}

#[sqlx::test]
async fn a_hanging_receiver_holds_up_no_other_delivery(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 50, 20).await;
    let (hanging, hanging_url) = start_hanging_receiver().await;
    let (receiver, base) = start_receiver().await;
    // The hanging receiver's callback is due first, so it is claimed first.
    let slow = finished_runs(&pool, &hanging_url, 1).await[0];
    let fast = finished_runs(&pool, &format!("{base}/hook/ok"), 20).await;

    // The attempt timeout is far beyond the test's own bounds: the request
    // stays open until the test releases it, whatever the machine's speed.
    let worker = start_worker(
        with_slots(config(&sim, "w1", ""), 4, 2, Duration::from_secs(120)),
        pool.clone(),
    );
    hanging.wait_for_arrivals(1).await;
    wait_for(&pool, &all_delivered(&fast), Duration::from_secs(30)).await;

    // Every fast callback is recorded while the slow request is still open,
    // unanswered and unrecorded, its lease held.
    assert_eq!(hanging.held().0, 1, "the slow request is still open");
    assert_eq!(hanging.arrived(), vec![slow]);
    assert!(attempts(&pool, slow).await.is_empty());
    let owner: Option<String> =
        sqlx::query_scalar("SELECT callback_lease_owner FROM wfq.runs WHERE id = $1")
            .bind(slow)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(owner.as_deref(), Some("w1"));
    assert_delivered_once(&pool, &fast).await;
    let mut got: Vec<i64> = receiver.receipts().iter().map(|r| r.run_id).collect();
    got.sort();
    assert_eq!(got, fast, "each fast callback sent once");

    hanging.release.send_replace(true);
    wait_for(&pool, &all_delivered(&[slow]), Duration::from_secs(30)).await;
    worker.stop().await;
    assert_delivered_once(&pool, &[slow]).await;
    assert_eq!(attempts(&pool, slow).await[0].http_status, Some(200));
}

#[sqlx::test]
async fn a_hanging_receiver_gets_only_its_share_of_the_slots(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 50, 20).await;
    let (hanging, hanging_url) = start_hanging_receiver().await;
    let (receiver, base) = start_receiver().await;
    // More slow callbacks than slots, all due before the fast ones: without
    // a share per receiver they would take every slot.
    let slow = finished_runs(&pool, &hanging_url, 6).await;
    let fast = finished_runs(&pool, &format!("{base}/hook/ok"), 20).await;

    let worker = start_worker(
        with_slots(config(&sim, "w1", ""), 4, 2, Duration::from_secs(120)),
        pool.clone(),
    );
    hanging.wait_for_arrivals(2).await;
    wait_for(&pool, &all_delivered(&fast), Duration::from_secs(30)).await;

    // Two slots held by the hanging receiver, no more; the other two
    // delivered all twenty.
    assert_eq!(hanging.held(), (2, 2));
    let mut first = hanging.arrived();
    first.sort();
    assert_eq!(first, slow[..2].to_vec(), "oldest due first");
    for &id in &slow {
        assert!(attempts(&pool, id).await.is_empty(), "run {id}");
    }
    assert_delivered_once(&pool, &fast).await;
    assert_eq!(receiver.receipts().len(), 20);

    // Released, the slow receiver gets the rest, still two at a time.
    hanging.release.send_replace(true);
    wait_for(&pool, &all_delivered(&slow), Duration::from_secs(30)).await;
    worker.stop().await;
    assert_delivered_once(&pool, &slow).await;
    let mut arrived = hanging.arrived();
    arrived.sort();
    assert_eq!(arrived, slow);
    assert_eq!(hanging.held(), (0, 2));
}

#[sqlx::test]
async fn stopping_lets_the_attempt_in_flight_time_out_and_records_it(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 50, 20).await;
    // Never released: the receiver does not answer within the timeout.
    let (hanging, hanging_url) = start_hanging_receiver().await;
    let slow = finished_runs(&pool, &hanging_url, 1).await[0];

    // The attempt times out after 10 s: the stop below comes while it is
    // in flight, however slow the machine (a timeout that ran out before
    // it would record the attempt and send it again). The worker waits for
    // it, with 5 s more to record it.
    let worker = start_worker(
        with_slots(config(&sim, "w1", ""), 4, 2, Duration::from_secs(10)),
        pool.clone(),
    );
    hanging.wait_for_arrivals(1).await;
    // Returns once the delivery service has: the attempt ended at its
    // timeout and was recorded, and nothing was claimed after the stop.
    worker.stop().await;

    let rows = attempts(&pool, slow).await;
    assert_eq!(rows.len(), 1, "one attempt, recorded");
    assert_eq!(
        (rows[0].http_status, rows[0].result.as_str()),
        (None, "retry")
    );
    let error = rows[0].error.as_deref().unwrap();
    assert!(error.starts_with("no answer within"), "{error}");
    assert_eq!(
        callback_state(&pool, slow).await,
        (Some("pending".into()), 1)
    );
    let owner: Option<String> =
        sqlx::query_scalar("SELECT callback_lease_owner FROM wfq.runs WHERE id = $1")
            .bind(slow)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(owner, None, "the record gave the lease back");
    assert_eq!(hanging.arrived(), vec![slow]);
}

#[sqlx::test]
async fn a_claim_names_each_receiver_by_origin_and_leaves_out_the_busy_ones(pool: PgPool) {
    let urls = [
        "HTTPS://user:p@ss@Hooks.Example.com:443/t/SECRET?token=abc",
        "https://hooks.example.com/other",
        "http://127.0.0.1:80/a",
        "http://127.0.0.1:8080/b#frag",
        "https://[::1]:8443?x=1",
    ];
    let mut ids = Vec::new();
    for url in urls {
        ids.extend(finished_runs(&pool, url, 1).await);
    }
    let lease = Duration::from_secs(60);
    let busy = ["https://hooks.example.com".to_owned()];
    let claimed = store::claim_due_callbacks(&pool, "w1", 10, lease, &busy)
        .await
        .unwrap();
    let mut got: Vec<(i64, String)> = claimed
        .iter()
        .map(|c| (c.run.id, c.receiver.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (ids[2], "http://127.0.0.1".to_owned()),
            (ids[3], "http://127.0.0.1:8080".to_owned()),
            (ids[4], "https://[::1]:8443".to_owned()),
        ]
    );
    // The receiver is the logged origin, user info and path left out.
    for c in &claimed {
        assert_eq!(c.receiver, wfq::callbacks::origin(&c.callback_url));
    }
    // Not busy any more: both callbacks of that receiver, under one name.
    let claimed = store::claim_due_callbacks(&pool, "w1", 10, lease, &[])
        .await
        .unwrap();
    let mut got: Vec<(i64, String)> = claimed
        .iter()
        .map(|c| (c.run.id, c.receiver.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (ids[0], "https://hooks.example.com".to_owned()),
            (ids[1], "https://hooks.example.com".to_owned()),
        ]
    );
}
