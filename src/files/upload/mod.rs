//! Input files, uploaded to the provider before a submit.
//!
//! Each `{"$file": ...}` input is read into a local copy (`read`), checked
//! against the manifest's type and the provider's limits, then uploaded
//! (`attach`): chenyu `POST /assets`, Dify `POST /files/upload`, GPTBots by
//! URL (`links`). The upload is a durable step in `wfq.run_files`: the
//! run's own row is reused after a retry, a crash or a rescue, and an
//! upload of the same bytes to the same profile is reused while the
//! provider keeps it. A file that cannot be used fails its run before
//! anything is frozen.

mod attach;
mod links;
pub mod read;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::files::{Storage, StorageConfig, StorageError, StorageUrl};
use crate::providers::FileLimits;

pub(crate) use attach::attach_files;
pub(crate) use links::signed_inputs;
pub use read::{LocalCopy, ReadError};

/// The largest input file when `[storage]` sets no `max_file_bytes`.
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 512 << 20;

/// How long a provider's upload limits are kept.
const LIMITS_TTL: Duration = Duration::from_secs(300);

/// What the worker needs for input files: the store, its limits, an HTTP
/// client for https:// inputs, and the providers' limits it learned.
#[derive(Debug)]
pub struct Uploads {
    storage: Option<Arc<Storage>>,
    config: Option<StorageConfig>,
    http: reqwest::Client,
    temp_dir: PathBuf,
    timeout: Duration,
    limits: Mutex<HashMap<String, (Instant, Option<FileLimits>)>>,
}

/// S3 settings from the environment alone, for `s3://` inputs when
/// `[storage]` is not configured.
pub(crate) fn default_s3_config() -> StorageConfig {
    let env = crate::config::ProcessEnvironment;
    crate::files::config::RawStorageConfig::minimal("s3://wfq-inputs")
        .parse(&env)
        .unwrap_or_else(|_| unreachable!("a fixed, valid [storage]"))
}

impl Uploads {
    /// Opens `[storage]`, when configured.
    pub fn new(config: &Config) -> Result<Uploads, StorageError> {
        let storage = match &config.storage {
            Some(c) => Some(Arc::new(Storage::open(c)?)),
            None => None,
        };
        let timeout = config
            .storage
            .as_ref()
            .map_or(Duration::from_secs(600), |c| c.timeout);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(config.http.connect_timeout)
            .user_agent(concat!("wfq/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StorageError::Store(e.to_string()))?;
        Ok(Uploads {
            storage,
            config: config.storage.clone(),
            http,
            temp_dir: std::env::temp_dir().join("wfq-uploads"),
            timeout,
            limits: Mutex::default(),
        })
    }

    /// The configured store.
    pub fn storage(&self) -> Option<Arc<Storage>> {
        self.storage.clone()
    }

    /// Whether the store is S3 (files in it can be handed out by URL).
    pub fn store_is_s3(&self) -> bool {
        matches!(
            self.config.as_ref().map(|c| &c.url),
            Some(StorageUrl::S3 { .. })
        )
    }

    /// The largest input file.
    pub fn max_bytes(&self) -> u64 {
        self.config
            .as_ref()
            .map_or(DEFAULT_MAX_INPUT_BYTES, |c| c.max_file_bytes)
    }

    /// How long one upload may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A Dify profile's upload limits and file types, read at most every
    /// few minutes.
    pub(crate) async fn dify_limits(
        &self,
        profile: &str,
        client: &crate::providers::DifyClient,
    ) -> Option<FileLimits> {
        if let Some((at, limits)) = self.lock().get(profile)
            && at.elapsed() < LIMITS_TTL
        {
            return limits.clone();
        }
        let limits = client.file_limits().await;
        self.lock()
            .insert(profile.to_owned(), (Instant::now(), limits.clone()));
        limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<FileLimits>)>> {
        self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }
}
