//! A submit recorded as about to be sent (`submitting`, its doubt marked)
//! that the worker then does not send must not stay in doubt: for a
//! provider without idempotency keys the next worker would fail it
//! `SUBMIT_OUTCOME_UNKNOWN` (GPTBots) or wait a whole `find_window` and
//! send it again as a lost submit (Dify), for a request nobody sent. Here
//! the write outlasts the lease (it waits for a row lock this test holds,
//! while the lease is not renewed): the worker withdraws it (doubt
//! cleared, attempt given back) and submits it once, normally.
//! `shutdown.rs` covers the same for a worker that begins to stop.

mod common;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::config::ProviderKind;
use wfq::sim::Faults;

const LIMIT: Duration = Duration::from_secs(60);

async fn a_submit_whose_lease_ran_out_while_it_was_recorded_is_withdrawn(
    kind: ProviderKind,
    connect: PgConnectOptions,
) {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect.clone())
        .await
        .unwrap();
    // The worker's own: the test's connections, one of them holding a
    // lock, must not starve it.
    let worker_pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(20, 300, 50).await;
    let (profile, workflow, field) = match kind {
        ProviderKind::Dify => ("dify", "text", "query"),
        _ => ("gptbots", "news", "topic"),
    };
    let inputs = |n: u32| serde_json::json!({ field: format!("input {n}") });
    // A 3 s lease (renewed every second while a step holds the run, except
    // while its row is locked), one submit at a time.
    let mut cfg = config(&sim, "w", &other_providers(&sim));
    cfg.worker.lease = std::time::Duration::from_secs(3);
    cfg.providers
        .get_mut(profile)
        .unwrap()
        .max_submits_in_flight = Some(1);
    sim.set_faults(Faults {
        hold_submits: true,
        ..Default::default()
    });
    let first = enqueue_on(&pool, profile, workflow, inputs(1)).await;
    let worker = start_worker(cfg, worker_pool);
    wait_held(&sim, 1).await;
    // The second run is claimed and waits for the profile's only submit
    // slot, which the first one's held request keeps.
    let second = enqueue_on(&pool, profile, workflow, inputs(2)).await;
    wait_for(
        &pool,
        &format!("(SELECT lease_owner IS NOT NULL FROM wfq.runs WHERE id = {second})"),
        LIMIT,
    )
    .await;
    let blocker = lock_row(&pool, second).await;
    sim.set_faults(Faults::default());
    wait_lock_waiters(&pool, 1).await;
    // The write waits while its lease runs out (a locked row is not
    // renewed): a whole lease past its end, by the database's clock.
    wait_for(
        &pool,
        &format!(
            "(SELECT lease_expires_at + interval '3 seconds' < now() FROM wfq.runs WHERE id = {second})"
        ),
        LIMIT,
    )
    .await;
    blocker.rollback().await.unwrap();

    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    let runs = provider_runs(&sim, kind);
    assert_eq!(runs.len(), 2, "{kind:?}: {runs:?}");
    for id in [first, second] {
        let row = run(&pool, id).await;
        assert_eq!(row.state, "succeeded", "{kind:?}: {row:?}");
        assert_one_provider_run(kind, &row, &runs);
        assert_eq!(row.attempts, 1, "{kind:?}: sent once: {row:?}");
    }
    let kinds = event_kinds(&pool, second).await;
    let not_sent = kinds.iter().position(|k| k == "submit_not_sent");
    assert!(not_sent.is_some(), "{kind:?}: {kinds:?}");
    assert!(
        !kinds.iter().any(|k| {
            k == "submit_outcome_unknown" || k == "submit_not_found_yet" || k == "resubmit_started"
        }),
        "{kind:?}: {kinds:?}"
    );
    let started = kinds.iter().filter(|k| *k == "submit_started").count();
    assert_eq!(
        started, 2,
        "recorded, withdrawn, recorded and sent: {kinds:?}"
    );
    sim.shutdown().await;
}

#[sqlx::test]
async fn dify(_: PgPoolOptions, connect: PgConnectOptions) {
    a_submit_whose_lease_ran_out_while_it_was_recorded_is_withdrawn(ProviderKind::Dify, connect)
        .await
}

#[sqlx::test]
async fn gptbots(_: PgPoolOptions, connect: PgConnectOptions) {
    a_submit_whose_lease_ran_out_while_it_was_recorded_is_withdrawn(ProviderKind::Gptbots, connect)
        .await
}
