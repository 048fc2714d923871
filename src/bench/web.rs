//! Does watching slow the work? Lifecycle throughput of a `wfq worker`
//! child, on a table with a history of finished runs, without and with ten
//! dashboards open (ten clients fetching the overview's live region every
//! 2 s from one `wfq web` server, as ten browser tabs would), alternated.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::figures::{FAST_POLL, all_succeeded, insert_runs, wait_all_final};
use super::worker::{WorkerProcess, start_sim};
use super::{BenchError, Plan, figure, reset};

/// Open dashboards.
const DASHBOARDS: usize = 10;
/// Their refresh interval (the dashboard's own).
const EVERY: Duration = Duration::from_secs(2);

/// Finished runs already in the table (the dashboard reads through them).
fn history(plan: &Plan) -> u32 {
    if plan.args.quick { 2_000 } else { 200_000 }
}

async fn insert_history(pool: &PgPool, n: u32) -> Result<(), BenchError> {
    sqlx::query(
        r#"
        INSERT INTO wfq.runs (workflow_id, state, created_at, submitted_at, finished_at,
                              settled_at, currency, quote_amount, frozen_amount, final_amount,
                              released_amount)
        SELECT $1, CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END,
               t, t, t + interval '5 seconds', t + interval '6 seconds',
               'CNY', 0.03, 0.03, 0.01, 0.02
        FROM generate_series(1, $2) g,
             LATERAL (SELECT now() - interval '1 hour' - g * interval '10 seconds' AS t) at
        "#,
    )
    .bind(super::figures::WORKFLOW)
    .bind(i64::from(n))
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE wfq.runs").execute(pool).await?;
    Ok(())
}

/// What the dashboards saw.
#[derive(Default)]
struct Watched {
    latencies_ms: Vec<f64>,
    failures: u64,
}

/// One lifecycle measurement: runs/s, and what the dashboards saw (if any).
async fn measure(
    plan: &Plan,
    url: &str,
    pool: &PgPool,
    dashboards: bool,
) -> Result<(f64, Option<Watched>), BenchError> {
    reset(pool).await?;
    insert_history(pool, history(plan)).await?;
    let n = plan.args.runs;
    let sim = start_sim(Duration::ZERO, Duration::ZERO, Duration::ZERO).await?;
    let mut worker = WorkerProcess::start(plan, url, pool, &sim, FAST_POLL).await?;
    let watching = if dashboards {
        Some(open_dashboards(url).await?)
    } else {
        None
    };
    insert_runs(pool, n, "web").await?;
    wait_all_final(
        pool,
        &mut worker,
        Duration::from_secs(60 + u64::from(n) / 50),
    )
    .await?;
    worker.stop().await?;
    let watched = match watching {
        Some(w) => Some(w.close().await),
        None => None,
    };
    sim.shutdown().await;
    // The history is not part of the measurement.
    sqlx::query("DELETE FROM wfq.runs WHERE inputs = '{}'::jsonb")
        .execute(pool)
        .await?;
    all_succeeded(pool, n).await?;
    let seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8 FROM wfq.runs",
    )
    .fetch_one(pool)
    .await?;
    Ok((f64::from(n) / seconds, watched))
}

struct Dashboards {
    server: crate::web::WebServer,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Watched>>,
}

impl Dashboards {
    async fn close(self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Watched::default();
        for c in self.clients {
            if let Ok(w) = c.await {
                all.latencies_ms.extend(w.latencies_ms);
                all.failures += w.failures;
            }
        }
        self.server.stop().await;
        all
    }
}

/// A dashboard server on the bench database and ten clients refreshing
/// its overview every 2 s, each starting at its own offset.
async fn open_dashboards(url: &str) -> Result<Dashboards, BenchError> {
    let env = NoEnv;
    let config = crate::web::WebConfig::defaults(&env)
        .map_err(|(k, m)| BenchError::Failed(format!("{k}: {m}")))?;
    let web_pool = crate::web::connect(url, config.statement_timeout, 4).await?;
    let text = "[providers.chenyu]\nkind = \"chenyu\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"UNUSED\"\ndaily_budget = \"1000000\"\n";
    let profiles = crate::web::ProfileInfo::of_toml(text, "bench").map_err(BenchError::Failed)?;
    let state = Arc::new(crate::web::WebState::new(&config, web_pool, profiles, None));
    let server =
        crate::web::WebServer::start("127.0.0.1:0".parse().expect("an address"), state).await?;
    let base = format!("http://{}", server.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::new();
    let clients = (0..DASHBOARDS)
        .map(|i| {
            let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Watched::default();
                tokio::time::sleep(EVERY * i as u32 / DASHBOARDS as u32).await;
                let mut tick = tokio::time::interval(EVERY);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let started = Instant::now();
                    let ok = match http.get(format!("{base}/fragments/overview")).send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        seen.latencies_ms
                            .push(started.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        seen.failures += 1;
                    }
                }
                seen
            })
        })
        .collect();
    Ok(Dashboards {
        server,
        stop,
        clients,
    })
}

struct NoEnv;

impl crate::config::Environment for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// The figure: runs/s without and with ten dashboards, alternated.
pub(crate) async fn web(plan: &Plan, url: &str, pool: &PgPool) -> Result<(), BenchError> {
    let rounds = if plan.args.quick { 1 } else { 3 };
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut watched = Watched::default();
    for _ in 0..rounds {
        without.push(measure(plan, url, pool, false).await?.0);
        let (rate, seen) = measure(plan, url, pool, true).await?;
        with.push(rate);
        if let Some(seen) = seen {
            watched.latencies_ms.extend(seen.latencies_ms);
            watched.failures += seen.failures;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut without), median(&mut with));
    watched.latencies_ms.sort_by(f64::total_cmp);
    let p = |q: f64| super::figures::percentile(&watched.latencies_ms, q);
    // percentile() takes 0..100.
    figure(
        "web_worker_throughput_without_dashboards",
        format!("{a:.0}"),
        "runs/s",
        "-",
        &format!(
            "runs={} history={} rounds={rounds} all={:?}",
            plan.args.runs,
            history(plan),
            without.iter().map(|r| r.round()).collect::<Vec<_>>()
        ),
    );
    figure(
        "web_worker_throughput_with_10_dashboards",
        format!("{b:.0}"),
        "runs/s",
        ">=0.95x without",
        &format!(
            "ratio={:.3} refreshes={} refresh_failures={} refresh_p50_ms={:.1} refresh_p99_ms={:.1} all={:?}",
            b / a,
            watched.latencies_ms.len(),
            watched.failures,
            p(50.0),
            p(99.0),
            with.iter().map(|r| r.round()).collect::<Vec<_>>()
        ),
    );
    Ok(())
}
