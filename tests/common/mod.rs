//! Shared test harness: the simulator on loopback, a worker against the
//! test's own database, and waits that end on a signal, not a sleep.
#![allow(dead_code)]

pub mod cut_proxy;
pub mod files;
pub mod lossy_proxy;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use wfq::config::{Config, Environment, ProviderKind};
use wfq::runtime::{WorkerError, run_worker};
use wfq::sim::{SimConfig, SimServer};
use wfq::store::{self, NewRun, RunRow};

pub const TEXT_TO_IMAGE: &str = "wf_861ef31e94dcfb10e6e7";
pub const VIDEO: &str = "wf_seedance_video_2f0c";
pub const ALWAYS_FAILS: &str = "wf_always_fails_9d1a";
pub const API_KEY: &str = "test-key-4f8d2c1b9e";

/// A URL for the test's own database, for child processes.
pub fn database_url(connect: &sqlx::postgres::PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        connect.get_username(),
        connect.get_host(),
        connect.get_port(),
        connect.get_database().unwrap_or("postgres")
    )
}

/// The simulator with short, test-friendly timings.
pub async fn start_sim(queue: u64, run: u64, settle: u64) -> SimServer {
    SimServer::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            queue_time: Duration::from_millis(queue),
            run_time: Duration::from_millis(run),
            settle_delay: Duration::from_millis(settle),
            api_key: Some(API_KEY.to_owned()),
        },
    )
    .await
    .expect("simulator starts")
}

struct TestEnv(HashMap<String, String>);

impl Environment for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// A configuration with fast schedules, pointed at `sim`. `extra` is TOML
/// appended at the end (e.g. to override `[submit]`, `[poll]` or `[http]`,
/// which are added with the defaults below unless `extra` has them).
///
/// The lease (60 s) and the HTTP timeout (30 s) are long: a stall of the
/// machine must never time out a request or end a lease the test did not
/// mean to. (The lease is twice the timeout: a Dify lookup of a lost submit
/// starts no call that could end after the lease.) Tests of lease expiry or
/// timeouts set short values of their own.
pub fn config(sim: &SimServer, worker_id: &str, extra: &str) -> Config {
    let text = format!(
        r#"
        [worker]
        id = "{worker_id}"
        concurrency = 16
        lease = "60s"
        fallback_poll = "250ms"
        shutdown_grace = "5s"
        [providers.chenyu]
        kind = "chenyu"
        base_url = "{}"
        api_key_env = "TEST_CHENYU_KEY"
        {extra}
        "#,
        sim.base_url()
    );
    let text = if text.contains("[http]") {
        text
    } else {
        text + "\n[http]\ntimeout = \"30s\"\nconnect_timeout = \"5s\"\n"
    };
    let text = if text.contains("[poll]") {
        text
    } else {
        text + "\n[poll]\ninitial = \"50ms\"\nmax = \"200ms\"\njitter = 0.1\n"
    };
    let text = if text.contains("[submit]") {
        text
    } else {
        text + "\n[submit]\ninitial = \"100ms\"\nmax = \"400ms\"\nmax_attempts = 6\n"
    };
    let env = TestEnv(HashMap::from([(
        "TEST_CHENYU_KEY".to_owned(),
        API_KEY.to_owned(),
    )]));
    Config::from_toml(&text, "test config", &env).expect("test config is valid")
}

/// A worker running in the background.
pub struct WorkerHandle {
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<Result<(), WorkerError>>,
}

impl WorkerHandle {
    /// Graceful stop, as on SIGTERM; returns once the worker has exited.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = (&mut self.join).await.expect("worker task did not panic");
        result.expect("worker exits cleanly");
    }

    /// Kills the worker without any cleanup, like SIGKILL: its leases stay.
    pub async fn kill(self) {
        self.join.abort();
        let _ = self.join.await;
    }
}

/// Starts a worker on `pool`.
pub fn start_worker(config: Config, pool: PgPool) -> WorkerHandle {
    let (tx, rx) = oneshot::channel();
    let join = tokio::spawn(async move {
        run_worker(&config, pool, async move {
            let _ = rx.await;
        })
        .await
    });
    WorkerHandle {
        stop: Some(tx),
        join,
    }
}

/// Runs a worker with `config` until no run is active, then stops it.
pub async fn work_until_idle(pool: &PgPool, config: Config) {
    let worker = start_worker(config, pool.clone());
    wait_all_final(pool, Duration::from_secs(30)).await;
    worker.stop().await;
}

/// Enqueues a run of `workflow` with `inputs`.
pub async fn enqueue(pool: &PgPool, workflow: &str, inputs: Value) -> i64 {
    store::enqueue_run(
        pool,
        &NewRun {
            workflow_id: workflow.to_owned(),
            inputs,
            ..Default::default()
        },
    )
    .await
    .expect("enqueue")
}

/// Waits until `condition` (a SQL boolean expression over the whole table)
/// holds, re-checking on every `wfq_run_finished` notification and at least
/// every 100 ms. Panics after `limit` with the runs' states.
pub async fn wait_for(pool: &PgPool, condition: &str, limit: Duration) {
    let mut listener = PgListener::connect_with(pool).await.expect("listen");
    listener.listen("wfq_run_finished").await.expect("listen");
    let query = format!("SELECT ({condition}) FROM (SELECT 1) AS one");
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let holds: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(query.clone()))
            .fetch_one(pool)
            .await
            .expect("condition query");
        if holds == Some(true) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            type Active = (i64, String, Option<String>, Option<String>, Option<f64>);
            let states: Vec<Active> = sqlx::query_as(
                "SELECT id, state, error_code, lease_owner, extract(epoch FROM due_at - now())::float8 \
                 FROM wfq.runs WHERE state IN ('queued', 'submitting', 'running') ORDER BY id LIMIT 20",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default();
            panic!(
                "timed out waiting for `{condition}`; active runs (id, state, error, lease owner, due in s): {states:?}"
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), listener.recv()).await;
    }
}

/// Waits until at least `n` requests (or Dify streams) are held at the
/// simulator's closed gates; panics after 60 s. The worker's slow start
/// lets only a few requests be in flight at first (while no rate is
/// configured), so `n` must fit that window.
pub async fn wait_held(sim: &SimServer, n: u64) {
    if tokio::time::timeout(Duration::from_secs(60), sim.wait_until_held(n))
        .await
        .is_err()
    {
        panic!("{n} requests were never held at the simulator within 60 s");
    }
}

/// Waits until no run is active any more.
pub async fn wait_all_final(pool: &PgPool, limit: Duration) {
    wait_for(
        pool,
        "NOT EXISTS (SELECT 1 FROM wfq.runs WHERE state IN ('queued', 'submitting', 'running'))",
        limit,
    )
    .await;
}

/// Reads a run.
pub async fn run(pool: &PgPool, id: i64) -> RunRow {
    store::show_run(pool, id)
        .await
        .unwrap()
        .expect("run exists")
}

/// The kinds of a run's events, in order.
pub async fn event_kinds(pool: &PgPool, id: i64) -> Vec<String> {
    store::run_events(pool, id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

/// The Dify profiles' `find_window` in [`other_providers`].
pub const FIND_WINDOW: &str = "60s";

/// `extra` (with [`other_providers`]) turned into a configuration whose
/// Dify `find_window` is 2 s, with `http.timeout` at 2 s too (the window may
/// not be shorter): for tests in which a submit is never found and the
/// window must run out. A request timed out there only adds a lookup or an
/// adoption, never a second run.
pub fn short_find_window(extra: &str) -> String {
    assert!(extra.contains(FIND_WINDOW), "a profile of other_providers");
    extra.replace(
        &format!("find_window = \"{FIND_WINDOW}\""),
        "find_window = \"2s\"",
    ) + "\n[http]\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\n"
}

/// TOML for Dify and GPTBots profiles on `sim` (all with the test key):
/// `dify` (app `text`), `dify_fails`, `gptbots` (workflow `news`),
/// `gptbots_fails`. Pass it as `extra` to [`config`]. The Dify profiles'
/// `find_window` is [`FIND_WINDOW`]: not shorter than `http.timeout`, as
/// the configuration requires, and so long that a lost submit is always
/// found before it ends; tests of a window that runs out shorten both
/// ([`short_find_window`]).
pub fn other_providers(sim: &SimServer) -> String {
    let profile = |name: &str, kind: &str, url: String, more: &str| {
        format!(
            "\n[providers.{name}]\nkind = \"{kind}\"\nbase_url = \"{url}\"\napi_key_env = \"TEST_CHENYU_KEY\"\n{more}\n"
        )
    };
    [
        profile(
            "dify",
            "dify",
            sim.dify_base_url("text"),
            &format!("find_window = \"{FIND_WINDOW}\"\nmax_run_time = \"1s\""),
        ),
        profile(
            "dify_fails",
            "dify",
            sim.dify_base_url("fails"),
            &format!("find_window = \"{FIND_WINDOW}\"\nmax_run_time = \"1s\""),
        ),
        profile("gptbots", "gptbots", sim.gptbots_base_url("news"), ""),
        profile(
            "gptbots_fails",
            "gptbots",
            sim.gptbots_base_url("fails"),
            "",
        ),
    ]
    .concat()
}

/// Enqueues a run of `workflow` on provider profile `provider`.
pub async fn enqueue_on(pool: &PgPool, provider: &str, workflow: &str, inputs: Value) -> i64 {
    store::enqueue_run(
        pool,
        &NewRun {
            provider: Some(provider.to_owned()),
            workflow_id: workflow.to_owned(),
            inputs,
            ..Default::default()
        },
    )
    .await
    .expect("enqueue")
}

/// What the simulator's ledger says about one run it created.
#[derive(Debug, Clone)]
pub struct ProviderRun {
    /// The provider's run id.
    pub run_id: String,
    /// What was charged once the run ended (chenyu `final_amount`, Dify
    /// `total_price`, GPTBots `totalCost`).
    pub charged: Option<rust_decimal::Decimal>,
    /// Tokens (Dify, GPTBots).
    pub tokens: Option<i64>,
}

/// The runs the simulator created for API `kind`, by wfq idempotency key
/// (a key with two entries was billed twice).
pub fn provider_runs(sim: &SimServer, kind: ProviderKind) -> HashMap<String, Vec<ProviderRun>> {
    let mut by_key: HashMap<String, Vec<ProviderRun>> = HashMap::new();
    let key_of = |user: &str| user.strip_prefix("wfq-").unwrap_or(user).to_owned();
    match kind {
        ProviderKind::Chenyu => {
            for e in sim.ledger() {
                // One entry per key; `charges` counts what was frozen.
                for _ in 0..e.charges {
                    by_key
                        .entry(e.idempotency_key.clone())
                        .or_default()
                        .push(ProviderRun {
                            run_id: e.run_order_id.clone(),
                            charged: e.final_amount,
                            tokens: None,
                        });
                }
            }
        }
        ProviderKind::Dify => {
            for e in sim.dify_ledger() {
                by_key
                    .entry(key_of(&e.user))
                    .or_default()
                    .push(ProviderRun {
                        run_id: e.workflow_run_id,
                        charged: Some(e.total_price),
                        tokens: Some(e.total_tokens),
                    });
            }
        }
        ProviderKind::Gptbots => {
            for e in sim.gptbots_ledger() {
                let user = e.user_id.unwrap_or_default();
                by_key.entry(key_of(&user)).or_default().push(ProviderRun {
                    run_id: e.workflow_run_id,
                    charged: Some(e.total_cost),
                    tokens: Some(e.total_tokens),
                });
            }
        }
    }
    by_key
}

/// The run is exactly one run at the provider, with its id, charge and
/// tokens, and no submit of it is in doubt.
pub fn assert_one_provider_run(
    kind: ProviderKind,
    row: &RunRow,
    runs: &HashMap<String, Vec<ProviderRun>>,
) {
    let at_provider = runs
        .get(&row.idempotency_key)
        .unwrap_or_else(|| panic!("{kind:?}: run {} is not at the provider", row.id));
    assert_eq!(
        at_provider.len(),
        1,
        "{kind:?}: run {} billed twice",
        row.id
    );
    let p = &at_provider[0];
    assert_eq!(row.provider_run_id.as_deref(), Some(p.run_id.as_str()));
    assert_eq!(row.final_amount, p.charged, "{kind:?}: run {}", row.id);
    assert_eq!(row.total_tokens, p.tokens, "{kind:?}: run {}", row.id);
    assert!(row.submit_in_doubt_since.is_none(), "{row:?}");
}

/// Locks run `id`'s row in a transaction of the test's own, so that a
/// worker's next write of it waits (claims skip it); rolling the
/// transaction back (or dropping it) lets the write go on.
pub async fn lock_row(pool: &PgPool, id: i64) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM wfq.runs WHERE id = $1 FOR NO KEY UPDATE")
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("lock the run");
    tx
}

/// How many sessions of this database wait for a lock right now.
pub async fn lock_waiters(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
}

/// Waits until at least `n` sessions of this database wait for a lock;
/// panics after 60 s.
pub async fn wait_lock_waiters(pool: &PgPool, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while lock_waiters(pool).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} sessions never waited for a lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
