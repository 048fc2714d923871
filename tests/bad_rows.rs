//! Bad rows fail alone: a corpus of bad requests inserted with plain SQL.
//! The database refuses what can never run, naming the constraint; the
//! worker fails the rest with an error code and a message that names the
//! field, while good runs in the same batch succeed.

mod common;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;

/// Rows the database must refuse at INSERT, with the name that explains why.
const REFUSED: &[(&str, &str)] = &[
    (
        "INSERT INTO wfq.runs (workflow_id) VALUES ('')",
        "runs_workflow_id_not_empty",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id) VALUES ('   ')",
        "runs_workflow_id_not_empty",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id) VALUES (repeat('w', 201))",
        "runs_workflow_id_length",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id) VALUES (NULL)",
        "workflow_id",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('wf', '[1, 2]')",
        "runs_inputs_is_object",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('wf', '\"a string\"')",
        "runs_inputs_is_object",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('wf', 'null')",
        "runs_inputs_is_object",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('wf', '42')",
        "runs_inputs_is_object",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('wf', NULL)",
        "inputs",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('wf', '{not json')",
        "invalid input syntax for type json",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, priority) VALUES ('wf', 5000)",
        "runs_priority_range",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, priority) VALUES ('wf', -5000)",
        "runs_priority_range",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, idempotency_key) VALUES ('wf', '')",
        "runs_idempotency_key_length",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, idempotency_key) VALUES ('wf', repeat('k', 256))",
        "runs_idempotency_key_length",
    ),
    (
        "INSERT INTO wfq.runs (provider, workflow_id) VALUES ('', 'wf')",
        "runs_provider_not_empty",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, state) VALUES ('wf', 'done')",
        "runs_state_known",
    ),
    (
        "INSERT INTO wfq.runs (workflow_id, not_before) VALUES ('wf', 'next tuesday')",
        "invalid input syntax for type timestamp",
    ),
];

/// Rows the worker must fail: (inputs and columns as SQL, error_code, start of the message).
const FAILED: &[(&str, &str, &str, &str)] = &[
    (
        "'chenyu_eu'",
        "'wf_861ef31e94dcfb10e6e7'",
        "'{}'",
        "UNKNOWN_PROVIDER",
    ),
    (
        "'chenyu'",
        "'wf_no_such_workflow'",
        "'{}'",
        "UNKNOWN_WORKFLOW",
    ),
    (
        "'chenyu'",
        "'wf_861ef31e94dcfb10e6e7'",
        r#"'{"n6_txt": "typo"}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_861ef31e94dcfb10e6e7'",
        r#"'{"a": 1, "b": 2}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_861ef31e94dcfb10e6e7'",
        r#"'{"n3_seed": "42"}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_861ef31e94dcfb10e6e7'",
        r#"'{"n3_seed": 4.2}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_861ef31e94dcfb10e6e7'",
        r#"'{"n3_seed": true}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_861ef31e94dcfb10e6e7'",
        r#"'{"n6_text": 12}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_861ef31e94dcfb10e6e7'",
        r#"'{"n6_text": ["a"]}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_861ef31e94dcfb10e6e7'",
        r#"'{"n7_text": {"x": 1}}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_861ef31e94dcfb10e6e7'",
        "jsonb_build_object('n6_text', repeat('x', 300000))",
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_seedance_video_2f0c'",
        r#"'{"image": "https://x/y.png"}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_seedance_video_2f0c'",
        r#"'{"prompt": null}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_seedance_video_2f0c'",
        r#"'{"prompt": "p", "image": "/tmp/cat.png"}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_seedance_video_2f0c'",
        r#"'{"prompt": "p", "image": "asset://"}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_seedance_video_2f0c'",
        r#"'{"prompt": "p", "image": {"url": "https://x"}}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_seedance_video_2f0c'",
        r#"'{"prompt": "p", "guidance": "high"}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_seedance_video_2f0c'",
        r#"'{"prompt": "p", "watermark": "no"}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_seedance_video_2f0c'",
        r#"'{"prompt": "p", "duration": "5"}'"#,
        "INVALID_INPUT",
    ),
    (
        "'chenyu'",
        "'wf_always_fails_9d1a'",
        r#"'{"prompt": "p", "extra": 1}'"#,
        "INVALID_INPUT",
    ),
];

#[sqlx::test]
async fn a_corpus_of_bad_rows_fails_row_by_row_while_good_rows_succeed(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .connect_with(connect)
        .await
        .unwrap();
    for (sql, why) in REFUSED {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&pool)
            .await
            .expect_err(sql);
        assert!(
            err.to_string().contains(why),
            "{sql}: expected `{why}` in: {err}"
        );
    }
    sqlx::query("INSERT INTO wfq.runs (workflow_id, idempotency_key) VALUES ('wf_861ef31e94dcfb10e6e7', 'dup')")
        .execute(&pool)
        .await
        .unwrap();
    let dup = sqlx::query("INSERT INTO wfq.runs (workflow_id, idempotency_key) VALUES ('wf_861ef31e94dcfb10e6e7', 'dup')")
        .execute(&pool)
        .await
        .expect_err("a key twice");
    assert!(dup.to_string().contains("runs_idempotency_key_unique"));

    let sim = start_sim(0, 100, 50).await;
    let mut bad = Vec::new();
    for (provider, workflow, inputs, code) in FAILED {
        let id: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "INSERT INTO wfq.runs (provider, workflow_id, inputs) VALUES ({provider}, {workflow}, {inputs}) RETURNING id"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        bad.push((id, *code, *inputs));
    }
    // Three more that only the provider can refuse or that need consent.
    for (sql, code) in [
        (
            "INSERT INTO wfq.runs (workflow_id, inputs) VALUES ('wf_seedance_video_2f0c', '{\"prompt\": \"p\"}') RETURNING id",
            "EXTERNAL_COST_NOT_ACCEPTED",
        ),
        (
            "INSERT INTO wfq.runs (workflow_id, inputs, accept_external_cost_risk) VALUES ('wf_seedance_video_2f0c', '{\"prompt\": \"p\", \"image\": \"asset://other/x\"}', true) RETURNING id",
            "INVALID_WORKFLOW_INPUT",
        ),
        (
            "INSERT INTO wfq.runs (workflow_id, revision_id, inputs) VALUES ('wf_861ef31e94dcfb10e6e7', 'wfr_gone', '{}') RETURNING id",
            "REVISION_NOT_FOUND",
        ),
    ] {
        let id: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&pool)
            .await
            .unwrap();
        bad.push((id, code, sql));
    }
    let good: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO wfq.runs (workflow_id, inputs) SELECT 'wf_861ef31e94dcfb10e6e7', jsonb_build_object('n3_seed', g) \
         FROM generate_series(1, 10) g RETURNING id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();

    work_until_idle(&pool, config(&sim, "w1", "")).await;

    assert!(
        REFUSED.len() + 1 + bad.len() >= 30,
        "the corpus has at least 30 bad requests"
    );
    for (id, code, what) in &bad {
        let run = run(&pool, *id).await;
        assert_eq!(run.state, "failed", "{what}");
        assert_eq!(
            run.error_code.as_deref(),
            Some(*code),
            "{what}: {:?}",
            run.error_message
        );
        let message = run.error_message.unwrap_or_default();
        if *code == "INVALID_INPUT" {
            assert!(
                message.starts_with("inputs"),
                "the message names the field: {message}"
            );
        }
        assert!(!message.is_empty());
    }
    for id in good {
        assert_eq!(run(&pool, id).await.state, "succeeded");
    }
    // Only the good runs, the dup row and the two the provider had to see were sent.
    assert!(sim.ledger().len() <= 11);
    sim.shutdown().await;
}
