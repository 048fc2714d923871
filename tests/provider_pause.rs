//! Wrong credentials do not burn the queue: a 401 pauses the provider
//! profile (runs wait, none fails), and a probe resumes it by itself once the
//! provider accepts the key again.

mod common;

use std::time::Duration;

use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::sim::Faults;
use wfq::store;

#[sqlx::test]
async fn a_refused_key_pauses_the_profile_until_a_probe_succeeds(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(0, 100, 50).await;
    sim.set_faults(Faults {
        refuse_keys: true,
        ..Default::default()
    });
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(enqueue(&pool, TEXT_TO_IMAGE, json!({})).await);
    }
    let mut cfg = config(&sim, "w1", "");
    cfg.worker.auth_probe = Duration::from_millis(300);
    let worker = start_worker(cfg, pool.clone());
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.provider_pauses WHERE profile = 'chenyu')",
        Duration::from_secs(30),
    )
    .await;
    // Probes keep failing for a while; the runs must not be touched meanwhile.
    wait_for(
        &pool,
        "now() - (SELECT paused_at FROM wfq.provider_pauses WHERE profile = 'chenyu') > interval '1 second'",
        Duration::from_secs(30),
    )
    .await;
    let pauses = store::paused_providers(&pool).await.unwrap();
    assert_eq!(pauses.len(), 1);
    assert!(pauses[0].reason.contains("401"), "{:?}", pauses[0]);
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'failed'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failed, 0, "a refused key fails no run");
    // The runs tried before the pause are the first claim's at most; the
    // probes since (one per interval, however long this took) touch none.
    let tried: i64 = sqlx::query_scalar("SELECT count(DISTINCT run_id) FROM wfq.run_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        tried < 20,
        "the profile paused instead of trying every run: {tried} runs tried"
    );
    assert!(sim.stats().unauthorized >= 1);

    // The key works again (fixed at the provider): the next probe resumes.
    sim.set_faults(Faults::default());
    wait_all_final(&pool, Duration::from_secs(120)).await;
    worker.stop().await;
    for id in ids {
        assert_eq!(run(&pool, id).await.state, "succeeded");
    }
    assert!(
        store::paused_providers(&pool).await.unwrap().is_empty(),
        "the pause is cleared"
    );
    assert!(sim.ledger().iter().all(|e| e.charges == 1));
    sim.shutdown().await;
}
