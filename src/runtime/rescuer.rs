//! The rescuer: a maintenance service of every live worker that finds the
//! registered workers whose liveness session is gone and makes their runs
//! due at once, instead of after their leases.
//!
//! Every `every` it tries each other worker's liveness lock for the length
//! of one statement (`pg_try_advisory_xact_lock`): a lock it gets is a lock
//! nobody holds, so that worker's session has ended. Those workers are
//! marked dead (`crash`) and their runs' leases end now, in one statement
//! that takes the locks again, so that a worker coming back in between is
//! left alone; the next claim of any worker takes the runs (its
//! `lease_rescued` event says `cause: crash`). Workers marked dead a short
//! while ago (within a lease) are looked at again while they still hold
//! unexpired leases: a claim or write of theirs that committed after their
//! session ended. Rows of workers dead for `forget_dead_after` are deleted.
//!
//! A run with a submit in flight (`submitting`, its doubt marked) is the
//! exception, unless its provider replays a submit sent again with its key
//! (chenyu): its lease is cut to `submit_grace`, not to now. A free lock
//! proves that the session is gone, not that the process is: a database
//! restart, a killed or reset connection, or a worker that gave up on a
//! slow server all free it while the worker goes on, and its request may
//! be answered right then. Taken over at once, such a run could only be
//! looked for (Dify, which may not list the run yet) or failed
//! `SUBMIT_OUTCOME_UNKNOWN` (GPTBots), though its sender is about to learn
//! the answer. The grace covers the request's timeout and the writer's
//! pauses while the database comes back; an answer that comes even later
//! is still applied by its sender (`store::record_late_acceptance`). Every
//! other run is safe to take at once: a queued run's step sends nothing
//! before its compare-and-set on `submitting` (which the claim makes fail),
//! a status check changes nothing at the provider, and a chenyu submit
//! sent again is replayed. So a crash still costs about a second for every
//! run but the ones that were mid-submit.
//!
//! Two statements rather than one transaction: the probe runs on its own
//! (autocommit, its try-locks gone with it), which is all a round costs
//! while every worker is alive, and only when it found a free lock does the
//! second statement act, taking the locks again for its own duration.
//!
//! Every live worker runs it; when two find the same dead worker, the first
//! one's lock makes the other see it as alive for that round, and the next
//! round skips it because it is marked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::registry::Liveness;
use super::wake::Wake;
use super::writer::LONGEST_PAUSE as LONGEST_WRITE_PAUSE;
use crate::store::{self, WorkerProbe};

/// Settings of the rescuer.
#[derive(Debug, Clone)]
pub struct RescuerConfig {
    /// How often the other workers are looked at (`worker.rescue_every`).
    pub every: Duration,
    /// Rows of workers dead this long are deleted (`worker.forget_dead_after`).
    pub forget_dead_after: Duration,
    /// `worker.lease`: a lease granted before a worker's death has ended by
    /// itself this long after it.
    pub lease: Duration,
    /// How long a run with a submit in flight stays with a worker whose
    /// session is gone ([`submit_grace`]).
    pub submit_grace: Duration,
    /// Profiles whose provider replays a submit sent again with its key:
    /// their runs are taken over at once, also mid-submit.
    pub replaying_profiles: Vec<String>,
}

impl Default for RescuerConfig {
    fn default() -> Self {
        RescuerConfig {
            every: Duration::from_secs(1),
            forget_dead_after: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(120),
            submit_grace: submit_grace(Duration::from_secs(30)),
            replaying_profiles: Vec::new(),
        }
    }
}

/// How long a run with a submit in flight stays with a worker whose session
/// is gone, for requests of at most `call_timeout` (`http.timeout`): the
/// request may be answered at its very end, and its answer is then written
/// through a writer that retries with pauses of up to
/// [`LONGEST_WRITE_PAUSE`] while the database comes back (the rescue itself
/// says the database is there); two of them leave room for the write.
pub fn submit_grace(call_timeout: Duration) -> Duration {
    call_timeout + 2 * LONGEST_WRITE_PAUSE
}

/// How often dead workers' rows are looked for to delete.
const FORGET_EVERY: Duration = Duration::from_secs(60);

/// The longest one round's statement may take.
const ROUND_LIMIT: Duration = Duration::from_secs(30);

/// What a probe says about one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its session holds its lock (or another rescuer is looking at it).
    Alive,
    /// Its session is gone and it is not marked yet: it died.
    Died,
    /// Marked dead already, its session still gone, and it holds unexpired
    /// leases: end them too.
    LeftLeases,
}

/// Reads one probe.
pub fn verdict(probe: &WorkerProbe) -> Verdict {
    match (probe.gone, probe.marked_dead) {
        (false, _) => Verdict::Alive,
        (true, false) => Verdict::Died,
        (true, true) => Verdict::LeftLeases,
    }
}

/// The workers whose runs are to be made due now.
pub fn rescue_targets(probes: &[WorkerProbe]) -> Vec<String> {
    probes
        .iter()
        .filter(|p| verdict(p) != Verdict::Alive)
        .map(|p| p.id.clone())
        .collect()
}

/// Runs the rescuer until the task is aborted. Rounds are skipped while
/// this process is cut off itself (it cannot tell who is alive then).
pub async fn rescue_periodically(
    pool: PgPool,
    me: String,
    config: RescuerConfig,
    liveness: Liveness,
    wake: Arc<Wake>,
) {
    let every = config.every.max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut forgot: Option<Instant> = None;
    loop {
        ticks.tick().await;
        if !liveness.is_live() {
            continue;
        }
        match tokio::time::timeout(ROUND_LIMIT, round(&pool, &me, &config)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(_)) => wake.now(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the rescuer could not look at the other workers")
            }
            Err(_) => tracing::warn!(limit = ?ROUND_LIMIT, "a rescuer round took too long"),
        }
        if forgot.is_none_or(|at| at.elapsed() >= FORGET_EVERY) {
            forgot = Some(Instant::now());
            match store::forget_dead_workers(&pool, config.forget_dead_after).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(workers = n, "deleted the rows of workers dead for long"),
                Err(e) => tracing::debug!(error = %e, "could not delete dead workers' rows"),
            }
        }
    }
}

/// One round; the number of runs made due.
async fn round(pool: &PgPool, me: &str, config: &RescuerConfig) -> Result<i64, sqlx::Error> {
    let probes = store::probe_workers(pool, me, config.lease).await?;
    let targets = rescue_targets(&probes);
    if targets.is_empty() {
        return Ok(0);
    }
    let policy = store::RescuePolicy {
        replaying_profiles: &config.replaying_profiles,
        submit_grace: config.submit_grace,
    };
    let rescued = store::rescue_workers(pool, me, &targets, policy).await?;
    for worker in &rescued.died {
        tracing::warn!(worker = %worker, "a worker is gone (its liveness session ended): its runs are due again");
    }
    if rescued.deferred > 0 {
        tracing::info!(
            runs = rescued.deferred,
            workers = ?targets,
            grace = ?config.submit_grace,
            "runs with a submit in flight stay with their worker a little longer, so that a worker that is alive can record the answer"
        );
    }
    if rescued.runs > 0 {
        tracing::info!(
            runs = rescued.runs,
            workers = ?targets,
            "ended the leases of runs held by workers that are gone"
        );
    }
    Ok(rescued.runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(id: &str, marked_dead: bool, gone: bool) -> WorkerProbe {
        WorkerProbe {
            id: id.into(),
            marked_dead,
            gone,
        }
    }

    #[test]
    fn only_workers_whose_lock_was_free_are_rescued() {
        assert_eq!(verdict(&probe("a", false, false)), Verdict::Alive);
        assert_eq!(verdict(&probe("a", true, false)), Verdict::Alive);
        assert_eq!(verdict(&probe("a", false, true)), Verdict::Died);
        assert_eq!(verdict(&probe("a", true, true)), Verdict::LeftLeases);
        let probes = [
            probe("alive", false, false),
            probe("dead", false, true),
            probe("back", true, false),
            probe("left-leases", true, true),
        ];
        assert_eq!(rescue_targets(&probes), ["dead", "left-leases"]);
        assert!(rescue_targets(&[]).is_empty());
    }

    #[test]
    fn a_submit_in_flight_gets_the_request_timeout_and_two_write_pauses() {
        // (http.timeout, grace)
        let table = [(30, 40), (1, 11), (5, 15), (120, 130)];
        for (timeout, grace) in table {
            assert_eq!(
                submit_grace(Duration::from_secs(timeout)),
                Duration::from_secs(grace),
                "http.timeout {timeout}s"
            );
        }
        assert_eq!(
            RescuerConfig::default().submit_grace,
            Duration::from_secs(40)
        );
    }
}
