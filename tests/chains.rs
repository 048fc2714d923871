//! Chains of runs (issue 17): runs that wait for other runs and take their
//! outputs as inputs. The bookkeeping is the database's (triggers), so most
//! tests drive it with plain SQL, as a producer would; the end-to-end ones
//! run a worker against the simulator and check its ledger.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::store::{self, RequestError, RetryOutcome};

/// The statement of the issue and of the README, verbatim.
const README_EXAMPLE: &str = r#"
WITH a AS (
  INSERT INTO wfq.runs (provider, workflow_id, inputs) VALUES ('chenyu', 'wf_img', '{"n6_text": "a paper boat"}') RETURNING id
)
INSERT INTO wfq.runs (provider, workflow_id, inputs, depends_on)
SELECT 'chenyu', 'wf_seedance_video', jsonb_build_object('image', jsonb_build_object('$output', jsonb_build_object('run', a.id, 'key', 'n9_images'))), ARRAY[a.id]
FROM a;
"#;

/// A run of `workflow` with `inputs`, by SQL; its id.
async fn insert(pool: &PgPool, workflow: &str, inputs: Value) -> i64 {
    insert_with(pool, workflow, inputs, "").await
}

/// Like [`insert`], with more `, column = value` settings written as SQL
/// (`depends_on`, `on_dependency_failure`).
async fn insert_with(pool: &PgPool, workflow: &str, inputs: Value, more: &str) -> i64 {
    let (columns, values) = more
        .split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.split_once('=').expect("column = value"))
        .fold((String::new(), String::new()), |(c, v), (col, val)| {
            (
                format!("{c}, {}", col.trim()),
                format!("{v}, {}", val.trim()),
            )
        });
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO wfq.runs (workflow_id, inputs, accept_external_cost_risk{columns}) \
         VALUES ($1, $2, true{values}) RETURNING id"
    )))
    .bind(workflow)
    .bind(inputs)
    .fetch_one(pool)
    .await
    .expect("insert")
}

/// `{"$output": {"run": run, "key": key}}`.
fn output(run: i64, key: &str) -> Value {
    json!({"$output": {"run": run, "key": key}})
}

/// A video run that takes run `image`'s picture.
async fn video_of(pool: &PgPool, image: i64) -> i64 {
    insert(
        pool,
        VIDEO,
        json!({"prompt": "a paper boat", "image": output(image, "n9_images")}),
    )
    .await
}

async fn state(pool: &PgPool, id: i64) -> (String, Option<String>) {
    sqlx::query_as("SELECT state, error_code FROM wfq.runs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The database's refusal of `sql`, as text.
async fn refusal(pool: &PgPool, sql: &str) -> String {
    match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
    {
        Ok(_) => panic!("accepted: {sql}"),
        Err(e) => e.to_string(),
    }
}

/// Finishes run `id` as a worker would, by SQL.
async fn succeed(pool: &PgPool, id: i64, outputs: Value) {
    sqlx::query(
        "UPDATE wfq.runs SET state = 'succeeded', outputs = $2, finished_at = now(), settled_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(outputs)
    .execute(pool)
    .await
    .unwrap();
}

/// What the simulator holds as a run's inputs (`run/info` echoes them).
async fn inputs_at_provider(sim: &wfq::sim::SimServer, run_order_id: &str) -> Value {
    let answer: Value = reqwest::Client::new()
        .get(format!("{}/workflow/run/info", sim.base_url()))
        .query(&[("run_order_id", run_order_id)])
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("run/info")
        .json()
        .await
        .expect("JSON");
    answer["data"]["inputs"].clone()
}

/// Every run of the table at the simulator exactly once, or (never
/// submitted) not at all, with the money of the ledger.
async fn assert_ledger_exact(pool: &PgPool, sim: &wfq::sim::SimServer) {
    let ledger = sim.ledger();
    /// id, key, frozen, final, submitted.
    type Row = (i64, String, Option<Decimal>, Option<Decimal>, bool);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, idempotency_key, frozen_amount, final_amount, submitted_at IS NOT NULL \
         FROM wfq.runs ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (id, key, frozen, charged, submitted) in rows {
        let at_sim: Vec<_> = ledger.iter().filter(|e| e.idempotency_key == key).collect();
        if !submitted {
            assert!(
                at_sim.is_empty(),
                "run {id} was never submitted, yet the provider has it"
            );
            assert_eq!((frozen, charged), (None, None), "run {id}");
            continue;
        }
        assert_eq!(at_sim.len(), 1, "run {id}");
        let entry = at_sim[0];
        assert_eq!(entry.charges, 1, "run {id} charged {} times", entry.charges);
        assert_eq!(frozen, Some(entry.frozen), "run {id}");
        assert_eq!(charged, entry.final_amount, "run {id}");
    }
}

#[sqlx::test]
async fn the_readme_example_is_accepted_as_written(pool: PgPool) {
    sqlx::raw_sql(README_EXAMPLE).execute(&pool).await.unwrap();
    /// id, state, depends_on, hold_reason.
    type Row = (i64, String, Option<Vec<i64>>, Option<String>);
    let rows: Vec<Row> =
        sqlx::query_as("SELECT id, state, depends_on, hold_reason FROM wfq.runs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let a = rows[0].0;
    assert_eq!(rows[0].1, "queued");
    assert_eq!(
        rows[1].1, "waiting",
        "the second waits for the first: {rows:?}"
    );
    assert_eq!(rows[1].2, Some(vec![a]));
    assert_eq!(
        rows[1].3.as_deref(),
        Some(format!("waiting_for: run {a}").as_str())
    );
}

#[sqlx::test]
async fn a_two_step_chain_passes_the_image_on(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let image = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "a paper boat"})).await;
    let video = video_of(&pool, image).await;
    assert_eq!(state(&pool, video).await.0, "waiting");

    let worker = start_worker(config(&sim, "chain-2", ""), pool.clone());
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;

    let (a, b) = (run(&pool, image).await, run(&pool, video).await);
    assert_eq!(a.state, "succeeded", "{:?}", a.error_message);
    assert_eq!(b.state, "succeeded", "{:?}", b.error_message);
    let picture = a.outputs.as_ref().unwrap()["n9_images"].clone();
    assert!(picture.as_str().unwrap().starts_with("http"), "{picture}");
    assert_eq!(b.sent_inputs.as_ref().unwrap()["image"], picture);
    // The reference itself stays in `inputs`, as the producer wrote it.
    assert_eq!(b.inputs["image"], output(image, "n9_images"));
    let seen = inputs_at_provider(&sim, b.provider_run_id.as_deref().unwrap()).await;
    assert_eq!(
        seen["image"], picture,
        "the provider saw the first run's picture"
    );
    assert!(b.submitted_at.unwrap() >= a.finished_at.unwrap());
    let kinds = event_kinds(&pool, video).await;
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("dependencies_succeeded"),
        "{kinds:?}"
    );
    assert_ledger_exact(&pool, &sim).await;

    let chain = store::pipeline_of(&pool, image)
        .await
        .unwrap()
        .expect("a chain");
    assert_eq!(
        (chain.state.as_str(), chain.runs, chain.succeeded),
        ("succeeded", 2, 2)
    );
    assert_eq!(
        chain.total_cost,
        a.total_cost.unwrap() + b.total_cost.unwrap()
    );
    assert!(chain.duration_secs.is_some());
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_stored_copy_of_the_picture_is_uploaded_to_the_next_provider_once(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = files::temp_store();
    let config = files::config_with_storage(
        &sim,
        "chain-store",
        &format!("url = \"file://{}/store\"", dir.display()),
        "",
    );
    let worker = start_worker(config, pool.clone());
    let image = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "a paper boat"})).await;
    let videos = [video_of(&pool, image).await, video_of(&pool, image).await];
    wait_for(
        &pool,
        "NOT EXISTS (SELECT 1 FROM wfq.runs WHERE state IN ('waiting', 'queued', 'submitting', 'running'))",
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;

    let a = run(&pool, image).await;
    assert_eq!(a.state, "succeeded");
    let (media_state, mirrored) = store::media_of_run(&pool, image).await.unwrap();
    assert_eq!(media_state.as_deref(), Some("done"));
    let stored = mirrored.unwrap()["n9_images"].as_str().unwrap().to_owned();
    assert!(stored.starts_with("file://"), "{stored}");
    // The two videos were waiting for the copy, not for the provider's URL,
    // and the same bytes were uploaded once for both.
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    let uri = uploads[0].uri.clone().expect("asset uri");
    for video in videos {
        let b = run(&pool, video).await;
        assert_eq!(b.state, "succeeded", "{:?}", b.error_message);
        assert_eq!(b.sent_inputs.as_ref().unwrap()["image"], json!(uri));
    }
    assert_ledger_exact(&pool, &sim).await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn a_fan_in_of_three_and_a_fan_out_of_three(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let firsts = [
        insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "one"})).await,
        insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "two"})).await,
        insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "three"})).await,
    ];
    // Two through references, the third through depends_on alone.
    let fan_in = insert_with(
        &pool,
        VIDEO,
        json!({"image": output(firsts[0], "n9_images"), "prompt": output(firsts[1], "n9_images")}),
        &format!("depends_on = ARRAY[{}]::bigint[]", firsts[2]),
    )
    .await;
    let fan_out = [
        video_of(&pool, firsts[0]).await,
        video_of(&pool, firsts[0]).await,
        video_of(&pool, firsts[0]).await,
    ];
    let depends_on: Option<Vec<i64>> =
        sqlx::query_scalar("SELECT depends_on FROM wfq.runs WHERE id = $1")
            .bind(fan_in)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(depends_on, Some(firsts.to_vec()));

    let worker = start_worker(config(&sim, "chain-fan", ""), pool.clone());
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;

    let all_done: bool = sqlx::query_scalar("SELECT bool_and(state = 'succeeded') FROM wfq.runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(all_done);
    // The fan-in was submitted after the last of its three finished.
    let after_all: bool = sqlx::query_scalar(
        "SELECT c.submitted_at >= (SELECT max(finished_at) FROM wfq.runs WHERE id = ANY($2)) \
         FROM wfq.runs c WHERE c.id = $1",
    )
    .bind(fan_in)
    .bind(firsts.to_vec())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(after_all);
    let picture = |id: i64| {
        let pool = pool.clone();
        async move { run(&pool, id).await.outputs.unwrap()["n9_images"].clone() }
    };
    let c = run(&pool, fan_in).await;
    assert_eq!(
        c.sent_inputs.as_ref().unwrap()["image"],
        picture(firsts[0]).await
    );
    assert_eq!(
        c.sent_inputs.as_ref().unwrap()["prompt"],
        picture(firsts[1]).await
    );
    for id in fan_out {
        let b = run(&pool, id).await;
        assert_eq!(
            b.sent_inputs.as_ref().unwrap()["image"],
            picture(firsts[0]).await
        );
    }
    assert_ledger_exact(&pool, &sim).await;
    sim.shutdown().await;
}

#[sqlx::test]
async fn a_failing_first_step_fails_the_chain_below_without_a_submit(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let first = insert(&pool, ALWAYS_FAILS, json!({"prompt": "fail"})).await;
    let second = insert(
        &pool,
        VIDEO,
        json!({"prompt": "a boat", "image": output(first, "result")}),
    )
    .await;
    let third = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({}),
        &format!("depends_on = ARRAY[{second}]::bigint[]"),
    )
    .await;
    let canceled = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({}),
        &format!("depends_on = ARRAY[{first}]::bigint[]; on_dependency_failure = 'cancel'"),
    )
    .await;
    let below_canceled = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({}),
        &format!("depends_on = ARRAY[{canceled}]::bigint[]"),
    )
    .await;

    let worker = start_worker(config(&sim, "chain-fail", ""), pool.clone());
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;

    let a = run(&pool, first).await;
    assert_eq!(
        (a.state.as_str(), a.error_code.as_deref()),
        ("failed", Some("ENGINE_EXECUTION_FAILED"))
    );
    for (id, want_state, via) in [
        (second, "failed", first),
        (third, "failed", second),
        (canceled, "canceled", first),
        (below_canceled, "failed", canceled),
    ] {
        let r = run(&pool, id).await;
        assert_eq!(
            (r.state.as_str(), r.error_code.as_deref()),
            (want_state, Some("DEPENDENCY_FAILED")),
            "run {id}"
        );
        let detail = r.error_detail.clone().unwrap();
        assert_eq!(detail["dependency"], json!(via), "run {id}: {detail}");
        assert_eq!(detail["root"], json!(first), "run {id}: {detail}");
        assert_eq!(detail["root_error_code"], json!("ENGINE_EXECUTION_FAILED"));
        let message = r.error_message.unwrap();
        assert!(
            message.starts_with(&format!("run {via}, which this run depends on, ")),
            "{message}"
        );
        assert!(message.contains("ENGINE_EXECUTION_FAILED"), "{message}");
        // Nothing was sent, nothing frozen: the money is final (none).
        assert!(r.sent_inputs.is_none() && r.submitted_at.is_none() && r.frozen_amount.is_none());
        assert!(r.settled_at.is_some() && r.finished_at.is_some());
        assert_eq!(r.attempts, 0);
        assert_eq!(
            event_kinds(&pool, id).await,
            vec!["dependency_failed".to_owned()]
        );
    }
    assert_eq!(
        sim.ledger().len(),
        1,
        "only the first run reached the provider"
    );
    assert_ledger_exact(&pool, &sim).await;

    let chain = store::pipeline_of(&pool, first).await.unwrap().unwrap();
    assert_eq!(chain.state, "failed");
    assert_eq!(chain.failed_run_id, Some(first));
    assert_eq!(
        chain.failed_error_code.as_deref(),
        Some("ENGINE_EXECUTION_FAILED")
    );
    assert_eq!((chain.runs, chain.failed, chain.canceled), (5, 4, 1));
    sim.shutdown().await;
}

#[sqlx::test]
async fn what_can_never_run_is_refused_at_insert(pool: PgPool) {
    let a = insert(&pool, TEXT_TO_IMAGE, json!({})).await;
    let b = insert(&pool, TEXT_TO_IMAGE, json!({"x": output(a, "n9_images")})).await;
    let c = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({}),
        &format!("depends_on = ARRAY[{b}]::bigint[]"),
    )
    .await;

    let cases = [
        (
            "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('w', '{\"img\": {\"$output\": {\"run\": 999999, \"key\": \"n9_images\"}}}')".to_owned(),
            "depends on run 999999, which does not exist".to_owned(),
        ),
        (
            "INSERT INTO wfq.runs (workflow_id, depends_on) VALUES ('w', ARRAY[999998])".to_owned(),
            "depends on run 999998, which does not exist".to_owned(),
        ),
        (
            "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('w', '{\"a\": [{\"$output\": {\"run\": 1}}]}')".to_owned(),
            "inputs.a.0: an output reference is {\"$output\": {\"run\": <run id>, \"key\": \"<output key>\"}}".to_owned(),
        ),
        (
            format!("UPDATE wfq.runs SET depends_on = ARRAY[id] WHERE id = {a}"),
            format!("wfq.runs {a}: a run cannot depend on itself"),
        ),
        // A cycle through an UPDATE: a <- b <- c, then a waits for c.
        (
            format!("UPDATE wfq.runs SET depends_on = ARRAY[{c}] WHERE id = {a}"),
            format!("wfq.runs {a}: depends_on would make a cycle: run {a} -> run {c} -> run {b} -> run {a}"),
        ),
        (
            format!("UPDATE wfq.runs SET inputs = jsonb_build_object('x', jsonb_build_object('$output', jsonb_build_object('run', {b}, 'key', 'k'))) WHERE id = {a}"),
            format!("wfq.runs {a}: depends_on would make a cycle: run {a} -> run {b} -> run {a}"),
        ),
    ];
    for (sql, says) in cases {
        let e = refusal(&pool, &sql).await;
        assert!(e.contains(&says), "{sql}\n  said: {e}\n  want: {says}");
    }

    // A succeeded run's outputs are known: a key it does not have is refused.
    succeed(&pool, a, json!({"n9_images": "https://x/a.png", "seed": 1})).await;
    let e = refusal(
        &pool,
        &format!("INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('w', '{{\"v\": {{\"$output\": {{\"run\": {a}, \"key\": \"video\"}}}}}}')"),
    )
    .await;
    assert!(
        e.contains(&format!(
            "inputs.v: run {a} has no output video; its outputs are: n9_images, seed"
        )),
        "{e}"
    );
    // Inputs and dependencies are the producer's until a worker takes the run.
    sqlx::query("UPDATE wfq.runs SET state = 'running', sent_inputs = '{}' WHERE id = $1")
        .bind(b)
        .execute(&pool)
        .await
        .unwrap();
    let e = refusal(
        &pool,
        &format!("UPDATE wfq.runs SET depends_on = NULL WHERE id = {b}"),
    )
    .await;
    assert!(
        e.contains("cannot change once a worker may have taken the run (state running)"),
        "{e}"
    );
}

#[sqlx::test]
async fn a_missing_output_fails_the_run_at_release_without_a_submit(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let b = insert(
        &pool,
        VIDEO,
        json!({"prompt": "p", "image": output(a, "video")}),
    )
    .await;
    let worker = start_worker(config(&sim, "chain-key", ""), pool.clone());
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;
    assert_eq!(state(&pool, a).await.0, "succeeded");
    let r = run(&pool, b).await;
    assert_eq!(
        (r.state.as_str(), r.error_code.as_deref()),
        ("failed", Some("DEPENDENCY_OUTPUT_MISSING"))
    );
    assert_eq!(
        r.error_message.as_deref(),
        Some(format!("inputs.image: run {a} succeeded without an output video").as_str())
    );
    assert!(r.submitted_at.is_none() && r.sent_inputs.is_none());
    assert_eq!(sim.ledger().len(), 1);
    sim.shutdown().await;
}

/// The release is part of the finish: nothing can happen between them, so
/// a worker dying right after a finish leaves nothing to repair.
#[sqlx::test]
async fn the_release_commits_or_rolls_back_with_the_finish(pool: PgPool) {
    let a = insert(&pool, TEXT_TO_IMAGE, json!({})).await;
    let b = video_of(&pool, a).await;
    for commit in [false, true] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("UPDATE wfq.runs SET state = 'succeeded', outputs = '{\"n9_images\": \"https://x/a.png\"}' WHERE id = $1")
            .bind(a)
            .execute(&mut *tx)
            .await
            .unwrap();
        let inside: String = sqlx::query_scalar("SELECT state FROM wfq.runs WHERE id = $1")
            .bind(b)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(inside, "queued", "released in the finishing transaction");
        assert_eq!(state(&pool, b).await.0, "waiting", "not before it commits");
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
            assert_eq!(state(&pool, a).await.0, "queued");
            assert_eq!(state(&pool, b).await.0, "waiting");
        }
    }
    assert_eq!(state(&pool, b).await.0, "queued");
}

/// A worker killed as soon as the first run's finish is written: the
/// second run was released by that write and runs once, on another worker.
#[sqlx::test]
async fn a_worker_killed_right_after_a_finish_leaves_the_next_run_to_run_once(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let b = video_of(&pool, a).await;
    let first = start_worker(config(&sim, "chain-killed", ""), pool.clone());
    wait_for(
        &pool,
        &format!("(SELECT state FROM wfq.runs WHERE id = {a}) = 'succeeded'"),
        Duration::from_secs(60),
    )
    .await;
    first.kill().await;
    assert_ne!(state(&pool, b).await.0, "waiting");
    let second = start_worker(config(&sim, "chain-after", ""), pool.clone());
    wait_all_final(&pool, Duration::from_secs(60)).await;
    second.stop().await;
    assert_eq!(state(&pool, b).await.0, "succeeded");
    assert_ledger_exact(&pool, &sim).await;
    sim.shutdown().await;
}

/// Two dependencies of one run finishing at once, in two transactions:
/// the second to lock the dependent sees the first's commit.
#[sqlx::test]
async fn a_fan_in_whose_last_two_finish_together_is_released(pool: PgPool) {
    let a1 = insert(&pool, TEXT_TO_IMAGE, json!({})).await;
    let a2 = insert(&pool, TEXT_TO_IMAGE, json!({})).await;
    let c = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({}),
        &format!("depends_on = ARRAY[{a1}, {a2}]::bigint[]"),
    )
    .await;
    let finish = "UPDATE wfq.runs SET state = 'succeeded', outputs = '{}' WHERE id = $1";
    let mut first = pool.begin().await.unwrap();
    sqlx::query(finish)
        .bind(a1)
        .execute(&mut *first)
        .await
        .unwrap();
    let pool2 = pool.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool2.begin().await.unwrap();
        sqlx::query(finish)
            .bind(a2)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    });
    wait_lock_waiters(&pool, 1).await;
    first.commit().await.unwrap();
    second.await.unwrap();
    assert_eq!(state(&pool, c).await.0, "queued");
}

/// A run inserted while its dependency finishes, in either order, is
/// decided when its transaction commits.
#[sqlx::test]
async fn an_insert_racing_its_dependencys_finish_is_never_left_waiting(pool: PgPool) {
    let finish = "UPDATE wfq.runs SET state = 'succeeded', outputs = '{\"n9_images\": \"https://x/a.png\"}' WHERE id = $1";
    // The finish commits while the insert is open: it cannot see the new
    // run, whose commit sees the finish.
    let a = insert(&pool, TEXT_TO_IMAGE, json!({})).await;
    let mut producer = pool.begin().await.unwrap();
    let b: i64 = sqlx::query_scalar(
        "INSERT INTO wfq.runs (workflow_id, inputs, accept_external_cost_risk) \
         VALUES ($1, jsonb_build_object('image', jsonb_build_object('$output', jsonb_build_object('run', $2::bigint, 'key', 'n9_images'))), true) RETURNING id",
    )
    .bind(VIDEO)
    .bind(a)
    .fetch_one(&mut *producer)
    .await
    .unwrap();
    sqlx::query(finish).bind(a).execute(&pool).await.unwrap();
    producer.commit().await.unwrap();
    assert_eq!(state(&pool, b).await.0, "queued");

    // The finish is open while the insert commits: the commit waits for it.
    let a = insert(&pool, TEXT_TO_IMAGE, json!({})).await;
    let mut worker = pool.begin().await.unwrap();
    sqlx::query(finish)
        .bind(a)
        .execute(&mut *worker)
        .await
        .unwrap();
    let pool2 = pool.clone();
    let producer = tokio::spawn(async move {
        let mut tx = pool2.begin().await.unwrap();
        let b: i64 = sqlx::query_scalar(
            "INSERT INTO wfq.runs (workflow_id, depends_on) VALUES ('w', ARRAY[$1::bigint]) RETURNING id",
        )
        .bind(a)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        b
    });
    wait_lock_waiters(&pool, 1).await;
    worker.commit().await.unwrap();
    let b = producer.await.unwrap();
    assert_eq!(state(&pool, b).await.0, "queued");
    let kinds = event_kinds(&pool, b).await;
    assert_eq!(kinds, vec!["dependencies_succeeded".to_owned()]);
}

#[sqlx::test]
async fn retrying_the_failed_run_resumes_the_chain_below(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let b = video_of(&pool, a).await;
    let c = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({}),
        &format!("depends_on = ARRAY[{b}]::bigint[]"),
    )
    .await;
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM wfq.runs WHERE id IN ($1, $2) ORDER BY id")
            .bind(b)
            .bind(c)
            .fetch_all(&pool)
            .await
            .unwrap();
    // The first run fails before a worker saw it (an operator, by SQL).
    sqlx::query(
        "UPDATE wfq.runs SET state = 'failed', error_code = 'OPERATOR', finished_at = now(), settled_at = now() WHERE id = $1",
    )
    .bind(a)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        state(&pool, b).await,
        ("failed".to_owned(), Some("DEPENDENCY_FAILED".to_owned()))
    );
    assert_eq!(
        state(&pool, c).await,
        ("failed".to_owned(), Some("DEPENDENCY_FAILED".to_owned()))
    );

    // Retrying a run below says which run to retry.
    match store::retry_run(&pool, c, &[]).await {
        Err(RequestError::RetryTheRoot { id, root }) => assert_eq!((id, root), (c, a)),
        other => panic!("{other:?}"),
    }
    let RetryOutcome::NewRun(a2) = store::retry_run(&pool, a, &[]).await.unwrap() else {
        panic!("a settled run is retried as a new row");
    };
    assert_eq!(state(&pool, b).await, ("waiting".to_owned(), None));
    assert_eq!(state(&pool, c).await, ("waiting".to_owned(), None));
    let rb = run(&pool, b).await;
    assert_eq!(rb.depends_on, Some(vec![a2]));
    assert_eq!(rb.inputs["image"], output(a2, "n9_images"));
    assert!(
        event_kinds(&pool, b)
            .await
            .contains(&"chain_resumed".to_owned())
    );

    let worker = start_worker(config(&sim, "chain-retry", ""), pool.clone());
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;
    for id in [a2, b, c] {
        assert_eq!(
            state(&pool, id).await,
            ("succeeded".to_owned(), None),
            "run {id}"
        );
    }
    // The runs below kept their ids and keys: they had never been sent.
    let after: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM wfq.runs WHERE id IN ($1, $2) ORDER BY id")
            .bind(b)
            .bind(c)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(after, keys);
    assert_ledger_exact(&pool, &sim).await;
    sim.shutdown().await;
}

#[sqlx::test]
async fn canceling_a_waiting_run_ends_the_chain_below_it(pool: PgPool) {
    let a = insert(&pool, TEXT_TO_IMAGE, json!({})).await;
    let b = video_of(&pool, a).await;
    let c = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({}),
        &format!("depends_on = ARRAY[{b}]::bigint[]"),
    )
    .await;
    let outcome = store::cancel_run(&pool, b, Some("changed my mind"), &[])
        .await
        .unwrap();
    assert_eq!(outcome, store::CancelOutcome::Canceled);
    assert_eq!(
        state(&pool, b).await,
        ("canceled".to_owned(), Some("CANCELED".to_owned()))
    );
    let rc = run(&pool, c).await;
    assert_eq!(
        (rc.state.as_str(), rc.error_code.as_deref()),
        ("failed", Some("DEPENDENCY_FAILED"))
    );
    assert_eq!(
        rc.error_message.as_deref(),
        Some(format!("run {b}, which this run depends on, canceled (CANCELED)").as_str())
    );
    assert_eq!(
        state(&pool, a).await.0,
        "queued",
        "what it waited for goes on"
    );
}

/// 10,000 waiting runs cost a claim nothing: they are in no index range a
/// claim walks, and the last finish releases all of them in one statement.
#[sqlx::test]
async fn waiting_runs_are_not_in_the_claim_path(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    let a = insert(&pool, TEXT_TO_IMAGE, json!({})).await;
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs, depends_on) \
         SELECT 'wf', jsonb_build_object('n', g), ARRAY[$1::bigint] FROM generate_series(1, 10000) g",
    )
    .bind(a)
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
    let claimed: Vec<i64> = sqlx::query_scalar("SELECT id FROM wfq.runs WHERE lease_owner = 'w1'")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(claimed, vec![a], "{plan}");
    let top_buffers: u64 = plan
        .lines()
        .find_map(|l| l.trim().strip_prefix("Buffers: shared hit="))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a buffer count");
    assert!(top_buffers < 300, "{top_buffers} buffers:\n{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    // Nothing is due either: the fallback poll and the wake-up see none.
    let scope = store::ClaimScope::all_of(&["chenyu".to_owned()]);
    assert_eq!(store::next_due_in(&mut *conn, &scope).await.unwrap(), None);

    succeed(&pool, a, json!({})).await;
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'queued'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 10_000);
}

fn wfq(database_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("WFQ_DATABASE_URL")
        .env_remove("WFQ_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("wfq runs")
}

#[sqlx::test]
async fn the_command_line_enqueues_a_chain_and_shows_it(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let db = database_url(&connect);
    let text = |o: &Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    text(&wfq(&db, &["migrate"]));
    let a = text(&wfq(
        &db,
        &[
            "enqueue",
            "--workflow",
            TEXT_TO_IMAGE,
            "--input",
            "n6_text=a boat",
        ],
    ));
    let b = text(&wfq(
        &db,
        &[
            "enqueue",
            "--workflow",
            VIDEO,
            "--input",
            "prompt=a boat",
            "--input",
            &format!("image=@run:{a}/n9_images"),
            "--accept-external-cost-risk",
        ],
    ));
    let other = text(&wfq(&db, &["enqueue", "--workflow", TEXT_TO_IMAGE]));
    let c = text(&wfq(
        &db,
        &[
            "enqueue",
            "--workflow",
            TEXT_TO_IMAGE,
            "--after",
            &b,
            "--after",
            &other,
            "--on-dependency-failure",
            "cancel",
        ],
    ));
    let shown: Value = serde_json::from_str(&text(&wfq(&db, &["show", &c, "--json"]))).unwrap();
    assert_eq!(shown["state"], "waiting");
    assert_eq!(shown["on_dependency_failure"], "cancel");
    let (b_id, other_id): (i64, i64) = (b.parse().unwrap(), other.parse().unwrap());
    assert_eq!(shown["depends_on"], json!([b_id, other_id]));
    let shown_b: Value = serde_json::from_str(&text(&wfq(&db, &["show", &b, "--json"]))).unwrap();
    let a_id: i64 = a.parse().unwrap();
    assert_eq!(shown_b["inputs"]["image"], output(a_id, "n9_images"));
    assert_eq!(shown_b["chain"]["waits_on"][0]["id"], json!(a_id));
    assert_eq!(
        shown_b["chain"]["waited_on_by"][0]["id"],
        json!(c.parse::<i64>().unwrap())
    );
    let table = text(&wfq(&db, &["show", &b]));
    assert!(
        table.contains("waits for") && table.contains("waited for by"),
        "{table}"
    );
    let bad = wfq(
        &db,
        &["enqueue", "--workflow", VIDEO, "--input", "image=@run:x/k"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("@run:RUN_ID/OUTPUT_KEY"));
    let missing = wfq(&db, &["enqueue", "--workflow", VIDEO, "--after", "999999"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("depends on run 999999, which does not exist")
    );
}

/// What a worker writes when the provider accepts a submit (`wfr-...`).
fn accepted(run_id: &str) -> wfq::lifecycle::Transition {
    use wfq::backoff::{PollPolicy, RetryPolicy};
    use wfq::lifecycle::{self, RunProgress, RunState};
    use wfq::providers::{Accepted, SubmitGuard, SubmitOutcome};
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
        chrono::Utc::now(),
        0.5,
    )
}

/// A chain whose first run was given up on (`SUBMIT_OUTCOME_UNKNOWN`)
/// comes back with it when the provider's acceptance arrives late, not
/// only through `wfq retry`: the runs below wait again, and are released
/// when it succeeds.
#[sqlx::test]
async fn a_chain_comes_back_when_a_late_answer_revives_its_first_run(pool: PgPool) {
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let b = video_of(&pool, a).await;
    let c = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({}),
        &format!("depends_on = ARRAY[{b}]::bigint[]"),
    )
    .await;
    let token = uuid::Uuid::new_v4();
    sqlx::query(
        "UPDATE wfq.runs SET state = 'failed', error_code = 'SUBMIT_OUTCOME_UNKNOWN', submit_token = $2, \
         sent_inputs = inputs, finished_at = now() WHERE id = $1",
    )
    .bind(a)
    .bind(token)
    .execute(&pool)
    .await
    .unwrap();
    for id in [b, c] {
        assert_eq!(
            state(&pool, id).await,
            ("failed".to_owned(), Some("DEPENDENCY_FAILED".to_owned())),
            "run {id}"
        );
    }

    let late = store::record_late_acceptance(
        &pool,
        a,
        token,
        "a",
        Duration::from_secs(60),
        &accepted("wfr-1"),
    )
    .await
    .unwrap();
    assert!(
        matches!(late, store::LateAnswer::Recorded { .. }),
        "{late:?}"
    );
    assert_eq!(state(&pool, a).await, ("running".to_owned(), None));
    for id in [b, c] {
        assert_eq!(
            state(&pool, id).await,
            ("waiting".to_owned(), None),
            "run {id}"
        );
        assert!(
            event_kinds(&pool, id)
                .await
                .contains(&"chain_resumed".to_owned())
        );
    }

    succeed(&pool, a, json!({"n9_images": "https://cdn.example/a.png"})).await;
    assert_eq!(state(&pool, b).await, ("queued".to_owned(), None));
    assert_eq!(state(&pool, c).await, ("waiting".to_owned(), None));
}

/// Two resumes of the same chain at once (two retries, or a retry and a
/// revived run): the second, which walked the chain before the first
/// committed, finds the runs waiting when it gets their locks, and leaves
/// them alone.
#[sqlx::test]
async fn a_second_resume_racing_the_first_changes_nothing(pool: PgPool) {
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let b = video_of(&pool, a).await;
    sqlx::query(
        "UPDATE wfq.runs SET state = 'failed', error_code = 'OPERATOR', finished_at = now(), settled_at = now() WHERE id = $1",
    )
    .bind(a)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        state(&pool, b).await.1.as_deref(),
        Some("DEPENDENCY_FAILED")
    );

    // The first: the run comes back (its trigger resumes the chain), not
    // committed yet.
    let mut first = pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE wfq.runs SET state = 'queued', error_code = NULL, finished_at = NULL, settled_at = NULL, \
         due_at = now() WHERE id = $1",
    )
    .bind(a)
    .execute(&mut *first)
    .await
    .unwrap();

    // The second walks the chain now and waits for run b's lock.
    let mut second = pool.acquire().await.unwrap().detach();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut second)
        .await
        .unwrap();
    let racing = tokio::spawn(async move {
        let resumed: i32 = sqlx::query_scalar("SELECT wfq.resume_chain($1, $1)")
            .bind(a)
            .fetch_one(&mut second)
            .await
            .unwrap();
        resumed
    });
    wait_for(
        &pool,
        &format!(
            "EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND wait_event_type = 'Lock')"
        ),
        Duration::from_secs(30),
    )
    .await;
    first.commit().await.unwrap();

    assert_eq!(
        racing.await.unwrap(),
        0,
        "the second resume found nothing to do"
    );
    assert_eq!(state(&pool, b).await, ("waiting".to_owned(), None));
    let resumes = event_kinds(&pool, b)
        .await
        .iter()
        .filter(|k| *k == "chain_resumed")
        .count();
    assert_eq!(resumes, 1);
}

/// A dependency deleted before it succeeded: the runs waiting for it fail
/// DEPENDENCY_MISSING in the deleting transaction, and the chain below
/// them with it.
#[sqlx::test]
async fn deleting_a_dependency_fails_the_runs_waiting_for_it(pool: PgPool) {
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let b = video_of(&pool, a).await;
    let c = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({}),
        &format!("depends_on = ARRAY[{b}]::bigint[]"),
    )
    .await;
    sqlx::query("DELETE FROM wfq.runs WHERE id = $1")
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
    let rb = run(&pool, b).await;
    assert_eq!(
        (rb.state.as_str(), rb.error_code.as_deref()),
        ("failed", Some("DEPENDENCY_MISSING"))
    );
    assert_eq!(
        rb.error_message.as_deref(),
        Some(
            format!("run {a}, which this run depends on, does not exist any more (deleted)")
                .as_str()
        )
    );
    assert!(
        event_kinds(&pool, b)
            .await
            .contains(&"dependency_missing".to_owned())
    );
    let rc = run(&pool, c).await;
    assert_eq!(
        (rc.state.as_str(), rc.error_code.as_deref()),
        ("failed", Some("DEPENDENCY_FAILED"))
    );
    assert_eq!(
        rc.error_detail.unwrap()["root_error_code"],
        "DEPENDENCY_MISSING"
    );
}

/// An insert that read its dependency just before another transaction
/// deleted it (the delete's trigger could not see the uncommitted run):
/// at its commit the run is decided, and fails DEPENDENCY_MISSING instead
/// of waiting for ever.
#[sqlx::test]
async fn an_insert_racing_the_delete_of_its_dependency_fails_at_commit(pool: PgPool) {
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let mut producer = pool.begin().await.unwrap();
    let b: i64 = sqlx::query_scalar(
        "INSERT INTO wfq.runs (workflow_id, inputs, depends_on) VALUES ($1, '{}', ARRAY[$2::bigint]) RETURNING id",
    )
    .bind(TEXT_TO_IMAGE)
    .bind(a)
    .fetch_one(&mut *producer)
    .await
    .unwrap();
    sqlx::query("DELETE FROM wfq.runs WHERE id = $1")
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
    producer.commit().await.unwrap();
    assert_eq!(
        state(&pool, b).await,
        ("failed".to_owned(), Some("DEPENDENCY_MISSING".to_owned()))
    );
}

/// `wfq prune` keeps a finished run while a run that depends on it is not
/// final (its outputs are that run's inputs), and prunes it afterwards.
#[sqlx::test]
async fn prune_keeps_a_dependency_until_its_dependents_are_final(pool: PgPool) {
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let other = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "y"})).await;
    let b = insert_with(
        &pool,
        VIDEO,
        json!({"prompt": "p", "image": output(a, "n9_images")}),
        &format!("depends_on = ARRAY[{other}]::bigint[]"),
    )
    .await;
    let alone = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "z"})).await;
    for id in [a, alone] {
        succeed(&pool, id, json!({"n9_images": "https://cdn.example/a.png"})).await;
    }
    sqlx::query("UPDATE wfq.runs SET finished_at = now() - interval '2 days' WHERE id IN ($1, $2)")
        .bind(a)
        .bind(alone)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(state(&pool, b).await.0, "waiting");

    let pruned = store::prune_finished_runs(&pool, Duration::from_secs(86_400), 100)
        .await
        .unwrap();
    assert_eq!(pruned, 1, "only the run nothing depends on");
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM wfq.runs ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, vec![a, other, b]);
    assert_eq!(state(&pool, b).await.0, "waiting");

    // Once the run below is final, its dependency goes too.
    sqlx::query(
        "UPDATE wfq.runs SET state = 'canceled', error_code = 'CANCELED', finished_at = now(), settled_at = now() \
         WHERE id = $1",
    )
    .bind(b)
    .execute(&pool)
    .await
    .unwrap();
    let pruned = store::prune_finished_runs(&pool, Duration::from_secs(86_400), 100)
        .await
        .unwrap();
    assert_eq!(pruned, 1);
}

/// A released run whose plain dependency (no `$output` reference) was
/// deleted since is failed by the worker before anything is sent.
#[sqlx::test]
async fn a_released_run_whose_dependency_is_gone_is_never_sent(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let b = insert_with(
        &pool,
        TEXT_TO_IMAGE,
        json!({"n6_text": "after a"}),
        &format!("depends_on = ARRAY[{a}]::bigint[]"),
    )
    .await;
    succeed(&pool, a, json!({"n9_images": "https://cdn.example/a.png"})).await;
    assert_eq!(state(&pool, b).await.0, "queued");
    sqlx::query("DELETE FROM wfq.runs WHERE id = $1")
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();

    let worker = start_worker(config(&sim, "chain-gone", ""), pool.clone());
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;
    let r = run(&pool, b).await;
    assert_eq!(
        (r.state.as_str(), r.error_code.as_deref()),
        ("failed", Some("DEPENDENCY_MISSING"))
    );
    assert!(r.submitted_at.is_none() && r.sent_inputs.is_none());
    assert!(sim.ledger().is_empty());
    sim.shutdown().await;
}

/// A retry that resumes the failed run in place (its money is not settled)
/// makes the chain below it wait for the same run again.
#[sqlx::test]
async fn resuming_a_run_in_place_makes_its_chain_wait_again(pool: PgPool) {
    let a = insert(&pool, TEXT_TO_IMAGE, json!({"n6_text": "x"})).await;
    let b = video_of(&pool, a).await;
    sqlx::query(
        "UPDATE wfq.runs SET state = 'failed', error_code = 'SUBMIT_RETRIES_EXHAUSTED', \
         sent_inputs = inputs, finished_at = now() WHERE id = $1",
    )
    .bind(a)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        state(&pool, b).await,
        ("failed".to_owned(), Some("DEPENDENCY_FAILED".to_owned()))
    );
    let outcome = store::retry_run(&pool, a, &[]).await.unwrap();
    assert!(
        matches!(outcome, RetryOutcome::Resumed(id) if id == a),
        "{outcome:?}"
    );
    assert_eq!(state(&pool, a).await.0, "submitting");
    assert_eq!(state(&pool, b).await, ("waiting".to_owned(), None));
    assert_eq!(run(&pool, b).await.depends_on, Some(vec![a]));
    // It is released when the resumed run succeeds.
    succeed(&pool, a, json!({"n9_images": "https://x/a.png"})).await;
    assert_eq!(state(&pool, b).await.0, "queued");
}
