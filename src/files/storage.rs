//! The file store behind `[storage]`: a local directory or an S3 bucket,
//! through `object_store`. Files are written as streams (never whole in
//! memory) and named by a location URL (`file:///dir/42/image.png`,
//! `s3://bucket/prefix/42/image.png`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, WriteMultipart};

use super::config::{StorageConfig, StorageUrl};

/// The store could not be opened, written or read. Never carries credentials.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// `[storage]` cannot be used as configured.
    #[error("storage {url}: {message}")]
    Open {
        /// The configured URL.
        url: String,
        /// Why.
        message: String,
    },
    /// A store operation failed.
    #[error("storage: {0}")]
    Store(String),
    /// The location is not in this store.
    #[error("{0} is not a location in the configured storage")]
    Foreign(String),
    /// A stream fed to the store broke off.
    #[error("{0}")]
    Source(String),
}

impl From<object_store::Error> for StorageError {
    fn from(e: object_store::Error) -> Self {
        StorageError::Store(e.to_string())
    }
}

/// An opened `[storage]`.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<object_store::aws::AmazonS3>>,
    /// `file:///dir` or `s3://bucket/prefix`, without a trailing slash.
    base: String,
    /// The key prefix inside the bucket (S3), or empty.
    prefix: String,
    config: StorageConfig,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("base", &self.base).finish()
    }
}

/// What a finished write stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The file's location URL.
    pub location: String,
    /// Its size.
    pub bytes: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

/// Why a streamed write was given up (nothing is left in the store).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// More than the limit arrived.
    #[error("larger than {limit} bytes ({seen} bytes arrived before the copy was stopped)")]
    TooLarge {
        /// The limit.
        limit: u64,
        /// Bytes seen when it was stopped.
        seen: u64,
    },
    /// The source broke off.
    #[error("the source broke off after {seen} bytes: {message}")]
    Source {
        /// Bytes seen.
        seen: u64,
        /// Why.
        message: String,
    },
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StorageError),
}

impl Storage {
    /// Opens the store (creates a local directory when missing).
    pub fn open(config: &StorageConfig) -> Result<Storage, StorageError> {
        let base = config.url.render();
        let open_error = |message: String| StorageError::Open {
            url: base.clone(),
            message,
        };
        match &config.url {
            StorageUrl::Local(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| open_error(format!("cannot create {}: {e}", dir.display())))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| open_error(e.to_string()))?;
                Ok(Storage {
                    store: Arc::new(store),
                    signer: None,
                    base,
                    prefix: String::new(),
                    config: config.clone(),
                })
            }
            StorageUrl::S3 { bucket, prefix } => {
                let s3 =
                    Arc::new(s3_client(config, bucket).map_err(|e| open_error(e.to_string()))?);
                Ok(Storage {
                    store: s3.clone(),
                    signer: Some(s3),
                    base,
                    prefix: prefix.clone(),
                    config: config.clone(),
                })
            }
        }
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    /// The store's URL (`file:///dir`, `s3://bucket/prefix`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The location URL of `relative` (e.g. `42/image.png`).
    pub fn location(&self, relative: &str) -> String {
        format!("{}/{}", self.base, relative.trim_start_matches('/'))
    }

    /// The store path of `relative`.
    fn path(&self, relative: &str) -> Path {
        let relative = relative.trim_start_matches('/');
        if self.prefix.is_empty() {
            Path::from(relative)
        } else {
            Path::from(format!("{}/{relative}", self.prefix))
        }
    }

    /// The relative path of a location in this store (or a bare relative path).
    pub fn relative_of(&self, location: &str) -> Result<String, StorageError> {
        match location.strip_prefix(&format!("{}/", self.base)) {
            Some(rest) => Ok(rest.to_owned()),
            None if !location.contains("://") => Ok(location.trim_start_matches('/').to_owned()),
            None => Err(StorageError::Foreign(location.to_owned())),
        }
    }

    /// Writes `stream` at `relative`, hashing it and stopping (leaving
    /// nothing) once more than `limit` bytes arrive. At most a few chunks
    /// are held in memory whatever the size.
    pub async fn write_stream<S, E>(
        &self,
        relative: &str,
        mut stream: S,
        limit: u64,
    ) -> Result<Stored, WriteError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use sha2::Digest;
        let path = self.path(relative);
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(StorageError::from)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, 5 << 20);
        let mut hasher = sha2::Sha256::new();
        let mut seen: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(WriteError::Source {
                        seen,
                        message: e.to_string(),
                    });
                }
            };
            seen += chunk.len() as u64;
            if seen > limit {
                let _ = writer.abort().await;
                return Err(WriteError::TooLarge { limit, seen });
            }
            hasher.update(&chunk);
            if let Err(e) = writer.wait_for_capacity(2).await {
                return Err(WriteError::Store(e.into()));
            }
            writer.write(&chunk);
        }
        writer.finish().await.map_err(StorageError::from)?;
        Ok(Stored {
            location: self.location(relative),
            bytes: seen,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// Reads the file at `relative` as a stream of chunks.
    pub async fn read(
        &self,
        relative: &str,
    ) -> Result<
        (
            Option<u64>,
            futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
        ),
        StorageError,
    > {
        let got = self.store.get(&self.path(relative)).await?;
        let size = Some(got.meta.size);
        Ok((size, got.into_stream()))
    }

    /// Deletes every file under `relative` (a run's directory); returns how many.
    pub async fn delete_under(&self, relative: &str) -> Result<usize, StorageError> {
        let prefix = self.path(relative);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        // Only what is under the directory: run 1's prefix must never take
        // run 10's files, whatever a store's listing matches.
        let under = format!("{}/", prefix.as_ref());
        let mut deleted = 0;
        for meta in metas
            .into_iter()
            .filter(|m: &object_store::ObjectMeta| m.location.as_ref().starts_with(&under))
        {
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(e) => return Err(e.into()),
            }
        }
        // A directory store keeps empty directories behind; they go too.
        if let StorageUrl::Local(dir) = &self.config.url {
            remove_empty_dirs(&dir.join(prefix.as_ref()));
        }
        Ok(deleted)
    }

    /// A URL anyone can GET the file at for `ttl` (S3 only: a presigned URL).
    pub async fn signed_url(&self, relative: &str, ttl: Duration) -> Option<String> {
        use object_store::signer::Signer;
        let signer = self.signer.as_ref()?;
        signer
            .signed_url(reqwest::Method::GET, &self.path(relative), ttl)
            .await
            .ok()
            .map(|u| u.to_string())
    }
}

/// Removes `dir` and the directories under it that are (then) empty.
fn remove_empty_dirs(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// An S3 client for `bucket` with the configured region, endpoint and credentials.
pub fn s3_client(
    config: &StorageConfig,
    bucket: &str,
) -> Result<object_store::aws::AmazonS3, object_store::Error> {
    let mut builder = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_region(&config.region);
    if let Some(endpoint) = &config.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(c) = &config.credentials {
        builder = builder
            .with_access_key_id(c.access_key_id.expose())
            .with_secret_access_key(c.secret_access_key.expose());
        if let Some(token) = &c.session_token {
            builder = builder.with_token(token.expose());
        }
    }
    builder.build()
}
