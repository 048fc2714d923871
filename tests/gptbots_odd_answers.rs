//! GPTBots answers nobody documented (issue 14): a status wfq does not know
//! ends the run after `poll.unknown_status_limit` instead of polling it to
//! `poll.deadline`, and a finished run without `totalCost` is recorded with
//! its money unknown (never zero), with the workflow's highest known cost
//! as the estimate the spend guard counts.

mod common;

use rust_decimal::Decimal;
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

/// The test configuration with `poll` settings of its own.
fn with_poll(sim: &SimServer, poll: &str) -> Config {
    config(
        sim,
        "w1",
        &format!(
            "{}\n[poll]\ninitial = \"50ms\"\nmax = \"200ms\"\njitter = 0.1\n{poll}\n",
            other_providers(sim)
        ),
    )
}

async fn events_of(pool: &PgPool, id: i64, kind: &str) -> Vec<serde_json::Value> {
    sqlx::query_scalar(
        "SELECT detail FROM wfq.run_events WHERE run_id = $1 AND kind = $2 ORDER BY id",
    )
    .bind(id)
    .bind(kind)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn an_unknown_gptbots_status_ends_the_run_after_the_limit_with_its_money_open(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(20, 200, 50).await;
    sim.set_faults(Faults {
        gptbots_unknown_status: Some("ARCHIVED".to_owned()),
        ..Default::default()
    });
    let id = enqueue_on(&pool, "gptbots", "news", json!({"topic": "odd"})).await;
    // poll.deadline stays at its 24 h: only the unknown-status limit ends it.
    work_until_idle(&pool, with_poll(&sim, "unknown_status_limit = \"1s\"")).await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "failed", "{row:?}");
    assert_eq!(
        row.error_code.as_deref(),
        Some("UNKNOWN_RUN_STATUS"),
        "{row:?}"
    );
    assert!(
        row.error_message
            .as_deref()
            .is_some_and(|m| m.contains("ARCHIVED")),
        "{row:?}"
    );
    assert_eq!(row.run_status.as_deref(), Some("ARCHIVED"));
    assert!(row.settled_at.is_none(), "nobody knows what it cost");
    assert!(row.final_amount.is_none(), "{row:?}");
    let unknown = events_of(&pool, id, "unknown_status").await;
    assert!(!unknown.is_empty());
    assert!(
        unknown.iter().all(|d| d["status"] == "ARCHIVED"),
        "{unknown:?}"
    );
    let runs = provider_runs(&sim, ProviderKind::Gptbots);
    assert_eq!(runs[&row.idempotency_key].len(), 1, "never sent twice");
    assert_eq!(
        row.provider_run_id.as_deref(),
        Some(runs[&row.idempotency_key][0].run_id.as_str())
    );
    assert!(sim.stats().gptbots_unknown_statuses > 0);
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_finished_gptbots_run_without_a_cost_is_unsettled_with_an_estimate(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    let sim = start_sim(20, 200, 50).await;
    let cfg = || with_poll(&sim, "settle_wait = \"1s\"");
    // Earlier runs of the workflow, settled with their cost (inputs of
    // different lengths cost differently).
    for topic in [
        "a",
        "a much longer topic that costs more tokens to summarise",
    ] {
        enqueue_on(&pool, "gptbots", "news", json!({ "topic": topic })).await;
    }
    work_until_idle(&pool, cfg()).await;
    let highest: Decimal = sqlx::query_scalar(
        "SELECT max(final_amount) FROM wfq.runs WHERE state = 'succeeded' AND settled_at IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();

    sim.set_faults(Faults {
        gptbots_omit_total_cost: true,
        ..Default::default()
    });
    let id = enqueue_on(&pool, "gptbots", "news", json!({"topic": "no cost"})).await;
    work_until_idle(&pool, cfg()).await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{row:?}");
    assert!(row.outputs.is_some(), "{row:?}");
    assert_eq!(row.total_cost, None, "unknown, not zero");
    assert_eq!(row.final_amount, None, "unknown, not zero");
    assert!(row.settled_at.is_none(), "its money is not final");
    let kinds = event_kinds(&pool, id).await;
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("finished_unsettled"),
        "{kinds:?}"
    );
    let estimate: Option<Decimal> =
        sqlx::query_scalar("SELECT cost_estimate FROM wfq.runs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(estimate, Some(highest));
    assert!(sim.stats().gptbots_costs_omitted > 0);
    // The provider did bill it: the money is an open question, not none.
    let runs = provider_runs(&sim, ProviderKind::Gptbots);
    assert_eq!(runs[&row.idempotency_key].len(), 1);
    assert!(runs[&row.idempotency_key][0].charged > Some(Decimal::ZERO));
    sim.shutdown().await;
}
