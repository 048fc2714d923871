//! The chenyu simulator over real HTTP, driven with reqwest like a client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use wfq::sim::{Faults, SimConfig, SimServer};

const TEXT_TO_IMAGE: &str = "wf_861ef31e94dcfb10e6e7";
const VIDEO: &str = "wf_seedance_video_2f0c";
const ALWAYS_FAILS: &str = "wf_always_fails_9d1a";
const TOKEN: &str = "Bearer test-key";

async fn start(queue_ms: u64) -> SimServer {
    let config = SimConfig {
        queue_time: Duration::from_millis(queue_ms),
        run_time: Duration::from_millis(100),
        settle_delay: Duration::from_millis(100),
        api_key: None,
    };
    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    SimServer::start(addr, config)
        .await
        .expect("simulator starts")
}

/// The admin root (`http://127.0.0.1:PORT`).
fn admin_url(sim: &SimServer) -> String {
    format!("http://{}", sim.local_addr())
}

async fn get(sim: &SimServer, path_and_query: &str) -> (StatusCode, Value) {
    let response = Client::new()
        .get(format!("{}{path_and_query}", sim.base_url()))
        .header("Authorization", TOKEN)
        .send()
        .await
        .expect("request sent");
    let status = response.status();
    (status, response.json().await.expect("JSON body"))
}

async fn submit(sim: &SimServer, body: Value) -> (StatusCode, Value) {
    let response = submit_response(sim, &body).await;
    let status = response.status();
    (status, response.json().await.expect("JSON body"))
}

async fn submit_response(sim: &SimServer, body: &Value) -> reqwest::Response {
    Client::new()
        .post(format!("{}/workflow/run/submit", sim.base_url()))
        .header("Authorization", TOKEN)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

fn image_submit(key: &str) -> Value {
    json!({
        "workflow_id": TEXT_TO_IMAGE,
        "revision_id": "wfr_f9f2a2dcb99d73b0c3aa",
        "inputs": {"n6_text": "a glass bottle", "n3_seed": 42},
        "idempotency_key": key,
        "accept_external_cost_risk": false,
    })
}

fn engine_code(body: &Value) -> &str {
    body["data"]["error"]["engine_code"]
        .as_str()
        .unwrap_or_default()
}

fn amount(data: &Value, field: &str) -> Decimal {
    let text = data[field].as_str().unwrap_or_default();
    text.parse()
        .unwrap_or_else(|_| panic!("{field} = {text:?} is not a decimal"))
}

/// Polls `run/info` until settled, for at most a minute (far beyond the
/// simulator's timings: only a run that never settles reaches it).
async fn wait_settled(sim: &SimServer, run_order_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(
            sim,
            &format!("/workflow/run/info?run_order_id={run_order_id}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["data"]["settlement_status"] == "settled" {
            return body["data"].clone();
        }
        assert!(Instant::now() < deadline, "run never settled: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn market_info_has_the_documented_shape() {
    let sim = start(0).await;
    let (status, body) = get(
        &sim,
        &format!("/workflow/market/info?workflow_id={TEXT_TO_IMAGE}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["code"], 0);
    let data = &body["data"];
    assert_eq!(data["revision_id"], "wfr_f9f2a2dcb99d73b0c3aa");
    assert_eq!(data["quote_currency"], "CNY");
    assert_eq!(data["quote_amount"], "0.03000000");
    assert_eq!(data["may_incur_external_model_cost"], false);
    let seed = &data["editable_parameter_manifest"][2];
    assert_eq!(seed["key"], "n3_seed");
    assert_eq!(seed["type"], "int");
    assert_eq!(seed["default_value"], 156_680_208_700_286_i64);
    assert_eq!(
        data["candidate_output_manifest"],
        json!([{"key": "n9_images", "type": "image"}])
    );

    let (status, body) = get(&sim, "/workflow/market/info?workflow_id=wf_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], 1);
    assert_eq!(engine_code(&body), "WORKFLOW_NOT_FOUND");
    sim.shutdown().await;
}

#[tokio::test]
async fn replay_returns_the_same_run_and_charges_once() {
    let sim = start(50).await;
    let (status, first) = submit(&sim, image_submit("order-1")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["code"], 0);
    let data = &first["data"];
    assert_eq!(data["idempotent_replay"], false);
    assert_eq!(data["freeze_status"], "frozen");
    assert_eq!(data["run_status"], "queued");
    assert!(
        data["run_order_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("wfrun_") && id.len() == 26)
    );
    assert!(
        data["billing_run_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("wfbill_"))
    );

    // Different inputs, same key: still a replay of the first run.
    let mut changed = image_submit("order-1");
    changed["inputs"]["n3_seed"] = json!(7);
    let (_, replay) = submit(&sim, changed).await;
    assert_eq!(replay["data"]["idempotent_replay"], true);
    assert_eq!(replay["data"]["run_order_id"], data["run_order_id"]);

    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!((ledger[0].charges, ledger[0].submit_requests), (1, 2));
    assert_eq!(ledger[0].frozen, Decimal::new(3, 2));
    let stats = sim.stats();
    assert_eq!(
        (stats.accepted_new, stats.replays, stats.mismatched_replays),
        (1, 1, 1)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_inputs_are_rejected_naming_the_key() {
    let sim = start(0).await;
    let cases = [
        (json!({"n3_seed": "not a number"}), "n3_seed"),
        (json!({"unknown_key": 1}), "unknown_key"),
    ];
    for (i, (inputs, key)) in cases.into_iter().enumerate() {
        let mut body = image_submit(&format!("bad-{i}"));
        body["inputs"] = inputs;
        let (status, answer) = submit(&sim, body).await;
        // The docs allow a failure code with HTTP 200; the sim does both.
        assert!(
            status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
            "{status}"
        );
        assert_eq!(answer["code"], 1);
        assert_eq!(answer["msg"], "Workflow input content is invalid.");
        assert_eq!(engine_code(&answer), "INVALID_WORKFLOW_INPUT");
        assert_eq!(answer["data"]["error"]["status_code"], 400);
        let detail = answer["data"]["error"]["detail"]
            .as_str()
            .unwrap_or_default();
        assert!(detail.contains(key), "{detail}");
    }
    let video = json!({
        "workflow_id": VIDEO, "idempotency_key": "v-bad", "accept_external_cost_risk": true,
        "inputs": {"prompt": "p", "image": "asset://elsewhere/1"},
    });
    let (_, answer) = submit(&sim, video).await;
    assert_eq!(
        answer["data"]["error"]["detail"],
        "input image must be an uploaded file URL or file id"
    );
    assert!(sim.ledger().is_empty());
    assert_eq!(sim.stats().rejected, 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn external_cost_needs_risk_acceptance_and_is_billed() {
    let sim = start(0).await;
    let mut body = json!({
        "workflow_id": VIDEO, "idempotency_key": "video-1",
        "inputs": {"prompt": "a cat", "image": "asset://sim/demo-image", "guidance": 6.5},
    });
    let (status, answer) = submit(&sim, body.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(engine_code(&answer), "EXTERNAL_COST_RISK_NOT_ACCEPTED");
    assert!(sim.ledger().is_empty());

    body["accept_external_cost_risk"] = json!(true);
    let (status, answer) = submit(&sim, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let run_order_id = answer["data"]["run_order_id"]
        .as_str()
        .expect("run id")
        .to_owned();
    let info = wait_settled(&sim, &run_order_id).await;
    assert!(amount(&info, "external_model_cost") > Decimal::ZERO);
    assert_eq!(
        info["outputs"]["video"],
        format!("http://{}/media/{run_order_id}/video.mp4", sim.local_addr())
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn runs_progress_to_settled_and_money_adds_up() {
    let sim = start(50).await;
    let (_, answer) = submit(&sim, image_submit("progress-1")).await;
    let run_order_id = answer["data"]["run_order_id"]
        .as_str()
        .expect("run id")
        .to_owned();

    let (_, early) = get(
        &sim,
        &format!("/workflow/run/info?run_order_id={run_order_id}"),
    )
    .await;
    let early = &early["data"];
    if early["run_status"] == "queued" {
        assert_eq!(early["settlement_status"], "unsettled");
        assert_eq!(early["final_amount"], "");
        assert_eq!(early["outputs"], json!({}));
    }
    assert_eq!(
        early["inputs"],
        json!({"n6_text": "a glass bottle", "n3_seed": 42})
    );

    let info = wait_settled(&sim, &run_order_id).await;
    assert_eq!(info["run_status"], "succeeded");
    assert_eq!(info["freeze_status"], "released");
    assert_eq!(info["error_code"], "");
    for field in [
        "final_amount",
        "released_amount",
        "compute_cost",
        "total_cost",
    ] {
        assert_eq!(
            info[field]
                .as_str()
                .map(|s| s.split('.').nth(1).map(str::len)),
            Some(Some(8)),
            "{field}"
        );
    }
    assert_eq!(
        amount(&info, "final_amount") + amount(&info, "released_amount"),
        Decimal::new(3, 2)
    );
    assert_eq!(
        amount(&info, "compute_cost") + amount(&info, "external_model_cost"),
        amount(&info, "total_cost")
    );
    assert_eq!(amount(&info, "total_cost"), amount(&info, "final_amount"));

    let (_, exec) = get(
        &sim,
        &format!("/workflow/run/execution?run_order_id={run_order_id}"),
    )
    .await;
    let exec = &exec["data"];
    assert_eq!(exec["status"], "succeeded");
    assert_eq!(exec["progress_percent"], 100);
    assert!(exec["total_cost"].is_number(), "{exec}");
    let total: Decimal = exec["total_cost"]
        .to_string()
        .parse()
        .expect("decimal number");
    assert_eq!(total, amount(&info, "total_cost"));

    let entry = &sim.ledger()[0];
    assert_eq!(entry.final_amount, Some(amount(&info, "final_amount")));
    assert_eq!(entry.released, Some(amount(&info, "released_amount")));

    let (status, missing) = get(&sim, "/workflow/run/info?run_order_id=wfrun_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(engine_code(&missing), "RUN_NOT_FOUND");
    sim.shutdown().await;
}

#[tokio::test]
async fn execution_reports_the_queue() {
    let sim = SimServer::start(
        ([127, 0, 0, 1], 0).into(),
        SimConfig {
            queue_time: Duration::from_secs(30),
            ..SimConfig::default()
        },
    )
    .await
    .expect("simulator starts");
    for key in ["q-1", "q-2"] {
        submit(&sim, image_submit(key)).await;
    }
    let second = &sim
        .ledger()
        .into_iter()
        .find(|e| e.idempotency_key == "q-2")
        .expect("entry");
    let (_, exec) = get(
        &sim,
        &format!(
            "/workflow/run/execution?run_order_id={}",
            second.run_order_id
        ),
    )
    .await;
    let exec = &exec["data"];
    assert_eq!(exec["status"], "queued");
    assert_eq!(exec["queue_info"]["position"], 2);
    assert!(
        exec["queue_info"]["estimated_wait_sec"]
            .as_u64()
            .is_some_and(|s| s > 0 && s <= 30)
    );
    assert_eq!(exec["total_cost"], Value::Null);
    assert_eq!(exec["error"], Value::Null);
    sim.shutdown().await;
}

#[tokio::test]
async fn failing_workflow_fails_but_settles() {
    let sim = start(0).await;
    let body = json!({"workflow_id": ALWAYS_FAILS, "idempotency_key": "f-1", "inputs": {}});
    let (_, answer) = submit(&sim, body).await;
    let run_order_id = answer["data"]["run_order_id"]
        .as_str()
        .expect("run id")
        .to_owned();
    let info = wait_settled(&sim, &run_order_id).await;
    assert_eq!(info["run_status"], "failed");
    assert_eq!(info["error_code"], "ENGINE_EXECUTION_FAILED");
    assert_eq!(info["final_amount"], "0.01000000");
    assert_eq!(info["released_amount"], "0.49000000");
    sim.shutdown().await;
}

#[tokio::test]
async fn fail_next_submits_answers_503_and_records_nothing() {
    let sim = start(0).await;
    sim.set_faults(Faults {
        fail_next_submits: 2,
        ..Faults::default()
    });
    for _ in 0..2 {
        let response = submit_response(&sim, &image_submit("k-503")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(sim.ledger().is_empty());
    assert_eq!(sim.faults().fail_next_submits, 0);
    let (status, _) = submit(&sim, image_submit("k-503")).await;
    assert_eq!(status, StatusCode::OK);
    let stats = sim.stats();
    assert_eq!(
        (
            stats.injected_5xx,
            stats.accepted_new,
            stats.submit_requests
        ),
        (2, 1, 3)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limit_next_submits_answers_429_with_retry_after() {
    let sim = start(0).await;
    sim.set_faults(Faults {
        rate_limit_next_submits: 1,
        retry_after_secs: Some(3),
        ..Faults::default()
    });
    let response = submit_response(&sim, &image_submit("k-429")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "3");
    let body: Value = response.json().await.expect("JSON body");
    assert_eq!(body["code"], 429);
    assert!(sim.ledger().is_empty());
    assert_eq!(sim.stats().injected_429, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn lost_submit_answer_is_a_transport_error_but_the_run_exists() {
    let sim = start(0).await;
    sim.set_faults(Faults {
        drop_next_submit_answers: 2,
        ..Faults::default()
    });
    let response = submit_response(&sim, &image_submit("k-drop")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.json::<Value>().await.is_err(),
        "body read must fail"
    );
    let response = submit_response(&sim, &image_submit("k-drop")).await;
    assert!(response.bytes().await.is_err(), "body read must fail");

    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].charges, 1);

    let (status, retry) = submit(&sim, image_submit("k-drop")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(retry["data"]["idempotent_replay"], true);
    assert_eq!(
        retry["data"]["run_order_id"],
        ledger[0].run_order_id.as_str()
    );
    let ledger = sim.ledger();
    assert_eq!((ledger[0].charges, ledger[0].submit_requests), (1, 3));
    assert_eq!(sim.stats().dropped_answers, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn poll_faults_and_random_errors() {
    let sim = start(0).await;
    let (_, answer) = submit(&sim, image_submit("k-poll")).await;
    let run_order_id = answer["data"]["run_order_id"]
        .as_str()
        .expect("run id")
        .to_owned();
    sim.set_faults(Faults {
        fail_next_polls: 1,
        ..Faults::default()
    });
    let url = format!(
        "{}/workflow/run/execution?run_order_id={run_order_id}",
        sim.base_url()
    );
    let client = Client::new();
    let first = client
        .get(&url)
        .header("Authorization", TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    let second = client
        .get(&url)
        .header("Authorization", TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(second.status(), StatusCode::OK);

    sim.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    for _ in 0..6 {
        let response = client
            .get(&url)
            .header("Authorization", TOKEN)
            .send()
            .await
            .expect("sent");
        assert!(response.status().is_server_error());
    }
    assert_eq!(sim.stats().injected_5xx, 7);
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_bearer_is_401() {
    let sim = SimServer::start(
        ([127, 0, 0, 1], 0).into(),
        SimConfig {
            api_key: Some("right".to_owned()),
            ..SimConfig::default()
        },
    )
    .await
    .expect("simulator starts");
    let url = format!(
        "{}/workflow/market/info?workflow_id={TEXT_TO_IMAGE}",
        sim.base_url()
    );
    let client = Client::new();
    for auth in [Some("Bearer wrong"), Some("Bearer "), None] {
        let mut request = client.get(&url);
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        let response = request.send().await.expect("sent");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(
            body,
            json!({"code": 401, "msg": "invalid api key", "data": null})
        );
    }
    let ok = client
        .get(&url)
        .bearer_auth("right")
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(sim.stats().unauthorized, 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints_round_trip() {
    let sim = start(0).await;
    let client = Client::new();
    let root = admin_url(&sim);
    let health = client
        .get(format!("{root}/_sim/health"))
        .send()
        .await
        .expect("sent");
    assert_eq!(health.text().await.expect("text"), "ok");

    let faults =
        json!({"error_rate": 0.25, "retry_after_secs": 2, "latency_ms": 5, "fail_next_polls": 4});
    let put = client
        .put(format!("{root}/_sim/faults"))
        .json(&faults)
        .send()
        .await
        .expect("sent");
    assert_eq!(put.status(), StatusCode::OK);
    let got: Faults = client
        .get(format!("{root}/_sim/faults"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("faults JSON");
    assert_eq!(got, sim.faults());
    assert_eq!(got.latency, Duration::from_millis(5));
    assert_eq!(
        (got.error_rate, got.fail_next_polls, got.fail_next_submits),
        (0.25, 4, 0)
    );

    let bad = client
        .put(format!("{root}/_sim/faults"))
        .body(r#"{"error_rate": 2}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    sim.set_faults(Faults::default());

    submit(&sim, image_submit("admin-1")).await;
    let ledger: Value = client
        .get(format!("{root}/_sim/ledger"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON");
    assert_eq!(ledger[0]["idempotency_key"], "admin-1");
    assert_eq!(ledger[0]["frozen"], "0.03000000");
    let stats: Value = client
        .get(format!("{root}/_sim/stats"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON");
    assert_eq!(stats["accepted_new"], 1);
    sim.shutdown().await;
}

/// Waits until `n` requests are held, failing the test rather than hanging
/// if the simulator never holds them.
async fn held(sim: &SimServer, n: u64) {
    tokio::time::timeout(Duration::from_secs(60), sim.wait_until_held(n))
        .await
        .unwrap_or_else(|_| panic!("{n} requests were never held: {:?}", sim.stats()));
}

#[tokio::test]
async fn held_status_checks_wait_until_released_together() {
    let sim = std::sync::Arc::new(start(0).await);
    let (_, answer) = submit(&sim, image_submit("k-hold")).await;
    let run_order_id = answer["data"]["run_order_id"]
        .as_str()
        .expect("run id")
        .to_owned();
    sim.set_faults(Faults {
        hold_status_checks: true,
        ..Faults::default()
    });
    let mut waiting = Vec::new();
    for endpoint in ["info", "execution"] {
        let sim = std::sync::Arc::clone(&sim);
        let path = format!("/workflow/run/{endpoint}?run_order_id={run_order_id}");
        waiting.push(tokio::spawn(async move { get(&sim, &path).await }));
    }
    held(&sim, 2).await;
    // Other requests are not held: market info and submits go through.
    let (status, _) = get(
        &sim,
        &format!("/workflow/market/info?workflow_id={TEXT_TO_IMAGE}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = submit(&sim, image_submit("k-hold-2")).await;
    assert_eq!(status, StatusCode::OK);
    let stats = sim.stats();
    assert_eq!((stats.held_requests, stats.held_total), (2, 2));
    assert!(waiting.iter().all(|w| !w.is_finished()), "still held");
    assert_eq!((stats.info_requests, stats.execution_requests), (0, 0));

    sim.set_faults(Faults::default());
    for w in waiting {
        let (status, body) = w.await.expect("request task");
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"]["run_order_id"], run_order_id.as_str());
    }
    let stats = sim.stats();
    assert_eq!((stats.held_requests, stats.held_total), (0, 2));
    assert_eq!((stats.info_requests, stats.execution_requests), (1, 1));
    std::sync::Arc::into_inner(sim)
        .expect("tasks done")
        .shutdown()
        .await;
}

#[tokio::test]
async fn held_submits_record_nothing_until_released_over_admin() {
    let sim = std::sync::Arc::new(start(0).await);
    let client = Client::new();
    let faults_url = format!("{}/_sim/faults", admin_url(&sim));
    let put = client
        .put(&faults_url)
        .json(&json!({"hold_submits": true}))
        .send()
        .await
        .expect("sent");
    assert_eq!(put.status(), StatusCode::OK);
    let task = {
        let sim = std::sync::Arc::clone(&sim);
        tokio::spawn(async move { submit(&sim, image_submit("k-held-submit")).await })
    };
    held(&sim, 1).await;
    assert!(sim.ledger().is_empty(), "nothing recorded while held");
    assert_eq!(sim.stats().submit_requests, 0);
    // Status checks are not held by this knob.
    let (status, _) = get(&sim, "/workflow/run/info?run_order_id=wfrun_none").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let stats: Value = client
        .get(format!("{}/_sim/stats", admin_url(&sim)))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON");
    assert_eq!(stats["held_requests"], 1);

    let put = client
        .put(&faults_url)
        .json(&json!({"hold_submits": false}))
        .send()
        .await
        .expect("sent");
    assert_eq!(put.status(), StatusCode::OK);
    let (status, body) = task.await.expect("submit task");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sim.ledger().len(), 1);
    let stats = sim.stats();
    assert_eq!(
        (stats.held_requests, stats.held_total, stats.accepted_new),
        (0, 1, 1)
    );
    std::sync::Arc::into_inner(sim)
        .expect("task done")
        .shutdown()
        .await;
}

/// A GET with the given bearer token, to any URL; status, `Retry-After`
/// and body.
async fn get_as(token: &str, url: &str) -> (StatusCode, Option<u64>, Value) {
    let response = Client::new()
        .get(url)
        .header("Authorization", token)
        .send()
        .await
        .expect("request sent");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").parse().expect("whole seconds"));
    (
        status,
        retry_after,
        response.json().await.expect("JSON body"),
    )
}

#[tokio::test]
async fn rate_limit_counts_every_api_of_a_key_together() {
    let sim = start(0).await;
    sim.set_faults(Faults {
        // Slow enough that no token comes back during the test.
        rate_limit_rps: Some(0.01),
        rate_limit_burst: Some(2.0),
        ..Faults::default()
    });
    let market = format!(
        "{}/workflow/market/info?workflow_id={TEXT_TO_IMAGE}",
        sim.base_url()
    );
    let dify = format!("{}/parameters", sim.dify_base_url("text"));
    let (status, _, _) = get_as(TOKEN, &market).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get_as(TOKEN, &dify).await;
    assert_eq!(status, StatusCode::OK);
    // The admin endpoints never count.
    for _ in 0..3 {
        let ok = Client::new()
            .get(format!("{}/_sim/stats", admin_url(&sim)))
            .send()
            .await
            .expect("sent");
        assert_eq!(ok.status(), StatusCode::OK);
    }
    // The bucket is empty: every API refuses this key, in its own shape.
    let (status, retry, body) = get_as(TOKEN, &market).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry.is_some_and(|s| (1..=100).contains(&s)), "{retry:?}");
    assert_eq!(
        (body["code"].as_u64(), &body["data"]),
        (Some(429), &Value::Null)
    );
    let (status, retry, body) = get_as(TOKEN, &dify).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry.is_some());
    assert_eq!(
        (body["code"].as_str(), body["status"].as_u64()),
        (Some("too_many_requests"), Some(429))
    );
    let gpt = Client::new()
        .post(format!(
            "{}/v1/workflow/invoke",
            sim.gptbots_base_url("news")
        ))
        .header("Authorization", TOKEN)
        .json(&json!({"input": {"topic": "x"}, "isAsync": true}))
        .send()
        .await
        .expect("sent");
    assert_eq!(gpt.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(gpt.headers().contains_key("retry-after"));
    let body: Value = gpt.json().await.expect("JSON");
    assert_eq!(body["code"], 429_000);
    let response = submit_response(&sim, &image_submit("k-limited")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(sim.ledger().is_empty() && sim.gptbots_ledger().is_empty());

    // Another key has its own bucket.
    let (status, _, _) = get_as("Bearer other-key", &market).await;
    assert_eq!(status, StatusCode::OK);

    // Changing the mode at run time keeps what the key did: the window of
    // 1 request per 100 s already holds two.
    let put = Client::new()
        .put(format!("{}/_sim/faults", admin_url(&sim)))
        .json(&json!({"rate_limit_rps": 0.01, "rate_limit_mode": "sliding_window"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(put.status(), StatusCode::OK);
    let (status, retry, _) = get_as(TOKEN, &market).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry.is_some_and(|s| (1..=100).contains(&s)), "{retry:?}");
    // A fresh key in the window: one request, then refused.
    let (status, _, _) = get_as("Bearer window-key", &market).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get_as("Bearer window-key", &dify).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    let stats = sim.stats();
    assert_eq!(stats.limit_refusals, 6);
    assert_eq!(stats.injected_429, 0, "limit refusals are not stray 429s");
    assert_eq!(stats.api_requests, 10);
    assert_eq!(
        (stats.submit_requests, stats.gptbots_invoke_requests),
        (0, 0)
    );

    // Stray 429s are counted apart, whatever the limit.
    sim.set_faults(Faults {
        rate_limit_rate: 1.0,
        ..Faults::default()
    });
    let (status, retry, _) = get_as(TOKEN, &market).await;
    assert_eq!((status, retry), (StatusCode::TOO_MANY_REQUESTS, None));
    let stats = sim.stats();
    assert_eq!((stats.limit_refusals, stats.injected_429), (6, 1));
    sim.shutdown().await;
}

#[tokio::test]
async fn run_cap_refuses_new_runs_in_the_body_but_never_a_replay() {
    // Runs stay queued for the whole test.
    let sim = start(600_000).await;
    sim.set_faults(Faults {
        max_running_runs: Some(1),
        ..Faults::default()
    });
    let (status, first) = submit(&sim, image_submit("k-cap-1")).await;
    assert_eq!((status, first["code"].as_u64()), (StatusCode::OK, Some(0)));
    let (status, refused) = submit(&sim, image_submit("k-cap-2")).await;
    assert_eq!(status, StatusCode::OK, "the body decides");
    assert_ne!(refused["code"], 0);
    assert_eq!(engine_code(&refused), "CONCURRENT_RUN_LIMIT_EXCEEDED");
    let (status, replay) = submit(&sim, image_submit("k-cap-1")).await;
    assert_eq!((status, replay["code"].as_u64()), (StatusCode::OK, Some(0)));
    assert_eq!(replay["data"]["idempotent_replay"], true);
    assert_eq!(sim.ledger().len(), 1, "nothing created for the refusal");
    assert_eq!(sim.stats().cap_refusals, 1);
    sim.set_faults(Faults {
        max_running_runs: Some(2),
        ..Faults::default()
    });
    let (_, second) = submit(&sim, image_submit("k-cap-2")).await;
    assert_eq!(second["data"]["idempotent_replay"], false);
    assert_eq!(sim.ledger().len(), 2);
    sim.shutdown().await;
}

/// The exact amount of `field` in a raw `balance/info` body, string or number.
fn raw_amount(text: &str, field: &str) -> Decimal {
    let key = format!("\"{field}\":");
    let at = text.find(&key).expect("field") + key.len();
    let rest = &text[at..];
    rest[..rest.find([',', '}']).expect("end")]
        .trim_matches('"')
        .parse()
        .expect("a decimal")
}

async fn balance_info(sim: &SimServer) -> String {
    let response = Client::new()
        .get(format!("{}/balance/info", sim.base_url()))
        .header("Authorization", TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("body")
}

#[tokio::test]
async fn balance_freezes_quotes_releases_at_settlement_and_stays_exact() {
    // First while nothing settles (runs stay queued for the whole part):
    // what a submit freezes and what a short balance refuses.
    let sim = start(600_000).await;
    let client = Client::new();
    let balance_url = format!("{}/_sim/balance", admin_url(&sim));
    // Unlimited: a large fixed balance, as a string, then as a number.
    let text = balance_info(&sim).await;
    assert!(text.contains(r#""balance":"1000000.00000000""#), "{text}");
    let text = balance_info(&sim).await;
    assert!(text.contains(r#""balance":1000000,"#), "{text}");

    let put = client
        .put(&balance_url)
        .json(&json!({"balance": "0.05"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(put.status(), StatusCode::OK);
    let got: Value = client
        .get(&balance_url)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON");
    assert_eq!(got["balance"], "0.05");
    let start_balance = Decimal::new(5, 2);

    let (_, first) = submit(&sim, image_submit("k-bal-1")).await;
    assert_eq!(first["code"], 0);
    let quote = amount(&first["data"], "quote_amount");
    assert_eq!(
        sim.balance(),
        Some(start_balance - quote),
        "frozen at submit"
    );
    let (status, refused) = submit(&sim, image_submit("k-bal-2")).await;
    assert_eq!(status, StatusCode::OK, "the body decides");
    assert_ne!(refused["code"], 0);
    assert_eq!(engine_code(&refused), "INSUFFICIENT_BALANCE");
    let detail = refused["data"]["error"]["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(
        detail.contains("0.03000000") && detail.contains("0.02000000"),
        "{detail}"
    );
    let (_, replay) = submit(&sim, image_submit("k-bal-1")).await;
    assert_eq!(
        replay["data"]["idempotent_replay"], true,
        "replays freeze nothing"
    );
    assert_eq!(sim.ledger().len(), 1);
    // Replacing the faults leaves the balance alone.
    sim.set_faults(Faults::default());
    assert_eq!(sim.balance(), Some(start_balance - quote));
    let stats = sim.stats();
    assert_eq!((stats.balance_refusals, stats.balance_requests), (1, 2));
    sim.shutdown().await;

    // Then with the short timings: the settlement gives back exactly what
    // was not charged.
    let sim = start(0).await;
    let balance_url = format!("{}/_sim/balance", admin_url(&sim));
    sim.set_balance(Some(start_balance));
    let (_, first) = submit(&sim, image_submit("k-bal-1")).await;
    assert_eq!(first["code"], 0);
    let run_order_id = first["data"]["run_order_id"].as_str().expect("id");
    let info = wait_settled(&sim, run_order_id).await;
    let entry = &sim.ledger()[0];
    let released = entry.released.expect("settled");
    let charged = entry.final_amount.expect("settled");
    assert_eq!(entry.frozen - released, charged);
    assert_eq!(amount(&info, "released_amount"), released);
    assert_eq!(sim.balance(), Some(start_balance - charged));
    let text = balance_info(&sim).await;
    assert_eq!(raw_amount(&text, "balance"), start_balance - charged);
    assert!(text.contains(r#""balance":""#), "strings: {text}");
    let text = balance_info(&sim).await;
    assert_eq!(raw_amount(&text, "balance"), start_balance - charged);
    assert!(!text.contains(r#""balance":""#), "numbers: {text}");

    let topped: Value = client
        .post(format!("{balance_url}/top_up"))
        .json(&json!({"amount": 1}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON");
    let after = start_balance - charged + Decimal::ONE;
    assert_eq!(
        topped["balance"].as_str().map(str::parse::<Decimal>),
        Some(Ok(after))
    );
    assert_eq!(
        sim.top_up(Decimal::new(1, 8)),
        Some(after + Decimal::new(1, 8))
    );
    let (_, second) = submit(&sim, image_submit("k-bal-2")).await;
    assert_eq!(second["code"], 0);

    let stats = sim.stats();
    assert_eq!((stats.balance_refusals, stats.balance_requests), (0, 2));
    let bad = client
        .put(&balance_url)
        .json(&json!({"balance": "lots"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let unlimited = client
        .put(&balance_url)
        .json(&json!({"balance": null}))
        .send()
        .await
        .expect("sent");
    assert_eq!(unlimited.status(), StatusCode::OK);
    assert_eq!(sim.balance(), None);
    let conflict = client
        .post(format!("{balance_url}/top_up"))
        .json(&json!({"amount": "5"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    sim.shutdown().await;
}

/// A GET's status and raw body text (hostile bodies are not for serde_json).
async fn get_text(sim: &SimServer, path_and_query: &str) -> (StatusCode, String) {
    let response = Client::new()
        .get(format!("{}{path_and_query}", sim.base_url()))
        .header("Authorization", TOKEN)
        .send()
        .await
        .expect("request sent");
    (response.status(), response.text().await.expect("body"))
}

/// Syntactically valid JSON (serde_json's skipping parser checks only the
/// grammar: no depth limit, no number ranges, no surrogate pairing).
fn valid_json(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// The raw text of a string member, e.g. `"final_amount":"0.01"` gives `0.01`.
fn raw_string(text: &str, field: &str) -> String {
    let key = format!("\"{field}\":\"");
    let at = text.find(&key).unwrap_or_else(|| panic!("no {field}")) + key.len();
    text[at..at + text[at..].find('"').expect("end")].to_owned()
}

/// Waits (in process) until every run in the ledger is settled.
async fn all_settled(sim: &SimServer, runs: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ledger = sim.ledger();
        if ledger.len() == runs && ledger.iter().all(|e| e.final_amount.is_some()) {
            return;
        }
        assert!(Instant::now() < deadline, "never settled: {ledger:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn hostile_outputs_cycle_through_the_corpus_as_valid_json() {
    let sim = start(0).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        let (_, answer) = submit(&sim, image_submit(&format!("k-hostile-{i}"))).await;
        ids.push(
            answer["data"]["run_order_id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    let (_, failing) = submit(
        &sim,
        json!({"workflow_id": ALWAYS_FAILS, "inputs": {"prompt": "x"}, "idempotency_key": "k-hostile-fail"}),
    )
    .await;
    assert_eq!(failing["code"], 0, "{failing}");
    ids.push(
        failing["data"]["run_order_id"]
            .as_str()
            .expect("id")
            .to_owned(),
    );
    all_settled(&sim, 9).await;
    sim.set_faults(Faults {
        hostile_outputs: true,
        ..Faults::default()
    });
    let markers: [&[&str]; 8] = [
        &[r#""sim_hostile":"before\u0000after""#],
        &[r#""sim_hostile":"\ud800""#],
        &[],
        &[r#""sim_hostile":{"n":{"n":{"n":"#],
        &[r#"{"key\u0000with a nul":true}"#],
        &[
            "1e400",
            ":-0,",
            "123456789012345678901234567890",
            "1.0e-400",
        ],
        &[r#"\u0001\u001F\b\f\/\u000A\u007f"#, "\u{7f}\u{2028}"],
        &[
            r"\u0000",
            r"\ud800",
            "1e400",
            r"\u001F",
            r#""nul_key":{"key\u0000"#,
        ],
    ];
    let ledger = sim.ledger();
    for (i, id) in ids.iter().enumerate() {
        let (status, info) = get_text(&sim, &format!("/workflow/run/info?run_order_id={id}")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(valid_json(&info), "run {i}: run/info is not valid JSON");
        let entry = ledger
            .iter()
            .find(|e| &e.run_order_id == id)
            .expect("in the ledger");
        let money = |field: &str| raw_string(&info, field).parse::<Decimal>().expect(field);
        assert_eq!(
            Some(money("final_amount")),
            entry.final_amount,
            "money stays valid"
        );
        assert_eq!(Some(money("released_amount")), entry.released);
        let (status, execution) =
            get_text(&sim, &format!("/workflow/run/execution?run_order_id={id}")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            valid_json(&execution),
            "run {i}: run/execution is not valid JSON"
        );
        if i == 8 {
            // The failing run: its error message carries the ninth entry,
            // the first again.
            assert!(
                info.contains(r#""error_message":"simulated engine failure"#),
                "{info}"
            );
            assert!(raw_string(&info, "error_message").contains(r"(nul: \u0000)"));
            assert!(execution.contains(r"(nul: \u0000)"));
            continue;
        }
        assert!(
            info.contains(r#""n9_images":"http://"#),
            "real outputs kept"
        );
        for marker in markers[i] {
            assert!(info.contains(marker), "run {i}: {marker} missing");
            assert!(execution.contains(marker), "run {i}: {marker} missing");
        }
        if i == 2 || i == 7 {
            assert!(info.len() > 2 * 1024 * 1024, "a 2 MiB string");
        }
    }
    assert_eq!(sim.stats().hostile_answers, 18);
    // Off again: plain answers, counted no more.
    sim.set_faults(Faults::default());
    let (_, info) = get(&sim, &format!("/workflow/run/info?run_order_id={}", ids[1])).await;
    assert!(info["data"]["outputs"].get("sim_hostile").is_none());
    assert_eq!(sim.stats().hostile_answers, 18);
    sim.shutdown().await;
}
