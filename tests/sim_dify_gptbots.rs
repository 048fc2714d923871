//! The Dify and GPTBots simulators over real HTTP, driven with reqwest like
//! a client: streams read chunk by chunk, conditions waited on, not slept.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use wfq::sim::{Faults, SimConfig, SimServer};

const TOKEN: &str = "Bearer test-key";
const QUEUE: Duration = Duration::from_millis(50);
const RUN: Duration = Duration::from_millis(200);

/// A run time for tests that must act while a run is running: the run
/// never ends by itself during the test (a stop ends it).
const LONG_RUN: Duration = Duration::from_secs(600);

/// The most any wait in these tests takes before it fails: far beyond what
/// the simulator's timings need, so that only a real failure reaches it.
const CEILING: Duration = Duration::from_secs(60);

async fn start() -> SimServer {
    start_with(RUN).await
}

async fn start_with(run_time: Duration) -> SimServer {
    let config = SimConfig {
        queue_time: QUEUE,
        run_time,
        settle_delay: Duration::from_millis(10),
        api_key: None,
    };
    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    SimServer::start(addr, config)
        .await
        .expect("simulator starts")
}

async fn body_json(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.expect("JSON body"))
}

async fn dify_post(sim: &SimServer, app: &str, path: &str, body: &Value) -> Response {
    Client::new()
        .post(format!("{}{path}", sim.dify_base_url(app)))
        .header("Authorization", TOKEN)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

async fn dify_get(sim: &SimServer, app: &str, path: &str) -> (StatusCode, Value) {
    let response = Client::new()
        .get(format!("{}{path}", sim.dify_base_url(app)))
        .header("Authorization", TOKEN)
        .send()
        .await
        .expect("request sent");
    body_json(response).await
}

fn run_body(user: &str, mode: &str) -> Value {
    json!({"inputs": {"query": "tell me a story", "tone": "casual"}, "response_mode": mode, "user": user})
}

/// Reads SSE blocks off a response, as a client would.
struct Sse {
    response: Response,
    buffer: String,
}

impl Sse {
    fn new(response: Response) -> Sse {
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()["content-type"].to_str().unwrap_or("");
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Sse {
            response,
            buffer: String::new(),
        }
    }

    /// The next `data:` event (pings skipped); `None` at the end of the stream.
    async fn next(&mut self) -> Option<Value> {
        loop {
            let block = self.next_block().await?;
            if let Some(data) = block.trim().strip_prefix("data: ") {
                return Some(serde_json::from_str(data).expect("event JSON"));
            }
        }
    }

    /// The next SSE block as sent, pings included; `None` at the end.
    async fn next_block(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                return Some(self.buffer.drain(..end + 2).collect());
            }
            let chunk = self.response.chunk().await.expect("stream intact")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }

    async fn rest(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// The exact `total_price` of the LLM node in an event's raw text, string
/// or number.
fn raw_price(event_json: &str) -> Decimal {
    let at = event_json.find("\"total_price\":").expect("a price") + "\"total_price\":".len();
    let rest = &event_json[at..];
    let end = rest.find([',', '}']).expect("end of value");
    rest[..end].trim_matches('"').parse().expect("decimal")
}

/// Waits until `n` requests or streams are held, failing the test rather
/// than hanging if the simulator never holds them.
async fn held(sim: &SimServer, n: u64) {
    tokio::time::timeout(CEILING, sim.wait_until_held(n))
        .await
        .unwrap_or_else(|_| panic!("{n} never held: {:?}", sim.stats()));
}

/// Polls the run detail until `pred` holds, for at most [`CEILING`].
async fn wait_detail(
    sim: &SimServer,
    app: &str,
    run_id: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + CEILING;
    loop {
        let (status, body) = dify_get(sim, app, &format!("/workflows/run/{run_id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if pred(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "condition never held: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn dify_stream_starts_at_once_and_finishes_after_the_timings() {
    let sim = start().await;
    // Streams are held: `workflow_started` comes at once all the same,
    // while nothing later can (the run's clock is not waited for).
    sim.set_faults(Faults {
        hold_streams: true,
        ..Faults::default()
    });
    let began = Instant::now();
    let mut sse =
        Sse::new(dify_post(&sim, "text", "/workflows/run", &run_body("u1", "streaming")).await);
    let first = sse.next().await.expect("an event");
    assert_eq!(first["event"], "workflow_started");
    held(&sim, 1).await;
    sim.set_faults(Faults::default());
    let run_id = first["workflow_run_id"]
        .as_str()
        .expect("run id")
        .to_owned();
    assert_eq!(first["data"]["id"], run_id.as_str());
    assert_eq!(first["data"]["workflow_id"], "ver-text-1");
    assert_eq!(first["data"]["sequence_number"], 1);
    assert!(first["task_id"].is_string());
    let rest = sse.rest().await;
    assert!(began.elapsed() >= QUEUE + RUN);
    let names: Vec<&str> = rest.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(
        names,
        [
            "node_started",
            "node_finished",
            "node_started",
            "node_finished",
            "node_started",
            "node_finished",
            "workflow_finished"
        ]
    );
    let finished = &rest[6]["data"];
    assert_eq!(finished["status"], "succeeded");
    assert!(
        finished["outputs"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("casual")
    );
    assert!(finished["finished_at"].is_i64());
    let llm = &rest[3]["data"];
    assert_eq!(llm["node_type"], "llm");
    assert_eq!(llm["execution_metadata"]["currency"], "USD");
    let tokens = llm["execution_metadata"]["total_tokens"]
        .as_i64()
        .expect("tokens");
    assert_eq!(finished["total_tokens"], tokens);
    let ledger = sim.dify_ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].workflow_run_id, run_id);
    assert_eq!(ledger[0].status, "succeeded");
    assert_eq!(ledger[0].total_tokens, tokens);
    assert_eq!(
        ledger[0].total_price,
        Decimal::from(tokens) * Decimal::new(2, 6)
    );
    // Sequence 1: the price is a JSON number, exact.
    assert!(llm["execution_metadata"]["total_price"].is_number());
    sim.shutdown().await;
}

/// Starts a streaming run of `app` for `user`, reads `workflow_started`
/// and drops the stream; the run's id.
async fn started_then_dropped(sim: &SimServer, app: &str, user: &str) -> String {
    let mut sse =
        Sse::new(dify_post(sim, app, "/workflows/run", &run_body(user, "streaming")).await);
    let started = sse.next().await.expect("workflow_started");
    drop(sse);
    started["workflow_run_id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn dify_run_goes_on_when_the_client_drops_the_stream() {
    // A run that cannot have ended yet: still running without its stream.
    let long = start_with(LONG_RUN).await;
    let run_id = started_then_dropped(&long, "fails", "u1").await;
    let running = wait_detail(&long, "fails", &run_id, |_| true).await;
    assert_eq!(running["status"], "running");
    long.shutdown().await;
    // And one with the short timings: it ends by itself, as without a drop.
    let sim = start().await;
    let run_id = started_then_dropped(&sim, "fails", "u1").await;
    let run_id = run_id.as_str();
    let done = wait_detail(&sim, "fails", run_id, |d| d["status"] != "running").await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"], "simulated node failure");
    assert_eq!(done["outputs"], Value::Null);
    assert!(done.get("total_price").is_none());
    let inputs: Value =
        serde_json::from_str(done["inputs"].as_str().expect("a string")).expect("JSON");
    assert_eq!(inputs["sys.user_id"], "u1");
    let entry = &sim.dify_ledger()[0];
    assert_eq!(entry.status, "failed");
    assert!(entry.total_price > Decimal::ZERO, "failed runs are billed");
    sim.shutdown().await;
}

#[tokio::test]
async fn dify_lost_stream_creates_a_run_the_client_never_hears_of() {
    let sim = start().await;
    sim.set_faults(Faults {
        drop_next_submit_answers: 1,
        ..Faults::default()
    });
    let sent = Client::new()
        .post(format!("{}/workflows/run", sim.dify_base_url("text")))
        .header("Authorization", TOKEN)
        .json(&run_body("lost-user", "streaming"))
        .send()
        .await;
    // Either the request fails outright or the body breaks: never an event.
    if let Ok(mut response) = sent {
        let mut seen = Vec::new();
        let outcome = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => seen.extend_from_slice(&chunk),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        assert!(outcome.is_err(), "the stream must break, got {seen:?}");
        assert!(!String::from_utf8_lossy(&seen).contains("workflow_started"));
    }
    let ledger = sim.dify_ledger();
    assert_eq!(ledger.len(), 1, "the run exists");
    assert_eq!(ledger[0].user, "lost-user");
    assert_eq!(sim.stats().dropped_answers, 1);
    // The way back: the logs filtered by the user, once the run is over.
    let deadline = Instant::now() + CEILING;
    loop {
        let (status, logs) = dify_get(
            &sim,
            "text",
            "/workflows/logs?created_by_end_user_session_id=lost-user",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        if logs["total"] == 1 {
            assert_eq!(
                logs["data"][0]["workflow_run"]["id"],
                ledger[0].workflow_run_id.as_str()
            );
            break;
        }
        assert!(Instant::now() < deadline, "never listed: {logs}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn dify_logs_hide_running_runs_by_default_and_filter_by_user() {
    let sim = start_with(LONG_RUN).await;
    let mut ids = Vec::new();
    let mut tasks = Vec::new();
    for user in ["alice", "bob", "alice"] {
        let mut sse =
            Sse::new(dify_post(&sim, "text", "/workflows/run", &run_body(user, "streaming")).await);
        let started = sse.next().await.expect("started");
        ids.push(started["workflow_run_id"].as_str().expect("id").to_owned());
        tasks.push(started["task_id"].as_str().expect("task").to_owned());
    }
    let (_, logs) = dify_get(&sim, "text", "/workflows/logs").await;
    assert_eq!(logs["total"], 0, "running runs are hidden: {logs}");
    sim.set_faults(Faults {
        dify_logs_include_running: true,
        ..Faults::default()
    });
    let (_, logs) = dify_get(&sim, "text", "/workflows/logs").await;
    assert_eq!(logs["total"], 3);
    assert_eq!(logs["data"][0]["workflow_run"]["status"], "running");
    sim.set_faults(Faults::default());
    // The runs end (stopped by their users): listed by default now.
    for (task, user) in tasks.iter().zip(["alice", "bob", "alice"]) {
        let (status, _) = body_json(
            dify_post(
                &sim,
                "text",
                &format!("/workflows/tasks/{task}/stop"),
                &json!({ "user": user }),
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    for id in &ids {
        wait_detail(&sim, "text", id, |d| d["status"] == "stopped").await;
    }
    let (status, logs) = dify_get(
        &sim,
        "text",
        "/workflows/logs?created_by_end_user_session_id=alice&limit=1",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (logs["total"].as_u64(), logs["has_more"].as_bool()),
        (Some(2), Some(true))
    );
    let entry = &logs["data"][0];
    assert_eq!(entry["workflow_run"]["id"], ids[2].as_str(), "newest first");
    assert_eq!(entry["created_by_end_user"]["session_id"], "alice");
    assert_eq!(entry["created_from"], "service-api");
    assert_eq!(entry["created_by_account"], Value::Null);
    let (_, page2) = dify_get(
        &sim,
        "text",
        "/workflows/logs?created_by_end_user_session_id=alice&limit=1&page=2",
    )
    .await;
    assert_eq!(page2["data"][0]["workflow_run"]["id"], ids[0].as_str());
    let (_, failed) = dify_get(&sim, "text", "/workflows/logs?status=failed").await;
    assert_eq!(failed["total"], 0);
    let (_, other_app) = dify_get(&sim, "partial", "/workflows/logs").await;
    assert_eq!(other_app["total"], 0);
    let (status, bad) = dify_get(&sim, "text", "/workflows/logs?page=zero").await;
    assert_eq!(
        (status, bad["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_param"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn dify_stop_ends_the_run_for_its_user_only() {
    let sim = start_with(LONG_RUN).await;
    let mut sse = Sse::new(
        dify_post(
            &sim,
            "text",
            "/workflows/run",
            &run_body("owner", "streaming"),
        )
        .await,
    );
    let started = sse.next().await.expect("started");
    let task = started["task_id"].as_str().expect("task").to_owned();
    let run_id = started["workflow_run_id"].as_str().expect("id").to_owned();
    let stop_path = format!("/workflows/tasks/{task}/stop");
    // Another user's stop is answered "success" but changes nothing, as in Dify.
    let (status, body) =
        body_json(dify_post(&sim, "text", &stop_path, &json!({"user": "intruder"})).await).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"result": "success"}))
    );
    let (_, detail) = dify_get(&sim, "text", &format!("/workflows/run/{run_id}")).await;
    assert_eq!(detail["status"], "running");
    let (status, _) = body_json(dify_post(&sim, "text", &stop_path, &json!({})).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) =
        body_json(dify_post(&sim, "text", &stop_path, &json!({"user": "owner"})).await).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"result": "success"}))
    );
    let (_, detail) = dify_get(&sim, "text", &format!("/workflows/run/{run_id}")).await;
    assert_eq!(detail["status"], "stopped");
    assert!(!detail["finished_at"].is_null());
    let rest = sse.rest().await;
    let last = rest.last().expect("workflow_finished");
    assert_eq!(
        (last["event"].as_str(), last["data"]["status"].as_str()),
        (Some("workflow_finished"), Some("stopped"))
    );
    assert_eq!(sim.dify_ledger()[0].status, "stopped");
    // Stopping again: still "success", nothing changes.
    let (status, _) =
        body_json(dify_post(&sim, "text", &stop_path, &json!({"user": "owner"})).await).await;
    assert_eq!(status, StatusCode::OK);
    let stats = sim.stats();
    assert_eq!((stats.dify_stop_requests, stats.dify_stops_ignored), (4, 2));
    sim.shutdown().await;
}

#[tokio::test]
async fn dify_events_replay_with_both_price_forms() {
    let sim = start().await;
    let mut prices = Vec::new();
    for user in ["p1", "p2"] {
        let (status, blocking) = body_json(
            dify_post(
                &sim,
                "partial",
                "/workflows/run",
                &run_body(user, "blocking"),
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{blocking}");
        assert_eq!(blocking["data"]["status"], "partial-succeeded");
        let run_id = blocking["workflow_run_id"].as_str().expect("id");
        let response = Client::new()
            .get(format!(
                "{}/workflow/{run_id}/events?user={user}",
                sim.dify_base_url("partial")
            ))
            .header("Authorization", TOKEN)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("whole replay");
        let events: Vec<&str> = text
            .split("\n\n")
            .filter_map(|b| b.strip_prefix("data: "))
            .collect();
        assert!(events[0].contains("\"workflow_started\""));
        assert!(
            events
                .last()
                .expect("events")
                .contains("\"workflow_finished\"")
        );
        let llm = events
            .iter()
            .find(|e| e.contains("\"node_type\":\"llm\"") && e.contains("node_finished"))
            .expect("llm");
        assert!(llm.contains("\"status\":\"exception\""));
        prices.push((llm.contains("\"total_price\":\""), raw_price(llm)));
        let (status, wrong) = dify_get(
            &sim,
            "partial",
            &format!("/workflow/{run_id}/events?user=someone-else"),
        )
        .await;
        assert_eq!(
            (status, wrong["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
    }
    assert_eq!(
        (prices[0].0, prices[1].0),
        (false, true),
        "a number, then a string"
    );
    let ledger = sim.dify_ledger();
    assert_eq!(ledger[0].total_price, prices[0].1);
    assert_eq!(ledger[1].total_price, prices[1].1);
    sim.shutdown().await;
}

#[tokio::test]
async fn dify_refusals_have_dify_shapes() {
    let sim = start().await;
    let (status, params) = dify_get(&sim, "text", "/parameters").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        params["user_input_form"][1]["select"]["options"],
        json!(["formal", "casual"])
    );
    let cases = [
        (
            json!({"inputs": {}, "response_mode": "blocking", "user": "u"}),
            "query is required in input form",
        ),
        (
            json!({"inputs": {"query": "q", "tone": "angry"}, "user": "u"}),
            "",
        ),
        (
            json!({"inputs": {"query": "q", "max_words": "lots"}, "user": "u"}),
            "",
        ),
        (
            json!({"inputs": {"query": "q", "title": "t".repeat(49)}, "user": "u"}),
            "",
        ),
        (json!({"inputs": {"query": "q"}}), ""),
        (json!({"inputs": "q", "user": "u"}), ""),
    ];
    for (body, message) in cases {
        let (status, error) =
            body_json(dify_post(&sim, "text", "/workflows/run", &body).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            (error["code"].as_str(), error["status"].as_u64()),
            (Some("invalid_param"), Some(400))
        );
        if !message.is_empty() {
            assert_eq!(error["message"], message);
        }
    }
    let (status, error) =
        body_json(dify_post(&sim, "nope", "/workflows/run", &run_body("u", "blocking")).await)
            .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, _) = dify_get(&sim, "nope", "/parameters").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = dify_get(&sim, "text", "/workflows/run/no-such-run").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = body_json(
        dify_post(
            &sim,
            "text",
            "/workflows/ver-text-0/run",
            &run_body("u", "blocking"),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(sim.dify_ledger().is_empty(), "nothing was created");

    sim.set_faults(Faults {
        rate_limit_next_submits: 1,
        fail_next_submits: 1,
        retry_after_secs: Some(3),
        ..Faults::default()
    });
    let response = dify_post(&sim, "text", "/workflows/run", &run_body("u", "blocking")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let response = dify_post(&sim, "text", "/workflows/run", &run_body("u", "blocking")).await;
    assert_eq!(response.headers()["retry-after"], "3");
    let (status, error) = body_json(response).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("too_many_requests"))
    );
    sim.set_faults(Faults {
        dify_quota_exceeded: true,
        ..Faults::default()
    });
    let (status, error) =
        body_json(dify_post(&sim, "text", "/workflows/run", &run_body("u", "streaming")).await)
            .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_error"))
    );
    sim.set_faults(Faults {
        refuse_keys: true,
        ..Faults::default()
    });
    let (status, error) = dify_get(&sim, "text", "/parameters").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    sim.set_faults(Faults::default());
    assert!(sim.dify_ledger().is_empty(), "nothing was created");

    let (status, done) = body_json(
        dify_post(
            &sim,
            "text",
            "/workflows/ver-text-1/run",
            &run_body("u", "blocking"),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(done["data"]["status"], "succeeded");
    let stats = sim.stats();
    assert_eq!((stats.dify_runs_created, stats.dify_quota_refusals), (1, 1));
    assert_eq!(sim.dify_ledger().len(), 1);
    sim.shutdown().await;
}

async fn gptbots(sim: &SimServer, workflow: &str, path: &str, body: &Value) -> Response {
    Client::new()
        .post(format!("{}{path}", sim.gptbots_base_url(workflow)))
        .header("Authorization", TOKEN)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

async fn query(sim: &SimServer, workflow: &str, run_id: &str) -> (StatusCode, String) {
    let response = gptbots(
        sim,
        workflow,
        "/v1/workflow/query/result",
        &json!({"workflowRunId": run_id}),
    )
    .await;
    (response.status(), response.text().await.expect("body"))
}

/// The exact `totalCost` in a raw body.
fn raw_cost(text: &str) -> Decimal {
    let at = text.find("\"totalCost\":").expect("totalCost") + "\"totalCost\":".len();
    let rest = &text[at..];
    rest[..rest.find([',', '}']).expect("end")]
        .parse()
        .expect("a bare number")
}

#[tokio::test]
async fn gptbots_async_invoke_then_query_until_succeed() {
    let sim = start().await;
    let (status, pending) = body_json(
        gptbots(
            &sim,
            "news",
            "/v1/workflow/invoke",
            &json!({"userId": "u7", "input": {"topic": "Hawaii"}, "isAsync": true}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(pending["status"], "PENDING");
    assert_eq!(pending["workflowName"], "todayNews");
    let run_id = pending["workflowRunId"].as_str().expect("id").to_owned();
    let mut seen = Vec::new();
    let deadline = Instant::now() + CEILING;
    let text = loop {
        let (status, text) = query(&sim, "news", &run_id).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let body: Value = serde_json::from_str(&text).expect("JSON");
        let s = body["status"].as_str().expect("status").to_owned();
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == "SUCCEED" {
            break text;
        }
        assert!(Instant::now() < deadline, "never succeeded: {text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // In order, each at most once; PENDING and RUNNING may be missed on a
    // loaded machine (the unit tests pin the clock).
    let order = ["PENDING", "RUNNING", "SUCCEED"];
    let ranks: Vec<usize> = seen
        .iter()
        .map(|s| order.iter().position(|o| o == s).expect("a known status"))
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(body["input"], json!({"topic": "Hawaii"}));
    assert!(
        body["output"]["news"][0]["title"]
            .as_str()
            .unwrap_or("")
            .contains("Hawaii")
    );
    assert!(body["endTime"].as_i64() > body["startTime"].as_i64());
    assert!(body.get("errorMessage").is_none());
    let ledger = sim.gptbots_ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].user_id.as_deref(), Some("u7"));
    assert_eq!(ledger[0].status, "SUCCEED");
    assert_eq!(raw_cost(&text), ledger[0].total_cost);
    assert_eq!(body["totalTokens"], ledger[0].total_tokens);
    assert_eq!(
        ledger[0].total_cost,
        Decimal::from(ledger[0].total_tokens) * Decimal::new(4, 4)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn gptbots_sync_invoke_of_a_failing_workflow() {
    let sim = start().await;
    let began = Instant::now();
    let response = gptbots(
        &sim,
        "fails",
        "/v1/workflow/invoke",
        &json!({"input": {"topic": "x"}}),
    )
    .await;
    assert!(
        began.elapsed() >= QUEUE + RUN,
        "a sync invoke waits for the end"
    );
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["status"], "FAILED");
    assert_eq!(body["output"], Value::Null);
    assert_eq!(body["errorMessage"], "simulated workflow failure");
    assert_eq!(sim.gptbots_ledger()[0].user_id, None);
    sim.shutdown().await;
}

#[tokio::test]
async fn gptbots_lost_answer_and_refusals() {
    let sim = start().await;
    sim.set_faults(Faults {
        drop_next_submit_answers: 1,
        ..Faults::default()
    });
    let sent = Client::new()
        .post(format!(
            "{}/v1/workflow/invoke",
            sim.gptbots_base_url("news")
        ))
        .header("Authorization", TOKEN)
        .json(&json!({"input": {"topic": "x"}, "isAsync": true}))
        .send()
        .await;
    if let Ok(response) = sent {
        assert!(
            response.json::<Value>().await.is_err(),
            "the answer must be broken"
        );
    }
    let ledger = sim.gptbots_ledger();
    assert_eq!(ledger.len(), 1, "the run exists all the same");

    let cases = [
        (json!({"input": {}}), "input.topic is required"),
        (json!({"input": "x"}), "input must be an object"),
        (
            json!({"input": {"topic": 1}}),
            "input.topic must be a string",
        ),
    ];
    for (body, message) in cases {
        let (status, error) =
            body_json(gptbots(&sim, "news", "/v1/workflow/invoke", &body).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error, json!({"code": 400_001, "message": message}));
    }
    let (status, text) = query(&sim, "news", "ffffffffffffffffffffffff").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("JSON")["code"],
        404_001
    );
    let (status, _) = query(&sim, "fails", &ledger[0].workflow_run_id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another workflow's run");
    let (status, _) = body_json(
        gptbots(
            &sim,
            "nope",
            "/v1/workflow/invoke",
            &json!({"input": {"topic": "x"}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    sim.set_faults(Faults {
        rate_limit_next_submits: 1,
        fail_next_polls: 1,
        retry_after_secs: Some(2),
        ..Faults::default()
    });
    let response = gptbots(
        &sim,
        "news",
        "/v1/workflow/invoke",
        &json!({"input": {"topic": "x"}}),
    )
    .await;
    assert_eq!(response.headers()["retry-after"], "2");
    let (status, error) = body_json(response).await;
    assert_eq!(
        (status, error["code"].as_u64()),
        (StatusCode::TOO_MANY_REQUESTS, Some(429_000))
    );
    let (status, _) = query(&sim, "news", &ledger[0].workflow_run_id).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = query(&sim, "news", &ledger[0].workflow_run_id).await;
    assert_eq!(status, StatusCode::OK);
    sim.set_faults(Faults {
        refuse_keys: true,
        ..Faults::default()
    });
    let (status, error) = body_json(
        gptbots(
            &sim,
            "news",
            "/v1/workflow/invoke",
            &json!({"input": {"topic": "x"}}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, error["code"].as_u64()),
        (StatusCode::UNAUTHORIZED, Some(401_001))
    );
    assert_eq!(sim.gptbots_ledger().len(), 1);

    let admin = format!("http://{}", sim.local_addr());
    let ledger: Value = Client::new()
        .get(format!("{admin}/_sim/gptbots/ledger"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON");
    assert_eq!(ledger.as_array().map(Vec::len), Some(1));
    let dify: Value = Client::new()
        .get(format!("{admin}/_sim/dify/ledger"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON");
    assert_eq!(dify, json!([]));
    sim.shutdown().await;
}

#[tokio::test]
async fn dify_streams_ping_while_waiting() {
    let sim = start().await;
    sim.set_faults(Faults {
        dify_ping_interval_ms: Some(20),
        ..Faults::default()
    });
    let response = dify_post(&sim, "text", "/workflows/run", &run_body("u", "streaming")).await;
    let text = response.text().await.expect("whole stream");
    assert!(text.contains("event: ping\n\n"), "{text}");
    assert!(
        text.trim_end().ends_with('}'),
        "ends with workflow_finished"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn dify_held_streams_ping_but_keep_workflow_finished_back() {
    let sim = start().await;
    sim.set_faults(Faults {
        hold_streams: true,
        dify_ping_interval_ms: Some(20),
        ..Faults::default()
    });
    let mut sse =
        Sse::new(dify_post(&sim, "text", "/workflows/run", &run_body("u", "streaming")).await);
    let started = sse
        .next()
        .await
        .expect("workflow_started is sent while held");
    assert_eq!(started["event"], "workflow_started");
    let run_id = started["workflow_run_id"].as_str().expect("id").to_owned();
    // Held as soon as an event is due that was not yet when the stream
    // first saw the hold, and still held once the run is over at the
    // provider.
    held(&sim, 1).await;
    wait_detail(&sim, "text", &run_id, |d| d["status"] == "succeeded").await;
    // What was due when the stream first saw the hold came at once (the
    // events due by then: how many depends on the machine's speed), then
    // only pings.
    let mut before_hold = vec![started];
    loop {
        let block = sse.next_block().await.expect("the stream stays open");
        if block == "event: ping\n\n" {
            break;
        }
        let data = block.trim().strip_prefix("data: ").expect("an event");
        before_hold.push(serde_json::from_str(data).expect("event JSON"));
    }
    assert!(
        before_hold
            .iter()
            .all(|e| e["event"] != "workflow_finished"),
        "{before_hold:?}"
    );
    for _ in 0..2 {
        let block = sse.next_block().await.expect("the stream stays open");
        assert_eq!(block, "event: ping\n\n", "only pings while held");
    }
    // A resumed stream gets what was due when it opened, then waits too.
    let response = Client::new()
        .get(format!(
            "{}/workflow/{run_id}/events?user=u",
            sim.dify_base_url("text")
        ))
        .header("Authorization", TOKEN)
        .send()
        .await
        .expect("sent");
    let mut resumed = Sse::new(response);
    let mut names = Vec::new();
    for _ in 0..7 {
        let event = resumed.next().await.expect("an event due before the hold");
        names.push(event["event"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        !names.contains(&"workflow_finished".to_owned()),
        "{names:?}"
    );
    held(&sim, 2).await;
    let stats = sim.stats();
    assert_eq!((stats.held_requests, stats.held_total), (2, 2));

    sim.set_faults(Faults::default());
    let rest = sse.rest().await;
    let last = rest.last().expect("events after the release");
    assert_eq!(last["event"], "workflow_finished");
    assert_eq!(last["data"]["status"], "succeeded");
    assert_eq!(
        before_hold.len() + rest.len(),
        8,
        "workflow_started, node events, then workflow_finished"
    );
    let rest = resumed.rest().await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["event"], "workflow_finished");
    assert_eq!(sim.stats().held_requests, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn dify_and_gptbots_hold_submits_and_status_checks() {
    let sim = std::sync::Arc::new(start().await);
    sim.set_faults(Faults {
        hold_submits: true,
        ..Faults::default()
    });
    let dify_run = {
        let sim = std::sync::Arc::clone(&sim);
        tokio::spawn(async move {
            body_json(dify_post(&sim, "text", "/workflows/run", &run_body("u", "blocking")).await)
                .await
        })
    };
    let invoke = {
        let sim = std::sync::Arc::clone(&sim);
        tokio::spawn(async move {
            body_json(
                gptbots(
                    &sim,
                    "news",
                    "/v1/workflow/invoke",
                    &json!({"input": {"topic": "x"}, "isAsync": true}),
                )
                .await,
            )
            .await
        })
    };
    held(&sim, 2).await;
    assert!(sim.dify_ledger().is_empty() && sim.gptbots_ledger().is_empty());
    let stats = sim.stats();
    assert_eq!(
        (stats.dify_run_requests, stats.gptbots_invoke_requests),
        (0, 0)
    );
    // Parameters are not a submit.
    let (status, _) = dify_get(&sim, "text", "/parameters").await;
    assert_eq!(status, StatusCode::OK);
    sim.set_faults(Faults {
        hold_status_checks: true,
        ..Faults::default()
    });
    let (status, done) = dify_run.await.expect("task");
    assert_eq!(status, StatusCode::OK, "{done}");
    let dify_id = done["workflow_run_id"].as_str().expect("id").to_owned();
    let (status, pending) = invoke.await.expect("task");
    assert_eq!(status, StatusCode::OK, "{pending}");
    let gpt_id = pending["workflowRunId"].as_str().expect("id").to_owned();

    let mut checks = Vec::new();
    for path in [
        format!("/workflows/run/{dify_id}"),
        "/workflows/logs".to_owned(),
        format!("/workflow/{dify_id}/events?user=u"),
    ] {
        let sim = std::sync::Arc::clone(&sim);
        checks.push(tokio::spawn(async move {
            let response = Client::new()
                .get(format!("{}{path}", sim.dify_base_url("text")))
                .header("Authorization", TOKEN)
                .send()
                .await
                .expect("sent");
            (response.status(), response.text().await.expect("body"))
        }));
    }
    {
        let sim = std::sync::Arc::clone(&sim);
        checks.push(tokio::spawn(
            async move { query(&sim, "news", &gpt_id).await },
        ));
    }
    held(&sim, 4).await;
    assert!(checks.iter().all(|c| !c.is_finished()));
    sim.set_faults(Faults::default());
    for check in checks {
        let (status, body) = check.await.expect("task");
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let stats = sim.stats();
    assert_eq!((stats.held_requests, stats.held_total), (0, 6));
    std::sync::Arc::into_inner(sim)
        .expect("tasks done")
        .shutdown()
        .await;
}

#[tokio::test]
async fn run_cap_counts_dify_and_gptbots_runs_apart() {
    // Runs go on for the whole test unless stopped.
    let sim = start_with(Duration::from_secs(600)).await;
    sim.set_faults(Faults {
        max_running_runs: Some(1),
        ..Faults::default()
    });
    let mut sse =
        Sse::new(dify_post(&sim, "text", "/workflows/run", &run_body("u", "streaming")).await);
    let started = sse.next().await.expect("started");
    let task = started["task_id"].as_str().expect("task").to_owned();
    let (status, error) =
        body_json(dify_post(&sim, "text", "/workflows/run", &run_body("u", "blocking")).await)
            .await;
    assert_eq!(
        (status, error["code"].as_str(), error["status"].as_u64()),
        (
            StatusCode::TOO_MANY_REQUESTS,
            Some("too_many_requests"),
            Some(429)
        )
    );
    // GPTBots runs are counted on their own: the Dify run does not block it.
    let invoke = json!({"input": {"topic": "x"}, "isAsync": true});
    let (status, _) = body_json(gptbots(&sim, "news", "/v1/workflow/invoke", &invoke).await).await;
    assert_eq!(status, StatusCode::OK);
    let (status, error) =
        body_json(gptbots(&sim, "news", "/v1/workflow/invoke", &invoke).await).await;
    assert_eq!(
        (status, error["code"].as_u64()),
        (StatusCode::TOO_MANY_REQUESTS, Some(429_001))
    );
    assert_eq!(
        (sim.dify_ledger().len(), sim.gptbots_ledger().len()),
        (1, 1)
    );
    // A stopped run no longer counts.
    let (status, _) = body_json(
        dify_post(
            &sim,
            "text",
            &format!("/workflows/tasks/{task}/stop"),
            &json!({"user": "u"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    drop(sse);
    let mut again =
        Sse::new(dify_post(&sim, "text", "/workflows/run", &run_body("u", "streaming")).await);
    assert_eq!(
        again.next().await.expect("started")["event"],
        "workflow_started"
    );
    drop(again);
    assert_eq!(sim.stats().cap_refusals, 2);
    assert_eq!(sim.dify_ledger().len(), 2);
    sim.shutdown().await;
}

/// Queries a GPTBots run until it has ended; the raw body.
async fn wait_ended(sim: &SimServer, workflow: &str, run_id: &str) -> String {
    let deadline = Instant::now() + CEILING;
    loop {
        let (status, text) = query(sim, workflow, run_id).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let body: Value = serde_json::from_str(&text).expect("JSON");
        if !matches!(body["status"].as_str(), Some("PENDING" | "RUNNING")) {
            return text;
        }
        assert!(Instant::now() < deadline, "never ended: {text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn gptbots_runs_spend_credits_and_stop_at_zero() {
    let start_balance = Decimal::new(1, 1);
    let invoke = json!({"input": {"topic": "x"}, "isAsync": true});
    // Charged at the end: a run that cannot have ended yet cost nothing.
    let long = start_with(LONG_RUN).await;
    long.set_balance(Some(start_balance));
    let (status, _) = body_json(gptbots(&long, "news", "/v1/workflow/invoke", &invoke).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(long.balance(), Some(start_balance), "charged at the end");
    long.shutdown().await;

    let sim = start().await;
    sim.set_balance(Some(start_balance));
    let (status, pending) =
        body_json(gptbots(&sim, "news", "/v1/workflow/invoke", &invoke).await).await;
    assert_eq!(status, StatusCode::OK);
    let run_id = pending["workflowRunId"].as_str().expect("id").to_owned();
    let text = wait_ended(&sim, "news", &run_id).await;
    let cost = raw_cost(&text);
    assert_eq!(cost, sim.gptbots_ledger()[0].total_cost);
    assert_eq!(sim.balance(), Some(start_balance - cost));
    assert!(
        start_balance - cost <= Decimal::ZERO,
        "one run spends it all"
    );
    let (status, refused) =
        body_json(gptbots(&sim, "news", "/v1/workflow/invoke", &invoke).await).await;
    assert_eq!(
        (status, refused),
        (
            StatusCode::OK,
            json!({"code": 403_200, "message": "insufficient credits"})
        )
    );
    assert_eq!(sim.gptbots_ledger().len(), 1);
    assert_eq!(sim.stats().balance_refusals, 1);
    sim.top_up(Decimal::ONE);
    let (status, _) = body_json(gptbots(&sim, "news", "/v1/workflow/invoke", &invoke).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.gptbots_ledger().len(), 2);
    sim.shutdown().await;
}

/// Syntactically valid JSON (serde_json's skipping parser checks only the
/// grammar: no depth limit, no number ranges, no surrogate pairing).
fn valid_json(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// The raw text of a Dify GET.
async fn dify_get_text(sim: &SimServer, app: &str, path: &str) -> (StatusCode, String) {
    let response = Client::new()
        .get(format!("{}{path}", sim.dify_base_url(app)))
        .header("Authorization", TOKEN)
        .send()
        .await
        .expect("request sent");
    (response.status(), response.text().await.expect("body"))
}

#[tokio::test]
async fn dify_hostile_outputs_in_the_stream_the_blocking_answer_and_the_detail() {
    let sim = start().await;
    sim.set_faults(Faults {
        hostile_outputs: true,
        ..Faults::default()
    });
    // Run 1 (NUL), streamed.
    let stream = dify_post(&sim, "text", "/workflows/run", &run_body("u", "streaming"))
        .await
        .text()
        .await
        .expect("whole stream");
    let finished = stream
        .split("\n\n")
        .filter_map(|b| b.strip_prefix("data: "))
        .find(|e| e.contains("\"workflow_finished\""))
        .expect("workflow_finished");
    assert!(valid_json(finished));
    assert!(
        finished.contains(r#""sim_hostile":"before\u0000after""#),
        "{finished}"
    );
    assert!(finished.contains(r#""outputs":{"#), "real outputs kept");
    let first: Value = serde_json::from_str(finished).expect("NUL parses");
    let first_id = first["workflow_run_id"].as_str().expect("id").to_owned();
    // Run 2 (lone surrogate), blocking.
    let blocking = dify_post(&sim, "text", "/workflows/run", &run_body("u", "blocking"))
        .await
        .text()
        .await
        .expect("body");
    assert!(valid_json(&blocking));
    assert!(blocking.contains(r#""sim_hostile":"\ud800""#), "{blocking}");
    assert!(
        serde_json::from_str::<Value>(&blocking).is_err(),
        "strict parsers refuse it"
    );
    // Run 3 (2 MiB), a failing app: the error message carries it.
    let failed = dify_post(&sim, "fails", "/workflows/run", &run_body("u", "blocking"))
        .await
        .text()
        .await
        .expect("body");
    assert!(valid_json(&failed));
    assert!(failed.len() > 2 * 1024 * 1024);
    assert!(failed.contains(r#""error":"simulated node failure xxxx"#));
    let failed: Value = serde_json::from_str(&failed).expect("parses");
    let failed_id = failed["workflow_run_id"].as_str().expect("id").to_owned();
    let (status, detail) = dify_get_text(&sim, "text", &format!("/workflows/run/{first_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(valid_json(&detail) && detail.contains(r"before\u0000after"));
    let (_, detail) = dify_get_text(&sim, "fails", &format!("/workflows/run/{failed_id}")).await;
    assert!(valid_json(&detail) && detail.len() > 2 * 1024 * 1024);
    assert_eq!(sim.stats().hostile_answers, 5);
    // The prices stay exact, so the ledger still matches the stream.
    let llm = stream
        .split("\n\n")
        .filter_map(|b| b.strip_prefix("data: "))
        .find(|e| e.contains("\"node_type\":\"llm\"") && e.contains("node_finished"))
        .expect("llm");
    assert_eq!(raw_price(llm), sim.dify_ledger()[0].total_price);
    sim.shutdown().await;
}

#[tokio::test]
async fn gptbots_odd_statuses_missing_costs_and_hostile_outputs() {
    let sim = start().await;
    sim.set_faults(Faults {
        hostile_outputs: true,
        gptbots_unknown_status: Some("ARCHIVED".to_owned()),
        gptbots_omit_total_cost: true,
        ..Faults::default()
    });
    let sync = json!({"input": {"topic": "x"}});
    let response = gptbots(&sim, "news", "/v1/workflow/invoke", &sync).await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("body");
    assert!(valid_json(&text));
    let body: Value = serde_json::from_str(&text).expect("NUL parses");
    assert_eq!(body["status"], "ARCHIVED");
    assert!(body.get("totalCost").is_none(), "{text}");
    assert_eq!(body["output"]["sim_hostile"], "before\u{0}after");
    assert!(body["output"]["news"].is_array(), "real output kept");
    let first_id = body["workflowRunId"].as_str().expect("id").to_owned();
    let stats = sim.stats();
    assert_eq!(
        (
            stats.hostile_answers,
            stats.gptbots_unknown_statuses,
            stats.gptbots_costs_omitted
        ),
        (1, 1, 1)
    );

    sim.set_faults(Faults {
        hostile_outputs: true,
        ..Faults::default()
    });
    let response = gptbots(&sim, "fails", "/v1/workflow/invoke", &sync).await;
    let text = response.text().await.expect("body");
    assert!(valid_json(&text));
    assert!(
        text.contains(r#""errorMessage":"simulated workflow failure (surrogate: \ud800)""#),
        "{text}"
    );
    assert!(text.contains(r#""status":"FAILED""#));
    assert_eq!(raw_cost(&text), sim.gptbots_ledger()[1].total_cost);

    sim.set_faults(Faults::default());
    let (status, text) = query(&sim, "news", &first_id).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&text).expect("plain JSON");
    assert_eq!(body["status"], "SUCCEED");
    assert_eq!(raw_cost(&text), sim.gptbots_ledger()[0].total_cost);
    assert!(body["output"].get("sim_hostile").is_none());
    let stats = sim.stats();
    assert_eq!(
        (
            stats.hostile_answers,
            stats.gptbots_unknown_statuses,
            stats.gptbots_costs_omitted
        ),
        (2, 1, 1)
    );
    sim.shutdown().await;
}

/// Starts a streaming run whose answer is lost; its id, known only to the
/// simulator (read from its ledger).
async fn lost_streaming_run(sim: &SimServer, user: &str) -> String {
    let before = sim.dify_ledger().len();
    let faults = sim.faults();
    sim.set_faults(Faults {
        drop_next_submit_answers: 1,
        ..faults.clone()
    });
    let sent = Client::new()
        .post(format!("{}/workflows/run", sim.dify_base_url("text")))
        .header("Authorization", TOKEN)
        .json(&run_body(user, "streaming"))
        .send()
        .await;
    if let Ok(response) = sent {
        assert!(response.text().await.is_err(), "the stream must break");
    }
    sim.set_faults(faults);
    let ledger = sim.dify_ledger();
    assert_eq!(ledger.len(), before + 1, "the run exists");
    ledger[before].workflow_run_id.clone()
}

async fn logs_of(sim: &SimServer, user: &str) -> Value {
    let (status, logs) = dify_get(
        sim,
        "text",
        &format!("/workflows/logs?created_by_end_user_session_id={user}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    logs
}

#[tokio::test]
async fn dify_running_runs_whose_answer_was_lost_are_reachable_by_id_and_logged_by_the_rules() {
    // Runs go on for the whole test.
    let sim = start_with(Duration::from_secs(600)).await;
    let run_id = lost_streaming_run(&sim, "lost-1").await;
    let detail = wait_detail(&sim, "text", &run_id, |_| true).await;
    assert_eq!(detail["status"], "running");
    // The resume stream works for it (with the user who started it).
    let response = Client::new()
        .get(format!(
            "{}/workflow/{run_id}/events?user=lost-1",
            sim.dify_base_url("text")
        ))
        .header("Authorization", TOKEN)
        .send()
        .await
        .expect("sent");
    let mut resumed = Sse::new(response);
    let started = resumed.next().await.expect("workflow_started");
    assert_eq!(
        (
            started["event"].as_str(),
            started["workflow_run_id"].as_str()
        ),
        (Some("workflow_started"), Some(run_id.as_str()))
    );
    drop(resumed);
    // Older Dify: no log row until the run ends.
    assert_eq!(logs_of(&sim, "lost-1").await["total"], 0);
    // Newer Dify: the row is written at the start, so the run is found.
    sim.set_faults(Faults {
        dify_logs_include_running: true,
        ..Faults::default()
    });
    let logs = logs_of(&sim, "lost-1").await;
    assert_eq!(logs["total"], 1);
    let row = &logs["data"][0];
    assert_eq!(row["workflow_run"]["id"], run_id.as_str());
    assert_eq!(row["workflow_run"]["status"], "running");
    assert_eq!(row["created_by_end_user"]["session_id"], "lost-1");
    assert_eq!(logs_of(&sim, "someone-else").await["total"], 0);

    // On a Dify whose runs die with their stream, a lost run stays running
    // for good: reachable by id, and in the logs only where rows are
    // written at the start.
    sim.set_faults(Faults {
        dify_runs_die_with_their_stream: true,
        dify_logs_include_running: true,
        ..Faults::default()
    });
    let stuck = lost_streaming_run(&sim, "lost-2").await;
    let detail = wait_detail(&sim, "text", &stuck, |_| true).await;
    assert_eq!(detail["status"], "running");
    let logs = logs_of(&sim, "lost-2").await;
    assert_eq!(logs["data"][0]["workflow_run"]["id"], stuck.as_str());
    sim.set_faults(Faults {
        dify_runs_die_with_their_stream: true,
        ..Faults::default()
    });
    assert_eq!(logs_of(&sim, "lost-2").await["total"], 0);
    sim.shutdown().await;
}
