//! What producers and operators ask for: enqueue, cancel, retry.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

/// A run request, as `wfq enqueue` sends it. `INSERT INTO wfq.runs` from any
/// language does the same.
#[derive(Debug, Clone, Default)]
pub struct NewRun {
    /// Provider profile name (`chenyu` when `None`).
    pub provider: Option<String>,
    /// Workflow to run.
    pub workflow_id: String,
    /// Revision to pin; `None` pins the published one at submit.
    pub revision_id: Option<String>,
    /// The inputs (an object).
    pub inputs: Value,
    /// A caller-chosen key (a fresh UUID when `None`).
    pub idempotency_key: Option<String>,
    /// Consent to external-model costs.
    pub accept_external_cost_risk: bool,
    /// Higher runs first.
    pub priority: i32,
    /// Not before this time.
    pub not_before: Option<DateTime<Utc>>,
    /// The producer's own data, never sent.
    pub metadata: Option<Value>,
    /// POSTed the run as signed JSON once it is final (`[callbacks]`).
    pub callback_url: Option<String>,
    /// Runs that must succeed first (`wfq enqueue --after`); the runs its
    /// `{"$output": ...}` inputs name are added by the database.
    pub depends_on: Vec<i64>,
    /// `fail` (the default) or `cancel`: what a failed dependency does to it.
    pub on_dependency_failure: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No run has this id.
    #[error("run {0} does not exist")]
    NotFound(i64),
    /// The run is in a state that does not allow the operation.
    #[error("run {id} is {state}: {why}")]
    WrongState {
        /// The run.
        id: i64,
        /// Its state.
        state: String,
        /// What would be needed.
        why: &'static str,
    },
    /// The run failed because a run it depends on failed: retrying it alone
    /// would fail the same way.
    #[error(
        "run {id} failed DEPENDENCY_FAILED because run {root} failed; retry run {root}, and the chain below it (this run too) runs again"
    )]
    RetryTheRoot {
        /// The run asked for.
        id: i64,
        /// The run whose failure came first.
        root: i64,
    },
    /// The database refused the row (a CHECK constraint names the column).
    #[error("{0}")]
    Database(#[from] sqlx::Error),
}

/// Inserts a run and returns its id.
#[tracing::instrument(name = "enqueue_run", skip(pool, run), fields(workflow_id = %run.workflow_id), err)]
pub async fn enqueue_run(pool: &PgPool, run: &NewRun) -> Result<i64, RequestError> {
    let id = sqlx::query_scalar(
        r#"
        INSERT INTO wfq.runs (provider, workflow_id, revision_id, inputs, idempotency_key,
                              accept_external_cost_risk, priority, not_before, metadata,
                              callback_url, depends_on, on_dependency_failure)
        VALUES (COALESCE($1, 'chenyu'), $2, $3, $4, COALESCE($5, gen_random_uuid()::text),
                $6, $7, $8, $9, $10, NULLIF($11::bigint[], '{}'), COALESCE($12, 'fail'))
        RETURNING id
        "#,
    )
    .bind(&run.provider)
    .bind(&run.workflow_id)
    .bind(&run.revision_id)
    .bind(&run.inputs)
    .bind(&run.idempotency_key)
    .bind(run.accept_external_cost_risk)
    .bind(run.priority)
    .bind(run.not_before)
    .bind(&run.metadata)
    .bind(&run.callback_url)
    .bind(&run.depends_on)
    .bind(&run.on_dependency_failure)
    .fetch_one(pool)
    .await?;
    Ok(id)
}

async fn state_of(pool: &PgPool, id: i64) -> Result<String, RequestError> {
    sqlx::query_scalar("SELECT state FROM wfq.runs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or(RequestError::NotFound(id))
}

/// What `cancel_run` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// A queued run: canceled at once, nothing was sent.
    Canceled,
    /// A running run of a provider that can stop runs: the worker asks the
    /// provider to stop it and records `canceled` once it has stopped.
    StopRequested,
}

/// Cancels a run that has not been submitted, or asks for a running run
/// of one of the `stoppable` profiles to be stopped at the provider.
/// Bumping the version of a queued run makes a worker that is validating it
/// right now lose its compare-and-set, so it never sends the submit.
#[tracing::instrument(name = "cancel_run", skip(pool), err)]
pub async fn cancel_run(
    pool: &PgPool,
    id: i64,
    reason: Option<&str>,
    stoppable: &[String],
) -> Result<CancelOutcome, RequestError> {
    let canceled: Option<i64> = sqlx::query_scalar(
        r#"
        WITH canceled AS (
            UPDATE wfq.runs r
            SET state = 'canceled', version = r.version + 1, updated_at = now(), finished_at = now(),
                settled_at = now(), lease_owner = NULL, lease_expires_at = NULL,
                error_code = 'CANCELED', error_message = COALESCE($2, 'canceled before submission'),
                hold_reason = NULL
            -- A waiting run (of a chain) too: the chain below it is failed
            -- or canceled with it, by the database's trigger.
            FROM (SELECT id, state AS was FROM wfq.runs WHERE id = $1 FOR NO KEY UPDATE) old
            WHERE r.id = old.id AND r.state IN ('queued', 'waiting')
            RETURNING r.id, old.was
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
            SELECT id, 'canceled', was, 'canceled', jsonb_build_object('reason', $2) FROM canceled
        )
        SELECT id FROM canceled
        "#,
    )
    .bind(id)
    .bind(reason)
    .fetch_optional(pool)
    .await?;
    if canceled.is_some() {
        return Ok(CancelOutcome::Canceled);
    }
    // The version is left alone: the worker holding the run finishes its
    // step, and the next one (due now) sends the stop.
    let requested: Option<i64> = sqlx::query_scalar(
        r#"
        WITH requested AS (
            UPDATE wfq.runs
            SET cancel_requested_at = COALESCE(cancel_requested_at, now()),
                -- A leased run stays due at its lease's end: a Dify stream's
                -- holder sees the request when it renews the lease; a poll
                -- step in flight sends the stop at the run's next poll.
                due_at = CASE WHEN lease_owner IS NULL THEN now() ELSE due_at END,
                updated_at = now()
            WHERE id = $1 AND state = 'running' AND provider = ANY($3) AND task_id IS NOT NULL
            RETURNING id
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
            SELECT id, 'cancel_requested', 'running', 'running', jsonb_build_object('reason', $2)
            FROM requested
        ),
        wake AS (
            SELECT pg_notify('wfq_runs_due', '') FROM requested
        )
        SELECT id FROM requested, (SELECT count(*) FROM wake) w
        "#,
    )
    .bind(id)
    .bind(reason)
    .bind(stoppable)
    .fetch_optional(pool)
    .await?;
    if requested.is_some() {
        return Ok(CancelOutcome::StopRequested);
    }
    Err(RequestError::WrongState {
        id,
        state: state_of(pool, id).await?,
        why: "only a queued run can be canceled (a waiting one of a chain too), or a running run of a provider that can stop runs (dify) whose task_id is known; chenyu and gptbots have no cancel endpoint",
    })
}

/// What `retry_run` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// A new run (new id, new idempotency key) repeats the request.
    NewRun(i64),
    /// The same run goes on with its own idempotency key, because its money
    /// is not settled: the provider may hold it already, and a new key would
    /// be a second charge.
    Resumed(i64),
}

/// Tries a failed or canceled run again.
///
/// A run whose money is settled (or that never reached the provider) is
/// repeated as a new row with a fresh key that points back at it. A failed
/// run whose money is *not* settled (`SUBMIT_RETRIES_EXHAUSTED`,
/// `POLL_DEADLINE`) is resumed in place instead: submitted again with its
/// own key (the provider replays it if it had accepted it) or polled again.
///
/// A `SUBMIT_OUTCOME_UNKNOWN` run of one of the `unfindable` profiles
/// (providers that can neither replay a key nor find a run: GPTBots) is
/// sent again: the operator checked the provider. Of other providers it is
/// looked for first, as after any lost answer.
#[tracing::instrument(name = "retry_run", skip(pool), err)]
pub async fn retry_run(
    pool: &PgPool,
    id: i64,
    unfindable: &[String],
) -> Result<RetryOutcome, RequestError> {
    // A run that failed because its dependency failed would fail again.
    let root: Option<i64> = sqlx::query_scalar(
        r#"
        SELECT (error_detail ->> 'root')::bigint FROM wfq.runs
        WHERE id = $1 AND error_code = 'DEPENDENCY_FAILED' AND state IN ('failed', 'canceled')
          AND jsonb_typeof(error_detail -> 'root') = 'number'
        "#,
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .flatten();
    if let Some(root) = root {
        return Err(RequestError::RetryTheRoot { id, root });
    }
    let resumed: Option<i64> = sqlx::query_scalar(
        r#"
        WITH resumed AS (
            UPDATE wfq.runs
            SET state = CASE WHEN provider_run_id IS NULL THEN 'submitting' ELSE 'running' END,
                attempts = 0, due_at = now(), finished_at = NULL, lease_owner = NULL,
                -- A fresh poll deadline, lookup window and status clocks:
                -- the operator asked for the run to be followed again.
                resumed_at = now(), resubmits = 0, unknown_status_since = NULL,
                provider_finished_at = NULL,
                -- SUBMIT_OUTCOME_UNKNOWN: the operator checked the provider
                -- and asks for the submit to be sent again.
                submit_in_doubt_since = CASE WHEN error_code = 'SUBMIT_OUTCOME_UNKNOWN'
                                                  AND provider = ANY($2)
                                             THEN NULL ELSE submit_in_doubt_since END,
                lease_expires_at = NULL, error_code = NULL, error_message = NULL,
                error_detail = NULL, version = version + 1, updated_at = now()
            WHERE id = $1 AND state = 'failed' AND settled_at IS NULL
              AND (provider_run_id IS NOT NULL OR sent_inputs IS NOT NULL)
            RETURNING id, state
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
            SELECT id, 'resumed', 'failed', state,
                   jsonb_build_object('reason', 'money not settled; resumed with the same idempotency key')
            FROM resumed
        )
        -- The chain below it waits for it again: a trigger does that for
        -- any failed run that comes back (wfq.resume_revived_chain).
        SELECT id FROM resumed
        "#,
    )
    .bind(id)
    .bind(unfindable)
    .fetch_optional(pool)
    .await?;
    if let Some(id) = resumed {
        return Ok(RetryOutcome::Resumed(id));
    }
    let new_id: Option<i64> = sqlx::query_scalar(
        r#"
        WITH copy AS (
            INSERT INTO wfq.runs (provider, workflow_id, revision_id, inputs,
                                  accept_external_cost_risk, priority, metadata, retry_of,
                                  callback_url, depends_on, on_dependency_failure)
            SELECT provider, workflow_id, revision_id, inputs,
                   accept_external_cost_risk, priority, metadata, id, callback_url,
                   depends_on, on_dependency_failure
            FROM wfq.runs
            WHERE id = $1 AND state IN ('failed', 'canceled') AND settled_at IS NOT NULL
            RETURNING id, retry_of
        ),
        event AS (
            INSERT INTO wfq.run_events (run_id, kind, detail)
            SELECT retry_of, 'retried', jsonb_build_object('new_run_id', id) FROM copy
        ),
        -- The chain below the old run waits for the new one (same
        -- transaction).
        chain AS (
            SELECT wfq.resume_chain(retry_of, id) AS resumed FROM copy
        )
        SELECT id FROM copy, (SELECT count(*) FROM chain) c
        "#,
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    match new_id {
        Some(new_id) => Ok(RetryOutcome::NewRun(new_id)),
        None => Err(RequestError::WrongState {
            id,
            state: state_of(pool, id).await?,
            why: "only a failed or canceled run can be retried",
        }),
    }
}
