//! The same lifecycle tests for every provider kind (chenyu, Dify, GPTBots),
//! against the simulator's three APIs: one test body, run once per kind.
//!
//! Where the kinds must differ, they differ by the strongest guarantee each
//! API allows: chenyu replays an idempotency key; Dify has no keys but its
//! runs can be found by the end user wfq sends; GPTBots can do neither, so a
//! submit whose answer is lost fails `SUBMIT_OUTCOME_UNKNOWN` instead of
//! being sent twice.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use wfq::config::Config;
use wfq::sim::{Faults, SimServer};
use wfq::store::{self, RunRow};

const LIMIT: Duration = Duration::from_secs(60);

async fn pool(connect: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(24)
        .connect_with(connect)
        .await
        .expect("test database")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chenyu,
    Dify,
    Gptbots,
}

/// A run request: profile, workflow, inputs.
struct Request {
    profile: &'static str,
    workflow: &'static str,
    inputs: Value,
}

/// What the provider's ledger says about one run it created.
#[derive(Debug)]
struct ProviderRun {
    run_id: String,
    /// What was charged once the run ended (chenyu `final_amount`, Dify
    /// `total_price`, GPTBots `totalCost`).
    charged: Option<Decimal>,
    tokens: Option<i64>,
}

impl Kind {
    fn good(self, n: u32) -> Request {
        match self {
            Kind::Chenyu => Request {
                profile: "chenyu",
                workflow: TEXT_TO_IMAGE,
                inputs: json!({"n6_text": format!("bottle {n}")}),
            },
            Kind::Dify => Request {
                profile: "dify",
                workflow: "text",
                inputs: json!({"query": format!("summarise {n}"), "tone": "casual"}),
            },
            Kind::Gptbots => Request {
                profile: "gptbots",
                workflow: "news",
                inputs: json!({"topic": format!("news {n}")}),
            },
        }
    }

    fn failing(self) -> Request {
        match self {
            Kind::Chenyu => Request {
                profile: "chenyu",
                workflow: ALWAYS_FAILS,
                inputs: json!({}),
            },
            Kind::Dify => Request {
                profile: "dify_fails",
                workflow: "fails",
                inputs: json!({"query": "x"}),
            },
            Kind::Gptbots => Request {
                profile: "gptbots_fails",
                workflow: "fails",
                inputs: json!({"topic": "x"}),
            },
        }
    }

    /// Inputs with a mistake, the error code it must fail with, and a
    /// fragment of the message (which names the field).
    fn bad(self) -> (Request, &'static str, &'static str) {
        match self {
            Kind::Chenyu => (
                Request {
                    inputs: json!({"n6_txt": "typo"}),
                    ..self.good(0)
                },
                "INVALID_INPUT",
                "inputs.n6_txt: unknown key",
            ),
            Kind::Dify => (
                Request {
                    inputs: json!({"query": "q", "tone": "rude"}),
                    ..self.good(0)
                },
                "INVALID_INPUT",
                "inputs.tone: expected one of formal, casual",
            ),
            // No manifest to check against: the provider refuses it.
            Kind::Gptbots => (
                Request {
                    inputs: json!({"topic": 5}),
                    ..self.good(0)
                },
                "400001",
                "topic",
            ),
        }
    }

    /// The runs the provider created, by wfq idempotency key.
    fn provider_runs(self, sim: &SimServer) -> HashMap<String, Vec<ProviderRun>> {
        let mut by_key: HashMap<String, Vec<ProviderRun>> = HashMap::new();
        let key_of = |user: &str| user.strip_prefix("wfq-").unwrap_or(user).to_owned();
        match self {
            Kind::Chenyu => {
                for e in sim.ledger() {
                    // One entry per key; `charges` counts what was frozen.
                    for _ in 0..e.charges {
                        by_key
                            .entry(e.idempotency_key.clone())
                            .or_default()
                            .push(ProviderRun {
                                run_id: e.run_order_id.clone(),
                                charged: e.final_amount,
                                tokens: None,
                            });
                    }
                }
            }
            Kind::Dify => {
                for e in sim.dify_ledger() {
                    by_key
                        .entry(key_of(&e.user))
                        .or_default()
                        .push(ProviderRun {
                            run_id: e.workflow_run_id,
                            charged: Some(e.total_price),
                            tokens: Some(e.total_tokens),
                        });
                }
            }
            Kind::Gptbots => {
                for e in sim.gptbots_ledger() {
                    let user = e.user_id.unwrap_or_default();
                    by_key.entry(key_of(&user)).or_default().push(ProviderRun {
                        run_id: e.workflow_run_id,
                        charged: Some(e.total_cost),
                        tokens: Some(e.total_tokens),
                    });
                }
            }
        }
        by_key
    }

    fn currency(self) -> &'static str {
        match self {
            Kind::Chenyu => "CNY",
            Kind::Dify => "USD",
            Kind::Gptbots => "credits",
        }
    }
}

fn test_config(sim: &SimServer, worker: &str) -> Config {
    config(sim, worker, &other_providers(sim))
}

/// The test configuration with a Dify `find_window` (and `http.timeout`)
/// of 2 s, for Dify tests whose submit is never found: the window must run
/// out.
fn short_window_config(sim: &SimServer, worker: &str) -> Config {
    config(sim, worker, &short_find_window(&other_providers(sim)))
}

async fn enqueue_request(pool: &PgPool, r: &Request) -> i64 {
    enqueue_on(pool, r.profile, r.workflow, r.inputs.clone()).await
}

/// The run's money and identity match exactly one run at the provider.
fn assert_matches_provider(kind: Kind, row: &RunRow, runs: &HashMap<String, Vec<ProviderRun>>) {
    let at_provider = runs
        .get(&row.idempotency_key)
        .unwrap_or_else(|| panic!("{kind:?}: run {} is not at the provider", row.id));
    assert_eq!(
        at_provider.len(),
        1,
        "{kind:?}: run {} billed twice",
        row.id
    );
    let p = &at_provider[0];
    assert_eq!(row.provider_run_id.as_deref(), Some(p.run_id.as_str()));
    assert_eq!(row.final_amount, p.charged, "{kind:?}: run {}", row.id);
    assert_eq!(row.total_tokens, p.tokens, "{kind:?}: run {}", row.id);
    assert_eq!(row.currency.as_deref(), Some(kind.currency()));
    assert!(row.submit_in_doubt_since.is_none(), "{row:?}");
}

macro_rules! for_each_provider {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            use super::*;

            #[sqlx::test]
            async fn chenyu(_: PgPoolOptions, connect: PgConnectOptions) {
                super::$body(Kind::Chenyu, pool(connect).await).await
            }

            #[sqlx::test]
            async fn dify(_: PgPoolOptions, connect: PgConnectOptions) {
                super::$body(Kind::Dify, pool(connect).await).await
            }

            #[sqlx::test]
            async fn gptbots(_: PgPoolOptions, connect: PgConnectOptions) {
                super::$body(Kind::Gptbots, pool(connect).await).await
            }
        }
    )*};
}

for_each_provider!(
    happy_path_records_outputs_tokens_and_exact_money,
    a_lost_submit_answer_never_bills_twice,
    a_submit_refused_before_any_work_is_safe_to_repeat,
    a_server_error_on_submit_is_resolved_by_what_the_api_allows,
    a_worker_that_died_between_recording_and_sending_leaves_no_second_run,
    bad_inputs_fail_alone_with_the_field_named,
    a_run_that_fails_at_the_provider_is_recorded_with_its_money,
    a_killed_workers_run_is_finished_by_another,
    two_workers_share_runs_and_the_money_adds_up,
);

async fn happy_path_records_outputs_tokens_and_exact_money(kind: Kind, pool: PgPool) {
    let sim = start_sim(50, 200, 50).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(enqueue_request(&pool, &kind.good(n)).await);
    }
    work_until_idle(&pool, test_config(&sim, "w1")).await;
    let runs = kind.provider_runs(&sim);
    assert_eq!(runs.len(), 3);
    for id in ids {
        let row = run(&pool, id).await;
        assert_eq!(row.state, "succeeded", "{row:?}");
        assert!(
            row.outputs.as_ref().is_some_and(|o| o.is_object()),
            "{row:?}"
        );
        assert!(row.settled_at.is_some());
        assert_matches_provider(kind, &row, &runs);
        assert_eq!(row.total_cost, row.final_amount);
        let kinds = event_kinds(&pool, id).await;
        assert_eq!(&kinds[..2], ["submit_started", "submit_accepted"]);
        assert_eq!(kinds.last().map(String::as_str), Some("run_finished"));
    }
    sim.shutdown().await;
}

async fn a_lost_submit_answer_never_bills_twice(kind: Kind, pool: PgPool) {
    let sim = start_sim(50, 200, 50).await;
    sim.set_faults(Faults {
        drop_next_submit_answers: 1,
        ..Default::default()
    });
    let id = enqueue_request(&pool, &kind.good(1)).await;
    work_until_idle(&pool, test_config(&sim, "w1")).await;
    let row = run(&pool, id).await;
    let runs = kind.provider_runs(&sim);
    assert_eq!(
        runs.get(&row.idempotency_key).map(Vec::len),
        Some(1),
        "{kind:?}: exactly one run at the provider"
    );
    let kinds = event_kinds(&pool, id).await;
    match kind {
        Kind::Chenyu => {
            assert_eq!(row.state, "succeeded");
            assert_matches_provider(kind, &row, &runs);
            assert_eq!(sim.stats().replays, 1, "the second submit was a replay");
        }
        Kind::Dify => {
            assert_eq!(row.state, "succeeded", "{row:?}");
            assert_matches_provider(kind, &row, &runs);
            assert!(kinds.contains(&"submit_adopted".to_owned()), "{kinds:?}");
            assert_eq!(row.attempts, 1, "found again, never sent again");
        }
        Kind::Gptbots => {
            assert_eq!(row.state, "failed");
            assert_eq!(row.error_code.as_deref(), Some("SUBMIT_OUTCOME_UNKNOWN"));
            assert!(row.settled_at.is_none(), "the money is not known");
            assert!(row.provider_run_id.is_none());
            assert!(
                row.error_message
                    .as_deref()
                    .is_some_and(|m| m.contains("wfq retry")),
                "{row:?}"
            );
        }
    }
    sim.shutdown().await;
}

async fn a_submit_refused_before_any_work_is_safe_to_repeat(kind: Kind, pool: PgPool) {
    let sim = start_sim(50, 200, 50).await;
    // 429s say nothing was created, and status checks that fail are retried.
    sim.set_faults(Faults {
        rate_limit_next_submits: 2,
        retry_after_secs: Some(0),
        fail_next_polls: 2,
        ..Default::default()
    });
    let id = enqueue_request(&pool, &kind.good(1)).await;
    work_until_idle(&pool, test_config(&sim, "w1")).await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{row:?}");
    assert_eq!(
        row.attempts, 1,
        "the two 429s do not count against the run: a busy provider never fails runs"
    );
    let kinds = event_kinds(&pool, id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "submit_rate_limited").count(),
        2,
        "{kinds:?}"
    );
    assert_matches_provider(kind, &row, &kind.provider_runs(&sim));
    sim.shutdown().await;
}

async fn a_server_error_on_submit_is_resolved_by_what_the_api_allows(kind: Kind, pool: PgPool) {
    let sim = start_sim(50, 200, 50).await;
    // A 503 before anything was created; the client cannot know that.
    sim.set_faults(Faults {
        fail_next_submits: 1,
        ..Default::default()
    });
    let id = enqueue_request(&pool, &kind.good(1)).await;
    let cfg = match kind {
        Kind::Dify => short_window_config(&sim, "w1"),
        Kind::Chenyu | Kind::Gptbots => test_config(&sim, "w1"),
    };
    work_until_idle(&pool, cfg).await;
    let row = run(&pool, id).await;
    let runs = kind.provider_runs(&sim);
    let kinds = event_kinds(&pool, id).await;
    match kind {
        Kind::Chenyu => {
            assert_eq!(row.state, "succeeded");
            assert_matches_provider(kind, &row, &runs);
        }
        // Looked for until the find window passed, then sent again. (Only
        // a lookup that finds nothing decides a resend; whether another one
        // came before the window ended depends on the machine's speed.)
        Kind::Dify => {
            assert_eq!(row.state, "succeeded", "{row:?}");
            assert_matches_provider(kind, &row, &runs);
            assert!(kinds.contains(&"resubmit_started".to_owned()), "{kinds:?}");
            assert!(sim.stats().dify_log_requests >= 1, "{:?}", sim.stats());
            let waited: f64 = sqlx::query_scalar(
                "SELECT extract(epoch FROM at - (detail->>'in_doubt_since')::timestamptz)::float8 \
                 FROM wfq.run_events WHERE run_id = $1 AND kind = 'resubmit_started'",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert!(waited >= 2.0, "sent again {waited} s after the submit");
        }
        Kind::Gptbots => {
            assert_eq!(row.state, "failed");
            assert_eq!(row.error_code.as_deref(), Some("SUBMIT_OUTCOME_UNKNOWN"));
            assert!(runs.is_empty(), "nothing was sent twice");
        }
    }
    sim.shutdown().await;
}

async fn a_worker_that_died_between_recording_and_sending_leaves_no_second_run(
    kind: Kind,
    pool: PgPool,
) {
    let sim = start_sim(50, 200, 50).await;
    let request = kind.good(1);
    // What a worker leaves behind when it dies right after recording
    // `submitting`: the inputs, one attempt, a submit in doubt, no lease.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO wfq.runs (provider, workflow_id, inputs, sent_inputs, state, attempts, submit_in_doubt_since) \
         VALUES ($1, $2, $3, $3, 'submitting', 1, now()) RETURNING id",
    )
    .bind(request.profile)
    .bind(request.workflow)
    .bind(&request.inputs)
    .fetch_one(&pool)
    .await
    .unwrap();
    // Dify finds no run of this key: sent again once the window is over.
    let cfg = match kind {
        Kind::Dify => short_window_config(&sim, "w1"),
        Kind::Chenyu | Kind::Gptbots => test_config(&sim, "w1"),
    };
    work_until_idle(&pool, cfg).await;
    let row = run(&pool, id).await;
    let runs = kind.provider_runs(&sim);
    match kind {
        Kind::Chenyu | Kind::Dify => {
            assert_eq!(row.state, "succeeded", "{row:?}");
            assert_matches_provider(kind, &row, &runs);
        }
        Kind::Gptbots => {
            assert_eq!(row.error_code.as_deref(), Some("SUBMIT_OUTCOME_UNKNOWN"));
            assert!(runs.is_empty());
            // The operator checked the provider and asks for it to be sent.
            let outcome = store::retry_run(&pool, id, &["gptbots".to_owned()])
                .await
                .unwrap();
            assert_eq!(outcome, store::RetryOutcome::Resumed(id));
            work_until_idle(&pool, test_config(&sim, "w2")).await;
            let row = run(&pool, id).await;
            assert_eq!(row.state, "succeeded", "{row:?}");
            assert_matches_provider(kind, &row, &kind.provider_runs(&sim));
        }
    }
    sim.shutdown().await;
}

async fn bad_inputs_fail_alone_with_the_field_named(kind: Kind, pool: PgPool) {
    let sim = start_sim(50, 200, 50).await;
    let (bad, code, message) = kind.bad();
    let bad_id = enqueue_request(&pool, &bad).await;
    let good_id = enqueue_request(&pool, &kind.good(2)).await;
    work_until_idle(&pool, test_config(&sim, "w1")).await;
    let bad_row = run(&pool, bad_id).await;
    assert_eq!(bad_row.state, "failed");
    assert_eq!(bad_row.error_code.as_deref(), Some(code), "{bad_row:?}");
    assert!(
        bad_row
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains(message)),
        "{bad_row:?}"
    );
    assert!(bad_row.settled_at.is_some(), "nothing was charged");
    let runs = kind.provider_runs(&sim);
    assert!(!runs.contains_key(&bad_row.idempotency_key));
    let good = run(&pool, good_id).await;
    assert_eq!(good.state, "succeeded");
    assert_matches_provider(kind, &good, &runs);
    sim.shutdown().await;
}

async fn a_run_that_fails_at_the_provider_is_recorded_with_its_money(kind: Kind, pool: PgPool) {
    let sim = start_sim(50, 200, 50).await;
    let id = enqueue_request(&pool, &kind.failing()).await;
    work_until_idle(&pool, test_config(&sim, "w1")).await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "failed", "{row:?}");
    assert!(row.error_code.is_some() && row.error_message.is_some());
    assert!(row.settled_at.is_some(), "{row:?}");
    assert_matches_provider(kind, &row, &kind.provider_runs(&sim));
    sim.shutdown().await;
}

/// A worker killed while it holds a run (mid-poll, or reading a Dify run's
/// stream), with no liveness session the others could see end
/// (`session_liveness = false`): the run is finished by another worker once
/// the lease has run out, billed once. The hold gates make the kill land at
/// that point every time. (A crash seen through the session: `rescue.rs`.)
async fn a_killed_workers_run_is_finished_by_another(kind: Kind, pool: PgPool) {
    let sim = start_sim(100, 1500, 100).await;
    sim.set_faults(match kind {
        Kind::Dify => Faults {
            hold_streams: true,
            ..Default::default()
        },
        Kind::Chenyu | Kind::Gptbots => Faults {
            hold_status_checks: true,
            ..Default::default()
        },
    });
    let id = enqueue_request(&pool, &kind.good(1)).await;
    let mut doomed = test_config(&sim, "doomed");
    doomed.worker.session_liveness = false;
    // A short lease: only its expiry lets the rescuer take the run.
    doomed.worker.lease = Duration::from_secs(3);
    doomed.http.timeout = Duration::from_secs(30);
    let first = start_worker(doomed, pool.clone());
    sim.wait_until_held(1).await;
    first.kill().await;
    assert_eq!(run(&pool, id).await.lease_owner.as_deref(), Some("doomed"));
    sim.set_faults(Faults::default());
    work_until_idle(&pool, test_config(&sim, "rescuer")).await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "succeeded", "{row:?}");
    assert_matches_provider(kind, &row, &kind.provider_runs(&sim));
    let rescue: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT detail->>'previous_owner', detail->>'cause' FROM wfq.run_events \
         WHERE run_id = $1 AND kind = 'lease_rescued' AND worker = 'rescuer'",
    )
    .bind(id)
    .fetch_optional(&pool)
    .await
    .unwrap();
    assert_eq!(
        rescue,
        Some((Some("doomed".to_owned()), Some("lease_expiry".to_owned()))),
        "{kind:?}"
    );
    sim.shutdown().await;
}

async fn two_workers_share_runs_and_the_money_adds_up(kind: Kind, pool: PgPool) {
    let sim = start_sim(0, 50, 20).await;
    let request = kind.good(0);
    let mut ids = Vec::new();
    for n in 0..60 {
        ids.push(enqueue_request(&pool, &kind.good(n)).await);
    }
    let a = start_worker(test_config(&sim, "a"), pool.clone());
    let b = start_worker(test_config(&sim, "b"), pool.clone());
    wait_all_final(&pool, Duration::from_secs(90)).await;
    a.stop().await;
    b.stop().await;
    let runs = kind.provider_runs(&sim);
    assert_eq!(runs.len(), 60);
    for id in &ids {
        let row = run(&pool, *id).await;
        assert_eq!(row.state, "succeeded");
        assert_matches_provider(kind, &row, &runs);
    }
    let db_total: Decimal =
        sqlx::query_scalar("SELECT sum(final_amount) FROM wfq.runs WHERE provider = $1")
            .bind(request.profile)
            .fetch_one(&pool)
            .await
            .unwrap();
    let provider_total: Decimal = runs.values().flatten().filter_map(|r| r.charged).sum();
    assert_eq!(db_total, provider_total, "{kind:?}: to the last decimal");
    sim.shutdown().await;
}

/// Dify only: `wfq cancel` on a running run stops it at the provider and
/// records `canceled` with what the run cost until then.
#[sqlx::test]
async fn cancel_stops_a_running_dify_run(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(connect).await;
    // The run goes on for the whole test unless it is stopped.
    let sim = start_sim(50, 600_000, 50).await;
    let id = enqueue_request(&pool, &Kind::Dify.good(1)).await;
    let worker = start_worker(test_config(&sim, "w1"), pool.clone());
    wait_for(
        &pool,
        &format!("(SELECT state = 'running' FROM wfq.runs WHERE id = {id})"),
        LIMIT,
    )
    .await;
    let outcome = store::cancel_run(&pool, id, Some("not needed"), &["dify".to_owned()])
        .await
        .unwrap();
    assert_eq!(outcome, store::CancelOutcome::StopRequested);
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    let row = run(&pool, id).await;
    assert_eq!(row.state, "canceled", "{row:?}");
    assert_eq!(row.error_code.as_deref(), Some("CANCELED"));
    assert_eq!(row.run_status.as_deref(), Some("stopped"));
    assert!(row.cancel_requested_at.is_some());
    let runs = Kind::Dify.provider_runs(&sim);
    assert_matches_provider(Kind::Dify, &row, &runs);
    assert_eq!(sim.dify_ledger()[0].status, "stopped");

    // chenyu and GPTBots runs cannot be stopped: the request is refused.
    let other = enqueue_request(&pool, &Kind::Gptbots.good(2)).await;
    sqlx::query(
        "UPDATE wfq.runs SET state = 'running', provider_run_id = 'x', task_id = 't' WHERE id = $1",
    )
    .bind(other)
    .execute(&pool)
    .await
    .unwrap();
    let refused = store::cancel_run(&pool, other, None, &["dify".to_owned()]).await;
    assert!(
        matches!(refused, Err(store::RequestError::WrongState { .. })),
        "{refused:?}"
    );
    sim.shutdown().await;
}

/// Dify only: on Dify versions where a run stops making progress once its
/// client leaves the stream, runs still finish, because the worker reads
/// each run's stream to `workflow_finished` (renewing its lease meanwhile);
/// a run whose stream is cut is followed by status checks.
#[sqlx::test]
async fn dify_runs_that_die_with_their_stream_finish_because_the_stream_is_held(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(connect).await;
    // Runs longer than the lease (10 s): the stream outlives it.
    let sim = start_sim(50, 12_000, 50).await;
    sim.set_faults(Faults {
        dify_runs_die_with_their_stream: true,
        dify_ping_interval_ms: Some(200),
        ..Default::default()
    });
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(enqueue_request(&pool, &Kind::Dify.good(n)).await);
    }
    let mut cfg = test_config(&sim, "w1");
    cfg.worker.lease = Duration::from_secs(10);
    let worker = start_worker(cfg, pool.clone());
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    let runs = Kind::Dify.provider_runs(&sim);
    for id in ids {
        let row = run(&pool, id).await;
        assert_eq!(row.state, "succeeded", "{row:?}");
        assert_matches_provider(Kind::Dify, &row, &runs);
        assert_eq!(
            row.polls, 1,
            "the result came from the stream, not from polling"
        );
        let kinds = event_kinds(&pool, id).await;
        assert!(!kinds.contains(&"lease_rescued".to_owned()), "{kinds:?}");
    }
    assert!(sim.dify_ledger().iter().all(|e| e.status == "succeeded"));
    sim.shutdown().await;
}

/// Dify only: a quota refusal (`429 rate_limit_error`) pauses the profile
/// instead of failing runs; the runs go on once the quota is back.
#[sqlx::test]
async fn an_exhausted_dify_quota_pauses_the_profile(_: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(connect).await;
    let sim = start_sim(0, 100, 20).await;
    sim.set_faults(Faults {
        dify_quota_exceeded: true,
        ..Default::default()
    });
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(enqueue_request(&pool, &Kind::Dify.good(n)).await);
    }
    let mut cfg = test_config(&sim, "w1");
    cfg.worker.auth_probe = Duration::from_millis(300);
    let worker = start_worker(cfg, pool.clone());
    wait_for(
        &pool,
        "EXISTS (SELECT 1 FROM wfq.provider_pauses WHERE profile = 'dify')",
        LIMIT,
    )
    .await;
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM wfq.runs WHERE state = 'failed'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failed, 0, "an exhausted quota fails no run");
    sim.set_faults(Faults::default());
    wait_all_final(&pool, LIMIT).await;
    worker.stop().await;
    let runs = Kind::Dify.provider_runs(&sim);
    for id in ids {
        let row = run(&pool, id).await;
        assert_eq!(row.state, "succeeded", "{row:?}");
        assert_matches_provider(Kind::Dify, &row, &runs);
    }
    sim.shutdown().await;
}
