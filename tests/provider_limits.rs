//! Providers that push back: an empty balance, refusals about the account,
//! the breaker for codes nobody listed, caps on runs at once, one rate
//! limit for submits and status checks, chenyu's queue place. No run fails
//! for a reason that belongs to the account, and nothing is billed twice.

mod common;

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use serde_json::json;
use wfq::config::{ProviderKind, default_account_refusals};
use wfq::sim::{Faults, SimServer};

const LIMIT: Duration = Duration::from_secs(120);
const AUDIO: &str = "wf_audio_dub_7c21";

async fn pool(connect: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(12)
        .connect_with(connect.clone())
        .await
        .expect("test database")
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

async fn enqueue_many(pool: &PgPool, workflow: &str, inputs: &str, n: i64) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO wfq.runs (workflow_id, inputs) \
         SELECT '{workflow}', {inputs} FROM generate_series(1, $1) g"
    )))
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The money in the database matches the simulator's ledger exactly.
async fn money_matches_the_ledger(pool: &PgPool, sim: &wfq::sim::SimServer) {
    let ledger = sim.ledger();
    let (frozen, final_amount, released): (Decimal, Decimal, Decimal) = sqlx::query_as(
        "SELECT coalesce(sum(frozen_amount), 0), coalesce(sum(final_amount), 0), \
                coalesce(sum(released_amount), 0) FROM wfq.runs",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(frozen, ledger.iter().map(|e| e.frozen).sum::<Decimal>());
    assert_eq!(
        final_amount,
        ledger
            .iter()
            .filter_map(|e| e.final_amount)
            .sum::<Decimal>()
    );
    assert_eq!(
        released,
        ledger.iter().filter_map(|e| e.released).sum::<Decimal>()
    );
    assert!(
        ledger.iter().all(|e| e.charges == 1),
        "charged once per run"
    );
}

/// 1,000 queued runs and a balance that covers 10 (quotes of 0.03): exactly
/// ten are submitted, none fails, the profile pauses for its balance (its
/// reason recorded where operators look) and the rest wait; a top-up is
/// noticed within one probe interval and every run succeeds, the money
/// matching the simulator's ledger.
#[sqlx::test]
async fn an_empty_balance_holds_the_queue_and_a_top_up_releases_it(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    // Settled a minute after the end: while the ten runs are checked below,
    // none has released money back into the balance.
    let sim = start_sim(0, 100, 60_000).await;
    sim.set_balance(Some(d("0.30")));
    enqueue_many(
        &pool,
        TEXT_TO_IMAGE,
        "jsonb_build_object('n3_seed', g)",
        1000,
    )
    .await;
    // Runs wait a minute for their settlement: checked every few seconds,
    // not five times a second, or the thousand of them swamp the machine.
    let worker = start_worker(
        config(
            &sim,
            "w1",
            "account_probe = \"200ms\"\n[poll]\ninitial = \"1s\"\nmax = \"10s\"\njitter = 0.1\n",
        ),
        pool.clone(),
    );
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.provider_pauses WHERE profile = 'chenyu' AND kind = 'balance') \
         AND (SELECT count(*) FROM wfq.runs WHERE provider_run_id IS NOT NULL) = 10",
        LIMIT,
    )
    .await;
    assert_eq!(sim.ledger().len(), 10, "exactly ten were submitted");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'failed'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'queued'"
        )
        .await,
        990
    );
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM wfq.provider_pauses WHERE profile = 'chenyu'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(reason.contains("balance"), "{reason}");
    // The runs a worker looked at say why they wait.
    let held = count(
        &pool,
        "SELECT count(*) FROM wfq.runs WHERE state = 'queued' AND hold_reason LIKE '%balance%'",
    )
    .await;
    assert!(held >= 1, "no queued run names the balance");
    assert!(sim.stats().balance_refusals <= 1, "{:?}", sim.stats());

    sim.top_up(d("100"));
    wait_all_final(&pool, Duration::from_secs(600)).await;
    worker.stop().await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'"
        )
        .await,
        1000
    );
    assert_eq!(sim.ledger().len(), 1000);
    money_matches_the_ledger(&pool, &sim).await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM wfq.provider_pauses").await,
        0,
        "resumed"
    );
    sim.shutdown().await;
}

/// The provider caps runs at once with its own refusal (listed as about the
/// account): the refused runs wait and go as others finish; none fails.
#[sqlx::test]
async fn the_providers_cap_on_runs_at_once_never_fails_a_run(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 300, 50).await;
    sim.set_faults(Faults {
        max_running_runs: Some(3),
        ..Faults::default()
    });
    enqueue_many(&pool, TEXT_TO_IMAGE, "jsonb_build_object('n3_seed', g)", 20).await;
    work_until_idle(&pool, config(&sim, "w1", "account_probe = \"100ms\"")).await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'"
        )
        .await,
        20
    );
    assert!(sim.stats().cap_refusals > 0, "the cap was reached");
    assert!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.run_events WHERE kind = 'account_refused'"
        )
        .await
            > 0
    );
    money_matches_the_ledger(&pool, &sim).await;
    sim.shutdown().await;
}

/// What refuses every submit for the account, and is then lifted.
#[derive(Debug, Clone, Copy)]
enum AccountLimit {
    /// The simulator's cap on runs at once, at 0 (Dify: HTTP 429
    /// `too_many_requests`; GPTBots: HTTP 429 `code: 429001`), then 2.
    Cap,
    /// GPTBots' credits, at 0 (HTTP 200 `code: 403200`), then topped up.
    Credits,
}

/// A Dify profile `dify` (app `text`) and a GPTBots profile `gptbots`
/// (workflow `news`) on `sim`, probed every 100 ms while paused. Dify's
/// profile lists the code its cap on runs at once is refused with beside
/// the defaults (Dify also sends it for a plain rate limit, so it is not a
/// default); GPTBots' lists nothing beyond its defaults (`429001`,
/// `403200`, ...).
fn dify_and_gptbots(sim: &SimServer) -> String {
    let dify_refusals: Vec<String> = default_account_refusals(ProviderKind::Dify)
        .into_iter()
        .chain(["too_many_requests".to_owned()])
        .map(|code| format!("{code:?}"))
        .collect();
    format!(
        r#"
[providers.dify]
kind = "dify"
base_url = "{dify}"
api_key_env = "TEST_CHENYU_KEY"
find_window = "60s"
max_run_time = "1s"
account_probe = "100ms"
account_refusals = [{refusals}]

[providers.gptbots]
kind = "gptbots"
base_url = "{gptbots}"
api_key_env = "TEST_CHENYU_KEY"
account_probe = "100ms"
"#,
        dify = sim.dify_base_url("text"),
        gptbots = sim.gptbots_base_url("news"),
        refusals = dify_refusals.join(", "),
    )
}

/// A refusal for the account (the provider's cap on runs at once, which
/// comes as HTTP 429, or GPTBots' credits) refuses every submit: no run
/// fails, nothing is created at the provider, the profile pauses with the
/// account's reason, the refused runs are back in the queue, and no run is
/// taken for rate-limited. Once the provider allows runs again, every run
/// succeeds, each exactly one run at the provider.
async fn an_account_refusal_pauses_the_profile_and_puts_the_runs_back(
    connect: PgConnectOptions,
    kind: ProviderKind,
    limit: AccountLimit,
) {
    const RUNS: i64 = 6;
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 50).await;
    let (profile, workflow, code, status) = match (kind, limit) {
        (ProviderKind::Dify, AccountLimit::Cap) => ("dify", "text", "too_many_requests", 429),
        (ProviderKind::Gptbots, AccountLimit::Cap) => ("gptbots", "news", "429001", 429),
        (ProviderKind::Gptbots, AccountLimit::Credits) => ("gptbots", "news", "403200", 200),
        other => unreachable!("not a case: {other:?}"),
    };
    match limit {
        AccountLimit::Cap => sim.set_faults(Faults {
            max_running_runs: Some(0),
            ..Faults::default()
        }),
        AccountLimit::Credits => sim.set_balance(Some(d("0"))),
    }
    for n in 0..RUNS {
        let inputs = match kind {
            ProviderKind::Dify => json!({"query": format!("summarise {n}"), "tone": "casual"}),
            _ => json!({"topic": format!("news {n}")}),
        };
        enqueue_on(&pool, profile, workflow, inputs).await;
    }
    let worker = start_worker(config(&sim, "w1", &dify_and_gptbots(&sim)), pool.clone());
    wait_for(
        &pool,
        &format!(
            "EXISTS (SELECT 1 FROM wfq.provider_pauses WHERE profile = '{profile}' AND kind = 'account') \
             AND EXISTS (SELECT 1 FROM wfq.run_events WHERE kind = 'account_refused') \
             AND (SELECT count(*) FROM wfq.runs WHERE state = 'queued') = {RUNS}"
        ),
        LIMIT,
    )
    .await;
    let created = match kind {
        ProviderKind::Dify => sim.dify_ledger().len(),
        _ => sim.gptbots_ledger().len(),
    };
    assert_eq!(created, 0, "nothing was created at the provider");
    let stats = sim.stats();
    match limit {
        AccountLimit::Cap => assert!(stats.cap_refusals > 0, "{stats:?}"),
        AccountLimit::Credits => assert!(stats.balance_refusals > 0, "{stats:?}"),
    }
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'failed'"
        )
        .await,
        0
    );
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM wfq.provider_pauses WHERE profile = $1 AND kind = 'account'",
    )
    .bind(profile)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        reason.contains("refused the account") && reason.contains(code),
        "{reason}"
    );
    let refused: Vec<(Option<String>, Option<i32>)> = sqlx::query_as(
        "SELECT detail->>'code', (detail->>'http_status')::int FROM wfq.run_events \
         WHERE kind = 'account_refused'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        refused
            .iter()
            .all(|r| *r == (Some(code.to_owned()), Some(status))),
        "{refused:?}"
    );
    // The refused runs say why they wait; the attempt was given back.
    assert!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'queued' AND hold_reason LIKE 'paused:%' \
             AND attempts = 0 AND submit_in_doubt_since IS NULL"
        )
        .await
            >= 1
    );

    match limit {
        AccountLimit::Cap => sim.set_faults(Faults {
            max_running_runs: Some(2),
            ..Faults::default()
        }),
        AccountLimit::Credits => {
            sim.top_up(d("100"));
        }
    }
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'"
        )
        .await,
        RUNS
    );
    let runs = provider_runs(&sim, kind);
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM wfq.runs ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    for id in ids {
        assert_one_provider_run(kind, &run(&pool, id).await, &runs);
    }
    assert_eq!(
        runs.values().map(Vec::len).sum::<usize>(),
        RUNS as usize,
        "one run at the provider per run"
    );
    // Never taken for a rate limit or a refused key.
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.run_events \
             WHERE kind IN ('submit_rate_limited', 'submit_unauthorized', 'submit_rejected')"
        )
        .await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM wfq.provider_pauses").await,
        0,
        "resumed"
    );
    sim.shutdown().await;
}

#[sqlx::test]
async fn difys_cap_on_runs_at_once_pauses_the_profile_and_puts_the_runs_back(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    an_account_refusal_pauses_the_profile_and_puts_the_runs_back(
        connect,
        ProviderKind::Dify,
        AccountLimit::Cap,
    )
    .await;
}

#[sqlx::test]
async fn gptbots_cap_on_runs_at_once_pauses_the_profile_and_puts_the_runs_back(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    an_account_refusal_pauses_the_profile_and_puts_the_runs_back(
        connect,
        ProviderKind::Gptbots,
        AccountLimit::Cap,
    )
    .await;
}

#[sqlx::test]
async fn gptbots_credits_running_out_pause_the_profile_and_put_the_runs_back(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    an_account_refusal_pauses_the_profile_and_puts_the_runs_back(
        connect,
        ProviderKind::Gptbots,
        AccountLimit::Credits,
    )
    .await;
}

/// `max_running` keeps a profile within a cap of its own: the provider's
/// cap of the same size never refuses, every run succeeds.
#[sqlx::test]
async fn max_running_keeps_within_the_cap(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 300, 50).await;
    sim.set_faults(Faults {
        max_running_runs: Some(3),
        ..Faults::default()
    });
    enqueue_many(&pool, TEXT_TO_IMAGE, "jsonb_build_object('n3_seed', g)", 20).await;
    work_until_idle(&pool, config(&sim, "w1", "max_running = 3")).await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'"
        )
        .await,
        20
    );
    assert_eq!(sim.stats().cap_refusals, 0, "never over the cap");
    assert!(
        count(&pool, "SELECT count(*) FROM wfq.run_events WHERE kind = 'spend_hold' AND detail->>'reason' LIKE 'max_running:%'").await > 0,
        "runs waited for the cap"
    );
    sim.shutdown().await;
}

/// A refusal code nobody listed, for runs of two workflows: the breaker
/// pauses the profile and puts the runs it failed back; one run per probe
/// is let through, and once the provider takes runs again every run
/// succeeds, each billed once.
#[sqlx::test]
async fn the_breaker_puts_back_runs_that_an_unlisted_account_refusal_failed(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 50).await;
    sim.set_faults(Faults {
        refuse_submits_code: Some("ACCOUNT_ON_HOLD_7".into()),
        ..Faults::default()
    });
    enqueue_many(&pool, TEXT_TO_IMAGE, "jsonb_build_object('n3_seed', g)", 4).await;
    enqueue_many(
        &pool,
        AUDIO,
        "jsonb_build_object('video', 'https://example.com/v' || g || '.mp4')",
        4,
    )
    .await;
    let worker = start_worker(
        config(&sim, "w1", "account_probe = \"200ms\""),
        pool.clone(),
    );
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.provider_pauses WHERE kind = 'breaker') \
         AND EXISTS (SELECT 1 FROM wfq.run_events WHERE kind = 'breaker_requeued') \
         AND NOT EXISTS (SELECT 1 FROM wfq.runs WHERE state = 'failed') \
         AND (SELECT count(*) FROM wfq.runs WHERE state = 'queued') = 8",
        LIMIT,
    )
    .await;
    assert!(sim.ledger().is_empty(), "nothing was accepted");
    // The provider takes runs again: the next probe gets through.
    sim.set_faults(Faults::default());
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'"
        )
        .await,
        8
    );
    assert_eq!(sim.ledger().len(), 8);
    money_matches_the_ledger(&pool, &sim).await;
    sim.shutdown().await;
}

/// Under a rate limit, a backlog of status checks cannot keep new runs from
/// being submitted: 300 runs in flight want status checks far faster than
/// the limit allows (their schedule slips), and five new runs are still
/// submitted in their share. (Served in arrival order, the submits would
/// wait behind a poll backlog that never drains.)
#[sqlx::test]
async fn new_runs_are_submitted_beside_a_backlog_of_status_checks(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 50).await;
    // Runs the provider does not know: every status check is a request
    // (refused as unknown, asked again on the fast test schedule).
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs, state, provider_run_id, submitted_at, sent_inputs) \
         SELECT 'wf_861ef31e94dcfb10e6e7', '{}', 'running', 'wfrun_unknown_' || g, now(), '{}' \
         FROM generate_series(1, 300) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let worker = start_worker(config(&sim, "w1", "requests_per_second = 5"), pool.clone());
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.run_events WHERE kind = 'poll_rejected') >= 20",
        LIMIT,
    )
    .await;
    enqueue_many(&pool, TEXT_TO_IMAGE, "jsonb_build_object('n3_seed', g)", 5).await;
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE provider_run_id NOT LIKE 'wfrun_unknown_%') = 5",
        LIMIT,
    )
    .await;
    worker.stop().await;
    assert_eq!(sim.ledger().len(), 5);
    sim.shutdown().await;
}

/// The reverse: a backlog of 300 runs to submit under a limit of 5 per
/// second does not hold back the status checks of runs already submitted;
/// they get their share while most of the backlog still waits.
#[sqlx::test]
async fn status_checks_go_on_beside_a_backlog_of_submits(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 50).await;
    // Submitted runs the provider does not know: each check is a request.
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs, state, provider_run_id, submitted_at, sent_inputs) \
         SELECT 'wf_861ef31e94dcfb10e6e7', '{}', 'running', 'wfrun_unknown_' || g, now(), '{}' \
         FROM generate_series(1, 5) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    enqueue_many(
        &pool,
        TEXT_TO_IMAGE,
        "jsonb_build_object('n3_seed', g)",
        300,
    )
    .await;
    let worker = start_worker(config(&sim, "w1", "requests_per_second = 5"), pool.clone());
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.run_events WHERE kind = 'poll_rejected') >= 10",
        LIMIT,
    )
    .await;
    worker.stop().await;
    // Served in turn: ten checks came while at most a few dozen runs were
    // submitted (300 submits first would take a minute at this rate).
    let submitted = sim.ledger().len();
    assert!(
        submitted <= 60,
        "{submitted} runs were submitted before ten status checks"
    );
    sim.shutdown().await;
}

/// While a chenyu run waits in the provider's own queue, its place and the
/// provider's estimate of the wait are recorded on the run.
#[sqlx::test]
async fn a_run_queued_at_chenyu_records_its_place(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(&connect).await;
    let sim = start_sim(60_000, 100, 50).await;
    enqueue_many(&pool, TEXT_TO_IMAGE, "jsonb_build_object('n3_seed', g)", 3).await;
    let worker = start_worker(config(&sim, "w1", ""), pool.clone());
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE queue_position IS NOT NULL AND queue_wait_secs IS NOT NULL) = 3",
        LIMIT,
    )
    .await;
    worker.stop().await;
    let places: Vec<i32> =
        sqlx::query_scalar("SELECT queue_position FROM wfq.runs ORDER BY queue_position")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(places, vec![1, 2, 3]);
    sim.shutdown().await;
}

/// A GPTBots profile on `sim` (workflow `news`) with a short account probe:
/// `workflow_id` names the workflow for reading, so runs of `wf_a` and
/// `wf_b` count as two workflows for the breaker.
fn gptbots_profile(sim: &wfq::sim::SimServer) -> String {
    format!(
        "\n[providers.gptbots]\nkind = \"gptbots\"\nbase_url = \"{}\"\napi_key_env = \"TEST_CHENYU_KEY\"\naccount_probe = \"200ms\"\n",
        sim.gptbots_base_url("news")
    )
}

/// A producer bug sends inputs GPTBots refuses (`400001`) to two workflows:
/// the breaker takes the shared code for the account's, pauses and puts the
/// runs back; a valid probe gets through and the profile resumes. The runs
/// put back, refused alike again, fail for good (and do not trip the
/// breaker again): every run ends, the valid ones succeed.
#[sqlx::test]
async fn runs_the_breaker_put_back_fail_for_good_when_refused_alike_after_a_resume(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 20).await;
    for (workflow, n) in [("wf_a", 1), ("wf_b", 2), ("wf_a", 3), ("wf_b", 4)] {
        enqueue_on(
            &pool,
            "gptbots",
            workflow,
            serde_json::json!({"subject": n}),
        )
        .await;
    }
    let worker = start_worker(config(&sim, "w1", &gptbots_profile(&sim)), pool.clone());
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.provider_pauses WHERE profile = 'gptbots' AND kind = 'breaker') \
         AND EXISTS (SELECT 1 FROM wfq.run_events WHERE kind = 'breaker_requeued') \
         AND NOT EXISTS (SELECT 1 FROM wfq.runs WHERE state = 'failed') \
         AND (SELECT count(*) FROM wfq.runs WHERE state = 'queued') = 4",
        LIMIT,
    )
    .await;
    // Valid runs, behind the ones put back: one of them is a probe soon.
    for (workflow, n) in [("wf_a", 5), ("wf_b", 6)] {
        enqueue_on(
            &pool,
            "gptbots",
            workflow,
            serde_json::json!({"topic": format!("t{n}")}),
        )
        .await;
    }
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    let states: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT state, error_code FROM wfq.runs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let failed = (String::from("failed"), Some(String::from("400001")));
    let succeeded = (String::from("succeeded"), None);
    assert_eq!(
        states,
        vec![
            failed.clone(),
            failed.clone(),
            failed.clone(),
            failed,
            succeeded.clone(),
            succeeded
        ]
    );
    assert_eq!(sim.gptbots_ledger().len(), 2);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM wfq.provider_pauses").await,
        0,
        "resumed"
    );
    sim.shutdown().await;
}

/// chenyu refuses a submit for its balance and `balance/info` cannot be
/// read (404: an account without it): the profile pauses for its balance,
/// and its probe lets one run through per interval instead of waiting for
/// a read that never comes; after a top-up that run is accepted, the
/// profile resumes and every run succeeds.
#[sqlx::test]
async fn a_balance_pause_without_a_readable_balance_lets_one_run_through(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 50).await;
    sim.set_balance(Some(d("0.05")));
    sim.set_faults(Faults {
        balance_info_missing: true,
        ..Faults::default()
    });
    enqueue_many(&pool, TEXT_TO_IMAGE, "jsonb_build_object('n3_seed', g)", 3).await;
    let worker = start_worker(
        config(&sim, "w1", "account_probe = \"200ms\""),
        pool.clone(),
    );
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.provider_pauses WHERE profile = 'chenyu' AND kind = 'balance')",
        LIMIT,
    )
    .await;
    assert!(sim.stats().balance_refusals >= 1, "{:?}", sim.stats());
    sim.top_up(d("10"));
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'"
        )
        .await,
        3
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM wfq.provider_pauses").await,
        0
    );
    money_matches_the_ledger(&pool, &sim).await;
    sim.shutdown().await;
}

/// While the profile waits for its balance, a submit refused for the run
/// itself (a code about its inputs, not money) fails the run as usual; it
/// is not put back as if the balance had refused it.
#[sqlx::test]
async fn a_run_refused_for_itself_during_a_balance_pause_fails(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 50).await;
    // One quote of 0.03 fits; the other run finds the balance short and
    // pauses the profile while the first one's submit is held.
    sim.set_balance(Some(d("0.05")));
    sim.set_faults(Faults {
        hold_submits: true,
        ..Faults::default()
    });
    enqueue_many(&pool, TEXT_TO_IMAGE, "jsonb_build_object('n3_seed', g)", 2).await;
    // A probe (which would read the balance and resume) is far off.
    let worker = start_worker(config(&sim, "w1", "account_probe = \"10m\""), pool.clone());
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.provider_pauses WHERE profile = 'chenyu' AND kind = 'balance')",
        LIMIT,
    )
    .await;
    wait_held(&sim, 1).await;
    sim.set_faults(Faults {
        refuse_submits_code: Some("SEED_OUT_OF_RANGE".into()),
        ..Faults::default()
    });
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.runs WHERE state = 'failed') \
         OR EXISTS (SELECT 1 FROM wfq.run_events WHERE kind = 'account_refused')",
        LIMIT,
    )
    .await;
    worker.stop().await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.run_events WHERE kind = 'account_refused'"
        )
        .await,
        0,
        "not put back"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'failed' AND error_code = 'SEED_OUT_OF_RANGE'"
        )
        .await,
        1
    );
    sim.shutdown().await;
}

/// One run whose quote (1.20) exceeds the balance waits by itself while
/// smaller runs (0.03) that the balance covers go on; the profile is not
/// paused for it. After a top-up it goes too.
#[sqlx::test]
async fn a_quote_above_the_balance_holds_its_run_not_the_profile(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 20).await;
    sim.set_balance(Some(d("1.00")));
    let worker = start_worker(
        config(&sim, "w1", "account_probe = \"200ms\""),
        pool.clone(),
    );
    // The profile's usual runs are small.
    enqueue_many(&pool, TEXT_TO_IMAGE, "jsonb_build_object('n3_seed', g)", 1).await;
    wait_all_final(&pool, LIMIT).await;
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs, accept_external_cost_risk) \
         VALUES ('wf_seedance_video_2f0c', '{\"prompt\": \"p\"}', true)",
    )
    .execute(&pool)
    .await
    .unwrap();
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.runs WHERE workflow_id = 'wf_seedance_video_2f0c' \
                 AND state = 'queued' AND hold_reason LIKE 'balance:%')",
        LIMIT,
    )
    .await;
    enqueue_many(
        &pool,
        TEXT_TO_IMAGE,
        "jsonb_build_object('n3_seed', 10 + g)",
        3,
    )
    .await;
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE workflow_id = 'wf_861ef31e94dcfb10e6e7' AND state = 'succeeded') = 4",
        LIMIT,
    )
    .await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE workflow_id = 'wf_seedance_video_2f0c' AND state = 'queued'"
        )
        .await,
        1,
        "the large run still waits"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.provider_pauses WHERE kind = 'balance'"
        )
        .await,
        0,
        "the profile was not paused for it"
    );
    sim.top_up(d("5"));
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'"
        )
        .await,
        5
    );
    money_matches_the_ledger(&pool, &sim).await;
    sim.shutdown().await;
}

/// An operator's manual pause holds from a new worker's first claim: the
/// paused profile's run is not submitted while another profile's run is,
/// and goes once the pause is removed.
#[sqlx::test]
async fn a_manual_pause_holds_from_the_first_claim(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 20).await;
    sqlx::query(
        "INSERT INTO wfq.provider_pauses (profile, worker, kind, reason) \
         VALUES ('gptbots', 'operator', 'manual', 'maintenance')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let paused = enqueue_on(&pool, "gptbots", "news", serde_json::json!({"topic": "t"})).await;
    let other = enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({"n3_seed": 1})).await;
    let worker = start_worker(config(&sim, "w1", &gptbots_profile(&sim)), pool.clone());
    wait_for(
        &pool,
        &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {other})"),
        LIMIT,
    )
    .await;
    let row = run(&pool, paused).await;
    assert_eq!((row.state.as_str(), row.attempts), ("queued", 0), "{row:?}");
    assert!(sim.gptbots_ledger().is_empty(), "nothing was sent");
    sqlx::query("DELETE FROM wfq.provider_pauses WHERE profile = 'gptbots'")
        .execute(&pool)
        .await
        .unwrap();
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    assert_eq!(run(&pool, paused).await.state, "succeeded");
    sim.shutdown().await;
}
