//! The worker: apalis runs steps of claimed runs; `wfq.runs` is the queue.
//!
//! apalis-postgres is not used as the queue of record (see DESIGN.md); a
//! custom apalis backend turns the claim loop into apalis' task stream.

pub(crate) mod account;
mod balances;
mod breaker;
mod fetcher;
mod fleet;
mod health;
mod leases;
mod manifests;
mod metrics;
mod pauses;
mod registry;
mod rescuer;
mod retention;
mod shutdown;
mod step;
mod throttle;
mod wake;
mod writer;

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

pub use balances::{Balances, Coverage};
pub use breaker::{BreakerConfig, Breakers};
pub use fetcher::{Fetcher, FetcherConfig, RunJob};
pub use fleet::FleetServices;
pub use leases::Leases;
pub use manifests::ManifestCache;
pub use metrics::MeteredClient;
pub use pauses::{DueProbe, PauseKind, ProviderPauses};
pub use registry::{Liveness, Registry, RegistryConfig};
pub use rescuer::RescuerConfig;
pub use shutdown::{InFlight, InFlightGuard, Shutdown};
pub use step::{LeaseClock, Slot, StepError, run_step};
pub use throttle::{Admission, Answered, Class, RateControl, Throttles, Ticket};
pub use wake::Wake;
pub use writer::TransitionWriter;

use crate::backoff::{PollPolicy, RetryPolicy};
use crate::config::{Config, ProviderKind};
use crate::providers::{ChenyuClient, DifyClient, GptbotsClient, ProviderClient};

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
    providers: BTreeMap<String, Profile>,
    /// Profiles paused by what the provider said about the account.
    pub pauses: ProviderPauses,
    /// Recent refusals nobody listed, per profile (the breaker).
    pub breakers: Breakers,
    /// The account balances this process knows (chenyu).
    pub balances: Balances,
    /// First wait before probing a paused profile.
    pub auth_probe: Duration,
    fail_unknown_providers: bool,
    /// Manifest cache.
    pub manifests: ManifestCache,
    /// The claim loop's alarm clock.
    pub wake: Arc<Wake>,
    /// Request rates and submit slots per profile.
    pub throttles: Throttles,
    /// The zone of the `daily_budget` day.
    pub budget_timezone: String,
    /// How often a run held by a spend limit is checked again.
    pub budget_recheck: Duration,
    /// This process's metrics (`/metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Writes step outcomes, many runs per commit.
    pub transitions: TransitionWriter,
    /// Whether the worker is stopping (no new submit starts then).
    pub shutdown: Shutdown,
    /// Submits from just before `submitting` is recorded until their answer
    /// is (or until it is recorded that nothing was sent): waited for
    /// before the leases are given back at shutdown.
    pub submits_in_flight: InFlight,
    /// The stream budget (`worker.max_streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Whether this process is in touch with the database (its liveness
    /// session answers): no claim and no provider call otherwise.
    pub liveness: Liveness,
    /// The leases of the runs this process's steps work on (renewed together).
    pub leases: Leases,
    /// Input files: the store, limits and what was learned of providers' limits.
    pub uploads: crate::files::upload::Uploads,
    /// Profiles with queued runs that this worker does not have, found by
    /// the claim loop from time to time (to fail those runs).
    unknown_profiles: std::sync::Mutex<Vec<String>>,
}

/// One configured provider profile, as the steps use it.
pub struct Profile {
    /// Its client.
    pub client: MeteredClient,
    /// How long a manifest is cached.
    pub manifest_ttl: Duration,
    /// How long a lost submit's run may take to show up (Dify).
    pub find_window: Duration,
    /// How often a lost submit whose run cannot be found is sent again.
    pub max_resubmits: u32,
    /// Its money limits and its cap on runs at once.
    pub spend: crate::spend::SpendLimits,
    /// Refusal codes about the account, not the run.
    pub account_refusals: Vec<String>,
    /// First probe of a profile paused for its account.
    pub account_probe: Duration,
    /// When an unlisted refusal code counts as the account's.
    pub breaker: BreakerConfig,
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
    /// `[metrics] listen` could not be bound.
    #[error("metrics.listen {listen}: {source}")]
    Metrics {
        /// The configured address.
        listen: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Engine {
    /// Builds the provider clients of `config`.
    pub fn new(config: &Config, pool: PgPool) -> Result<Engine, WorkerError> {
        Self::with_metrics(config, pool, Arc::default())
    }

    /// [`Engine::new`], recording into `metrics`.
    pub fn with_metrics(
        config: &Config,
        pool: PgPool,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Engine, WorkerError> {
        let mut providers = BTreeMap::new();
        let mut throttles = Throttles::default();
        for (name, profile) in &config.providers {
            throttles.add(
                name,
                profile.requests_per_second,
                profile.max_submits_in_flight,
            );
            let (url, key, http) = (&profile.base_url, profile.api_key.clone(), &config.http);
            let client = match profile.kind {
                ProviderKind::Chenyu => {
                    ChenyuClient::new(url, key, http).map(ProviderClient::Chenyu)
                }
                ProviderKind::Dify => DifyClient::new(url, key, http).map(ProviderClient::Dify),
                ProviderKind::Gptbots => {
                    GptbotsClient::new(url, key, http).map(ProviderClient::Gptbots)
                }
            }
            .map_err(|source| WorkerError::Provider {
                profile: name.clone(),
                source,
            })?;
            providers.insert(
                name.clone(),
                Profile {
                    client: MeteredClient::new(client, name, metrics.clone()),
                    manifest_ttl: profile.manifest_ttl,
                    find_window: profile.find_window,
                    max_resubmits: profile.max_resubmits,
                    spend: profile.spend.clone(),
                    account_refusals: profile.account_refusals.clone(),
                    account_probe: profile.account_probe,
                    breaker: profile.breaker.clone(),
                },
            );
        }
        let liveness = match config.worker.session_liveness {
            true => Liveness::pending(),
            false => Liveness::always(),
        };
        let uploads = crate::files::upload::Uploads::new(config)
            .map_err(|e| WorkerError::Runtime(e.to_string()))?;
        Ok(Engine {
            uploads,
            leases: Leases::new(config.worker.lease, liveness.clone()),
            liveness,
            pauses: ProviderPauses::default(),
            breakers: Breakers::default(),
            balances: Balances::default(),
            auth_probe: config.worker.auth_probe,
            fail_unknown_providers: config.worker.fail_unknown_providers,
            worker_id: config.worker.id.clone(),
            lease: config.worker.lease,
            call_timeout: config.http.timeout,
            submit: config.submit.clone(),
            poll: config.poll.clone(),
            providers,
            manifests: ManifestCache::default(),
            wake: Arc::new(Wake::default()),
            throttles,
            budget_timezone: config.worker.budget_timezone.clone(),
            budget_recheck: config.worker.budget_recheck,
            metrics,
            // Half the pool: LISTEN, lease renewals, the spend guard and the
            // rest take theirs from it too (the claim loop has its own).
            transitions: TransitionWriter::start(
                pool.clone(),
                config.worker.id.clone(),
                config.worker.lease,
                (config.database.max_connections as usize / 2).max(1),
                config.providers.values().any(|p| {
                    p.spend.max_outstanding_frozen.is_some() || p.spend.max_running.is_some()
                }),
            ),
            pool,
            shutdown: Shutdown::default(),
            submits_in_flight: InFlight::default(),
            streams: Arc::new(tokio::sync::Semaphore::new(config.worker.max_streams)),
            unknown_profiles: std::sync::Mutex::default(),
        })
    }

    fn provider(&self, name: &str) -> Option<&Profile> {
        self.providers.get(name)
    }

    /// The configured profiles' names.
    pub fn provider_names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }

    /// The configured profiles whose provider replays a submit sent again
    /// with its idempotency key (a rescue takes their submits over at once).
    pub fn profiles_replaying_keys(&self) -> Vec<String> {
        self.providers
            .iter()
            .filter(|(_, p)| {
                p.client.submit_guard() == crate::providers::SubmitGuard::IdempotencyKey
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Which runs to claim now: every state of the profiles that are not
    /// paused, and the queued runs of profiles this worker does not have
    /// (to fail them `UNKNOWN_PROVIDER`, when so configured).
    pub fn claim_scope(&self) -> crate::store::ClaimScope {
        self.claim_scope_with_room().0
    }

    /// [`Engine::claim_scope`] without the profiles whose request rate is
    /// taken for now ([`Throttles::claim_room`]), and the soonest of those
    /// profiles' room (when the claim loop should look again).
    pub fn claim_scope_with_room(&self) -> (crate::store::ClaimScope, Option<Duration>) {
        use crate::lifecycle::RunState;
        let mut scope = crate::store::ClaimScope::default();
        let mut room_in: Option<Duration> = None;
        for profile in self.providers.keys() {
            // Half of what a step waits for its turn before it is deferred.
            if let Some(wait) = self.throttles.claim_room(profile, self.lease / 8) {
                room_in = Some(room_in.map_or(wait, |w| w.min(wait)));
                continue;
            }
            match self.pauses.kind(profile) {
                None => scope.add(
                    profile,
                    &[RunState::Queued, RunState::Submitting, RunState::Running],
                ),
                // Runs at the provider are followed; none is submitted.
                Some(kind) if !kind.stops_status_checks() => {
                    scope.add(profile, &[RunState::Submitting, RunState::Running])
                }
                Some(_) => {}
            }
        }
        if self.fail_unknown_providers {
            for profile in self.lock_unknown().iter() {
                scope.add(profile, &[RunState::Queued]);
            }
        }
        (scope, room_in)
    }

    /// Whether queued runs of profiles this worker does not have are
    /// failed (`worker.fail_unknown_providers`).
    pub fn fails_unknown_providers(&self) -> bool {
        self.fail_unknown_providers
    }

    /// Records which profiles have active runs (the claim loop reads them
    /// now and then), keeping those this worker does not have.
    pub fn saw_active_profiles(&self, profiles: Vec<String>) {
        let unknown = profiles
            .into_iter()
            .filter(|p| !self.providers.contains_key(p))
            .collect();
        *self.lock_unknown() = unknown;
    }

    fn lock_unknown(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A list replaced in one go: poison is harmless.
        self.unknown_profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

async fn handle(job: RunJob, engine: Data<Arc<Engine>>) -> Result<(), StepError> {
    let RunJob { run, slot, lease } = job;
    let _in_flight = engine.metrics.step_started();
    let result = run_step(engine.0.clone(), run, lease, slot).await;
    if let Err(e) = &result {
        tracing::warn!(error = %e, "step not recorded; the run returns when its lease expires (or at once if this worker is cut off and comes back)");
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
    run_worker_with_metrics(config, pool, Arc::default(), shutdown).await
}

/// [`run_worker`], recording into `metrics`, whose
/// [`bound_addr`](crate::metrics::Metrics::bound_addr) tells where
/// `[metrics] listen` serves (its port when the configured one is 0).
pub async fn run_worker_with_metrics<S>(
    config: &Config,
    pool: PgPool,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: S,
) -> Result<(), WorkerError>
where
    S: Future<Output = ()> + Send + 'static,
{
    let engine = Arc::new(Engine::with_metrics(config, pool.clone(), metrics)?);
    if config.providers.values().any(|p| p.spend.any()) {
        crate::store::check_timezone(&pool, &engine.budget_timezone)
            .await
            .map_err(|e| {
                WorkerError::Runtime(format!(
                    "worker.budget_timezone `{}` is not a time zone PostgreSQL knows: {e}",
                    engine.budget_timezone
                ))
            })?;
    }
    // `wfq.daily_costs` counts days in the zone the spend guard uses (a
    // zone PostgreSQL does not know would break the view: not stored).
    let known_zone = crate::store::check_timezone(&pool, &engine.budget_timezone).await;
    let stored = match known_zone {
        Ok(()) => crate::store::record_budget_timezone(&pool, &engine.budget_timezone).await,
        Err(e) => Err(e),
    };
    match stored {
        Ok(Some(other)) => tracing::warn!(
            budget_timezone = %engine.budget_timezone,
            previous = %other,
            "another worker stored a different worker.budget_timezone; workers should agree on the budget day"
        ),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not store worker.budget_timezone for wfq.daily_costs")
        }
    }
    let metrics_server = health::start(config, engine.clone()).await?;
    // `[web] listen`: the dashboard in the worker, on a pool of its own.
    let web_server = crate::web::start_for_worker(config, &pool)
        .await
        .map_err(WorkerError::Runtime)?;
    let fleet = FleetServices::start(config, &pool, &engine);
    let fetcher_config = FetcherConfig {
        concurrency: config.worker.concurrency,
        claim_batch: config.worker.claim_batch,
        fallback_poll: config.worker.fallback_poll,
    };
    let listener = config
        .worker
        .listen
        .then(|| tokio::spawn(wake::listen_for_new_runs(pool.clone(), engine.wake.clone())));
    // Before the claim loop starts: an operator's pause must hold from the
    // first claim on.
    account::read_manual_pauses_at_start(&engine).await;
    let profiles: Vec<String> = engine.providers.keys().cloned().collect();
    match crate::store::wake_unknown_cost_holds(&engine.pool, &profiles).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            runs = n,
            "runs held for an unknown cost are checked again at start"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not wake runs held for an unknown cost; they are checked again within 5 minutes")
        }
    }
    let prober = tokio::spawn(account::probe_paused_profiles(engine.clone()));
    let pruner = config
        .retention
        .clone()
        .map(|r| tokio::spawn(retention::prune_periodically(pool.clone(), r)));
    // Completion callbacks: stopped with the claim loop; the batch in flight
    // is finished and recorded.
    let (stop_callbacks, callbacks_stop) = tokio::sync::watch::channel(false);
    let callbacks = match &config.callbacks {
        Some(c) => Some(tokio::spawn(crate::callbacks::deliver_callbacks(
            pool.clone(),
            c.clone(),
            config.worker.id.clone(),
            config.worker.listen,
            callbacks_stop,
        ))),
        None => {
            tokio::spawn(crate::callbacks::warn_if_undelivered(pool.clone()));
            None
        }
    };
    // Media outputs copied to [storage], when configured.
    let output_types: crate::files::mirror::OutputTypes = {
        let engine = engine.clone();
        Arc::new(move |profile: String, workflow: String| {
            let engine = engine.clone();
            Box::pin(async move {
                let p = engine.provider(&profile)?;
                let manifest = engine
                    .manifests
                    .get(&profile, &p.client, &workflow, p.manifest_ttl)
                    .await
                    .ok()??;
                Some(manifest.output_types.clone())
            })
        })
    };
    let media = crate::files::mirror::MirrorService::start(
        &pool,
        engine.uploads.storage(),
        &config.worker.id,
        config.worker.listen,
        engine.metrics.clone(),
        Some(output_types),
    );
    // A pause recorded by an earlier process says nothing about this one's
    // keys; it is recorded again if this process is refused too.
    for profile in engine.provider_names() {
        if let Err(e) = crate::store::resume_provider(&pool, &profile).await {
            tracing::warn!(error = %e, "could not clear recorded pauses");
        }
    }

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

    let metrics = engine.metrics.clone();
    let stopping = engine.clone();
    let result = monitor
        .run_with_signal(async move {
            shutdown.await;
            stopping.shutdown.begin();
            metrics.shutting_down();
            let _ = stop_callbacks.send(true);
            tracing::info!("shutting down: no new claims; waiting for steps in flight");
            Ok(())
        })
        .await;
    if let Some(listener) = listener {
        listener.abort();
    }
    prober.abort();
    if let Some(pruner) = pruner {
        pruner.abort();
    }
    if let (Some(mut task), Some(c)) = (callbacks, &config.callbacks) {
        // Normally done already: it stopped together with the claim loop.
        if tokio::time::timeout(c.timeout + Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    // A submit whose `submitting` is being recorded, or that was sent, is
    // finished before its lease is given back: released under it, a
    // `submitting` write could land after the release (a run in doubt for a
    // request nobody sent), and an answer would be recorded only by the
    // submit's token. Bounded: the request's own timeout and a database
    // write.
    let sent = engine.submits_in_flight.count();
    if sent > 0 {
        tracing::info!(
            submits = sent,
            "waiting for submits in flight to be answered and recorded"
        );
        let bound = config.http.timeout + Duration::from_secs(10);
        if tokio::time::timeout(bound, engine.submits_in_flight.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                submits = engine.submits_in_flight.count(),
                "submits still unrecorded after their timeout; their runs stay in doubt and are settled by the next worker"
            );
        }
    }
    match crate::store::release_leases(&engine.pool, &engine.worker_id).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(released = n, "gave back the leases of unfinished runs"),
        Err(e) => {
            tracing::warn!(error = %e, "could not give back leases; they expire by themselves")
        }
    }
    if let Some(media) = media {
        media.stop().await;
    }
    fleet.stop().await;
    if let Some(server) = metrics_server {
        server.stop().await;
    }
    if let Some(server) = web_server {
        server.stop().await;
    }
    tracing::info!("worker stopped");
    result.map_err(|e| WorkerError::Runtime(e.to_string()))
}
