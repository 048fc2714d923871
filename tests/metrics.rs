//! `/metrics`, `/healthz` and `/readyz` of a real worker: real PostgreSQL,
//! the simulator on loopback, scraped over HTTP.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use common::*;
use wfq::config::Config;
use wfq::metrics::Metrics;
use wfq::runtime::{WorkerError, run_worker_with_metrics};

const LIMIT: Duration = Duration::from_secs(30);
const METRICS_ON: &str = "\n[metrics]\nlisten = \"127.0.0.1:0\"\n";

async fn pool(connect: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(connect.clone())
        .await
        .expect("test database")
}

struct Worker {
    stop: oneshot::Sender<()>,
    join: JoinHandle<Result<(), WorkerError>>,
    metrics: Arc<Metrics>,
}

fn start(config: Config, pool: PgPool) -> Worker {
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let registry = metrics.clone();
    let join = tokio::spawn(async move {
        run_worker_with_metrics(&config, pool, registry, async move {
            let _ = stopped.await;
        })
        .await
    });
    Worker {
        stop,
        join,
        metrics,
    }
}

impl Worker {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.join
            .await
            .expect("worker task did not panic")
            .expect("worker exits cleanly");
    }
}

/// One sample line: name, labels, value (as written).
type Sample = (String, BTreeMap<String, String>, String);

/// Parses an exposition strictly: every line is a `#` comment or
/// `name{label="value",...} value`, with escaped label values; panics otherwise.
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| -> ! { panic!("{why}: `{line}`\n{text}") };
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or_else(|| bad("no value"));
        let (name, mut rest) = line.split_at(name_end);
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            bad("bad metric name");
        }
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            loop {
                let Some(&(start, c)) = chars.peek() else {
                    bad("unterminated labels")
                };
                if c == '}' {
                    rest = &inner[start + 1..];
                    break;
                }
                let eq = inner[start..]
                    .find("=\"")
                    .unwrap_or_else(|| bad("label without value"))
                    + start;
                let label = &inner[start..eq];
                if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    bad("bad label name");
                }
                while chars.peek().is_some_and(|&(i, _)| i <= eq + 1) {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            _ => bad("bad escape"),
                        },
                        Some((_, '\n')) | None => bad("unterminated label value"),
                        Some((_, c)) => value.push(c),
                    }
                }
                labels.insert(label.to_owned(), value);
                match chars.peek() {
                    Some((_, ',')) => {
                        chars.next();
                    }
                    Some((_, '}')) => {}
                    _ => bad("expected , or }"),
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| bad("no space before the value"));
        let ok = matches!(value, "+Inf" | "-Inf" | "NaN") || value.parse::<f64>().is_ok();
        if !ok {
            bad("value is not a number");
        }
        samples.push((name.to_owned(), labels, value.to_owned()));
    }
    samples
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a str> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v.as_str())
}

fn number(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    find(samples, name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .parse()
        .unwrap()
}

/// Checks one histogram series: cumulative buckets, `+Inf` = `_count`.
fn histogram_count(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
    let bucket = format!("{name}_bucket");
    let buckets: Vec<(f64, u64)> = samples
        .iter()
        .filter(|(n, l, _)| {
            *n == bucket
                && l.len() == labels.len() + 1
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, l, v)| {
            let le = match l["le"].as_str() {
                "+Inf" => f64::INFINITY,
                le => le.parse().unwrap(),
            };
            (le, v.parse().unwrap())
        })
        .collect();
    assert!(buckets.len() >= 2, "{name}{labels:?}: buckets {buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{name}{labels:?}: buckets not ascending and cumulative: {buckets:?}"
    );
    let (last_le, inf) = *buckets.last().unwrap();
    assert_eq!(last_le, f64::INFINITY, "{name}: last bucket is +Inf");
    let count = number(samples, &format!("{name}_count"), labels) as u64;
    assert_eq!(inf, count, "{name}{labels:?}: +Inf bucket equals _count");
    assert!(find(samples, &format!("{name}_sum"), labels).is_some());
    count
}

async fn scrape(client: &reqwest::Client, base: &str) -> Vec<Sample> {
    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    parse(&response.text().await.unwrap())
}

/// Scrapes until `done` holds (the database series are reused for 5 s, and
/// a run's finish is counted just after it is written), at most [`LIMIT`].
async fn scrape_until(
    client: &reqwest::Client,
    base: &str,
    what: &str,
    done: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let samples = scrape(client, base).await;
        if done(&samples) {
            return samples;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no scrape within {LIMIT:?} with {what}: {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(client: &reqwest::Client, url: String) -> (u16, String) {
    let response = client.get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[sqlx::test]
async fn metrics_and_health_of_a_working_worker(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(&connect).await;
    // The worker gets a pool of its own, so closing it cuts only the worker off.
    let worker_pool = self::pool(&connect).await;
    let sim = start_sim(50, 100, 100).await;
    // Status checks are held until the scrape below has seen the runs at
    // the provider: they stay `running`, their quotes outstanding.
    sim.set_faults(wfq::sim::Faults {
        hold_status_checks: true,
        ..Default::default()
    });
    let worker = start(config(&sim, "w-metrics", METRICS_ON), worker_pool.clone());
    let addr = tokio::time::timeout(LIMIT, worker.metrics.bound_addr())
        .await
        .expect("the metrics server listens");
    assert_ne!(addr.port(), 0, "the real port is published");
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    assert_eq!(get(&client, format!("{base}/healthz")).await.0, 200);

    const RUNS: usize = 3;
    for seed in 0..RUNS {
        enqueue(
            &pool,
            TEXT_TO_IMAGE,
            json!({"n6_text": "a cat", "n3_seed": seed}),
        )
        .await;
    }

    // While the runs are at the provider, their frozen quotes are outstanding.
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE state = 'running' AND frozen_amount IS NOT NULL AND settled_at IS NULL) = 3",
        LIMIT,
    )
    .await;
    let samples = scrape(&client, &base).await;
    let frozen: Decimal =
        sqlx::query_scalar("SELECT sum(frozen_amount) FROM wfq.runs WHERE settled_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    let scraped = find(
        &samples,
        "wfq_outstanding_frozen",
        &[("provider", "chenyu"), ("currency", "CNY")],
    )
    .expect("outstanding frozen money");
    assert_eq!(Decimal::from_str(scraped).unwrap(), frozen);
    assert_eq!(
        number(
            &samples,
            "wfq_runs",
            &[("provider", "chenyu"), ("state", "running")]
        ),
        RUNS as f64
    );

    sim.set_faults(wfq::sim::Faults::default());
    wait_all_final(&pool, LIMIT).await;
    let chenyu = ("provider", "chenyu");
    let samples = scrape_until(&client, &base, "no run running, 3 finished", |s| {
        find(s, "wfq_runs", &[chenyu, ("state", "running")]) == Some("0")
            && find(
                s,
                "wfq_runs_finished_total",
                &[chenyu, ("state", "succeeded")],
            ) == Some("3")
    })
    .await;
    for state in ["queued", "submitting", "running"] {
        assert_eq!(
            number(&samples, "wfq_runs", &[chenyu, ("state", state)]),
            0.0,
            "{state}"
        );
    }
    for state in ["failed", "canceled"] {
        assert_eq!(
            number(
                &samples,
                "wfq_runs_finished_total",
                &[chenyu, ("state", state)]
            ),
            0.0,
            "{state}"
        );
    }
    assert!(
        !samples
            .iter()
            .any(|(n, l, _)| n == "wfq_runs" && l["state"] == "succeeded"),
        "final states are counted as they happen, not read from the table"
    );
    assert!(
        find(
            &samples,
            "wfq_outstanding_frozen",
            &[chenyu, ("currency", "CNY")]
        )
        .is_none(),
        "settled money is not outstanding"
    );
    assert_eq!(
        number(
            &samples,
            "wfq_submits_total",
            &[chenyu, ("outcome", "accepted")]
        ),
        RUNS as f64
    );
    assert!(
        number(
            &samples,
            "wfq_polls_total",
            &[chenyu, ("outcome", "succeeded")]
        ) >= RUNS as f64
    );
    assert!(
        !samples
            .iter()
            .any(|(n, _, _)| n == "wfq_provider_errors_total"),
        "no provider errors without faults"
    );
    let submits = histogram_count(
        &samples,
        "wfq_provider_request_duration_seconds",
        &[chenyu, ("call", "submit")],
    );
    assert_eq!(submits, RUNS as u64);
    let polls = histogram_count(
        &samples,
        "wfq_provider_request_duration_seconds",
        &[chenyu, ("call", "poll")],
    );
    assert!(polls >= RUNS as u64);
    assert!(
        histogram_count(
            &samples,
            "wfq_provider_request_duration_seconds",
            &[chenyu, ("call", "manifest")]
        ) >= 1
    );
    assert!(histogram_count(&samples, "wfq_claim_batch_size", &[]) >= 1);
    assert_eq!(number(&samples, "wfq_lease_rescues_total", &[]), 0.0);
    assert!(find(&samples, "wfq_steps_in_flight", &[]).is_some());
    assert_eq!(
        number(
            &samples,
            "wfq_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let idle = number(&samples, "wfq_db_pool_connections", &[("state", "idle")]);
    let used = number(&samples, "wfq_db_pool_connections", &[("state", "used")]);
    assert!(
        idle + used >= 1.0 && idle + used <= 8.0,
        "idle {idle} used {used}"
    );

    let (status, body) = get(&client, format!("{base}/readyz")).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // The worker's database goes away: not ready, but alive.
    worker_pool.close().await;
    let (status, body) = get(&client, format!("{base}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("database: "), "{body}");
    assert_eq!(get(&client, format!("{base}/healthz")).await.0, 200);
    // The scrape still answers, without the database series.
    let samples = scrape(&client, &base).await;
    assert!(
        find(
            &samples,
            "wfq_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        )
        .is_some()
    );

    worker.stop().await;
    assert!(
        client.get(format!("{base}/healthz")).send().await.is_err(),
        "the endpoints stop with the worker"
    );
}

#[sqlx::test]
async fn no_metrics_section_no_server_and_a_taken_port_is_an_error(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(10, 10, 10).await;

    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "a cat"})).await;
    let worker = start(config(&sim, "w-plain", ""), pool.clone());
    wait_all_final(&pool, LIMIT).await;
    assert_eq!(run(&pool, id).await.state, "succeeded");
    assert_eq!(worker.metrics.listening(), None);
    worker.stop().await;

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let extra = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let worker = start(config(&sim, "w-taken", &extra), pool.clone());
    let err = worker.join.await.unwrap().expect_err("cannot listen");
    assert!(matches!(err, WorkerError::Metrics { .. }), "{err}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

#[sqlx::test]
async fn provider_trouble_is_counted_by_outcome_and_code(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 50).await;
    sim.set_faults(wfq::sim::Faults {
        fail_next_submits: 1,
        drop_next_submit_answers: 1,
        fail_next_polls: 1,
        ..Default::default()
    });
    let ok = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    let worker = start(config(&sim, "w-trouble", METRICS_ON), pool.clone());
    let base = format!("http://{}", worker.metrics.bound_addr().await);
    wait_all_final(&pool, LIMIT).await;
    let fails = enqueue(&pool, ALWAYS_FAILS, json!({})).await;
    wait_all_final(&pool, LIMIT).await;
    assert_eq!(run(&pool, ok).await.state, "succeeded");
    assert_eq!(run(&pool, fails).await.state, "failed");

    let chenyu = ("provider", "chenyu");
    let finished = |s: &[Sample], state| {
        find(s, "wfq_runs_finished_total", &[chenyu, ("state", state)]) == Some("1")
    };
    let samples = scrape_until(&reqwest::Client::new(), &base, "both runs counted", |s| {
        finished(s, "succeeded") && finished(s, "failed")
    })
    .await;
    // 503, then a lost answer, then chenyu replays the key; the failing
    // workflow is accepted at once.
    let submits = |outcome| {
        number(
            &samples,
            "wfq_submits_total",
            &[chenyu, ("outcome", outcome)],
        )
    };
    assert_eq!(submits("unclear"), 2.0);
    assert_eq!(submits("replayed"), 1.0);
    assert_eq!(submits("accepted"), 1.0);
    let submit_calls = histogram_count(
        &samples,
        "wfq_provider_request_duration_seconds",
        &[chenyu, ("call", "submit")],
    );
    assert_eq!(submit_calls, 4);
    // One 503 on a submit, one on a status check.
    assert_eq!(
        number(
            &samples,
            "wfq_provider_errors_total",
            &[chenyu, ("code", "HTTP_503")]
        ),
        2.0
    );
    assert!(
        number(
            &samples,
            "wfq_polls_total",
            &[chenyu, ("outcome", "unclear")]
        ) >= 1.0
    );
    assert!(
        number(
            &samples,
            "wfq_polls_total",
            &[chenyu, ("outcome", "failed")]
        ) >= 1.0
    );
    assert_eq!(
        number(
            &samples,
            "wfq_runs_finished_total",
            &[chenyu, ("state", "canceled")]
        ),
        0.0
    );
    worker.stop().await;
}

/// A GPTBots status nobody documented is counted as what it is
/// (`wfq_polls_total{outcome="unknown_status"}`), once for every status
/// check that read it (each leaves an `unknown_status` event), not as a run
/// still going; the run then fails `UNKNOWN_RUN_STATUS`.
#[sqlx::test]
async fn an_unknown_gptbots_status_is_counted_by_outcome(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(20, 200, 50).await;
    sim.set_faults(wfq::sim::Faults {
        gptbots_unknown_status: Some("ARCHIVED".to_owned()),
        ..Default::default()
    });
    let id = enqueue_on(&pool, "gptbots", "news", json!({"topic": "odd"})).await;
    let extra = format!(
        "{}{METRICS_ON}\n[poll]\ninitial = \"50ms\"\nmax = \"200ms\"\njitter = 0.1\nunknown_status_limit = \"1s\"\n",
        other_providers(&sim)
    );
    let worker = start(config(&sim, "w-unknown", &extra), pool.clone());
    let base = format!("http://{}", worker.metrics.bound_addr().await);
    wait_all_final(&pool, LIMIT).await;
    let row = run(&pool, id).await;
    assert_eq!(
        row.error_code.as_deref(),
        Some("UNKNOWN_RUN_STATUS"),
        "{row:?}"
    );
    let gptbots = ("provider", "gptbots");
    let samples = scrape_until(&reqwest::Client::new(), &base, "the run counted", |s| {
        find(
            s,
            "wfq_runs_finished_total",
            &[gptbots, ("state", "failed")],
        ) == Some("1")
    })
    .await;
    let unknown_checks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wfq.run_events WHERE run_id = $1 AND kind = 'unknown_status'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(unknown_checks >= 1);
    assert_eq!(
        number(
            &samples,
            "wfq_polls_total",
            &[gptbots, ("outcome", "unknown_status")]
        ),
        unknown_checks as f64,
        "one count per status check that read the unknown status"
    );
    assert!(sim.stats().gptbots_unknown_statuses >= unknown_checks as u64);
    worker.stop().await;
    sim.shutdown().await;
}

/// What one statement's plan read from `wfq.runs` (and its indexes).
#[derive(Debug, Default)]
struct Reads {
    /// Scan nodes over `wfq.runs`, by node type.
    scans: Vec<String>,
    /// Rows those scans produced or filtered out.
    rows: f64,
    /// Shared buffers the whole statement touched.
    buffers: u64,
}

fn walk(node: &serde_json::Value, reads: &mut Reads) {
    if node["Relation Name"] == "runs" {
        reads
            .scans
            .push(node["Node Type"].as_str().unwrap().to_owned());
        let per_loop = |key: &str| node[key].as_f64().unwrap_or(0.0);
        // EXPLAIN shows row counts per loop.
        reads.rows += (per_loop("Actual Rows")
            + per_loop("Rows Removed by Filter")
            + per_loop("Rows Removed by Index Recheck"))
            * node["Actual Loops"].as_f64().unwrap_or(1.0);
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        walk(child, reads);
    }
}

/// Runs the scrape's statements, then explains the very statements they
/// prepared on the pool's one connection (no copy of their SQL here).
async fn scrape_reads(pool: &PgPool) -> Vec<(String, Reads)> {
    let runs = wfq::store::count_runs(pool).await.unwrap();
    let active = |state: &str| {
        runs.iter()
            .find(|(p, s, _)| p == "chenyu" && s == state)
            .map(|r| r.2)
    };
    assert_eq!(
        (active("queued"), active("submitting"), active("running")),
        (Some(2), Some(1), Some(2)),
        "{runs:?}"
    );
    assert_eq!(runs.len(), 3, "only active states are counted: {runs:?}");
    let frozen = wfq::store::outstanding_frozen(pool).await.unwrap();
    assert_eq!(
        frozen,
        vec![("chenyu".to_owned(), "CNY".to_owned(), Decimal::new(11, 2))]
    );

    let statements: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, statement FROM pg_prepared_statements \
         WHERE NOT from_sql AND statement LIKE '%FROM wfq.runs%' \
           AND statement NOT LIKE '%pg_prepared_statements%' ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(statements.len(), 2, "{statements:?}");
    let mut all = Vec::new();
    for (name, statement) in statements {
        let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name}"
        )))
        .fetch_one(pool)
        .await
        .unwrap();
        let top = &plan[0]["Plan"];
        let mut reads = Reads {
            buffers: top["Shared Hit Blocks"].as_u64().unwrap()
                + top["Shared Read Blocks"].as_u64().unwrap(),
            ..Reads::default()
        };
        walk(top, &mut reads);
        all.push((format!("{statement}\n{plan:#}"), reads));
    }
    all
}

/// Finished runs kept in the table (tens of millions in production) cost a
/// scrape nothing: its statements read the runs in flight and the unsettled
/// ones through partial indexes, and as many pages with 100,000 finished
/// runs as with 50,000.
#[sqlx::test]
async fn the_scrape_reads_only_active_and_unsettled_runs(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // One connection: the statements the scrape prepared are in its session.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(connect)
        .await
        .unwrap();
    // The plans must not depend on chance: ANALYZE reads every row (its
    // sample, 300 x the target, covers the whole table; a random sample
    // of 30,000 sees a varying few of the six runs the scrape reads, and
    // the planner may then pick another index path), and autovacuum never
    // replaces those statistics or the visibility map between the
    // test's VACUUM ANALYZE and its EXPLAIN.
    sqlx::query("SET default_statistics_target = 1000")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE wfq.runs SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO wfq.runs (provider, workflow_id, state, frozen_amount, currency, settled_at) \
         VALUES ('chenyu', 'wf', 'queued', NULL, NULL, NULL), ('chenyu', 'wf', 'queued', NULL, NULL, NULL), \
                ('chenyu', 'wf', 'submitting', NULL, NULL, NULL), \
                ('chenyu', 'wf', 'running', 0.03, 'CNY', NULL), ('chenyu', 'wf', 'running', 0.03, 'CNY', NULL), \
                -- A finished run whose money is an open question: outstanding.
                ('chenyu', 'wf', 'failed', 0.05, 'CNY', NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut plans = Vec::new();
    for round in 1..=2 {
        sqlx::query(
            "INSERT INTO wfq.runs (provider, workflow_id, state, frozen_amount, currency, \
                                   final_amount, released_amount, finished_at, settled_at) \
             SELECT CASE WHEN g % 2 = 0 THEN 'chenyu' ELSE 'dify' END, 'wf', \
                    (ARRAY['succeeded', 'failed', 'canceled'])[1 + g % 3], \
                    0.03, 'CNY', 0.03, 0, now(), now() \
             FROM generate_series(1, 50000) g",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("VACUUM ANALYZE wfq.runs")
            .execute(&pool)
            .await
            .unwrap();
        let pages: i64 = sqlx::query_scalar(
            "SELECT pg_relation_size('wfq.runs') / current_setting('block_size')::int8",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        for (what, reads) in scrape_reads(&pool).await {
            assert!(!reads.scans.is_empty(), "{what}");
            assert!(
                reads.scans.iter().all(|s| s != "Seq Scan"),
                "round {round}: {reads:?}\n{what}"
            );
            // 5 active runs, 1 unsettled finished one.
            assert!(reads.rows <= 6.0, "round {round}: {reads:?}\n{what}");
            // A scan of the table would read every one of its pages.
            assert!(
                reads.buffers <= 12 && pages > 500 * round,
                "round {round}: {pages} pages, {reads:?}\n{what}"
            );
            seen.push(reads.buffers);
            plans.push(what);
        }
    }
    // The same pages, whatever the history.
    assert_eq!(seen[..2], seen[2..], "{seen:?}\n{}", plans.join("\n"));
}
