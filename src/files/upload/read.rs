//! An input file, read from wherever its location says into a local copy
//! (streamed, hashed, counted against the limit) before anything is sent.

use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Uploads;
use crate::files::{FileLocation, media};

/// A local copy of an input file; deleted when dropped.
#[derive(Debug)]
pub struct LocalCopy {
    /// Where it is.
    pub path: PathBuf,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Size.
    pub bytes: u64,
    /// Content type (sniffed, else by name).
    pub content_type: String,
    /// The file's name.
    pub file_name: String,
}

impl Drop for LocalCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why an input file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// It is not there or may not be read: retrying cannot help.
    #[error("{0}")]
    Unreadable(String),
    /// Larger than the limit (nothing was sent).
    #[error("larger than {limit} bytes ({seen} bytes seen)")]
    TooLarge {
        /// The limit.
        limit: u64,
        /// What was announced or read when it stopped.
        seen: u64,
    },
    /// Worth another try later (a 5xx, a timeout, a store that did not answer).
    #[error("{0}")]
    Transient(String),
}

type Chunks = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

impl Uploads {
    /// Reads `location` into a local copy of at most `limit` bytes.
    pub async fn local_copy(
        &self,
        location: &FileLocation,
        limit: u64,
    ) -> Result<LocalCopy, ReadError> {
        let (size, chunks) = self.open(location).await?;
        if let Some(size) = size
            && size > limit
        {
            return Err(ReadError::TooLarge { limit, seen: size });
        }
        let file_name = location.file_name();
        copy_to_temp(&self.temp_dir, chunks, limit, file_name).await
    }

    async fn open(&self, location: &FileLocation) -> Result<(Option<u64>, Chunks), ReadError> {
        match location {
            FileLocation::Stored(relative) => {
                let storage = self.storage.as_ref().ok_or_else(|| {
                    ReadError::Unreadable(format!(
                        "`{relative}` is a path in the store, but the worker has no [storage]"
                    ))
                })?;
                let (size, stream) = storage
                    .read(relative)
                    .await
                    .map_err(|e| store_error(relative, e))?;
                Ok((size, Box::pin(stream.map(|c| c.map_err(|e| e.to_string())))))
            }
            FileLocation::S3 { bucket, key } => {
                use object_store::ObjectStore;
                let config = self.config.clone().unwrap_or_else(super::default_s3_config);
                let s3 = crate::files::storage::s3_client(&config, bucket)
                    .map_err(|e| ReadError::Unreadable(format!("s3://{bucket}: {e}")))?;
                let got = s3
                    .get(&object_store::path::Path::from(key.as_str()))
                    .await
                    .map_err(|e| store_error(&format!("s3://{bucket}/{key}"), e.into()))?;
                let size = Some(got.meta.size);
                Ok((
                    size,
                    Box::pin(got.into_stream().map(|c| c.map_err(|e| e.to_string()))),
                ))
            }
            FileLocation::Local(path) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| ReadError::Unreadable(format!("{}: {e}", path.display())))?;
                let size = file.metadata().await.ok().map(|m| m.len());
                let stream = futures_util::stream::unfold(file, |mut file| async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    match file.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some((Ok(Bytes::from(buf)), file))
                        }
                        Err(e) => Some((Err(e.to_string()), file)),
                    }
                });
                Ok((size, Box::pin(stream)))
            }
            FileLocation::Web(url) => {
                let response = self.http.get(url.clone()).send().await.map_err(|e| {
                    ReadError::Transient(format!("{}: {}", redacted(url), e.without_url()))
                })?;
                let status = response.status().as_u16();
                match status {
                    200..=299 => {}
                    408 | 425 | 429 | 500..=599 => {
                        return Err(ReadError::Transient(format!(
                            "{}: HTTP {status}",
                            redacted(url)
                        )));
                    }
                    _ => {
                        return Err(ReadError::Unreadable(format!(
                            "{}: HTTP {status}",
                            redacted(url)
                        )));
                    }
                }
                let size = response.content_length();
                let stream = response
                    .bytes_stream()
                    .map(|c| c.map_err(|e| e.without_url().to_string()));
                Ok((size, Box::pin(stream)))
            }
        }
    }
}

/// A URL without its query (which may carry a signature).
pub fn redacted(url: &url::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_password(None);
    shown.to_string()
}

fn store_error(what: &str, e: crate::files::StorageError) -> ReadError {
    let text = e.to_string();
    if text.contains("not found") || text.contains("NotFound") || text.contains("No such file") {
        ReadError::Unreadable(format!("{what}: not found"))
    } else {
        ReadError::Transient(format!("{what}: {text}"))
    }
}

async fn copy_to_temp(
    dir: &std::path::Path,
    mut chunks: Chunks,
    limit: u64,
    file_name: String,
) -> Result<LocalCopy, ReadError> {
    use sha2::Digest;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| ReadError::Transient(format!("{}: {e}", dir.display())))?;
    let path = dir.join(format!("wfq-upload-{}", uuid::Uuid::new_v4().simple()));
    let mut copy = LocalCopy {
        path: path.clone(),
        sha256: String::new(),
        bytes: 0,
        content_type: String::new(),
        file_name,
    };
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| ReadError::Transient(format!("{}: {e}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    let mut head = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| ReadError::Transient(format!("reading broke off: {e}")))?;
        copy.bytes += chunk.len() as u64;
        if copy.bytes > limit {
            return Err(ReadError::TooLarge {
                limit,
                seen: copy.bytes,
            });
        }
        if head.len() < 64 {
            head.extend_from_slice(&chunk[..chunk.len().min(64 - head.len())]);
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| ReadError::Transient(format!("{}: {e}", path.display())))?;
    }
    file.flush()
        .await
        .map_err(|e| ReadError::Transient(format!("{}: {e}", path.display())))?;
    copy.sha256 = hex::encode(hasher.finalize());
    copy.content_type = media::sniff(&head, &copy.file_name);
    Ok(copy)
}
