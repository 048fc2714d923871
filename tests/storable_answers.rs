//! Hostile provider answers, repaired at the edge, are what PostgreSQL
//! stores: `jsonb` and `text` columns of a scratch table take them, while
//! the same values unrepaired are refused (the failure that kept runs stuck).
//! The provider is a small HTTP server on loopback that answers as a
//! hostile GPTBots would.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::types::Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wfq::config::{ApiKey, HttpConfig};
use wfq::providers::storable::{AnswerLimits, make_storable, repair_json_text, storable_text};
use wfq::providers::{GptbotsClient, PollOutcome};

/// Outputs with every kind of hostile content, as JSON text.
fn hostile_outputs() -> String {
    format!(
        r#"{{"nul":"a\u0000b","k\u0000ey":1,"lone":"\ud800x","low":"x\udc00","tab":"a{}b","big":"{}","deep":{}1{},"huge":1e400,"tiny":1.0e-400}}"#,
        '\t',
        "x".repeat(2 * 1024 * 1024),
        "[".repeat(200),
        "]".repeat(200),
    )
}

/// How an answer is sent.
#[derive(Clone, Copy)]
enum Framing {
    ContentLength,
    Chunked,
}

/// Serves `body` with HTTP 200 to every connection, reading each request
/// first; returns the base URL.
async fn serve(body: Vec<u8>, framing: Framing) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                read_request(&mut socket).await;
                let head = match framing {
                    Framing::ContentLength => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    ),
                    Framing::Chunked => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_owned(),
                };
                // The client may stop reading (that is the point of a limit):
                // write errors end this connection, nothing else.
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                match framing {
                    Framing::ContentLength => {
                        let _ = socket.write_all(&body).await;
                    }
                    Framing::Chunked => {
                        for chunk in body.chunks(64 * 1024) {
                            let size = format!("{:x}\r\n", chunk.len());
                            if socket.write_all(size.as_bytes()).await.is_err()
                                || socket.write_all(chunk).await.is_err()
                                || socket.write_all(b"\r\n").await.is_err()
                            {
                                return;
                            }
                        }
                        let _ = socket.write_all(b"0\r\n\r\n").await;
                    }
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// Reads the request head and its `content-length` body.
async fn read_request(socket: &mut tokio::net::TcpStream) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Ok(n) = socket.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        seen.extend_from_slice(&buf[..n]);
        let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if seen.len() >= end + 4 + length {
            return;
        }
    }
}

fn http(max_answer_bytes: usize) -> HttpConfig {
    HttpConfig {
        timeout: Duration::from_secs(30),
        max_answer_bytes,
        ..HttpConfig::default()
    }
}

async fn scratch_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE scratch (id bigint GENERATED ALWAYS AS IDENTITY, doc jsonb, note text)",
    )
    .execute(pool)
    .await
    .expect("scratch table");
}

async fn store(pool: &PgPool, doc: &Value, note: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("INSERT INTO scratch (doc, note) VALUES ($1, $2) RETURNING id")
        .bind(Json(doc))
        .bind(note)
        .fetch_one(pool)
        .await
}

async fn stored(pool: &PgPool, id: i64) -> (Value, String) {
    let (doc, note): (Json<Value>, String) =
        sqlx::query_as("SELECT doc, note FROM scratch WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("read back");
    (doc.0, note)
}

#[sqlx::test]
async fn postgres_refuses_what_a_hostile_provider_sends_unrepaired(pool: PgPool) {
    scratch_table(&pool).await;
    // What serde_json reads from `"\u0000"`: PostgreSQL refuses it in both.
    let nul: Value = serde_json::from_str(r#"{"a":"\u0000"}"#).unwrap();
    assert!(
        store(&pool, &nul, "fine").await.is_err(),
        "jsonb took a NUL"
    );
    assert!(
        store(&pool, &json!({}), "a\0b").await.is_err(),
        "text took a NUL"
    );
    // A lone surrogate escape, sent to jsonb as text.
    let refused = sqlx::query("SELECT $1::jsonb")
        .bind(r#"{"a":"\ud800"}"#)
        .execute(&pool)
        .await;
    assert!(refused.is_err(), "jsonb took a lone surrogate");
    // And serde_json does not even read the rest.
    assert!(serde_json::from_str::<Value>(&hostile_outputs()).is_err());
}

#[sqlx::test]
async fn repaired_values_are_stored_in_jsonb_and_text(pool: PgPool) {
    scratch_table(&pool).await;
    let limits = AnswerLimits::default();
    let text = hostile_outputs();
    let (repaired, repairs) = repair_json_text(&text, limits.max_depth);
    let parsed: Value = serde_json::from_str(&repaired).expect("repaired text parses");
    let (value, more) = make_storable(parsed, &limits);
    assert!(!repairs.is_empty() && more.cut_strings == 1);
    let note = storable_text("run\0status", limits.max_string_bytes);
    let id = store(&pool, &value, &note)
        .await
        .expect("PostgreSQL takes the repaired value");
    let (doc, note) = stored(&pool, id).await;
    assert_eq!(doc, value, "stored as repaired");
    assert_eq!(note, "run\u{FFFD}status");
    assert_eq!(doc["huge"], "1e400");
    assert_eq!(doc["tiny"], "1.0e-400");
    assert_eq!(doc["k\u{FFFD}ey"], 1);
    // The repairs themselves are a small jsonb object.
    let id = store(&pool, &repairs.to_json(), "repairs").await.unwrap();
    let (doc, _) = stored(&pool, id).await;
    assert_eq!(doc["nul"], 2);
    assert_eq!(doc["number_as_text"], 2);
}

#[sqlx::test]
async fn a_hostile_gptbots_answer_is_stored_as_the_client_reports_it(pool: PgPool) {
    scratch_table(&pool).await;
    let body = format!(
        r#"{{"workflowRunId":"r1","status":"FAILED","errorMessage":"node\u0000 broke \ud800","totalCost":0.00028780,"totalTokens":3,"output":{}}}"#,
        hostile_outputs()
    );
    let base = serve(body.into_bytes(), Framing::ContentLength).await;
    let client = GptbotsClient::new(&base, ApiKey::new("k"), &http(16 << 20)).unwrap();
    let PollOutcome::Report(report) = client.poll("r1").await else {
        panic!("the answer was not read");
    };
    assert_eq!(report.total_cost.unwrap().to_string(), "0.00028780");
    assert!(!report.repairs.is_empty());
    let outputs = report.outputs.clone().expect("outputs");
    let message = report.error_message.clone().expect("a message");
    let id = store(&pool, &outputs, &message)
        .await
        .expect("outputs and message stored");
    let (doc, note) = stored(&pool, id).await;
    assert_eq!(doc, outputs);
    assert_eq!(note, "node\u{FFFD} broke \u{FFFD}");
    store(&pool, &report.raw, report.run_status.as_deref().unwrap())
        .await
        .expect("the audit copy stored");
    store(&pool, &report.repairs.to_json(), "repairs")
        .await
        .expect("the repairs stored");
}

#[tokio::test]
async fn a_body_larger_than_max_answer_bytes_is_not_read_and_is_unclear() {
    let big = format!(r#"{{"status":"RUNNING","pad":"{}"}}"#, "x".repeat(4 << 20)).into_bytes();
    for framing in [Framing::ContentLength, Framing::Chunked] {
        let base = serve(big.clone(), framing).await;
        let client = GptbotsClient::new(&base, ApiKey::new("k"), &http(1 << 20)).unwrap();
        match client.poll("r1").await {
            PollOutcome::Unclear(u) => {
                assert!(u.reason.contains("max_answer_bytes"), "{}", u.reason);
                assert_eq!(u.http_status, Some(200));
            }
            other => panic!("a 4 MiB answer was read: {other:?}"),
        }
    }
    // Within the limit the same client reads it.
    let base = serve(big, Framing::Chunked).await;
    let client = GptbotsClient::new(&base, ApiKey::new("k"), &http(8 << 20)).unwrap();
    assert!(matches!(client.poll("r1").await, PollOutcome::Report(_)));
}
