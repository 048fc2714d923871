//! `wfq retry` of a run that failed `POLL_DEADLINE` resumes it in place with
//! a deadline of its own (issue 14): measured from the resume, not from the
//! original submit, so the run is followed again instead of failing on its
//! first status check.

mod common;

use std::time::Duration;

use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::config::ProviderKind;
use wfq::store::{self, RetryOutcome};

const DEADLINE_SECS: f64 = 3.0;

#[sqlx::test]
async fn a_retried_poll_deadline_run_is_followed_until_its_own_deadline(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(connect)
        .await
        .unwrap();
    // The run goes on at the provider for the whole test: it outlasts the
    // 3 s deadline after its submit, and the fresh 3 s after the retry.
    let sim = start_sim(20, 600_000, 50).await;
    let cfg = config(
        &sim,
        "w1",
        "[poll]\ninitial = \"50ms\"\nmax = \"200ms\"\njitter = 0.1\ndeadline = \"3s\"\n",
    );
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "slow"})).await;
    let worker = start_worker(cfg, pool.clone());
    wait_for(
        &pool,
        &format!("(SELECT state = 'failed' FROM wfq.runs WHERE id = {id})"),
        Duration::from_secs(30),
    )
    .await;
    let row = run(&pool, id).await;
    assert_eq!(row.error_code.as_deref(), Some("POLL_DEADLINE"), "{row:?}");

    let outcome = store::retry_run(&pool, id, &[]).await.unwrap();
    assert_eq!(outcome, RetryOutcome::Resumed(id));
    wait_all_final(&pool, Duration::from_secs(30)).await;
    worker.stop().await;

    // Followed again after the resume (the old deadline would have ended
    // it at the first status check), until a full deadline of its own: both
    // measured on the database's clock, which the worker's check uses too.
    let polled_after_resume: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wfq.run_events WHERE run_id = $1 AND kind = 'polled' \
         AND id > (SELECT max(id) FROM wfq.run_events WHERE run_id = $1 AND kind = 'resumed')",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(polled_after_resume >= 1, "never polled after the resume");
    let row = run(&pool, id).await;
    assert_eq!(row.state, "failed", "{row:?}");
    assert_eq!(row.error_code.as_deref(), Some("POLL_DEADLINE"), "{row:?}");
    let followed_for: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at - resumed_at)::float8 FROM wfq.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        followed_for >= DEADLINE_SECS,
        "ended {followed_for} s after the resume"
    );
    // Resumed with its own key: still one run at the provider.
    let runs = provider_runs(&sim, ProviderKind::Chenyu);
    assert_eq!(runs[&row.idempotency_key].len(), 1);
    sim.shutdown().await;
}
