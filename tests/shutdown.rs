//! SIGTERM: stop claiming, let steps in flight finish within the grace
//! period, give back the leases of what did not finish, exit 0. chenyu,
//! then the providers without idempotency keys (Dify, GPTBots), where a
//! submit cut off between its answer and its record could bill twice or
//! lose a run.

mod common;

use std::process::Stdio;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

use common::*;
use wfq::config::ProviderKind;
use wfq::sim::{Faults, SimServer};

fn write_config(sim: &SimServer, name: &str, grace: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wfq-shutdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    // A long lease: if it were not given back, nobody could continue for two minutes.
    std::fs::write(
        &path,
        format!(
            "[worker]\nconcurrency = 8\nlease = \"120s\"\nfallback_poll = \"200ms\"\nshutdown_grace = \"{grace}\"\n\
             [http]\ntimeout = \"5s\"\n[poll]\ninitial = \"100ms\"\nmax = \"200ms\"\n\
             [providers.chenyu]\nkind = \"chenyu\"\nbase_url = \"{}\"\napi_key_env = \"SHUTDOWN_KEY\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    path
}

async fn leased(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE lease_owner IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// SIGTERM while the provider holds four submits: each is answered and
/// recorded before the exit, and no lease is left behind.
#[sqlx::test]
async fn steps_in_flight_finish_within_the_grace_period(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = test_pool(connect).await;
    let sim = start_sim(0, 60_000, 100).await;
    sim.set_faults(Faults {
        hold_submits: true,
        ..Default::default()
    });
    // Four: as many as the worker's slow start sends at once.
    for _ in 0..4 {
        enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({})).await;
    }
    let config = write_config(&sim, "grace", "10s");
    let (mut worker, mut log) = spawn_logged(&config, &url);
    wait_held(&sim, 4).await;
    signal_term(&worker);
    assert!(until_logged(&mut log, "shutting down: no new claims").await);
    sim.set_faults(Faults::default());
    let status = exit_status(&mut worker).await;
    assert!(status.success(), "{status:?}");
    // Each submit in flight completed and was recorded before the exit.
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'running'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(running, 4);
    assert_eq!(leased(&pool).await, 0);
    assert_eq!(sim.ledger().len(), 4);
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

/// SIGTERM while the provider holds status checks past a short grace
/// period: the worker gives their leases back and exits without waiting
/// for the answers, and the next worker continues at once.
#[sqlx::test]
async fn steps_past_the_grace_period_are_given_back_at_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = test_pool(connect).await;
    let sim = start_sim(0, 200, 100).await;
    sim.set_faults(Faults {
        hold_status_checks: true,
        ..Default::default()
    });
    for _ in 0..4 {
        enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({})).await;
    }
    let config = write_config(&sim, "short", "200ms");
    let (mut first, _log) = spawn_logged(&config, &url);
    wait_held(&sim, 4).await;
    signal_term(&first);
    let status = exit_status(&mut first).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        leased(&pool).await,
        0,
        "unfinished runs are given back, not left to a 120 s lease"
    );

    // The next worker continues at once, with the same keys: no second charge.
    sim.set_faults(Faults::default());
    let (mut second, _log) = spawn_logged(&config, &url);
    wait_all_final(&pool, Duration::from_secs(30)).await;
    signal_term(&second);
    assert!(exit_status(&mut second).await.success());
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 4);
    assert!(ledger.iter().all(|e| e.charges == 1));
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

/// The provider kinds without idempotency keys, each as one profile.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Dify,
    Gptbots,
}

impl Kind {
    fn provider(self) -> ProviderKind {
        match self {
            Kind::Dify => ProviderKind::Dify,
            Kind::Gptbots => ProviderKind::Gptbots,
        }
    }

    /// A `[providers.*]` table for `sim` with `extra` settings.
    fn profile(self, sim: &SimServer, extra: &str) -> String {
        match self {
            Kind::Dify => format!(
                "[providers.dify]\nkind = \"dify\"\nbase_url = \"{}\"\napi_key_env = \"SHUTDOWN_KEY\"\n\
                 find_window = \"120s\"\nmax_run_time = \"5s\"\n{extra}\n",
                sim.dify_base_url("text")
            ),
            Kind::Gptbots => format!(
                "[providers.gptbots]\nkind = \"gptbots\"\nbase_url = \"{}\"\napi_key_env = \"SHUTDOWN_KEY\"\n{extra}\n",
                sim.gptbots_base_url("news")
            ),
        }
    }

    async fn enqueue(self, pool: &PgPool, n: u32) -> i64 {
        match self {
            Kind::Dify => {
                enqueue_on(
                    pool,
                    "dify",
                    "text",
                    serde_json::json!({"query": format!("q {n}")}),
                )
                .await
            }
            Kind::Gptbots => {
                enqueue_on(
                    pool,
                    "gptbots",
                    "news",
                    serde_json::json!({"topic": format!("t {n}")}),
                )
                .await
            }
        }
    }
}

/// A worker.toml for `kind`: a 2-minute lease, and HTTP calls that outlast
/// any hold a test keeps them in (a minute).
fn write_kind_config(
    sim: &SimServer,
    name: &str,
    grace: &str,
    kind: Kind,
    profile_extra: &str,
) -> std::path::PathBuf {
    write_kind_config_with(sim, name, grace, kind, profile_extra, "120s", "60s")
}

/// [`write_kind_config`] with a `lease` and an HTTP timeout of `timeout`.
fn write_kind_config_with(
    sim: &SimServer,
    name: &str,
    grace: &str,
    kind: Kind,
    profile_extra: &str,
    lease: &str,
    timeout: &str,
) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wfq-shutdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{kind:?}.toml"));
    std::fs::write(
        &path,
        format!(
            "[worker]\nconcurrency = 8\nlease = \"{lease}\"\nfallback_poll = \"200ms\"\nshutdown_grace = \"{grace}\"\n\
             [http]\ntimeout = \"{timeout}\"\n[poll]\ninitial = \"100ms\"\nmax = \"200ms\"\n{}",
            kind.profile(sim, profile_extra)
        ),
    )
    .unwrap();
    path
}

/// A worker process whose log lines (info and up) can be waited for.
fn spawn_logged(
    config: &std::path::Path,
    database_url: &str,
) -> (
    tokio::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["worker", "--config"])
        .arg(config)
        .env("DATABASE_URL", database_url)
        .env("SHUTDOWN_KEY", API_KEY)
        .env("RUST_LOG", "info,sqlx=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stderr = child.stderr.take().unwrap();
    // Read to the end, so a full pipe never blocks the worker.
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Reads log lines until one contains `needle` (true) or the process has
/// closed its stderr, i.e. exited (false).
async fn until_logged(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> bool {
    let found = async {
        while let Some(line) = lines.recv().await {
            if line.contains(needle) {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(60), found)
        .await
        .expect("the worker logs or exits")
}

fn signal_term(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

async fn exit_status(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the worker exits after SIGTERM")
        .unwrap()
}

async fn test_pool(connect: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap()
}

/// SIGTERM while the provider holds a submit (no idempotency key, so the
/// answer is the only record of a run that bills): the answer that comes
/// after the grace period is still recorded before the worker exits, and
/// another worker finishes the run. Exactly one run at the provider.
async fn a_submit_held_at_sigterm_is_recorded_before_the_exit(
    kind: Kind,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = test_pool(connect).await;
    let sim = start_sim(20, 300, 50).await;
    sim.set_faults(Faults {
        hold_submits: true,
        ..Default::default()
    });
    let id = kind.enqueue(&pool, 1).await;
    // The held submit must outlast the hold, the signal, the grace period
    // and the log line that follows it, however slow the machine: a long
    // timeout (the Dify profile's find_window may not be shorter).
    let config = write_kind_config(&sim, "held", "300ms", kind, "");
    let (mut first, mut log) = spawn_logged(&config, &url);
    wait_held(&sim, 1).await;
    signal_term(&first);
    // The grace period is over and the step was given up on: the worker
    // now waits for the submit it sent (an older worker exits here).
    let waiting = until_logged(&mut log, "waiting for submits in flight").await;
    sim.set_faults(Faults::default());
    let status = exit_status(&mut first).await;
    assert!(status.success(), "{status:?}");

    let row = run(&pool, id).await;
    assert_eq!(row.state, "running", "{kind:?}: {row:?}");
    assert!(row.provider_run_id.is_some(), "{row:?}");
    assert!(row.submit_in_doubt_since.is_none(), "not in doubt: {row:?}");
    assert_eq!(leased(&pool).await, 0, "given back at exit");
    assert!(waiting, "the worker exited without waiting for its submit");

    let (mut second, _log) = spawn_logged(&config, &url);
    wait_all_final(&pool, Duration::from_secs(30)).await;
    signal_term(&second);
    assert!(exit_status(&mut second).await.success());
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{kind:?}: {row:?}");
    let runs = provider_runs(&sim, kind.provider());
    assert_eq!(runs.len(), 1, "{kind:?}: exactly one run at the provider");
    assert_one_provider_run(kind.provider(), &row, &runs);
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

/// SIGTERM while runs wait for the profile's rate limit: none of them is
/// submitted once shutdown has begun, even with grace left to wait in.
async fn runs_waiting_for_the_throttle_at_sigterm_are_not_submitted(
    kind: Kind,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = test_pool(connect).await;
    let sim = start_sim(20, 300, 50).await;
    for n in 0..4 {
        kind.enqueue(&pool, n).await;
    }
    // One request every 250 s: the first run goes at once, the next waits
    // 250 s (within a quarter of the 20-minute lease), the rest are
    // deferred. The grace period would let the waiting one through; the
    // signal comes long before its turn, however slow the machine.
    let config = write_kind_config_with(
        &sim,
        "throttled",
        "30s",
        kind,
        "requests_per_second = 0.004",
        "1200s",
        "5s",
    );
    let (mut worker, _log) = spawn_logged(&config, &url);
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.run_events WHERE kind = 'submit_started') = 1 \
         AND (SELECT count(*) FROM wfq.run_events WHERE kind = 'throttled') >= 2 \
         AND EXISTS (SELECT 1 FROM wfq.runs r WHERE r.state = 'queued' AND r.lease_owner IS NOT NULL \
                     AND NOT EXISTS (SELECT 1 FROM wfq.run_events e WHERE e.run_id = r.id))",
        Duration::from_secs(30),
    )
    .await;
    let signalled_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    signal_term(&worker);
    let status = exit_status(&mut worker).await;
    assert!(status.success(), "{status:?}");
    let late: Vec<(i64, String)> = sqlx::query_as(
        "SELECT run_id, kind FROM wfq.run_events \
         WHERE kind IN ('submit_started', 'resubmit_started') AND at > $1",
    )
    .bind(signalled_at)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        late.is_empty(),
        "{kind:?}: submitted after SIGTERM: {late:?}"
    );
    assert_eq!(leased(&pool).await, 0);
    let submitting: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'submitting'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(submitting, 0);
    let runs = provider_runs(&sim, kind.provider());
    assert_eq!(
        runs.len(),
        1,
        "{kind:?}: only the run sent before the signal"
    );
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

/// Issue: SIGTERM while `submitting` is being written, and the write
/// outlasts the grace period (it waits for a row lock this test holds).
/// The worker waits for it before it gives its leases back (it used to
/// count a submit only once `submitting` was written: with none counted,
/// it gave the lease back, the write landed after it, and the run stayed
/// in doubt with nothing sent), and sends nothing once it knows it is
/// stopping: the run is due again, not in doubt, its attempt given back.
/// The next worker submits it once.
async fn a_submitting_write_that_outlasts_the_grace_period_sends_nothing(
    kind: Kind,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let pool = test_pool(connect).await;
    let sim = start_sim(20, 300, 50).await;
    sim.set_faults(Faults {
        hold_submits: true,
        ..Default::default()
    });
    // One submit at a time: the first run's, held, keeps the second run
    // (claimed) from writing `submitting` until the gate opens.
    let config = write_kind_config(
        &sim,
        "slow-write",
        "300ms",
        kind,
        "max_submits_in_flight = 1",
    );
    let first = kind.enqueue(&pool, 1).await;
    let (mut worker, mut log) = spawn_logged(&config, &url);
    wait_held(&sim, 1).await;
    let second = kind.enqueue(&pool, 2).await;
    wait_for(
        &pool,
        &format!("(SELECT lease_owner IS NOT NULL FROM wfq.runs WHERE id = {second})"),
        Duration::from_secs(30),
    )
    .await;
    let blocker = lock_row(&pool, second).await;
    sim.set_faults(Faults::default());
    // The second run's `submitting` write waits for the lock.
    wait_lock_waiters(&pool, 1).await;
    signal_term(&worker);
    // Past the grace period: the worker waits for the write (or, as it
    // used to, gives the leases back, which queues behind the write).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut waited = false;
    while !waited && lock_waiters(&pool).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker neither waited nor gave its leases back"
        );
        while let Ok(line) = log.try_recv() {
            waited |= line.contains("waiting for submits in flight");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    blocker.rollback().await.unwrap();
    let status = exit_status(&mut worker).await;
    assert!(status.success(), "{status:?}");

    let row = run(&pool, second).await;
    assert_eq!(row.state, "queued", "{kind:?}: {row:?}");
    assert!(
        row.submit_in_doubt_since.is_none(),
        "{kind:?}: in doubt with nothing sent: {row:?}"
    );
    assert_eq!(
        (row.attempts, row.lease_owner.as_deref()),
        (0, None),
        "{row:?}"
    );
    let kinds = event_kinds(&pool, second).await;
    assert!(kinds.contains(&"submit_not_sent".to_owned()), "{kinds:?}");
    assert_eq!(
        provider_runs(&sim, kind.provider()).len(),
        1,
        "only the first run was sent"
    );
    assert_eq!(leased(&pool).await, 0);

    let (mut next, _log) = spawn_logged(&config, &url);
    wait_all_final(&pool, Duration::from_secs(30)).await;
    signal_term(&next);
    assert!(exit_status(&mut next).await.success());
    let runs = provider_runs(&sim, kind.provider());
    assert_eq!(runs.len(), 2, "{kind:?}: {runs:?}");
    for id in [first, second] {
        let row = run(&pool, id).await;
        assert_eq!(row.state, "succeeded", "{kind:?}: {row:?}");
        assert_one_provider_run(kind.provider(), &row, &runs);
    }
    let kinds = event_kinds(&pool, second).await;
    assert!(
        !kinds
            .iter()
            .any(|k| k == "submit_outcome_unknown" || k == "submit_not_found_yet"),
        "{kind:?}: {kinds:?}"
    );
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

macro_rules! for_dify_and_gptbots {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            use super::*;

            #[sqlx::test]
            async fn dify(_: PgPoolOptions, connect: PgConnectOptions) {
                super::$body(Kind::Dify, connect).await
            }

            #[sqlx::test]
            async fn gptbots(_: PgPoolOptions, connect: PgConnectOptions) {
                super::$body(Kind::Gptbots, connect).await
            }
        }
    )*};
}

for_dify_and_gptbots!(
    a_submit_held_at_sigterm_is_recorded_before_the_exit,
    runs_waiting_for_the_throttle_at_sigterm_are_not_submitted,
    a_submitting_write_that_outlasts_the_grace_period_sends_nothing,
);
