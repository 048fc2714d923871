//! The dashboard on loopback against the test's database, a worker config
//! with local `[storage]`, and an HTTP client that keeps the CSRF cookie.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::PgPool;
use wfq::config::{Config, Environment};
use wfq::web::{ProfileInfo, WebServer, WebState};

pub struct Env(pub HashMap<String, String>);

impl Environment for Env {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// A worker configuration: chenyu (and a Dify profile) at `sim_url`,
/// outputs mirrored into `media`, `[web]` lines as given.
pub fn config(
    sim_url: &str,
    dify_url: &str,
    media: &std::path::Path,
    web: &str,
    env: &[(&str, &str)],
) -> Config {
    let text = format!(
        r#"
        [worker]
        id = "web-test-worker"
        concurrency = 16
        lease = "60s"
        fallback_poll = "250ms"
        shutdown_grace = "5s"
        [poll]
        initial = "50ms"
        max = "200ms"
        jitter = 0.1
        [submit]
        initial = "100ms"
        max = "400ms"
        max_attempts = 6
        [storage]
        url = "file://{}"
        initial = "50ms"
        max = "200ms"
        [web]
        {web}
        [providers.chenyu]
        kind = "chenyu"
        base_url = "{sim_url}"
        api_key_env = "TEST_CHENYU_KEY"
        daily_budget = "100"
        [providers.dify]
        kind = "dify"
        base_url = "{dify_url}"
        api_key_env = "TEST_CHENYU_KEY"
        "#,
        media.display()
    );
    let mut vars: HashMap<String, String> = HashMap::from([(
        "TEST_CHENYU_KEY".to_owned(),
        super::common::API_KEY.to_owned(),
    )]);
    for (k, v) in env {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    Config::from_toml(&text, "web test config", &Env(vars)).expect("test config is valid")
}

/// A running dashboard and a client for it.
pub struct Dash {
    pub base: String,
    pub server: WebServer,
    pub client: reqwest::Client,
    pub web_pool: PgPool,
}

/// Serves `config`'s `[web]` over the test's database.
pub async fn serve(pool: &PgPool, config: &Config) -> Dash {
    let web = config.web.clone().expect("[web] in the test config");
    let url = super::common::database_url(&pool.connect_options());
    let web_pool = wfq::web::connect(&url, web.statement_timeout, 4)
        .await
        .expect("web pool");
    let storage = config
        .storage
        .as_ref()
        .map(|s| wfq::files::Storage::open(s).expect("storage opens"));
    let state = Arc::new(WebState::new(
        &web,
        web_pool.clone(),
        ProfileInfo::of_config(config),
        storage,
    ));
    let server = WebServer::start("127.0.0.1:0".parse().unwrap(), state)
        .await
        .expect("dashboard binds");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Dash {
        base: format!("http://{}", server.addr),
        server,
        client,
        web_pool,
    }
}

/// A page's status and body.
pub struct Got {
    pub status: u16,
    pub body: String,
    pub headers: reqwest::header::HeaderMap,
}

impl Dash {
    pub async fn get(&self, path: &str) -> Got {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET answers");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        Got {
            status,
            headers,
            body: r.text().await.unwrap(),
        }
    }

    /// The CSRF token (the cookie and the hidden field carry the same).
    pub async fn csrf(&self) -> String {
        let page = self.get("/runs").await;
        page.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.strip_prefix("wfq_csrf="))
            .expect("the csrf cookie is set")
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    }

    /// POSTs `form`, with the CSRF cookie when `cookie` is given.
    pub async fn post(&self, path: &str, form: &[(&str, String)], cookie: Option<&str>) -> Got {
        let mut request = self.client.post(format!("{}{path}", self.base)).form(form);
        if let Some(token) = cookie {
            request = request.header("cookie", format!("wfq_csrf={token}"));
        }
        let r = request.send().await.expect("POST answers");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        Got {
            status,
            headers,
            body: r.text().await.unwrap(),
        }
    }
}
