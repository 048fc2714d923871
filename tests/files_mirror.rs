//! Outputs kept: media outputs of succeeded runs copied to `[storage]` (a
//! local directory, and S3 through moto), with the failures a mirror meets:
//! downloads that fail and then work, links that expired, a file beyond
//! the size limit streamed and stopped. The simulator serves real files at
//! its output links.

mod common;

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;

use common::files::*;
use common::*;
use wfq::sim::Faults;

const AUDIO_DUB: &str = "wf_audio_dub_7c21";

fn local_storage(dir: &std::path::Path, more: &str) -> String {
    format!("url = \"file://{}\"\n{more}", dir.display())
}

#[sqlx::test]
async fn outputs_are_mirrored_to_a_local_store(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let config = config_with_storage(&sim, "mirror-local", &local_storage(&dir, ""), "");
    let worker = start_worker(config, pool.clone());
    let image = enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "a boat"})).await;
    let audio = enqueue(
        &pool,
        AUDIO_DUB,
        json!({"video": "https://example.com/v.mp4", "script": "hello"}),
    )
    .await;
    wait_media_settled(&pool, image).await;
    wait_media_settled(&pool, audio).await;
    worker.stop().await;

    for (id, key, ext, magic) in [
        (image, "n9_images", "png", &b"\x89PNG"[..]),
        (audio, "audio", "wav", &b"RIFF"[..]),
    ] {
        let row = run(&pool, id).await;
        assert_eq!(row.state, "succeeded");
        let (state, mirrored) = media_of(&pool, id).await;
        assert_eq!(state.as_deref(), Some("done"));
        let location = format!("file://{}/{id}/{key}.{ext}", dir.display());
        assert_eq!(mirrored.unwrap()[key], json!(location));
        let bytes = std::fs::read(dir.join(format!("{id}/{key}.{ext}"))).expect("stored file");
        assert!(bytes.starts_with(magic), "{key}");
        let files = files_of(&pool, id).await;
        assert_eq!(files.len(), 1, "{files:?}");
        let (direction, _, _, state, _, stored, sha, attempts) = &files[0];
        assert_eq!(
            (direction.as_str(), state.as_str(), *attempts),
            ("output", "done", 1)
        );
        assert_eq!(stored.as_deref(), Some(location.as_str()));
        assert_eq!(sha.as_deref(), Some(sha256(&bytes).as_str()));
        assert!(
            event_kinds(&pool, id)
                .await
                .contains(&"media_mirrored".to_owned())
        );
    }
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn a_download_that_fails_twice_then_succeeds(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    sim.set_faults(Faults {
        fail_next_downloads: 2,
        ..Faults::default()
    });
    let dir = temp_store();
    let config = config_with_storage(&sim, "mirror-retry", &local_storage(&dir, ""), "");
    let worker = start_worker(config, pool.clone());
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    wait_media_settled(&pool, id).await;
    worker.stop().await;
    assert_eq!(media_of(&pool, id).await.0.as_deref(), Some("done"));
    let files = files_of(&pool, id).await;
    assert_eq!(files[0].3, "done");
    assert_eq!(files[0].7, 3, "two failures, then the copy: {files:?}");
    assert_eq!(sim.stats().media_requests, 3);
    assert!(dir.join(format!("{id}/n9_images.png")).exists());
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn an_output_link_that_expired_is_a_clear_state(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    sim.set_faults(Faults {
        media_ttl_ms: Some(0),
        ..Faults::default()
    });
    let dir = temp_store();
    let config = config_with_storage(&sim, "mirror-expired", &local_storage(&dir, ""), "");
    let worker = start_worker(config, pool.clone());
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    wait_media_settled(&pool, id).await;
    worker.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(
        row.state, "succeeded",
        "the run's own state does not depend on mirroring"
    );
    assert!(row.settled_at.is_some());
    let (state, mirrored) = media_of(&pool, id).await;
    assert_eq!(state.as_deref(), Some("failed"));
    assert_eq!(mirrored.unwrap()["n9_images"], serde_json::Value::Null);
    let files = files_of(&pool, id).await;
    assert_eq!(
        (files[0].3.as_str(), files[0].4.as_deref(), files[0].7),
        ("expired", Some("LINK_EXPIRED"), 1),
        "expired links are not retried"
    );
    let problems: Vec<(i64, String)> =
        sqlx::query_as("SELECT run_id, error_code FROM wfq.media_problems")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(problems, vec![(id, "LINK_EXPIRED".to_owned())]);
    assert!(
        event_kinds(&pool, id)
            .await
            .contains(&"media_failed".to_owned())
    );
    assert_eq!(sim.stats().media_expired, 1);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[sqlx::test]
async fn a_1gb_output_is_refused_by_the_size_limit_while_streaming(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    sim.set_faults(Faults {
        media_size_bytes: Some(1 << 30),
        ..Faults::default()
    });
    let dir = temp_store();
    let storage = local_storage(&dir, "max_file_bytes = \"8MiB\"");
    let config = config_with_storage(&sim, "mirror-large", &storage, "");
    let worker = start_worker(config, pool.clone());
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    wait_media_settled(&pool, id).await;
    worker.stop().await;
    let files = files_of(&pool, id).await;
    assert_eq!(
        (files[0].3.as_str(), files[0].4.as_deref()),
        ("failed", Some("TOO_LARGE"))
    );
    assert_eq!(media_of(&pool, id).await.0.as_deref(), Some("failed"));
    // Streamed and stopped: far less than the gigabyte was ever sent, and
    // nothing was left in the store.
    let sent = sim.stats().media_bytes_sent;
    assert!(
        sent < 64 << 20,
        "{sent} bytes were sent before the copy stopped"
    );
    let left: Vec<_> = walk(&dir);
    assert!(left.is_empty(), "{left:?}");
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[sqlx::test]
async fn outputs_are_mirrored_to_s3(pool: PgPool) {
    let Some(s3) = S3Server::find().await else {
        return;
    };
    let bucket = s3.bucket().await;
    let sim = start_sim(20, 50, 20).await;
    let storage = format!(
        "url = \"s3://{bucket}/media/out\"\nendpoint = \"{}\"\nregion = \"us-east-1\"",
        s3.endpoint
    );
    let config = config_with_storage(&sim, "mirror-s3", &storage, "");
    let worker = start_worker(config, pool.clone());
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    wait_media_settled(&pool, id).await;
    worker.stop().await;
    let (state, mirrored) = media_of(&pool, id).await;
    assert_eq!(state.as_deref(), Some("done"));
    let location = format!("s3://{bucket}/media/out/{id}/n9_images.png");
    assert_eq!(mirrored.unwrap()["n9_images"], json!(location));
    let bytes = s3
        .object(&bucket, &format!("media/out/{id}/n9_images.png"))
        .await;
    assert!(bytes.starts_with(b"\x89PNG"));
    let files = files_of(&pool, id).await;
    assert_eq!(files[0].6.as_deref(), Some(sha256(&bytes).as_str()));
    // The secret is nowhere in the database.
    let leaked: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM wfq.runs r WHERE r::text LIKE '%' || $1 || '%') \
         OR EXISTS (SELECT 1 FROM wfq.run_files f WHERE f::text LIKE '%' || $1 || '%') \
         OR EXISTS (SELECT 1 FROM wfq.run_events e WHERE e::text LIKE '%' || $1 || '%')",
    )
    .bind(S3_SECRET)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(!leaked);
    sim.shutdown().await;
    let _ = Duration::ZERO;
}

#[sqlx::test]
async fn an_output_is_media_by_its_manifest_type_whatever_its_content_type(pool: PgPool) {
    let sim = start_sim(20, 50, 20).await;
    // The link answers `text/plain`; the workflow's output manifest says
    // `n9_images` is an image: it is kept, as bytes (the kind is unknown).
    sim.set_faults(Faults {
        media_content_type: Some("text/plain".into()),
        ..Faults::default()
    });
    let dir = temp_store();
    let config = config_with_storage(&sim, "mirror-typed", &local_storage(&dir, ""), "");
    let worker = start_worker(config, pool.clone());
    let id = enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    wait_media_settled(&pool, id).await;
    worker.stop().await;
    let (state, mirrored) = media_of(&pool, id).await;
    assert_eq!(state.as_deref(), Some("done"));
    let location = format!("file://{}/{id}/n9_images.bin", dir.display());
    assert_eq!(mirrored.unwrap()["n9_images"], json!(location));
    let bytes = std::fs::read(dir.join(format!("{id}/n9_images.bin"))).expect("stored");
    assert!(bytes.starts_with(b"\x89PNG"));
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `Storage` on `url` with the test's S3 credentials and `endpoint`.
fn open_store(url: &str, endpoint: Option<&str>) -> wfq::files::Storage {
    struct Env(Vec<(&'static str, String)>);
    impl wfq::config::Environment for Env {
        fn var(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    }
    let mut env = vec![
        ("AWS_ACCESS_KEY_ID", S3_KEY_ID.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET.to_owned()),
    ];
    if let Some(endpoint) = endpoint {
        env.push(("AWS_ENDPOINT_URL", endpoint.to_owned()));
    }
    let config = wfq::files::RawStorageConfig::minimal(url)
        .parse(&Env(env))
        .expect("storage config");
    wfq::files::Storage::open(&config).expect("store opens")
}

/// What prune deletes for run 1 is run 1's directory, not run 10's.
async fn delete_under_takes_one_run_only(store: &wfq::files::Storage) {
    for name in ["1/a.png", "1/frames/0.png", "10/b.png", "1.png"] {
        let chunk: Result<bytes::Bytes, std::io::Error> = Ok(bytes::Bytes::from_static(b"x"));
        store
            .write_stream(name, futures_util::stream::iter([chunk]), 10)
            .await
            .expect("write");
    }
    assert_eq!(store.delete_under("1").await.expect("delete"), 2);
    assert!(store.read("10/b.png").await.is_ok(), "run 10's file stays");
    assert!(
        store.read("1.png").await.is_ok(),
        "a name that merely starts alike stays"
    );
    assert!(store.read("1/a.png").await.is_err());
}

#[tokio::test]
async fn prune_deletes_one_runs_files_only_in_a_local_store() {
    let dir = temp_store();
    let store = open_store(&format!("file://{}", dir.display()), None);
    delete_under_takes_one_run_only(&store).await;
    assert!(!dir.join("1").exists(), "the emptied directory goes too");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn prune_deletes_one_runs_files_only_in_s3() {
    let Some(s3) = S3Server::find().await else {
        return;
    };
    let bucket = s3.bucket().await;
    let store = open_store(&format!("s3://{bucket}/media"), Some(&s3.endpoint));
    delete_under_takes_one_run_only(&store).await;
}
