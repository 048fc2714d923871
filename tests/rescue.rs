//! A crashed worker's runs continue within seconds, not after a lease:
//! `wfq worker` processes killed with SIGKILL at known points (the
//! simulator's hold gates keep a request in flight until the kill), a
//! worker whose database sessions are cut while it keeps running, and a
//! live but slow worker that must keep its runs.
//!
//! Leases here are 10 minutes, so that only crash detection can explain a
//! rescue; the waits are generous and nothing is timed.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::config::Config;
use wfq::sim::{Faults, SimServer};

const LIMIT: Duration = Duration::from_secs(90);
const KEY_ENV: &str = "RESCUE_KEY";

async fn pool(connect: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(connect)
        .await
        .expect("test database")
}

/// The profiles without idempotency keys: `dify` (app `text`), whose lost
/// submits are looked for for twice `timeout` before they are sent again,
/// and `gptbots` (workflow `news`).
fn keyless_profiles(sim: &SimServer, timeout: Duration) -> String {
    format!(
        "\n[providers.dify]\nkind = \"dify\"\nbase_url = \"{}\"\napi_key_env = \"{KEY_ENV}\"\n\
         find_window = \"{}s\"\nmax_run_time = \"1s\"\n\
         \n[providers.gptbots]\nkind = \"gptbots\"\nbase_url = \"{}\"\napi_key_env = \"{KEY_ENV}\"\n",
        sim.dify_base_url("text"),
        timeout.as_secs() * 2,
        sim.gptbots_base_url("news"),
    )
}

/// Provider calls of the rescuers in the kill tests (a Dify submit of
/// theirs that is lost is looked for for twice this long).
const SHORT_CALLS: Duration = Duration::from_secs(5);

/// Provider calls of the victims: a held request must still be in flight
/// when the victim is killed, however slow the machine.
const VICTIM_CALLS: Duration = Duration::from_secs(300);

/// `worker.toml` of a worker process: a 10-minute lease, HTTP calls that
/// outlast the holds (a kill follows a hold at once), fast schedules.
fn worker_toml(sim: &SimServer, id: &str, timeout: Duration) -> String {
    format!(
        r#"
[worker]
id = "{id}"
concurrency = 8
lease = "10m"
fallback_poll = "250ms"
shutdown_grace = "2s"
[http]
timeout = "{}s"
connect_timeout = "1s"
[submit]
initial = "100ms"
max = "400ms"
[poll]
initial = "50ms"
max = "200ms"
jitter = 0.1
[providers.chenyu]
kind = "chenyu"
base_url = "{}"
api_key_env = "{KEY_ENV}"
{}"#,
        timeout.as_secs(),
        sim.base_url(),
        keyless_profiles(sim, timeout)
    )
}

/// The same settings for a worker in this process.
fn in_process(sim: &SimServer, id: &str, timeout: Duration) -> Config {
    let keyless = keyless_profiles(sim, timeout).replace(KEY_ENV, "TEST_CHENYU_KEY")
        + &format!("\n[http]\ntimeout = \"{}s\"\n", timeout.as_secs());
    let mut cfg = config(sim, id, &keyless);
    cfg.worker.lease = Duration::from_secs(600);
    cfg.http.timeout = timeout;
    cfg
}

/// Waits until `n` requests are held, or fails with the victim's log.
async fn held(sim: &SimServer, n: u64, victim: &Process) {
    if tokio::time::timeout(LIMIT, sim.wait_until_held(n))
        .await
        .is_err()
    {
        panic!(
            "{n} requests were never held; the victim's log:\n{}",
            std::fs::read_to_string(&victim.log).unwrap_or_default()
        );
    }
}

/// A `wfq worker` child, killed if the test fails half-way.
struct Process {
    child: tokio::process::Child,
    log: PathBuf,
    _config: TempFile,
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Process {
    fn spawn(sim: &SimServer, id: &str, database_url: &str, timeout: Duration) -> Process {
        let dir = std::env::temp_dir().join(format!("wfq-rescue-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tag = format!("{id}-{:08x}", fastrand::u32(..));
        let config = dir.join(format!("{tag}.toml"));
        std::fs::write(&config, worker_toml(sim, id, timeout)).unwrap();
        let log = dir.join(format!("{tag}.log"));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
            .args(["worker", "--config"])
            .arg(&config)
            .env("DATABASE_URL", database_url)
            .env(KEY_ENV, API_KEY)
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("worker starts");
        Process {
            child,
            log,
            _config: TempFile(config),
        }
    }

    async fn sigkill(mut self) -> String {
        self.child.kill().await.unwrap();
        self.logs()
    }

    async fn sigterm(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the worker exits after SIGTERM")
            .unwrap();
        (status, self.logs())
    }

    fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        text
    }
}

/// Whether `condition` holds within `limit` (re-checked every 50 ms).
async fn holds_within(pool: &PgPool, condition: &str, limit: Duration) -> bool {
    let query = format!("SELECT ({condition}) FROM (SELECT 1) AS one");
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let holds: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(query.clone()))
            .fetch_one(pool)
            .await
            .expect("condition query");
        if holds == Some(true) {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The one rescue of run `id`: (previous owner, cause, rescuer).
async fn rescue_of(pool: &PgPool, id: i64) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT detail->>'previous_owner', detail->>'cause', worker FROM wfq.run_events \
         WHERE run_id = $1 AND kind = 'lease_rescued' ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// chenyu: one charge for the run's key, and the row's money is the ledger's.
fn assert_chenyu_billed_once(sim: &SimServer, row: &wfq::store::RunRow) {
    let ledger = sim.ledger();
    let entries: Vec<_> = ledger
        .iter()
        .filter(|e| e.idempotency_key == row.idempotency_key)
        .collect();
    assert_eq!(entries.len(), 1, "{ledger:?}");
    let e = entries[0];
    assert_eq!(e.charges, 1, "{e:?}");
    assert_eq!(
        row.provider_run_id.as_deref(),
        Some(e.run_order_id.as_str())
    );
    assert_eq!(row.frozen_amount, Some(e.frozen));
    assert_eq!(row.final_amount, e.final_amount);
    assert_eq!(row.released_amount, e.released);
}

/// Dify: one run of the run's user, and the row's price is the ledger's.
fn assert_dify_billed_once(sim: &SimServer, row: &wfq::store::RunRow) {
    let user = format!("wfq-{}", row.idempotency_key);
    let ledger = sim.dify_ledger();
    let runs: Vec<_> = ledger.iter().filter(|e| e.user == user).collect();
    assert_eq!(runs.len(), 1, "{ledger:?}");
    assert_eq!(
        row.provider_run_id.as_deref(),
        Some(runs[0].workflow_run_id.as_str())
    );
    assert_eq!(row.final_amount, Some(runs[0].total_price));
    assert_eq!(row.total_tokens, Some(runs[0].total_tokens));
}

/// Kills the `victim` process once `hold` has held one request of its run,
/// then starts another worker in this process and opens the gate; the run
/// must be finished by the other worker, rescued as a crash.
async fn killed_while_held(
    connect: PgConnectOptions,
    hold: Faults,
    provider: &str,
    workflow: &str,
    inputs: serde_json::Value,
) -> (PgPool, SimServer, wfq::store::RunRow) {
    let url = database_url(&connect);
    let pool = pool(connect).await;
    let sim = start_sim(50, 300, 50).await;
    sim.set_faults(hold);
    let id = enqueue_on(&pool, provider, workflow, inputs).await;
    let victim = Process::spawn(&sim, "victim", &url, VICTIM_CALLS);
    held(&sim, 1, &victim).await;
    // Killed with its request held: the run is certainly the victim's.
    let owner = run(&pool, id).await.lease_owner;
    assert_eq!(owner.as_deref(), Some("victim"));
    let logs = victim.sigkill().await;
    sim.set_faults(Faults::default());
    // The rescuer starts after the death, and finds it by the victim's
    // registration (its liveness lock is free).
    let rescuer = start_worker(in_process(&sim, "rescuer", SHORT_CALLS), pool.clone());
    assert!(
        holds_within(
            &pool,
            &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {id})"),
            LIMIT
        )
        .await,
        "run {id} not finished: {:?}\nvictim's log:\n{logs}",
        run(&pool, id).await
    );
    rescuer.stop().await;
    let rescues = rescue_of(&pool, id).await;
    assert_eq!(
        rescues,
        [(
            "victim".to_owned(),
            "crash".to_owned(),
            "rescuer".to_owned()
        )]
    );
    let died: Option<String> =
        sqlx::query_scalar("SELECT died_cause FROM wfq.workers WHERE id = 'victim'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(died.as_deref(), Some("crash"));
    let row = run(&pool, id).await;
    assert!(row.submit_in_doubt_since.is_none(), "{row:?}");
    (pool, sim, row)
}

#[sqlx::test]
async fn a_worker_killed_mid_poll_is_rescued_without_waiting_for_its_lease(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let hold = Faults {
        hold_status_checks: true,
        ..Default::default()
    };
    let (pool, sim, row) = killed_while_held(
        connect,
        hold,
        "chenyu",
        TEXT_TO_IMAGE,
        json!({"n6_text": "a"}),
    )
    .await;
    assert_chenyu_billed_once(&sim, &row);
    assert_eq!(
        sim.stats().submit_requests,
        1,
        "submitted once, polled after"
    );

    // The fleet as operators see it.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["workers", "--json"])
        .env("DATABASE_URL", &url)
        .env_remove("WFQ_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let fleet: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let victim = fleet.iter().find(|w| w["id"] == "victim").unwrap();
    assert_eq!(victim["alive"], json!(false));
    assert_eq!(victim["died_cause"], json!("crash"));
    assert_eq!(victim["runs_in_hand"], json!(0));
    let rescuer = fleet.iter().find(|w| w["id"] == "rescuer").unwrap();
    assert_eq!(rescuer["died_cause"], json!("stopped"));
    let table = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .arg("workers")
        .env("DATABASE_URL", &url)
        .env_remove("WFQ_CONFIG")
        .output()
        .await
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("id "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("victim ") && l.contains("crash")),
        "{table}"
    );
    sim.shutdown().await;
    pool.close().await;
}

#[sqlx::test]
async fn a_chenyu_worker_killed_mid_submit_is_rescued_and_the_run_billed_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let hold = Faults {
        hold_submits: true,
        ..Default::default()
    };
    let (pool, sim, row) = killed_while_held(
        connect,
        hold,
        "chenyu",
        TEXT_TO_IMAGE,
        json!({"n6_text": "b"}),
    )
    .await;
    // Sent again with the same key: chenyu created the run once at most.
    assert_chenyu_billed_once(&sim, &row);
    sim.shutdown().await;
    pool.close().await;
}

#[sqlx::test]
async fn a_dify_worker_killed_mid_submit_is_rescued_and_the_run_billed_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let hold = Faults {
        hold_submits: true,
        ..Default::default()
    };
    let inputs = json!({"query": "summarise", "tone": "casual"});
    let (pool, sim, row) = killed_while_held(connect, hold, "dify", "text", inputs).await;
    // No key to replay: looked for by its user, sent again only after
    // find_window without a run of that user.
    assert_dify_billed_once(&sim, &row);
    let kinds = event_kinds(&pool, row.id).await;
    assert!(
        kinds.contains(&"submit_adopted".to_owned())
            || kinds.contains(&"resubmit_started".to_owned()),
        "{kinds:?}"
    );
    sim.shutdown().await;
    pool.close().await;
}

#[sqlx::test]
async fn a_worker_killed_while_reading_a_dify_stream_is_rescued(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let hold = Faults {
        hold_streams: true,
        ..Default::default()
    };
    let inputs = json!({"query": "summarise", "tone": "formal"});
    let (pool, sim, row) = killed_while_held(connect, hold, "dify", "text", inputs).await;
    assert_dify_billed_once(&sim, &row);
    assert_eq!(
        row.attempts, 1,
        "followed by status checks, never sent again"
    );
    sim.shutdown().await;
    pool.close().await;
}

/// Every database session of a worker process is cut while it keeps
/// running, its status checks in flight: another worker takes its runs
/// within seconds; when the checks answer, the cut-off worker's writes are
/// refused (it logs that it dropped them); it comes back by itself and
/// finishes new runs; nothing is billed twice.
#[sqlx::test]
async fn a_worker_cut_off_from_the_database_recovers_and_its_stale_writes_are_refused(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // The victim's pool sessions carry this name, and its claim loop's and
    // liveness session's names end with it.
    let url = format!(
        "{}?application_name=victim-sessions",
        database_url(&connect)
    );
    let pool = pool(connect).await;
    let sim = start_sim(50, 300, 50).await;
    sim.set_faults(Faults {
        hold_status_checks: true,
        ..Default::default()
    });
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(enqueue(&pool, TEXT_TO_IMAGE, json!({ "n3_seed": n })).await);
    }
    // The checks stay held through the cut, the rescue and the return
    // (up to 20 cuts with 3 s each to be seen, the waits that follow).
    let calls = Duration::from_secs(300);
    let victim = Process::spawn(&sim, "victim", &url, calls);
    held(&sim, 4, &victim).await;
    let mut other = in_process(&sim, "rescuer", calls);
    other.worker.rescue_every = Duration::from_millis(100);
    let rescuer = start_worker(other, pool.clone());
    assert!(
        holds_within(
            &pool,
            "EXISTS (SELECT 1 FROM wfq.workers_live WHERE id = 'rescuer' AND alive)",
            LIMIT
        )
        .await
    );

    // Cut until the rescuer has seen the victim gone (a victim that comes
    // back before the rescuer looks is simply cut again).
    let mut cuts = 0;
    loop {
        cuts += 1;
        assert!(cuts <= 20, "the victim was never found gone");
        let cut: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE '%victim%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if cuts == 1 {
            assert!(cut >= 2, "the victim's sessions were found: {cut}");
        }
        if holds_within(
            &pool,
            "(SELECT died_at IS NOT NULL FROM wfq.workers WHERE id = 'victim')",
            Duration::from_secs(3),
        )
        .await
        {
            break;
        }
    }
    // Its runs are the rescuer's now; their checks are held too.
    let ids_sql = format!(
        "{{{}}}",
        ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
    );
    assert!(
        holds_within(
            &pool,
            &format!(
                "(SELECT count(*) = 4 FROM wfq.runs WHERE id = ANY('{ids_sql}') AND lease_owner = 'rescuer')"
            ),
            LIMIT
        )
        .await
    );
    // And the victim is back by itself.
    assert!(
        holds_within(
            &pool,
            "EXISTS (SELECT 1 FROM wfq.workers_live WHERE id = 'victim' AND alive AND died_at IS NULL)",
            LIMIT
        )
        .await
    );
    held(&sim, 8, &victim).await;
    // Both workers' checks answer now; only the rescuer's count.
    sim.set_faults(Faults::default());
    wait_all_final(&pool, LIMIT).await;
    for &id in &ids {
        let rescues = rescue_of(&pool, id).await;
        assert_eq!(
            rescues.first(),
            Some(&(
                "victim".to_owned(),
                "crash".to_owned(),
                "rescuer".to_owned()
            )),
            "run {id}: {rescues:?}"
        );
    }
    rescuer.stop().await;

    // Alone again, the victim does new work.
    let later = enqueue(&pool, TEXT_TO_IMAGE, json!({"n3_seed": 99})).await;
    wait_all_final(&pool, LIMIT).await;
    let finisher: Option<String> = sqlx::query_scalar(
        "SELECT worker FROM wfq.run_events WHERE run_id = $1 AND kind = 'run_finished'",
    )
    .bind(later)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(finisher.as_deref(), Some("victim"));
    let (status, logs) = victim.sigterm().await;
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(logs.contains("cut off from the database"), "{logs}");
    assert!(logs.contains("back in touch with the database"), "{logs}");
    assert!(logs.contains("dropped this step's outcome"), "{logs}");

    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 5, "{ledger:?}");
    assert!(ledger.iter().all(|e| e.charges == 1), "{ledger:?}");
    let (frozen, charged): (Decimal, Decimal) =
        sqlx::query_as("SELECT sum(frozen_amount), sum(final_amount) FROM wfq.runs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(frozen, ledger.iter().map(|e| e.frozen).sum::<Decimal>());
    assert_eq!(
        charged,
        ledger
            .iter()
            .filter_map(|e| e.final_amount)
            .sum::<Decimal>()
    );
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(succeeded, 5);
    sim.shutdown().await;
    pool.close().await;
}

/// A worker that is alive but slow keeps its run: a status check held open
/// longer than the (short) lease, another worker looking for runs to take
/// all along, and no rescue, because the lease is renewed while the step
/// runs.
#[sqlx::test]
async fn an_alive_but_slow_worker_keeps_its_runs(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(connect).await;
    let sim = start_sim(50, 300, 50).await;
    sim.set_faults(Faults {
        hold_status_checks: true,
        ..Default::default()
    });
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    // The lease is renewed every third of it: a 10 s lease outlasts any
    // stall of the machine between two renewals.
    let short = |name: &str| {
        let mut cfg = config(&sim, name, "");
        cfg.worker.lease = Duration::from_secs(10);
        cfg.http.timeout = Duration::from_secs(60);
        cfg
    };
    let slow = start_worker(short("slow"), pool.clone());
    tokio::time::timeout(LIMIT, sim.wait_until_held(1))
        .await
        .expect("the status check is held");
    let (first_end, version): (chrono::DateTime<chrono::Utc>, i64) =
        sqlx::query_as("SELECT lease_expires_at, version FROM wfq.runs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    let other = start_worker(short("other"), pool.clone());
    // The lease it was claimed with is over (renewed since, by more than a
    // whole lease), the check is still held, and the run was never claimed
    // again (a claim changes the version; a renewal does not).
    assert!(
        holds_within(
            &pool,
            &format!(
                "(SELECT lease_owner = 'slow' AND version = {version} \
                 AND lease_expires_at > '{}'::timestamptz + interval '10 seconds' \
                 FROM wfq.runs WHERE id = {id})",
                first_end.to_rfc3339()
            ),
            LIMIT
        )
        .await,
        "{:?}",
        run(&pool, id).await
    );
    assert_eq!(sim.stats().held_requests, 1, "the same check, still held");
    sim.set_faults(Faults::default());
    wait_all_final(&pool, LIMIT).await;
    slow.stop().await;
    other.stop().await;
    assert!(rescue_of(&pool, id).await.is_empty());
    let finisher: Option<String> = sqlx::query_scalar(
        "SELECT worker FROM wfq.run_events WHERE run_id = $1 AND kind = 'run_finished'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(finisher.as_deref(), Some("slow"));
    assert_chenyu_billed_once(&sim, &run(&pool, id).await);
    sim.shutdown().await;
}

/// The providers without idempotency keys, for the tests of a submit whose
/// sender's database session is cut while its request is in flight.
#[derive(Debug, Clone, Copy)]
enum Keyless {
    Dify,
    Gptbots,
}

impl Keyless {
    fn kind(self) -> wfq::config::ProviderKind {
        match self {
            Keyless::Dify => wfq::config::ProviderKind::Dify,
            Keyless::Gptbots => wfq::config::ProviderKind::Gptbots,
        }
    }

    async fn enqueue(self, pool: &PgPool) -> i64 {
        match self {
            Keyless::Dify => enqueue_on(pool, "dify", "text", json!({"query": "summarise"})).await,
            Keyless::Gptbots => enqueue_on(pool, "gptbots", "news", json!({"topic": "rust"})).await,
        }
    }
}

/// The kinds of run `id`'s events, in order.
async fn kinds_of(pool: &PgPool, id: i64) -> Vec<String> {
    event_kinds(pool, id).await
}

/// Ends the victim's liveness session (only that one: its pool, its claim
/// loop and its requests go on) until another worker has marked it dead;
/// a victim that takes its lock again before the rescuer looks is simply
/// cut again.
async fn cut_liveness_until_marked_dead(pool: &PgPool) {
    for _ in 0..20 {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'wfq liveness victim%'",
        )
        .execute(pool)
        .await
        .unwrap();
        if holds_within(
            pool,
            "(SELECT died_at IS NOT NULL FROM wfq.workers WHERE id = 'victim')",
            Duration::from_secs(3),
        )
        .await
        {
            return;
        }
    }
    panic!("the victim was never found gone");
}

/// Issue: a worker whose liveness session ends while it is alive (killed
/// with pg_terminate_backend here; a database restart or a reset
/// connection alike) has a GPTBots or Dify submit in flight. Another
/// worker finds its lock free within a second and takes its status check
/// over at once, but leaves the run with the submit in flight to its
/// sender: when the provider answers, the sender records it. Exactly one
/// provider run, the wfq run succeeds with it, the money is the ledger's.
async fn a_submit_in_flight_stays_with_its_sender_when_its_liveness_session_is_cut(
    kind: Keyless,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = pool(connect).await;
    let sim = start_sim(50, 300, 50).await;
    // First a chenyu run whose status check the victim holds: the canary
    // of the rescue (a status check is safe to take over at once).
    sim.set_faults(Faults {
        hold_status_checks: true,
        ..Default::default()
    });
    let canary = enqueue(&pool, TEXT_TO_IMAGE, json!({"n3_seed": 7})).await;
    let calls = Duration::from_secs(60);
    let victim = Process::spawn(&sim, "victim", &url, calls);
    held(&sim, 1, &victim).await;
    // Then the keyless run, its submit held.
    sim.set_faults(Faults {
        hold_status_checks: true,
        hold_submits: true,
        ..Default::default()
    });
    let id = kind.enqueue(&pool).await;
    held(&sim, 2, &victim).await;
    let mut other = in_process(&sim, "rescuer", calls);
    other.worker.rescue_every = Duration::from_millis(100);
    let rescuer = start_worker(other, pool.clone());
    assert!(
        holds_within(
            &pool,
            "EXISTS (SELECT 1 FROM wfq.workers_live WHERE id = 'rescuer' AND alive)",
            LIMIT
        )
        .await
    );

    cut_liveness_until_marked_dead(&pool).await;
    // The rescue made the canary due at once, and the rescuer's next claim
    // took it: the keyless run, rescued by the same statement, would have
    // been in that claim.
    assert!(
        holds_within(
            &pool,
            &format!(
                "EXISTS (SELECT 1 FROM wfq.run_events WHERE run_id = {canary} AND kind = 'lease_rescued')"
            ),
            LIMIT
        )
        .await,
        "the canary was never rescued"
    );
    let row = run(&pool, id).await;
    assert_eq!(row.state, "submitting", "{kind:?}: {row:?}");
    assert_eq!(
        row.lease_owner.as_deref(),
        Some("victim"),
        "{kind:?}: {row:?}"
    );
    assert!(rescue_of(&pool, id).await.is_empty(), "{kind:?}: {row:?}");
    // Its lease was cut to the grace (the rescuer's http.timeout and two
    // write pauses), not left at ten minutes.
    let grace_left: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM lease_expires_at - now())::float8 FROM wfq.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(grace_left <= 70.0, "{kind:?}: {grace_left} s left");

    // The provider answers now: the sender records it.
    sim.set_faults(Faults::default());
    wait_all_final(&pool, LIMIT).await;
    rescuer.stop().await;
    let (status, logs) = victim.sigterm().await;
    assert!(status.success(), "{status:?}\n{logs}");
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{kind:?}: {row:?}\n{logs}");
    let runs = provider_runs(&sim, kind.kind());
    assert_eq!(runs.len(), 1, "{kind:?}: {runs:?}");
    assert_one_provider_run(kind.kind(), &row, &runs);
    let kinds = kinds_of(&pool, id).await;
    assert!(
        kinds.contains(&"submit_accepted".to_owned()),
        "{kind:?}: {kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| k == "submit_outcome_unknown" || k == "resubmit_started"),
        "{kind:?}: {kinds:?}"
    );
    assert_chenyu_billed_once(&sim, &run(&pool, canary).await);
    sim.shutdown().await;
    pool.close().await;
}

/// Issue: the same, but the sender is cut off from the database entirely
/// (every connection, through a proxy) until after another worker has
/// taken the run over and given up on it (GPTBots: `SUBMIT_OUTCOME_UNKNOWN`)
/// or looked for it in vain (Dify). The answer arrives while the sender
/// cannot write; once it can, its compare-and-set is refused, and the
/// answer is recorded by the submit's token all the same: the run follows
/// the provider's run, exactly one, to its end.
async fn an_answer_recorded_after_the_run_was_taken_over_is_not_lost(
    kind: Keyless,
    connect: PgConnectOptions,
) {
    let (proxy, via_proxy) = cut_proxy::to_database(&connect).await;
    let pool = pool(connect).await;
    let sim = start_sim(50, 300, 50).await;
    sim.set_faults(Faults {
        hold_submits: true,
        ..Default::default()
    });
    let id = kind.enqueue(&pool).await;
    // The victim's request outlasts everything below.
    let victim = Process::spawn(&sim, "victim", &via_proxy, Duration::from_secs(120));
    held(&sim, 1, &victim).await;
    // The rescuer's grace for a submit in flight is short (1 s requests),
    // and it looks for a lost Dify run for long before sending it again.
    let mut other = in_process(&sim, "rescuer", Duration::from_secs(1));
    other.worker.rescue_every = Duration::from_millis(100);
    if let Some(dify) = other.providers.get_mut("dify") {
        dify.find_window = Duration::from_secs(600);
    }
    let rescuer = start_worker(other, pool.clone());
    assert!(
        holds_within(
            &pool,
            "EXISTS (SELECT 1 FROM wfq.workers_live WHERE id = 'rescuer' AND alive)",
            LIMIT
        )
        .await
    );

    proxy.cut();
    // The rescuer took the run over and decided without the answer.
    let decided = match kind {
        Keyless::Gptbots => format!(
            "(SELECT state = 'failed' AND error_code = 'SUBMIT_OUTCOME_UNKNOWN' FROM wfq.runs WHERE id = {id})"
        ),
        Keyless::Dify => format!(
            "EXISTS (SELECT 1 FROM wfq.run_events WHERE run_id = {id} AND kind = 'submit_not_found_yet')"
        ),
    };
    assert!(
        holds_within(&pool, &decided, LIMIT).await,
        "{kind:?}: {:?}",
        run(&pool, id).await
    );
    assert_eq!(
        rescue_of(&pool, id).await.first().map(|r| r.1.as_str()),
        Some("crash")
    );
    // The provider answers while the victim cannot write.
    sim.set_faults(Faults::default());
    let key = run(&pool, id).await.idempotency_key;
    tokio::time::timeout(LIMIT, async {
        while !provider_runs(&sim, kind.kind()).contains_key(&key) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the provider created the run");
    proxy.restore();

    assert!(
        holds_within(
            &pool,
            &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {id})"),
            LIMIT
        )
        .await,
        "{kind:?}: {:?}",
        run(&pool, id).await
    );
    rescuer.stop().await;
    let (status, logs) = victim.sigterm().await;
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(
        logs.contains("recorded the provider's answer after another worker had taken the run over"),
        "{logs}"
    );
    let row = run(&pool, id).await;
    let runs = provider_runs(&sim, kind.kind());
    assert_eq!(runs.len(), 1, "{kind:?}: {runs:?}");
    assert_one_provider_run(kind.kind(), &row, &runs);
    assert!(row.error_code.is_none(), "{row:?}");
    let kinds = kinds_of(&pool, id).await;
    assert!(
        kinds.contains(&"late_answer_recorded".to_owned()),
        "{kind:?}: {kinds:?}"
    );
    assert!(
        !kinds.contains(&"resubmit_started".to_owned()),
        "{kind:?}: {kinds:?}"
    );
    sim.shutdown().await;
    pool.close().await;
}

macro_rules! for_dify_and_gptbots {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            use super::*;

            #[sqlx::test]
            async fn dify(_: PgPoolOptions, connect: PgConnectOptions) {
                super::$body(Keyless::Dify, connect).await
            }

            #[sqlx::test]
            async fn gptbots(_: PgPoolOptions, connect: PgConnectOptions) {
                super::$body(Keyless::Gptbots, connect).await
            }
        }
    )*};
}

for_dify_and_gptbots!(
    a_submit_in_flight_stays_with_its_sender_when_its_liveness_session_is_cut,
    an_answer_recorded_after_the_run_was_taken_over_is_not_lost,
);

/// Issue: a worker that comes back from being cut off gives back the
/// leases of the runs none of its steps works on; a Dify run whose stream
/// it is reading is one it works on. Its liveness session is cut while the
/// stream is held open: once it is back (and claims again), the run is
/// still its own, never released, and the stream's end finishes it.
#[sqlx::test]
async fn a_worker_back_from_being_cut_off_keeps_the_dify_stream_it_reads(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let worker_pool = pool(connect.clone()).await;
    let pool = pool(connect).await;
    let sim = start_sim(50, 300, 50).await;
    sim.set_faults(Faults {
        hold_streams: true,
        ..Default::default()
    });
    let id = enqueue_on(&pool, "dify", "text", json!({"query": "a long one"})).await;
    let reader = start_worker(in_process(&sim, "reader", SHORT_CALLS), worker_pool);
    tokio::time::timeout(LIMIT, sim.wait_until_held(1))
        .await
        .expect("the stream is held");
    let row = run(&pool, id).await;
    assert_eq!(
        (row.state.as_str(), row.lease_owner.as_deref()),
        ("running", Some("reader"))
    );

    // Its liveness session ends; it notices, registers again on a new
    // session, gives back what no step of it holds, and claims again.
    let liveness = "SELECT pid FROM pg_stat_activity \
                    WHERE datname = current_database() AND application_name LIKE 'wfq liveness reader%'";
    let cut: i32 = sqlx::query_scalar(liveness).fetch_one(&pool).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(cut)
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        holds_within(
            &pool,
            &format!(
                "EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE 'wfq liveness reader%' AND pid <> {cut})"
            ),
            LIMIT
        )
        .await,
        "the worker never registered again"
    );
    // A run claimed from now on is claimed after the idle leases were
    // given back (the claim loop waits until the worker is back).
    let canary = enqueue(&pool, TEXT_TO_IMAGE, json!({"n3_seed": 3})).await;
    assert!(
        holds_within(
            &pool,
            &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {canary})"),
            LIMIT
        )
        .await
    );
    let row = run(&pool, id).await;
    assert_eq!(row.lease_owner.as_deref(), Some("reader"), "{row:?}");
    let kinds = event_kinds(&pool, id).await;
    assert!(!kinds.contains(&"lease_released".to_owned()), "{kinds:?}");

    sim.set_faults(Faults::default());
    wait_all_final(&pool, LIMIT).await;
    reader.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{row:?}");
    assert_dify_billed_once(&sim, &row);
    // Finished from its stream (the one read of it counts as a poll),
    // never released, never claimed again.
    assert_eq!(row.polls, 1, "{row:?}");
    let kinds = event_kinds(&pool, id).await;
    assert!(!kinds.contains(&"lease_released".to_owned()), "{kinds:?}");
    assert!(rescue_of(&pool, id).await.is_empty());
    sim.shutdown().await;
}
