//! Spend guard and rate limits: money limits hold across many worker
//! processes at once; request rates and submits in flight are capped per
//! profile.

mod common;

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::sim::Faults;

const LIMIT: Duration = Duration::from_secs(60);

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

async fn enqueue_many(pool: &PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) \
         SELECT 'wf_861ef31e94dcfb10e6e7', jsonb_build_object('n3_seed', g) FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// Eight workers, each with its own connection pool like separate
/// processes, race for a cap of five runs' worth of frozen money: exactly
/// five are submitted, the rest wait in `queued` with the reason, and the
/// reason is recorded once per run however often it is checked again.
#[sqlx::test]
async fn eight_workers_racing_for_the_last_of_the_money_never_cross_the_cap(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    // Nothing settles during the test, so the outstanding money only grows.
    let sim = start_sim(0, 60_000, 60_000).await;
    enqueue_many(&pool, 40).await;
    let mut workers = Vec::new();
    for n in 0..8 {
        let mut cfg = config(
            &sim,
            &format!("w{n}"),
            "max_outstanding_frozen = \"0.15\"", // 5 x the quote of 0.03
        );
        cfg.worker.budget_recheck = Duration::from_millis(100);
        // Small pools: eight workers (each with its claim loop and liveness
        // session besides) must fit the server's connections with the rest.
        cfg.database.max_connections = 6;
        let small = PgPoolOptions::new()
            .max_connections(6)
            .connect_with(connect.clone())
            .await
            .expect("test database");
        workers.push(start_worker(cfg, small));
    }
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE state = 'queued' AND hold_reason IS NOT NULL) = 35",
        LIMIT,
    )
    .await;
    // Held runs are not checked again on a timer (they would come due every
    // few seconds for the rest of the day, ahead of fresh runs): they wait
    // until money is released, an hour at the most.
    let soonest: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(due_at) - now())::float8 FROM wfq.runs WHERE hold_reason IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(soonest > 1800.0, "held runs due in {soonest} s");
    for worker in workers {
        worker.stop().await;
    }
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 5, "exactly five runs were submitted");
    assert_eq!(ledger.iter().map(|e| e.frozen).sum::<Decimal>(), d("0.15"));
    let (submitted, outstanding): (i64, Decimal) = sqlx::query_as(
        "SELECT count(*), sum(coalesce(frozen_amount, quote_amount)) FROM wfq.runs WHERE state <> 'queued'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((submitted, outstanding), (5, d("0.15")));
    let reason: String = sqlx::query_scalar(
        "SELECT hold_reason FROM wfq.runs WHERE hold_reason IS NOT NULL LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        reason.starts_with("max_outstanding_frozen: 0.15") && reason.contains("exceed 0.15"),
        "{reason}"
    );
    let most_holds: i64 = sqlx::query_scalar(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM wfq.run_events WHERE kind = 'spend_hold' GROUP BY run_id) e",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        most_holds, 1,
        "one audit line per held run, not one per check"
    );
    sim.shutdown().await;
}

/// The day's budget counts money frozen by unsettled runs (and charged by
/// settled ones) on the budget day of the configured zone: three quotes of
/// 0.03 fit into 0.10, the fourth run waits with the reason.
#[sqlx::test]
async fn the_daily_budget_holds_the_run_that_would_cross_it(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 60_000, 60_000).await;
    enqueue_many(&pool, 4).await;
    let mut cfg = config(&sim, "w1", "daily_budget = \"0.10\"");
    cfg.worker.budget_recheck = Duration::from_millis(100);
    cfg.worker.budget_timezone = "Asia/Shanghai".into();
    let worker = start_worker(cfg, pool.clone());
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE state = 'running') = 3 \
         AND EXISTS (SELECT 1 FROM wfq.runs WHERE state = 'queued' AND hold_reason LIKE 'daily_budget: 0.09%')",
        LIMIT,
    )
    .await;
    worker.stop().await;
    assert_eq!(sim.ledger().len(), 3);
    let reason: String =
        sqlx::query_scalar("SELECT hold_reason FROM wfq.runs WHERE state = 'queued'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(reason.contains("would exceed 0.10"), "{reason}");
    sim.shutdown().await;
}

/// A run held by the daily budget waits for the next budget day: it is due
/// at the next midnight in `worker.budget_timezone` (Asia/Shanghai, on the
/// database's clock), not after `worker.budget_recheck`, and it is not
/// claimed before: a run that comes due after a recheck would have is
/// claimed (and held too) while the first one's row stays as it was held.
#[sqlx::test]
async fn a_run_held_by_the_daily_budget_is_due_at_the_next_midnight_of_the_budget_zone(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    // Nothing settles during the test: the day's budget stays used up.
    let sim = start_sim(0, 60_000, 60_000).await;
    enqueue_many(&pool, 4).await;
    let mut cfg = config(&sim, "w1", "daily_budget = \"0.10\"");
    cfg.worker.budget_recheck = Duration::from_millis(100);
    cfg.worker.budget_timezone = "Asia/Shanghai".into();
    let worker = start_worker(cfg, pool.clone());
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.runs WHERE state = 'queued' AND hold_reason LIKE 'daily_budget:%')",
        LIMIT,
    )
    .await;
    type Held = (
        i64,
        i64,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    );
    // The next midnight in Shanghai after the hold, by the database.
    let (held, version, due_at, next_midnight, held_at): Held = sqlx::query_as(
        "SELECT r.id, r.version, r.due_at, \
                (date_trunc('day', e.at AT TIME ZONE 'Asia/Shanghai') + interval '1 day') \
                    AT TIME ZONE 'Asia/Shanghai', \
                e.at \
         FROM wfq.runs r JOIN wfq.run_events e ON e.run_id = r.id AND e.kind = 'spend_hold' \
         WHERE r.state = 'queued' AND r.hold_reason LIKE 'daily_budget:%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        due_at, next_midnight,
        "held at {held_at}: due at the next budget day"
    );
    let shanghai_midnight_in_utc = due_at.format("%H:%M:%S%.f").to_string();
    assert_eq!(shanghai_midnight_in_utc, "16:00:00", "{due_at}");

    // A run due 0.5 s from now (5 rechecks of the held run, were it due
    // again after each) is claimed, and held by the same budget.
    let probe: i64 = sqlx::query_scalar(
        "INSERT INTO wfq.runs (workflow_id, inputs, due_at) \
         VALUES ('wf_861ef31e94dcfb10e6e7', '{\"n3_seed\": 99}', now() + interval '500 milliseconds') \
         RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    wait_for(
        &pool,
        &format!("(SELECT hold_reason LIKE 'daily_budget:%' FROM wfq.runs WHERE id = {probe})"),
        LIMIT,
    )
    .await;
    // Claims take due runs oldest due first: had the held run been due
    // again before the probe, a claim would have taken it (a new version).
    let (version_now, due_now, holds): (i64, chrono::DateTime<chrono::Utc>, i64) = sqlx::query_as(
        "SELECT version, due_at, \
                (SELECT count(*) FROM wfq.run_events WHERE run_id = r.id AND kind = 'spend_hold') \
         FROM wfq.runs r WHERE id = $1",
    )
    .bind(held)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (version_now, due_now, holds),
        (version, due_at, 1),
        "the held run was not claimed again"
    );
    worker.stop().await;
    assert_eq!(sim.ledger().len(), 3, "the held runs were not submitted");
    sim.shutdown().await;
}

/// A worker refuses to start with a budget day in a zone nobody knows.
#[sqlx::test]
async fn an_unknown_budget_timezone_stops_the_worker_at_start(pool: PgPool) {
    let sim = start_sim(0, 100, 50).await;
    let mut cfg = config(&sim, "w1", "daily_budget = \"1\"");
    cfg.worker.budget_timezone = "Mars/Olympus_Mons".into();
    let err = wfq::runtime::run_worker(&cfg, pool, async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Mars/Olympus_Mons"), "{err}");
    sim.shutdown().await;
}

/// More runs than the profile's request rate lets through within a lease
/// are deferred (recorded as `throttled`), none fails, all finish.
#[sqlx::test]
async fn a_request_rate_defers_runs_instead_of_failing_them(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 50, 20).await;
    enqueue_many(&pool, 20).await;
    // A short lease: a step waits for a token at most a quarter of it, so
    // the first claim's 16 submits are more than 5/s lets through in time.
    let mut cfg = config(&sim, "w1", "requests_per_second = 5.0");
    cfg.worker.lease = Duration::from_secs(3);
    let worker = start_worker(cfg, pool.clone());
    // About 15 s of rate-bound work.
    wait_all_final(&pool, Duration::from_secs(90)).await;
    worker.stop().await;
    let (succeeded, throttled): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'), \
                (SELECT count(*) FROM wfq.run_events WHERE kind = 'throttled')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(succeeded, 20);
    assert!(
        throttled > 0,
        "20 runs at once exceed 5 requests/s within a lease"
    );
    assert!(sim.ledger().iter().all(|e| e.charges == 1));
    sim.shutdown().await;
}

/// At most `max_submits_in_flight` submits of a profile are on the wire at
/// once: no three of the submit windows (from `submit_started` to its
/// answer, both recorded while the slot is held) overlap.
#[sqlx::test]
async fn submits_in_flight_are_capped(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 50, 20).await;
    sim.set_faults(Faults {
        latency: Duration::from_millis(150),
        ..Default::default()
    });
    enqueue_many(&pool, 8).await;
    work_until_idle(&pool, config(&sim, "w1", "max_submits_in_flight = 2")).await;
    let most_at_once: i64 = sqlx::query_scalar(
        r#"
        WITH windows AS (
            SELECT s.run_id, s.at AS started,
                   (SELECT min(a.at) FROM wfq.run_events a
                    WHERE a.run_id = s.run_id AND a.id > s.id AND a.kind LIKE 'submit_%') AS answered
            FROM wfq.run_events s WHERE s.kind = 'submit_started'
        )
        SELECT max((SELECT count(*) FROM windows o WHERE o.started <= w.started AND o.answered > w.started))
        FROM windows w
        "#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        most_at_once <= 2,
        "{most_at_once} submits in flight at once"
    );
    assert!(most_at_once >= 1);
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(succeeded, 8);
    sim.shutdown().await;
}

/// A run whose quote alone exceeds a limit could wait for ever: it fails
/// `QUOTE_ABOVE_LIMIT` without being submitted.
#[sqlx::test]
async fn a_quote_above_the_limit_fails_instead_of_waiting_for_ever(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 50).await;
    enqueue_many(&pool, 1).await;
    work_until_idle(
        &pool,
        config(&sim, "w1", "max_outstanding_frozen = \"0.01\""),
    )
    .await;
    let (state, code, settled): (String, Option<String>, bool) =
        sqlx::query_as("SELECT state, error_code, settled_at IS NOT NULL FROM wfq.runs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), code.as_deref(), settled),
        ("failed", Some("QUOTE_ABOVE_LIMIT"), true)
    );
    assert!(sim.ledger().is_empty(), "nothing was submitted");
    sim.shutdown().await;
}

/// A submit slot is held for the submit request only: Dify runs followed on
/// their stream still run side by side with one slot (all three streams are
/// held open at once before any of them may end).
#[sqlx::test]
async fn a_submit_slot_is_not_held_for_a_whole_dify_run(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 200, 20).await;
    sim.set_faults(Faults {
        hold_streams: true,
        ..Default::default()
    });
    for n in 0..3 {
        enqueue_on(
            &pool,
            "dify",
            "text",
            serde_json::json!({"query": format!("q{n}")}),
        )
        .await;
    }
    let extra = other_providers(&sim).replace(
        "[providers.dify]\nkind = \"dify\"",
        "[providers.dify]\nkind = \"dify\"\nmax_submits_in_flight = 1",
    );
    assert!(extra.contains("max_submits_in_flight = 1"));
    let worker = start_worker(config(&sim, "w1", &extra), pool.clone());
    wait_held(&sim, 3).await;
    wait_for(
        &pool,
        "(SELECT count(*) FROM wfq.runs WHERE state = 'running' AND submitted_at IS NOT NULL) = 3",
        LIMIT,
    )
    .await;
    sim.set_faults(Faults::default());
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    let (succeeded, most_at_once): (i64, i64) = sqlx::query_as(
        r#"
        SELECT (SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'),
               (SELECT max((SELECT count(*) FROM wfq.runs o
                            WHERE o.submitted_at <= r.submitted_at AND o.finished_at > r.submitted_at))
                FROM wfq.runs r)
        "#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(succeeded, 3);
    assert_eq!(most_at_once, 3, "runs overlapped");
    sim.shutdown().await;
}

/// Dify runs followed on their streams give their `concurrency` slot back
/// and hold one of `worker.max_streams` instead: with every stream slot
/// taken by runs whose streams stay open (as many as the worker has
/// slots), chenyu runs are still submitted and checked to their end, and
/// Dify runs accepted beyond the stream budget are followed by status
/// checks; once the streams go on, every Dify run succeeds, billed once.
#[sqlx::test]
async fn dify_streams_leave_slots_for_other_runs_and_overflow_to_status_checks(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    const SLOTS: usize = 4;
    const DIFY: usize = 6;
    const CHENYU: usize = 6;
    let pool = pool(&connect).await;
    let sim = start_sim(50, 500, 50).await;
    sim.set_faults(Faults {
        hold_streams: true,
        ..Faults::default()
    });
    let mut dify = Vec::new();
    for n in 0..DIFY {
        dify.push(enqueue_dify(&pool, "dify", n as u32).await);
    }
    let mut cfg = config(&sim, "w1", &other_providers(&sim));
    cfg.worker.concurrency = SLOTS;
    cfg.worker.claim_batch = SLOTS;
    cfg.worker.max_streams = SLOTS;
    let worker = start_worker(cfg, pool.clone());
    // Every stream slot is taken by a stream kept open.
    wait_held(&sim, SLOTS as u64).await;
    let mut chenyu = Vec::new();
    for seed in 0..CHENYU {
        chenyu.push(enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({"n3_seed": seed})).await);
    }
    let checked = "(SELECT count(DISTINCT r.id) FROM wfq.runs r JOIN wfq.run_events e ON e.run_id = r.id \
                    WHERE r.provider = 'dify' AND e.kind IN ('polled', 'poll_unclear'))";
    wait_for(
        &pool,
        &format!(
            "(SELECT count(*) FROM wfq.runs WHERE provider = 'chenyu' AND state = 'succeeded') = {CHENYU} \
             AND {checked} = {}",
            DIFY - SLOTS
        ),
        LIMIT,
    )
    .await;
    // Meanwhile the streamed runs are still running, on their streams (no
    // status check), which the simulator still holds.
    let (streamed, checked_now): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM wfq.runs r WHERE provider = 'dify' AND state = 'running' \
                   AND lease_owner = 'w1' AND NOT EXISTS (SELECT 1 FROM wfq.run_events e \
                       WHERE e.run_id = r.id AND e.kind IN ('polled', 'poll_unclear'))), \
                {checked}"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (streamed, checked_now),
        (SLOTS as i64, (DIFY - SLOTS) as i64),
        "streams kept open, the rest followed by status checks"
    );
    assert!(sim.stats().held_requests >= SLOTS as u64);
    sim.set_faults(Faults::default());
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    let dify_runs = provider_runs(&sim, wfq::config::ProviderKind::Dify);
    assert_eq!(dify_runs.len(), DIFY);
    for id in &dify {
        let row = run(&pool, *id).await;
        assert_eq!(row.state, "succeeded", "{row:?}");
        assert_one_provider_run(wfq::config::ProviderKind::Dify, &row, &dify_runs);
    }
    let chenyu_runs = provider_runs(&sim, wfq::config::ProviderKind::Chenyu);
    for id in &chenyu {
        let row = run(&pool, *id).await;
        assert_eq!(row.state, "succeeded", "{row:?}");
        assert_one_provider_run(wfq::config::ProviderKind::Chenyu, &row, &chenyu_runs);
    }
    sim.shutdown().await;
}

/// A run put back in the queue after its quote was recorded (here: the
/// provider's cap on runs at once refused it) is checked against the daily
/// budget with that quote when it is tried again, not as a run without
/// one: with 0.99 of 1.00 committed by then, its 0.03 would cross the
/// budget, and it waits instead of ending the day at 1.02.
#[sqlx::test]
async fn a_run_put_back_in_the_queue_is_checked_with_its_recorded_quote(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    // Nothing finishes during the test: the first run keeps its place.
    let sim = start_sim(0, 60_000, 60_000).await;
    sim.set_faults(Faults {
        max_running_runs: Some(1),
        ..Faults::default()
    });
    enqueue_many(&pool, 2).await;
    let mut cfg = config(
        &sim,
        "w1",
        "daily_budget = \"1.00\"\naccount_probe = \"200ms\"",
    );
    cfg.worker.budget_recheck = Duration::from_millis(100);
    let worker = start_worker(cfg, pool.clone());
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.run_events e JOIN wfq.runs r ON r.id = e.run_id \
                 WHERE e.kind = 'account_refused' AND r.state = 'queued' \
                   AND r.quote_amount = 0.03 AND r.sent_inputs IS NOT NULL)",
        LIMIT,
    )
    .await;
    // Meanwhile the day's spending reached 0.96 (+ 0.03 frozen by the run
    // at the provider = 0.99), and the provider takes runs again.
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs, state, submitted_at, finished_at, settled_at, \
                               currency, frozen_amount, final_amount, released_amount) \
         VALUES ('wf_861ef31e94dcfb10e6e7', '{}', 'succeeded', now(), now(), now(), 'CNY', 0.96, 0.96, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sim.set_faults(Faults::default());
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.runs WHERE state = 'queued' AND hold_reason LIKE 'daily_budget:%') \
         OR (SELECT count(*) FROM wfq.runs WHERE provider_run_id IS NOT NULL) = 2",
        LIMIT,
    )
    .await;
    worker.stop().await;
    assert_eq!(sim.ledger().len(), 1, "the put-back run was not submitted");
    let reason: String =
        sqlx::query_scalar("SELECT hold_reason FROM wfq.runs WHERE state = 'queued'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        reason.starts_with("daily_budget: 0.99") && reason.contains("this run's quote 0.03"),
        "{reason}"
    );
    sim.shutdown().await;
}

/// Enqueues a Dify run of profile `dify` (app `text`).
async fn enqueue_dify(pool: &PgPool, provider: &str, n: u32) -> i64 {
    enqueue_on(
        pool,
        provider,
        "text",
        serde_json::json!({"query": format!("q{n}")}),
    )
    .await
}

/// A Dify run whose price can never be known (its nodes are priced in two
/// currencies) is final with its money unknown, not settled at nothing;
/// with no settled run of the workflow to estimate it by and no
/// `unknown_cost`, the profile's next run waits under the daily budget
/// until an operator settles the unknown one by hand.
#[sqlx::test]
async fn unknown_money_with_nothing_to_estimate_it_holds_the_budget(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 20).await;
    sim.set_faults(Faults {
        dify_start_node_currency: Some("EUR".into()),
        ..Faults::default()
    });
    let extra = other_providers(&sim).replace(
        "[providers.dify]\nkind = \"dify\"",
        "[providers.dify]\nkind = \"dify\"\ndaily_budget = \"100\"",
    );
    let mut cfg = config(&sim, "w1", &extra);
    cfg.worker.budget_recheck = Duration::from_millis(100);
    let worker = start_worker(cfg, pool.clone());
    let first = enqueue_dify(&pool, "dify", 1).await;
    wait_for(
        &pool,
        &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {first})"),
        LIMIT,
    )
    .await;
    let row = run(&pool, first).await;
    assert!(row.settled_at.is_none(), "unknown money is not settled");
    assert_eq!(row.final_amount, None);
    assert_eq!(row.settlement_status.as_deref(), Some("unknown"));
    let estimate: Option<Decimal> =
        sqlx::query_scalar("SELECT cost_estimate FROM wfq.runs WHERE id = $1")
            .bind(first)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(estimate, None, "no settled run of the workflow to go by");

    let second = enqueue_dify(&pool, "dify", 2).await;
    wait_for(
        &pool,
        &format!(
            "(SELECT hold_reason LIKE 'unknown_cost:%' OR state <> 'queued' FROM wfq.runs WHERE id = {second})"
        ),
        LIMIT,
    )
    .await;
    let held = run(&pool, second).await;
    assert_eq!(held.state, "queued", "{held:?}");
    assert_eq!(sim.dify_ledger().len(), 1, "the second run was not sent");

    // The operator learns what it cost and settles it: the budget can be
    // told again, and the held run goes.
    sqlx::query("UPDATE wfq.runs SET final_amount = 0.01, settled_at = now() WHERE id = $1")
        .bind(first)
        .execute(&pool)
        .await
        .unwrap();
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    assert_eq!(run(&pool, second).await.state, "succeeded");
    sim.shutdown().await;
}

/// Unknown money is counted by an estimate, never as nothing: the highest
/// cost of the workflow's settled runs lately, else the profile's
/// `unknown_cost`, which counts against the daily budget.
#[sqlx::test]
async fn unknown_money_is_counted_by_the_workflows_cost_or_the_profiles_unknown_cost(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 100, 20).await;
    let extra = other_providers(&sim)
        .replace(
            "[providers.dify]\nkind = \"dify\"",
            "[providers.dify]\nkind = \"dify\"\ndaily_budget = \"100\"",
        )
        .replace(
            "[providers.dify_fails]\nkind = \"dify\"",
            "[providers.dify_fails]\nkind = \"dify\"\ndaily_budget = \"0.75\"\nunknown_cost = \"0.50\"",
        );
    let mut cfg = config(&sim, "w1", &extra);
    cfg.worker.budget_recheck = Duration::from_millis(100);
    let worker = start_worker(cfg, pool.clone());

    // A run whose price is known, then one whose price is not.
    let known = enqueue_dify(&pool, "dify", 1).await;
    wait_for(
        &pool,
        &format!("(SELECT settled_at IS NOT NULL FROM wfq.runs WHERE id = {known})"),
        LIMIT,
    )
    .await;
    sim.set_faults(Faults {
        dify_start_node_currency: Some("EUR".into()),
        ..Faults::default()
    });
    let unknown = enqueue_dify(&pool, "dify", 2).await;
    wait_for(
        &pool,
        &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {unknown})"),
        LIMIT,
    )
    .await;
    let (price, estimate): (Option<Decimal>, Option<Decimal>) = sqlx::query_as(
        "SELECT (SELECT final_amount FROM wfq.runs WHERE id = $1), \
                (SELECT cost_estimate FROM wfq.runs WHERE id = $2)",
    )
    .bind(known)
    .bind(unknown)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(price.is_some_and(|p| p > Decimal::ZERO), "{price:?}");
    assert_eq!(estimate, price, "the workflow's highest known cost");
    // Estimated, so the profile goes on.
    let next = enqueue_dify(&pool, "dify", 3).await;
    wait_for(
        &pool,
        &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {next})"),
        LIMIT,
    )
    .await;

    // No history for this one: `unknown_cost` (0.50) counts per run of
    // unknown cost. Two fit a budget of 0.75 (an unquoted run passes while
    // the budget is not used up); the third waits for the next day.
    for n in 0..3 {
        enqueue_on(
            &pool,
            "dify_fails",
            "fails",
            serde_json::json!({"query": format!("f{n}")}),
        )
        .await;
        if n < 2 {
            wait_for(
                &pool,
                "(SELECT count(*) FROM wfq.runs WHERE provider = 'dify_fails' AND state = 'failed') = (SELECT count(*) FROM wfq.runs WHERE provider = 'dify_fails')",
                LIMIT,
            )
            .await;
        }
    }
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.runs WHERE provider = 'dify_fails' AND state = 'queued' \
                 AND hold_reason LIKE 'daily_budget: 1.00 committed today%')",
        LIMIT,
    )
    .await;
    worker.stop().await;
    let unsettled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wfq.runs WHERE provider = 'dify_fails' AND state = 'failed' \
         AND settled_at IS NULL AND cost_estimate IS NULL AND final_amount IS NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(unsettled, 2);
    sim.shutdown().await;
}

/// A burst of finished runs wakes as many runs held by `max_running` as
/// it freed places, in one statement, not a fixed handful (the rest would
/// wait for the hour's backstop while fresh runs took the room).
#[sqlx::test]
async fn a_burst_of_finished_runs_wakes_as_many_held_runs(pool: PgPool) {
    let finished: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO wfq.runs (workflow_id, inputs, state, submitted_at, finished_at, settled_at) \
         SELECT 'wf_861ef31e94dcfb10e6e7', '{}', 'succeeded', now(), now(), now() \
         FROM generate_series(1, 20) RETURNING id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs, hold_reason, due_at) \
         SELECT 'wf_861ef31e94dcfb10e6e7', '{}', 'max_running: 20 runs submitted and not finished', \
                now() + interval '1 hour' + g * interval '1 second' \
         FROM generate_series(1, 30) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let woken = wfq::store::wake_held_runs(&pool, &finished).await.unwrap();
    assert_eq!(woken, 20, "one per place freed");
    let due: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wfq.runs WHERE state = 'queued' AND due_at <= now()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(due, 20);
}

/// `wfq.daily_costs` counts the spend guard's days (midnight to midnight in
/// `worker.budget_timezone`, stored by the worker), whatever the reading
/// session's time zone: a run submitted at 23:30 UTC on 1 January counts
/// on 2 January in Tokyo.
#[sqlx::test]
async fn daily_costs_counts_the_budget_days_of_the_workers_zone(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    let sim = start_sim(0, 50, 20).await;
    enqueue_many(&pool, 1).await;
    let mut cfg = config(&sim, "w1", "daily_budget = \"10\"");
    cfg.worker.budget_timezone = "Asia/Tokyo".into();
    work_until_idle(&pool, cfg).await;
    sqlx::query("UPDATE wfq.runs SET submitted_at = '2026-01-01 23:30:00+00'")
        .execute(&pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET TIME ZONE 'UTC'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (day, date, zone, runs): (chrono::DateTime<chrono::Utc>, String, String, i64) =
        sqlx::query_as("SELECT day, budget_date::text, budget_timezone, runs FROM wfq.daily_costs")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    sqlx::query("RESET TIME ZONE")
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        day.to_rfc3339(),
        "2026-01-01T15:00:00+00:00",
        "midnight in Tokyo"
    );
    assert_eq!(
        (date.as_str(), zone.as_str(), runs),
        ("2026-01-02", "Asia/Tokyo", 1)
    );
    sim.shutdown().await;
}
