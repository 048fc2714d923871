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
pub mod serve;
pub mod workers;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sqlx::PgPool;

pub use config::{RawWebConfig, WebAuth, WebConfig};
pub use profiles::ProfileInfo;
pub use serve::{
    WebServer, WebStartError, connect, connect_with, run_standalone, start_for_worker,
};

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
