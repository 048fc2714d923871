//! `wfq web`: the dashboard. Server-rendered HTML (maud), a few lines of
//! vendored script that refresh live regions, assets embedded in the
//! binary. Pages: overview, runs, run, costs, providers, workers.
//!
//! Safe by default: loopback unless credentials are configured
//! ([`config`]), actions are POSTs with a CSRF token ([`csrf`]) and hidden
//! in read-only mode, user data is escaped everywhere, and no secret is
//! ever rendered. Cheap: every query is bounded and index-backed
//! ([`queries`]) and runs on a pool of its own with a `statement_timeout`.

pub mod actions;
pub mod auth;
pub mod config;
pub mod costs;
pub mod csrf;
pub mod layout;
pub mod media;
pub mod overview;
pub mod profiles;
pub mod providers;
pub mod queries;
pub mod run;
pub mod runs;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use config::{RawWebConfig, WebAuth, WebConfig};
pub use profiles::ProfileInfo;

/// What every handler reads.
pub struct WebState {
    /// The dashboard's own pool (with a `statement_timeout`).
    pub pool: PgPool,
    /// The configured provider profiles.
    pub profiles: Vec<ProfileInfo>,
    /// `[storage]`, to serve mirrored files.
    pub storage: Option<crate::files::Storage>,
    /// Actions hidden and refused.
    pub read_only: bool,
    /// Who may see the dashboard.
    pub auth: WebAuth,
    /// This process's CSRF token.
    pub csrf: csrf::CsrfToken,
    /// Who the dashboard's writes are recorded as (`provider_pauses.worker`).
    pub actor: String,
    /// The live regions as last rendered, shared by every open dashboard.
    pub live: LiveCache,
}

/// How long a live region's rendering is reused by every client: ten open
/// dashboards refreshing every 2 s cost one set of queries per 2 s, not ten.
pub const LIVE_REUSE: std::time::Duration = std::time::Duration::from_millis(1900);

/// The live regions' last renderings (a full page load always reads afresh).
pub struct LiveCache {
    /// `/fragments/overview`.
    pub overview: crate::metrics::cache::Cached<Result<String, String>>,
    /// `/fragments/providers`.
    pub providers: crate::metrics::cache::Cached<Result<String, String>>,
    /// `/fragments/workers`.
    pub workers: crate::metrics::cache::Cached<Result<String, String>>,
}

impl Default for LiveCache {
    fn default() -> Self {
        LiveCache {
            overview: crate::metrics::cache::Cached::new(LIVE_REUSE),
            providers: crate::metrics::cache::Cached::new(LIVE_REUSE),
            workers: crate::metrics::cache::Cached::new(LIVE_REUSE),
        }
    }
}

/// A live region from `cache`, rendered by `render` when it is older than
/// [`LIVE_REUSE`] (one caller renders; the others wait for its result).
pub async fn live_region<F, Fut>(
    cache: &crate::metrics::cache::Cached<Result<String, String>>,
    render: F,
) -> Result<maud::Markup, WebError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<maud::Markup, WebError>>,
{
    let rendered = cache
        .get(|| async {
            render()
                .await
                .map(maud::Markup::into_string)
                .map_err(|e| e.to_string())
        })
        .await;
    // Our own rendering, escaped when it was made.
    rendered
        .map(maud::PreEscaped)
        .map_err(WebError::Unavailable)
}

impl WebState {
    /// The state for `config`'s policy, reading through `pool`.
    pub fn new(
        config: &WebConfig,
        pool: PgPool,
        profiles: Vec<ProfileInfo>,
        storage: Option<crate::files::Storage>,
    ) -> WebState {
        WebState {
            pool,
            profiles,
            storage,
            read_only: config.read_only,
            auth: config.auth.clone(),
            csrf: csrf::CsrfToken::random(),
            actor: match &config.auth {
                WebAuth::Basic { user, .. } => format!("web:{user}"),
                _ => "web".to_owned(),
            },
            live: LiveCache::default(),
        }
    }

    /// The profile named `name`, when configured.
    pub fn profile(&self, name: &str) -> Option<&ProfileInfo> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// Names of the configured profiles.
    pub fn profile_names(&self) -> Vec<String> {
        self.profiles.iter().map(|p| p.name.clone()).collect()
    }

    /// Refuses an action in read-only mode or without the CSRF token.
    pub fn guard_action(
        &self,
        headers: &HeaderMap,
        form: &[(String, String)],
    ) -> Result<(), WebError> {
        if self.read_only {
            return Err(WebError::Forbidden(
                "the dashboard is read-only: actions are refused".into(),
            ));
        }
        let field = form
            .iter()
            .find(|(k, _)| k == csrf::FIELD)
            .map(|(_, v)| v.as_str());
        if !self.csrf.check(headers, field) {
            return Err(WebError::Forbidden(
                "the form's CSRF token is missing or stale: reload the page and try again".into(),
            ));
        }
        Ok(())
    }
}

/// Why a request failed; shown as a small page.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// A statement failed (or ran past the statement timeout).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// The request's parameters are wrong.
    #[error("{0}")]
    BadRequest(String),
    /// Not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// A live region could not be rendered lately (the reason, shared).
    #[error("{0}")]
    Unavailable(String),
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let status = match &self {
            WebError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
            WebError::NotFound(_) => StatusCode::NOT_FOUND,
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::Forbidden(_) => StatusCode::FORBIDDEN,
            WebError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if let WebError::Database(e) = &self {
            tracing::warn!(error = %e, "dashboard query failed");
        }
        let text = self.to_string();
        let body = maud::html! {
            (maud::DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { "wfq: " (status.as_u16()) }
                    link rel="stylesheet" href="/assets/app.css";
                }
                body {
                    main {
                        h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                        div.notice.bad { (text) }
                        p { a href="/" { "Back to the overview" } }
                    }
                }
            }
        };
        (status, body).into_response()
    }
}

/// The dashboard's routes, behind authentication and security headers.
pub fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(overview::page))
        .route("/fragments/overview", get(overview::fragment))
        .route("/runs", get(runs::page))
        .route("/runs/confirm", get(actions::confirm))
        .route("/runs/apply", post(actions::apply))
        .route("/runs/{id}", get(run::page))
        .route("/runs/{id}/live", get(run::fragment))
        .route("/runs/{id}/cancel", post(actions::cancel_one))
        .route("/runs/{id}/retry", post(actions::retry_one))
        .route("/files/{id}", get(media::serve_file))
        .route("/costs", get(costs::page))
        .route("/costs.csv", get(costs::csv))
        .route("/providers", get(providers::page))
        .route("/fragments/providers", get(providers::fragment))
        .route("/providers/{name}/pause", post(providers::pause))
        .route("/providers/{name}/resume", post(providers::resume))
        .route("/workers", get(workers::page))
        .route("/fragments/workers", get(workers::fragment))
        .route("/assets/app.css", get(css))
        .route("/assets/app.js", get(js))
        .fallback(|| async { WebError::NotFound("no such page".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), auth::require))
        .layer(middleware::from_fn_with_state(state.clone(), headers))
        .with_state(state)
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' http: https: data:; media-src 'self' http: https:; connect-src 'self'; \
    form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Security headers on every answer, and the CSRF cookie.
async fn headers(
    axum::extract::State(state): axum::extract::State<Arc<WebState>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    let status = response.status();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Run pages link to providers' media: their URLs say nothing to them.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    // The token goes only to those who may act (not with a 401).
    if status != StatusCode::UNAUTHORIZED
        && let Ok(cookie) = HeaderValue::from_str(&state.csrf.set_cookie())
    {
        h.append(header::SET_COOKIE, cookie);
    }
    response
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("assets/app.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("assets/app.js"),
    )
        .into_response()
}

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
