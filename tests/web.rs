//! The dashboard's handlers against real PostgreSQL: every page and
//! action, escaping of hostile user data, authentication, read-only mode,
//! CSRF, and the refusal to expose an unauthenticated dashboard.

mod common;
#[path = "web_harness/mod.rs"]
mod web_harness;

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;

use common::{ALWAYS_FAILS, API_KEY, TEXT_TO_IMAGE};
use web_harness::{config, serve};

const HOSTILE: &str = "<script>alert(1)</script>";
const CALLBACK_SECRET: &str = "CALLBACK-TOKEN-never-shown";

/// Real runs (a worker against the simulator, outputs mirrored), then
/// rows whose every user-written field is hostile.
async fn seed(pool: &PgPool, media: &std::path::Path) -> (wfq::config::Config, i64, i64, i64) {
    let sim = common::start_sim(20, 60, 20).await;
    let cfg = config(&sim.base_url(), &sim.dify_base_url("text"), media, "", &[]);
    let ok = common::enqueue(pool, TEXT_TO_IMAGE, json!({"n6_text": "a boat"})).await;
    let failed = common::enqueue(pool, ALWAYS_FAILS, json!({"prompt": "x"})).await;
    let mut worker_cfg = cfg.clone();
    worker_cfg.web = None;
    let worker = common::start_worker(worker_cfg, pool.clone());
    common::wait_for(
        pool,
        "NOT EXISTS (SELECT 1 FROM wfq.runs WHERE state IN ('queued','submitting','running') \
         OR (state = 'succeeded' AND media_state IS DISTINCT FROM 'done') \
         OR (finished_at IS NOT NULL AND settled_at IS NULL))",
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;
    let hostile: i64 = sqlx::query_scalar(
        r#"
        INSERT INTO wfq.runs (provider, workflow_id, inputs, metadata, idempotency_key, state,
            outputs, error_code, error_message, error_detail, callback_url, submitted_at,
            finished_at, settled_at, currency, quote_amount, frozen_amount, final_amount,
            released_amount, sent_inputs)
        VALUES ('chenyu', $1, jsonb_build_object('p', $1::text), jsonb_build_object('m', $1::text),
            $1, 'failed',
            jsonb_build_object('o', $1::text, 'img', 'javascript:alert(4)', 'x', 'data:text/html,<script>alert(7)</script>'),
            $1, $1, jsonb_build_object('d', $1::text),
            'https://cb.example/hook?token=' || $2, now(), now(), now(), $1, 1, 1, 0.5, 0.5,
            jsonb_build_object('s', $1::text))
        RETURNING id
        "#,
    )
    .bind(HOSTILE)
    .bind(CALLBACK_SECRET)
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO wfq.runs (provider, workflow_id, hold_reason, metadata) \
         VALUES ('<img src=x onerror=alert(6)>', $1, $1, '{\"customer\": \"acme\"}')",
    )
    .bind(HOSTILE)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO wfq.run_events (run_id, kind, worker, detail) VALUES ($1, $2, $2, jsonb_build_object('x', $2::text))",
    )
    .bind(hostile)
    .bind(HOSTILE)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO wfq.callback_attempts (run_id, attempt, worker, started_at, duration_ms, error, result) \
         VALUES ($1, 1, $2, now(), 5, $2, 'retry')",
    )
    .bind(hostile)
    .bind(HOSTILE)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO wfq.provider_pauses (profile, worker, kind, reason) VALUES ('dify', $1, 'breaker', $1)",
    )
    .bind(HOSTILE)
    .execute(pool)
    .await
    .unwrap();
    sim.shutdown().await;
    (cfg, ok, failed, hostile)
}

fn assert_safe(path: &str, body: &str) {
    for bad in [
        "<script>alert",
        "<img src=x",
        "src=\"javascript:",
        "href=\"javascript:",
        "src=\"data:text/html",
        CALLBACK_SECRET,
        API_KEY,
    ] {
        assert!(!body.contains(bad), "{path} contains {bad:?}");
    }
}

#[sqlx::test]
async fn every_page_renders_and_escapes_user_data(pool: PgPool) {
    let media = tempdir("escape");
    let (cfg, ok, failed, hostile) = seed(&pool, &media).await;
    let dash = serve(&pool, &cfg).await;
    let pages = [
        "/".to_owned(),
        "/fragments/overview".into(),
        "/runs".into(),
        "/runs?state=failed".into(),
        "/runs?meta=customer%3Dacme".into(),
        format!("/runs?workflow={}", urlencode(HOSTILE)),
        format!("/runs/{ok}"),
        format!("/runs/{failed}"),
        format!("/runs/{hostile}"),
        format!("/runs/{hostile}/live"),
        format!("/runs/confirm?action=retry&id={hostile}&id={failed}"),
        "/costs".into(),
        "/providers".into(),
        "/fragments/providers".into(),
        "/workers".into(),
        "/fragments/workers".into(),
    ];
    for path in &pages {
        let got = dash.get(path).await;
        assert_eq!(got.status, 200, "{path}: {}", got.body);
        assert_safe(path, &got.body);
        assert!(
            got.headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("script-src 'self'"),
            "{path}"
        );
    }
    // The hostile texts are there, escaped.
    let run = dash.get(&format!("/runs/{hostile}")).await.body;
    assert!(
        run.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{run}"
    );
    assert!(run.contains("https://cb.example/hook?…"), "{run}");
    let runs = dash.get("/runs?meta=customer%3Dacme").await.body;
    assert!(
        runs.contains("&lt;img src=x onerror=alert(6)&gt;"),
        "{runs}"
    );
    assert!(
        !runs.contains(&format!("/runs/{ok}\"")),
        "the filter keeps only acme's run"
    );
    // The succeeded run shows its picture from the stored copy, which is served.
    let page = dash.get(&format!("/runs/{ok}")).await.body;
    let file_id: i64 = sqlx::query_scalar(
        "SELECT id FROM wfq.run_files WHERE run_id = $1 AND direction = 'output' AND state = 'done' LIMIT 1",
    )
    .bind(ok)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        page.contains(&format!("<img src=\"/files/{file_id}\"")),
        "{page}"
    );
    assert!(page.contains("frozen = final + released"), "{page}");
    let file = dash
        .client
        .get(format!("{}/files/{file_id}", dash.base))
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), 200);
    assert_eq!(file.headers()["content-type"], "image/png");
    assert!(file.bytes().await.unwrap().starts_with(b"\x89PNG"));
    // Costs: the CSV has the day's chenyu rows.
    let got = dash.get("/costs.csv").await;
    assert_eq!(got.headers["content-type"], "text/csv; charset=utf-8");
    assert!(
        got.headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    let csv = got.body;
    assert!(csv.starts_with("budget_date,provider,workflow_id"), "{csv}");
    assert!(
        csv.contains(&format!(",chenyu,{TEXT_TO_IMAGE},CNY,")),
        "{csv}"
    );
    // Unknown pages and runs are 404s, bad filters 400s naming the field.
    assert_eq!(dash.get("/nope").await.status, 404);
    assert_eq!(dash.get("/runs/999999").await.status, 404);
    let bad = dash.get("/runs?created_from=yesterday").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("created_from"), "{}", bad.body);
    dash.server.stop().await;
}

#[sqlx::test]
async fn runs_are_paged_by_key_without_offset(pool: PgPool) {
    sqlx::query(
        "INSERT INTO wfq.runs (workflow_id, inputs) SELECT 'wf_page', jsonb_build_object('n', g) FROM generate_series(1, 120) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let media = tempdir("paging");
    let cfg = config(
        "http://127.0.0.1:1/api/open/v2",
        "http://127.0.0.1:1/v1",
        &media,
        "",
        &[],
    );
    let dash = serve(&pool, &cfg).await;
    let ids = |body: &str| -> Vec<i64> {
        body.match_indices("<a href=\"/runs/")
            .filter_map(|(i, _)| {
                body[i + 15..]
                    .split('"')
                    .next()
                    .and_then(|s| s.parse().ok())
            })
            .collect()
    };
    let first = dash.get("/runs").await.body;
    let page1 = ids(&first);
    assert_eq!(page1, (71..=120).rev().collect::<Vec<i64>>());
    assert!(first.contains("/runs?before=71"), "{first}");
    let page2 = ids(&dash.get("/runs?before=71").await.body);
    assert_eq!(page2, (21..=70).rev().collect::<Vec<i64>>());
    let last = dash.get("/runs?before=21").await.body;
    assert_eq!(ids(&last), (1..=20).rev().collect::<Vec<i64>>());
    assert!(!last.contains("before="), "no page after the oldest run");
    // Queued runs long due and not taken show as overdue on the overview.
    sqlx::query("UPDATE wfq.runs SET due_at = now() - interval '1 minute' WHERE id <= 3")
        .execute(&pool)
        .await
        .unwrap();
    let overview = dash.get("/").await.body;
    assert!(overview.contains("3 overdue"), "{overview}");
    dash.server.stop().await;
}

#[sqlx::test]
async fn actions_need_the_csrf_token_and_do_what_the_cli_does(pool: PgPool) {
    let media = tempdir("actions");
    let cfg = config(
        "http://127.0.0.1:1/api/open/v2",
        "http://127.0.0.1:1/v1",
        &media,
        "",
        &[],
    );
    let dash = serve(&pool, &cfg).await;
    let queued = common::enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    let other = common::enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    let failed: i64 = sqlx::query_scalar(
        "INSERT INTO wfq.runs (workflow_id, state, finished_at, settled_at, currency, quote_amount) \
         VALUES ($1, 'failed', now(), now(), 'CNY', 0.25) RETURNING id",
    )
    .bind(TEXT_TO_IMAGE)
    .fetch_one(&pool)
    .await
    .unwrap();
    let token = dash.csrf().await;
    let state = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM wfq.runs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // Without the token, or with a wrong one, or without the cookie: refused.
    let path = format!("/runs/{queued}/cancel");
    for (form, cookie) in [
        (vec![], Some(token.as_str())),
        (vec![("csrf", "0".repeat(64))], Some(token.as_str())),
        (vec![("csrf", token.clone())], None),
    ] {
        let got = dash.post(&path, &form, cookie).await;
        assert_eq!(got.status, 403, "{}", got.body);
        assert!(got.body.contains("CSRF"), "{}", got.body);
    }
    assert_eq!(state(queued).await, "queued");
    // With it: canceled, like `wfq cancel`.
    let got = dash
        .post(&path, &[("csrf", token.clone())], Some(&token))
        .await;
    assert_eq!(got.status, 303, "{}", got.body);
    assert_eq!(state(queued).await, "canceled");
    let page = dash
        .get(&format!("/runs/{queued}?note=canceled&from={queued}"))
        .await
        .body;
    assert!(page.contains(&format!("Run {queued} canceled.")), "{page}");
    let crafted = dash
        .get(&format!("/runs/{queued}?note=Call+us+now"))
        .await
        .body;
    assert!(
        !crafted.contains("Call us now"),
        "a link cannot write on the page"
    );
    let kinds = common::event_kinds(&pool, queued).await;
    assert!(kinds.contains(&"canceled".to_owned()), "{kinds:?}");
    // The confirmation of a bulk retry says what it costs.
    let confirm = dash
        .get(&format!(
            "/runs/confirm?action=retry&id={failed}&id={other}"
        ))
        .await;
    assert_eq!(confirm.status, 200);
    assert!(
        confirm.body.contains("<strong>0.25 CNY</strong>"),
        "{}",
        confirm.body
    );
    assert!(confirm.body.contains("retry 1 runs"), "{}", confirm.body);
    // Applied: a new run repeats the failed one.
    let applied = dash
        .post(
            "/runs/apply",
            &[
                ("csrf", token.clone()),
                ("action", "retry".into()),
                ("id", failed.to_string()),
            ],
            Some(&token),
        )
        .await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    let copy: i64 = sqlx::query_scalar("SELECT id FROM wfq.runs WHERE retry_of = $1")
        .bind(failed)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        applied.body.contains(&format!("repeated as run {copy}")),
        "{}",
        applied.body
    );
    // A bulk cancel of a run that cannot be canceled says why, per run.
    let applied = dash
        .post(
            "/runs/apply",
            &[
                ("csrf", token.clone()),
                ("action", "cancel".into()),
                ("id", other.to_string()),
                ("id", failed.to_string()),
            ],
            Some(&token),
        )
        .await;
    assert!(
        applied.body.contains(&format!("run {other} canceled")),
        "{}",
        applied.body
    );
    assert!(
        applied.body.contains(&format!("run {failed} is failed")),
        "{}",
        applied.body
    );
    assert_eq!(state(other).await, "canceled");
    // Pause and resume a profile by hand: a manual row every worker follows.
    let got = dash
        .post(
            "/providers/chenyu/pause",
            &[("csrf", token.clone()), ("reason", "maintenance".into())],
            Some(&token),
        )
        .await;
    assert_eq!(got.status, 303, "{}", got.body);
    let pauses = wfq::store::manual_pauses(&pool).await.unwrap();
    assert_eq!(
        pauses,
        vec![("chenyu".to_owned(), "maintenance".to_owned())]
    );
    let page = dash.get("/providers").await.body;
    assert!(page.contains("paused: manual"), "{page}");
    let got = dash
        .post(
            "/providers/chenyu/resume",
            &[("csrf", token.clone())],
            Some(&token),
        )
        .await;
    assert_eq!(got.status, 303, "{}", got.body);
    assert!(wfq::store::manual_pauses(&pool).await.unwrap().is_empty());
    dash.server.stop().await;
}

#[sqlx::test]
async fn read_only_hides_actions_and_refuses_posts(pool: PgPool) {
    let media = tempdir("readonly");
    let cfg = config(
        "http://127.0.0.1:1/api/open/v2",
        "http://127.0.0.1:1/v1",
        &media,
        "read_only = true",
        &[],
    );
    let dash = serve(&pool, &cfg).await;
    let queued = common::enqueue(&pool, TEXT_TO_IMAGE, json!({})).await;
    for path in ["/", "/runs", &format!("/runs/{queued}"), "/providers"] {
        let body = dash.get(path).await.body;
        assert!(
            !body.contains("method=\"post\""),
            "{path} has an action form"
        );
        assert!(body.contains("read-only"), "{path}");
    }
    assert_eq!(
        dash.get(&format!("/runs/confirm?action=cancel&id={queued}"))
            .await
            .status,
        403
    );
    let token = dash.csrf().await;
    for path in [
        format!("/runs/{queued}/cancel"),
        "/runs/apply".into(),
        "/providers/chenyu/pause".into(),
    ] {
        let got = dash
            .post(
                &path,
                &[
                    ("csrf", token.clone()),
                    ("action", "cancel".into()),
                    ("id", queued.to_string()),
                ],
                Some(&token),
            )
            .await;
        assert_eq!(got.status, 403, "{path}");
        assert!(got.body.contains("read-only"), "{}", got.body);
    }
    assert_eq!(common::run(&pool, queued).await.state, "queued");
    assert!(
        wfq::store::paused_providers(&pool)
            .await
            .unwrap()
            .is_empty()
    );
    dash.server.stop().await;
}

#[sqlx::test]
async fn credentials_are_required_when_configured(pool: PgPool) {
    use base64::Engine as _;
    let media = tempdir("auth");
    let token = "web-token-0123456789abcdef";
    let cfg = config(
        "http://127.0.0.1:1/api/open/v2",
        "http://127.0.0.1:1/v1",
        &media,
        "",
        &[("WFQ_WEB_TOKEN", token)],
    );
    let dash = serve(&pool, &cfg).await;
    for path in ["/", "/runs", "/assets/app.css", "/files/1"] {
        let got = dash.get(path).await;
        assert_eq!(got.status, 401, "{path}");
        assert!(
            got.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Basic")
        );
        assert!(!got.body.contains(token));
        assert!(
            got.headers.get("set-cookie").is_none(),
            "no CSRF token without credentials"
        );
    }
    let get = |auth: String| {
        dash.client
            .get(format!("{}/runs", dash.base))
            .header("authorization", auth)
            .send()
    };
    assert_eq!(get(format!("Bearer {token}")).await.unwrap().status(), 200);
    assert_eq!(
        get("Bearer wrong-token-0123456789".into())
            .await
            .unwrap()
            .status(),
        401
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("ops:{token}"));
    assert_eq!(get(format!("Basic {basic}")).await.unwrap().status(), 200);
    dash.server.stop().await;
}

#[sqlx::test]
async fn the_web_pool_has_a_statement_timeout(pool: PgPool) {
    let media = tempdir("timeout");
    let cfg = config(
        "http://127.0.0.1:1/api/open/v2",
        "http://127.0.0.1:1/v1",
        &media,
        "statement_timeout = \"300ms\"",
        &[],
    );
    let dash = serve(&pool, &cfg).await;
    let shown: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&dash.web_pool)
        .await
        .unwrap();
    assert_eq!(shown, "300ms");
    let slow = sqlx::query("SELECT pg_sleep(5)")
        .execute(&dash.web_pool)
        .await;
    assert!(slow.is_err(), "a statement past the timeout is canceled");
    dash.server.stop().await;
}

#[tokio::test]
async fn a_dashboard_off_loopback_without_credentials_refuses_to_start() {
    let env = web_harness::Env(Default::default());
    let text = "[web]\nlisten = \"0.0.0.0:0\"\n";
    let error = wfq::web::run_standalone(text, "worker.toml", &env, None, false, async {})
        .await
        .expect_err("refused");
    let message = error.to_string();
    assert!(message.contains("web.listen"), "{message}");
    assert!(message.contains("WFQ_WEB_TOKEN"), "{message}");
    // The --listen flag is held to the same rule, and so is the worker's [web].
    let error =
        wfq::web::run_standalone("", "worker.toml", &env, Some("0.0.0.0:0"), false, async {})
            .await
            .expect_err("refused");
    assert!(
        error.to_string().contains("not a loopback address"),
        "{error}"
    );
    let error = wfq::config::Config::from_toml(text, "worker.toml", &env).expect_err("refused");
    assert!(
        error.to_string().contains("not a loopback address"),
        "{error}"
    );
}

#[tokio::test]
async fn wfq_web_refuses_a_public_address_as_a_process() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .current_dir(std::env::temp_dir())
        .args(["web", "--listen", "0.0.0.0:0"])
        .env_remove("WFQ_CONFIG")
        .env_remove("WFQ_WEB_TOKEN")
        .env_remove("WFQ_WEB_USER")
        .env_remove("WFQ_WEB_PASSWORD")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "wfq-web-{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `[web] listen` in a worker's configuration: the worker serves the
/// dashboard while it runs, and stops serving when it stops.
#[sqlx::test]
async fn a_worker_serves_the_dashboard_when_configured(pool: PgPool) {
    let media = tempdir("worker");
    let sim = common::start_sim(20, 60, 20).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(
        &sim.base_url(),
        &sim.dify_base_url("text"),
        &media,
        &format!("listen = \"127.0.0.1:{port}\""),
        &[],
    );
    let id = common::enqueue(&pool, TEXT_TO_IMAGE, json!({"n6_text": "a kite"})).await;
    let worker = common::start_worker(cfg, pool.clone());
    common::wait_all_final(&pool, Duration::from_secs(60)).await;
    let page = reqwest::get(format!("http://127.0.0.1:{port}/runs/{id}"))
        .await
        .expect("the worker serves the dashboard")
        .text()
        .await
        .unwrap();
    assert!(page.contains("succeeded"), "{page}");
    worker.stop().await;
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .is_err(),
        "no dashboard after the worker stopped"
    );
    sim.shutdown().await;
}

/// `wfq demo` piped (not a terminal) prints its runs and exits as it always
/// did: the dashboard is served only to someone at a terminal.
#[tokio::test]
async fn the_demo_piped_exits_without_serving_the_dashboard() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wfq"))
        .arg("demo")
        .current_dir(std::env::temp_dir())
        .env_remove("WFQ_CONFIG")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Read the same with SQL"), "{stdout}");
    assert!(!stdout.contains("Dashboard:"), "{stdout}");
}
