//! Upgrading a large, busy `wfq.runs` (issue 14): `wfq::store::migrate` on
//! a table of a million runs, behind a producer transaction that holds the
//! table open, never makes other producers wait longer than they tolerate,
//! and leaves every index valid once it is through.

use std::borrow::Cow;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{Connection, PgPool};

/// The last migration of the schema before the issue-14 upgrade.
const BEFORE_UPGRADE: i64 = 20261125000010;

/// How long the test's producer lets an INSERT wait for a lock.
const PRODUCER_LOCK_TIMEOUT: &str = "5s";

/// The migrations up to and including `last`.
fn migrations_up_to(last: i64) -> Migrator {
    let all = sqlx::migrate!("./migrations");
    Migrator {
        migrations: Cow::Owned(
            all.migrations
                .iter()
                .filter(|m| m.version <= last)
                .cloned()
                .collect(),
        ),
        ignore_missing: all.ignore_missing,
        locking: all.locking,
        no_tx: all.no_tx,
        table_name: all.table_name.clone(),
        create_schemas: all.create_schemas.clone(),
    }
}

async fn pool(connect: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect.clone())
        .await
        .expect("test database")
}

/// A producer that waits at most `PRODUCER_LOCK_TIMEOUT` for a lock.
async fn impatient_producer(connect: &PgConnectOptions) -> PgConnection {
    let mut conn = PgConnection::connect_with(connect).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET lock_timeout = '{PRODUCER_LOCK_TIMEOUT}'"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    conn
}

/// A producer's transaction, left open, holding its lock on `wfq.runs`.
async fn open_producer_transaction(connect: &PgConnectOptions) -> PgConnection {
    let mut conn = PgConnection::connect_with(connect).await.unwrap();
    sqlx::raw_sql("BEGIN; INSERT INTO wfq.runs (workflow_id) VALUES ('open transaction')")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// Whether someone waits for an exclusive lock on `wfq.runs` (a schema
/// change queued behind the open transaction).
async fn exclusive_lock_waiting(conn: &mut PgConnection) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = 'wfq.runs'::regclass \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND mode = 'AccessExclusiveLock' AND NOT granted)",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn produce(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('wf_producer', '{}')")
        .execute(conn)
        .await
        .map(|_| ())
}

fn lock_timed_out(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// Waits until a schema change waits for its lock on `wfq.runs`, checking
/// every 20 ms (a state the test caused, not a window of time).
async fn until_exclusive_lock_waits(conn: &mut PgConnection) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !exclusive_lock_waiting(conn).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the schema change never waited for the open transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn the_upgrade_of_a_million_runs_never_stops_producers(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    migrations_up_to(BEFORE_UPGRADE).run(&pool).await.unwrap();
    // A history of mostly finished runs, some still queued. Keys in order
    // (not the default random UUIDs): the unique index then grows at its
    // right edge, which keeps this one statement to seconds.
    sqlx::raw_sql(
        "INSERT INTO wfq.runs (workflow_id, idempotency_key, state, finished_at, settled_at) \
         SELECT 'wf_' || (g % 50), lpad(g::text, 7, '0'), \
                CASE WHEN g % 20 = 0 THEN 'queued' ELSE 'succeeded' END, now(), now() \
         FROM generate_series(1, 1000000) AS g; \
         ANALYZE wfq.runs",
    )
    .execute(&pool)
    .await
    .unwrap();

    let mut open = open_producer_transaction(&connect).await;
    let migrate_pool = pool.clone();
    let mut migration = tokio::spawn(async move { wfq::store::migrate(&migrate_pool).await });
    let mut producer = impatient_producer(&connect).await;
    let mut produced = 0;
    // While the open transaction holds the table, the upgrade's schema
    // change queues for its lock again and again: producers that arrive
    // meanwhile queue behind it, and must get through within their own
    // lock_timeout every time.
    let mut waited_behind = 0;
    while waited_behind < 3 {
        until_exclusive_lock_waits(&mut producer).await;
        waited_behind += 1;
        if let Err(e) = produce(&mut producer).await {
            panic!(
                "a producer was refused while the migration waited for its lock: {e} (lock_timed_out: {})",
                lock_timed_out(&e)
            );
        }
        produced += 1;
    }
    assert!(
        !migration.is_finished(),
        "the upgrade cannot pass the open transaction"
    );
    sqlx::raw_sql("COMMIT").execute(&mut open).await.unwrap();
    // Producers keep going while the upgrade builds its indexes.
    let migrated = loop {
        tokio::select! {
            done = &mut migration => break done.expect("the migration task"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                produce(&mut producer).await.expect("a producer is never refused");
                produced += 1;
            }
        }
    };
    migrated.expect("the upgrade completes once the transaction is over");

    let invalid: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'wfq' AND NOT i.indisvalid",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(invalid.is_empty(), "invalid indexes: {invalid:?}");
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'wfq' AND tablename = 'runs'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for built in ["runs_claim_lane_idx", "runs_lease_owner_idx"] {
        assert!(indexes.iter().any(|i| i == built), "{built}: {indexes:?}");
    }
    assert!(
        !indexes.iter().any(|i| i == "runs_claim_idx"),
        "{indexes:?}"
    );
    let (runs, resubmits): (i64, i64) =
        sqlx::query_as("SELECT count(*), sum(resubmits) FROM wfq.runs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        runs,
        1_000_000 + 1 + produced,
        "every producer's run is there"
    );
    assert_eq!(resubmits, 0, "the new columns have their defaults");
}

/// The probe above can fail: a schema change without a lock_timeout,
/// queued behind the open transaction, makes the same producer time out.
#[sqlx::test(migrations = false)]
async fn a_naive_schema_change_behind_an_open_transaction_stops_producers(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(&connect).await;
    migrations_up_to(BEFORE_UPGRADE).run(&pool).await.unwrap();
    let mut open = open_producer_transaction(&connect).await;
    let mut naive_conn = PgConnection::connect_with(&connect).await.unwrap();
    let naive = tokio::spawn(async move {
        sqlx::raw_sql("ALTER TABLE wfq.runs ADD COLUMN naive integer")
            .execute(&mut naive_conn)
            .await
            .map(|_| ())
    });
    let mut producer = impatient_producer(&connect).await;
    until_exclusive_lock_waits(&mut producer).await;
    let refused = produce(&mut producer)
        .await
        .expect_err("the producer waits behind the schema change");
    assert!(lock_timed_out(&refused), "{refused:?}");
    sqlx::raw_sql("COMMIT").execute(&mut open).await.unwrap();
    naive
        .await
        .unwrap()
        .expect("the schema change goes through at last");
    produce(&mut producer).await.expect("and producers with it");
}
