//! The worker's HTTP endpoints (`[metrics] listen`): `/metrics` in the
//! Prometheus text format, `/healthz` (the process answers) and `/readyz`
//! (the database answers and the claim loop is running).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{Engine, WorkerError};
use crate::config::Config;
use crate::metrics::ClaimLoop;
use crate::metrics::cache::Cached;
use crate::metrics::text::{CONTENT_TYPE, Exposition};

/// How long the database series of one scrape are reused, by every scrape
/// of this process: ten scrapers (or one scraping every second) cost one
/// set of queries per 5 s, and so does a database that does not answer.
/// Shorter than any sensible scrape interval, so a scrape every 15 s still
/// sees values read for it.
const CACHE_FOR: Duration = Duration::from_secs(5);
/// The longest `/readyz` waits for the database.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest `/metrics` waits for the database series.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

struct Served {
    engine: Arc<Engine>,
    /// The database series as written, or why they could not be read.
    cached: Cached<Result<String, String>>,
    /// A claim loop without a successful claim for this long is not ready.
    stale_after: Duration,
}

/// The running endpoints; [`MetricsServer::stop`] ends them.
pub(super) struct MetricsServer {
    stop: oneshot::Sender<()>,
    join: JoinHandle<()>,
}

/// Binds `[metrics] listen` (when configured) and serves the endpoints
/// until stopped. The bound address is published through
/// [`crate::metrics::Metrics::bound_addr`].
pub(super) async fn start(
    config: &Config,
    engine: Arc<Engine>,
) -> Result<Option<MetricsServer>, WorkerError> {
    let Some(metrics) = &config.metrics else {
        return Ok(None);
    };
    let bind_error = |source| WorkerError::Metrics {
        listen: metrics.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(metrics.listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    // The loop sleeps at most `fallback_poll` between claims; a claim may
    // wait for a pooled connection (10 s) before it fails.
    let stale_after = config.worker.fallback_poll * 2 + Duration::from_secs(30);
    let served = Arc::new(Served {
        engine: engine.clone(),
        cached: Cached::new(CACHE_FOR),
        stale_after,
    });
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(served);
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.await;
        });
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    engine.metrics.declare_providers(&engine.provider_names());
    engine.metrics.set_bound_addr(addr);
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(Some(MetricsServer { stop, join }))
}

impl MetricsServer {
    /// Stops serving (open scrapes get a moment to finish).
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let mut join = self.join;
        if tokio::time::timeout(Duration::from_secs(2), &mut join)
            .await
            .is_err()
        {
            join.abort();
        }
    }
}

async fn metrics_text(State(served): State<Arc<Served>>) -> Response {
    let engine = &served.engine;
    let mut out = Exposition::new();
    engine.metrics.encode(&mut out);
    super::metrics::encode_pool(&mut out, &engine.pool);
    super::metrics::encode_profiles(&mut out, engine);
    match database_series(&served).await {
        Ok(text) => out.append(&text),
        Err(reason) => out.comment(&format!(
            "wfq_runs and wfq_outstanding_frozen unavailable: {reason}"
        )),
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], out.finish()).into_response()
}

/// The series read from the database, reused for [`CACHE_FOR`]; parallel
/// scrapes wait for one read.
async fn database_series(served: &Served) -> Result<String, String> {
    served
        .cached
        .get(|| read_database_series(&served.engine))
        .await
}

async fn read_database_series(engine: &Engine) -> Result<String, String> {
    let configured = engine.provider_names();
    let query = super::metrics::encode_database(&engine.pool, &configured);
    let read = match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {QUERY_TIMEOUT:?}")),
    };
    // Once per failed read, not once per scrape that reuses the failure.
    if let Err(reason) = &read {
        tracing::warn!(%reason, "metrics: could not read wfq_runs and wfq_outstanding_frozen");
    }
    read
}

async fn readyz(State(served): State<Arc<Served>>) -> (StatusCode, String) {
    let engine = &served.engine;
    let not_ready = |reason: String| (StatusCode::SERVICE_UNAVAILABLE, reason + "\n");
    let claim_loop = engine.metrics.claim_loop();
    if claim_loop == ClaimLoop::Stopping {
        return not_ready("shutting down".into());
    }
    match tokio::time::timeout(PING_TIMEOUT, crate::store::ping(&engine.pool)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return not_ready(format!("database: {e}")),
        Err(_) => return not_ready(format!("database: no answer within {PING_TIMEOUT:?}")),
    }
    match claim_loop {
        ClaimLoop::NotYet => not_ready("claim loop: no successful claim yet".into()),
        ClaimLoop::LastClaim(ago) if ago > served.stale_after => not_ready(format!(
            "claim loop: last successful claim {}s ago",
            ago.as_secs()
        )),
        _ => (StatusCode::OK, "ready\n".into()),
    }
}
