//! The worker registry's SQL on its own: a liveness lock per worker,
//! probes and rescues that read only PostgreSQL's lock table, claims that
//! tell why they took a run over, renewals that touch only this worker's
//! runs, and the fleet view.

use std::time::Duration;

use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};

use wfq::lifecycle::RunState;
use wfq::store::{self, ClaimScope, NewRun, RescueCause, WorkerInfo};

const LEASE: Duration = Duration::from_secs(600);

/// The rescue policy of a worker with only GPTBots-like profiles: a
/// submit in flight is left to its sender for 30 s.
fn policy() -> store::RescuePolicy<'static> {
    store::RescuePolicy {
        replaying_profiles: &[],
        submit_grace: Duration::from_secs(30),
    }
}

fn chenyu() -> ClaimScope {
    ClaimScope::all_of(&["chenyu".to_owned()])
}

fn info(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.to_owned(),
        host: "test-host".to_owned(),
        pid: 4242,
        version: "test".to_owned(),
        started_at: chrono::Utc::now(),
        profiles: vec!["chenyu".to_owned()],
        concurrency: 8,
    }
}

/// A worker's liveness session: its own connection, lock taken, row written.
async fn register(pool: &PgPool, id: &str) -> (PgConnection, i32) {
    let mut conn = PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    store::configure_liveness_session(
        &mut conn,
        &store::SessionKeepalives {
            idle: Duration::from_secs(5),
            interval: Duration::from_secs(1),
            count: 5,
            user_timeout: Duration::from_secs(10),
            lock_wait: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let lock_id = store::lock_worker(&mut conn, id).await.unwrap();
    assert!(
        store::upsert_worker(&mut conn, &info(id), Some(lock_id))
            .await
            .unwrap()
    );
    (conn, lock_id)
}

/// Ends a liveness session and waits until PostgreSQL has let go of its
/// lock (the backend exits a moment after the connection closes). Only
/// this test's database counts: `pg_locks` shows the whole server, where
/// the workers of other databases hold locks with the same numbers.
async fn end_session(pool: &PgPool, conn: PgConnection, lock_id: i32) {
    conn.close().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let held: bool = sqlx::query_scalar(
            // This database's lock only: the tests of this file run at once,
            // each in a database of its own, with the same lock ids.
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = $1::oid AND objid = $2::oid AND objsubid = 2)",
        )
        .bind(store::LIVENESS_LOCK_NAMESPACE)
        .bind(lock_id)
        .fetch_one(pool)
        .await
        .unwrap();
        if !held {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session's lock stays"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn insert(pool: &PgPool) -> i64 {
    store::enqueue_run(
        pool,
        &NewRun {
            workflow_id: "wf".into(),
            inputs: json!({}),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn died(pool: &PgPool, id: &str) -> (Option<chrono::DateTime<chrono::Utc>>, Option<String>) {
    sqlx::query_as("SELECT died_at, died_cause FROM wfq.workers WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_worker_whose_session_ends_is_found_and_its_runs_rescued_as_a_crash(pool: PgPool) {
    let (doomed, doomed_lock) = register(&pool, "doomed").await;
    let (_rescuer, _) = register(&pool, "rescuer").await;
    let a = insert(&pool).await;
    let b = insert(&pool).await;
    let held = store::claim_due_runs(&pool, "doomed", 2, LEASE, &chenyu())
        .await
        .unwrap();
    assert_eq!(held.len(), 2);

    // Alive: its lock is held, nothing to do, and the view says so.
    let probes = store::probe_workers(&pool, "rescuer", LEASE).await.unwrap();
    assert_eq!(
        probes,
        [store::WorkerProbe {
            id: "doomed".into(),
            marked_dead: false,
            gone: false
        }]
    );
    let fleet = store::list_workers(&pool).await.unwrap();
    let row = fleet.iter().find(|w| w.id == "doomed").unwrap();
    assert_eq!((row.alive, row.runs_in_hand), (Some(true), 2));
    assert!(
        store::claim_due_runs(&pool, "rescuer", 2, LEASE, &chenyu())
            .await
            .unwrap()
            .is_empty(),
        "a live worker's leases hold"
    );

    // Its session ends (the process died): the lock is free at once.
    end_session(&pool, doomed, doomed_lock).await;
    let probes = store::probe_workers(&pool, "rescuer", LEASE).await.unwrap();
    assert_eq!(probes.len(), 1);
    assert!(probes[0].gone && !probes[0].marked_dead, "{probes:?}");
    let rescued = store::rescue_workers(&pool, "rescuer", &["doomed".to_owned()], policy())
        .await
        .unwrap();
    assert_eq!(rescued.died, ["doomed"]);
    assert_eq!(rescued.runs, 2);
    let (died_at, cause) = died(&pool, "doomed").await;
    assert!(died_at.is_some());
    assert_eq!(cause.as_deref(), Some("crash"));
    let row = store::list_workers(&pool).await.unwrap();
    let row = row.iter().find(|w| w.id == "doomed").unwrap();
    assert_eq!(row.alive, Some(false));

    // The next claim takes the runs without waiting for the 10-minute
    // lease, and says why.
    let taken = store::claim_due_runs(&pool, "rescuer", 5, LEASE, &chenyu())
        .await
        .unwrap();
    let mut ids: Vec<i64> = taken.iter().map(|r| r.id).collect();
    ids.sort();
    assert_eq!(ids, [a, b]);
    for run in &taken {
        assert_eq!(run.rescued_from.as_deref(), Some("doomed"));
        assert_eq!(run.rescue_cause, Some(RescueCause::Crash));
    }
    store::record_rescue(
        &pool,
        a,
        RunState::Queued,
        "doomed",
        RescueCause::Crash,
        "rescuer",
    )
    .await
    .unwrap();
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM wfq.run_events WHERE run_id = $1 AND kind = 'lease_rescued'",
    )
    .bind(a)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        detail,
        json!({"previous_owner": "doomed", "cause": "crash"})
    );

    // Marked dead and holding nothing: left alone from now on.
    assert!(
        store::probe_workers(&pool, "rescuer", LEASE)
            .await
            .unwrap()
            .is_empty()
    );
}

#[sqlx::test]
async fn a_worker_is_never_its_own_rescuer_and_a_returning_worker_is_left_alone(pool: PgPool) {
    let (cut, lock_id) = register(&pool, "cut").await;
    // Its own probe skips itself (a session that holds a lock would get it again).
    assert!(
        store::probe_workers(&pool, "cut", LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store::rescue_workers(&pool, "cut", &["cut".to_owned()], policy())
            .await
            .unwrap()
            .died
            .is_empty()
    );
    // Cut off and back on a new session before anyone acted: the rescue
    // finds the lock held again and does nothing.
    end_session(&pool, cut, lock_id).await;
    let (back, again) = register(&pool, "cut").await;
    assert_eq!(again, lock_id, "the same lock id");
    let rescued = store::rescue_workers(&pool, "other", &["cut".to_owned()], policy())
        .await
        .unwrap();
    assert_eq!(rescued, store::Rescued::default());
    assert_eq!(died(&pool, "cut").await.0, None);

    // A second session with the same worker id cannot take the lock.
    let mut twin = PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    sqlx::query("SET lock_timeout = '200ms'")
        .execute(&mut twin)
        .await
        .unwrap();
    let refused = store::lock_worker(&mut twin, "cut").await.unwrap_err();
    let sqlx::Error::Database(e) = &refused else {
        panic!("{refused:?}")
    };
    assert_eq!(e.code().as_deref(), Some("55P03"));

    // Found dead, then back: registering clears died_at.
    end_session(&pool, back, lock_id).await;
    let rescued = store::rescue_workers(&pool, "other", &["cut".to_owned()], policy())
        .await
        .unwrap();
    assert_eq!(rescued.died, ["cut"]);
    let mut cut = register(&pool, "cut").await.0;
    assert_eq!(died(&pool, "cut").await, (None, None));
    let (pid, exists): (i32, bool) = store::worker_heartbeat(&mut cut, "cut").await.unwrap();
    assert!(exists && pid > 0);
    let own_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut cut)
        .await
        .unwrap();
    assert_eq!(pid, own_pid, "answered by the session that holds the lock");
    store::worker_stopped(&mut cut, "cut").await.unwrap();
    assert_eq!(died(&pool, "cut").await.1.as_deref(), Some("stopped"));
}

#[sqlx::test]
async fn a_lease_that_ran_out_is_rescued_with_its_own_cause(pool: PgPool) {
    let (_frozen, _) = register(&pool, "frozen").await;
    let id = insert(&pool).await;
    store::claim_due_runs(&pool, "frozen", 1, LEASE, &chenyu())
        .await
        .unwrap();
    // Alive (its session is open) but its lease ended: a SIGSTOP, say.
    sqlx::query(
        "UPDATE wfq.runs SET lease_expires_at = now() - interval '1 second', due_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let taken = store::claim_due_runs(&pool, "other", 1, LEASE, &chenyu())
        .await
        .unwrap();
    assert_eq!(taken[0].rescue_cause, Some(RescueCause::LeaseExpiry));
    // A worker that never registered (an older version) counts the same.
    sqlx::query(
        "UPDATE wfq.runs SET lease_owner = 'unregistered', lease_expires_at = now() - interval '1 second', due_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let taken = store::claim_due_runs(&pool, "other", 1, LEASE, &chenyu())
        .await
        .unwrap();
    assert_eq!(taken[0].rescued_from.as_deref(), Some("unregistered"));
    assert_eq!(taken[0].rescue_cause, Some(RescueCause::LeaseExpiry));
    // A run claimed fresh has neither.
    let fresh = insert(&pool).await;
    let taken = store::claim_due_runs(&pool, "other", 1, LEASE, &chenyu())
        .await
        .unwrap();
    assert_eq!(taken[0].id, fresh);
    assert_eq!(
        (taken[0].rescued_from.as_deref(), taken[0].rescue_cause),
        (None, None)
    );
}

#[sqlx::test]
async fn a_claim_or_write_that_lands_after_a_workers_death_is_rescued_too(pool: PgPool) {
    let (doomed, doomed_lock) = register(&pool, "doomed").await;
    let (_rescuer, _) = register(&pool, "rescuer").await;
    end_session(&pool, doomed, doomed_lock).await;
    let rescued = store::rescue_workers(&pool, "rescuer", &["doomed".to_owned()], policy())
        .await
        .unwrap();
    assert_eq!((rescued.died.len(), rescued.runs), (1, 0));
    // Its last claim committed after the rescuer looked.
    let id = insert(&pool).await;
    store::claim_due_runs(&pool, "doomed", 1, LEASE, &chenyu())
        .await
        .unwrap();
    let probes = store::probe_workers(&pool, "rescuer", LEASE).await.unwrap();
    assert_eq!(
        probes,
        [store::WorkerProbe {
            id: "doomed".into(),
            marked_dead: true,
            gone: true
        }]
    );
    let rescued = store::rescue_workers(&pool, "rescuer", &["doomed".to_owned()], policy())
        .await
        .unwrap();
    assert!(rescued.died.is_empty(), "marked once");
    assert_eq!(rescued.runs, 1);
    let taken = store::claim_due_runs(&pool, "rescuer", 1, LEASE, &chenyu())
        .await
        .unwrap();
    assert_eq!(taken[0].id, id);
    assert_eq!(taken[0].rescue_cause, Some(RescueCause::Crash));
    // A worker dead for longer than a lease is not looked at any more, and
    // its row goes once it is old enough.
    sqlx::query("UPDATE wfq.workers SET died_at = now() - interval '2 days' WHERE id = 'doomed'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        store::probe_workers(&pool, "rescuer", LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store::forget_dead_workers(&pool, Duration::from_secs(86_400))
            .await
            .unwrap(),
        1
    );
    let left: Vec<String> = sqlx::query_scalar("SELECT id FROM wfq.workers")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, ["rescuer"]);
}

#[sqlx::test]
async fn renewals_touch_only_this_workers_runs_and_idle_leases_are_given_back(pool: PgPool) {
    let mine = insert(&pool).await;
    let idle = insert(&pool).await;
    let theirs = insert(&pool).await;
    let short = Duration::from_secs(30);
    store::claim_due_runs(&pool, "me", 2, short, &chenyu())
        .await
        .unwrap();
    store::claim_due_runs(&pool, "them", 1, short, &chenyu())
        .await
        .unwrap();
    let version_before: i64 = sqlx::query_scalar("SELECT version FROM wfq.runs WHERE id = $1")
        .bind(mine)
        .fetch_one(&pool)
        .await
        .unwrap();
    let renewed = store::renew_leases(&pool, "me", &[mine, theirs], LEASE)
        .await
        .unwrap();
    assert_eq!(renewed, [mine], "another worker's run is never renewed");
    let (lease_left, due_left, version): (f64, f64, i64) = sqlx::query_as(
        "SELECT extract(epoch FROM lease_expires_at - now())::float8, \
         extract(epoch FROM due_at - now())::float8, version FROM wfq.runs WHERE id = $1",
    )
    .bind(mine)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        lease_left > 500.0 && due_left > 500.0,
        "{lease_left} {due_left}"
    );
    assert_eq!(version, version_before, "a renewal is not a step's write");

    // Back from being cut off: `idle` has no step working on it any more.
    let given = store::give_back_idle_leases(&pool, "me", &[mine])
        .await
        .unwrap();
    assert_eq!(given, 1);
    let owners: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT id, lease_owner FROM wfq.runs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        owners,
        [
            (mine, Some("me".to_owned())),
            (idle, None),
            (theirs, Some("them".to_owned()))
        ]
    );
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM wfq.run_events WHERE run_id = $1")
            .bind(idle)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(kinds, ["lease_released"]);
}

/// A run of `provider` in `state` held by worker `owner` for ten minutes;
/// `in_doubt`: a submit was recorded as about to be sent.
async fn held_run(pool: &PgPool, owner: &str, provider: &str, state: &str, in_doubt: bool) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO wfq.runs (provider, workflow_id, inputs, sent_inputs, state, attempts, \
         submit_in_doubt_since, lease_owner, lease_expires_at, due_at) \
         VALUES ($1, 'wf', '{}', CASE WHEN $2 <> 'queued' THEN '{}'::jsonb END, $2, \
                 CASE WHEN $2 <> 'queued' THEN 1 ELSE 0 END, \
                 CASE WHEN $3 THEN now() END, $4, now() + interval '10 minutes', \
                 now() + interval '10 minutes') \
         RETURNING id",
    )
    .bind(provider)
    .bind(state)
    .bind(in_doubt)
    .bind(owner)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Seconds until run `id`'s lease ends.
async fn lease_left(pool: &PgPool, id: i64) -> f64 {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM lease_expires_at - now())::float8 FROM wfq.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Issue: a worker whose lock is free may be alive (its session was cut)
/// with a request in flight. Its runs are due at once, but for one with a
/// submit in flight to a provider that cannot replay it: that one stays
/// with its owner for the grace (never longer than its own lease), so the
/// owner can record the answer; later rounds change nothing.
#[sqlx::test]
async fn a_submit_in_flight_of_a_gone_worker_is_left_to_it_for_the_grace(pool: PgPool) {
    let (doomed, doomed_lock) = register(&pool, "doomed").await;
    let (_rescuer, _) = register(&pool, "rescuer").await;
    let queued = held_run(&pool, "doomed", "gptbots", "queued", false).await;
    let polled = held_run(&pool, "doomed", "gptbots", "running", false).await;
    let retrying = held_run(&pool, "doomed", "gptbots", "submitting", false).await;
    let sending = held_run(&pool, "doomed", "gptbots", "submitting", true).await;
    let replayed = held_run(&pool, "doomed", "chenyu", "submitting", true).await;
    let ending = held_run(&pool, "doomed", "dify", "submitting", true).await;
    sqlx::query(
        "UPDATE wfq.runs SET lease_expires_at = now() + interval '20 seconds' WHERE id = $1",
    )
    .bind(ending)
    .execute(&pool)
    .await
    .unwrap();
    end_session(&pool, doomed, doomed_lock).await;

    let policy = store::RescuePolicy {
        replaying_profiles: &["chenyu".to_owned()],
        submit_grace: Duration::from_secs(30),
    };
    let rescued = store::rescue_workers(&pool, "rescuer", &["doomed".to_owned()], policy)
        .await
        .unwrap();
    assert_eq!(rescued.died, ["doomed"]);
    assert_eq!((rescued.runs, rescued.deferred), (4, 1));
    let grace = lease_left(&pool, sending).await;
    assert!((25.0..=30.0).contains(&grace), "{grace}");
    let own_end = lease_left(&pool, ending).await;
    assert!(own_end <= 20.0, "never later than its own lease: {own_end}");
    // The next round (the worker still holds unexpired leases) leaves the
    // grace as it is: it never moves on.
    let again = store::rescue_workers(&pool, "rescuer", &["doomed".to_owned()], policy)
        .await
        .unwrap();
    assert_eq!(again, store::Rescued::default());
    assert!(lease_left(&pool, sending).await <= grace);

    let scope = ClaimScope::all_of(&["chenyu".to_owned(), "dify".to_owned(), "gptbots".to_owned()]);
    let taken = store::claim_due_runs(&pool, "rescuer", 10, LEASE, &scope)
        .await
        .unwrap();
    let mut ids: Vec<i64> = taken.iter().map(|r| r.id).collect();
    ids.sort();
    assert_eq!(ids, [queued, polled, retrying, replayed]);
    assert!(
        taken
            .iter()
            .all(|r| r.rescue_cause == Some(RescueCause::Crash))
    );

    // The grace over (here: moved into the past), the run is taken like
    // any other, as a crash.
    sqlx::query("UPDATE wfq.runs SET lease_expires_at = now(), due_at = now() WHERE id = $1")
        .bind(sending)
        .execute(&pool)
        .await
        .unwrap();
    let taken = store::claim_due_runs(&pool, "rescuer", 10, LEASE, &scope)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].id, sending);
    assert_eq!(taken[0].rescue_cause, Some(RescueCause::Crash));
}
