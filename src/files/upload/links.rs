//! GPTBots takes files by URL: an http(s) input as it is, a file of an S3
//! store as a presigned URL made as the request is sent (and never
//! recorded: the sent inputs hold the file's location).

use std::time::Duration;

use serde_json::{Map, Value};

use super::attach::{database, shown};
use super::read::redacted;
use crate::files::{FileInput, FileLocation};
use crate::lifecycle::{self, Transition};
use crate::providers::ProviderClient;
use crate::runtime::{Engine, Profile};
use crate::store::{self, ClaimedRun};

/// How long a presigned URL handed to GPTBots stays valid.
const LINK_TTL: Duration = Duration::from_secs(24 * 3600);

/// GPTBots takes files by URL: an http(s) input as it is, a file in an
/// S3 store as a presigned URL. A presigned URL works like a password for
/// the file, so it is never recorded: the sent inputs (and `run_files`)
/// hold the file's store location, and [`signed_inputs`] signs it as the
/// request is sent. Anything else cannot be handed over.
pub(super) async fn link_for_gptbots(
    engine: &Engine,
    run: &ClaimedRun,
    file: &FileInput,
) -> Result<Value, Transition> {
    let key = file.key.as_str();
    let (sent, recorded) = match &file.location {
        FileLocation::Web(url) => (url.to_string(), redacted(url)),
        FileLocation::Stored(relative) if engine.uploads.store_is_s3() => {
            let Some(storage) = engine.uploads.storage() else {
                return Err(needs_url(file));
            };
            // Signed once now, so that a store that cannot sign fails the
            // run here, before anything is frozen, not at the send.
            if storage.signed_url(relative, LINK_TTL).await.is_none() {
                return Err(lifecycle::file_failed(
                    "FILE_UNREADABLE",
                    key,
                    format!(
                        "inputs.{key}: cannot make a presigned URL for {relative} in {} (check the S3 credentials)",
                        storage.base()
                    ),
                    None,
                ));
            }
            let location = storage.location(relative);
            (location.clone(), location)
        }
        _ => return Err(needs_url(file)),
    };
    store::record_input_link(
        &engine.pool,
        run.id,
        key,
        &run.provider,
        &shown(file),
        &recorded,
    )
    .await
    .map_err(database)?;
    Ok(Value::String(sent))
}

fn needs_url(file: &FileInput) -> Transition {
    let key = file.key.as_str();
    lifecycle::file_failed(
        "FILE_NEEDS_URL",
        key,
        format!(
            "inputs.{key}: GPTBots takes files by URL only; give an https:// URL, or a path in an S3 [storage] (got {})",
            shown(file)
        ),
        None,
    )
}

/// The inputs to send to GPTBots with each file of an S3 store (recorded
/// by its location, see `link_for_gptbots`) replaced by a fresh presigned
/// URL; `None` when there is nothing to sign. Only the run's own file
/// inputs are signed, never a value that merely looks like a location.
pub(crate) async fn signed_inputs(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &Profile,
    sent: &Map<String, Value>,
) -> Option<Map<String, Value>> {
    if !matches!(profile.client.provider(), ProviderClient::Gptbots(_)) {
        return None;
    }
    let storage = engine
        .uploads
        .storage()
        .filter(|_| engine.uploads.store_is_s3())?;
    let files = match &run.inputs {
        Value::Object(inputs) => crate::files::split_inputs(inputs).ok()?.files,
        _ => return None,
    };
    let mut signed = sent.clone();
    let mut changed = false;
    for file in files {
        let FileLocation::Stored(relative) = &file.location else {
            continue;
        };
        let location = storage.location(relative);
        if sent.get(&file.key).and_then(Value::as_str) != Some(location.as_str()) {
            continue;
        }
        match storage.signed_url(relative, LINK_TTL).await {
            Some(url) => {
                signed.insert(file.key.clone(), Value::String(url));
                changed = true;
            }
            None => {
                tracing::warn!(key = %file.key, location = %location, "cannot make a presigned URL now; the store location is sent instead");
            }
        }
    }
    changed.then_some(signed)
}
