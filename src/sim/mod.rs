//! A stateful simulator of the chenyu open API v2, and of the Dify and
//! GPTBots workflow APIs, for developing and testing against without
//! spending money.
//!
//! It serves `market/info`, `run/submit`, `run/info` and `run/execution`
//! under `/api/open/v2` with the documented shapes, freezes the quote once
//! per idempotency key, settles runs on a clock (`SimConfig`), and keeps a
//! ledger that proves nobody was charged twice. Faults (5xx, 429, lost
//! submit answers, latency) are injected on demand through [`Faults`], in
//! process or via the `/_sim/*` admin endpoints, and so is the push-back a
//! real provider gives: a per-key rate limit, a cap on runs at once,
//! hostile answers, and hold gates that keep requests waiting until a test
//! lets them go. An account balance (chenyu freezes, GPTBots credits) is
//! kept apart from the faults (`SimServer::set_balance`).
//!
//! On the same server: Dify's service API under `/dify/{app}/v1` (module
//! `dify`) and GPTBots' under `/gptbots/{workflow}` (module `gptbots`),
//! sharing the clock, the faults, the stats and the key check (`gate`),
//! each with its own ledger.
//!
//! Module map: `catalog` (published workflows), `inputs` (input
//! validation), `money` (amounts and settlement), `timeline` (phase at a
//! given time), `run` (run records, ledger entries), `state` (shared state
//! and stats), `faults`, `balance` (the account), `hold` (hold gates),
//! `hostile` (the hostile-answer corpus), `limits` (rate limit
//! and run cap), `submit` (the submit decision), `views` (answer
//! bodies), `envelope` (response envelopes), `api` and `admin` (routes),
//! `media` (output files served at their links, which expire) and
//! `uploads` (chenyu `POST /assets`, Dify `POST /files/upload`).

mod admin;
mod api;
mod balance;
mod catalog;
mod dify;
mod envelope;
mod faults;
mod gate;
mod gptbots;
mod hold;
mod hostile;
mod inputs;
mod limits;
mod media;
mod money;
mod run;
mod state;
mod submit;
mod timeline;
mod uploads;
mod views;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use rust_decimal::Decimal;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use dify::DifyLedgerEntry;
pub use faults::Faults;
pub use gptbots::GptbotsLedgerEntry;
pub use limits::RateLimitMode;
pub use run::LedgerEntry;
pub use state::SimStats;
pub use uploads::UploadEntry;

/// A small generated PNG (the simulator's image outputs), e.g. for the demo.
pub fn sample_png(seed: u64) -> Vec<u8> {
    media::png(seed)
}

use state::Shared;
use timeline::Timing;

/// Where the open API is mounted, as on the real host.
const API_PREFIX: &str = "/api/open/v2";

/// How the simulated runs behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// How long a new run stays `queued`.
    pub queue_time: Duration,
    /// Then `running` for this long, then `succeeded` or `failed`.
    pub run_time: Duration,
    /// Settlement happens this long after the run ends.
    pub settle_delay: Duration,
    /// The accepted API key; `None` accepts any non-empty bearer token.
    pub api_key: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            queue_time: Duration::from_millis(500),
            run_time: Duration::from_secs(2),
            settle_delay: Duration::from_millis(500),
            api_key: None,
        }
    }
}

/// A running simulator. Dropping it stops the server too, but without
/// waiting; prefer [`SimServer::shutdown`].
#[derive(Debug)]
pub struct SimServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl SimServer {
    /// Binds `addr` (port 0 picks a free port) and serves in a background task.
    pub async fn start(addr: SocketAddr, config: SimConfig) -> std::io::Result<SimServer> {
        let timing = Timing {
            queue: config.queue_time,
            run: config.run_time,
            settle: config.settle_delay,
        };
        let shared = Arc::new(Shared::new(timing, config.api_key));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            // Either an explicit stop or the sender being dropped ends it.
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "chenyu simulator stopped with an error");
            }
        });
        tracing::info!(%local_addr, "chenyu simulator listening");
        Ok(SimServer {
            shared,
            local_addr,
            stop: Some(stop),
            task,
        })
    }

    /// The API base URL, e.g. `http://127.0.0.1:PORT/api/open/v2`.
    pub fn base_url(&self) -> String {
        format!("{}{API_PREFIX}", self.root_url())
    }

    /// The Dify API base URL of `app`: `http://ADDR/dify/{app}/v1`.
    pub fn dify_base_url(&self, app: &str) -> String {
        format!("{}/dify/{app}/v1", self.root_url())
    }

    /// The GPTBots base URL of `workflow`: `http://ADDR/gptbots/{workflow}`
    /// (the client appends `/v1/workflow/invoke`, as after the real host).
    pub fn gptbots_base_url(&self, workflow: &str) -> String {
        format!("{}/gptbots/{workflow}", self.root_url())
    }

    /// `http://ADDR`, with a wildcard bind replaced by loopback.
    fn root_url(&self) -> String {
        let mut addr = self.local_addr;
        // A wildcard bind is reachable on loopback; clients cannot dial 0.0.0.0.
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        format!("http://{addr}")
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The ledger, one entry per idempotency key, sorted by `run_order_id`.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.shared.ledger()
    }

    /// The Dify ledger, one entry per run created, in creation order.
    pub fn dify_ledger(&self) -> Vec<DifyLedgerEntry> {
        dify::ledger(&self.shared)
    }

    /// The GPTBots ledger, one entry per run created, in creation order.
    pub fn gptbots_ledger(&self) -> Vec<GptbotsLedgerEntry> {
        gptbots::ledger(&self.shared)
    }

    /// When each accepted submit arrived (wall clock), by idempotency key:
    /// the end of the pick-up path that `wfq bench` measures.
    pub fn submit_arrivals(
        &self,
    ) -> std::collections::HashMap<String, chrono::DateTime<chrono::Utc>> {
        self.shared
            .lock()
            .runs
            .values()
            .map(|run| (run.idempotency_key.clone(), run.created_at))
            .collect()
    }

    /// Every file uploaded (chenyu `POST /assets`, Dify `POST
    /// /files/upload`), in arrival order.
    pub fn uploads(&self) -> Vec<UploadEntry> {
        self.shared.lock().uploads.clone()
    }

    /// A snapshot of the request counters.
    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// The current faults, with counters as far as they have been consumed.
    pub fn faults(&self) -> Faults {
        self.shared.lock().faults.clone()
    }

    /// Replaces the faults. Turning a hold knob off releases every request
    /// waiting at that hold at once.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// Sets the account balance (`None`: unlimited, the default). Kept
    /// apart from the faults: `set_faults` never changes it.
    pub fn set_balance(&self, balance: Option<Decimal>) {
        self.shared.set_balance(balance);
    }

    /// The balance now, after every settlement and run end that is due.
    pub fn balance(&self) -> Option<Decimal> {
        self.shared.balance()
    }

    /// Adds `amount` to the balance and returns the new one; an unlimited
    /// account stays unlimited (`None`).
    pub fn top_up(&self, amount: Decimal) -> Option<Decimal> {
        self.shared.top_up(amount)
    }

    /// Returns once at least `n` requests (or Dify streams) are waiting at
    /// a hold (`Faults::hold_submits`, `hold_status_checks`,
    /// `hold_streams`): woken by the waiters themselves, never by polling.
    pub async fn wait_until_held(&self, n: u64) {
        self.shared.holds.until_waiting(n).await;
    }

    /// Stops accepting connections, lets open ones finish, and waits for
    /// the server task.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await {
            tracing::error!(error = %e, "chenyu simulator task failed");
        }
    }
}

/// The whole application: each API under its prefix, admin at the root.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .nest(API_PREFIX, api::routes(Arc::clone(&shared)))
        .nest("/dify/{app}/v1", dify::routes(Arc::clone(&shared)))
        .nest("/gptbots/{workflow}", gptbots::routes(Arc::clone(&shared)))
        .merge(media::routes(Arc::clone(&shared)))
        .merge(admin::routes(shared))
        .fallback(|| async { envelope::plain(StatusCode::NOT_FOUND, "not found") })
}
