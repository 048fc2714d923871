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
use wfq::sim::Faults;

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
