//! Serving: the dashboard's database pool, the HTTP server, and its two
//! ways to run: `wfq web` on its own, or `[web]` inside a worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{ProfileInfo, RawWebConfig, WebState, router};

/// A pool for the dashboard: few connections, each with a
/// `statement_timeout` (a query gone wrong ends instead of loading the
/// database the workers use) and a short `lock_timeout` (an action never
/// queues behind a worker's row lock for long).
pub async fn connect(
    url: &str,
    statement_timeout: Duration,
    max_connections: u32,
) -> Result<PgPool, sqlx::Error> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    connect_with(options, statement_timeout, max_connections).await
}

/// [`connect`] with connection options (a worker's own, say).
pub async fn connect_with(
    options: sqlx::postgres::PgConnectOptions,
    statement_timeout: Duration,
    max_connections: u32,
) -> Result<PgPool, sqlx::Error> {
    let timeout_ms = statement_timeout.as_millis().max(1) as i64;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                sqlx::query(
                    "SELECT set_config('statement_timeout', $1, false), \
                            set_config('lock_timeout', '2s', false), \
                            set_config('application_name', 'wfq web', false)",
                )
                .bind(format!("{timeout_ms}ms"))
                .execute(conn)
                .await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
}

/// A running dashboard.
pub struct WebServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    join: tokio::task::JoinHandle<()>,
}

impl WebServer {
    /// Binds `listen` and serves `state` until [`WebServer::stop`].
    pub async fn start(listen: SocketAddr, state: Arc<WebState>) -> std::io::Result<WebServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(state);
        let join = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "the dashboard stopped serving");
            }
        });
        Ok(WebServer { addr, stop, join })
    }

    /// Stops serving (requests in flight finish first).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.join.await;
    }
}

/// The dashboard inside a worker (`[web]` in its configuration): a pool of
/// its own to the worker's database, the worker's profiles and storage.
pub async fn start_for_worker(
    config: &crate::config::Config,
    worker_pool: &PgPool,
) -> Result<Option<WebServer>, String> {
    let Some(web) = &config.web else {
        return Ok(None);
    };
    let options = (*worker_pool.connect_options()).clone();
    let pool = connect_with(options, web.statement_timeout, 3)
        .await
        .map_err(|e| format!("web: connecting to the database: {e}"))?;
    let storage = match &config.storage {
        Some(s) => Some(crate::files::Storage::open(s).map_err(|e| format!("web: {e}"))?),
        None => None,
    };
    let state = Arc::new(WebState::new(
        web,
        pool,
        ProfileInfo::of_config(config),
        storage,
    ));
    let server = WebServer::start(web.listen, state)
        .await
        .map_err(|e| format!("web.listen {}: {e}", web.listen))?;
    tracing::info!(addr = %server.addr, "dashboard at http://{}/", server.addr);
    Ok(Some(server))
}

/// Why `wfq web` could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebStartError {
    /// The configuration is wrong (or would expose the dashboard).
    #[error("{0}")]
    Config(String),
    /// The database could not be reached, or has no wfq schema.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The address could not be bound.
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
}

/// `wfq web`: the dashboard as a process of its own, configured by a
/// worker.toml's text (`[database]`, `[web]`, `[storage]`, the profiles'
/// kinds and limits; no provider key is read). `listen` and `read_only`
/// override `[web]`. Prints its address, serves until `shutdown`.
pub async fn run_standalone<S>(
    text: &str,
    origin: &str,
    env: &dyn crate::config::Environment,
    listen: Option<&str>,
    read_only: bool,
    shutdown: S,
) -> Result<(), WebStartError>
where
    S: std::future::Future<Output = ()>,
{
    let bad =
        |key: &str, message: String| WebStartError::Config(format!("{origin}: `{key}`: {message}"));
    let database = crate::config::DatabaseConfig::from_toml(text, origin, env)
        .map_err(|e| WebStartError::Config(e.to_string()))?;
    let table: toml::Table =
        toml::from_str(text).map_err(|e| WebStartError::Config(format!("{origin}: {e}")))?;
    let raw: RawWebConfig = match table.get("web") {
        None => RawWebConfig::default(),
        Some(v) => v
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| bad("web", e.message().to_owned()))?,
    };
    let mut config = raw.parse(env).map_err(|(key, m)| bad(&key, m))?;
    if let Some(listen) = listen {
        let addr: SocketAddr = listen.trim().parse().map_err(|_| {
            bad(
                "--listen",
                format!("`{listen}` is not an IP address with a port"),
            )
        })?;
        config = config.with_listen(addr).map_err(|m| bad("--listen", m))?;
    }
    config.read_only |= read_only;
    let profiles = ProfileInfo::of_toml(text, origin).map_err(WebStartError::Config)?;
    let storage = crate::files::cli::storage_from_toml(text, origin, env)
        .map_err(|e| WebStartError::Config(e.to_string()))?
        .map(|s| crate::files::Storage::open(&s))
        .transpose()
        .map_err(|e| WebStartError::Config(e.to_string()))?;
    let pool = connect(database.url.expose(), config.statement_timeout, 4).await?;
    sqlx::query("SELECT 1 FROM wfq.runs LIMIT 0")
        .execute(&pool)
        .await?;
    let state = Arc::new(WebState::new(&config, pool.clone(), profiles, storage));
    let server = WebServer::start(config.listen, state)
        .await
        .map_err(|e| WebStartError::Listen(config.listen, e))?;
    println!(
        "wfq dashboard at http://{}/{}",
        server.addr,
        if config.read_only { " (read-only)" } else { "" }
    );
    shutdown.await;
    server.stop().await;
    pool.close().await;
    Ok(())
}
