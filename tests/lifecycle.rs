//! End-to-end lifecycle tests: real PostgreSQL (one database per test), the
//! simulator on loopback, the real worker.

mod common;

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::sim::Faults;
use wfq::store::{self, NewRun, RequestError};

async fn pool(connect: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(24)
        .connect_with(connect)
        .await
        .expect("test database")
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

const LIMIT: Duration = Duration::from_secs(30);

#[sqlx::test]
async fn happy_path_records_outputs_and_exact_amounts(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(connect).await;
    let sim = start_sim(50, 200, 100).await;
    let id = enqueue(
        &pool,
        TEXT_TO_IMAGE,
        json!({"n6_text": "a glass bottle", "n3_seed": 42}),
    )
    .await;
    work_until_idle(&pool, config(&sim, "w1", "")).await;

    let run = run(&pool, id).await;
    assert_eq!(run.state, "succeeded", "{run:?}");
    assert_eq!(run.attempts, 1);
    assert_eq!(
        run.revision_id.as_deref(),
        Some("wfr_f9f2a2dcb99d73b0c3aa"),
        "published revision pinned"
    );
    // The manifest's default for the key the producer left out was sent.
    let sent = run.sent_inputs.clone().unwrap();
    assert_eq!(sent["n6_text"], "a glass bottle");
    assert_eq!(sent["n3_seed"], 42);
    assert_eq!(sent["n7_text"], "text, watermark");
    assert!(
        run.outputs.as_ref().unwrap()["n9_images"].is_string(),
        "{:?}",
        run.outputs
    );
    assert!(run.finished_at.is_some());

    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 1);
    let entry = &ledger[0];
    assert_eq!(
        run.provider_run_id.as_deref(),
        Some(entry.run_order_id.as_str())
    );
    assert_eq!(run.quote_amount, Some(d("0.03")));
    assert_eq!(run.frozen_amount, Some(entry.frozen));
    assert_eq!(run.final_amount, entry.final_amount);
    assert_eq!(run.released_amount, entry.released);
    assert_eq!(
        run.final_amount.unwrap() + run.released_amount.unwrap(),
        run.frozen_amount.unwrap(),
        "final + released = frozen, to the last decimal"
    );
    assert_eq!(run.total_cost, run.final_amount);

    let kinds = event_kinds(&pool, id).await;
    assert_eq!(kinds.first().map(String::as_str), Some("submit_started"));
    assert_eq!(kinds.get(1).map(String::as_str), Some("submit_accepted"));
    assert_eq!(kinds.last().map(String::as_str), Some("run_finished"));
    let settled_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT settled_at FROM wfq.runs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(settled_at.is_some());
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_lost_submit_answer_is_replayed_without_a_second_charge(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    sim.set_faults(Faults {
        drop_next_submit_answers: 1,
        ..Default::default()
    });
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "lost answer"})).await;
    work_until_idle(&pool, config(&sim, "w1", "")).await;

    let run = run(&pool, id).await;
    assert_eq!(run.state, "succeeded", "{run:?}");
    assert_eq!(
        run.attempts, 2,
        "the answer was lost once, so the submit was sent twice"
    );
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 1, "one run at the provider: {ledger:?}");
    assert_eq!(ledger[0].charges, 1, "charged once");
    assert_eq!(
        ledger[0].submit_requests, 2,
        "the second submit was a replay"
    );
    assert_eq!(ledger[0].idempotency_key, run.idempotency_key);
    assert_eq!(sim.stats().replays, 1);
    assert_eq!(run.frozen_amount, Some(ledger[0].frozen));
    let kinds = event_kinds(&pool, id).await;
    assert!(kinds.contains(&"submit_unclear".to_owned()), "{kinds:?}");
    sim.shutdown().await;
}

#[sqlx::test]
async fn invalid_inputs_are_rejected_before_any_submit(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    let cases = [
        (
            TEXT_TO_IMAGE,
            json!({"n6_txt": "typo"}),
            "INVALID_INPUT",
            "inputs.n6_txt: unknown key; the workflow accepts: n6_text, n7_text, n3_seed",
        ),
        (
            TEXT_TO_IMAGE,
            json!({"n3_seed": "42"}),
            "INVALID_INPUT",
            "inputs.n3_seed: expected an integer",
        ),
        (
            TEXT_TO_IMAGE,
            json!({"n6_text": 7}),
            "INVALID_INPUT",
            "inputs.n6_text: expected a string",
        ),
        (
            VIDEO,
            json!({"image": "https://x/y.png"}),
            "INVALID_INPUT",
            "inputs.prompt: required and missing",
        ),
        (
            VIDEO,
            json!({"prompt": "p", "image": "file:///etc/passwd"}),
            "INVALID_INPUT",
            "inputs.image: expected image",
        ),
        (
            VIDEO,
            json!({"prompt": "p", "watermark": "no"}),
            "INVALID_INPUT",
            "inputs.watermark: expected true or false",
        ),
        (
            ALWAYS_FAILS,
            json!({"prompt": "p", "extra": 1}),
            "INVALID_INPUT",
            "inputs.extra: unknown key",
        ),
        (
            "wf_does_not_exist",
            json!({}),
            "UNKNOWN_WORKFLOW",
            "workflow_id: `wf_does_not_exist`",
        ),
    ];
    let mut ids = Vec::new();
    for (workflow, inputs, _, _) in &cases {
        ids.push(enqueue(&pool, workflow, inputs.clone()).await);
    }
    // The video workflow may bill an external model; without consent it is not sent.
    let no_consent = enqueue(&pool, VIDEO, json!({"prompt": "p"})).await;
    let unknown_profile = store::enqueue_run(
        &pool,
        &NewRun {
            provider: Some("chenyu_eu".into()),
            workflow_id: TEXT_TO_IMAGE.into(),
            inputs: json!({}),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A good run in the same batch still succeeds.
    let good = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;

    let mut cfg = config(&sim, "w1", "");
    cfg.worker.concurrency = 4;
    work_until_idle(&pool, cfg).await;

    for (id, (_, inputs, code, message)) in ids.iter().zip(&cases) {
        let run = run(&pool, *id).await;
        assert_eq!(run.state, "failed", "{inputs}");
        assert_eq!(run.error_code.as_deref(), Some(*code), "{inputs}");
        let got = run.error_message.unwrap();
        assert!(got.starts_with(message), "{inputs}: {got}");
        assert_eq!(run.attempts, 0, "never submitted: {inputs}");
        assert!(run.provider_run_id.is_none());
    }
    let r = run(&pool, no_consent).await;
    assert_eq!(r.error_code.as_deref(), Some("EXTERNAL_COST_NOT_ACCEPTED"));
    assert!(
        r.error_message
            .unwrap()
            .starts_with("accept_external_cost_risk:")
    );
    let r = run(&pool, unknown_profile).await;
    assert_eq!(r.error_code.as_deref(), Some("UNKNOWN_PROVIDER"));
    assert!(r.error_message.unwrap().contains("`chenyu_eu`"));
    assert_eq!(run(&pool, good).await.state, "succeeded");

    assert_eq!(
        sim.stats().submit_requests,
        1,
        "only the good run was submitted"
    );
    assert_eq!(sim.ledger().len(), 1);
    sim.shutdown().await;
}

#[sqlx::test]
async fn database_constraints_refuse_rows_that_can_never_run(pool: PgPool) {
    let refused = [
        (
            "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('', '{}')",
            "runs_workflow_id_not_empty",
        ),
        (
            "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('wf', '[1]')",
            "runs_inputs_is_object",
        ),
        (
            "INSERT INTO wfq.runs (workflow_id, priority) VALUES ('wf', 5000)",
            "runs_priority_range",
        ),
        (
            "INSERT INTO wfq.runs (workflow_id, idempotency_key) VALUES ('wf', '')",
            "runs_idempotency_key_length",
        ),
        (
            "INSERT INTO wfq.runs (provider, workflow_id) VALUES (' ', 'wf')",
            "runs_provider_not_empty",
        ),
    ];
    for (sql, constraint) in refused {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert!(err.to_string().contains(constraint), "{sql}: {err}");
    }
    sqlx::query("INSERT INTO wfq.runs (workflow_id, idempotency_key) VALUES ('wf', 'k1')")
        .execute(&pool)
        .await
        .unwrap();
    let dup =
        sqlx::query("INSERT INTO wfq.runs (workflow_id, idempotency_key) VALUES ('wf', 'k1')")
            .execute(&pool)
            .await
            .expect_err("same key twice");
    assert!(
        dup.to_string().contains("runs_idempotency_key_unique"),
        "{dup}"
    );
}

#[sqlx::test]
async fn a_provider_rejection_fails_the_run_without_retrying(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    // Passes wfq's own check (a well-formed asset URI) but the provider does
    // not know the asset.
    let id = store::enqueue_run(
        &pool,
        &NewRun {
            workflow_id: VIDEO.into(),
            inputs: json!({"prompt": "p", "image": "asset://elsewhere/missing"}),
            accept_external_cost_risk: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    work_until_idle(&pool, config(&sim, "w1", "")).await;

    let run = run(&pool, id).await;
    assert_eq!(run.state, "failed");
    assert_eq!(run.error_code.as_deref(), Some("INVALID_WORKFLOW_INPUT"));
    assert!(
        run.error_message.as_deref().unwrap().contains("image"),
        "{:?}",
        run.error_message
    );
    assert_eq!(run.attempts, 1, "a rejection is not retried");
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT error_detail FROM wfq.runs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(detail["engine_code"], "INVALID_WORKFLOW_INPUT");
    assert!(sim.ledger().is_empty(), "nothing frozen");
    sim.shutdown().await;
}

#[sqlx::test]
async fn server_errors_and_rate_limits_are_retried_on_the_stored_schedule(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    sim.set_faults(Faults {
        fail_next_submits: 1,
        rate_limit_next_submits: 1,
        retry_after_secs: Some(1),
        fail_next_polls: 1,
        ..Default::default()
    });
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    // Retry-After is honoured up to the schedule's cap, here 2 s.
    let capped = "[submit]\ninitial = \"100ms\"\nmax = \"2s\"\nmax_attempts = 6\n";
    work_until_idle(&pool, config(&sim, "w1", capped)).await;

    let run = run(&pool, id).await;
    assert_eq!(run.state, "succeeded", "{run:?}");
    // The 429 is not counted against the run: a busy provider never fails runs.
    assert_eq!(run.attempts, 2);
    let events = store::run_events(&pool, id).await.unwrap();
    let unclear: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "submit_unclear" || e.kind == "submit_rate_limited")
        .collect();
    assert_eq!(unclear.len(), 2, "{events:?}");
    assert_eq!(unclear[0].detail.as_ref().unwrap()["http_status"], 503);
    assert_eq!(unclear[1].kind, "submit_rate_limited");
    assert_eq!(unclear[1].detail.as_ref().unwrap()["http_status"], 429);
    // Retry-After: 1 was read and recorded (the wait it sets, above the
    // schedule's 100 ms, is decided by `lifecycle::after_submit`, whose unit
    // tests pin it; a gap between two event times here would measure the
    // machine's speed as well).
    assert_eq!(
        unclear[1].detail.as_ref().unwrap()["retry_after_secs"],
        1,
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .skip_while(|e| e.kind != "submit_rate_limited")
            .any(|e| e.kind == "submit_started"),
        "a submit after the 429: {events:?}"
    );
    assert!(
        events.iter().any(|e| e.kind == "poll_unclear"),
        "{events:?}"
    );
    assert_eq!(sim.ledger().len(), 1);
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_retry_wait_is_stored_in_due_at_and_survives_the_worker(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    sim.set_faults(Faults {
        fail_next_submits: 1,
        ..Default::default()
    });
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    let slow = "[submit]\ninitial = \"30s\"\nmax = \"60s\"\njitter = 0.0\n";
    let worker = start_worker(config(&sim, "w1", slow), pool.clone());
    wait_for(
        &pool,
        &format!(
            "EXISTS (SELECT 1 FROM wfq.run_events WHERE run_id = {id} AND kind = 'submit_unclear')"
        ),
        LIMIT,
    )
    .await;
    worker.stop().await;

    let (state, lease_owner, wait): (String, Option<String>, f64) = sqlx::query_as(
        "SELECT state, lease_owner, extract(epoch FROM due_at - (SELECT max(at) FROM wfq.run_events WHERE run_id = $1))::float8 \
         FROM wfq.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(state, "submitting");
    assert_eq!(lease_owner, None, "the stopped worker gave its lease back");
    assert!(
        (29.0..31.0).contains(&wait),
        "due_at is 30s after the failure: {wait}"
    );

    // Time passes (the wait is in the row, so it can be skipped here), and a
    // new worker process picks the run up where the schedule says.
    sqlx::query("UPDATE wfq.runs SET due_at = now() WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let worker = start_worker(config(&sim, "w2", ""), pool.clone());
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    let run = run(&pool, id).await;
    assert_eq!(run.state, "succeeded");
    assert_eq!(run.attempts, 2);
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_worker_stopped_mid_poll_hands_over_to_the_next(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(100, 1500, 100).await;
    // Every status check of the first worker fails (503, asked again on
    // the schedule): the run stays running whatever the clock, until the
    // second worker's checks get through.
    sim.set_faults(Faults {
        fail_next_polls: u32::MAX,
        ..Default::default()
    });
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    let first = start_worker(config(&sim, "first", ""), pool.clone());
    wait_for(
        &pool,
        &format!("(SELECT polls >= 2 FROM wfq.runs WHERE id = {id})"),
        LIMIT,
    )
    .await;
    first.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "running");
    assert!(row.lease_owner.is_none());
    sim.set_faults(Faults::default());

    let second = start_worker(config(&sim, "second", ""), pool.clone());
    wait_all_final(&pool, LIMIT).await;
    second.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded");
    let finisher: Option<String> = sqlx::query_scalar(
        "SELECT worker FROM wfq.run_events WHERE run_id = $1 AND kind = 'run_finished'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(finisher.as_deref(), Some("second"));
    assert_eq!(sim.ledger().len(), 1);
    assert_eq!(
        sim.stats().submit_requests,
        1,
        "the second worker did not submit again"
    );
    sim.shutdown().await;
}

/// The lease is the backstop: a worker that dies holding a run, and that
/// has no liveness session the others could see end (here
/// `worker.session_liveness = false`, as behind a transaction pooler), loses
/// the run once its lease has run out, and another worker finishes it.
/// Killed at a known point: its status check is held by the simulator.
#[sqlx::test]
async fn a_killed_workers_runs_continue_after_their_lease_expires(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(100, 1500, 100).await;
    sim.set_faults(Faults {
        hold_status_checks: true,
        ..Default::default()
    });
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    let mut doomed = config(&sim, "doomed", "");
    doomed.worker.session_liveness = false;
    // A short lease: only its expiry lets the rescuer take the run.
    doomed.worker.lease = Duration::from_secs(3);
    // The held check must still be in flight when the worker is killed.
    doomed.http.timeout = Duration::from_secs(30);
    let first = start_worker(doomed, pool.clone());
    sim.wait_until_held(1).await;
    first.kill().await;
    // Killed mid-poll: the lease is still held.
    assert_eq!(run(&pool, id).await.lease_owner.as_deref(), Some("doomed"));
    sim.set_faults(Faults::default());

    let second = start_worker(config(&sim, "rescuer", ""), pool.clone());
    wait_all_final(&pool, LIMIT).await;
    second.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded");
    assert_eq!(sim.stats().submit_requests, 1);
    let finisher: Option<String> = sqlx::query_scalar(
        "SELECT worker FROM wfq.run_events WHERE run_id = $1 AND kind = 'run_finished'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(finisher.as_deref(), Some("rescuer"));
    let (rescued_from, cause): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT detail->>'previous_owner', detail->>'cause' FROM wfq.run_events \
         WHERE run_id = $1 AND kind = 'lease_rescued' AND worker = 'rescuer'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rescued_from.as_deref(), Some("doomed"));
    assert_eq!(cause.as_deref(), Some("lease_expiry"));
    sim.shutdown().await;
}

#[sqlx::test]
async fn two_workers_share_200_runs_and_never_handle_one_twice(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 50, 20).await;
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) \
         SELECT 'wf_861ef31e94dcfb10e6e7', jsonb_build_object('n3_seed', g) FROM generate_series(1, 200) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let a = start_worker(config(&sim, "a", ""), pool.clone());
    let b = start_worker(config(&sim, "b", ""), pool.clone());
    wait_all_final(&pool, Duration::from_secs(90)).await;
    a.stop().await;
    b.stop().await;

    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(succeeded, 200);
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 200);
    assert!(
        ledger
            .iter()
            .all(|e| e.charges == 1 && e.submit_requests == 1),
        "a run was submitted twice"
    );
    assert_eq!(sim.stats().replays, 0);
    // Every submit and every transition happened exactly once per run.
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT run_id FROM wfq.run_events WHERE kind IN ('submit_started', 'submit_accepted', 'run_finished') \
         GROUP BY run_id, kind HAVING count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(doubled, 0);
    let (db_frozen, db_final): (Decimal, Decimal) =
        sqlx::query_as("SELECT sum(frozen_amount), sum(final_amount) FROM wfq.runs")
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
    let by_worker: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT worker, count(*) FROM wfq.run_events WHERE kind = 'submit_started' GROUP BY worker ORDER BY worker",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    println!("submits by worker: {by_worker:?}");
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_run_that_fails_at_the_provider_still_has_its_money_settled(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 100).await;
    let id = enqueue(&pool, ALWAYS_FAILS, json!({"prompt": "doomed"})).await;
    work_until_idle(&pool, config(&sim, "w1", "")).await;

    let run = run(&pool, id).await;
    assert_eq!(run.state, "failed");
    assert_eq!(run.error_code.as_deref(), Some("ENGINE_EXECUTION_FAILED"));
    assert!(run.error_message.is_some());
    assert_eq!(run.settlement_status.as_deref(), Some("settled"));
    let entry = &sim.ledger()[0];
    assert_eq!(run.frozen_amount, Some(d("0.5")));
    assert_eq!(run.final_amount, entry.final_amount);
    assert_eq!(run.released_amount, entry.released);
    assert_eq!(
        run.final_amount.unwrap() + run.released_amount.unwrap(),
        d("0.5")
    );
    sim.shutdown().await;
}

/// A submit answered with a `freeze_status` wfq does not know leaves the
/// frozen amount unknown (NULL) rather than guessed; the status check that
/// reports the quote frozen records it, and the settlement adds up to it
/// (`final + released = frozen`, as the provider's ledger says).
#[sqlx::test]
async fn a_frozen_amount_the_submit_answer_left_open_is_recorded_from_a_status_check(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(50, 200, 100).await;
    sim.set_faults(Faults {
        submit_freeze_status: Some("pending".into()),
        hold_status_checks: true,
        ..Default::default()
    });
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "odd freeze"})).await;
    let worker = start_worker(config(&sim, "w1", ""), pool.clone());
    // The first status check is held: what the submit's answer left.
    wait_held(&sim, 1).await;
    let submitted = run(&pool, id).await;
    assert_eq!(submitted.state, "running", "{submitted:?}");
    assert_eq!(submitted.freeze_status.as_deref(), Some("pending"));
    assert_eq!(submitted.quote_amount, Some(d("0.03")));
    assert_eq!(
        submitted.frozen_amount, None,
        "the answer did not say the quote was frozen"
    );
    sim.set_faults(Faults::default());
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;

    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{row:?}");
    assert_eq!(row.attempts, 1, "submitted once");
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 1);
    let entry = &ledger[0];
    assert_eq!(entry.charges, 1);
    assert_eq!(row.frozen_amount, Some(entry.frozen), "{row:?}");
    assert_eq!(row.final_amount, entry.final_amount);
    assert_eq!(row.released_amount, entry.released);
    assert_eq!(
        row.final_amount.unwrap() + row.released_amount.unwrap(),
        row.frozen_amount.unwrap(),
        "final + released = frozen, to the last decimal"
    );
    assert_eq!(row.freeze_status.as_deref(), Some("released"));
    assert!(row.settled_at.is_some());
    sim.shutdown().await;
}

#[sqlx::test]
async fn cancel_only_withdraws_a_run_that_was_not_submitted(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    let later = store::enqueue_run(
        &pool,
        &NewRun {
            workflow_id: TEXT_TO_IMAGE.into(),
            inputs: json!({}),
            not_before: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let now = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    store::cancel_run(&pool, later, Some("changed my mind"), &[])
        .await
        .unwrap();
    work_until_idle(&pool, config(&sim, "w1", "")).await;

    let canceled = run(&pool, later).await;
    assert_eq!(canceled.state, "canceled");
    assert_eq!(canceled.error_message.as_deref(), Some("changed my mind"));
    assert_eq!(canceled.attempts, 0);
    assert_eq!(
        sim.stats().submit_requests,
        1,
        "the canceled run was never sent"
    );
    // Too late for the submitted one.
    match store::cancel_run(&pool, now, None, &[]).await {
        Err(RequestError::WrongState { state, .. }) => assert_eq!(state, "succeeded"),
        other => panic!("expected WrongState, got {other:?}"),
    }
    assert!(matches!(
        store::cancel_run(&pool, 999_999, None, &[]).await,
        Err(RequestError::NotFound(_))
    ));

    // A canceled run can be retried: a new row, a new key, pointing back.
    let store::RetryOutcome::NewRun(again) = store::retry_run(&pool, later, &[]).await.unwrap()
    else {
        panic!("a canceled run is repeated as a new run");
    };
    let copy = run(&pool, again).await;
    assert_eq!(copy.retry_of, Some(later));
    assert_eq!(copy.state, "queued");
    assert_ne!(copy.idempotency_key, canceled.idempotency_key);
    assert!(matches!(
        store::retry_run(&pool, now, &[]).await,
        Err(RequestError::WrongState { .. })
    ));
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_run_pinned_to_an_unknown_revision_is_refused_by_the_provider(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    let id = store::enqueue_run(
        &pool,
        &NewRun {
            workflow_id: TEXT_TO_IMAGE.into(),
            revision_id: Some("wfr_retired_0000".into()),
            inputs: json!({"n6_text": "old"}),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    work_until_idle(&pool, config(&sim, "w1", "")).await;
    let run = run(&pool, id).await;
    assert_eq!(run.state, "failed");
    assert_eq!(run.error_code.as_deref(), Some("REVISION_NOT_FOUND"));
    assert_eq!(
        run.revision_id.as_deref(),
        Some("wfr_retired_0000"),
        "the producer's pin is kept"
    );
    // Sent as written: no defaults from a manifest of another revision.
    assert_eq!(run.sent_inputs, Some(json!({"n6_text": "old"})));
    assert!(sim.ledger().is_empty());
    sim.shutdown().await;
}

#[sqlx::test]
async fn exhausted_submit_retries_fail_unsettled_and_retry_resumes_with_the_same_key(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    // Every answer is lost: the provider accepted the first submit, the worker never heard.
    sim.set_faults(Faults {
        drop_next_submit_answers: 3,
        ..Default::default()
    });
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    let quick = "[submit]\ninitial = \"50ms\"\nmax = \"100ms\"\nmax_attempts = 3\n";
    let worker = start_worker(config(&sim, "w1", quick), pool.clone());
    wait_all_final(&pool, LIMIT).await;
    let failed = run(&pool, id).await;
    assert_eq!(failed.state, "failed");
    assert_eq!(
        failed.error_code.as_deref(),
        Some("SUBMIT_RETRIES_EXHAUSTED")
    );
    assert_eq!(
        failed.settled_at, None,
        "the money is unknown, so not settled"
    );

    // A retry must not be a new charge: the same row and key go on.
    let outcome = store::retry_run(&pool, id, &[]).await.unwrap();
    assert_eq!(outcome, store::RetryOutcome::Resumed(id));
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    let done = run(&pool, id).await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    assert_eq!(done.idempotency_key, failed.idempotency_key);
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].charges, 1);
    assert_eq!(ledger[0].submit_requests, 4);
    assert_eq!(done.frozen_amount, Some(ledger[0].frozen));
    sim.shutdown().await;
}

#[sqlx::test]
async fn malformed_answers_are_retried_on_schedule_and_crash_nothing(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 300, 100).await;
    // Two of each kind: HTML with 200, missing fields, unparseable amounts,
    // an unknown status with extra fields, an empty body, truncated JSON.
    sim.set_faults(Faults {
        malformed_next_answers: 12,
        ..Default::default()
    });
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(enqueue(&pool, TEXT_TO_IMAGE, json!({})).await);
    }
    work_until_idle(&pool, config(&sim, "w1", "")).await;
    for id in &ids {
        let run = run(&pool, *id).await;
        assert_eq!(run.state, "succeeded", "{run:?}");
    }
    let unclear: Vec<String> = sqlx::query_scalar(
        "SELECT detail->>'reason' FROM wfq.run_events WHERE kind LIKE '%unclear'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(unclear.len() >= 6, "{unclear:?}");
    assert!(
        unclear.iter().any(|r| r.contains("not a chenyu answer")),
        "{unclear:?}"
    );
    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 5);
    assert!(ledger.iter().all(|e| e.charges == 1));
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_run_the_provider_cannot_find_fails_at_the_deadline_with_what_was_known(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    // Submitted elsewhere, and the provider has never heard of it.
    sqlx::query(
        "UPDATE wfq.runs SET state = 'running', provider_run_id = 'wfrun_unknown', submitted_at = now(), \
         sent_inputs = '{}', revision_id = 'r', frozen_amount = 0.03 WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let poll = |deadline: &str| {
        format!("[poll]\ninitial = \"50ms\"\nmax = \"100ms\"\ndeadline = \"{deadline}\"\n")
    };
    // Not found is not taken for the truth: with a deadline far off, the
    // worker keeps asking on the schedule.
    let patient = start_worker(config(&sim, "w1", &poll("1h")), pool.clone());
    wait_for(
        &pool,
        &format!(
            "(SELECT count(*) >= 2 FROM wfq.run_events WHERE run_id = {id} AND kind = 'poll_rejected')"
        ),
        LIMIT,
    )
    .await;
    patient.stop().await;
    assert_eq!(run(&pool, id).await.state, "running");
    // Past its deadline (1 s after the submit), the next answer ends it.
    sqlx::query("UPDATE wfq.runs SET submitted_at = now() - interval '2 seconds' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    work_until_idle(&pool, config(&sim, "w2", &poll("1s"))).await;
    let run = run(&pool, id).await;
    assert_eq!(run.state, "failed");
    assert_eq!(run.error_code.as_deref(), Some("POLL_DEADLINE"));
    assert!(
        run.error_message.as_deref().unwrap().contains("not found"),
        "{:?}",
        run.error_message
    );
    assert_eq!(run.frozen_amount, Some(d("0.03")), "what was known is kept");
    let rejected: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wfq.run_events WHERE run_id = $1 AND kind = 'poll_rejected'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(rejected >= 3, "kept asking on the schedule: {rejected}");
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_stalled_provider_times_out_and_is_retried_without_stalling_other_runs(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 50).await;
    // Answers take 3 s; every call gives up after `http.timeout` = 1 s.
    sim.set_faults(Faults {
        latency: Duration::from_secs(3),
        ..Default::default()
    });
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    let mut cfg = config(&sim, "w1", "");
    cfg.http.timeout = Duration::from_secs(1);
    let worker = start_worker(cfg, pool.clone());
    wait_for(
        &pool,
        &format!("EXISTS (SELECT 1 FROM wfq.run_events WHERE run_id = {id} AND detail->>'reason' LIKE 'timed out%')"),
        LIMIT,
    )
    .await;
    // The provider recovers; the same run goes on, and so do new ones.
    sim.set_faults(Faults::default());
    let later = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    assert_eq!(run(&pool, id).await.state, "succeeded");
    assert_eq!(run(&pool, later).await.state, "succeeded");
    assert!(sim.ledger().iter().all(|e| e.charges == 1));
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_burst_of_one_workflow_reads_its_manifest_once(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 0, 0).await;
    // More runs than the worker's 16 slots, all due at once on a cold cache.
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) \
         SELECT $1, jsonb_build_object('n6_text', 'burst ' || g) FROM generate_series(1, 40) g",
    )
    .bind(TEXT_TO_IMAGE)
    .execute(&pool)
    .await
    .unwrap();
    work_until_idle(&pool, config(&sim, "w1", "")).await;
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(succeeded, 40);
    assert_eq!(
        sim.stats().market_requests,
        1,
        "one manifest read for 40 runs"
    );
}
