//! The `wfq` binary as users run it: subcommands against a real database,
//! and the worker daemon stopped with SIGTERM.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;

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

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

#[sqlx::test]
async fn subcommands_enqueue_list_show_cancel_and_retry(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let db = database_url(&connect);
    let migrate = wfq(&db, &["migrate"]);
    assert!(migrate.status.success(), "{}", stderr(&migrate));

    let out = wfq(
        &db,
        &[
            "enqueue",
            "--workflow",
            TEXT_TO_IMAGE,
            "--inputs",
            r#"{"n6_text": "cli"}"#,
            "--priority",
            "-3",
            "--not-before",
            "1h",
            "--metadata",
            r#"{"order": 17}"#,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id: i64 = stdout(&out).parse().expect("enqueue prints the id");

    let list = wfq(&db, &["list"]);
    assert!(list.status.success());
    let line = stdout(&list)
        .lines()
        .find(|l| l.starts_with(&id.to_string()))
        .map(str::to_owned)
        .expect("run listed");
    assert!(
        line.contains("queued") && line.contains(TEXT_TO_IMAGE),
        "{line}"
    );

    let cancel = wfq(&db, &["cancel", &id.to_string(), "--reason", "not needed"]);
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let again = wfq(&db, &["cancel", &id.to_string()]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains(&format!(
            "run {id} is canceled: only a queued run can be canceled"
        )),
        "{}",
        stderr(&again)
    );

    let retry = wfq(&db, &["retry", &id.to_string()]);
    assert!(retry.status.success(), "{}", stderr(&retry));
    let new_id: i64 = stdout(&retry).parse().unwrap();
    assert_ne!(new_id, id);

    let table = wfq(&db, &["show", &id.to_string()]);
    assert!(table.status.success());
    assert!(stdout(&table).contains("canceled"), "{}", stdout(&table));
    let show = wfq(&db, &["show", "--json", &id.to_string()]);
    assert!(show.status.success());
    let shown: serde_json::Value = serde_json::from_str(&stdout(&show)).expect("show prints JSON");
    assert_eq!(shown["state"], "canceled");
    assert_eq!(shown["priority"], -3);
    assert_eq!(shown["metadata"]["order"], 17);
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["canceled", "retried"]);

    let bad = wfq(&db, &["enqueue", "--workflow", "wf", "--inputs", "[1, 2]"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--inputs must be a JSON object"),
        "{}",
        stderr(&bad)
    );
    let missing = wfq(&db, &["show", "424242"]);
    assert!(stderr(&missing).contains("run 424242 does not exist"));
}

#[sqlx::test]
async fn the_worker_daemon_runs_until_sigterm_and_never_logs_the_key(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let db = database_url(&connect);
    let pool: PgPool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(0, 200, 50).await;
    let dir = std::env::temp_dir().join(format!("wfq-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!(
        "worker-{}.toml",
        pool.connect_options().get_database().unwrap_or("x")
    ));
    std::fs::write(
        &config,
        format!(
            "[worker]\nfallback_poll = \"250ms\"\n[poll]\ninitial = \"50ms\"\nmax = \"200ms\"\n\
             [providers.chenyu]\nkind = \"chenyu\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY_VAR\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    let id = enqueue(&pool, TEXT_TO_IMAGE, serde_json::json!({})).await;
    // Logs go to a file, not a pipe: nobody reads a pipe until the worker
    // exits, and a full one (64 KiB of trace lines) would block the worker.
    let log_path = dir.join(format!(
        "worker-{}.log",
        pool.connect_options().get_database().unwrap_or("x")
    ));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(["worker", "--config"])
        .arg(&config)
        .env("DATABASE_URL", &db)
        .env("TEST_KEY_VAR", API_KEY)
        // Everything, HTTP client internals included: that is where a
        // header would leak.
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    wait_all_final(&pool, Duration::from_secs(30)).await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        out.status.success(),
        "exit 0 after SIGTERM: {:?}\n{logs}",
        out.status
    );
    assert_eq!(run(&pool, id).await.state, "succeeded");
    assert!(logs.contains("worker stopped"), "{logs}");
    assert!(
        logs.contains(&format!("run_id={id}")),
        "run lines carry the run id: {logs}"
    );
    assert!(!logs.contains(API_KEY), "the API key leaked into the logs");
    let in_db: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wfq.run_events WHERE detail::text LIKE '%' || $1 || '%'",
    )
    .bind(API_KEY)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(in_db, 0, "the API key leaked into the events");
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&log_path);
    sim.shutdown().await;
}

/// `wfq` with `args` run in `dir` (so `@./file` paths are read there).
fn wfq_in(dir: &std::path::Path, database_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wfq"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("WFQ_DATABASE_URL")
        .env_remove("WFQ_CONFIG")
        .current_dir(dir)
        .output()
        .expect("wfq runs")
}

#[sqlx::test]
async fn files_in_and_out_through_the_binary_enqueue_input_media_get_and_prune(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    use common::files::{config_with_storage, files_of, sha256, temp_store, wait_media_settled};
    let db = database_url(&connect);
    let pool: PgPool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .unwrap();
    let sim = start_sim(20, 50, 20).await;
    let dir = temp_store();
    let store = dir.join("store");
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        format!("[storage]\nurl = \"file://{}\"\n", store.display()),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let mut picture = b"\x89PNG\r\n\x1a\n".to_vec();
    picture.extend((0..1500).map(|i| (i % 241) as u8));
    std::fs::write(dir.join("boat.png"), &picture).unwrap();

    let out = wfq_in(
        &dir,
        &db,
        &[
            "--config",
            config,
            "enqueue",
            "--workflow",
            VIDEO,
            "--accept-external-cost-risk",
            "--input",
            "image=@./boat.png",
            "--input",
            "prompt=a paper boat",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id: i64 = stdout(&out).parse().expect("enqueue prints the id");
    // The file went into the store; the run names it there.
    let inputs: serde_json::Value = sqlx::query_scalar("SELECT inputs FROM wfq.runs WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(inputs["prompt"], "a paper boat");
    let stored_input = inputs["image"]["$file"].as_str().expect("a $file value");
    assert!(
        stored_input.starts_with("inputs/") && stored_input.ends_with("/boat.png"),
        "{inputs}"
    );
    assert_eq!(std::fs::read(store.join(stored_input)).unwrap(), picture);

    let worker = start_worker(
        config_with_storage(
            &sim,
            "cli-files",
            &format!("url = \"file://{}\"", store.display()),
            "",
        ),
        pool.clone(),
    );
    wait_media_settled(&pool, id).await;
    worker.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{:?}", row.error_message);
    let uploads = sim.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].sha256, sha256(&picture));
    assert_eq!(
        row.sent_inputs.unwrap()["image"],
        uploads[0].uri.clone().unwrap()
    );

    // The mirrored output, fetched through the binary.
    let got = dir.join("got");
    let media = wfq_in(
        &dir,
        &db,
        &[
            "--config",
            config,
            "media",
            "get",
            &id.to_string(),
            "-o",
            "got",
        ],
    );
    assert!(media.status.success(), "{}", stderr(&media));
    let printed = stdout(&media);
    assert!(printed.ends_with("video.mp4"), "{printed}");
    let fetched = std::fs::read(got.join("video.mp4")).expect("fetched file");
    assert_eq!(
        fetched,
        std::fs::read(store.join(format!("{id}/video.mp4"))).unwrap()
    );
    let one = wfq_in(
        &dir,
        &db,
        &[
            "--config",
            config,
            "media",
            "get",
            &id.to_string(),
            "video",
            "-o",
            "one",
        ],
    );
    assert!(one.status.success(), "{}", stderr(&one));
    assert!(dir.join("one/video.mp4").exists());
    let none = wfq_in(
        &dir,
        &db,
        &["--config", config, "media", "get", &id.to_string(), "nope"],
    );
    assert!(!none.status.success());
    assert!(
        stderr(&none).contains(&format!("run {id} has no stored outputs under key nope")),
        "{}",
        stderr(&none)
    );

    // Pruned with its run: the stored output goes, the row and its files
    // too; another run's directory whose name starts the same (run 1 next
    // to run 10) and the input file put into the store stay.
    let neighbour = store.join(format!("{id}0"));
    std::fs::create_dir_all(&neighbour).unwrap();
    std::fs::write(neighbour.join("video.mp4"), b"another run's").unwrap();
    sqlx::query("UPDATE wfq.runs SET finished_at = now() - interval '2 days' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let prune = wfq_in(
        &dir,
        &db,
        &["--config", config, "prune", "--finished-before", "1d"],
    );
    assert!(prune.status.success(), "{}", stderr(&prune));
    let said = stdout(&prune);
    assert!(
        said.contains("deleted 1 stored files") && said.contains("deleted 1 finished runs"),
        "{said}"
    );
    assert!(
        !store.join(id.to_string()).exists(),
        "the run's files are gone"
    );
    assert_eq!(
        std::fs::read(neighbour.join("video.mp4")).unwrap(),
        b"another run's",
        "another run's directory stays"
    );
    assert_eq!(
        std::fs::read(store.join(stored_input)).unwrap(),
        picture,
        "the input file stays"
    );
    assert!(files_of(&pool, id).await.is_empty());
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `wfq prune` deletes a run's files from the store before its row: a run
/// whose files are still in the store, or whose output copy is in
/// progress, is kept by the database whatever ran before (here a prune
/// without `[storage]`, which cannot delete files), with a warning; a
/// prune with the store deletes the files, then the run.
#[sqlx::test]
async fn prune_keeps_runs_whose_files_are_still_in_the_store(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let db = database_url(&connect);
    let pool: PgPool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(connect)
        .await
        .unwrap();
    let old = |name: &str| {
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO wfq.runs (workflow_id, state, finished_at, settled_at) \
             VALUES ($1, 'succeeded', now() - interval '2 days', now() - interval '2 days') RETURNING id",
        )
        .bind(name.to_owned())
    };
    let stored = old("stored").fetch_one(&pool).await.unwrap();
    let copying = old("copying").fetch_one(&pool).await.unwrap();
    old("plain").fetch_one(&pool).await.unwrap();
    let dir = common::files::temp_store();
    let store = dir.join("store");
    let file = store.join(format!("{stored}/video.mp4"));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"kept until deleted").unwrap();
    // The run being copied has one output stored already, another pending.
    let copied = store.join(format!("{copying}/a.png"));
    std::fs::create_dir_all(copied.parent().unwrap()).unwrap();
    std::fs::write(&copied, b"copied so far").unwrap();
    sqlx::query(
        "INSERT INTO wfq.run_files (run_id, direction, key, profile, state, stored_location) VALUES \
         ($1, 'output', 'video', 'chenyu', 'done', $3), \
         ($2, 'output', 'a', 'chenyu', 'done', $4), ($2, 'output', 'b', 'chenyu', 'pending', NULL)",
    )
    .bind(stored)
    .bind(copying)
    .bind(format!("file://{}", file.display()))
    .bind(format!("file://{}", copied.display()))
    .execute(&pool)
    .await
    .unwrap();
    let left = || async {
        sqlx::query_scalar::<_, String>("SELECT workflow_id FROM wfq.runs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap()
    };

    // No worker.toml in `dir`: no store.
    let prune = wfq_in(&dir, &db, &["prune", "--finished-before", "1d"]);
    assert!(prune.status.success(), "{}", stderr(&prune));
    assert_eq!(stdout(&prune), "deleted 1 finished runs and their events");
    assert!(
        stderr(&prune).contains("kept 2 finished runs that have files in the store"),
        "{}",
        stderr(&prune)
    );
    assert_eq!(left().await, vec!["stored", "copying"]);
    assert!(file.exists(), "the stored file is still recorded");

    // With the store: the files first, then the run; the copy in progress
    // still holds its run.
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        format!("[storage]\nurl = \"file://{}\"\n", store.display()),
    )
    .unwrap();
    let prune = wfq_in(&dir, &db, &["prune", "--finished-before", "1d"]);
    assert!(prune.status.success(), "{}", stderr(&prune));
    let said = stdout(&prune);
    assert!(
        said.contains("deleted 1 stored files") && said.contains("deleted 1 finished runs"),
        "{said}"
    );
    assert!(!file.exists());
    assert!(copied.exists(), "kept with its run while the copy goes on");
    assert_eq!(left().await, vec!["copying"]);
    assert!(
        stderr(&prune).contains("kept 1 finished runs whose files are still being copied"),
        "{}",
        stderr(&prune)
    );

    // The copy is over: the file it stored so far goes, then the run.
    sqlx::query(
        "UPDATE wfq.run_files SET state = 'skipped' WHERE run_id = $1 AND state = 'pending'",
    )
    .bind(copying)
    .execute(&pool)
    .await
    .unwrap();
    let prune = wfq_in(&dir, &db, &["prune", "--finished-before", "1d"]);
    assert!(prune.status.success(), "{}", stderr(&prune));
    assert!(!copied.exists());
    assert!(left().await.is_empty());
    assert!(!stderr(&prune).contains("kept"), "{}", stderr(&prune));
    let _ = std::fs::remove_dir_all(dir);
}
