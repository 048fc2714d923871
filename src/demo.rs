//! `wfq demo`: the whole product in one command, against the built-in
//! simulator. Finds (or makes) a database, migrates it, starts the
//! simulator, enqueues a few runs, runs the worker until every run is final
//! and prints what a user would read with SQL.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::{Config, ConfigError, Environment};
use crate::scratch_postgres::{ScratchCluster, ScratchError, find_bindir};
use crate::sim::{SimConfig, SimServer};
use crate::store::{self, NewRun, RequestError};
use crate::table;

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// No database could be found or made.
    #[error(
        "wfq demo needs PostgreSQL: set DATABASE_URL, or start a server on 127.0.0.1:5432 (user postgres, trust auth), or install the postgresql package so a throw-away cluster can be made ({0})"
    )]
    NoDatabase(String),
    /// The scratch cluster failed.
    #[error("could not start a throw-away PostgreSQL cluster: {0}")]
    Scratch(#[from] ScratchError),
    /// A database step failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The built-in configuration is wrong (a bug).
    #[error("demo configuration: {0}")]
    Config(#[from] ConfigError),
    /// An enqueue failed.
    #[error("enqueue: {0}")]
    Enqueue(#[from] RequestError),
    /// The simulator could not start.
    #[error("simulator: {0}")]
    Sim(#[from] std::io::Error),
    /// The worker failed.
    #[error("{0}")]
    Worker(#[from] crate::runtime::WorkerError),
    /// The demo's files could not be written.
    #[error("demo files: {0}")]
    Files(String),
    /// Runs did not finish in time.
    #[error("{0} runs were still not final after {1:?}; see `wfq list`")]
    Timeout(i64, Duration),
}

const LOCAL_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DEMO_DATABASE: &str = "wfq_demo";
const DEMO_API_KEY: &str = "demo-key-not-secret";

/// Where the demo's database lives; keeps a scratch cluster alive.
struct DemoDatabase {
    url: String,
    _cluster: Option<ScratchCluster>,
}

async fn answers(url: &str) -> Option<PgPool> {
    PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(3))
        .connect(url)
        .await
        .ok()
}

/// Recreates the demo's own database on the server `server_url` points at,
/// so the demo never writes into anyone's data and always starts clean.
/// `None` when the server does not let us create databases.
async fn fresh_demo_database(server_url: &str) -> Result<Option<String>, DemoError> {
    let server = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(server_url)
        .await?;
    let created = async {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {DEMO_DATABASE} WITH (FORCE)"
        )))
        .execute(&server)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {DEMO_DATABASE}"
        )))
        .execute(&server)
        .await
    }
    .await;
    server.close().await;
    if created.is_err() {
        return Ok(None);
    }
    let mut url = url::Url::parse(server_url)
        .map_err(|e| DemoError::NoDatabase(format!("cannot read the database URL: {e}")))?;
    url.set_path(DEMO_DATABASE);
    Ok(Some(url.to_string()))
}

async fn find_database() -> Result<(DemoDatabase, PgPool), DemoError> {
    let from_env = ["WFQ_DATABASE_URL", "DATABASE_URL"]
        .into_iter()
        .find_map(|var| {
            std::env::var(var)
                .ok()
                .filter(|u| !u.is_empty())
                .map(|u| (var, u))
        });
    let (server_url, origin, cluster) = if let Some((var, url)) = from_env {
        (url, format!("the server {var} points at"), None)
    } else if answers(LOCAL_SERVER).await.is_some() {
        (
            LOCAL_SERVER.to_owned(),
            "the local server at 127.0.0.1:5432".to_owned(),
            None,
        )
    } else if find_bindir().is_some() {
        println!(
            "database: no server at 127.0.0.1:5432; starting a throw-away cluster in a temporary directory (deleted at exit)"
        );
        let cluster = tokio::task::spawn_blocking(ScratchCluster::start)
            .await
            .map_err(|e| DemoError::NoDatabase(e.to_string()))??;
        (
            cluster.url.clone(),
            "the throw-away cluster".to_owned(),
            Some(cluster),
        )
    } else {
        return Err(DemoError::NoDatabase(
            "no DATABASE_URL, no server at 127.0.0.1:5432, and no initdb installed".into(),
        ));
    };
    let url = match fresh_demo_database(&server_url).await? {
        Some(url) => {
            println!("database: {DEMO_DATABASE} on {origin} (recreated for this demo)");
            url
        }
        // Never fall back to the server's own database: it may hold a real
        // queue, and the demo's worker would submit its runs to the simulator.
        None => {
            return Err(DemoError::NoDatabase(format!(
                "{origin} does not let this user create the `{DEMO_DATABASE}` database"
            )));
        }
    };
    let pool = answers(&url).await.ok_or_else(|| {
        DemoError::NoDatabase(format!(
            "cannot connect to {}",
            crate::config::DatabaseUrl::new(url.clone())
        ))
    })?;
    Ok((
        DemoDatabase {
            url,
            _cluster: cluster,
        },
        pool,
    ))
}

struct DemoEnv(HashMap<&'static str, String>);

impl Environment for DemoEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// The runs the demo enqueues: successes, an external-cost video, a run the
/// provider fails (still settled), a typo the worker rejects before submit,
/// and one canceled before it is picked up.
fn demo_runs(picture: &str) -> Vec<(&'static str, NewRun)> {
    let run = |workflow: &str, inputs: serde_json::Value| NewRun {
        workflow_id: workflow.to_owned(),
        inputs,
        ..Default::default()
    };
    vec![
        (
            "text to image",
            run(
                "wf_861ef31e94dcfb10e6e7",
                json!({"n6_text": "a glass bottle on a beach at dusk", "n3_seed": 42}),
            ),
        ),
        (
            "text to image, manifest defaults",
            run("wf_861ef31e94dcfb10e6e7", json!({})),
        ),
        (
            "video with an external model cost, from a local picture (uploaded first)",
            NewRun {
                accept_external_cost_risk: true,
                priority: 10,
                ..run(
                    "wf_seedance_video_2f0c",
                    json!({"prompt": "a paper boat in the rain", "image": {"$file": picture}}),
                )
            },
        ),
        (
            "a run the provider fails (money still settled)",
            run("wf_always_fails_9d1a", json!({"prompt": "fail please"})),
        ),
        (
            "a typo in an input key (never submitted)",
            run("wf_861ef31e94dcfb10e6e7", json!({"n6_txt": "typo"})),
        ),
        (
            "a Dify workflow app (tokens and price from its nodes)",
            NewRun {
                provider: Some("dify".into()),
                ..run(
                    "summarize",
                    json!({"query": "summarise the release notes", "tone": "formal"}),
                )
            },
        ),
        (
            "a GPTBots workflow (credits)",
            NewRun {
                provider: Some("gptbots".into()),
                ..run("news", json!({"topic": "Hawaii"}))
            },
        ),
    ]
}

/// Runs the demo; prints as it goes.
pub async fn run_demo() -> Result<(), DemoError> {
    let (database, pool) = find_database().await?;
    store::migrate(&pool).await?;

    let sim = SimServer::start(
        "127.0.0.1:0".parse().expect("a valid socket address"),
        SimConfig {
            queue_time: Duration::from_millis(300),
            run_time: Duration::from_millis(1500),
            settle_delay: Duration::from_millis(500),
            api_key: Some(DEMO_API_KEY.to_owned()),
        },
    )
    .await?;
    println!("simulator: chenyu open API v2 at {}", sim.base_url());
    println!(
        "           Dify app `text` at {}",
        sim.dify_base_url("text")
    );
    println!(
        "           GPTBots workflow `news` at {}",
        sim.gptbots_base_url("news")
    );

    // Outputs are kept in a local store; one input is a local picture.
    let media = std::env::temp_dir().join("wfq-demo-media");
    let _ = std::fs::remove_dir_all(&media);
    std::fs::create_dir_all(&media).map_err(|e| DemoError::Files(e.to_string()))?;
    let picture = std::env::temp_dir().join("wfq-demo-boat.png");
    std::fs::write(&picture, crate::sim::sample_png(7))
        .map_err(|e| DemoError::Files(e.to_string()))?;
    println!(
        "files: input picture {}, outputs kept in {}",
        picture.display(),
        media.display()
    );
    let toml = format!(
        r#"
        [storage]
        url = "file://{}"
        initial = "200ms"
        max = "1s"
        [worker]
        concurrency = 16
        fallback_poll = "1s"
        shutdown_grace = "5s"
        [poll]
        initial = "500ms"
        max = "2s"
        [providers.chenyu]
        kind = "chenyu"
        base_url = "{}"
        api_key_env = "WFQ_DEMO_KEY"
        [providers.dify]
        kind = "dify"
        base_url = "{}"
        api_key_env = "WFQ_DEMO_KEY"
        [providers.gptbots]
        kind = "gptbots"
        base_url = "{}"
        api_key_env = "WFQ_DEMO_KEY"
        "#,
        media.display(),
        sim.base_url(),
        sim.dify_base_url("text"),
        sim.gptbots_base_url("news"),
    );
    let env = DemoEnv(HashMap::from([
        ("WFQ_DEMO_KEY", DEMO_API_KEY.to_owned()),
        ("WFQ_DATABASE_URL", database.url.clone()),
    ]));
    let config = Config::from_toml(&toml, "demo configuration", &env)?;

    let mut ids = Vec::new();
    for (what, run) in demo_runs(&format!("file://{}", picture.display())) {
        let id = store::enqueue_run(&pool, &run).await?;
        println!("enqueued run {id}: {what}");
        ids.push(id);
    }
    // A chain: a picture, then a video of that picture. The video waits
    // (state `waiting`) until the picture's run succeeded, and is sent the
    // picture's stored copy, uploaded to the provider like a local file.
    let picture_run = store::enqueue_run(
        &pool,
        &NewRun {
            workflow_id: "wf_861ef31e94dcfb10e6e7".into(),
            inputs: json!({"n6_text": "a paper boat on a pond", "n3_seed": 7}),
            ..Default::default()
        },
    )
    .await?;
    let video_run = store::enqueue_run(
        &pool,
        &NewRun {
            workflow_id: "wf_seedance_video_2f0c".into(),
            inputs: json!({
                "prompt": "the paper boat sails away",
                "image": crate::chains::OutputRef { run: picture_run, key: "n9_images".into() }.to_json(),
            }),
            accept_external_cost_risk: true,
            ..Default::default()
        },
    )
    .await?;
    println!(
        "enqueued runs {picture_run} and {video_run}: a chain, a picture and then a video of it (run {video_run} waits for run {picture_run})"
    );
    let canceled = store::enqueue_run(
        &pool,
        &NewRun {
            workflow_id: "wf_861ef31e94dcfb10e6e7".into(),
            inputs: json!({"n6_text": "never mind"}),
            not_before: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
            ..Default::default()
        },
    )
    .await?;
    store::cancel_run(&pool, canceled, Some("canceled by the demo"), &[]).await?;
    println!("enqueued run {canceled} for an hour from now, then canceled it");
    println!("\nworker: running until every run is final...\n");

    let limit = Duration::from_secs(90);
    let watch_pool = pool.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<(), i64>>();
    let watcher = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let outcome = loop {
            let active: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM wfq.runs WHERE state IN ('waiting', 'queued', 'submitting', 'running') \
                 OR (state = 'succeeded' AND (media_state IS NULL OR media_state = 'pending'))",
            )
            .fetch_one(&watch_pool)
            .await
            .unwrap_or(1);
            if active == 0 {
                break Ok(());
            }
            if started.elapsed() > limit {
                break Err(active);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = done_tx.send(outcome);
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker_pool = pool.clone();
    let worker_config = config.clone();
    let worker = tokio::spawn(async move {
        crate::runtime::run_worker(&worker_config, worker_pool, async move {
            let _ = stop_rx.await;
        })
        .await
    });
    let outcome = done_rx.await.unwrap_or(Err(-1));
    let _ = stop_tx.send(());
    let _ = watcher.await;
    if let Ok(result) = worker.await {
        result?;
    }
    sim.shutdown().await;
    if let Err(active) = outcome {
        return Err(DemoError::Timeout(active, limit));
    }

    print_runs(&pool).await?;
    print_chain(&pool, picture_run).await?;
    print_files(&pool, &media, &database.url).await?;
    print_sql(&database.url);
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        serve_dashboard(&config, &database.url).await?;
    }
    pool.close().await;
    Ok(())
}

/// On a terminal, the demo ends on the dashboard (the demo's runs, their
/// pictures from the local store) until Ctrl-C; piped, it exits at once.
async fn serve_dashboard(config: &Config, url: &str) -> Result<(), DemoError> {
    let web = crate::web::WebConfig::defaults(&DemoEnv(HashMap::new()))
        .map_err(|(key, m)| DemoError::Files(format!("{key}: {m}")))?;
    let pool = crate::web::connect(url, web.statement_timeout, 4).await?;
    let storage = config
        .storage
        .as_ref()
        .map(crate::files::Storage::open)
        .transpose()
        .map_err(|e| DemoError::Files(e.to_string()))?;
    let state = std::sync::Arc::new(crate::web::WebState::new(
        &web,
        pool.clone(),
        crate::web::ProfileInfo::of_config(config),
        storage,
    ));
    // The usual port, or any free one when it is taken.
    let server = match crate::web::WebServer::start(web.listen, state.clone()).await {
        Ok(server) => server,
        Err(_) => {
            crate::web::WebServer::start(
                "127.0.0.1:0".parse().expect("a valid socket address"),
                state,
            )
            .await?
        }
    };
    println!(
        "Dashboard: http://{}/  (the runs above, their pictures and money; Ctrl-C stops it)",
        server.addr
    );
    let _ = tokio::signal::ctrl_c().await;
    server.stop().await;
    pool.close().await;
    Ok(())
}

/// The demo's chain, from `wfq.pipeline_runs`.
async fn print_chain(pool: &PgPool, root: i64) -> Result<(), DemoError> {
    if let Some(chain) = store::pipeline_of(pool, root).await? {
        println!(
            "chain (wfq.pipeline_runs): root run {} -> {} runs {}, total cost {}, {:.1}s from the first enqueue to the last finish",
            chain.root_run_id,
            chain.runs,
            chain.state,
            chain.total_cost,
            chain.duration_secs.unwrap_or_default()
        );
    }
    Ok(())
}

/// Where the input picture went and where the outputs were stored.
async fn print_files(
    pool: &PgPool,
    media: &std::path::Path,
    database_url: &str,
) -> Result<(), DemoError> {
    type FileLine = (i64, String, String, String, Option<String>, Option<String>);
    let files: Vec<FileLine> = sqlx::query_as(
        "SELECT run_id, direction, key, state, COALESCE(stored_location, provider_file_id), error_code \
         FROM wfq.run_files ORDER BY run_id, direction, key, position",
    )
    .fetch_all(pool)
    .await?;
    if files.is_empty() {
        return Ok(());
    }
    println!("\nfiles (wfq.run_files):");
    for (run, direction, key, state, place, error) in files {
        let arrow = if direction == "input" {
            "uploaded as"
        } else {
            "stored at"
        };
        println!(
            "  run {run:<3} {direction:<6} {key:<10} {state:<8} {arrow} {}{}",
            place.as_deref().unwrap_or("-"),
            error.map(|e| format!(" ({e})")).unwrap_or_default()
        );
    }
    println!(
        "  get them back with a worker.toml holding `[storage]` url = \"file://{}\":\n    DATABASE_URL={} wfq --config worker.toml media get RUN [KEY] -o DIR",
        media.display(),
        crate::config::DatabaseUrl::new(database_url.to_owned())
    );
    Ok(())
}

async fn print_runs(pool: &PgPool) -> Result<(), DemoError> {
    let mut runs = store::list_runs(pool, None, 100).await?;
    runs.reverse();
    let money =
        |d: Option<rust_decimal::Decimal>| d.map(|d| d.to_string()).unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let result = match (&r.error_code, &r.outputs) {
                (Some(code), _) => format!("{code}: {}", r.error_message.as_deref().unwrap_or("")),
                (None, Some(outputs)) => outputs.to_string(),
                (None, None) => String::new(),
            };
            vec![
                r.id.to_string(),
                r.provider.clone(),
                r.state.clone(),
                table::truncate(r.provider_run_id.as_deref().unwrap_or("-"), 26),
                r.currency.clone().unwrap_or_else(|| "-".into()),
                money(r.quote_amount),
                money(r.frozen_amount),
                money(r.final_amount),
                money(r.released_amount),
                table::truncate(&result, 60),
            ]
        })
        .collect();
    println!(
        "\n{}\n",
        table::render(
            &[
                "id",
                "provider",
                "state",
                "provider run",
                "currency",
                "quote",
                "frozen",
                "final",
                "released",
                "outputs / error"
            ],
            &rows
        )
    );
    Ok(())
}

fn print_sql(url: &str) {
    println!(
        "Read the same with SQL (psql {}):\n\n  SELECT id, state, provider_run_id, quote_amount, frozen_amount, final_amount,\n         released_amount, outputs, error_code, error_message\n  FROM wfq.runs ORDER BY id;\n\n  SELECT run_id, at, kind, from_state, to_state FROM wfq.run_events ORDER BY id;\n",
        crate::config::DatabaseUrl::new(url.to_owned())
    );
}
