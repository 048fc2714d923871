//! What became of one submit, recorded by its token (`wfq.runs.submit_token`)
//! whoever holds the run: the accepted answer of a worker whose run was
//! taken over while its request was in flight (its liveness session was
//! cut), and a submit that was recorded as about to be sent but never was.
//! The statements on their own; `rescue.rs`, `shutdown.rs` and
//! `unsent_submits.rs` run them in worker processes.

mod common;

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use common::*;
use wfq::backoff::{PollPolicy, RetryPolicy};
use wfq::lifecycle::{self, RunProgress, RunState, Transition};
use wfq::providers::{Accepted, SubmitGuard, SubmitOutcome};
use wfq::store::{self, LateAnswer, UnsentSubmit};

const LEASE: Duration = Duration::from_secs(60);

/// A GPTBots run claimed by worker `a` and recorded as `submitting` by
/// submit `token`: its id and version.
async fn submitting(pool: &PgPool, token: Uuid) -> (i64, i64) {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO wfq.runs (provider, workflow_id, inputs, callback_url) \
         VALUES ('gptbots', 'news', '{}', 'https://hooks.example.com/wfq') RETURNING id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let claimed = claim(pool, id, "a").await;
    let begin = lifecycle::begin_submit(None, json!({"topic": "x"}), token);
    let version = store::apply_transition(pool, id, claimed, RunState::Queued, "a", LEASE, &begin)
        .await
        .unwrap()
        .expect("recorded");
    (id, version)
}

/// What a claim of run `id` by `worker` writes (a lease, a new version),
/// for this run only; the new version.
async fn claim(pool: &PgPool, id: i64, worker: &str) -> i64 {
    sqlx::query_scalar(
        "UPDATE wfq.runs SET lease_owner = $2, lease_expires_at = now() + interval '1 minute',          due_at = now() + interval '1 minute', version = version + 1 WHERE id = $1 RETURNING version",
    )
    .bind(id)
    .bind(worker)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Worker `b` takes the run over (a rescue: `a`'s lease was ended); its
/// version.
async fn taken_over(pool: &PgPool, id: i64) -> i64 {
    claim(pool, id, "b").await
}

/// What worker `a` writes when GPTBots accepts its submit.
fn accepted(run_id: &str) -> Transition {
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
        Utc::now(),
        0.5,
    )
}

async fn callback_state(pool: &PgPool, id: i64) -> Option<String> {
    sqlx::query_scalar("SELECT callback_state FROM wfq.runs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The sender's compare-and-set is refused (another worker took the run
/// over while the request was in flight); recorded by its token, the answer
/// is applied, and the worker that took the run over loses its own write.
#[sqlx::test]
async fn an_accepted_answer_is_recorded_while_the_run_waits_for_its_submit(pool: PgPool) {
    let token = Uuid::new_v4();
    let (id, version) = submitting(&pool, token).await;
    let theirs = taken_over(&pool, id).await;
    let t = accepted("wfr-1");
    let refused = store::apply_transition(&pool, id, version, RunState::Submitting, "a", LEASE, &t)
        .await
        .unwrap();
    assert_eq!(refused, None, "the version moved on");

    let late = store::record_late_acceptance(&pool, id, token, "a", LEASE, &t)
        .await
        .unwrap();
    let LateAnswer::Recorded {
        version: now,
        was,
        previous_owner,
    } = late
    else {
        panic!("{late:?}")
    };
    assert_eq!(
        (was.as_str(), previous_owner.as_deref()),
        ("submitting", Some("b"))
    );
    let row = run(&pool, id).await;
    assert_eq!(row.state, "running");
    assert_eq!(row.provider_run_id.as_deref(), Some("wfr-1"));
    assert!(row.submit_in_doubt_since.is_none());
    assert_eq!(row.lease_owner, None, "polled by whoever comes next");
    assert_eq!(row.attempts, 1);
    let version: i64 = sqlx::query_scalar("SELECT version FROM wfq.runs WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(version, now);
    // The worker that took the run over was settling the doubt: its write
    // (here, the failure it would record for GPTBots) is refused.
    let unknown = lifecycle::submit_outcome_unknown("lost", None);
    let stale = store::apply_transition(
        &pool,
        id,
        theirs,
        RunState::Submitting,
        "b",
        LEASE,
        &unknown,
    )
    .await
    .unwrap();
    assert_eq!(stale, None);
    let kinds = event_kinds(&pool, id).await;
    assert_eq!(
        kinds,
        ["submit_started", "late_answer_recorded", "submit_accepted"]
    );
}

/// The worker that took the run over gave up on it first
/// (`SUBMIT_OUTCOME_UNKNOWN`, money unsettled): the answer brings it back,
/// running, without the error, not finished, its completion callback of
/// the failure withdrawn (it is armed again when the run ends).
#[sqlx::test]
async fn a_run_given_up_on_follows_the_answer_that_arrives_late(pool: PgPool) {
    let token = Uuid::new_v4();
    let (id, _) = submitting(&pool, token).await;
    let theirs = taken_over(&pool, id).await;
    let unknown = lifecycle::submit_outcome_unknown("lost", None);
    store::apply_transition(
        &pool,
        id,
        theirs,
        RunState::Submitting,
        "b",
        LEASE,
        &unknown,
    )
    .await
    .unwrap()
    .expect("failed by b");
    assert_eq!(callback_state(&pool, id).await.as_deref(), Some("pending"));

    let t = accepted("wfr-2");
    let late = store::record_late_acceptance(&pool, id, token, "a", LEASE, &t)
        .await
        .unwrap();
    assert!(
        matches!(&late, LateAnswer::Recorded { was, previous_owner: None, .. } if was == "failed"),
        "{late:?}"
    );
    let row = run(&pool, id).await;
    assert_eq!(row.state, "running");
    assert_eq!(row.provider_run_id.as_deref(), Some("wfr-2"));
    assert_eq!((&row.error_code, &row.error_message), (&None, &None));
    assert!(
        row.finished_at.is_none() && row.settled_at.is_none(),
        "{row:?}"
    );
    assert_eq!(callback_state(&pool, id).await, None);
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM wfq.run_events WHERE run_id = $1 AND kind = 'late_answer_recorded'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(detail["previous_error"], json!("SUBMIT_OUTCOME_UNKNOWN"));
}

/// A run that moved past the submit is left as it is; the answer is kept
/// as an event: another submit was recorded since, the run names a
/// provider run already, or its money was settled by hand.
#[sqlx::test]
async fn an_answer_to_a_submit_the_run_moved_past_is_kept_as_an_event(pool: PgPool) {
    let t = accepted("wfr-3");

    // Another submit was recorded since (a chenyu repeat, a Dify resend).
    let token = Uuid::new_v4();
    let (id, _) = submitting(&pool, token).await;
    let theirs = taken_over(&pool, id).await;
    let again = lifecycle::begin_submit(None, json!({"topic": "x"}), Uuid::new_v4());
    store::apply_transition(&pool, id, theirs, RunState::Submitting, "b", LEASE, &again)
        .await
        .unwrap()
        .expect("b records its own submit");
    let late = store::record_late_acceptance(&pool, id, token, "a", LEASE, &t)
        .await
        .unwrap();
    assert_eq!(
        late,
        LateAnswer::Moved {
            state: Some("submitting".into()),
            provider_run_id: None
        }
    );
    let row = run(&pool, id).await;
    assert_eq!(
        (row.state.as_str(), row.lease_owner.as_deref()),
        ("submitting", Some("b"))
    );
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM wfq.run_events WHERE run_id = $1 AND kind = 'late_submit_answer'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(detail["provider_run_id"], json!("wfr-3"));
    assert_eq!(detail["answer"]["workflowRunId"], json!("wfr-3"));

    // The run names the provider's run already (found, or replayed).
    let token = Uuid::new_v4();
    let (id, version) = submitting(&pool, token).await;
    store::apply_transition(&pool, id, version, RunState::Submitting, "a", LEASE, &t)
        .await
        .unwrap()
        .expect("recorded");
    let late = store::record_late_acceptance(&pool, id, token, "a", LEASE, &t)
        .await
        .unwrap();
    assert_eq!(
        late,
        LateAnswer::Moved {
            state: Some("running".into()),
            provider_run_id: Some("wfr-3".into())
        }
    );

    // Given up on, and settled by hand: an operator's word stands.
    let token = Uuid::new_v4();
    let (id, _) = submitting(&pool, token).await;
    let theirs = taken_over(&pool, id).await;
    let unknown = lifecycle::submit_outcome_unknown("lost", None);
    store::apply_transition(
        &pool,
        id,
        theirs,
        RunState::Submitting,
        "b",
        LEASE,
        &unknown,
    )
    .await
    .unwrap()
    .expect("failed by b");
    sqlx::query("UPDATE wfq.runs SET settled_at = now() WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let late = store::record_late_acceptance(&pool, id, token, "a", LEASE, &t)
        .await
        .unwrap();
    assert!(
        matches!(&late, LateAnswer::Moved { state: Some(s), .. } if s == "failed"),
        "{late:?}"
    );

    // A run that is gone.
    let late = store::record_late_acceptance(&pool, 999_999, token, "a", LEASE, &t)
        .await
        .unwrap();
    assert_eq!(
        late,
        LateAnswer::Moved {
            state: None,
            provider_run_id: None
        }
    );
}

/// A submit recorded as about to be sent and never sent is withdrawn by
/// its token, whoever holds the run: back to `queued` (to pass the pauses
/// and money limits again), not in doubt, its attempt given back, due now
/// for any worker. Nothing happens for another submit. A resend never sent
/// stays in doubt (the first submit may have made a run).
#[sqlx::test]
async fn a_submit_never_sent_is_withdrawn_by_its_token(pool: PgPool) {
    let token = Uuid::new_v4();
    let (id, _) = submitting(&pool, token).await;
    assert_eq!(
        store::record_unsent_submit(&pool, id, Uuid::new_v4(), UnsentSubmit::First, "a", "test")
            .await
            .unwrap(),
        None,
        "another submit's token"
    );
    let taken = taken_over(&pool, id).await;
    let withdrawn = store::record_unsent_submit(
        &pool,
        id,
        token,
        UnsentSubmit::First,
        "a",
        "the worker began to stop",
    )
    .await
    .unwrap();
    assert_eq!(withdrawn, Some(taken + 1));
    let row = run(&pool, id).await;
    assert_eq!(row.state, "queued");
    assert!(row.submit_in_doubt_since.is_none(), "{row:?}");
    assert_eq!((row.attempts, row.lease_owner.as_deref()), (0, None));
    assert!(
        row.sent_inputs.is_some(),
        "sent as recorded, when it is sent"
    );
    let due: bool = sqlx::query_scalar("SELECT due_at <= now() FROM wfq.runs WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(due);
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM wfq.run_events WHERE run_id = $1 AND kind = 'submit_not_sent'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(detail, json!({"reason": "the worker began to stop"}));
    // Once only.
    assert_eq!(
        store::record_unsent_submit(&pool, id, token, UnsentSubmit::First, "a", "again")
            .await
            .unwrap(),
        None
    );

    // A run the worker that took it over gave up on (it could not know that
    // nothing was sent) stays failed, final states being final (a producer
    // may have acted on it): the event says a retry bills it once.
    let token = Uuid::new_v4();
    let (id, _) = submitting(&pool, token).await;
    taken_over(&pool, id).await;
    sqlx::query(
        "UPDATE wfq.runs SET state = 'failed', error_code = 'SUBMIT_OUTCOME_UNKNOWN', \
         error_message = 'lost', finished_at = now(), lease_owner = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    for _ in 0..2 {
        let changed =
            store::record_unsent_submit(&pool, id, token, UnsentSubmit::First, "a", "cut off")
                .await
                .unwrap();
        assert_eq!(changed, None, "a failed run is left failed");
    }
    let row = run(&pool, id).await;
    assert_eq!(row.state, "failed", "{row:?}");
    let details: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT detail FROM wfq.run_events WHERE run_id = $1 AND kind = 'submit_not_sent'",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        details,
        vec![json!({"reason": "cut off", "retry_bills_once": true})],
        "said once"
    );

    // A repeat of an earlier unclear submit (chenyu sends the same key
    // again, recorded as a plain submit) that was not sent stays in doubt:
    // the earlier one may be running and billed, so the run is neither
    // queued (where it could be canceled as if nothing ran) nor cleared.
    let token = Uuid::new_v4();
    let (id, version) = submitting(&pool, token).await;
    let repeat_token = Uuid::new_v4();
    let repeat = lifecycle::begin_submit(None, json!({}), repeat_token);
    store::apply_transition(
        &pool,
        id,
        version,
        RunState::Submitting,
        "a",
        LEASE,
        &repeat,
    )
    .await
    .unwrap()
    .expect("recorded");
    store::record_unsent_submit(
        &pool,
        id,
        repeat_token,
        UnsentSubmit::AfterEarlier { resubmitted: false },
        "a",
        "the worker began to stop",
    )
    .await
    .unwrap()
    .expect("withdrawn");
    let (state, in_doubt, resubmits): (String, bool, i32) = sqlx::query_as(
        "SELECT state, submit_in_doubt_since IS NOT NULL, resubmits FROM wfq.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), in_doubt, resubmits),
        ("submitting", true, 0)
    );

    // A resend that was never sent gives its resend back too.
    let token = Uuid::new_v4();
    let (id, version) = submitting(&pool, token).await;
    let resend = lifecycle::begin_resubmit(None, json!({}), Utc::now(), Uuid::new_v4());
    let second = store::apply_transition(
        &pool,
        id,
        version,
        RunState::Submitting,
        "a",
        LEASE,
        &resend,
    )
    .await
    .unwrap()
    .expect("recorded");
    assert!(second > version);
    let resend_token: Uuid = sqlx::query_scalar("SELECT submit_token FROM wfq.runs WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(Some(resend_token), resend.submit_token);
    store::record_unsent_submit(
        &pool,
        id,
        resend_token,
        UnsentSubmit::AfterEarlier { resubmitted: true },
        "a",
        "test",
    )
    .await
    .unwrap()
    .expect("withdrawn");
    let (attempts, resubmits, state, in_doubt): (i32, i32, String, bool) = sqlx::query_as(
        "SELECT attempts, resubmits, state, submit_in_doubt_since IS NOT NULL FROM wfq.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((attempts, resubmits), (1, 0));
    assert_eq!(state, "submitting");
    assert!(
        in_doubt,
        "the first submit may have made a run: looked for again"
    );
}
