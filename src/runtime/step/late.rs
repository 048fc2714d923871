//! An accepted answer that its run's compare-and-set refused, or that could
//! not be written within the lease: the worker's liveness session was cut
//! (a database restart, a killed or reset connection, a slow server given
//! up on) while the request was in flight, and another worker took the run
//! over. The answer names a run the provider bills, and no other worker can
//! learn it (GPTBots cannot find runs; Dify may not list it yet), so it is
//! recorded by the submit's token whoever holds the run, as long as the run
//! still waits for this submit's outcome (`store::record_late_acceptance`);
//! otherwise it is kept as an event and logged with the provider's run id.

use std::time::Instant;

use uuid::Uuid;

use super::{Engine, retry_transient};
use crate::lifecycle::{self, Transition};
use crate::providers::SubmitGuard;
use crate::store::{self, ClaimedRun, LateAnswer};

/// Whether the outcome `applied` of writing `t` (the answer to a submit)
/// under the run's version calls for the late record: an accepted answer
/// (it names a run the provider bills) that was refused, or that the
/// database did not take within the lease. A refusal or an unclear answer
/// names no run: the worker that holds the run settles it as usual.
pub(super) fn records_late(t: &Transition, applied: &Result<Option<i64>, sqlx::Error>) -> bool {
    t.submitted
        && match applied {
            Ok(Some(_)) => false,
            Ok(None) => true,
            Err(e) => store::is_transient(e),
        }
}

/// How the run that moved past a submit relates to the submit's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MovedPast {
    /// It names the very run the answer names (found again by the worker
    /// that took it over, or replayed by its key): nothing is lost.
    SameRun,
    /// It names none yet, and the provider replays a submit sent again with
    /// the run's key (chenyu): the submit that moved it on is answered with
    /// this very run.
    Replayed,
    /// It names another run, or none: the answer's run is billed and only
    /// the event and the log know it.
    Unrecorded,
}

impl MovedPast {
    /// Compares the answer's provider run id with the run's; `replays`:
    /// the provider replays keys.
    pub(super) fn judge(answer: Option<&str>, row: Option<&str>, replays: bool) -> MovedPast {
        match (answer, row) {
            (Some(a), Some(r)) if a == r => MovedPast::SameRun,
            (Some(_), None) if replays => MovedPast::Replayed,
            _ => MovedPast::Unrecorded,
        }
    }
}

/// Records the accepted answer `t` to the submit named `submit_token` on
/// `run` by the token, trying while the database is away for up to one
/// more lease. The run's new version when it was recorded; `None` when the
/// run had moved past this submit (logged, and kept as an event).
pub(super) async fn record_late(
    engine: &Engine,
    run: &ClaimedRun,
    t: &Transition,
    submit_token: Uuid,
) -> Result<Option<i64>, sqlx::Error> {
    let until = Instant::now() + engine.lease;
    let answer = match attempt(engine, run, t, submit_token, until).await {
        // The answer's data itself was refused: what can always be stored.
        Err(e) if store::is_data_error(&e) => {
            let unstorable = lifecycle::unstorable_answer(t, &e.to_string());
            attempt(engine, run, &unstorable, submit_token, until).await?
        }
        other => other?,
    };
    let ours = t.facts.provider_run_id.as_deref();
    match answer {
        LateAnswer::Recorded {
            version,
            was,
            previous_owner,
        } => {
            tracing::warn!(
                provider_run_id = ours,
                was = %was,
                previous_owner = previous_owner.as_deref(),
                "recorded the provider's answer after another worker had taken the run over (this worker's database session was cut while the submit was in flight)"
            );
            Ok(Some(version))
        }
        LateAnswer::Moved {
            state,
            provider_run_id,
        } => {
            let replays = engine
                .provider(&run.provider)
                .is_some_and(|p| p.client.submit_guard() == SubmitGuard::IdempotencyKey);
            match MovedPast::judge(ours, provider_run_id.as_deref(), replays) {
                MovedPast::SameRun => tracing::info!(
                    provider_run_id = ours,
                    "the run already names the provider run this answer names"
                ),
                MovedPast::Replayed => tracing::info!(
                    provider_run_id = ours,
                    "the run moved on to a submit with the same key, which the provider answers with this run"
                ),
                MovedPast::Unrecorded => tracing::error!(
                    provider_run_id = ours,
                    run_names = provider_run_id.as_deref(),
                    state = state.as_deref(),
                    "the provider accepted this submit, but the run had moved past it when the answer could be recorded: the provider run is kept only in a `late_submit_answer` event; check it at the provider"
                ),
            }
            Ok(None)
        }
    }
}

async fn attempt(
    engine: &Engine,
    run: &ClaimedRun,
    t: &Transition,
    submit_token: Uuid,
    until: Instant,
) -> Result<LateAnswer, sqlx::Error> {
    retry_transient("record an accepted answer late", until, || {
        store::record_late_acceptance(
            &engine.pool,
            run.id,
            submit_token,
            &engine.worker_id,
            engine.lease,
            t,
        )
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Event, RunState};

    fn answer(submitted: bool) -> Transition {
        Transition {
            submitted,
            ..Transition::new(
                RunState::Running,
                Event {
                    kind: "submit_accepted",
                    detail: serde_json::json!({}),
                },
            )
        }
    }

    #[test]
    fn only_an_accepted_answer_that_was_not_recorded_is_recorded_late() {
        let transient = || sqlx::Error::Io(std::io::Error::other("connection reset"));
        let refused = || sqlx::Error::RowNotFound;
        // (accepted, outcome of the write under the version, recorded late)
        type Row = (bool, Result<Option<i64>, sqlx::Error>, bool);
        let table: Vec<Row> = vec![
            (true, Ok(Some(4)), false),
            (true, Ok(None), true),
            (true, Err(transient()), true),
            (true, Err(refused()), false),
            (false, Ok(None), false),
            (false, Err(transient()), false),
            (false, Ok(Some(4)), false),
        ];
        for (accepted, applied, late) in table {
            assert_eq!(
                records_late(&answer(accepted), &applied),
                late,
                "accepted {accepted}, {applied:?}"
            );
        }
    }

    #[test]
    fn a_run_that_moved_past_the_submit_loses_nothing_only_if_it_names_the_same_run() {
        // (the answer's run, the row's run, the provider replays keys, judged)
        let table = [
            (Some("r1"), Some("r1"), false, MovedPast::SameRun),
            (Some("r1"), Some("r1"), true, MovedPast::SameRun),
            (Some("r1"), Some("r2"), false, MovedPast::Unrecorded),
            (Some("r1"), Some("r2"), true, MovedPast::Unrecorded),
            (Some("r1"), None, false, MovedPast::Unrecorded),
            (Some("r1"), None, true, MovedPast::Replayed),
            (None, None, false, MovedPast::Unrecorded),
            (None, None, true, MovedPast::Unrecorded),
        ];
        for (answer, row, replays, judged) in table {
            assert_eq!(
                MovedPast::judge(answer, row, replays),
                judged,
                "{answer:?} {row:?} replays {replays}"
            );
        }
    }
}
