//! The queue's SQL on its own: claims, leases, compare-and-set.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;

use wfq::lifecycle::{self, RunState};
use wfq::store::{self, ClaimScope, NewRun};

const LEASE: Duration = Duration::from_secs(60);

fn chenyu() -> ClaimScope {
    ClaimScope::all_of(&["chenyu".to_owned()])
}

async fn insert(pool: &PgPool, priority: i32, not_before_secs: Option<i64>) -> i64 {
    store::enqueue_run(
        pool,
        &NewRun {
            workflow_id: "wf".into(),
            inputs: json!({}),
            priority,
            not_before: not_before_secs.map(|s| chrono::Utc::now() + chrono::Duration::seconds(s)),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// Ends run `id`'s lease a second ago; a leased run is due when its lease
/// ends, so it is due again too.
async fn expire_lease(pool: &PgPool, id: i64) {
    sqlx::query(
        "UPDATE wfq.runs SET lease_expires_at = now() - interval '1 second', \
         due_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn claims_take_due_runs_by_priority_and_skip_future_ones(pool: PgPool) {
    let low = insert(&pool, -5, None).await;
    let high = insert(&pool, 100, None).await;
    let normal = insert(&pool, 0, None).await;
    let _later = insert(&pool, 1000, Some(3600)).await;
    let claimed = store::claim_due_runs(&pool, "w1", 10, LEASE, &chenyu())
        .await
        .unwrap();
    let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![high, normal, low]);
    assert!(
        claimed
            .iter()
            .all(|r| r.state == RunState::Queued && r.rescued_from.is_none())
    );
    // The future run sets the next wake-up time; leased runs do not.
    let next = store::next_due_in(&pool, &chenyu()).await.unwrap().unwrap();
    assert!(next > Duration::from_secs(59 * 60), "{next:?}");
}

#[sqlx::test]
async fn a_worker_only_takes_runs_of_its_profiles(pool: PgPool) {
    let ours = insert(&pool, 0, None).await;
    let other = |state: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO wfq.runs (provider, workflow_id, state, sent_inputs, revision_id) \
                 VALUES ('other', 'wf', $1, '{}', 'r') RETURNING id",
            )
            .bind(state)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let queued_elsewhere = other("queued").await;
    let _submitting_elsewhere = other("submitting").await;
    let _running_elsewhere = other("running").await;
    let strict = store::claim_due_runs(&pool, "w1", 10, LEASE, &chenyu())
        .await
        .unwrap();
    assert_eq!(strict.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ours]);
    // Failing unknown profiles takes their queued runs only: a submitted run
    // of another profile may hold money and is never touched.
    let mut scope = chenyu();
    scope.add("other", &[RunState::Queued]);
    let loose = store::claim_due_runs(&pool, "w2", 10, LEASE, &scope)
        .await
        .unwrap();
    assert_eq!(
        loose.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![queued_elsewhere]
    );
    // A scope without lanes (every profile paused) claims nothing.
    let paused = ClaimScope::default();
    sqlx::query("UPDATE wfq.runs SET lease_owner = NULL, lease_expires_at = NULL, due_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        store::claim_due_runs(&pool, "w3", 10, LEASE, &paused)
            .await
            .unwrap()
            .is_empty()
    );
}

#[sqlx::test]
async fn concurrent_claims_never_overlap(pool: PgPool) {
    for _ in 0..40 {
        insert(&pool, 0, None).await;
    }
    let claims = futures_util::future::join_all((0..4).map(|i| {
        let pool = pool.clone();
        async move {
            store::claim_due_runs(&pool, &format!("w{i}"), 15, LEASE, &chenyu())
                .await
                .unwrap()
        }
    }))
    .await;
    let mut ids: Vec<i64> = claims.iter().flatten().map(|r| r.id).collect();
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "a run was claimed twice");
    assert_eq!(total, 40);
}

#[sqlx::test]
async fn a_leased_run_is_rescued_only_after_its_lease_expires(pool: PgPool) {
    let id = insert(&pool, 0, None).await;
    let first = store::claim_due_runs(&pool, "w1", 1, LEASE, &chenyu())
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert!(
        store::claim_due_runs(&pool, "w2", 1, LEASE, &chenyu())
            .await
            .unwrap()
            .is_empty()
    );
    expire_lease(&pool, id).await;
    let rescued = store::claim_due_runs(&pool, "w2", 1, LEASE, &chenyu())
        .await
        .unwrap();
    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].rescued_from.as_deref(), Some("w1"));

    // The first worker wakes up and tries to record its step: refused, no event.
    let t = lifecycle::begin_submit(Some("wfr"), json!({}), uuid::Uuid::new_v4());
    let stale = store::apply_transition(
        &pool,
        id,
        first[0].version,
        RunState::Queued,
        "w1",
        LEASE,
        &t,
    )
    .await
    .unwrap();
    assert_eq!(stale, None);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.run_events WHERE run_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 0);
    // The new holder's write goes through and bumps the version.
    let applied = store::apply_transition(
        &pool,
        id,
        rescued[0].version,
        RunState::Queued,
        "w2",
        LEASE,
        &t,
    )
    .await
    .unwrap();
    assert_eq!(applied, Some(rescued[0].version + 1));
}

#[sqlx::test]
async fn releasing_leases_makes_runs_claimable_at_once(pool: PgPool) {
    for _ in 0..3 {
        insert(&pool, 0, None).await;
    }
    assert_eq!(
        store::claim_due_runs(&pool, "w1", 10, LEASE, &chenyu())
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(store::release_leases(&pool, "w1").await.unwrap(), 3);
    assert_eq!(
        store::claim_due_runs(&pool, "w2", 10, LEASE, &chenyu())
            .await
            .unwrap()
            .len(),
        3
    );
    let released: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wfq.run_events WHERE kind = 'lease_released'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(released, 3);
}

#[sqlx::test]
async fn inserts_notify_once_per_statement_and_finals_notify_per_run(pool: PgPool) {
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener
        .listen_all(["wfq_runs_due", "wfq_run_finished"])
        .await
        .unwrap();
    sqlx::query("INSERT INTO wfq.runs (workflow_id) SELECT 'wf' FROM generate_series(1, 50)")
        .execute(&pool)
        .await
        .unwrap();
    let first = listener.recv().await.unwrap();
    assert_eq!(first.channel(), "wfq_runs_due");
    let id = insert(&pool, 0, Some(3600)).await;
    let second = listener.recv().await.unwrap();
    assert_eq!(second.channel(), "wfq_runs_due");
    // PostgreSQL folds identical notifications of one transaction, so only
    // the catalog can show the trigger is per statement (bit 0 of tgtype = ROW).
    let per_row: i16 = sqlx::query_scalar(
        "SELECT (tgtype & 1)::int2 FROM pg_trigger WHERE tgname = 'runs_inserted_notify'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(per_row, 0, "the insert trigger must fire per statement");
    store::cancel_run(&pool, id, None, &[]).await.unwrap();
    let finished = listener.recv().await.unwrap();
    assert_eq!(finished.channel(), "wfq_run_finished");
    assert_eq!(finished.payload(), id.to_string());
}

#[sqlx::test]
async fn a_runs_key_and_target_cannot_change_under_a_worker(pool: PgPool) {
    let id = insert(&pool, 0, None).await;
    let err = sqlx::query("UPDATE wfq.runs SET idempotency_key = 'other' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .expect_err("the key never changes");
    assert!(
        err.to_string().contains("idempotency_key cannot change"),
        "{err}"
    );
    // Before any worker took it, the producer may still fix the workflow.
    sqlx::query("UPDATE wfq.runs SET workflow_id = 'wf2' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    store::claim_due_runs(&pool, "w1", 1, LEASE, &chenyu())
        .await
        .unwrap();
    let err = sqlx::query("UPDATE wfq.runs SET provider = 'elsewhere' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .expect_err("leased");
    assert!(
        err.to_string()
            .contains("cannot change once a worker has taken the run"),
        "{err}"
    );
}

#[sqlx::test]
async fn reporting_views_add_up_and_flag_problems(pool: PgPool) {
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, state, submitted_at, settled_at, currency, frozen_amount, final_amount, released_amount, \
                               compute_cost, external_model_cost, total_cost) VALUES \
         ('wf_a', 'succeeded', now(), now(), 'CNY', 0.03, 0.01, 0.02, 0.01, 0, 0.01), \
         ('wf_a', 'failed',    now(), now(), 'CNY', 0.03, 0.005, 0.025, 0.005, 0, 0.005), \
         ('wf_a', 'running',   now(), NULL,  'CNY', 0.03, NULL, NULL, NULL, NULL, NULL), \
         ('wf_b', 'succeeded', now(), now(), 'CNY', 1.00, 0.60, 0.30, 0.20, 0.40, 0.61)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (runs, frozen, final_amount, outstanding): (i64, rust_decimal::Decimal, rust_decimal::Decimal, rust_decimal::Decimal) =
        sqlx::query_as("SELECT runs, frozen, final, outstanding_frozen FROM wfq.daily_costs WHERE workflow_id = 'wf_a'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(runs, 3);
    assert_eq!(frozen.to_string(), "0.09");
    assert_eq!(final_amount.to_string(), "0.015");
    assert_eq!(outstanding.to_string(), "0.03");
    let problems: Vec<String> = sqlx::query_scalar("SELECT problem FROM wfq.settlement_mismatches")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(problems, vec!["frozen <> final + released"]);
    sqlx::query(
        "UPDATE wfq.runs SET submitted_at = now() - interval '2 hours' WHERE state = 'running'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let stuck: Vec<String> = sqlx::query_scalar("SELECT reason FROM wfq.stuck_runs")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(stuck, vec!["running for over an hour"]);
}

#[sqlx::test]
async fn pruning_deletes_old_settled_runs_and_their_events_only(pool: PgPool) {
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, state, finished_at, settled_at) VALUES \
         ('old', 'succeeded', now() - interval '40 days', now() - interval '40 days'), \
         ('old', 'canceled', now() - interval '40 days', now() - interval '40 days'), \
         ('old-unsettled', 'failed', now() - interval '40 days', NULL), \
         ('recent', 'succeeded', now() - interval '1 day', now() - interval '1 day'), \
         ('active', 'running', NULL, NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO wfq.run_events (run_id, kind) SELECT id, 'x' FROM wfq.runs")
        .execute(&pool)
        .await
        .unwrap();
    let deleted = store::prune_finished_runs(&pool, Duration::from_secs(30 * 86400), 1)
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    let left: Vec<String> = sqlx::query_scalar("SELECT workflow_id FROM wfq.runs ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, vec!["old-unsettled", "recent", "active"]);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.run_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 3, "events go with their runs");
}

/// A step that outlived its lease and the step of the same worker that took
/// the run over may land in one batch: only the current version is applied,
/// and each write gets its own answer (matched by position, not run id).
#[sqlx::test]
async fn a_batch_with_two_writes_of_one_run_answers_each_write(pool: PgPool) {
    let id = insert(&pool, 0, None).await;
    let old = store::claim_due_runs(&pool, "w1", 1, LEASE, &chenyu())
        .await
        .unwrap();
    expire_lease(&pool, id).await;
    let new = store::claim_due_runs(&pool, "w1", 1, LEASE, &chenyu())
        .await
        .unwrap();
    let t = lifecycle::begin_submit(Some("wfr"), json!({}), uuid::Uuid::new_v4());
    let write = |version| store::TransitionWrite {
        id,
        version,
        from: RunState::Queued,
        transition: t.clone(),
        token: uuid::Uuid::new_v4(),
    };
    let answers = store::apply_transitions(
        &pool,
        "w1",
        LEASE,
        &[write(new[0].version), write(old[0].version)],
    )
    .await
    .unwrap();
    assert_eq!(answers, vec![Some(new[0].version + 1), None]);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.run_events WHERE run_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 1, "one transition, one event");
}

async fn due_and_lease_in_secs(pool: &PgPool, id: i64) -> (f64, Option<f64>) {
    sqlx::query_as(
        "SELECT extract(epoch FROM due_at - now())::float8, \
                extract(epoch FROM lease_expires_at - now())::float8 \
         FROM wfq.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn a_leased_run_is_due_when_its_lease_ends_and_due_now_when_let_go(pool: PgPool) {
    let id = insert(&pool, 0, None).await;
    // The claim loop's own connection claims like the pool does.
    let mut claims = store::ClaimConnection::new(&pool);
    // PostgreSQL takes the settings at connect time: one round trip a claim.
    assert!(claims.has_session_settings().await.unwrap());
    let run = claims
        .claim("w1", 1, LEASE, &chenyu())
        .await
        .unwrap()
        .pop()
        .unwrap();
    let (due, lease) = due_and_lease_in_secs(&pool, id).await;
    assert!(due > 0.0 && due <= 60.0, "due in {due}s");
    assert_eq!(Some(due), lease, "due_at is the lease's end");
    // Nothing to wake up for: the only run is leased.
    let next = claims.next_due_in(&chenyu()).await.unwrap();
    assert!(next.is_none(), "{next:?}");

    // `submitting` keeps the lease: due at the renewed lease's end.
    let begin = lifecycle::begin_submit(None, json!({}), uuid::Uuid::new_v4());
    let version = store::apply_transition(
        &pool,
        id,
        run.version,
        RunState::Queued,
        "w1",
        LEASE,
        &begin,
    )
    .await
    .unwrap()
    .unwrap();
    let (due, lease) = due_and_lease_in_secs(&pool, id).await;
    assert!(
        (59.0..=60.0).contains(&due) && Some(due) == lease,
        "{due} {lease:?}"
    );

    // Let go with a schedule: due then; without one: due now.
    let later = lifecycle::Transition {
        keep_lease: false,
        due_at: Some(chrono::Utc::now() + chrono::Duration::seconds(30)),
        ..begin.clone()
    };
    store::apply_transition(
        &pool,
        id,
        version,
        RunState::Submitting,
        "w1",
        LEASE,
        &later,
    )
    .await
    .unwrap()
    .unwrap();
    let (due, lease) = due_and_lease_in_secs(&pool, id).await;
    assert!(
        (29.0..=30.0).contains(&due) && lease.is_none(),
        "{due} {lease:?}"
    );
    assert!(
        store::claim_due_runs(&pool, "w1", 1, LEASE, &chenyu())
            .await
            .unwrap()
            .is_empty()
    );
    sqlx::query("UPDATE wfq.runs SET due_at = now() WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let run = claims
        .claim("w1", 1, LEASE, &chenyu())
        .await
        .unwrap()
        .pop()
        .unwrap();
    let now = lifecycle::Transition {
        keep_lease: false,
        ..begin
    };
    store::apply_transition(
        &pool,
        id,
        run.version,
        RunState::Submitting,
        "w1",
        LEASE,
        &now,
    )
    .await
    .unwrap()
    .unwrap();
    let (due, lease) = due_and_lease_in_secs(&pool, id).await;
    assert!(due <= 0.0 && lease.is_none(), "{due} {lease:?}");
}

/// A worker that starts on an empty, analysed table and then gets a burst must still
/// walk the claim index in order: no sort of every due run, no sequential
/// scan, whatever the statistics and the plan cache say. (Without
/// `CLAIM_SETTINGS` this plan was a nested loop over a sequential scan.)
#[sqlx::test]
async fn the_claim_walks_the_claim_index_after_a_burst_into_an_empty_table(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    // The queue was empty when autovacuum last looked (as after a quiet
    // night, or a TRUNCATE).
    sqlx::query("VACUUM ANALYZE wfq.runs")
        .execute(&mut *conn)
        .await
        .unwrap();
    for (name, value) in store::CLAIM_SETTINGS {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET {name} = '{value}'")))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PREPARE claim (text, int8, float8, text[], text[]) AS {}",
        store::CLAIM_DUE_RUNS_SQL
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    let execute = "claim ('w1', 100, 60, '{chenyu,chenyu,chenyu}', '{queued,submitting,running}')";
    // Enough runs on the empty table for a generic plan to be considered.
    for _ in 0..8 {
        sqlx::query(sqlx::AssertSqlSafe(format!("EXECUTE {execute}")))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) \
         SELECT 'wf', jsonb_build_object('n', g) FROM generate_series(1, 20000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN EXECUTE {execute}")))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using runs_claim_lane_idx"),
        "{plan}"
    );
    assert!(plan.contains("Index Cond: (id = due.id)"), "{plan}");
    // Each lane's and priority's due runs are one index range, not a walk
    // past every run in flight.
    assert!(
        plan.lines()
            .any(|l| l.contains("Index Cond: ((provider = p")
                && l.contains("AND (priority = p")
                && l.contains("AND (due_at <= now()))")),
        "{plan}"
    );
    for bad in ["Seq Scan", "Join Filter", "JIT"] {
        assert!(!plan.contains(bad), "{bad} in\n{plan}");
    }
    // What is sorted is the few candidates the lanes yielded (at most the
    // claim's limit per lane and priority), never the runs in flight.
    for line in plan.lines().filter(|l| l.contains("Sort Key:")) {
        assert!(
            line.contains("candidates.") || line.contains("turns.") || line.contains("claimed."),
            "a sort of runs: {line}\n{plan}"
        );
    }
}

/// A claim's cost does not grow with the due runs of profiles outside its
/// lanes (a paused profile, one this worker does not serve): they are not
/// in any index range the claim walks.
#[sqlx::test]
async fn a_claim_reads_nothing_of_a_paused_profiles_backlog(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO wfq.runs (provider, workflow_id, inputs) \
         SELECT 'paused', 'wf', jsonb_build_object('n', g) FROM generate_series(1, 100000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) \
         SELECT 'wf', jsonb_build_object('n', g) FROM generate_series(1, 5) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE wfq.runs")
        .execute(&mut *conn)
        .await
        .unwrap();
    for (name, value) in store::CLAIM_SETTINGS {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET {name} = '{value}'")))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) {}",
        store::CLAIM_DUE_RUNS_SQL
            .replace("$1", "'w1'")
            .replace("$2", "100")
            .replace("$3", "60")
            .replace("$4::text[]", "'{chenyu,chenyu,chenyu}'::text[]")
            .replace("$5::text[]", "'{queued,submitting,running}'::text[]")
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let plan = plan.join("\n");
    // The five chenyu runs were claimed...
    let claimed: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE lease_owner = 'w1'")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(claimed, 5, "{plan}");
    // ...reading a few dozen pages, where a walk past the paused profile's
    // runs reads thousands (100,000 index entries and their rows).
    let top_buffers: u64 = plan
        .lines()
        .find_map(|l| l.trim().strip_prefix("Buffers: shared hit="))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a buffer count");
    assert!(top_buffers < 300, "{top_buffers} buffers:\n{plan}");
}

/// A claim locks the rows it reads `FOR NO KEY UPDATE`: while the claim's
/// transaction is still open, an event of a run it took can be inserted
/// (the foreign key to `wfq.runs` takes a `FOR KEY SHARE` lock on the run,
/// which `FOR UPDATE` would block until the claim commits).
#[sqlx::test]
async fn an_open_claim_does_not_block_inserts_of_its_runs_events(pool: PgPool) {
    use sqlx::Row;
    let id = insert(&pool, 0, None).await;
    let mut claim = pool.begin().await.unwrap();
    let claimed: Vec<i64> = sqlx::query(store::CLAIM_DUE_RUNS_SQL)
        .bind("w1")
        .bind(10_i64)
        .bind(LEASE.as_secs_f64())
        .bind(vec!["chenyu".to_owned()])
        .bind(vec!["queued".to_owned()])
        .fetch_all(&mut *claim)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get("id"))
        .collect();
    assert_eq!(claimed, vec![id]);

    let mut other = pool.acquire().await.unwrap();
    sqlx::query("SET lock_timeout = '2s'")
        .execute(&mut *other)
        .await
        .unwrap();
    // The claim holds the row: another claim's lock waits for it.
    let locked = sqlx::query("SELECT 1 FROM wfq.runs WHERE id = $1 FOR NO KEY UPDATE NOWAIT")
        .bind(id)
        .execute(&mut *other)
        .await
        .expect_err("the open claim holds the run's row");
    let code = locked
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("55P03"), "{locked}");
    // An event of that run goes in at once.
    let inserted = sqlx::query(
        "INSERT INTO wfq.run_events (run_id, kind, worker) VALUES ($1, 'note', 'w2') RETURNING id",
    )
    .bind(id)
    .fetch_one(&mut *other)
    .await;
    assert!(
        inserted.is_ok(),
        "an event insert waited for the claim's row lock: {inserted:?}"
    );
    claim.commit().await.unwrap();
    assert_eq!(
        store::run_events(&pool, id)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.kind == "note")
            .count(),
        1
    );
}
