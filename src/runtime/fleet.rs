//! The worker's part in the fleet, started and ended together: its row in
//! `wfq.workers` with its liveness session, the renewal of its steps'
//! leases, and the rescuer that makes the runs of workers that are gone
//! due at once.

use std::sync::Arc;

use chrono::Utc;
use sqlx::PgPool;
use tokio::task::JoinHandle;

use super::Engine;
use super::leases::renew_periodically;
use super::registry::{Registry, RegistryConfig, host_name};
use super::rescuer::{RescuerConfig, rescue_periodically, submit_grace};
use crate::config::Config;
use crate::store::WorkerInfo;

/// A background task that ends when this is dropped.
#[derive(Debug)]
struct Background(JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The fleet services of one worker process. Dropped without
/// [`FleetServices::stop`] (the worker's task aborted), they end as a crash
/// would: the liveness session closes and the other workers take over.
#[derive(Debug)]
pub struct FleetServices {
    registry: Registry,
    _renewal: Background,
    _rescuer: Background,
}

impl FleetServices {
    /// Starts them for `engine`'s worker.
    pub fn start(config: &Config, pool: &PgPool, engine: &Arc<Engine>) -> FleetServices {
        let info = WorkerInfo {
            id: engine.worker_id.clone(),
            host: host_name(),
            pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: Utc::now(),
            profiles: config.providers.keys().cloned().collect(),
            concurrency: i32::try_from(config.worker.concurrency).unwrap_or(i32::MAX),
        };
        let registry = Registry::start(
            pool,
            info,
            config.worker.session_liveness,
            engine.liveness.clone(),
            engine.leases.clone(),
            RegistryConfig::default(),
        );
        let renewal = Background(tokio::spawn(renew_periodically(
            pool.clone(),
            engine.worker_id.clone(),
            engine.leases.clone(),
        )));
        let rescuer = Background(tokio::spawn(rescue_periodically(
            pool.clone(),
            engine.worker_id.clone(),
            RescuerConfig {
                every: config.worker.rescue_every,
                forget_dead_after: config.worker.forget_dead_after,
                lease: config.worker.lease,
                submit_grace: submit_grace(config.http.timeout),
                replaying_profiles: engine.profiles_replaying_keys(),
            },
            engine.liveness.clone(),
            engine.wake.clone(),
        )));
        FleetServices {
            registry,
            _renewal: renewal,
            _rescuer: rescuer,
        }
    }

    /// Graceful end, once the worker has given its leases back: renewal and
    /// rescuer stop, the row says `stopped`, the session closes.
    pub async fn stop(self) {
        let FleetServices {
            registry,
            _renewal,
            _rescuer,
        } = self;
        drop((_renewal, _rescuer));
        registry.stop().await;
    }
}
