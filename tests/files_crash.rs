//! Files in, exactly once across a real crash: a `wfq worker` process
//! killed with SIGKILL after it uploaded a run's input file and while its
//! submit is held in flight at the provider (the simulator's hold gate), then
//! another worker takes the run over as a crash. The provider sees one
//! upload and one run; the rescuer sends the upload's id, not a new one.
//!
//! Leases are 10 minutes, so only crash detection explains the rescue; the
//! waits are generous and nothing is timed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::files::*;
use common::*;
use wfq::sim::{Faults, SimServer};

const LIMIT: Duration = Duration::from_secs(90);
const KEY_ENV: &str = "FILES_CRASH_KEY";

/// A PNG-looking file.
fn picture(dir: &Path) -> (String, Vec<u8>) {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend((0..2000).map(|i| (i * 7 % 251) as u8));
    let path = dir.join("boat.png");
    std::fs::write(&path, &bytes).expect("write picture");
    (format!("file://{}", path.display()), bytes)
}

/// The victim's `worker.toml`: a 10-minute lease and HTTP calls that
/// outlast the hold (the kill follows it at once), the store, chenyu and
/// the Dify `picture` app.
fn victim_toml(sim: &SimServer, store: &Path) -> String {
    format!(
        r#"
[worker]
id = "victim"
concurrency = 4
lease = "10m"
fallback_poll = "250ms"
shutdown_grace = "2s"
[http]
timeout = "300s"
connect_timeout = "1s"
[submit]
initial = "100ms"
max = "400ms"
[poll]
initial = "50ms"
max = "200ms"
[storage]
url = "file://{}"
[providers.chenyu]
kind = "chenyu"
base_url = "{}"
api_key_env = "{KEY_ENV}"
[providers.dify_picture]
kind = "dify"
base_url = "{}"
api_key_env = "{KEY_ENV}"
find_window = "600s"
max_run_time = "1s"
"#,
        store.display(),
        sim.base_url(),
        sim.dify_base_url("picture"),
    )
}

/// The rescuer, in this process: the same store and profiles, and a Dify
/// `find_window` of 4 s (a submit the victim never got out is sent again
/// after it; one that reached Dify is found by its end user).
fn rescuer_config(sim: &SimServer, store: &Path) -> wfq::config::Config {
    let mut config = config_with_storage(
        sim,
        "rescuer",
        &format!("url = \"file://{}\"", store.display()),
        &format!(
            "\n[providers.dify_picture]\nkind = \"dify\"\nbase_url = \"{}\"\napi_key_env = \"TEST_CHENYU_KEY\"\nfind_window = \"4s\"\nmax_run_time = \"1s\"\n",
            sim.dify_base_url("picture")
        ),
    );
    config.worker.lease = Duration::from_secs(600);
    config
}

/// A `wfq worker` child, killed if the test fails half-way.
struct Victim {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Victim {
    fn spawn(sim: &SimServer, store: &Path, dir: &Path, database_url: &str) -> Victim {
        let config = dir.join("victim.toml");
        std::fs::write(&config, victim_toml(sim, store)).unwrap();
        let log = dir.join("victim.log");
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
        Victim { child, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

/// Kills the victim once it uploaded run `id`'s file and its submit is
/// held, lets a rescuer finish the run, and returns the run and the victim's
/// log.
async fn killed_between_upload_and_submit(
    pool: &PgPool,
    sim: &SimServer,
    database_url: &str,
    enqueue: impl std::future::Future<Output = i64>,
) -> (wfq::store::RunRow, String, PathBuf) {
    let hold = Faults {
        hold_submits: true,
        ..Faults::default()
    };
    killed_while_held(pool, sim, database_url, enqueue, hold).await
}

/// Kills the victim once `hold` holds a request of run `id` (after its
/// upload was recorded at the provider), lets a rescuer finish the run, and
/// returns the run and the victim's log.
async fn killed_while_held(
    pool: &PgPool,
    sim: &SimServer,
    database_url: &str,
    enqueue: impl std::future::Future<Output = i64>,
    hold: Faults,
) -> (wfq::store::RunRow, String, PathBuf) {
    let dir = temp_store();
    let store = dir.join("store");
    sim.set_faults(hold);
    let id = enqueue.await;
    let mut victim = Victim::spawn(sim, &store, &dir, database_url);
    if tokio::time::timeout(LIMIT, sim.wait_until_held(1))
        .await
        .is_err()
    {
        panic!(
            "the submit was never held; victim's log:\n{}",
            victim.logs()
        );
    }
    // Uploaded, recorded, and its submit in flight: the run is the victim's.
    assert_eq!(sim.uploads().len(), 1, "uploaded before the submit");
    assert_eq!(
        run(pool, id).await.lease_owner.as_deref(),
        Some("victim"),
        "{}",
        victim.logs()
    );
    victim.child.kill().await.unwrap();
    let logs = victim.logs();
    sim.set_faults(Faults::default());
    let rescuer = start_worker(rescuer_config(sim, &store), pool.clone());
    assert!(
        holds_within(
            pool,
            &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {id})"),
            LIMIT
        )
        .await,
        "run {id} not finished: {:?}\nvictim's log:\n{logs}",
        run(pool, id).await
    );
    rescuer.stop().await;
    let rescues: Vec<(String, String)> = sqlx::query_as(
        "SELECT detail->>'previous_owner', detail->>'cause' FROM wfq.run_events \
         WHERE run_id = $1 AND kind = 'lease_rescued'",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(rescues, [("victim".to_owned(), "crash".to_owned())]);
    (run(pool, id).await, logs, dir)
}

async fn pool(connect: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(connect)
        .await
        .expect("test database")
}

#[sqlx::test]
async fn chenyu_a_worker_killed_between_upload_and_submit_uploads_once_and_runs_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = pool(connect).await;
    let sim = start_sim(50, 300, 50).await;
    let files = temp_store();
    let (location, bytes) = picture(&files);
    let enqueue = store_enqueue(&pool, &location);
    let (row, logs, dir) = killed_between_upload_and_submit(&pool, &sim, &url, enqueue).await;
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 1, "one upload: {uploads:?}\n{logs}");
    assert_eq!(uploads[0].sha256, sha256(&bytes));
    let uri = json!(uploads[0].uri);
    assert_eq!(row.sent_inputs.as_ref().unwrap()["image"], uri);
    // One run at chenyu, frozen once, with the upload's URI.
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].charges, 1, "{ledger:?}");
    assert_eq!(
        row.provider_run_id.as_deref(),
        Some(ledger[0].run_order_id.as_str())
    );
    let inputs: Vec<_> = files_of(&pool, row.id)
        .await
        .into_iter()
        .filter(|f| f.0 == "input")
        .collect();
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert_eq!((inputs[0].3.as_str(), inputs[0].7), ("done", 1));
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(files);
    pool.close().await;
}

async fn store_enqueue(pool: &PgPool, location: &str) -> i64 {
    wfq::store::enqueue_run(
        pool,
        &wfq::store::NewRun {
            workflow_id: VIDEO.to_owned(),
            inputs: json!({"prompt": "a paper boat", "image": {"$file": location}}),
            accept_external_cost_risk: true,
            ..Default::default()
        },
    )
    .await
    .expect("enqueue")
}

#[sqlx::test]
async fn dify_a_worker_killed_between_upload_and_submit_uploads_once_and_runs_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = pool(connect).await;
    let sim = start_sim(50, 300, 50).await;
    let files = temp_store();
    let (location, bytes) = picture(&files);
    let enqueue = enqueue_on(
        &pool,
        "dify_picture",
        "picture",
        json!({"query": "what is in it", "photo": {"$file": location}}),
    );
    let (row, logs, dir) = killed_between_upload_and_submit(&pool, &sim, &url, enqueue).await;
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 1, "one upload: {uploads:?}\n{logs}");
    assert_eq!(uploads[0].sha256, sha256(&bytes));
    assert_eq!(
        row.sent_inputs.as_ref().unwrap()["photo"]["upload_file_id"],
        json!(uploads[0].id)
    );
    // Dify has no idempotency: one run of the run's end user.
    let user = format!("wfq-{}", row.idempotency_key);
    let ledger = sim.dify_ledger();
    let runs: Vec<_> = ledger.iter().filter(|e| e.user == user).collect();
    assert_eq!(runs.len(), 1, "{ledger:?}");
    assert_eq!(
        row.provider_run_id.as_deref(),
        Some(runs[0].workflow_run_id.as_str())
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(files);
    pool.close().await;
}

#[sqlx::test]
async fn a_worker_killed_during_its_upload_is_followed_at_once_and_runs_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = pool(connect).await;
    let sim = start_sim(50, 300, 50).await;
    let files = temp_store();
    let (location, bytes) = picture(&files);
    // The provider records the upload, and its answer never reaches the
    // victim: the one case where a file is uploaded again.
    let hold = Faults {
        hold_upload_answers: true,
        ..Faults::default()
    };
    let enqueue = store_enqueue(&pool, &location);
    // The victim's upload lease is twice its upload timeout (20 minutes):
    // finishing within the helper's limit shows the rescuer did not wait
    // for it.
    let (row, logs, dir) = killed_while_held(&pool, &sim, &url, enqueue, hold).await;
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 2, "uploaded again: {uploads:?}\n{logs}");
    assert!(uploads.iter().all(|u| u.sha256 == sha256(&bytes)));
    assert_eq!(
        row.sent_inputs.as_ref().unwrap()["image"],
        json!(uploads[1].uri),
        "the rescuer's upload is the one sent"
    );
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].charges, 1, "{ledger:?}");
    let abandoned: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT state, error_code FROM wfq.run_files WHERE run_id = $1 AND direction = 'input'",
    )
    .bind(row.id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        abandoned,
        [("done".to_owned(), None)],
        "the run's row, uploaded again"
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(files);
    pool.close().await;
}
