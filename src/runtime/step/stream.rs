//! Reading a Dify run's stream to its end, renewing the lease meanwhile.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::OwnedSemaphorePermit;

use super::poll::stop_detail;
use super::{Engine, Slot, StepError, progress, record, unit};
use crate::lifecycle::{self, RunProgress, RunState};
use crate::providers::{PollOutcome, PollRequest, RunStream, StopOutcome, StreamEnd, Unclear};
use crate::store::{self, ClaimedRun};

/// The run whose stream a step follows.
pub(super) struct Follow {
    /// The row's version after `running` was recorded.
    pub(super) version: i64,
    pub(super) provider_run_id: String,
    pub(super) task_id: Option<String>,
    /// When the lease was last renewed.
    pub(super) lease_from: Instant,
    /// The step's clock of the run's lease, held for the stream's life:
    /// it keeps the run among this process's leases (`Leases`), so that a
    /// worker coming back from being cut off does not give back the lease
    /// of a run whose stream it is reading (it would be claimed and
    /// followed elsewhere, and this stream's final write refused).
    pub(super) lease: super::LeaseClock,
    /// The rest of the run's stream.
    pub(super) stream: RunStream,
    /// Its place in the worker's stream budget (`worker.max_streams`).
    pub(super) permit: OwnedSemaphorePermit,
}

/// Ends a background task with the step that started it, also when the
/// step itself is dropped (a worker stopping mid-stream).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the lease heartbeat tells the step reading a stream.
enum Heartbeat {
    /// `wfq cancel` asked for the run to be stopped.
    CancelRequested,
    /// The lease could not be renewed: the run is no longer ours.
    Lost,
}

/// Reads a Dify run's stream to its end, renewing the lease meanwhile, and
/// records the result (or, when the stream is lost, a status check due on
/// the schedule, so polling takes over).
pub(super) async fn follow_stream(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &crate::runtime::Profile,
    followed: Follow,
    slot: Slot,
) -> Result<(), StepError> {
    // A stream may last as long as the run: it counts against the stream
    // budget, not against the slots that claims and status checks use.
    drop(slot);
    let Follow {
        version,
        provider_run_id,
        task_id,
        lease_from,
        lease: _lease,
        mut stream,
        permit: _permit,
    } = followed;
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let heartbeat = AbortOnDrop(tokio::spawn(renew_while_streaming(
        engine.pool.clone(),
        run.id,
        version,
        engine.worker_id.clone(),
        engine.lease,
        lease_from,
        tx,
    )));
    let request = PollRequest {
        provider_run_id: &provider_run_id,
        task_id: task_id.as_deref(),
        idempotency_key: &run.idempotency_key,
    };
    // Reading the stream changes nothing at the provider, and the final
    // write is a compare-and-set: so a lease that could not be renewed
    // (database blip, or the run taken over) does not end the reading,
    // which on some Dify versions would end the run. Only the stop needs
    // the run to be ours, and the poll deadline bounds the whole stream.
    let mut cancel_requested = false;
    let mut stop_sent = false;
    let mut heartbeat_alive = true;
    let deadline = tokio::time::Instant::now() + engine.poll.deadline;
    let end = {
        let follow = stream.follow();
        tokio::pin!(follow);
        loop {
            tokio::select! {
                end = &mut follow => break end,
                _ = tokio::time::sleep_until(deadline) => {
                    break StreamEnd::Lost(Unclear::new("the run's stream outlived poll.deadline", None));
                }
                signal = rx.recv(), if heartbeat_alive => match signal {
                    Some(Heartbeat::CancelRequested) => {
                        cancel_requested = true;
                        if !stop_sent && let Some(stop) = profile.client.stop(&request).await {
                            tracing::info!(stop = %stop_detail(&stop), "asked the provider to stop the run");
                            // Asked again on the next renewal unless taken.
                            stop_sent = matches!(stop, StopOutcome::Requested);
                        }
                    }
                    Some(Heartbeat::Lost) | None => {
                        heartbeat_alive = false;
                        tracing::warn!("could not renew the lease of a streamed run; reading on, the final write decides");
                    }
                },
            }
        }
    };
    drop(heartbeat);
    let outcome = match end {
        StreamEnd::Finished(report) => PollOutcome::Report(report),
        StreamEnd::Lost(u) => {
            tracing::warn!(reason = %u.reason, "the run's stream was lost; following it with status checks");
            PollOutcome::Unclear(u)
        }
    };
    let progress = RunProgress {
        state: RunState::Running,
        // Accepted when the stream began, unless this is a resumed run.
        since_submit: progress(run).since_submit.or(Some(started.elapsed())),
        ..progress(run)
    };
    let t = lifecycle::after_poll(
        &progress,
        &outcome,
        cancel_requested || run.cancel_requested,
        &engine.poll,
        Utc::now(),
        unit(),
    );
    record(engine, run, RunState::Running, version, &t).await?;
    Ok(())
}

/// Renews the lease of a run whose stream is being read, a third of a lease
/// after the last renewal, until told to stop (the task is aborted) or the
/// lease is lost; passes on cancel requests.
async fn renew_while_streaming(
    pool: sqlx::PgPool,
    id: i64,
    version: i64,
    worker: String,
    lease: Duration,
    mut renewed: Instant,
    signals: tokio::sync::mpsc::Sender<Heartbeat>,
) {
    loop {
        tokio::time::sleep_until((renewed + lease / 3).into()).await;
        let attempt = Instant::now();
        let renewal = tokio::time::timeout(
            lease / 3,
            store::renew_lease(&pool, id, version, &worker, lease),
        )
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
        match renewal {
            // Every renewal passes a cancel request on, so a stop that got
            // no clear answer is asked again.
            Ok(Some(cancel_requested)) => {
                renewed = attempt;
                if cancel_requested {
                    let _ = signals.send(Heartbeat::CancelRequested).await;
                }
            }
            Ok(None) => {
                let _ = signals.send(Heartbeat::Lost).await;
                return;
            }
            // A database blip: try again soon, while the lease still runs.
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the lease of a streamed run");
                if attempt + lease / 3 >= renewed + lease {
                    let _ = signals.send(Heartbeat::Lost).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
