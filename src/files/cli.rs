//! The command line's side of files: `wfq enqueue --input k=@path`,
//! `wfq media get`, and deleting stored files with their runs (`wfq prune`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::location::FILE_MARKER;
use super::{RawStorageConfig, Storage, StorageConfig};
use crate::config::Environment;

/// A command-line file problem, naming what and where.
#[derive(Debug, thiserror::Error)]
pub enum CliFileError {
    /// `--input` is not `KEY=VALUE` or `KEY=@PATH`.
    #[error("--input {0:?}: expected KEY=VALUE or KEY=@PATH")]
    BadInput(String),
    /// The local file cannot be read.
    #[error("--input {key}: {path}: {source}")]
    Read {
        /// The input key.
        key: String,
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `[storage]` in the configuration is wrong.
    #[error("{origin}: `{key}`: {message}")]
    Config {
        /// The file.
        origin: String,
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
    /// The store refused.
    #[error(transparent)]
    Storage(#[from] super::StorageError),
    /// The store refused a write.
    #[error(transparent)]
    Write(#[from] super::WriteError),
    /// The database.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A local write.
    #[error("{path}: {source}")]
    Local {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One `--input`: a plain value, or a local file.
#[derive(Debug, Clone, PartialEq)]
pub enum InputArg {
    /// `KEY=VALUE`: JSON when it parses as JSON, else the text.
    Value(String, Value),
    /// `KEY=@PATH`.
    File(String, PathBuf),
}

/// Reads `KEY=VALUE` / `KEY=@PATH`.
pub fn parse_input_arg(text: &str) -> Result<InputArg, CliFileError> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(CliFileError::BadInput(text.to_owned()));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(CliFileError::BadInput(text.to_owned()));
    }
    if let Some(path) = value.strip_prefix('@') {
        if path.is_empty() {
            return Err(CliFileError::BadInput(text.to_owned()));
        }
        return Ok(InputArg::File(key.to_owned(), PathBuf::from(path)));
    }
    let parsed = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok(InputArg::Value(key.to_owned(), parsed))
}

/// `[storage]` of a worker.toml text alone (the rest is not needed to
/// enqueue or to fetch files, and its secrets may be absent here).
pub fn storage_from_toml(
    text: &str,
    origin: &str,
    env: &dyn Environment,
) -> Result<Option<StorageConfig>, CliFileError> {
    #[derive(serde::Deserialize)]
    struct Only {
        storage: Option<RawStorageConfig>,
    }
    let bad = |key: String, message: String| CliFileError::Config {
        origin: origin.to_owned(),
        key,
        message,
    };
    let table: toml::Table =
        toml::from_str(text).map_err(|e| bad("(file)".into(), e.to_string()))?;
    let only: Only = Only {
        storage: match table.get("storage") {
            None => None,
            Some(v) => Some(
                v.clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| bad("storage".into(), e.to_string()))?,
            ),
        },
    };
    only.storage
        .map(|raw| raw.parse(env).map_err(|(key, message)| bad(key, message)))
        .transpose()
}

/// The `inputs` object of `wfq enqueue`: `--inputs`, then each `--input`.
/// A file goes into `[storage]` (under `inputs/<uuid>/`) when there is
/// one, else it is passed as a `file://` path for a worker on this machine.
pub async fn merge_inputs(
    mut inputs: Map<String, Value>,
    args: &[String],
    storage: Option<&Storage>,
) -> Result<Map<String, Value>, CliFileError> {
    for text in args {
        match parse_input_arg(text)? {
            InputArg::Value(key, value) => {
                inputs.insert(key, value);
            }
            InputArg::File(key, path) => {
                let location = put_file(&key, &path, storage).await?;
                inputs.insert(key, json!({ FILE_MARKER: location }));
            }
        }
    }
    Ok(inputs)
}

async fn put_file(
    key: &str,
    path: &Path,
    storage: Option<&Storage>,
) -> Result<String, CliFileError> {
    let read_error = |source| CliFileError::Read {
        key: key.to_owned(),
        path: path.display().to_string(),
        source,
    };
    let absolute = std::fs::canonicalize(path).map_err(read_error)?;
    let Some(storage) = storage else {
        return Ok(format!("file://{}", absolute.display()));
    };
    let file = tokio::fs::File::open(&absolute).await.map_err(read_error)?;
    let name = absolute
        .file_name()
        .map(|n| {
            n.to_string_lossy().replace(
                |c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
                "_",
            )
        })
        .unwrap_or_else(|| "file".into());
    let relative = format!("inputs/{}/{name}", uuid::Uuid::new_v4().simple());
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    storage
        .write_stream(&relative, Box::pin(stream), storage.config().max_file_bytes)
        .await?;
    Ok(relative)
}

/// Copies the mirrored outputs of `run_id` (only `key`, when given) from
/// the store into `dir`, as `<key>[/<n>].<ext>`; returns the files written.
pub async fn media_get(
    pool: &PgPool,
    storage: &Storage,
    run_id: i64,
    key: Option<&str>,
    dir: &Path,
) -> Result<Vec<PathBuf>, CliFileError> {
    let mut written = Vec::new();
    for file in crate::store::run_files(pool, run_id).await? {
        if file.direction != "output" || key.is_some_and(|k| k != file.key) {
            continue;
        }
        let Some(location) = &file.stored_location else {
            continue;
        };
        let relative = storage.relative_of(location)?;
        let local = relative
            .strip_prefix(&format!("{run_id}/"))
            .unwrap_or(&relative)
            .to_owned();
        let target = dir.join(&local);
        let local_error = |source| CliFileError::Local {
            path: target.display().to_string(),
            source,
        };
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(local_error)?;
        }
        let (_, mut stream) = storage.read(&relative).await?;
        let mut out = tokio::fs::File::create(&target)
            .await
            .map_err(local_error)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(super::StorageError::from)?;
            out.write_all(&chunk).await.map_err(local_error)?;
        }
        out.flush().await.map_err(local_error)?;
        written.push(target);
    }
    Ok(written)
}

/// Deletes from the store the files of runs `wfq prune` is about to delete
/// (same rules), then forgets their locations; returns the files deleted.
pub async fn prune_stored_files(
    pool: &PgPool,
    storage: &Arc<Storage>,
    older_than: Duration,
    batch: i64,
) -> Result<usize, CliFileError> {
    let mut deleted = 0;
    loop {
        let runs = crate::store::prunable_runs_with_files(pool, older_than, batch.max(1)).await?;
        if runs.is_empty() {
            return Ok(deleted);
        }
        for run_id in &runs {
            deleted += storage.delete_under(&run_id.to_string()).await?;
        }
        crate::store::forget_stored_files(pool, &runs).await?;
        if (runs.len() as i64) < batch.max(1) {
            return Ok(deleted);
        }
    }
}

/// What `wfq prune` says about the `kept` runs it did not delete because
/// their files are not done with (`configured`: whether `[storage]` was).
pub fn kept_for_files_warning(kept: i64, configured: bool) -> String {
    if configured {
        format!(
            "warning: kept {kept} finished runs whose files are still being copied or could not be deleted from the store; run wfq prune again later"
        )
    } else {
        format!(
            "warning: kept {kept} finished runs that have files in the store (or being copied there): without [storage] in the config wfq prune cannot delete those files, and deleting the runs would lose the only record of them; run wfq prune with the worker's config (its [storage]) to delete the files, then the runs"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_arguments() {
        assert_eq!(
            parse_input_arg("image=@./boat.png").unwrap(),
            InputArg::File("image".into(), "./boat.png".into())
        );
        assert_eq!(
            parse_input_arg("prompt=a boat").unwrap(),
            InputArg::Value("prompt".into(), json!("a boat"))
        );
        assert_eq!(
            parse_input_arg("seed=42").unwrap(),
            InputArg::Value("seed".into(), json!(42))
        );
        for bad in ["noequals", "=x", "k=@"] {
            assert!(parse_input_arg(bad).is_err(), "{bad}");
        }
    }
}
