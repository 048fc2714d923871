//! The throw-away cluster `wfq demo` starts when no server answers.

use wfq::scratch_postgres::{ScratchCluster, find_bindir};

#[tokio::test]
async fn a_scratch_cluster_starts_answers_and_is_removed() {
    if find_bindir().is_none() {
        // .ci/run installs PostgreSQL's server package whenever it has to
        // start a cluster itself; a machine without initdb cannot run this.
        eprintln!("skipped: no initdb on this machine");
        return;
    }
    let cluster = tokio::task::spawn_blocking(ScratchCluster::start)
        .await
        .unwrap()
        .expect("cluster starts");
    let pool = sqlx::PgPool::connect(&cluster.url)
        .await
        .expect("it answers");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    wfq::store::migrate(&pool)
        .await
        .expect("migrations apply on a fresh cluster");
    pool.close().await;
    let url = cluster.url.clone();
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
    // One attempt, not a pool (a pool keeps retrying until its timeout).
    use sqlx::Connection;
    assert!(
        sqlx::PgConnection::connect(&url).await.is_err(),
        "stopped when dropped"
    );
}
