//! The dashboard in a real browser: Debian's chromium, headless, driven
//! through chromedriver (WebDriver, the `fantoccini` crate). Opens the
//! overview (live refresh running), filters runs, opens a run and waits
//! for its image preview to load, cancels a queued run and retries a
//! failed one through the pages, pauses a profile and watches a worker
//! hold its runs. Screenshots of every page, on a laptop and a phone, go
//! to `target/web-screenshots/`.
//!
//! Without chromium or chromedriver the test prints a note and passes,
//! unless `CI` is set: then it fails (`.ci/run` installs both).

mod common;
#[path = "web_harness/mod.rs"]
mod web_harness;

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use sqlx::PgPool;

use common::{ALWAYS_FAILS, TEXT_TO_IMAGE};

const CHROMIUM: &str = "chromium";
const CHROMEDRIVER: &str = "chromedriver";
const LIMIT: Duration = Duration::from_secs(60);

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// chromedriver on a free loopback port, and a headless session.
async fn browser() -> Option<(tokio::process::Child, Client)> {
    let (Some(chromium), Some(driver)) = (which(CHROMIUM), which(CHROMEDRIVER)) else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "CI is set, but {CHROMIUM} or {CHROMEDRIVER} is not installed (.ci/run installs them)"
            );
        }
        eprintln!(
            "note: skipping the browser test: {CHROMIUM} and {CHROMEDRIVER} are not both on PATH (apt-get install chromium chromium-driver)"
        );
        return None;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = tokio::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let profile = std::env::temp_dir().join(format!("wfq-web-chromium-{}", std::process::id()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1366,900", "--hide-scrollbars",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a chromium session");
    Some((child, client))
}

fn shots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Screenshots of the page at `url` on a laptop and on a phone.
async fn shoot(client: &Client, url: &str, name: &str) {
    let dir = shots_dir();
    for (size, (w, h)) in [("desktop", (1366, 900)), ("phone", (390, 844))] {
        client.set_window_size(w, h).await.unwrap();
        client.goto(url).await.unwrap();
        let png = client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}-{size}.png")), png).unwrap();
    }
    client.set_window_size(1366, 900).await.unwrap();
}

async fn wait_js(client: &Client, script: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let v = client.execute(script, vec![]).await.unwrap();
        if v.as_bool() == Some(true) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test]
async fn the_dashboard_works_in_a_browser(pool: PgPool) {
    let Some((_driver, client)) = browser().await else {
        return;
    };
    let sim = common::start_sim(20, 80, 20).await;
    let media = std::env::temp_dir().join(format!(
        "wfq-web-browser-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let config = web_harness::config(&sim.base_url(), &sim.dify_base_url("text"), &media, "", &[]);
    let mut worker_config = config.clone();
    worker_config.web = None;

    // Some history: a picture, a failure (settled), a Dify answer, and a run
    // for later that stays queued (not before an hour from now).
    let picture = common::enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "a lighthouse"})).await;
    let failed = common::enqueue(&pool, ALWAYS_FAILS, json!({"prompt": "x"})).await;
    let answer = common::enqueue_on(
        &pool,
        "dify",
        "summarize",
        json!({"query": "notes", "tone": "formal"}),
    )
    .await;
    let later: i64 = sqlx::query_scalar(
        "INSERT INTO wfq.runs (workflow_id, not_before, metadata) \
         VALUES ($1, now() + interval '1 hour', '{\"customer\": \"acme\"}') RETURNING id",
    )
    .bind(TEXT_TO_IMAGE)
    .fetch_one(&pool)
    .await
    .unwrap();
    let worker = common::start_worker(worker_config.clone(), pool.clone());
    common::wait_for(
        &pool,
        &format!(
            "(SELECT count(*) = 3 FROM wfq.runs WHERE \
               (id = {picture} AND state = 'succeeded' AND media_state = 'done') \
               OR (id = {failed} AND state = 'failed' AND settled_at IS NOT NULL) \
               OR (id = {answer} AND state = 'succeeded'))"
        ),
        LIMIT,
    )
    .await;
    worker.stop().await;

    let dash = web_harness::serve(&pool, &config).await;
    let base = dash.base.clone();

    // The overview, refreshed live.
    client.goto(&format!("{base}/")).await.unwrap();
    let h1 = client
        .find(Locator::Css("h1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(h1, "Overview");
    wait_js(
        &client,
        "return (document.getElementById('live-stamp') || {}).textContent.startsWith('updated')",
        "the overview refreshed itself",
    )
    .await;
    shoot(&client, &format!("{base}/"), "overview").await;

    // Filter the runs: failed only.
    client.goto(&format!("{base}/runs")).await.unwrap();
    let form = client.find(Locator::Css("form.filters")).await.unwrap();
    form.find(Locator::Css("select[name=state]"))
        .await
        .unwrap()
        .select_by_value("failed")
        .await
        .unwrap();
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .wait()
        .at_most(LIMIT)
        .for_element(Locator::Css(&format!("a[href='/runs/{failed}']")))
        .await
        .unwrap();
    let listed = client
        .find_all(Locator::Css("table.runs tbody tr"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "only the failed run");
    assert!(
        client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains("state=failed")
    );
    shoot(&client, &format!("{base}/runs"), "runs").await;

    // The picture's run: its preview (the stored copy) loads.
    client
        .goto(&format!("{base}/runs/{picture}"))
        .await
        .unwrap();
    wait_js(
        &client,
        "const i = document.querySelector('.gallery img'); return !!i && i.complete && i.naturalWidth > 0",
        "the image preview loaded",
    )
    .await;
    let src = client
        .find(Locator::Css(".gallery img"))
        .await
        .unwrap()
        .attr("src")
        .await
        .unwrap()
        .unwrap();
    assert!(src.starts_with("/files/"), "{src}");
    shoot(&client, &format!("{base}/runs/{picture}"), "run").await;

    // Cancel the queued run: select it, confirm, apply.
    client
        .goto(&format!("{base}/runs?state=queued"))
        .await
        .unwrap();
    client
        .find(Locator::Css(&format!("input[name=id][value='{later}']")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .find(Locator::Css("button[value=cancel]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let confirm = client
        .wait()
        .at_most(LIMIT)
        .for_element(Locator::Css(
            "form[action='/runs/apply'] button[type=submit]",
        ))
        .await
        .unwrap();
    let png = client.screenshot().await.unwrap();
    std::fs::write(shots_dir().join("confirm-desktop.png"), png).unwrap();
    confirm.click().await.unwrap();
    client
        .wait()
        .at_most(LIMIT)
        .for_element(Locator::Css("ul.outcomes"))
        .await
        .unwrap();
    assert_eq!(common::run(&pool, later).await.state, "canceled");

    // Retry the failed run from its page (the button asks first).
    client.goto(&format!("{base}/runs/{failed}")).await.unwrap();
    client
        .find(Locator::Css(&format!(
            "form[action='/runs/{failed}/retry'] button"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client.accept_alert().await.unwrap();
    client
        .wait()
        .at_most(LIMIT)
        .for_element(Locator::Css(".notice.ok"))
        .await
        .unwrap();
    let copy: i64 = sqlx::query_scalar("SELECT id FROM wfq.runs WHERE retry_of = $1")
        .bind(failed)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with(&format!("/runs/{copy}")),
        "the new run's page"
    );
    shoot(&client, &format!("{base}/runs/{failed}"), "run-failed").await;
    shoot(&client, &format!("{base}/costs"), "costs").await;

    // Pause dify by hand; a worker holds its runs while chenyu's go on.
    client.goto(&format!("{base}/providers")).await.unwrap();
    let pause = client
        .find(Locator::Css("form[action='/providers/dify/pause']"))
        .await
        .unwrap();
    pause
        .find(Locator::Css("input[name=reason]"))
        .await
        .unwrap()
        .send_keys("maintenance window")
        .await
        .unwrap();
    pause
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .wait()
        .at_most(LIMIT)
        .for_element(Locator::Css("form[action='/providers/dify/resume']"))
        .await
        .unwrap();
    assert_eq!(
        wfq::store::manual_pauses(&pool).await.unwrap(),
        vec![("dify".to_owned(), "maintenance window".to_owned())]
    );
    shoot(&client, &format!("{base}/providers"), "providers").await;
    let held = common::enqueue_on(
        &pool,
        "dify",
        "summarize",
        json!({"query": "q", "tone": "formal"}),
    )
    .await;
    let goes = common::enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "a harbour"})).await;
    let worker = common::start_worker(worker_config.clone(), pool.clone());
    common::wait_for(
        &pool,
        &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {goes})"),
        LIMIT,
    )
    .await;
    let row = common::run(&pool, held).await;
    assert_eq!((row.state.as_str(), row.attempts), ("queued", 0), "{row:?}");
    shoot(&client, &format!("{base}/workers"), "workers").await;
    // Resume from the page: the held run goes.
    client.goto(&format!("{base}/providers")).await.unwrap();
    client
        .find(Locator::Css("form[action='/providers/dify/resume'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    common::wait_for(
        &pool,
        &format!("(SELECT state = 'succeeded' FROM wfq.runs WHERE id = {held})"),
        LIMIT,
    )
    .await;
    worker.stop().await;
    client.close().await.unwrap();
    dash.server.stop().await;
    sim.shutdown().await;
}
