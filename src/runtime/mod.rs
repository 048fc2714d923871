//! The worker: apalis runs steps of claimed runs; `wfq.runs` is the queue.
//!
//! apalis-postgres is not used as the queue of record (see DESIGN.md); a
//! custom apalis backend turns the claim loop into apalis' task stream.

mod fetcher;
mod manifests;
mod step;
mod wake;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use apalis::layers::WorkerBuilderExt;
use apalis::prelude::{Monitor, WorkerBuilder};
use apalis_core::backend::custom::BackendBuilder;
use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use apalis_core::task::data::Data;
use futures_util::{SinkExt, StreamExt, sink, stream};
use sqlx::PgPool;

pub use fetcher::{Fetcher, FetcherConfig, RunJob};
pub use manifests::ManifestCache;
pub use step::{LeaseClock, StepError, run_step};
pub use wake::Wake;

use crate::backoff::{PollPolicy, RetryPolicy};
use crate::config::{Config, ProviderKind};
use crate::providers::{ChenyuClient, ProviderClient};

/// Everything a step needs, shared by all steps of one worker process.
pub struct Engine {
    /// The queue's database.
    pub pool: PgPool,
    /// This process's `lease_owner` value.
    pub worker_id: String,
    /// How long a claim is held.
    pub lease: Duration,
    /// The longest a provider call can take (`http.timeout`).
    pub call_timeout: Duration,
    /// Submit retry schedule.
    pub submit: RetryPolicy,
    /// Poll schedule.
    pub poll: PollPolicy,
    providers: BTreeMap<String, (ProviderClient, Duration)>,
    /// Which runs this worker claims.
    pub scope: crate::store::ClaimScope,
    /// Manifest cache.
    pub manifests: ManifestCache,
    /// The claim loop's alarm clock.
    pub wake: Arc<Wake>,
}

/// The worker could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A provider client could not be built.
    #[error("provider profile `{profile}`: {source}")]
    Provider {
        /// The profile.
        profile: String,
        /// Why.
        source: reqwest::Error,
    },
    /// apalis reported an error.
    #[error("worker runtime: {0}")]
    Runtime(String),
}

impl Engine {
    /// Builds the provider clients of `config`.
    pub fn new(config: &Config, pool: PgPool) -> Result<Engine, WorkerError> {
        let mut providers = BTreeMap::new();
        for (name, profile) in &config.providers {
            let client = match profile.kind {
                ProviderKind::Chenyu => ProviderClient::Chenyu(
                    ChenyuClient::new(&profile.base_url, profile.api_key.clone(), &config.http)
                        .map_err(|source| WorkerError::Provider {
                            profile: name.clone(),
                            source,
                        })?,
                ),
            };
            providers.insert(name.clone(), (client, profile.manifest_ttl));
        }
        let scope = crate::store::ClaimScope {
            profiles: providers.keys().cloned().collect(),
            unknown_queued: config.worker.fail_unknown_providers,
        };
        Ok(Engine {
            scope,
            pool,
            worker_id: config.worker.id.clone(),
            lease: config.worker.lease,
            call_timeout: config.http.timeout,
            submit: config.submit.clone(),
            poll: config.poll.clone(),
            providers,
            manifests: ManifestCache::default(),
            wake: Arc::new(Wake::default()),
        })
    }

    fn provider(&self, name: &str) -> Option<(&ProviderClient, Duration)> {
        self.providers.get(name).map(|(c, ttl)| (c, *ttl))
    }

    fn provider_names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }
}

async fn handle(job: RunJob, engine: Data<Arc<Engine>>) -> Result<(), StepError> {
    let RunJob { run, slot, lease } = job;
    let result = run_step(engine.0.clone(), run, lease).await;
    drop(slot);
    if let Err(e) = &result {
        tracing::warn!(error = %e, "step not recorded; the run returns when its lease expires");
    }
    result
}

/// Runs the worker until `shutdown` resolves, then stops claiming, lets
/// in-flight steps finish within `worker.shutdown_grace`, and gives back the
/// leases of whatever did not finish so another worker continues at once.
pub async fn run_worker<S>(config: &Config, pool: PgPool, shutdown: S) -> Result<(), WorkerError>
where
    S: Future<Output = ()> + Send + 'static,
{
    let engine = Arc::new(Engine::new(config, pool.clone())?);
    let fetcher_config = FetcherConfig {
        concurrency: config.worker.concurrency,
        claim_batch: config.worker.claim_batch,
        fallback_poll: config.worker.fallback_poll,
    };
    let listener = config
        .worker
        .listen
        .then(|| tokio::spawn(wake::listen_for_new_runs(pool.clone(), engine.wake.clone())));

    tracing::info!(
        worker_id = %engine.worker_id,
        concurrency = fetcher_config.concurrency,
        providers = ?engine.provider_names(),
        "worker started"
    );
    let worker_name = engine.worker_id.clone();
    let factory_engine = engine.clone();
    let monitor = Monitor::new()
        .register(move |_restarts| {
            let engine = factory_engine.clone();
            let fetcher_config = fetcher_config.clone();
            let backend = BackendBuilder::new()
                .database(engine.clone())
                .fetcher(move |engine: &mut Arc<Engine>, _, _| {
                    let fetcher = Fetcher::new(engine.clone(), fetcher_config.clone());
                    stream::unfold(fetcher, |mut fetcher| async move {
                        let batch = fetcher.next_batch().await;
                        Some((batch, fetcher))
                    })
                    .flat_map(|batch| {
                        stream::iter(
                            batch
                                .into_iter()
                                .map(|job| Ok::<_, BoxDynError>(Some(Task::new(job)))),
                        )
                    })
                    .boxed()
                })
                .sink(|_, _| {
                    // Producers enqueue with SQL; nothing is pushed through apalis.
                    sink::drain()
                        .sink_map_err(|e: std::convert::Infallible| -> BoxDynError { match e {} })
                })
                .build()
                .expect("database, fetcher and sink are all set");
            WorkerBuilder::new(worker_name.as_str())
                .backend(backend)
                .catch_panic()
                .data(engine)
                .build(handle)
        })
        .shutdown_timeout(config.worker.shutdown_grace);

    let result = monitor
        .run_with_signal(async move {
            shutdown.await;
            tracing::info!("shutting down: no new claims; waiting for steps in flight");
            Ok(())
        })
        .await;
    if let Some(listener) = listener {
        listener.abort();
    }
    match crate::store::release_leases(&engine.pool, &engine.worker_id).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(released = n, "gave back the leases of unfinished runs"),
        Err(e) => {
            tracing::warn!(error = %e, "could not give back leases; they expire by themselves")
        }
    }
    tracing::info!("worker stopped");
    result.map_err(|e| WorkerError::Runtime(e.to_string()))
}
