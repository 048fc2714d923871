//! Crash anywhere, lose nothing, charge once: three `wfq worker` processes
//! against one database and a misbehaving simulator, one of them killed with
//! SIGKILL every second or two and restarted, until 2,000 runs are final.
//! Leases are 10 minutes long: every run a killed worker held continues
//! because its death is seen (its liveness session ends), not because a
//! lease ran out, so the test's bound says nothing about the lease.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};
use tokio::process::Child;

use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::sim::Faults;

const RUNS: i64 = 2_000;
const WORKERS: usize = 3;

/// A worker process that is killed if the test fails half-way, so it cannot
/// outlive the test and hold its database open. tokio's `Child`, because the
/// simulator lives on this test's runtime: a blocking wait would freeze it.
struct Worker(Child);

impl Worker {
    fn pid(&self) -> String {
        self.0.id().map(|id| id.to_string()).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.pid()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {}", self.pid());
    }

    /// SIGTERM, then the exit status.
    async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.0.wait().await.unwrap()
    }

    /// SIGKILL.
    async fn kill(mut self) {
        let _ = self.0.kill().await;
    }
}

fn spawn_worker(config: &std::path::Path, database_url: &str) -> Worker {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["worker", "--config"])
        .arg(config)
        .env("DATABASE_URL", database_url)
        .env("CHAOS_KEY", API_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts");
    Worker(child)
}

/// p50, p99 and the largest of `values` (seconds).
fn spread(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        values
            .get(((values.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0)
    };
    format!(
        "p50={:.2}s p99={:.2}s slowest={:.2}s",
        quantile(0.5),
        quantile(0.99),
        values.last().copied().unwrap_or(0.0)
    )
}

async fn active(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM wfq.runs WHERE state IN ('queued', 'submitting', 'running')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn killing_workers_at_random_loses_nothing_and_charges_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let database_url = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(0, 2000, 300).await;
    sim.set_faults(Faults {
        error_rate: 0.02,
        rate_limit_rate: 0.02,
        retry_after_secs: Some(1),
        drop_after_submit_rate: 0.05,
        ..Default::default()
    });
    let dir = std::env::temp_dir().join(format!("wfq-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!(
        "{}.toml",
        pool.connect_options().get_database().unwrap_or("db")
    ));
    std::fs::write(
        &config,
        format!(
            r#"
            [worker]
            concurrency = 32
            lease = "10m"
            fallback_poll = "500ms"
            shutdown_grace = "2s"
            [http]
            timeout = "1s"
            connect_timeout = "500ms"
            [submit]
            initial = "100ms"
            max = "1s"
            max_attempts = 100
            [poll]
            initial = "100ms"
            max = "500ms"
            [providers.chenyu]
            kind = "chenyu"
            base_url = "{}"
            api_key_env = "CHAOS_KEY"
            "#,
            sim.base_url()
        ),
    )
    .unwrap();

    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) \
         SELECT 'wf_861ef31e94dcfb10e6e7', jsonb_build_object('n3_seed', g) FROM generate_series(1, $1) g",
    )
    .bind(RUNS)
    .execute(&pool)
    .await
    .unwrap();

    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|_| spawn_worker(&config, &database_url))
        .collect();
    let mut kills = 0usize;
    // When each victim died, on the database's clock (which also stamps
    // the rescues), by its pid (part of its worker id).
    let mut killed_at: Vec<(String, chrono::DateTime<chrono::Utc>)> = Vec::new();
    let started = Instant::now();
    // About a minute of work on these two cores, longer on a busy machine:
    // no bound on the work itself, only on a standstill (no run became
    // final for a minute), and the whole test stays below one lease (10
    // minutes), so that no rescue can be a lease that ran out.
    let standstill = Duration::from_secs(60);
    let limit = Duration::from_secs(540);
    let mut fewest = i64::MAX;
    let mut progressed = Instant::now();
    loop {
        let left = active(&pool).await;
        if left == 0 {
            break;
        }
        if left < fewest {
            fewest = left;
            progressed = Instant::now();
        }
        assert!(
            progressed.elapsed() < standstill,
            "no run became final for {standstill:?}; {left} still active"
        );
        assert!(
            started.elapsed() < limit,
            "runs still active after {limit:?}: {left}"
        );
        tokio::time::sleep(Duration::from_millis(1000 + fastrand::u64(..1000))).await;
        let victim = fastrand::usize(..WORKERS);
        let replacement = spawn_worker(&config, &database_url);
        let victim = std::mem::replace(&mut workers[victim], replacement);
        let pid = victim.pid();
        victim.kill().await;
        let at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&pool)
            .await
            .unwrap();
        killed_at.push((pid, at));
        kills += 1;
    }
    for worker in workers {
        let _ = worker.terminate().await;
    }
    let elapsed = started.elapsed();

    // Every run is final, and each one succeeded.
    let states: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT state, count(*) FROM wfq.runs GROUP BY state")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let lost = RUNS - states.get("succeeded").copied().unwrap_or(0);

    // Exactly one frozen charge per idempotency key, and only for our keys.
    let ledger = sim.ledger();
    let keys: HashSet<String> = sqlx::query_scalar("SELECT idempotency_key FROM wfq.runs")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let charged_twice = ledger.iter().filter(|e| e.charges != 1).count();
    let foreign = ledger
        .iter()
        .filter(|e| !keys.contains(&e.idempotency_key))
        .count();
    let duplicates = charged_twice + foreign + (ledger.len() as i64 - RUNS).max(0) as usize;

    // The database's money equals the ledger's, to the last decimal.
    let (db_frozen, db_final, db_released): (Decimal, Decimal, Decimal) = sqlx::query_as(
        "SELECT sum(frozen_amount), sum(final_amount), sum(released_amount) FROM wfq.runs",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let ledger_frozen: Decimal = ledger.iter().map(|e| e.frozen).sum();
    let ledger_final: Decimal = ledger.iter().filter_map(|e| e.final_amount).sum();
    let ledger_released: Decimal = ledger.iter().filter_map(|e| e.released).sum();
    let stats = sim.stats();
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;

    // How long each run a victim held waited: from the kill to the other
    // worker's first step on it (its `lease_rescued` event).
    let rescues: Vec<(String, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT detail->>'previous_owner', detail->>'cause', at FROM wfq.run_events \
         WHERE kind = 'lease_rescued' ORDER BY at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut waits: Vec<f64> = Vec::new();
    let mut causes: HashMap<String, usize> = HashMap::new();
    for (owner, cause, at) in &rescues {
        *causes.entry(cause.clone()).or_default() += 1;
        if let Some((_, killed)) = killed_at
            .iter()
            .find(|(pid, _)| owner.contains(&format!("-{pid}-")))
        {
            waits.push((*at - *killed).num_milliseconds() as f64 / 1000.0);
        }
    }
    // How long each death took to be seen: from the kill to `died_at`.
    let deaths: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("SELECT id, died_at FROM wfq.workers")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut detections: Vec<f64> = Vec::new();
    for (pid, killed) in &killed_at {
        let seen = deaths
            .iter()
            .find(|(id, _)| id.contains(&format!("-{pid}-")))
            .and_then(|(_, died)| *died);
        if let Some(died) = seen {
            detections.push((died - *killed).num_milliseconds() as f64 / 1000.0);
        }
    }
    let rescue_figures = format!(
        "rescues={} causes={causes:?}; death seen (kill to died_at) {} of {kills}: {}; \
         run taken over (kill to the next worker's first step on it, which includes waiting \
         behind the queued backlog, first due first): {}",
        waits.len(),
        detections.len(),
        spread(&mut detections),
        spread(&mut waits),
    );

    let figures = format!(
        "chaos: runs={RUNS} kills={kills} duplicates={duplicates} lost={lost} replays={} dropped_answers={} injected_5xx={} injected_429={} \
         frozen db={db_frozen} ledger={ledger_frozen} final db={db_final} ledger={ledger_final} released db={db_released} ledger={ledger_released} in {:.1}s",
        stats.replays,
        stats.dropped_answers,
        stats.injected_5xx,
        stats.injected_429,
        elapsed.as_secs_f64()
    );
    assert_eq!(lost, 0, "{figures}; states {states:?}");
    assert_eq!(duplicates, 0, "{figures}");
    assert_eq!(ledger.len() as i64, RUNS, "{figures}");
    assert_eq!(db_frozen, ledger_frozen, "{figures}");
    assert_eq!(db_final, ledger_final, "{figures}");
    assert_eq!(db_released, ledger_released, "{figures}");
    assert!(kills >= 3, "the test must actually kill workers: {figures}");
    println!("{figures}");
    println!("chaos: {rescue_figures}");
}

#[sqlx::test]
async fn a_frozen_worker_loses_its_runs_to_another_and_cannot_overwrite_them(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let database_url = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(0, 2000, 300).await;
    // Slow answers, so that steps (and their leases) are in flight when the worker freezes.
    sim.set_faults(Faults {
        latency: Duration::from_millis(400),
        ..Default::default()
    });
    let dir = std::env::temp_dir().join(format!("wfq-freeze-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!(
        "{}.toml",
        pool.connect_options().get_database().unwrap_or("db")
    ));
    std::fs::write(
        &config,
        format!(
            "[worker]\nconcurrency = 32\nlease = \"3s\"\nfallback_poll = \"500ms\"\n\
             [http]\ntimeout = \"1s\"\n[poll]\ninitial = \"200ms\"\nmax = \"500ms\"\n\
             [providers.chenyu]\nkind = \"chenyu\"\nbase_url = \"{}\"\napi_key_env = \"CHAOS_KEY\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) \
         SELECT 'wf_861ef31e94dcfb10e6e7', jsonb_build_object('n3_seed', g) FROM generate_series(1, 200) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let frozen = spawn_worker(&config, &database_url);
    // Let the first worker take everything it can before the second starts.
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE lease_owner IS NOT NULL) >= 10",
        Duration::from_secs(60),
    )
    .await;
    let pid = frozen.pid();
    frozen.signal("-STOP");
    let other = spawn_worker(&config, &database_url);
    // The frozen worker's leases run out and the other worker takes its runs.
    wait_for(
        &pool,
        &format!(
            "EXISTS (SELECT 1 FROM wfq.run_events WHERE kind = 'lease_rescued' \
             AND detail->>'previous_owner' LIKE '%-{pid}-%')"
        ),
        Duration::from_secs(60),
    )
    .await;
    // Thawed, it finds its runs gone: its stale writes are refused.
    frozen.signal("-CONT");
    wait_all_final(&pool, Duration::from_secs(120)).await;
    for worker in [frozen, other] {
        let status = worker.terminate().await;
        assert!(status.success(), "workers exit 0 on SIGTERM: {status:?}");
    }
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(succeeded, 200);
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 200);
    assert!(
        ledger.iter().all(|e| e.charges == 1),
        "charged once per run"
    );
    // No run finished twice, whoever finished it.
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT run_id FROM wfq.run_events WHERE kind IN ('submit_accepted', 'run_finished') \
         GROUP BY run_id, kind HAVING count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(doubled, 0);
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

/// The chaos of the first test with chains in the mix (issue 17): two-step
/// chains that pass a picture on, three-step chains whose first step
/// always fails, fan-ins of three. Workers are killed with SIGKILL every
/// second or two until nothing is left to do; every chain then either
/// fully succeeded or failed with the reason, and the money is exact.
#[sqlx::test]
async fn killing_workers_with_chains_in_the_mix_ends_every_chain_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    const PASSING: i64 = 120;
    const FAILING: i64 = 40;
    const FAN_INS: i64 = 20;
    let database_url = database_url(&connect);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(0, 1000, 300).await;
    sim.set_faults(Faults {
        error_rate: 0.02,
        rate_limit_rate: 0.02,
        retry_after_secs: Some(1),
        drop_after_submit_rate: 0.05,
        ..Default::default()
    });
    let dir = std::env::temp_dir().join(format!("wfq-chaos-chains-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!(
        "{}.toml",
        pool.connect_options().get_database().unwrap_or("db")
    ));
    std::fs::write(
        &config,
        format!(
            r#"
            [worker]
            concurrency = 32
            lease = "10m"
            fallback_poll = "500ms"
            shutdown_grace = "2s"
            [http]
            timeout = "1s"
            connect_timeout = "500ms"
            [submit]
            initial = "100ms"
            max = "1s"
            max_attempts = 100
            [poll]
            initial = "100ms"
            max = "500ms"
            [providers.chenyu]
            kind = "chenyu"
            base_url = "{}"
            api_key_env = "CHAOS_KEY"
            "#,
            sim.base_url()
        ),
    )
    .unwrap();

    // Each chain's runs carry {"chain": "<kind>-<n>"} in metadata.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        r#"
        WITH image AS (
            INSERT INTO wfq.runs (workflow_id, inputs, metadata)
            SELECT '{TEXT_TO_IMAGE}', jsonb_build_object('n3_seed', g), jsonb_build_object('chain', 'pass-' || g)
            FROM generate_series(1, {PASSING}) g RETURNING id, metadata
        )
        INSERT INTO wfq.runs (workflow_id, inputs, accept_external_cost_risk, metadata)
        SELECT '{VIDEO}', jsonb_build_object('prompt', 'a boat', 'image',
                   jsonb_build_object('$output', jsonb_build_object('run', id, 'key', 'n9_images'))),
               true, metadata
        FROM image;

        WITH doomed AS (
            INSERT INTO wfq.runs (workflow_id, inputs, metadata)
            SELECT '{ALWAYS_FAILS}', jsonb_build_object('prompt', 'fail ' || g), jsonb_build_object('chain', 'fail-' || g)
            FROM generate_series(1, {FAILING}) g RETURNING id, metadata
        ),
        second AS (
            INSERT INTO wfq.runs (workflow_id, inputs, accept_external_cost_risk, metadata)
            SELECT '{VIDEO}', jsonb_build_object('prompt', 'a boat', 'image',
                       jsonb_build_object('$output', jsonb_build_object('run', id, 'key', 'result'))),
                   true, metadata
            FROM doomed RETURNING id, metadata
        )
        INSERT INTO wfq.runs (workflow_id, inputs, depends_on, metadata)
        SELECT '{TEXT_TO_IMAGE}', '{{}}', ARRAY[id], metadata FROM second;

        WITH parts AS (
            INSERT INTO wfq.runs (workflow_id, inputs, metadata)
            SELECT '{TEXT_TO_IMAGE}', jsonb_build_object('n3_seed', g * 10 + p), jsonb_build_object('chain', 'fan-' || g)
            FROM generate_series(1, {FAN_INS}) g, generate_series(1, 3) p RETURNING id, metadata
        )
        INSERT INTO wfq.runs (workflow_id, inputs, depends_on, metadata)
        SELECT '{TEXT_TO_IMAGE}', '{{}}', array_agg(id ORDER BY id), metadata FROM parts GROUP BY metadata;
        "#
    )))
    .execute(&pool)
    .await
    .unwrap();
    let (runs, waiting): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE state = 'waiting') FROM wfq.runs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(runs, PASSING * 2 + FAILING * 3 + FAN_INS * 4);
    assert_eq!(waiting, PASSING + FAILING * 2 + FAN_INS);

    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|_| spawn_worker(&config, &database_url))
        .collect();
    let mut kills = 0usize;
    let started = Instant::now();
    let (standstill, limit) = (Duration::from_secs(60), Duration::from_secs(540));
    let mut fewest = i64::MAX;
    let mut progressed = Instant::now();
    loop {
        // Waiting runs count: a chain left waiting would be a standstill.
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM wfq.runs WHERE state IN ('waiting', 'queued', 'submitting', 'running')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if left == 0 {
            break;
        }
        if left < fewest {
            fewest = left;
            progressed = Instant::now();
        }
        assert!(
            progressed.elapsed() < standstill,
            "no run became final for {standstill:?}; {left} still waiting or active"
        );
        assert!(
            started.elapsed() < limit,
            "runs left after {limit:?}: {left}"
        );
        tokio::time::sleep(Duration::from_millis(1000 + fastrand::u64(..1000))).await;
        let victim = fastrand::usize(..WORKERS);
        let replacement = spawn_worker(&config, &database_url);
        std::mem::replace(&mut workers[victim], replacement)
            .kill()
            .await;
        kills += 1;
    }
    for worker in workers {
        let _ = worker.terminate().await;
    }
    let elapsed = started.elapsed();

    // Every chain fully succeeded, or failed with the reason.
    type Row = (
        i64,
        String,
        String,
        Option<String>,
        Option<i64>,
        bool,
        Option<serde_json::Value>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, metadata->>'chain', state, error_code, (error_detail->>'root')::int8, \
                submitted_at IS NOT NULL, sent_inputs \
         FROM wfq.runs ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut chains: HashMap<String, Vec<&Row>> = HashMap::new();
    for row in &rows {
        chains.entry(row.1.clone()).or_default().push(row);
    }
    assert_eq!(chains.len() as i64, PASSING + FAILING + FAN_INS);
    let outputs: HashMap<i64, serde_json::Value> = sqlx::query_as::<_, (i64, serde_json::Value)>(
        "SELECT id, outputs FROM wfq.runs WHERE outputs IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    for (name, chain) in &chains {
        if name.starts_with("fail-") {
            let (root, below) = chain.split_first().unwrap();
            assert_eq!(
                (root.2.as_str(), root.3.as_deref()),
                ("failed", Some("ENGINE_EXECUTION_FAILED")),
                "{name}: {chain:?}"
            );
            for run in below {
                assert_eq!(
                    (run.2.as_str(), run.3.as_deref(), run.4, run.5),
                    ("failed", Some("DEPENDENCY_FAILED"), Some(root.0), false),
                    "{name}: {chain:?}"
                );
            }
        } else {
            assert!(
                chain.iter().all(|r| r.2 == "succeeded"),
                "{name}: {chain:?}"
            );
            if name.starts_with("pass-") {
                let picture = &outputs[&chain[0].0]["n9_images"];
                assert_eq!(&chain[1].6.as_ref().unwrap()["image"], picture, "{name}");
            }
        }
    }

    // Each submitted run once at the provider, the others never; the
    // money of the database is the ledger's, to the last decimal.
    let ledger = sim.ledger();
    let submitted: HashSet<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM wfq.runs WHERE submitted_at IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(submitted.len() as i64, PASSING * 2 + FAILING + FAN_INS * 4);
    assert_eq!(ledger.len(), submitted.len());
    assert!(
        ledger
            .iter()
            .all(|e| e.charges == 1 && submitted.contains(&e.idempotency_key))
    );
    let (db_frozen, db_final, db_released): (Decimal, Decimal, Decimal) = sqlx::query_as(
        "SELECT sum(frozen_amount), sum(final_amount), sum(released_amount) FROM wfq.runs",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(db_frozen, ledger.iter().map(|e| e.frozen).sum::<Decimal>());
    assert_eq!(
        db_final,
        ledger
            .iter()
            .filter_map(|e| e.final_amount)
            .sum::<Decimal>()
    );
    assert_eq!(
        db_released,
        ledger.iter().filter_map(|e| e.released).sum::<Decimal>()
    );
    assert!(kills >= 3, "the test must actually kill workers ({kills})");
    println!(
        "chaos with chains: runs={runs} chains={} kills={kills} in {:.1}s",
        chains.len(),
        elapsed.as_secs_f64()
    );
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}
