//! What became of one submit, recorded by the worker that sent it (or
//! meant to) whoever holds the run by then: an accepted answer that arrives
//! after another worker took the run over, and a submit that was recorded
//! as about to be sent but never was.
//!
//! Both name the submit by its `submit_token` (stored by the write that
//! recorded `submitting`), not by the row's version: the version tells
//! whether the writer still holds the run, which is the wrong question
//! here. A run whose previous owner looked dead (its liveness session was
//! cut while the request was in flight) is taken over by a worker that
//! cannot know what that request did: it can only wait, look for the run
//! (Dify) or give up (`SUBMIT_OUTCOME_UNKNOWN`, GPTBots). The sender's
//! answer is the one fact that settles it, so it is applied as long as the
//! run still waits for exactly this submit's outcome: nothing names a
//! provider run yet, no other submit was recorded since (the token would
//! differ), and the money is not settled.

use std::time::Duration;

use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::lifecycle::{RunState, Transition};

/// What [`record_late_acceptance`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LateAnswer {
    /// The run was still waiting for this submit's outcome (in `submitting`,
    /// or failed `SUBMIT_OUTCOME_UNKNOWN` by the worker that took it over):
    /// the answer is recorded, with a `late_answer_recorded` event first.
    Recorded {
        /// The run's version after the answer (the writer holds the lease
        /// when the transition keeps it).
        version: i64,
        /// The run's state before (`submitting` or `failed`).
        was: String,
        /// Who held the run before.
        previous_owner: Option<String>,
    },
    /// The run moved past this submit (another submit was recorded, a run
    /// was found or adopted, the money was settled by hand, or the row is
    /// gone): nothing is changed but a `late_submit_answer` event with the
    /// provider's answer, the record of a run the provider may bill.
    Moved {
        /// The run's state now (`None`: no such run any more).
        state: Option<String>,
        /// The provider run the row names now.
        provider_run_id: Option<String>,
    },
}

/// Records `t`, the accepted answer to the submit named `submit_token`, on
/// run `id` after the compare-and-set on the run's version refused it
/// (another worker took the run over): in one transaction, the run is taken
/// back for `worker` if it still waits for this submit's outcome, and `t`
/// is applied to it as from `submitting`. Whoever held it meanwhile loses
/// its own compare-and-set and drops its step; a delivery of a completion
/// callback for the failure is dropped too (the run is not final any more).
/// Otherwise the answer is kept as an event, and nothing else changes.
#[tracing::instrument(name = "record_late_acceptance", skip(pool, t), err)]
pub async fn record_late_acceptance(
    pool: &PgPool,
    id: i64,
    submit_token: Uuid,
    worker: &str,
    lease: Duration,
    t: &Transition,
) -> Result<LateAnswer, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let taken: Option<(i64, String, Option<String>)> = sqlx::query_as(
        r#"
        WITH target AS (
            SELECT r.id, r.state, r.lease_owner, r.error_code
            FROM wfq.runs r
            WHERE r.id = $1 AND r.submit_token = $2
              AND r.provider_run_id IS NULL AND r.settled_at IS NULL
              AND (r.state = 'submitting'
                   OR (r.state = 'failed' AND r.error_code = 'SUBMIT_OUTCOME_UNKNOWN'))
            FOR NO KEY UPDATE
        ),
        taken AS (
            UPDATE wfq.runs r
            SET state = 'submitting', lease_owner = $3,
                lease_expires_at = now() + make_interval(secs => $4),
                due_at = now() + make_interval(secs => $4),
                version = r.version + 1, updated_at = now(), finished_at = NULL,
                error_code = NULL, error_message = NULL, error_detail = NULL,
                callback_state = NULL, callback_lease_owner = NULL,
                callback_lease_expires_at = NULL
            FROM target
            WHERE r.id = target.id
            RETURNING r.version, target.state AS was, target.lease_owner AS previous_owner,
                      target.error_code AS previous_error
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker, detail)
            SELECT $1, 'late_answer_recorded', was, 'submitting', $3,
                   jsonb_build_object('previous_owner', previous_owner,
                                      'previous_error', previous_error,
                                      'reason', 'the worker that sent the submit recorded its answer after another worker took the run over')
            FROM taken
        )
        SELECT version, was, previous_owner FROM taken
        "#,
    )
    .bind(id)
    .bind(submit_token)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((version, was, previous_owner)) = taken {
        // The row is locked and ours at `version`: this cannot be refused.
        let applied = super::apply_transition(
            &mut *tx,
            id,
            version,
            RunState::Submitting,
            worker,
            lease,
            t,
        )
        .await?;
        if let Some(version) = applied {
            tx.commit().await?;
            return Ok(LateAnswer::Recorded {
                version,
                was,
                previous_owner,
            });
        }
        tx.rollback().await?;
        tx = pool.begin().await?;
    }
    let now: Option<(String, Option<String>)> = sqlx::query_as(
        r#"
        WITH event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker, detail)
            SELECT r.id, 'late_submit_answer', r.state, r.state, $2,
                   jsonb_build_object('provider_run_id', $3::text, 'answer', $4::jsonb,
                                      'reason', 'the run had moved past this submit when its answer was recorded')
            FROM wfq.runs r WHERE r.id = $1
        )
        SELECT state, provider_run_id FROM wfq.runs WHERE id = $1
        "#,
    )
    .bind(id)
    .bind(worker)
    .bind(t.facts.provider_run_id.as_deref())
    .bind(&t.event.detail)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let (state, provider_run_id) = match now {
        Some((state, provider_run_id)) => (Some(state), provider_run_id),
        None => (None, None),
    };
    Ok(LateAnswer::Moved {
        state,
        provider_run_id,
    })
}

/// What a submit that was recorded but not sent came after, which decides
/// where its run goes back to (see [`record_unsent_submit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsentSubmit {
    /// The run's first submit, from a `queued` run not in doubt: nothing
    /// of it can exist at the provider.
    First,
    /// A submit after an earlier one whose outcome is unclear: chenyu's
    /// repeat of the same key, or a Dify resend (`resubmitted`, which
    /// gives its resend back). The earlier submit may have made a run.
    AfterEarlier {
        /// A Dify resend, counted in `resubmits`.
        resubmitted: bool,
    },
}

/// The submit named `submit_token` was recorded on run `id` but never sent
/// (the worker began to stop, lost its lease or its database session right
/// after the write, or could not tell whether the write landed): if the
/// run is still in `submitting` for exactly this submit, the attempt is
/// given back and the run is due now for any worker, with a
/// `submit_not_sent` event. A first submit goes back to `queued` (its
/// recorded inputs and quote kept), so that it passes the pauses, the
/// spend guard and the balance check again like any queued run, and can
/// be canceled. A submit after an earlier unclear one stays `submitting`
/// in doubt (a resend given back): the earlier submit may have made a run
/// the provider bills, so the next worker looks for it, or repeats its
/// key, before anything is sent, and it cannot be canceled as if nothing
/// ran. A worker that took the run over meanwhile loses its
/// compare-and-set. A run that worker already failed
/// `SUBMIT_OUTCOME_UNKNOWN` stays failed (a final state may have been
/// acted on): it gets the event, which tells that `wfq retry` bills it
/// once. The new version, or `None` when nothing changed.
#[tracing::instrument(name = "record_unsent_submit", skip(db), err)]
pub async fn record_unsent_submit<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    submit_token: Uuid,
    unsent: UnsentSubmit,
    worker: &str,
    reason: &str,
) -> Result<Option<i64>, sqlx::Error> {
    let (after_earlier, resubmitted) = match unsent {
        UnsentSubmit::First => (false, false),
        UnsentSubmit::AfterEarlier { resubmitted } => (true, resubmitted),
    };
    sqlx::query_scalar(
        r#"
        WITH unsent AS (
            UPDATE wfq.runs r
            SET state = CASE WHEN $3 THEN 'submitting' ELSE 'queued' END,
                submit_in_doubt_since = CASE WHEN $3 THEN r.submit_in_doubt_since END,
                attempts = GREATEST(r.attempts - 1, 0),
                resubmits = GREATEST(r.resubmits - CASE WHEN $6 THEN 1 ELSE 0 END, 0),
                lease_owner = NULL, lease_expires_at = NULL, due_at = now(),
                version = r.version + 1, updated_at = now()
            WHERE r.id = $1 AND r.submit_token = $2
              AND r.provider_run_id IS NULL AND r.settled_at IS NULL
              AND r.state = 'submitting' AND r.submit_in_doubt_since IS NOT NULL
            RETURNING r.id, r.version, r.state
        ),
        -- Given up on by the worker that took it over, which could not
        -- know that nothing was sent: said once, the run left final.
        given_up AS (
            SELECT r.id FROM wfq.runs r
            WHERE r.id = $1 AND r.submit_token = $2 AND NOT $3
              AND r.state = 'failed' AND r.error_code = 'SUBMIT_OUTCOME_UNKNOWN'
              AND r.provider_run_id IS NULL
              AND NOT EXISTS (SELECT 1 FROM wfq.run_events e
                              WHERE e.run_id = r.id AND e.kind = 'submit_not_sent')
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, worker, detail)
            SELECT id, 'submit_not_sent', 'submitting', state, $4,
                   jsonb_build_object('reason', $5::text)
            FROM unsent
            UNION ALL
            SELECT id, 'submit_not_sent', 'failed', 'failed', $4,
                   jsonb_build_object('reason', $5::text, 'retry_bills_once', true)
            FROM given_up
        ),
        notified AS (
            SELECT pg_notify('wfq_runs_due', '') FROM unsent
        )
        SELECT version FROM unsent, (SELECT count(*) FROM notified) n
        "#,
    )
    .bind(id)
    .bind(submit_token)
    .bind(after_earlier)
    .bind(worker)
    .bind(reason)
    .bind(resubmitted)
    .fetch_optional(db)
    .await
}
