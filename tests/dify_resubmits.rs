//! Dify has no idempotency key (issue 14): a submit whose answer is lost is
//! looked for by its end user and sent again only when no run shows up
//! within `find_window`, at most `max_resubmits` times. Every test runs
//! against both Dify behaviours: the app-log row written when a run ends
//! (older Dify, the default) and when it starts (`dify_logs_include_running`).

mod common;

use std::process::Command;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::config::{Config, ProviderKind};
use wfq::sim::{Faults, SimServer};

async fn pool(connect: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .connect_with(connect)
        .await
        .expect("test database")
}

/// One Dify profile (app `text`) sent again at most `max_resubmits` times,
/// lost submits looked for for `find_window` (`http.timeout` is as long:
/// the window may not be shorter).
fn dify_config(sim: &SimServer, max_resubmits: u32, find_window: &str) -> Config {
    config(
        sim,
        "w1",
        &format!(
            "\n[providers.dify]\nkind = \"dify\"\nbase_url = \"{}\"\napi_key_env = \"TEST_CHENYU_KEY\"\n\
             find_window = \"{find_window}\"\nmax_run_time = \"1s\"\nmax_resubmits = {max_resubmits}\n\
             [http]\ntimeout = \"{find_window}\"\nconnect_timeout = \"1s\"\n",
            sim.dify_base_url("text")
        ),
    )
}

macro_rules! for_both_log_behaviours {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            use super::*;

            #[sqlx::test]
            async fn logged_when_a_run_ends(_: PgPoolOptions, connect: PgConnectOptions) {
                super::$body(false, pool(connect).await).await
            }

            #[sqlx::test]
            async fn logged_when_a_run_starts(_: PgPoolOptions, connect: PgConnectOptions) {
                super::$body(true, pool(connect).await).await
            }
        }
    )*};
}

for_both_log_behaviours!(
    a_submit_that_never_gets_through_is_sent_at_most_one_plus_max_resubmits_times,
    a_lost_answer_of_a_run_within_the_find_window_is_adopted_not_sent_again,
);

async fn a_submit_that_never_gets_through_is_sent_at_most_one_plus_max_resubmits_times(
    logs_include_running: bool,
    pool: PgPool,
) {
    let sim = start_sim(50, 300, 50).await;
    // Every run request gets a 5xx before a run is created: each one could
    // have been a run, so each is looked for and then, at most twice, resent.
    sim.set_faults(Faults {
        fail_next_submits: 1_000,
        dify_logs_include_running: logs_include_running,
        ..Default::default()
    });
    let id = enqueue_on(&pool, "dify", "text", json!({"query": "never lands"})).await;
    // Each window runs out: a short one. (A request timed out meanwhile is
    // in doubt like the refused ones, and looked for the same way.)
    work_until_idle(&pool, dify_config(&sim, 2, "2s")).await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "failed", "{row:?}");
    assert_eq!(
        row.error_code.as_deref(),
        Some("SUBMIT_OUTCOME_UNKNOWN"),
        "{row:?}"
    );
    assert!(
        row.error_message
            .as_deref()
            .is_some_and(|m| m.contains("max_resubmits")),
        "{row:?}"
    );
    assert!(row.settled_at.is_none(), "the money is not known");
    assert_eq!(
        sim.stats().dify_run_requests,
        3,
        "the first submit and two resubmits, never more"
    );
    let kinds = event_kinds(&pool, id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "resubmit_started").count(),
        2,
        "{kinds:?}"
    );
    let resubmits: i32 = sqlx::query_scalar("SELECT resubmits FROM wfq.runs WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(resubmits, 2);
    assert!(sim.dify_ledger().is_empty(), "no run was ever created");
    sim.shutdown().await;
}

async fn a_lost_answer_of_a_run_within_the_find_window_is_adopted_not_sent_again(
    logs_include_running: bool,
    pool: PgPool,
) {
    // The run takes 0.8 s, within max_run_time (1 s), so well within
    // find_window (30 s, measured from before the submit was sent): listed
    // by the time the window ends however slow the machine.
    let sim = start_sim(50, 800, 50).await;
    sim.set_faults(Faults {
        drop_next_submit_answers: 1,
        dify_logs_include_running: logs_include_running,
        ..Default::default()
    });
    let id = enqueue_on(&pool, "dify", "text", json!({"query": "lost answer"})).await;
    work_until_idle(&pool, dify_config(&sim, 1, "30s")).await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{row:?}");
    assert_eq!(row.attempts, 1, "found again, never sent again");
    let kinds = event_kinds(&pool, id).await;
    assert!(kinds.contains(&"submit_adopted".to_owned()), "{kinds:?}");
    assert!(!kinds.contains(&"resubmit_started".to_owned()), "{kinds:?}");
    assert_eq!(sim.dify_ledger().len(), 1, "exactly one Dify run");
    assert_eq!(sim.stats().dify_run_requests, 1);
    assert_one_provider_run(
        ProviderKind::Dify,
        &row,
        &provider_runs(&sim, ProviderKind::Dify),
    );
    sim.shutdown().await;
}

/// A `find_window` that a run can outlast is refused when the worker
/// starts: on a Dify that logs a run only once it ends, the lost answer of
/// a run still going at the end of the window would be sent a second time.
#[test]
fn a_find_window_not_longer_than_max_run_time_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("wfq-dify-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (find_window, max_run_time, shown) in [("10m", "10m", "10m"), ("5m", "20m", "20m")] {
        let path = dir.join(format!("{find_window}-{max_run_time}.toml"));
        std::fs::write(
            &path,
            format!(
                "[providers.summarize]\nkind = \"dify\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                 api_key_env = \"DIFY_WINDOW_KEY\"\nfind_window = \"{find_window}\"\nmax_run_time = \"{max_run_time}\"\n"
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_wfq"))
            .args(["worker", "--config"])
            .arg(&path)
            .env("DIFY_WINDOW_KEY", "k")
            // Never reached: the configuration is refused first.
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:9/none")
            .env_remove("WFQ_DATABASE_URL")
            .output()
            .expect("wfq runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("providers.summarize.find_window")
                && stderr.contains(&format!("must be longer than max_run_time ({shown})")),
            "{stderr}"
        );
        let _ = std::fs::remove_file(&path);
    }
}
