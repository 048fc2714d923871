//! `worker.toml` plus the environment, turned into a typed, validated [`Config`].
//!
//! Everything is checked here, at the edge, so the rest of wfq never sees a
//! duration it has to parse or a provider profile that might be half filled.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::backoff::{PollPolicy, RetryPolicy};
pub use crate::metrics::MetricsConfig;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path that was tried.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The path of the file.
        path: String,
        /// What the TOML parser said, with line and column.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        /// The path of the file.
        path: String,
        /// The dotted key that is wrong, e.g. `poll.multiplier`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A secret named by the file is missing from the environment.
    #[error(
        "provider profile `{profile}`: environment variable {variable} is not set (it holds the API key; secrets never live in worker.toml)"
    )]
    MissingSecret {
        /// The provider profile.
        profile: String,
        /// The environment variable that was read.
        variable: String,
    },
    /// `[callbacks]` names a secret that is missing from the environment.
    #[error(
        "[callbacks]: environment variable {variable} is not set (it holds the HMAC secret that signs callbacks; callbacks are never sent unsigned)"
    )]
    MissingCallbackSecret {
        /// The environment variable that was read.
        variable: String,
    },
}

/// The whole, validated configuration of a wfq process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the queue lives.
    pub database: DatabaseConfig,
    /// How one worker process claims and runs work.
    pub worker: WorkerConfig,
    /// How submits are retried when the answer is unclear.
    pub submit: RetryPolicy,
    /// The durable poll schedule.
    pub poll: PollPolicy,
    /// HTTP client limits shared by every provider call.
    pub http: HttpConfig,
    /// Periodic deletion of old finished runs (off unless configured).
    pub retention: Option<RetentionConfig>,
    /// `/metrics`, `/healthz` and `/readyz` (no server unless configured).
    pub metrics: Option<MetricsConfig>,
    /// Delivery of completion callbacks (off unless configured).
    pub callbacks: Option<CallbacksConfig>,
    /// Where files are kept: mirrored outputs, CLI input files (off unless configured).
    pub storage: Option<crate::files::StorageConfig>,
    /// The dashboard served by the worker (`[web]`; off unless configured).
    pub web: Option<crate::web::WebConfig>,
    /// Provider profiles by name (the value of `wfq.runs.provider`).
    pub providers: BTreeMap<String, ProviderProfile>,
}

/// Database settings.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Connection URL (never logged: it may carry a password).
    pub url: DatabaseUrl,
    /// Pool size of one process.
    pub max_connections: u32,
}

/// A database URL that prints without its password.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url_password(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url_password(&self.0))
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`; a
/// password in the query string (`?password=`) is masked too. Text that is
/// not a URL (a libpq key/value string) is masked wholesale after `password=`.
fn redact_url_password(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return match url.find("password=") {
            Some(at) => format!("{}password=***", &url[..at]),
            None => url.to_owned(),
        };
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    let secret =
        |k: &str| k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword");
    if parsed.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // `***` is percent-encoded by the URL writer; show it plainly.
    parsed.to_string().replace("%2A%2A%2A", "***")
}

/// Settings of the claim loop and the apalis worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Runs handled at once by one process.
    pub concurrency: usize,
    /// Most runs claimed by one statement.
    pub claim_batch: usize,
    /// How long a claim is valid unless renewed; renewed every third of it
    /// while a step works on the run, so it only ends for a worker that
    /// cannot renew (frozen, cut off, or gone without session liveness).
    pub lease: Duration,
    /// Longest sleep between claims when no notification arrives.
    pub fallback_poll: Duration,
    /// How long in-flight steps may run after SIGTERM before their leases are released.
    pub shutdown_grace: Duration,
    /// Subscribe to `LISTEN wfq_runs_due` (turn off behind PgBouncer in transaction mode).
    pub listen: bool,
    /// Fail queued runs that name a provider profile this worker does not
    /// have (`UNKNOWN_PROVIDER`). Turn off when separate worker fleets serve
    /// separate profiles. Runs already submitted are never touched by a
    /// worker without their profile.
    pub fail_unknown_providers: bool,
    /// First wait before probing a provider profile paused by a 401/403;
    /// doubles up to 5 minutes while the key is still refused.
    pub auth_probe: Duration,
    /// The name written to `lease_owner`; unique per process.
    pub id: String,
    /// The zone whose midnight starts a `daily_budget` day (any name
    /// PostgreSQL knows, e.g. `UTC`, `Asia/Shanghai`).
    pub budget_timezone: String,
    /// How often a run held back by a spend limit is checked again.
    pub budget_recheck: Duration,
    /// Hold a database session of its own with an advisory lock, so that
    /// the other workers see at once when this process is gone (`false`
    /// behind a pooler in transaction mode: its runs then come back when
    /// their leases end).
    pub session_liveness: bool,
    /// How often this worker looks for workers whose session is gone.
    pub rescue_every: Duration,
    /// Rows of `wfq.workers` dead for this long are deleted.
    pub forget_dead_after: Duration,
    /// Dify run streams read at once by one process (each an open
    /// connection and a task, not a slot of `concurrency`); a run beyond
    /// it is followed by status checks.
    pub max_streams: usize,
}

/// HTTP client limits.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Whole-request timeout of every provider call.
    pub timeout: Duration,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// `http.max_string_bytes`: longest provider string stored whole; longer
    /// ones are cut with a marker naming their size and SHA-256.
    pub max_string_bytes: usize,
    /// `http.max_answer_bytes`: most of a body read (a longer answer is
    /// unclear) and largest provider value stored.
    pub max_answer_bytes: usize,
    /// `http.max_depth`: deepest nesting of a provider value kept.
    pub max_depth: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_string_bytes: 1 << 20,
            max_answer_bytes: 16 << 20,
            max_depth: 64,
        }
    }
}

impl HttpConfig {
    /// The deepest `http.max_depth`: serde_json refuses more than 127 levels,
    /// and the worker wraps provider values in a few levels of its own.
    pub const MAX_DEPTH_LIMIT: usize = 100;

    /// Checks the answer limits; `Err((key, why))`.
    fn check_answer_limits(&self) -> Result<(), (&'static str, String)> {
        // A cut string ends with a marker of about 100 bytes, which must fit.
        if self.max_string_bytes < 1024 {
            return Err(("http.max_string_bytes", "must be at least 1024".into()));
        }
        if self.max_answer_bytes < self.max_string_bytes {
            return Err((
                "http.max_answer_bytes",
                format!(
                    "must be at least http.max_string_bytes ({})",
                    self.max_string_bytes
                ),
            ));
        }
        if !(8..=Self::MAX_DEPTH_LIMIT).contains(&self.max_depth) {
            return Err((
                "http.max_depth",
                format!("must be between 8 and {}", Self::MAX_DEPTH_LIMIT),
            ));
        }
        Ok(())
    }
}

/// `[retention]`: the worker deletes old finished runs now and then.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Finished runs older than this are deleted (with their events).
    pub finished_before: Duration,
    /// How often the worker prunes.
    pub every: Duration,
    /// Rows per statement.
    pub batch: i64,
}

/// `[callbacks]`: the worker POSTs finished runs to their `callback_url`.
#[derive(Debug, Clone)]
pub struct CallbacksConfig {
    /// The HMAC-SHA256 key that signs every callback (redacted in Debug output).
    pub secret: ApiKey,
    /// Attempts and the durable schedule between them.
    pub retry: RetryPolicy,
    /// Whole-request timeout of one attempt.
    pub timeout: Duration,
    /// Callbacks delivered at once by one process.
    pub concurrency: usize,
    /// Of those, at most this many to one receiver (scheme, host and port),
    /// so a receiver that hangs until `timeout` holds only its share.
    pub per_receiver: usize,
}

/// Which API a provider profile speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// chenyu open API v2.
    Chenyu,
    /// Dify workflow service API (one app per profile: its key picks the app).
    Dify,
    /// GPTBots workflow API (one workflow per profile: its key picks it).
    Gptbots,
}

impl ProviderKind {
    /// Reads a profile's `kind`.
    pub fn parse(kind: &str) -> Result<ProviderKind, String> {
        match kind {
            "chenyu" => Ok(ProviderKind::Chenyu),
            "dify" => Ok(ProviderKind::Dify),
            "gptbots" => Ok(ProviderKind::Gptbots),
            other => Err(format!(
                "unknown provider kind `{other}` (expected chenyu, dify or gptbots)"
            )),
        }
    }

    /// Only the kinds of the `[providers.*]` profiles, for commands that
    /// need no provider secrets (`wfq cancel` asks which can stop runs).
    pub fn of_profiles(
        text: &str,
        origin: &str,
    ) -> Result<BTreeMap<String, ProviderKind>, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        raw.providers
            .into_iter()
            .map(|(name, profile)| {
                let kind =
                    ProviderKind::parse(&profile.kind).map_err(|message| ConfigError::Invalid {
                        path: origin.to_owned(),
                        key: format!("providers.{name}.kind"),
                        message,
                    })?;
                Ok((name, kind))
            })
            .collect()
    }
}

/// One `[providers.NAME]` table, with its secret read from the environment.
#[derive(Debug, Clone)]
pub struct ProviderProfile {
    /// The API it speaks.
    pub kind: ProviderKind,
    /// Base URL, without a trailing slash.
    pub base_url: String,
    /// The API key (redacted in Debug output).
    pub api_key: ApiKey,
    /// How long a workflow's parameter manifest is cached.
    pub manifest_ttl: Duration,
    /// Dify: how long after a submit whose answer was lost its run may take
    /// to show up in the logs; only then is the submit sent again.
    pub find_window: Duration,
    /// How long a run of the app can take at most (Dify; its
    /// `WORKFLOW_MAX_EXECUTION_TIME` plus queueing): `find_window` must be
    /// longer.
    pub max_run_time: Duration,
    /// How often a lost submit whose run cannot be found is sent again
    /// before the run fails `SUBMIT_OUTCOME_UNKNOWN` (Dify).
    pub max_resubmits: u32,
    /// Money limits (the spend guard).
    pub spend: crate::spend::SpendLimits,
    /// Most provider requests per second from one worker process.
    pub requests_per_second: Option<f64>,
    /// Most submit requests in flight at once from one worker process.
    pub max_submits_in_flight: Option<usize>,
    /// Refusal codes that are about the account, not the run: the run
    /// waits and the profile pauses instead of the run failing.
    pub account_refusals: Vec<String>,
    /// First probe of a profile paused for its account (balance, quota, a
    /// breaker); a balance probe keeps this interval.
    pub account_probe: Duration,
    /// When an unlisted refusal code counts as the account's.
    pub breaker: crate::runtime::BreakerConfig,
}

/// A provider API key. It has no `Display`, and `Debug` prints `***`, so it
/// cannot end up in a log line or an error by accident.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a secret.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The secret itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    worker: RawWorker,
    #[serde(default)]
    submit: RawSubmit,
    #[serde(default)]
    poll: RawPoll,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    retention: Option<RawRetention>,
    #[serde(default)]
    metrics: Option<crate::metrics::RawMetricsConfig>,
    callbacks: Option<RawCallbacks>,
    #[serde(default)]
    storage: Option<crate::files::RawStorageConfig>,
    #[serde(default)]
    web: Option<crate::web::RawWebConfig>,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    finished_before: String,
    every: Option<String>,
    batch: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCallbacks {
    secret_env: String,
    max_attempts: Option<u32>,
    initial: Option<String>,
    max: Option<String>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
    timeout: Option<String>,
    concurrency: Option<usize>,
    per_receiver: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    max_connections: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    concurrency: Option<usize>,
    claim_batch: Option<usize>,
    lease: Option<String>,
    fallback_poll: Option<String>,
    shutdown_grace: Option<String>,
    listen: Option<bool>,
    fail_unknown_providers: Option<bool>,
    auth_probe: Option<String>,
    id: Option<String>,
    budget_timezone: Option<String>,
    budget_recheck: Option<String>,
    max_streams: Option<usize>,
    session_liveness: Option<bool>,
    rescue_every: Option<String>,
    forget_dead_after: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSubmit {
    max_attempts: Option<u32>,
    initial: Option<String>,
    max: Option<String>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPoll {
    initial: Option<String>,
    max: Option<String>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
    deadline: Option<String>,
    unknown_status_limit: Option<String>,
    settle_wait: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    timeout: Option<String>,
    connect_timeout: Option<String>,
    max_string_bytes: Option<usize>,
    max_answer_bytes: Option<usize>,
    max_depth: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: String,
    base_url: String,
    api_key_env: String,
    manifest_ttl: Option<String>,
    find_window: Option<String>,
    max_run_time: Option<String>,
    max_resubmits: Option<u32>,
    max_outstanding_frozen: Option<RawAmount>,
    daily_budget: Option<RawAmount>,
    unknown_cost: Option<RawAmount>,
    requests_per_second: Option<f64>,
    max_submits_in_flight: Option<usize>,
    max_running: Option<u32>,
    account_refusals: Option<Vec<String>>,
    account_probe: Option<String>,
    breaker_runs: Option<usize>,
    breaker_workflows: Option<usize>,
    breaker_window: Option<String>,
}

/// A money amount in TOML: a string (`"12.50"`) or a whole number. A TOML
/// float is refused: it cannot hold money exactly.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAmount {
    Text(String),
    Whole(i64),
    Float(f64),
}

impl RawAmount {
    fn parse(&self) -> Result<rust_decimal::Decimal, String> {
        let text = match self {
            RawAmount::Text(text) => text.trim().to_owned(),
            RawAmount::Whole(n) => n.to_string(),
            RawAmount::Float(f) => {
                return Err(format!(
                    "write amounts as strings, e.g. \"{f}\" (a TOML float cannot hold money exactly)"
                ));
            }
        };
        match text.parse::<rust_decimal::Decimal>() {
            Ok(d) if d >= rust_decimal::Decimal::ZERO => Ok(d),
            Ok(_) => Err(format!("`{text}` is negative")),
            Err(_) => Err(format!("`{text}` is not a decimal amount")),
        }
    }
}

/// The default database when neither the file nor the environment names one.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/wfq";

/// Reads environment variables; a seam so tests need not touch the real environment.
pub trait Environment {
    /// The variable's value, when set and valid UTF-8.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl DatabaseConfig {
    /// Only the `[database]` part of a document, for commands that need no
    /// provider (and so no provider secrets): migrate, enqueue, list, ...
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: &dyn Environment,
    ) -> Result<DatabaseConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        Ok(database_config(raw.database, env))
    }
}

fn database_config(raw: RawDatabase, env: &dyn Environment) -> DatabaseConfig {
    let url = env
        .var("WFQ_DATABASE_URL")
        .or_else(|| env.var("DATABASE_URL"))
        .or(raw.url)
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    DatabaseConfig {
        url: DatabaseUrl::new(url),
        max_connections: raw.max_connections.unwrap_or(10),
    }
}

impl Config {
    /// Loads `path` and the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string(), &ProcessEnvironment)
    }

    /// Parses a TOML document; `origin` names it in error messages.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: &dyn Environment,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        let duration = |key: &str, value: &Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(text) => parse_duration(text).map_err(|m| invalid(key, m)),
        };

        let database = database_config(raw.database, env);
        if database.max_connections < 2 {
            return Err(invalid(
                "database.max_connections",
                "must be at least 2 (one for LISTEN, one for claims)".into(),
            ));
        }

        let concurrency = raw.worker.concurrency.unwrap_or(64);
        if concurrency == 0 {
            return Err(invalid("worker.concurrency", "must be at least 1".into()));
        }
        let defaults = HttpConfig::default();
        let http = HttpConfig {
            timeout: duration("http.timeout", &raw.http.timeout, defaults.timeout)?,
            connect_timeout: duration(
                "http.connect_timeout",
                &raw.http.connect_timeout,
                defaults.connect_timeout,
            )?,
            max_string_bytes: raw
                .http
                .max_string_bytes
                .unwrap_or(defaults.max_string_bytes),
            max_answer_bytes: raw
                .http
                .max_answer_bytes
                .unwrap_or(defaults.max_answer_bytes),
            max_depth: raw.http.max_depth.unwrap_or(defaults.max_depth),
        };
        http.check_answer_limits()
            .map_err(|(key, message)| invalid(key, message))?;
        let worker = WorkerConfig {
            concurrency,
            claim_batch: raw
                .worker
                .claim_batch
                .unwrap_or(concurrency.min(100))
                .max(1),
            lease: duration("worker.lease", &raw.worker.lease, Duration::from_secs(120))?,
            fallback_poll: duration(
                "worker.fallback_poll",
                &raw.worker.fallback_poll,
                Duration::from_secs(5),
            )?,
            shutdown_grace: duration(
                "worker.shutdown_grace",
                &raw.worker.shutdown_grace,
                Duration::from_secs(30),
            )?,
            listen: raw.worker.listen.unwrap_or(true),
            fail_unknown_providers: raw.worker.fail_unknown_providers.unwrap_or(true),
            auth_probe: duration(
                "worker.auth_probe",
                &raw.worker.auth_probe,
                Duration::from_secs(30),
            )?,
            id: raw.worker.id.unwrap_or_else(default_worker_id),
            budget_timezone: raw
                .worker
                .budget_timezone
                .unwrap_or_else(|| "UTC".to_owned()),
            budget_recheck: duration(
                "worker.budget_recheck",
                &raw.worker.budget_recheck,
                Duration::from_secs(30),
            )?,
            max_streams: match raw.worker.max_streams.unwrap_or(256) {
                0 => return Err(invalid("worker.max_streams", "must be at least 1".into())),
                n => n,
            },
            session_liveness: raw.worker.session_liveness.unwrap_or(true),
            rescue_every: duration(
                "worker.rescue_every",
                &raw.worker.rescue_every,
                Duration::from_secs(1),
            )?,
            forget_dead_after: duration(
                "worker.forget_dead_after",
                &raw.worker.forget_dead_after,
                Duration::from_secs(24 * 3600),
            )?,
        };
        // A sanity bound, no longer a rule about steps: leases are renewed
        // every third of their length while a step runs, so a provider call
        // may outlast the lease; a lease shorter than this would make the
        // renewals themselves the load.
        if worker.lease < Duration::from_secs(1) {
            return Err(invalid(
                "worker.lease",
                "must be at least 1s (it is renewed every third of it while a step runs)".into(),
            ));
        }
        if worker.rescue_every < Duration::from_millis(10) {
            return Err(invalid(
                "worker.rescue_every",
                "must be at least 10ms".into(),
            ));
        }
        if worker.forget_dead_after < Duration::from_secs(60) {
            return Err(invalid(
                "worker.forget_dead_after",
                "must be at least 1m".into(),
            ));
        }

        let submit = RetryPolicy {
            max_attempts: raw.submit.max_attempts.unwrap_or(12),
            initial: duration(
                "submit.initial",
                &raw.submit.initial,
                Duration::from_secs(2),
            )?,
            max: duration("submit.max", &raw.submit.max, Duration::from_secs(300))?,
            multiplier: raw.submit.multiplier.unwrap_or(2.0),
            jitter: raw.submit.jitter.unwrap_or(0.2),
        };
        check_schedule("submit", submit.multiplier, submit.jitter, origin)?;
        if submit.max_attempts == 0 {
            return Err(invalid("submit.max_attempts", "must be at least 1".into()));
        }

        let poll = PollPolicy {
            initial: duration("poll.initial", &raw.poll.initial, Duration::from_secs(1))?,
            max: duration("poll.max", &raw.poll.max, Duration::from_secs(60))?,
            multiplier: raw.poll.multiplier.unwrap_or(2.0),
            jitter: raw.poll.jitter.unwrap_or(0.2),
            deadline: duration(
                "poll.deadline",
                &raw.poll.deadline,
                Duration::from_secs(24 * 3600),
            )?,
            unknown_status_limit: duration(
                "poll.unknown_status_limit",
                &raw.poll.unknown_status_limit,
                Duration::from_secs(3600),
            )?,
            settle_wait: duration(
                "poll.settle_wait",
                &raw.poll.settle_wait,
                Duration::from_secs(3600),
            )?,
        };
        check_schedule("poll", poll.multiplier, poll.jitter, origin)?;
        if poll.max < poll.initial {
            return Err(invalid(
                "poll.max",
                "must not be smaller than poll.initial".into(),
            ));
        }

        let retention = match raw.retention {
            None => None,
            Some(r) => Some(RetentionConfig {
                finished_before: duration(
                    "retention.finished_before",
                    &Some(r.finished_before),
                    Duration::ZERO,
                )?,
                every: duration("retention.every", &r.every, Duration::from_secs(3600))?,
                batch: match r.batch.unwrap_or(1000) {
                    b if b >= 1 => b,
                    _ => return Err(invalid("retention.batch", "must be at least 1".into())),
                },
            }),
        };

        let metrics = raw
            .metrics
            .map(|m| m.parse().map_err(|e| invalid("metrics.listen", e)));
        let metrics = metrics.transpose()?;
        let storage = match raw.storage {
            None => None,
            Some(s) => Some(s.parse(env).map_err(|(key, m)| invalid(&key, m))?),
        };
        let web = match raw.web {
            None => None,
            Some(w) => Some(w.parse(env).map_err(|(key, m)| invalid(&key, m))?),
        };
        let callbacks = match raw.callbacks {
            None => None,
            Some(c) => {
                let secret =
                    env.var(&c.secret_env)
                        .ok_or_else(|| ConfigError::MissingCallbackSecret {
                            variable: c.secret_env.clone(),
                        })?;
                if secret.len() < MIN_CALLBACK_SECRET_BYTES {
                    return Err(invalid(
                        "callbacks.secret_env",
                        format!(
                            "the secret in {} is shorter than {MIN_CALLBACK_SECRET_BYTES} bytes",
                            c.secret_env
                        ),
                    ));
                }
                let retry = RetryPolicy {
                    max_attempts: c.max_attempts.unwrap_or(10),
                    initial: duration("callbacks.initial", &c.initial, Duration::from_secs(10))?,
                    max: duration("callbacks.max", &c.max, Duration::from_secs(3600))?,
                    multiplier: c.multiplier.unwrap_or(2.0),
                    jitter: c.jitter.unwrap_or(0.2),
                };
                check_schedule("callbacks", retry.multiplier, retry.jitter, origin)?;
                if retry.max_attempts == 0 {
                    return Err(invalid(
                        "callbacks.max_attempts",
                        "must be at least 1".into(),
                    ));
                }
                let timeout = duration("callbacks.timeout", &c.timeout, Duration::from_secs(10))?;
                if timeout.is_zero() {
                    return Err(invalid("callbacks.timeout", "must be above zero".into()));
                }
                let concurrency = c.concurrency.unwrap_or(8);
                if concurrency == 0 {
                    return Err(invalid(
                        "callbacks.concurrency",
                        "must be at least 1".into(),
                    ));
                }
                // Half the slots: a hanging receiver leaves the other half to
                // everyone else.
                let per_receiver = c.per_receiver.unwrap_or((concurrency / 2).max(1));
                if !(1..=concurrency).contains(&per_receiver) {
                    return Err(invalid(
                        "callbacks.per_receiver",
                        format!("must be between 1 and callbacks.concurrency ({concurrency})"),
                    ));
                }
                Some(CallbacksConfig {
                    secret: ApiKey::new(secret),
                    retry,
                    timeout,
                    concurrency,
                    per_receiver,
                })
            }
        };

        let mut providers = BTreeMap::new();
        for (name, raw) in raw.providers {
            let key = |k: &str| format!("providers.{name}.{k}");
            let kind = ProviderKind::parse(&raw.kind).map_err(|m| invalid(&key("kind"), m))?;
            if !(raw.base_url.starts_with("http://") || raw.base_url.starts_with("https://")) {
                return Err(invalid(
                    &key("base_url"),
                    format!("`{}` is not an http(s) URL", raw.base_url),
                ));
            }
            let dify_only = |k: &str, set: bool| {
                if set && kind != ProviderKind::Dify {
                    return Err(invalid(
                        &key(k),
                        "only a dify profile looks for lost submits (chenyu replays keys; gptbots cannot find runs)".into(),
                    ));
                }
                Ok(())
            };
            dify_only("find_window", raw.find_window.is_some())?;
            dify_only("max_run_time", raw.max_run_time.is_some())?;
            dify_only("max_resubmits", raw.max_resubmits.is_some())?;
            // Dify's own bound on a run (WORKFLOW_MAX_EXECUTION_TIME, 1200 s
            // by default): older Dify versions list a run in their logs only
            // once it ends, so a lost answer cannot be told from "no run"
            // before then.
            let max_run_time = duration(
                &key("max_run_time"),
                &raw.max_run_time,
                Duration::from_secs(20 * 60),
            )?;
            let api_key = env
                .var(&raw.api_key_env)
                .ok_or_else(|| ConfigError::MissingSecret {
                    profile: name.clone(),
                    variable: raw.api_key_env.clone(),
                })?;
            let profile = ProviderProfile {
                kind,
                base_url: raw.base_url.trim_end_matches('/').to_owned(),
                api_key: ApiKey::new(api_key),
                manifest_ttl: duration(
                    &key("manifest_ttl"),
                    &raw.manifest_ttl,
                    Duration::from_secs(300),
                )?,
                find_window: match duration(
                    &key("find_window"),
                    &raw.find_window,
                    Duration::from_secs(30 * 60),
                )? {
                    // Shorter than one call, "not found" would mean
                    // nothing and every lost answer would be resent.
                    w if w < http.timeout.max(Duration::from_secs(1)) => {
                        return Err(invalid(
                            &key("find_window"),
                            format!(
                                "must be at least http.timeout ({:?}); set it above the app's longest run",
                                http.timeout
                            ),
                        ));
                    }
                    // A run still going when the window ends is not in
                    // older Dify's logs yet: sending it again would bill it
                    // twice.
                    w if kind == ProviderKind::Dify && w <= max_run_time => {
                        return Err(invalid(
                            &key("find_window"),
                            format!(
                                "must be longer than max_run_time ({}): older Dify versions list a run only once it has finished, so a lost answer of a run still going when find_window ends would be sent a second time. Set max_run_time to the longest a run of this app can take (Dify's WORKFLOW_MAX_EXECUTION_TIME, 1200 s by default, plus queueing) and find_window above it",
                                crate::lifecycle::humantime(max_run_time)
                            ),
                        ));
                    }
                    w => w,
                },
                max_run_time,
                max_resubmits: raw.max_resubmits.unwrap_or(1),
                spend: crate::spend::SpendLimits {
                    max_outstanding_frozen: raw
                        .max_outstanding_frozen
                        .as_ref()
                        .map(|a| {
                            a.parse()
                                .map_err(|m| invalid(&key("max_outstanding_frozen"), m))
                        })
                        .transpose()?,
                    daily_budget: raw
                        .daily_budget
                        .as_ref()
                        .map(|a| a.parse().map_err(|m| invalid(&key("daily_budget"), m)))
                        .transpose()?,
                    max_running: match raw.max_running {
                        Some(0) => {
                            return Err(invalid(&key("max_running"), "must be at least 1".into()));
                        }
                        n => n,
                    },
                    unknown_cost: match raw
                        .unknown_cost
                        .as_ref()
                        .map(|a| a.parse().map_err(|m| invalid(&key("unknown_cost"), m)))
                        .transpose()?
                    {
                        // Counting unknown money as nothing is what it is for.
                        Some(amount) if amount <= rust_decimal::Decimal::ZERO => {
                            return Err(invalid(
                                &key("unknown_cost"),
                                "must be more than 0".into(),
                            ));
                        }
                        amount => amount,
                    },
                },
                requests_per_second: match raw.requests_per_second {
                    Some(rps) if !(rps > 0.0 && rps.is_finite()) => {
                        return Err(invalid(
                            &key("requests_per_second"),
                            format!("must be a positive number, got {rps}"),
                        ));
                    }
                    rps => rps,
                },
                max_submits_in_flight: match raw.max_submits_in_flight {
                    Some(0) => {
                        return Err(invalid(
                            &key("max_submits_in_flight"),
                            "must be at least 1".into(),
                        ));
                    }
                    n => n,
                },
                account_refusals: raw
                    .account_refusals
                    .unwrap_or_else(|| default_account_refusals(kind)),
                account_probe: duration(
                    &key("account_probe"),
                    &raw.account_probe,
                    Duration::from_secs(15),
                )?,
                breaker: {
                    let defaults = crate::runtime::BreakerConfig::default();
                    let breaker = crate::runtime::BreakerConfig {
                        runs: raw.breaker_runs.unwrap_or(defaults.runs),
                        workflows: raw.breaker_workflows.unwrap_or(defaults.workflows),
                        window: duration(
                            &key("breaker_window"),
                            &raw.breaker_window,
                            defaults.window,
                        )?,
                    };
                    if breaker.runs < 2 || breaker.workflows < 1 {
                        return Err(invalid(
                            &key("breaker_runs"),
                            "breaker_runs must be at least 2 and breaker_workflows at least 1"
                                .into(),
                        ));
                    }
                    breaker
                },
            };
            providers.insert(name, profile);
        }

        Ok(Config {
            database,
            worker,
            submit,
            poll,
            http,
            retention,
            metrics,
            callbacks,
            storage,
            web,
            providers,
        })
    }
}

/// Refusal codes each kind of provider is known or likely to send about the
/// account rather than the run (a balance, a quota, runs at once, a
/// disabled app or account). Nobody documents a full list: the breaker
/// catches codes missing here, and a profile's `account_refusals` replaces
/// the list.
pub fn default_account_refusals(kind: ProviderKind) -> Vec<String> {
    let codes: &[&str] = match kind {
        ProviderKind::Chenyu => &[
            "INSUFFICIENT_BALANCE",
            "BALANCE_NOT_ENOUGH",
            "INSUFFICIENT_FUNDS",
            "QUOTA_EXCEEDED",
            "CONCURRENT_RUN_LIMIT_EXCEEDED",
            "TOO_MANY_RUNNING_RUNS",
            "ACCOUNT_SUSPENDED",
            "ACCOUNT_DISABLED",
        ],
        ProviderKind::Dify => &[
            "provider_quota_exceeded",
            "provider_not_initialize",
            "app_unavailable",
            "quota_exceeded",
        ],
        // Six-digit codes; 403200 is GPTBots' "insufficient credits".
        ProviderKind::Gptbots => &["403200", "403201", "429001"],
    };
    codes.iter().map(|c| (*c).to_owned()).collect()
}

/// A callback secret shorter than this is refused: it would be guessable.
pub const MIN_CALLBACK_SECRET_BYTES: usize = 16;

fn check_schedule(
    section: &str,
    multiplier: f64,
    jitter: f64,
    origin: &str,
) -> Result<(), ConfigError> {
    let invalid = |key: &str, message: &str| ConfigError::Invalid {
        path: origin.to_owned(),
        key: format!("{section}.{key}"),
        message: message.to_owned(),
    };
    if !(multiplier.is_finite() && multiplier >= 1.0) {
        return Err(invalid("multiplier", "must be a number >= 1.0"));
    }
    if !(0.0..1.0).contains(&jitter) {
        return Err(invalid("jitter", "must be in [0.0, 1.0)"));
    }
    Ok(())
}

/// A worker id that is unique per process and readable in `lease_owner`.
fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "wfq".to_owned());
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// Parses `250ms`, `1s`, `1.5s`, `5m`, `2h`, `1d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (try \"500ms\", \"30s\", \"5m\")"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeEnv(Vec<(&'static str, &'static str)>);

    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const SAMPLE: &str = r#"
        [database]
        url = "postgres://app:hunter2@db:5432/wfq"
        [worker]
        concurrency = 8
        [poll]
        initial = "500ms"
        max = "30s"
        [providers.chenyu]
        kind = "chenyu"
        base_url = "https://www.chenyu.cn/api/open/v2/"
        api_key_env = "CHENYU_API_KEY"
    "#;

    #[test]
    fn parses_a_full_file_and_reads_the_secret_from_the_environment() {
        let env = FakeEnv(vec![("CHENYU_API_KEY", "sk-secret")]);
        let config = Config::from_toml(SAMPLE, "worker.toml", &env).unwrap();
        assert_eq!(config.worker.concurrency, 8);
        assert_eq!(config.worker.claim_batch, 8);
        assert_eq!(config.poll.initial, Duration::from_millis(500));
        let chenyu = &config.providers["chenyu"];
        assert_eq!(chenyu.base_url, "https://www.chenyu.cn/api/open/v2");
        assert_eq!(chenyu.api_key.expose(), "sk-secret");
        assert!(!format!("{config:?}").contains("sk-secret"));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn dify_and_gptbots_profiles() {
        let env = FakeEnv(vec![("DIFY_KEY", "app-1"), ("GPTBOTS_KEY", "g-1")]);
        let text = "[providers.summarize]\nkind = \"dify\"\nbase_url = \"https://api.dify.ai/v1/\"\napi_key_env = \"DIFY_KEY\"\nfind_window = \"5m\"\nmax_run_time = \"4m\"\nmax_resubmits = 2\n\n[providers.news]\nkind = \"gptbots\"\nbase_url = \"https://api-sg.gptbots.ai\"\napi_key_env = \"GPTBOTS_KEY\"";
        let config = Config::from_toml(text, "worker.toml", &env).unwrap();
        let dify = &config.providers["summarize"];
        assert_eq!(dify.kind, ProviderKind::Dify);
        assert_eq!(dify.base_url, "https://api.dify.ai/v1");
        assert_eq!(dify.find_window, Duration::from_secs(300));
        assert_eq!(dify.max_run_time, Duration::from_secs(240));
        assert_eq!(dify.max_resubmits, 2);
        assert_eq!(config.providers["news"].kind, ProviderKind::Gptbots);
        assert_eq!(
            config.providers["news"].find_window,
            Duration::from_secs(1800)
        );
    }

    #[test]
    fn environment_overrides_the_configured_database() {
        let env = FakeEnv(vec![
            ("CHENYU_API_KEY", "k"),
            ("DATABASE_URL", "postgres://a/b"),
            ("WFQ_DATABASE_URL", "postgres://c/d"),
        ]);
        let config = Config::from_toml(SAMPLE, "worker.toml", &env).unwrap();
        assert_eq!(config.database.url.expose(), "postgres://c/d");
    }

    #[test]
    fn a_missing_secret_names_the_variable() {
        let err = Config::from_toml(SAMPLE, "worker.toml", &FakeEnv(vec![])).unwrap_err();
        assert!(err.to_string().contains("CHENYU_API_KEY"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let env = FakeEnv(vec![("CHENYU_API_KEY", "k")]);
        let cases = [
            ("[poll]\ninitial = \"fast\"", "poll.initial"),
            ("[poll]\nmultiplier = 0.5", "poll.multiplier"),
            ("[poll]\njitter = 1.5", "poll.jitter"),
            ("[worker]\nconcurrency = 0", "worker.concurrency"),
            ("[worker]\nlease = \"500ms\"", "worker.lease"),
            ("[worker]\nrescue_every = \"1ms\"", "worker.rescue_every"),
            (
                "[worker]\nforget_dead_after = \"10s\"",
                "worker.forget_dead_after",
            ),
            (
                "[providers.x]\nkind = \"foo\"\nbase_url = \"http://a\"\napi_key_env = \"CHENYU_API_KEY\"",
                "providers.x.kind",
            ),
            ("[worker]\nconcurency = 3", "concurency"),
            ("[metrics]\nlisten = \"localhost\"", "metrics.listen"),
            (
                "[providers.x]\nkind = \"chenyu\"\nbase_url = \"http://a\"\napi_key_env = \"CHENYU_API_KEY\"\nfind_window = \"1m\"",
                "providers.x.find_window",
            ),
            (
                "[providers.x]\nkind = \"dify\"\nbase_url = \"http://a\"\napi_key_env = \"CHENYU_API_KEY\"\nfind_window = \"0s\"",
                "providers.x.find_window",
            ),
            (
                "[providers.x]\nkind = \"dify\"\nbase_url = \"http://a\"\napi_key_env = \"CHENYU_API_KEY\"\nfind_window = \"10m\"",
                "must be longer than max_run_time (20m)",
            ),
            (
                "[providers.x]\nkind = \"gptbots\"\nbase_url = \"http://a\"\napi_key_env = \"CHENYU_API_KEY\"\nmax_resubmits = 3",
                "providers.x.max_resubmits",
            ),
            ("[poll]\nsettle_wait = \"soon\"", "poll.settle_wait"),
            (
                "[providers.x]\nkind = \"chenyu\"\nbase_url = \"http://a\"\napi_key_env = \"CHENYU_API_KEY\"\ndaily_budget = 12.5",
                "`providers.x.daily_budget`: write amounts as strings",
            ),
            (
                "[providers.x]\nkind = \"chenyu\"\nbase_url = \"http://a\"\napi_key_env = \"CHENYU_API_KEY\"\nmax_outstanding_frozen = \"lots\"",
                "providers.x.max_outstanding_frozen",
            ),
            (
                "[providers.x]\nkind = \"chenyu\"\nbase_url = \"http://a\"\napi_key_env = \"CHENYU_API_KEY\"\nrequests_per_second = 0",
                "providers.x.requests_per_second",
            ),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text, "worker.toml", &env).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn callbacks_section() {
        let env = FakeEnv(vec![
            ("CHENYU_API_KEY", "k"),
            ("HOOK_SECRET", "whsec-0123456789abcdef"),
            ("SHORT", "abc"),
        ]);
        let config = Config::from_toml(SAMPLE, "worker.toml", &env).unwrap();
        assert!(config.callbacks.is_none());

        let text = format!("{SAMPLE}\n[callbacks]\nsecret_env = \"HOOK_SECRET\"\n");
        let callbacks = Config::from_toml(&text, "worker.toml", &env)
            .unwrap()
            .callbacks
            .unwrap();
        assert_eq!(callbacks.secret.expose(), "whsec-0123456789abcdef");
        assert_eq!(callbacks.retry.max_attempts, 10);
        assert_eq!(callbacks.retry.initial, Duration::from_secs(10));
        assert_eq!(callbacks.retry.max, Duration::from_secs(3600));
        assert_eq!(callbacks.timeout, Duration::from_secs(10));
        assert_eq!(callbacks.concurrency, 8);
        assert_eq!(callbacks.per_receiver, 4);
        assert!(!format!("{callbacks:?}").contains("whsec"));

        let text = format!(
            "{SAMPLE}\n[callbacks]\nsecret_env = \"HOOK_SECRET\"\nmax_attempts = 3\ninitial = \"1s\"\nmax = \"5s\"\nmultiplier = 3.0\njitter = 0.0\ntimeout = \"2s\"\nconcurrency = 2\n"
        );
        let callbacks = Config::from_toml(&text, "worker.toml", &env)
            .unwrap()
            .callbacks
            .unwrap();
        assert_eq!(callbacks.retry.delay(2, 0.5), Duration::from_secs(3));
        assert_eq!(
            (
                callbacks.concurrency,
                callbacks.per_receiver,
                callbacks.retry.max_attempts
            ),
            (2, 1, 3)
        );
        // One slot: the receiver's share is that slot; a share may be all.
        for (keys, expected) in [
            ("concurrency = 1", (1, 1)),
            ("concurrency = 16\nper_receiver = 16", (16, 16)),
            ("concurrency = 16\nper_receiver = 3", (16, 3)),
        ] {
            let text = format!("{SAMPLE}\n[callbacks]\nsecret_env = \"HOOK_SECRET\"\n{keys}\n");
            let callbacks = Config::from_toml(&text, "worker.toml", &env)
                .unwrap()
                .callbacks
                .unwrap();
            assert_eq!((callbacks.concurrency, callbacks.per_receiver), expected);
        }

        let cases = [
            ("secret_env = \"NOT_SET\"", "NOT_SET"),
            ("secret_env = \"SHORT\"", "callbacks.secret_env"),
            ("max_attempts = 1", "secret_env"),
            (
                "secret_env = \"HOOK_SECRET\"\nmax_attempts = 0",
                "callbacks.max_attempts",
            ),
            (
                "secret_env = \"HOOK_SECRET\"\nconcurrency = 0",
                "callbacks.concurrency",
            ),
            (
                "secret_env = \"HOOK_SECRET\"\nper_receiver = 0",
                "callbacks.per_receiver",
            ),
            (
                "secret_env = \"HOOK_SECRET\"\nconcurrency = 4\nper_receiver = 5",
                "callbacks.per_receiver",
            ),
            (
                "secret_env = \"HOOK_SECRET\"\njitter = 2.0",
                "callbacks.jitter",
            ),
            (
                "secret_env = \"HOOK_SECRET\"\ntimeout = \"0s\"",
                "callbacks.timeout",
            ),
            ("secret_env = \"HOOK_SECRET\"\nsecret = \"x\"", "secret"),
        ];
        for (body, key) in cases {
            let text = format!("{SAMPLE}\n[callbacks]\n{body}\n");
            let err = Config::from_toml(&text, "worker.toml", &env).unwrap_err();
            assert!(err.to_string().contains(key), "{body}: {err}");
            assert!(!err.to_string().contains("abc\""), "{err}");
        }
    }

    #[test]
    fn http_answer_limits() {
        let env = FakeEnv(vec![("CHENYU_API_KEY", "k")]);
        let http = Config::from_toml(SAMPLE, "worker.toml", &env).unwrap().http;
        assert_eq!(
            (http.max_string_bytes, http.max_answer_bytes, http.max_depth),
            (1024 * 1024, 16 * 1024 * 1024, 64)
        );
        let text = format!(
            "{SAMPLE}\n[http]\nmax_string_bytes = 4096\nmax_answer_bytes = 65536\nmax_depth = 100\n"
        );
        let http = Config::from_toml(&text, "worker.toml", &env).unwrap().http;
        assert_eq!(
            (http.max_string_bytes, http.max_answer_bytes, http.max_depth),
            (4096, 65536, 100)
        );
        let cases = [
            ("max_string_bytes = 100", "http.max_string_bytes"),
            (
                "max_string_bytes = 4096\nmax_answer_bytes = 4095",
                "http.max_answer_bytes",
            ),
            ("max_answer_bytes = 1024", "http.max_answer_bytes"),
            ("max_depth = 7", "http.max_depth"),
            ("max_depth = 101", "http.max_depth"),
            ("max_depth = -1", "max_depth"),
            ("max_string_bytes = \"1MiB\"", "max_string_bytes"),
        ];
        for (body, key) in cases {
            let text = format!("{SAMPLE}\n[http]\n{body}\n");
            let err = Config::from_toml(&text, "worker.toml", &env).unwrap_err();
            assert!(err.to_string().contains(key), "{body}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn redacts_database_passwords() {
        assert_eq!(
            redact_url_password("postgres://u:p@h:5432/d"),
            "postgres://u:***@h:5432/d"
        );
        assert_eq!(redact_url_password("postgres://u@h/d"), "postgres://u@h/d");
        // A password with an `@` in it, percent-encoded as URLs require.
        assert_eq!(
            redact_url_password("postgres://u:p%40ss@h/d"),
            "postgres://u:***@h/d"
        );
        let q = redact_url_password("postgres://u@h/d?sslmode=require&password=s3cret");
        assert!(!q.contains("s3cret"), "{q}");
        assert!(q.contains("sslmode=require"), "{q}");
        assert_eq!(
            redact_url_password("host=h user=u password=s3cret"),
            "host=h user=u password=***"
        );
    }
}
