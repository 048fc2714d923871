//! Hostile provider answers (issue 14): outputs carrying a NUL, a lone
//! surrogate, 2 MiB strings, 200 levels of nesting, a NUL in a key, numbers
//! beyond f64 and oddly escaped control characters, from all three APIs.
//! Every run ends final, what was repaired is on record in its events, and
//! a write PostgreSQL still refuses fails its run `UNSTORABLE_ANSWER`
//! instead of being retried for ever.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::backoff::PollPolicy;
use wfq::config::ProviderKind;
use wfq::lifecycle::{self, RunProgress, RunState};
use wfq::providers::{PollOutcome, RunReport, RunStatus};
use wfq::sim::Faults;
use wfq::store;

const LIMIT: Duration = Duration::from_secs(120);

async fn pool(connect: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(24)
        .connect_with(connect)
        .await
        .expect("test database")
}

/// The corpus entry a run got, told from what was stored of it, and the
/// repairs that entry needs (`sim::hostile` documents the corpus).
fn variant(sim_hostile: &Value) -> (&'static str, &'static [&'static str]) {
    const EVERYTHING: &[&str] = &[
        "nul",
        "lone_surrogate",
        "cut_strings",
        "cut_depth",
        "number_as_text",
    ];
    match sim_hostile {
        Value::String(s) if s == "before\u{fffd}after" => ("nul", &["nul"]),
        Value::String(s) if s == "\u{fffd}" => ("lone_surrogate", &["lone_surrogate"]),
        Value::String(s) if s.starts_with("xxxx") && s.contains("<cut: ") => {
            ("huge", &["cut_strings"])
        }
        // Valid JSON that PostgreSQL stores as it is: nothing to repair.
        Value::String(s) if s.starts_with('\u{1}') => ("control_escapes", &[]),
        Value::Object(o) if o.contains_key("n") => ("deep", &["cut_depth"]),
        Value::Object(o) if o.contains_key("key\u{fffd}with a nul") => ("nul_key", &["nul"]),
        Value::Object(o) if o.contains_key("beyond_f64") => ("odd_numbers", &["number_as_text"]),
        Value::Object(o) if o.contains_key("everything") || o.contains_key("lone_surrogate") => {
            ("everything", EVERYTHING)
        }
        other => panic!(
            "not an entry of the corpus as repaired: {:.200}",
            other.to_string()
        ),
    }
}

fn request(kind: ProviderKind, n: u32) -> (&'static str, &'static str, Value) {
    match kind {
        ProviderKind::Chenyu => (
            "chenyu",
            TEXT_TO_IMAGE,
            json!({"n6_text": format!("bottle {n}")}),
        ),
        ProviderKind::Dify => ("dify", "text", json!({"query": format!("summarise {n}")})),
        ProviderKind::Gptbots => ("gptbots", "news", json!({"topic": format!("news {n}")})),
    }
}

/// 50 runs over chenyu, Dify and GPTBots against a simulator whose every
/// finished run carries an entry of the hostile corpus: all succeed, their
/// outputs are stored (repaired), the finishing event says what was
/// repaired, and the money is the simulator's to the last decimal.
#[sqlx::test]
async fn hostile_answers_of_all_three_providers_end_final_with_their_repairs_on_record(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(20, 300, 50).await;
    sim.set_faults(Faults {
        hostile_outputs: true,
        ..Default::default()
    });
    let kinds = [
        ProviderKind::Chenyu,
        ProviderKind::Dify,
        ProviderKind::Gptbots,
    ];
    let mut ids = Vec::new();
    for n in 0..50u32 {
        let kind = kinds[n as usize % 3];
        let (profile, workflow, inputs) = request(kind, n);
        ids.push((kind, enqueue_on(&pool, profile, workflow, inputs).await));
    }
    // Repairing and storing megabytes of hostile JSON shares the test's one
    // thread with the simulator: calls get time, so that no GPTBots submit
    // times out (which would rightly fail it SUBMIT_OUTCOME_UNKNOWN).
    let mut cfg = config(&sim, "w1", &other_providers(&sim));
    cfg.http.timeout = Duration::from_secs(20);
    cfg.worker.lease = Duration::from_secs(60);
    let worker = start_worker(cfg, pool.clone());
    wait_all_final(&pool, LIMIT).await;
    // The worker kept going through all of it and stops cleanly.
    worker.stop().await;

    let ledgers: Vec<_> = kinds.iter().map(|&k| provider_runs(&sim, k)).collect();
    let at = |kind: ProviderKind| kinds.iter().position(|&k| k == kind).unwrap();
    let mut seen: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); 3];
    for (kind, id) in ids {
        let row = run(&pool, id).await;
        assert_eq!(row.state, "succeeded", "{kind:?}: {:?}", row.error_message);
        assert!(row.settled_at.is_some(), "{kind:?} run {id}");
        assert_one_provider_run(kind, &row, &ledgers[at(kind)]);
        let outputs = row.outputs.as_ref().expect("outputs are stored");
        let (name, needed) = variant(&outputs["sim_hostile"]);
        seen[at(kind)].insert(name);
        let finished: Value = sqlx::query_scalar(
            "SELECT detail FROM wfq.run_events WHERE run_id = $1 AND kind = 'run_finished'",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        match finished.get("wfq_repairs") {
            None => assert!(
                needed.is_empty(),
                "{kind:?} run {id} ({name}): no wfq_repairs in its run_finished event"
            ),
            Some(repairs) => {
                assert!(!needed.is_empty(), "{kind:?} run {id} ({name}): {repairs}");
                for key in needed {
                    assert!(
                        repairs[key].as_u64().is_some_and(|n| n > 0),
                        "{kind:?} run {id} ({name}): {key} missing in {repairs}"
                    );
                }
            }
        }
    }
    for kind in kinds {
        // 16 or 17 runs per API: the corpus of 8 went round twice.
        assert_eq!(seen[at(kind)].len(), 8, "{kind:?}: {:?}", seen[at(kind)]);
    }
    // The repair made everything storable: no run needed the last resort.
    let unstorable: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wfq.run_events WHERE kind = 'unstorable_answer'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unstorable, 0);
    for (kind, profile) in [
        (ProviderKind::Chenyu, "chenyu"),
        (ProviderKind::Dify, "dify"),
        (ProviderKind::Gptbots, "gptbots"),
    ] {
        let db: Decimal =
            sqlx::query_scalar("SELECT sum(final_amount) FROM wfq.runs WHERE provider = $1")
                .bind(profile)
                .fetch_one(&pool)
                .await
                .unwrap();
        let ledger: Decimal = ledgers[at(kind)]
            .values()
            .flatten()
            .filter_map(|r| r.charged)
            .sum();
        assert_eq!(db, ledger, "{kind:?}: to the last decimal");
    }
    assert!(sim.stats().hostile_answers >= 50);
    sim.shutdown().await;
}

/// A status answer whose outputs hold a NUL, as the worker would write it
/// without the repair: PostgreSQL refuses it with a data error (the class
/// the worker tells apart from a lost connection), and the fallback
/// transition keeps the provider's ids and money and is stored.
#[sqlx::test]
async fn a_nul_in_outputs_is_a_data_error_and_the_fallback_keeps_ids_and_money(pool: PgPool) {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO wfq.runs (workflow_id, state, provider_run_id, lease_owner, lease_expires_at, \
         submitted_at, currency, quote_amount, frozen_amount) \
         VALUES ($1, 'running', 'wfrun_1', 'w', now() + interval '1 minute', now(), 'CNY', 0.03, 0.03) \
         RETURNING id",
    )
    .bind(TEXT_TO_IMAGE)
    .fetch_one(&pool)
    .await
    .unwrap();
    let answer = RunReport {
        status: RunStatus::Succeeded,
        settled: true,
        run_status: Some("succeeded".into()),
        settlement_status: Some("settled".into()),
        outputs: Some(json!({"text": "a\u{0}b"})),
        final_amount: Some(Decimal::new(28780, 8)),
        released_amount: Some(Decimal::new(2971220, 8)),
        raw: json!({"outputs": {"text": "a\u{0}b"}}),
        ..Default::default()
    };
    let progress = RunProgress {
        state: RunState::Running,
        attempts: 1,
        polls: 1,
        since_submit: Some(Duration::from_secs(5)),
        unknown_status_for: None,
        unsettled_for: None,
    };
    let policy = PollPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.0,
        deadline: Duration::from_secs(3600),
        unknown_status_limit: Duration::from_secs(600),
        settle_wait: Duration::from_secs(900),
    };
    let t = lifecycle::after_poll(
        &progress,
        &PollOutcome::Report(Box::new(answer)),
        false,
        &policy,
        Utc::now(),
        0.5,
    );
    let lease = Duration::from_secs(60);
    let refused = store::apply_transition(&pool, id, 0, RunState::Running, "w", lease, &t)
        .await
        .expect_err("PostgreSQL refuses a NUL in jsonb");
    assert!(store::is_data_error(&refused), "{refused:?}");
    assert!(!store::is_transient(&refused), "{refused:?}");

    let fallback = lifecycle::unstorable_answer(&t, &refused.to_string());
    let version = store::apply_transition(&pool, id, 0, RunState::Running, "w", lease, &fallback)
        .await
        .expect("the fallback is storable");
    assert_eq!(version, Some(1));
    let row = run(&pool, id).await;
    assert_eq!(row.state, "failed");
    assert_eq!(row.error_code.as_deref(), Some("UNSTORABLE_ANSWER"));
    assert_eq!(row.provider_run_id.as_deref(), Some("wfrun_1"));
    assert_eq!(row.frozen_amount, Some(Decimal::new(3, 2)));
    assert_eq!(row.final_amount, Some(Decimal::new(28780, 8)));
    assert_eq!(row.released_amount, Some(Decimal::new(2971220, 8)));
    assert!(row.settled_at.is_some(), "the refused answer said settled");
    assert!(row.outputs.is_none());
}

/// The worker's own write path: a run whose status answer PostgreSQL
/// refuses (a trigger makes this run's answer fail exactly as a NUL in
/// `jsonb` does, 22P05, because the repair at the edge keeps a provider
/// from getting one through) fails `UNSTORABLE_ANSWER` with its provider
/// run id and money, instead of being polled for ever; the run next to it
/// in the same batches succeeds.
#[sqlx::test]
async fn an_answer_the_database_refuses_fails_its_run_unstorable_and_no_other(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    // Settled as it finishes: the refused answer carries the final money.
    let sim = start_sim(20, 200, 0).await;
    let victim = enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "refused"})).await;
    let healthy = enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "fine"})).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        r#"
        CREATE FUNCTION public.refuse_outputs() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id = {victim} AND NEW.outputs IS NOT NULL THEN
                -- PostgreSQL's own refusal of a NUL in jsonb.
                PERFORM '"\u0000"'::jsonb;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_outputs BEFORE UPDATE ON wfq.runs
            FOR EACH ROW EXECUTE FUNCTION public.refuse_outputs();
        "#
    )))
    .execute(&pool)
    .await
    .unwrap();
    work_until_idle(&pool, config(&sim, "w1", "")).await;

    let ledger: HashMap<_, _> = sim
        .ledger()
        .into_iter()
        .map(|e| (e.idempotency_key.clone(), e))
        .collect();
    let row = run(&pool, victim).await;
    assert_eq!(row.state, "failed", "{row:?}");
    assert_eq!(
        row.error_code.as_deref(),
        Some("UNSTORABLE_ANSWER"),
        "{row:?}"
    );
    let at_provider = &ledger[&row.idempotency_key];
    assert_eq!(at_provider.charges, 1);
    assert_eq!(
        row.provider_run_id.as_deref(),
        Some(at_provider.run_order_id.as_str())
    );
    assert_eq!(row.frozen_amount, Some(at_provider.frozen));
    assert_eq!(row.final_amount, at_provider.final_amount);
    assert_eq!(row.released_amount, at_provider.released);
    assert!(row.outputs.is_none());
    assert!(row.submit_in_doubt_since.is_none());
    let reason: Option<String> = sqlx::query_scalar(
        "SELECT detail->>'reason' FROM wfq.run_events WHERE run_id = $1 AND kind = 'unstorable_answer'",
    )
    .bind(victim)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("Unicode escape")),
        "{reason:?}"
    );
    let good = run(&pool, healthy).await;
    assert_eq!(good.state, "succeeded", "{good:?}");
    assert!(good.outputs.is_some());
    sim.shutdown().await;
}
