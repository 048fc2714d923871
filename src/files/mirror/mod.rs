//! The output mirror: a maintenance service of the worker (on when
//! `[storage]` is configured). It looks at runs that succeeded (woken by
//! `wfq_run_finished`, else every second), plans which outputs are files
//! (`plan`), copies them into the store (`download`) on a durable retry
//! schedule (`decide`), and records each batch of outcomes in one
//! statement, finishing a run's `media_state` and `mirrored_outputs` once
//! none of its files is pending. A run's own state and money never wait
//! for it. Copies are leased (`SKIP LOCKED`), so many workers share them.

pub mod decide;
pub mod download;
pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::files::{Storage, StorageConfig};
use crate::store::{self, ClaimedMirror, MirrorRecord};

/// The longest the service sleeps without looking at the tables.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// Runs planned per statement.
const PLAN_BATCH: i64 = 200;

/// The output manifest of a profile's workflow (`(profile, workflow)` to
/// each output key's type); `None` when it cannot be known now, and the
/// content type decides.
pub type OutputTypes = Arc<
    dyn Fn(
            String,
            String,
        ) -> futures_util::future::BoxFuture<'static, Option<Vec<(String, String)>>>
        + Send
        + Sync,
>;

/// How long a claimed copy is this worker's.
pub fn lease(config: &StorageConfig) -> Duration {
    config.timeout * 2 + Duration::from_secs(30)
}

/// A running mirror service.
pub struct MirrorService {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MirrorService {
    /// Starts the service when `[storage]` is configured; logs and returns
    /// `None` when the store cannot be opened.
    pub fn start(
        pool: &PgPool,
        storage: Option<Arc<Storage>>,
        worker_id: &str,
        listen: bool,
        metrics: Arc<crate::metrics::Metrics>,
        output_types: Option<OutputTypes>,
    ) -> Option<MirrorService> {
        let storage = storage?;
        let http = match reqwest::Client::builder()
            .timeout(storage.config().timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("wfq/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(http) => http,
            Err(e) => {
                tracing::error!(error = %e, "media mirror: cannot build the HTTP client; outputs are not mirrored");
                return None;
            }
        };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(
            pool.clone(),
            storage,
            Fetch { http, output_types },
            worker_id.to_owned(),
            listen,
            stopped,
            metrics,
        ));
        Some(MirrorService { stop, task })
    }

    /// Stops claiming, gives the copies in flight a few seconds, then
    /// gives their leases back (another worker continues them at once).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(15), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

async fn listen_for_finished(pool: PgPool, wake: Arc<Notify>) {
    loop {
        match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                if listener
                    .listen(crate::callbacks::RUN_FINISHED_CHANNEL)
                    .await
                    .is_ok()
                {
                    while listener.recv().await.is_ok() {
                        wake.notify_one();
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "media mirror: LISTEN failed; polling"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

type Done = (ClaimedMirror, decide::Attempt);

/// How copies are made: the HTTP client, and the output manifests.
struct Fetch {
    http: reqwest::Client,
    output_types: Option<OutputTypes>,
}

async fn run(
    pool: PgPool,
    storage: Arc<Storage>,
    fetch: Fetch,
    worker_id: String,
    listen: bool,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let Fetch { http, output_types } = fetch;
    let config = storage.config().clone();
    let wake = Arc::new(Notify::new());
    let listener = listen.then(|| tokio::spawn(listen_for_finished(pool.clone(), wake.clone())));
    let mut copies: JoinSet<Done> = JoinSet::new();
    let mut finished: Vec<Done> = Vec::new();
    tracing::info!(storage = %storage.base(), concurrency = config.concurrency, "media mirror started");
    while !*stop.borrow() && stop.has_changed().is_ok() {
        if let Err(e) = plan_batch(&pool, &config).await {
            tracing::warn!(error = %e, "media mirror: planning failed; trying again");
        }
        let room = config.concurrency.saturating_sub(copies.len());
        if room > 0 {
            match store::claim_due_mirrors(&pool, &worker_id, room as i64, lease(&config)).await {
                Ok(claims) => {
                    for claim in claims {
                        let (http, storage) = (http.clone(), storage.clone());
                        let types = output_types.clone();
                        copies.spawn(async move {
                            let declared = declared_type(types, &claim).await;
                            let attempt =
                                download::copy(&http, &storage, &claim, declared.as_deref()).await;
                            (claim, attempt)
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "media mirror: claim failed; trying again"),
            }
        }
        let until = match store::next_mirror_due(&pool).await {
            Ok(Some(due)) => (due - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(FALLBACK_POLL),
            _ => FALLBACK_POLL,
        };
        tokio::select! {
            Some(done) = copies.join_next(), if !copies.is_empty() => {
                if let Ok(done) = done {
                    finished.push(done);
                }
            }
            () = wake.notified() => {}
            () = tokio::time::sleep(until), if copies.len() < config.concurrency => {}
            _ = stop.changed() => {}
        }
        while let Some(done) = copies.try_join_next() {
            if let Ok(done) = done {
                finished.push(done);
            }
        }
        if !finished.is_empty() {
            record(
                &pool,
                &worker_id,
                &config,
                std::mem::take(&mut finished),
                &metrics,
            )
            .await;
        }
    }
    // Copies in flight get a few seconds; the rest are given back.
    let grace = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(grace);
    while !copies.is_empty() {
        tokio::select! {
            Some(done) = copies.join_next() => {
                if let Ok(done) = done {
                    finished.push(done);
                }
            }
            () = &mut grace => {
                copies.abort_all();
                break;
            }
        }
    }
    if !finished.is_empty() {
        record(&pool, &worker_id, &config, finished, &metrics).await;
    }
    if let Err(e) = store::release_mirror_leases(&pool, &worker_id).await {
        tracing::warn!(error = %e, "media mirror: could not give back leases; they expire by themselves");
    }
    if let Some(listener) = listener {
        listener.abort();
    }
    tracing::info!("media mirror stopped");
}

/// The type the output manifest states for `claim`'s output, if any.
async fn declared_type(types: Option<OutputTypes>, claim: &ClaimedMirror) -> Option<String> {
    let types = types?(claim.profile.clone(), claim.workflow_id.clone()).await?;
    types
        .into_iter()
        .find(|(key, _)| *key == claim.key)
        .map(|(_, kind)| kind)
}

/// Plans a batch of succeeded runs in one transaction.
async fn plan_batch(pool: &PgPool, config: &StorageConfig) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let runs = store::unplanned_runs(&mut tx, config.lookback, PLAN_BATCH).await?;
    if runs.is_empty() {
        return Ok(());
    }
    let mut files = Vec::new();
    let mut states = Vec::with_capacity(runs.len());
    for run in &runs {
        let planned = plan::plan(run.id, &run.provider, run.outputs.as_ref());
        states.push((
            run.id,
            if planned.is_empty() {
                "none"
            } else {
                "pending"
            },
        ));
        files.extend(planned);
    }
    store::record_plan(&mut tx, &files, &states).await?;
    tx.commit().await?;
    tracing::debug!(
        runs = runs.len(),
        files = files.len(),
        "media mirror: planned"
    );
    Ok(())
}

async fn record(
    pool: &PgPool,
    worker_id: &str,
    config: &StorageConfig,
    finished: Vec<Done>,
    metrics: &crate::metrics::Metrics,
) {
    let now = Utc::now();
    let records: Vec<MirrorRecord> = finished
        .into_iter()
        .map(|(claim, attempt)| {
            let span = tracing::info_span!("mirror", run_id = claim.run_id, key = %claim.key, position = claim.position);
            let _enter = span.enter();
            let record = decide::decide(
                claim.id,
                claim.run_id,
                claim.attempts + 1,
                attempt,
                &config.retry,
                now,
                fastrand::f64(),
            );
            match record.state {
                "done" => tracing::info!(stored = ?record.stored_location, bytes = ?record.bytes, "output mirrored"),
                "pending" => tracing::warn!(error = ?record.error, next_attempt = ?record.due_at, attempts = record.attempts, "output copy failed; retrying later"),
                "skipped" => tracing::debug!(error = ?record.error, "output is not media; skipped"),
                _ => tracing::warn!(code = ?record.error_code, error = ?record.error, "output could not be mirrored"),
            }
            metrics.media_copy(record.state);
            record
        })
        .collect();
    // A lost write is repeated by whoever claims the copies after their lease.
    match store::record_mirrors(pool, worker_id, &records).await {
        Ok(runs) => {
            for (run_id, state) in runs {
                tracing::info!(run_id, media_state = %state, "run's media outputs settled");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "media mirror: could not record copies; they are repeated after their lease")
        }
    }
}
