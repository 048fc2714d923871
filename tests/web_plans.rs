//! Every statement of every dashboard page, on a table of a million runs,
//! is index-backed and bounded: no sequential scan of `wfq.runs`, and a
//! small number of rows and pages read. The plans are the real ones:
//! `auto_explain` (turned on for the test's database) sends each executed
//! statement's plan, with its parameters, rows and buffers, to the client
//! as a notice, which sqlx hands to `tracing`, where this test collects it.

mod common;

use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tracing_subscriber::layer::SubscriberExt;

/// Notices sqlx received (auto_explain's plans among them).
#[derive(Clone, Default)]
struct Notices(Arc<Mutex<Vec<String>>>);

struct Collect(Notices);

struct MessageOf<'a>(&'a mut String);

impl tracing::field::Visit for MessageOf<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.push_str(&format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Collect {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "sqlx::postgres::notice" {
            let mut text = String::new();
            event.record(&mut MessageOf(&mut text));
            self.0.0.lock().unwrap().push(text);
        }
    }
}

/// What one plan read from `wfq.runs`.
#[derive(Debug, Default)]
struct Reads {
    scans: Vec<String>,
    rows: f64,
}

fn walk(node: &serde_json::Value, reads: &mut Reads) {
    if node["Relation Name"] == "runs" {
        reads
            .scans
            .push(node["Node Type"].as_str().unwrap_or("?").to_owned());
        let per_loop = |key: &str| node[key].as_f64().unwrap_or(0.0);
        reads.rows += (per_loop("Actual Rows")
            + per_loop("Rows Removed by Filter")
            + per_loop("Rows Removed by Index Recheck"))
            * node["Actual Loops"].as_f64().unwrap_or(1.0);
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        walk(child, reads);
    }
}

const RUNS: i64 = 1_000_000;

#[sqlx::test]
async fn every_page_reads_a_million_run_table_through_indexes(pool: PgPool) {
    let notices = Notices::default();
    let subscriber = tracing_subscriber::registry()
        .with(Collect(notices.clone()))
        .with(
            tracing_subscriber::filter::Targets::new()
                .with_target("sqlx::postgres::notice", tracing::Level::TRACE),
        );
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    // A year of history: ~2,700 runs a day over three profiles and twenty
    // workflows, ids in time order; the newest 100 queued and 100 running,
    // 9% of the rest failed.
    sqlx::query("ALTER TABLE wfq.runs SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        r#"
        INSERT INTO wfq.runs (provider, workflow_id, metadata, state, created_at, submitted_at,
            finished_at, settled_at, currency, quote_amount, frozen_amount, final_amount,
            released_amount, error_code, error_message, idempotency_key)
        SELECT (ARRAY['chenyu', 'dify', 'gptbots'])[1 + g % 3],
               'wf_' || (g % 20),
               jsonb_build_object('customer', 'c' || (g % 1000)),
               s.state,
               t.created,
               CASE WHEN s.state <> 'queued' THEN t.created + interval '1 second' END,
               CASE WHEN s.state IN ('succeeded', 'failed') THEN t.created + interval '10 seconds' END,
               CASE WHEN s.state IN ('succeeded', 'failed') THEN t.created + interval '11 seconds' END,
               'CNY', 0.03, 0.03,
               CASE WHEN s.state IN ('succeeded', 'failed') THEN 0.01 END,
               CASE WHEN s.state IN ('succeeded', 'failed') THEN 0.02 END,
               CASE WHEN s.state = 'failed' THEN 'ENGINE_' || (g % 5) END,
               CASE WHEN s.state = 'failed' THEN 'simulated failure' END,
               'key-' || g
        FROM generate_series(1, $1) g,
             LATERAL (SELECT now() - ($1 - g) * interval '31.5 seconds' AS created) t,
             LATERAL (SELECT CASE WHEN g > $1 - 100 THEN 'queued'
                                  WHEN g > $1 - 200 THEN 'running'
                                  WHEN g % 100 < 10 THEN 'failed'
                                  ELSE 'succeeded' END AS state) s
        "#,
    )
    .bind(RUNS)
    .execute(&pool)
    .await
    .unwrap();
    // Statistics from a large sample: the plans must not depend on which
    // 30,000 rows the default sample happened to read.
    {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SET default_statistics_target = 1000")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("VACUUM ANALYZE wfq.runs")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let pages: i64 = sqlx::query_scalar(
        "SELECT pg_relation_size('wfq.runs') / current_setting('block_size')::int8",
    )
    .fetch_one(&pool)
    .await
    .unwrap();

    // auto_explain for every new session of this database: the dashboard's.
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    for setting in [
        "session_preload_libraries = 'auto_explain'",
        "auto_explain.log_min_duration = 0",
        "auto_explain.log_analyze = on",
        "auto_explain.log_buffers = on",
        "auto_explain.log_timing = off",
        "auto_explain.log_format = json",
        "auto_explain.log_level = notice",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{database}\" SET {setting}"
        )))
        .execute(&pool)
        .await
        .unwrap();
    }

    let media = std::env::temp_dir().join(format!("wfq-web-plans-{}", std::process::id()));
    let text = format!(
        r#"
        [storage]
        url = "file://{}"
        [providers.chenyu]
        kind = "chenyu"
        base_url = "http://127.0.0.1:1/api/open/v2"
        api_key_env = "UNUSED"
        daily_budget = "100"
        max_outstanding_frozen = "50"
        [providers.dify]
        kind = "dify"
        base_url = "http://127.0.0.1:1/v1"
        api_key_env = "UNUSED"
        [providers.gptbots]
        kind = "gptbots"
        base_url = "http://127.0.0.1:1"
        api_key_env = "UNUSED"
        "#,
        media.display()
    );
    let env = Env;
    let config = wfq::web::WebConfig::defaults(&env).unwrap();
    let url = common::database_url(&pool.connect_options());
    let web_pool = wfq::web::connect(&url, config.statement_timeout, 2)
        .await
        .unwrap();
    let state = Arc::new(wfq::web::WebState::new(
        &config,
        web_pool.clone(),
        wfq::web::ProfileInfo::of_toml(&text, "test").unwrap(),
        None,
    ));
    let server = wfq::web::WebServer::start("127.0.0.1:0".parse().unwrap(), state)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let mid = RUNS / 2;
    let day = chrono::Utc::now().date_naive() - chrono::Duration::days(100);
    let paths = [
        "/".to_owned(),
        "/fragments/overview".into(),
        "/runs".into(),
        "/runs?state=failed".into(),
        "/runs?state=queued".into(),
        "/runs?provider=dify&error_code=ENGINE_3".into(),
        "/runs?workflow=wf_7".into(),
        "/runs?meta=customer%3Dc7".into(),
        format!("/runs?created_from={day}&created_to={day}T12:00"),
        format!("/runs?finished_from={day}"),
        format!("/runs?key=key-{mid}"),
        format!("/runs?id={mid}"),
        format!("/runs?before={mid}&state=succeeded"),
        format!("/runs/{mid}"),
        format!("/runs/{mid}/live"),
        format!("/runs/confirm?action=retry&id={mid}&id={}", mid + 9),
        "/costs".into(),
        "/costs?provider=chenyu".into(),
        "/providers".into(),
        "/workers".into(),
    ];
    let mut report = Vec::new();
    for path in &paths {
        notices.0.lock().unwrap().clear();
        let response = client
            .get(format!("http://{}{path}", server.addr))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        if path.contains("created_to") {
            // The page starts where that day's runs are, not at the newest.
            assert!(body.contains("<a href=\"/runs/"), "{path}: no run found");
        }
        let plans: Vec<serde_json::Value> = notices
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|n| n.find('{').and_then(|i| serde_json::from_str(&n[i..]).ok()))
            .collect();
        assert!(!plans.is_empty(), "{path}: no plan was collected");
        for plan in plans {
            let query = plan["Query Text"].as_str().unwrap_or("").to_owned();
            let top = &plan["Plan"];
            let mut reads = Reads::default();
            walk(top, &mut reads);
            if reads.scans.is_empty() {
                continue;
            }
            let buffers = top["Shared Hit Blocks"].as_u64().unwrap_or(0)
                + top["Shared Read Blocks"].as_u64().unwrap_or(0);
            report.push(format!("{path}: {reads:?} {buffers} buffers"));
            assert!(
                reads.scans.iter().all(|s| s != "Seq Scan"),
                "{path}: a sequential scan of wfq.runs\n{query}\n{plan:#}"
            );
            // The runs page walks at most its window of ids; the costs page
            // reads its week's runs (~20,000 of a million); every other
            // statement a few thousand at most.
            let limit = if path.starts_with("/costs") {
                25_000.0
            } else {
                21_000.0
            };
            assert!(
                reads.rows <= limit,
                "{path}: {reads:?} of {RUNS} runs\n{query}\n{plan:#}"
            );
            assert!(
                (buffers as i64) < pages / 20,
                "{path}: {buffers} of {pages} pages\n{query}\n{plan:#}"
            );
        }
    }
    println!("{}", report.join("\n"));
    server.stop().await;
}

struct Env;

impl wfq::config::Environment for Env {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}
