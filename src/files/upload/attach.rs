//! The upload step: each file input of a run read, checked and uploaded
//! (or an earlier upload reused), and its value in the sent inputs
//! replaced by what the provider gave back. `Err` is the transition that
//! ends the step without a submit (a failure, or "try again later").

use std::time::Duration;

use chrono::Utc;
use serde_json::{Map, Value, json};

use super::read::{LocalCopy, ReadError, redacted};
use crate::files::{FileInput, FileLocation, media};
use crate::lifecycle::{self, Transition};
use crate::providers::{ParamKind, ProviderClient, UploadOutcome, UploadSource};
use crate::runtime::{Engine, Profile};
use crate::store::{self, ClaimedRun, InputFileFacts, UploadClaim};

/// A provider's copy is reused only while it stays valid this much longer.
const REUSE_MARGIN: Duration = Duration::from_secs(3600);

/// How long chenyu is asked to keep an uploaded asset.
const ASSET_TTL_HOURS: u32 = 24;

/// How a file input's value is written for the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// chenyu: the asset URI; GPTBots: the URL.
    Text,
    /// Dify `file`: `{"type", "transfer_method", "upload_file_id"}`.
    DifyFile,
    /// Dify `file-list`: a list of one such object.
    DifyList,
}

fn value_of(shape: Shape, id: &str, content_type: &str) -> Value {
    let dify = || {
        let kind = media::kind(content_type);
        json!({"type": kind, "transfer_method": "local_file", "upload_file_id": id})
    };
    match shape {
        Shape::Text => Value::String(id.to_owned()),
        Shape::DifyFile => dify(),
        Shape::DifyList => Value::Array(vec![dify()]),
    }
}

pub(super) fn database(e: sqlx::Error) -> Transition {
    tracing::warn!(error = %e, "could not record an upload step; trying again shortly");
    lifecycle::throttled(
        crate::lifecycle::RunState::Queued,
        Duration::from_secs(1),
        Utc::now(),
    )
}

/// Uploads `files` of `run` and writes their values into `sent`.
pub(crate) async fn attach_files(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &Profile,
    files: &[FileInput],
    sent: &mut Map<String, Value>,
) -> Result<(), Transition> {
    let retry_soon = |wait: Duration| lifecycle::throttled(run.state, wait, Utc::now());
    let manifest = engine
        .manifests
        .get(
            &run.provider,
            &profile.client,
            &run.workflow_id,
            profile.manifest_ttl,
        )
        .await
        .map_err(|_| retry_soon(Duration::from_secs(1)))?;
    for file in files {
        let kind = manifest
            .as_ref()
            .and_then(|m| m.parameters.iter().find(|p| p.key == file.key))
            .map(|p| p.kind.clone());
        let shape = shape_for(profile.client.provider(), kind.as_ref()).map_err(|expected| {
            lifecycle::reject_inputs(&crate::inputs::InputError::WrongType {
                key: file.key.clone(),
                expected,
                got: format!("a file ({})", shown(file)),
            })
        })?;
        let value = attach_one(engine, run, profile, file, kind.as_ref(), shape).await?;
        sent.insert(file.key.clone(), value);
    }
    Ok(())
}

/// How the value of a file input is written, or what the workflow expects
/// instead of a file.
fn shape_for(client: &ProviderClient, kind: Option<&ParamKind>) -> Result<Shape, String> {
    match (client, kind) {
        (ProviderClient::Gptbots(_), _) => Ok(Shape::Text),
        (ProviderClient::Dify(_), Some(ParamKind::Other(k))) if k == "file" => Ok(Shape::DifyFile),
        (ProviderClient::Dify(_), Some(ParamKind::Other(k))) if k == "file-list" => {
            Ok(Shape::DifyList)
        }
        (ProviderClient::Chenyu(_), Some(ParamKind::Media(_))) => Ok(Shape::Text),
        (_, Some(ParamKind::String)) => Err("a string, not a file".into()),
        (_, Some(ParamKind::Int)) => Err("an integer, not a file".into()),
        (_, Some(ParamKind::Float)) => Err("a number, not a file".into()),
        (_, Some(ParamKind::Bool)) => Err("true or false, not a file".into()),
        (_, Some(ParamKind::Choice(options))) => {
            Err(format!("one of {}, not a file", options.join(", ")))
        }
        (_, Some(ParamKind::Media(k) | ParamKind::Other(k))) => {
            Err(format!("{k}, which this provider does not take as a file"))
        }
        (_, None) => Err("a known input (the workflow has no such input)".into()),
    }
}

async fn attach_one(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &Profile,
    file: &FileInput,
    kind: Option<&ParamKind>,
    shape: Shape,
) -> Result<Value, Transition> {
    let pool = &engine.pool;
    let key = file.key.as_str();
    if let ProviderClient::Gptbots(_) = profile.client.provider() {
        return super::links::link_for_gptbots(engine, run, file).await;
    }
    // Done already (a retry, a crash after the upload, a rescue): reuse it.
    if let Some(row) = store::input_file(pool, run.id, key)
        .await
        .map_err(database)?
        && row.state == "done"
        && let Some(id) = &row.provider_file_id
        && row
            .provider_expires_at
            .is_none_or(|at| at > Utc::now() + chrono::Duration::minutes(10))
    {
        return Ok(value_of(
            shape,
            id,
            row.content_type.as_deref().unwrap_or_default(),
        ));
    }

    // Read it (bounded), then check it before anything is sent.
    let mut limit = engine.uploads.max_bytes();
    let copy = match engine.uploads.local_copy(&file.location, limit).await {
        Ok(copy) => copy,
        Err(ReadError::TooLarge { limit, seen }) => return Err(too_large(key, limit, seen)),
        Err(ReadError::Unreadable(why)) => {
            return Err(lifecycle::file_failed(
                "FILE_UNREADABLE",
                key,
                format!("inputs.{key}: cannot read {}: {why}", shown(file)),
                None,
            ));
        }
        Err(ReadError::Transient(why)) => {
            // Counted in the file's row, so that the retries are bounded
            // whatever else happens to the run.
            let attempts =
                store::record_read_failure(pool, run.id, key, &run.provider, &shown(file), &why)
                    .await
                    .map_err(database)?
                    .map_or(1, |n| n.max(1) as u32);
            tracing::warn!(key, error = %why, attempts, "input file not readable now");
            return Err(lifecycle::read_unclear(
                run.state,
                (key, &shown(file)),
                attempts,
                &why,
                &engine.submit,
                Utc::now(),
                fastrand::f64(),
            ));
        }
    };
    let media_kind = media::kind(&copy.content_type);
    if let Some(ParamKind::Media(expected)) = kind
        && media::manifest_type_is_media(expected)
        && expected != "media"
        && media_kind != expected
    {
        return Err(lifecycle::file_failed(
            "FILE_TYPE_NOT_ACCEPTED",
            key,
            format!(
                "inputs.{key}: the workflow takes {expected}, and {} is {} ({}); nothing was uploaded",
                shown(file),
                copy.content_type,
                media_kind
            ),
            None,
        ));
    }
    // Dify states its limits and each input's file types in `/parameters`.
    if let ProviderClient::Dify(dify) = profile.client.provider()
        && let Some(rules) = engine.uploads.dify_limits(&run.provider, dify).await
    {
        if !rules.accepts(key, media_kind) {
            return Err(lifecycle::file_failed(
                "FILE_TYPE_NOT_ACCEPTED",
                key,
                format!(
                    "inputs.{key}: the app takes {} files, and {} is {} ({}); nothing was uploaded",
                    rules.types_of(key).join(" or "),
                    shown(file),
                    copy.content_type,
                    media_kind
                ),
                None,
            ));
        }
        if let Some(provider_limit) = rules.for_kind(media_kind) {
            limit = limit.min(provider_limit);
        }
    }
    if copy.bytes > limit {
        return Err(too_large(key, limit, copy.bytes));
    }

    let source = shown(file);
    let facts = InputFileFacts {
        run_id: run.id,
        key,
        profile: &run.provider,
        source: &source,
        sha256: &copy.sha256,
        bytes: copy.bytes as i64,
        content_type: &copy.content_type,
    };
    // The same bytes went to this profile before, and its copy is valid.
    if let Some(earlier) = store::reusable_upload(pool, &run.provider, &copy.sha256, REUSE_MARGIN)
        .await
        .map_err(database)?
        && let Some(id) = earlier.provider_file_id.clone()
    {
        store::reuse_upload(pool, &facts, &earlier)
            .await
            .map_err(database)?;
        tracing::info!(key, provider_file_id = %id, "input file: reusing an earlier upload of the same bytes");
        return Ok(value_of(shape, &id, &copy.content_type));
    }
    let lease = engine.uploads.timeout() * 2 + Duration::from_secs(30);
    let row_id = match store::begin_upload(pool, &facts, &engine.worker_id, lease)
        .await
        .map_err(database)?
    {
        UploadClaim::Mine(id) => {
            // Looked again now that this is the only upload of these bytes
            // in flight: one that finished between the look above and the
            // claim (the claim can only succeed once it is no longer in
            // flight) is reused, not uploaded a second time.
            if let Some(earlier) =
                store::reusable_upload(pool, &run.provider, &copy.sha256, REUSE_MARGIN)
                    .await
                    .map_err(database)?
                && let Some(provider_id) = earlier.provider_file_id.clone()
            {
                // Our row is `uploading` under our lease: finish it with
                // the earlier upload's answer (which frees the one-upload
                // index for these bytes at once).
                store::finish_upload(
                    pool,
                    id,
                    &engine.worker_id,
                    &provider_id,
                    earlier.provider_expires_at,
                    earlier.stored_location.as_deref(),
                )
                .await
                .map_err(database)?;
                tracing::info!(key, provider_file_id = %provider_id, "input file: reusing an upload of the same bytes that finished just now");
                return Ok(value_of(shape, &provider_id, &copy.content_type));
            }
            id
        }
        // Another run uploads the same bytes now: its answer is reused.
        UploadClaim::Busy => return Err(retry_soon(run, Duration::from_millis(300))),
        UploadClaim::Done => return Err(retry_soon(run, Duration::ZERO)),
    };
    upload(engine, run, profile, file, &copy, row_id, shape).await
}

fn retry_soon(run: &ClaimedRun, wait: Duration) -> Transition {
    lifecycle::throttled(run.state, wait, Utc::now())
}

/// The file's location as it may be shown and recorded: an http(s) URL
/// without its query (which may carry a signature).
pub(super) fn shown(file: &FileInput) -> String {
    match &file.location {
        FileLocation::Web(url) => redacted(url),
        _ => file.written.clone(),
    }
}

fn too_large(key: &str, limit: u64, seen: u64) -> Transition {
    lifecycle::file_failed(
        "FILE_TOO_LARGE",
        key,
        format!(
            "inputs.{key}: the file is larger than the limit of {limit} bytes ({seen} bytes); nothing was uploaded"
        ),
        None,
    )
}

async fn upload(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &Profile,
    file: &FileInput,
    copy: &LocalCopy,
    row_id: i64,
    shape: Shape,
) -> Result<Value, Transition> {
    let key = file.key.as_str();
    let source = UploadSource {
        path: &copy.path,
        file_name: &copy.file_name,
        content_type: &copy.content_type,
        bytes: copy.bytes,
        media_kind: media::kind(&copy.content_type),
    };
    let timeout = engine.uploads.timeout();
    let outcome = match profile.client.provider() {
        ProviderClient::Chenyu(c) => c.upload_asset(&source, ASSET_TTL_HOURS, timeout).await,
        ProviderClient::Dify(c) => {
            c.upload_file(
                &source,
                &crate::providers::end_user(&run.idempotency_key),
                timeout,
            )
            .await
        }
        ProviderClient::Gptbots(_) => unreachable!("GPTBots takes files by URL"),
    };
    let worker = &engine.worker_id;
    match outcome {
        UploadOutcome::Uploaded { id, expires_at } => {
            let stored = store::finish_upload(&engine.pool, row_id, worker, &id, expires_at, None)
                .await
                .map_err(database)?;
            if !stored {
                // Our lease on the upload ran out and another worker took it.
                return Err(retry_soon(run, Duration::ZERO));
            }
            tracing::info!(key, provider_file_id = %id, bytes = copy.bytes, "input file uploaded");
            Ok(value_of(shape, &id, &copy.content_type))
        }
        UploadOutcome::Refused(e) => {
            let message = format!(
                "inputs.{key}: the provider refused the upload of {} ({}: {}); nothing was submitted",
                shown(file),
                e.code,
                e.message
            );
            let _ = store::fail_upload(
                &engine.pool,
                row_id,
                worker,
                "FILE_UPLOAD_REFUSED",
                &message,
            )
            .await;
            Err(lifecycle::file_failed(
                "FILE_UPLOAD_REFUSED",
                key,
                message,
                Some(e.detail),
            ))
        }
        UploadOutcome::Unclear(u) => {
            let attempts = store::input_file(&engine.pool, run.id, key)
                .await
                .ok()
                .flatten()
                .map_or(1, |row| row.attempts.max(1) as u32);
            let _ =
                store::fail_upload(&engine.pool, row_id, worker, "UPLOAD_UNCLEAR", &u.reason).await;
            tracing::warn!(key, error = %u.reason, attempts, "input file upload got no clear answer");
            Err(lifecycle::upload_unclear(
                run.state,
                key,
                attempts,
                &u.reason,
                &engine.submit,
                Utc::now(),
                fastrand::f64(),
            ))
        }
    }
}
