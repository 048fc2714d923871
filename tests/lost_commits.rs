//! A lost COMMIT answer does not lose an accepted answer (issue 14): every
//! write carries a token kept in `wfq.runs.last_write`, and a write whose
//! outcome is unknown (the connection broke after the statement was sent)
//! is read back by its token instead of being applied again, which would
//! fail its own compare-and-set and tell the step "changed under us" about
//! a run it still holds.

mod common;

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use common::lossy_proxy::LossyProxy;
use common::*;
use wfq::backoff::{PollPolicy, RetryPolicy};
use wfq::config::ProviderKind;
use wfq::lifecycle::{self, RunProgress, RunState, Transition};
use wfq::providers::{Accepted, SubmitGuard, SubmitOutcome};
use wfq::runtime::TransitionWriter;
use wfq::sim::Faults;
use wfq::store::{self, TransitionWrite};

const LEASE: Duration = Duration::from_secs(60);

/// A run in `submitting`, leased by worker `w` at version 0.
async fn submitting_run(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO wfq.runs (provider, workflow_id, inputs, sent_inputs, state, attempts, \
         submit_in_doubt_since, lease_owner, lease_expires_at) \
         VALUES ('gptbots', 'news', '{}', '{}', 'submitting', 1, now(), 'w', now() + interval '1 minute') \
         RETURNING id",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// What the worker writes when GPTBots accepts the submit.
fn accepted(run_id: &str) -> Transition {
    let progress = RunProgress {
        state: RunState::Submitting,
        attempts: 1,
        polls: 0,
        since_submit: None,
        unknown_status_for: None,
        unsettled_for: None,
    };
    let retry = RetryPolicy {
        max_attempts: 3,
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.0,
    };
    let poll = PollPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.0,
        deadline: Duration::from_secs(3600),
        unknown_status_limit: Duration::from_secs(600),
        settle_wait: Duration::from_secs(900),
    };
    lifecycle::after_submit(
        &progress,
        &SubmitOutcome::Accepted(Accepted {
            provider_run_id: run_id.to_owned(),
            raw: json!({"workflowRunId": run_id, "status": "PENDING"}),
            ..Default::default()
        }),
        SubmitGuard::Nothing,
        &retry,
        &poll,
        Utc::now(),
        0.5,
    )
}

fn write(id: i64, version: i64, t: Transition) -> TransitionWrite {
    TransitionWrite {
        id,
        version,
        from: RunState::Submitting,
        transition: t,
        token: Uuid::new_v4(),
    }
}

async fn accepted_events(pool: &PgPool, id: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM wfq.run_events WHERE run_id = $1 AND kind = 'submit_accepted'",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The writer's answer to a write that may have landed: the landed
/// version when it did (not "changed under us"), the write applied when
/// it did not, and "changed under us" when another write came since.
#[sqlx::test]
async fn an_uncertain_write_is_read_back_by_its_token(pool: PgPool) {
    let writer = TransitionWriter::start(pool.clone(), "w".into(), LEASE, 2, false);

    // Landed, and its answer lost: the writer must say so.
    let landed_id = submitting_run(&pool).await;
    let landed = write(landed_id, 0, accepted("run-landed"));
    let applied = store::apply_transitions(&pool, "w", LEASE, std::slice::from_ref(&landed))
        .await
        .unwrap();
    assert_eq!(applied, vec![Some(1)]);
    // Never landed: applied now.
    let lost_id = submitting_run(&pool).await;
    let lost = write(lost_id, 0, accepted("run-lost"));
    let (a, b) = tokio::join!(
        writer.apply_uncertain(landed.clone()),
        writer.apply_uncertain(lost.clone())
    );
    assert_eq!(a.unwrap(), Some(1), "the landed write's version, not None");
    assert_eq!(b.unwrap(), Some(1), "applied once read back as missing");
    for (id, run_id) in [(landed_id, "run-landed"), (lost_id, "run-lost")] {
        let row = run(&pool, id).await;
        assert_eq!(row.state, "running");
        assert_eq!(row.provider_run_id.as_deref(), Some(run_id));
        assert!(row.submit_in_doubt_since.is_none());
        assert_eq!(accepted_events(&pool, id).await, 1, "written once");
    }
    let version: i64 = sqlx::query_scalar("SELECT version FROM wfq.runs WHERE id = $1")
        .bind(landed_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(version, 1, "not applied a second time");

    // Landed, then overwritten by a later write: the row really moved on.
    let moved_id = submitting_run(&pool).await;
    let first = write(moved_id, 0, accepted("run-moved"));
    store::apply_transitions(&pool, "w", LEASE, std::slice::from_ref(&first))
        .await
        .unwrap();
    sqlx::query("UPDATE wfq.runs SET version = version + 1, last_write = NULL WHERE id = $1")
        .bind(moved_id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(writer.apply_uncertain(first).await.unwrap(), None);
}

async fn proxied_pool(connect: &PgConnectOptions, proxy: &LossyProxy) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(connect.clone().host("127.0.0.1").port(proxy.port()))
        .await
        .expect("database through the proxy")
}

/// GPTBots (no key, no way to find a run): the answer to the statement
/// that records the accepted submit is lost after it committed. The run
/// still ends `succeeded` with its provider run id, and GPTBots has one run.
#[sqlx::test]
async fn a_gptbots_run_whose_accepted_write_lost_its_answer_succeeds(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect.clone())
        .await
        .unwrap();
    let proxy = LossyProxy::start(format!("{}:{}", connect.get_host(), connect.get_port())).await;
    let sim = start_sim(20, 300, 50).await;
    proxy.arm(b"submit_accepted");
    let id = enqueue_on(&pool, "gptbots", "news", json!({"topic": "lost commit"})).await;
    let worker_pool = proxied_pool(&connect, &proxy).await;
    let worker = start_worker(config(&sim, "w1", &other_providers(&sim)), worker_pool);
    wait_all_final(&pool, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(
        proxy.fired(),
        1,
        "the accepted answer's write lost its answer"
    );
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{row:?}");
    let runs = provider_runs(&sim, ProviderKind::Gptbots);
    assert_eq!(sim.gptbots_ledger().len(), 1, "exactly one GPTBots run");
    assert_one_provider_run(ProviderKind::Gptbots, &row, &runs);
    assert_eq!(accepted_events(&pool, id).await, 1);
    sim.shutdown().await;
}

/// The same lost answer for a Dify run on a Dify that stops a run whose
/// stream is left: the worker must know its write landed to keep reading
/// the stream (a step told "changed under us" drops it, and the run never
/// finishes).
#[sqlx::test]
async fn a_dify_stream_survives_a_lost_answer_to_its_accepted_write(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect.clone())
        .await
        .unwrap();
    let proxy = LossyProxy::start(format!("{}:{}", connect.get_host(), connect.get_port())).await;
    let sim = start_sim(50, 1_500, 50).await;
    sim.set_faults(Faults {
        dify_runs_die_with_their_stream: true,
        dify_ping_interval_ms: Some(200),
        ..Default::default()
    });
    proxy.arm(b"submit_accepted");
    let id = enqueue_on(&pool, "dify", "text", json!({"query": "lost commit"})).await;
    let worker_pool = proxied_pool(&connect, &proxy).await;
    let worker = start_worker(config(&sim, "w1", &other_providers(&sim)), worker_pool);
    proxy.wait_fired().await;
    wait_all_final(&pool, Duration::from_secs(30)).await;
    worker.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{row:?}");
    assert_eq!(row.polls, 1, "the result came from the stream");
    let kinds = event_kinds(&pool, id).await;
    assert!(!kinds.contains(&"lease_rescued".to_owned()), "{kinds:?}");
    assert_eq!(sim.dify_ledger().len(), 1, "exactly one Dify run");
    assert_one_provider_run(
        ProviderKind::Dify,
        &row,
        &provider_runs(&sim, ProviderKind::Dify),
    );
    sim.shutdown().await;
}
