//! Files in: `{"$file": ...}` inputs uploaded to the provider before the
//! submit (chenyu `POST /assets`, Dify `POST /files/upload`), durably and
//! once: the provider sees the asset URI (Dify the upload's id), a run
//! prepared again reuses its upload, an oversized file (by wfq's limit or
//! Dify's) is refused before anything is sent, and the same file for 20
//! runs is uploaded once.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;

use common::files::*;
use common::*;
use wfq::sim::Faults;
use wfq::store::{self, NewRun};

/// A small PNG-looking file in a directory of its own.
fn picture(dir: &std::path::Path, name: &str, size: usize) -> (String, Vec<u8>) {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend((0..size.saturating_sub(8)).map(|i| (i * 31 % 251) as u8));
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("write picture");
    (format!("file://{}", path.display()), bytes)
}

/// The store's facts about input `image` of run `run_id` (bytes `sha256`).
fn facts(run_id: i64, sha256: &str) -> store::InputFileFacts<'_> {
    store::InputFileFacts {
        run_id,
        key: "image",
        profile: "chenyu",
        source: "in/boat.png",
        sha256,
        bytes: 3,
        content_type: "image/png",
    }
}

/// A run's own `done` upload that expires too soon to be used is uploaded
/// again (a new attempt), not answered `Done`: the caller, which declines
/// to reuse it, would otherwise be told to retry forever. One valid for
/// long enough is still `Done`.
#[sqlx::test]
async fn a_done_upload_near_its_expiry_is_claimed_again(pool: PgPool) {
    let run_id = enqueue(&pool, "video", json!({})).await;
    let lease = Duration::from_secs(60);
    let facts = facts(run_id, "near-expiry");
    let store::UploadClaim::Mine(row) = store::begin_upload(&pool, &facts, "w1", lease)
        .await
        .unwrap()
    else {
        panic!("the first claim is the worker's");
    };
    let expires = |secs: i64| Some(chrono::Utc::now() + chrono::Duration::seconds(secs));
    assert!(
        store::finish_upload(&pool, row, "w1", "asset://a1", expires(300), None)
            .await
            .unwrap()
    );
    assert_eq!(
        store::begin_upload(&pool, &facts, "w2", lease)
            .await
            .unwrap(),
        store::UploadClaim::Mine(row),
        "expires in 5 minutes: uploaded again"
    );
    let again = store::input_file(&pool, run_id, "image")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.state.as_str(), again.attempts), ("uploading", 2));
    let valid_for = store::DONE_UPLOAD_RENEW_MARGIN.as_secs() as i64 + 3600;
    assert!(
        store::finish_upload(&pool, row, "w2", "asset://a2", expires(valid_for), None)
            .await
            .unwrap()
    );
    assert_eq!(
        store::begin_upload(&pool, &facts, "w3", lease)
            .await
            .unwrap(),
        store::UploadClaim::Done,
        "valid for long enough: left alone"
    );
}

/// A read failure of a file whose upload was left `uploading` by a worker
/// that stopped counts on from the row's attempts (and ends that upload),
/// so the retries stay bounded; one under a live lease is not changed but
/// its count is returned, never "no count" (which the caller took as 1).
#[sqlx::test]
async fn read_failures_count_on_after_an_abandoned_upload(pool: PgPool) {
    let run_id = enqueue(&pool, "video", json!({})).await;
    let lease = Duration::from_secs(600);
    let store::UploadClaim::Mine(row) =
        store::begin_upload(&pool, &facts(run_id, "abandoned"), "w1", lease)
            .await
            .unwrap()
    else {
        panic!("the first claim is the worker's");
    };
    let fail =
        || store::record_read_failure(&pool, run_id, "image", "chenyu", "in/boat.png", "503");
    assert_eq!(
        fail().await.unwrap(),
        Some(1),
        "live lease: left alone, its count returned"
    );
    let live = store::input_file(&pool, run_id, "image")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((live.state.as_str(), live.attempts), ("uploading", 1));

    // The uploading worker stopped: its lease ran out.
    sqlx::query(
        "UPDATE wfq.run_files SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(row)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(fail().await.unwrap(), Some(2));
    assert_eq!(fail().await.unwrap(), Some(3));
    let ended = store::input_file(&pool, run_id, "image")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (ended.state.as_str(), ended.error_code.as_deref()),
        ("failed", Some("READ_FAILED"))
    );
}

async fn enqueue_video(pool: &PgPool, image: &str) -> i64 {
    store::enqueue_run(
        pool,
        &NewRun {
            workflow_id: VIDEO.to_owned(),
            inputs: json!({"prompt": "a paper boat", "image": {"$file": image}}),
            accept_external_cost_risk: true,
            ..Default::default()
        },
    )
    .await
    .expect("enqueue")
}

/// What the simulator holds as the run's inputs (`run/info` echoes them).
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

#[sqlx::test]
async fn upload_then_submit_the_provider_saw_the_asset_uri(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let (location, bytes) = picture(&dir, "boat.png", 3000);
    let config = config_with_storage(
        &sim,
        "upload-basic",
        &format!("url = \"file://{}/store\"", dir.display()),
        "",
    );
    let worker = start_worker(config, pool.clone());
    let id = enqueue_video(&pool, &location).await;
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;

    let row = run(&pool, id).await;
    assert_eq!(
        row.state, "succeeded",
        "{:?} {:?}",
        row.error_code, row.error_message
    );
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    let upload = &uploads[0];
    assert_eq!(
        (upload.api.as_str(), upload.bytes),
        ("chenyu", bytes.len() as u64)
    );
    assert_eq!(upload.sha256, sha256(&bytes));
    assert_eq!(upload.media_type.as_deref(), Some("image"));
    assert_eq!(upload.purpose.as_deref(), Some("temp_input"));
    let uri = upload.uri.clone().expect("asset uri");
    assert_eq!(row.sent_inputs.as_ref().unwrap()["image"], json!(uri));
    let seen = inputs_at_provider(&sim, row.provider_run_id.as_deref().unwrap()).await;
    assert_eq!(seen["image"], json!(uri), "the provider saw the asset URI");
    let files = files_of(&pool, id).await;
    let inputs: Vec<_> = files.iter().filter(|f| f.0 == "input").collect();
    assert_eq!(inputs.len(), 1);
    assert_eq!(
        (inputs[0].1.as_str(), inputs[0].3.as_str()),
        ("image", "done")
    );
    assert_eq!(inputs[0].6.as_deref(), Some(sha256(&bytes).as_str()));
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A crash before `submitting` was recorded, made by hand (the run put
/// back as if nothing had been sent): the next worker prepares the run
/// again and reuses the recorded upload. The crash of a real worker process
/// is in tests/files_crash.rs.
#[sqlx::test]
async fn a_run_prepared_again_after_a_crash_reuses_its_upload(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let (location, _) = picture(&dir, "boat.png", 2000);
    let storage = format!("url = \"file://{}/store\"", dir.display());
    // The submit is held at the provider (nothing recorded there), after
    // the upload; then the worker dies.
    sim.set_faults(Faults {
        hold_submits: true,
        ..Faults::default()
    });
    let first = start_worker(
        config_with_storage(&sim, "upload-crash-1", &storage, ""),
        pool.clone(),
    );
    let id = enqueue_video(&pool, &location).await;
    wait_held(&sim, 1).await;
    first.kill().await;
    assert_eq!(sim.uploads().len(), 1);
    // As if it had died before recording the submit at all: the run is
    // prepared again from scratch by the next worker.
    sqlx::query(
        "UPDATE wfq.runs SET state = 'queued', sent_inputs = NULL, submit_in_doubt_since = NULL, \
         lease_owner = NULL, lease_expires_at = NULL, due_at = now(), attempts = 0 WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    sim.set_faults(Faults::default());
    let second = start_worker(
        config_with_storage(&sim, "upload-crash-2", &storage, ""),
        pool.clone(),
    );
    wait_all_final(&pool, Duration::from_secs(60)).await;
    second.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{:?}", row.error_message);
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 1, "uploaded once: {uploads:?}");
    assert_eq!(row.sent_inputs.unwrap()["image"], json!(uploads[0].uri));
    assert_eq!(sim.ledger().len(), 1);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn an_oversized_file_is_refused_before_any_upload(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let (location, _) = picture(&dir, "huge.png", 4096);
    let storage = format!(
        "url = \"file://{}/store\"\nmax_file_bytes = \"1KiB\"",
        dir.display()
    );
    let worker = start_worker(
        config_with_storage(&sim, "upload-big", &storage, ""),
        pool.clone(),
    );
    let id = enqueue_video(&pool, &location).await;
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "failed");
    assert_eq!(row.error_code.as_deref(), Some("FILE_TOO_LARGE"));
    let message = row.error_message.unwrap_or_default();
    assert!(message.starts_with("inputs.image: "), "{message}");
    assert!(message.contains("1024 bytes"), "{message}");
    assert!(sim.uploads().is_empty(), "nothing uploaded");
    assert_eq!(sim.stats().submit_requests, 0, "nothing submitted");
    assert!(row.frozen_amount.is_none() && row.provider_run_id.is_none());
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn the_same_file_for_20_runs_is_uploaded_once(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let (location, bytes) = picture(&dir, "shared.png", 5000);
    let storage = format!("url = \"file://{}/store\"", dir.display());
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(enqueue_video(&pool, &location).await);
    }
    let worker = start_worker(
        config_with_storage(&sim, "upload-dedup", &storage, ""),
        pool.clone(),
    );
    wait_all_final(&pool, Duration::from_secs(120)).await;
    worker.stop().await;
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    let uri = json!(uploads[0].uri);
    for id in ids {
        let row = run(&pool, id).await;
        assert_eq!(row.state, "succeeded", "run {id}: {:?}", row.error_message);
        assert_eq!(row.sent_inputs.unwrap()["image"], uri, "run {id}");
    }
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wfq.run_files WHERE direction = 'input' AND state = 'done' AND sha256 = $1",
    )
    .bind(sha256(&bytes))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, 20, "every run records the file it sent");
    assert_eq!(sim.ledger().len(), 20);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn a_file_for_an_input_that_takes_none_is_refused(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let (location, _) = picture(&dir, "boat.png", 100);
    let worker = start_worker(
        config_with_storage(
            &sim,
            "upload-wrong",
            &format!("url = \"file://{}/s\"", dir.display()),
            "",
        ),
        pool.clone(),
    );
    let wrong_key = store::enqueue_run(
        &pool,
        &NewRun {
            workflow_id: VIDEO.to_owned(),
            inputs: json!({"prompt": {"$file": location}}),
            accept_external_cost_risk: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let bad_value = enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": {"$file": 5}})).await;
    let missing = enqueue_video(&pool, "file:///nonexistent/wfq/boat.png").await;
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;
    let a = run(&pool, wrong_key).await;
    assert_eq!(a.error_code.as_deref(), Some("INVALID_INPUT"));
    assert!(
        a.error_message
            .as_deref()
            .unwrap()
            .starts_with("inputs.prompt: expected a string, not a file"),
        "{:?}",
        a.error_message
    );
    let b = run(&pool, bad_value).await;
    assert_eq!(b.error_code.as_deref(), Some("INVALID_INPUT"));
    assert!(
        b.error_message
            .as_deref()
            .unwrap()
            .starts_with("inputs.n6_text: expected a file"),
        "{:?}",
        b.error_message
    );
    let c = run(&pool, missing).await;
    assert_eq!(c.error_code.as_deref(), Some("FILE_UNREADABLE"));
    assert!(
        c.error_message
            .as_deref()
            .unwrap()
            .starts_with("inputs.image: cannot read"),
        "{:?}",
        c.error_message
    );
    assert!(sim.uploads().is_empty());
    assert_eq!(sim.stats().submit_requests, 0);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A Dify profile `dify_picture` on the simulator's `picture` app (a
/// `photo` file input of type image), as `extra` for `config_with_storage`.
fn dify_picture(sim: &wfq::sim::SimServer) -> String {
    format!(
        "\n[providers.dify_picture]\nkind = \"dify\"\nbase_url = \"{}\"\napi_key_env = \"TEST_CHENYU_KEY\"\nfind_window = \"{FIND_WINDOW}\"\nmax_run_time = \"1s\"\n",
        sim.dify_base_url("picture")
    )
}

async fn enqueue_dify_photo(pool: &PgPool, photo: &str) -> i64 {
    enqueue_on(
        pool,
        "dify_picture",
        "picture",
        json!({"query": "what is in it", "photo": {"$file": photo}}),
    )
    .await
}

/// The inputs Dify recorded for a run (`GET /workflows/run/{id}` gives
/// them as a JSON string).
async fn inputs_at_dify(sim: &wfq::sim::SimServer, run_id: &str) -> Value {
    let detail: Value = reqwest::Client::new()
        .get(format!(
            "{}/workflows/run/{run_id}",
            sim.dify_base_url("picture")
        ))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("run detail")
        .json()
        .await
        .expect("JSON");
    serde_json::from_str(detail["inputs"].as_str().expect("inputs as a string"))
        .expect("inputs JSON")
}

#[sqlx::test]
async fn a_dify_file_input_is_uploaded_and_sent_as_an_upload_file_id(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let (location, bytes) = picture(&dir, "boat.png", 3000);
    let config = config_with_storage(
        &sim,
        "upload-dify",
        &format!("url = \"file://{}/store\"", dir.display()),
        &dify_picture(&sim),
    );
    let worker = start_worker(config, pool.clone());
    let id = enqueue_dify_photo(&pool, &location).await;
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;

    let row = run(&pool, id).await;
    assert_eq!(
        row.state, "succeeded",
        "{:?} {:?}",
        row.error_code, row.error_message
    );
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    let upload = &uploads[0];
    assert_eq!(
        (upload.api.as_str(), upload.app.as_deref(), upload.bytes),
        ("dify", Some("picture"), bytes.len() as u64)
    );
    assert_eq!(upload.sha256, sha256(&bytes));
    assert_eq!(upload.file_name, "boat.png");
    assert_eq!(upload.content_type.as_deref(), Some("image/png"));
    // The upload is made as the run's end user, like the run itself.
    assert_eq!(
        upload.user.as_deref(),
        Some(format!("wfq-{}", row.idempotency_key).as_str())
    );
    let expected = json!({
        "type": "image",
        "transfer_method": "local_file",
        "upload_file_id": upload.id,
    });
    assert_eq!(row.sent_inputs.as_ref().unwrap()["photo"], expected);
    let seen = inputs_at_dify(&sim, row.provider_run_id.as_deref().unwrap()).await;
    assert_eq!(seen["photo"], expected, "Dify got the upload's id");
    assert_eq!(seen["query"], "what is in it");
    assert_eq!(sim.dify_ledger().len(), 1);
    let files = files_of(&pool, id).await;
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        (
            files[0].0.as_str(),
            files[0].1.as_str(),
            files[0].3.as_str()
        ),
        ("input", "photo", "done")
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn dify_limits_from_its_parameters_are_checked_before_anything_is_sent(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    // Dify's /parameters states a 2000-byte limit (the sim would also
    // refuse a larger upload, but nothing may reach it).
    sim.set_faults(Faults {
        max_upload_bytes: Some(2000),
        ..Faults::default()
    });
    let dir = temp_store();
    let (big, _) = picture(&dir, "big.png", 4096);
    let (small, _) = picture(&dir, "small.png", 1000);
    let audio = dir.join("voice.wav");
    std::fs::write(&audio, b"RIFF\0\0\0\0WAVEfmt \0\0\0\0").unwrap();
    let config = config_with_storage(
        &sim,
        "upload-dify-limits",
        &format!("url = \"file://{}/store\"", dir.display()),
        &dify_picture(&sim),
    );
    let worker = start_worker(config, pool.clone());
    let too_large = enqueue_dify_photo(&pool, &big).await;
    let wrong_type = enqueue_dify_photo(&pool, &format!("file://{}", audio.display())).await;
    wait_all_final(&pool, Duration::from_secs(60)).await;
    let a = run(&pool, too_large).await;
    assert_eq!(
        (a.state.as_str(), a.error_code.as_deref()),
        ("failed", Some("FILE_TOO_LARGE"))
    );
    let message = a.error_message.unwrap_or_default();
    assert!(
        message.starts_with("inputs.photo: ") && message.contains("limit of 2000 bytes"),
        "{message}"
    );
    let b = run(&pool, wrong_type).await;
    assert_eq!(
        (b.state.as_str(), b.error_code.as_deref()),
        ("failed", Some("FILE_TYPE_NOT_ACCEPTED"))
    );
    let message = b.error_message.unwrap_or_default();
    assert!(
        message.starts_with("inputs.photo: the app takes image files") && message.contains("audio"),
        "{message}"
    );
    assert_eq!(sim.stats().upload_requests, 0, "nothing was sent");
    assert_eq!(sim.stats().dify_run_requests, 0, "nothing was submitted");
    // A file within the limits still goes through.
    let fits = enqueue_dify_photo(&pool, &small).await;
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;
    let c = run(&pool, fits).await;
    assert_eq!(c.state, "succeeded", "{:?}", c.error_message);
    assert_eq!(sim.uploads().len(), 1);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// An http(s) input file served by the simulator: the output link of a
/// text-to-image run, finished (and mirrored) before anything else.
async fn a_served_picture(pool: &PgPool) -> String {
    let id = enqueue(pool, TEXT_TO_IMAGE, json!({"n6_text": "a boat"})).await;
    wait_media_settled(pool, id).await;
    let row = run(pool, id).await;
    row.outputs.expect("outputs")["n9_images"]
        .as_str()
        .expect("a link")
        .to_owned()
}

#[sqlx::test]
async fn an_input_read_that_fails_twice_is_tried_again_and_then_uploaded(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let config = config_with_storage(
        &sim,
        "read-retry",
        &format!("url = \"file://{}/store\"", dir.display()),
        "",
    );
    let worker = start_worker(config, pool.clone());
    let link = a_served_picture(&pool).await;
    let requests_before = sim.stats().media_requests;
    sim.set_faults(Faults {
        fail_next_downloads: 2,
        ..Faults::default()
    });
    let id = enqueue_video(&pool, &link).await;
    wait_for(
        &pool,
        &format!("(SELECT state IN ('succeeded', 'failed') FROM wfq.runs WHERE id = {id})"),
        Duration::from_secs(60),
    )
    .await;
    wait_media_settled(&pool, id).await;
    worker.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{:?}", row.error_message);
    // Two failed reads and the one that worked, then the copy of the
    // run's own output.
    assert_eq!(sim.stats().media_requests - requests_before, 4);
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert_eq!(row.sent_inputs.unwrap()["image"], json!(uploads[0].uri));
    let retries = event_kinds(&pool, id)
        .await
        .into_iter()
        .filter(|k| k == "file_read_retry")
        .count();
    assert_eq!(retries, 2);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn an_input_that_stays_unreadable_fails_its_run_after_bounded_tries(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let config = config_with_storage(
        &sim,
        "read-gives-up",
        &format!("url = \"file://{}/store\"", dir.display()),
        "",
    );
    let worker = start_worker(config, pool.clone());
    let link = a_served_picture(&pool).await;
    let requests_before = sim.stats().media_requests;
    sim.set_faults(Faults {
        fail_next_downloads: 1000,
        ..Faults::default()
    });
    let id = enqueue_video(&pool, &link).await;
    wait_for(
        &pool,
        &format!("(SELECT state IN ('succeeded', 'failed') FROM wfq.runs WHERE id = {id})"),
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "failed");
    assert_eq!(row.error_code.as_deref(), Some("FILE_UNREADABLE"));
    let message = row.error_message.unwrap_or_default();
    // `[submit] max_attempts = 6` in the test configuration.
    assert!(
        message.starts_with("inputs.image: could not read http://")
            && message.contains("in 6 attempts (last: ")
            && message.contains("HTTP 503"),
        "{message}"
    );
    assert_eq!(sim.stats().media_requests - requests_before, 6);
    assert!(sim.uploads().is_empty(), "nothing uploaded");
    assert_eq!(sim.ledger().len(), 1, "only the first run was submitted");
    assert!(row.frozen_amount.is_none() && row.provider_run_id.is_none());
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn a_dify_file_list_input_is_sent_as_a_list_of_uploads(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let (photo, _) = picture(&dir, "boat.png", 1200);
    let notes = dir.join("notes.pdf");
    std::fs::write(&notes, b"%PDF-1.4 simulated notes").unwrap();
    let config = config_with_storage(
        &sim,
        "upload-dify-list",
        &format!("url = \"file://{}/store\"", dir.display()),
        &dify_picture(&sim),
    );
    let worker = start_worker(config, pool.clone());
    let id = enqueue_on(
        &pool,
        "dify_picture",
        "picture",
        json!({
            "query": "compare",
            "photo": {"$file": photo},
            "references": {"$file": format!("file://{}", notes.display())},
        }),
    )
    .await;
    wait_all_final(&pool, Duration::from_secs(60)).await;
    worker.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{:?}", row.error_message);
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    let pdf = uploads
        .iter()
        .find(|u| u.file_name == "notes.pdf")
        .expect("the PDF was uploaded");
    let expected = json!([{
        "type": "document",
        "transfer_method": "local_file",
        "upload_file_id": pdf.id,
    }]);
    assert_eq!(row.sent_inputs.as_ref().unwrap()["references"], expected);
    let seen = inputs_at_dify(&sim, row.provider_run_id.as_deref().unwrap()).await;
    assert_eq!(seen["references"], expected);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
