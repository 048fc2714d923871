//! File uploads: chenyu `POST /assets` (multipart `file`, `media_type`,
//! `purpose`, `ttl_hours`; answers `asset_uri`, a shape known only from a
//! secondary source) and Dify `POST /files/upload` (multipart `file` and
//! `user`; answers the upload's `id`). Every accepted upload is recorded in
//! the uploads ledger (`SimServer::uploads`, `GET /_sim/uploads`), so a test
//! can count what was uploaded.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;

use super::envelope::{self, ApiError};
use super::faults::Injected;
use super::gate::{self, Denied, Endpoint};
use super::hold::{self, Gate};
use super::state::Shared;

/// One accepted upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadEntry {
    /// `chenyu` or `dify`.
    pub api: String,
    /// The Dify app (`None` for chenyu).
    pub app: Option<String>,
    /// The provider's id of the file (chenyu asset id, Dify upload id).
    pub id: String,
    /// chenyu: the `asset_uri` handed back.
    pub uri: Option<String>,
    /// The part's file name.
    pub file_name: String,
    /// The part's content type.
    pub content_type: Option<String>,
    /// chenyu `media_type` / Dify: none.
    pub media_type: Option<String>,
    /// chenyu `purpose`.
    pub purpose: Option<String>,
    /// Dify `user`.
    pub user: Option<String>,
    /// Size of the file part.
    pub bytes: u64,
    /// SHA-256 of the file part, lowercase hex.
    pub sha256: String,
}

/// One part of a multipart body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    pub name: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

/// The parts of a `multipart/form-data` body; `Err` says what is wrong.
pub(crate) fn parse_multipart(headers: &HeaderMap, body: &Bytes) -> Result<Vec<Part>, String> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_owned())
        .filter(|_| {
            content_type
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        })
        .ok_or("expected a multipart/form-data body with a boundary")?;
    let delimiter = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| -> Option<usize> {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let mut at = find(body, delimiter.as_bytes(), 0).ok_or("no multipart boundary in the body")?;
    loop {
        let after = at + delimiter.len();
        if body.get(after..after + 2) == Some(b"--") {
            return Ok(parts);
        }
        let head_start = after + 2; // \r\n
        let head_end = find(body, b"\r\n\r\n", head_start).ok_or("a part without headers")?;
        let head = String::from_utf8_lossy(&body[head_start..head_end]).into_owned();
        let data_start = head_end + 4;
        let closing = format!("\r\n{delimiter}");
        let data_end =
            find(body, closing.as_bytes(), data_start).ok_or("a part that never ends")?;
        let mut part = Part {
            name: String::new(),
            file_name: None,
            content_type: None,
            data: body.slice(data_start..data_end),
        };
        for line in head.split("\r\n") {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "content-disposition" => {
                    for param in value.split(';').map(str::trim) {
                        if let Some(v) = param.strip_prefix("name=") {
                            part.name = v.trim_matches('"').to_owned();
                        } else if let Some(v) = param.strip_prefix("filename=") {
                            part.file_name = Some(v.trim_matches('"').to_owned());
                        }
                    }
                }
                "content-type" => part.content_type = Some(value.trim().to_owned()),
                _ => {}
            }
        }
        parts.push(part);
        at = data_end + 2;
    }
}

fn text(parts: &[Part], name: &str) -> Option<String> {
    parts
        .iter()
        .find(|p| p.name == name && p.file_name.is_none())
        .map(|p| String::from_utf8_lossy(&p.data).into_owned())
}

/// The shared gate, answered in chenyu's envelope.
async fn chenyu_gate(shared: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    gate::check(shared, headers, Endpoint::Other)
        .await
        .map_err(|denied| match denied {
            Denied::Unauthorized => envelope::plain(StatusCode::UNAUTHORIZED, "invalid api key"),
            Denied::Malformed(n) => envelope::malformed(n),
            Denied::RateLimited { retry_after_secs } => envelope::with_retry_after(
                envelope::plain(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many requests: rate limit exceeded",
                ),
                retry_after_secs,
            ),
        })
}

/// What the upload checks decided, under the lock.
enum Admit {
    Fault,
    TooLarge(u64),
    Recorded(Box<UploadEntry>),
}

fn admit(
    shared: &Shared,
    mut entry: UploadEntry,
    make_id: impl FnOnce(usize) -> (String, Option<String>),
) -> Admit {
    let mut inner = shared.lock();
    inner.stats.upload_requests += 1;
    if inner.faults.take_upload_fault() {
        inner.record_injected(Injected::Unavailable);
        return Admit::Fault;
    }
    if let Some(limit) = inner.faults.max_upload_bytes
        && entry.bytes > limit
    {
        return Admit::TooLarge(limit);
    }
    let (id, uri) = make_id(inner.uploads.len() + 1);
    entry.id = id;
    entry.uri = uri;
    inner.stats.uploads_accepted += 1;
    inner.uploads.push(entry.clone());
    Admit::Recorded(Box::new(entry))
}

fn entry(api: &str, app: Option<String>, file: &Part, parts: &[Part]) -> UploadEntry {
    UploadEntry {
        api: api.to_owned(),
        app,
        id: String::new(),
        uri: None,
        file_name: file.file_name.clone().unwrap_or_default(),
        content_type: file.content_type.clone(),
        media_type: text(parts, "media_type"),
        purpose: text(parts, "purpose"),
        user: text(parts, "user"),
        bytes: file.data.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&file.data)),
    }
}

/// chenyu `POST /assets`.
pub(crate) async fn chenyu_assets(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(denied) = chenyu_gate(&shared, &headers).await {
        return denied;
    }
    let invalid = |detail: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid asset upload",
            "INVALID_ASSET",
            detail,
        )
        .into_response()
    };
    let parts = match parse_multipart(&headers, &body) {
        Ok(parts) => parts,
        Err(e) => return invalid(e),
    };
    let Some(file) = parts
        .iter()
        .find(|p| p.name == "file" && p.file_name.is_some())
    else {
        return invalid("the multipart body has no `file` part".into());
    };
    let ttl_hours: u64 = text(&parts, "ttl_hours")
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(24);
    let record = entry("chenyu", None, file, &parts);
    match admit(&shared, record, |n| {
        let id = format!("asset_{n:06}");
        let uri = format!("asset://sim/{id}");
        (id, Some(uri))
    }) {
        Admit::Fault => envelope::injected(Injected::Unavailable),
        Admit::TooLarge(limit) => ApiError {
            http: StatusCode::OK,
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "file too large",
                "FILE_TOO_LARGE",
                format!("the file is larger than {limit} bytes"),
            )
        }
        .into_response(),
        Admit::Recorded(e) => {
            hold::pass(&shared, Gate::UploadAnswers).await;
            let expires = chrono::Utc::now() + chrono::Duration::hours(ttl_hours as i64);
            envelope::ok(
                "上传成功",
                json!({
                    "asset_uri": e.uri,
                    "asset_id": e.id,
                    "media_type": e.media_type,
                    "size": e.bytes,
                    "expires_at": expires.to_rfc3339(),
                }),
            )
        }
    }
}

/// Dify `POST /files/upload` (the app from the path).
pub(crate) async fn dify_upload(
    State(shared): State<Arc<Shared>>,
    Path(segments): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let error = |status: StatusCode, code: &str, message: String| {
        (
            status,
            Json(json!({"code": code, "message": message, "status": status.as_u16()})),
        )
            .into_response()
    };
    match gate::check(&shared, &headers, Endpoint::Other).await {
        Ok(()) => {}
        Err(Denied::Unauthorized) => {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Access token is invalid".into(),
            );
        }
        Err(Denied::Malformed(n)) => return envelope::malformed(n),
        Err(Denied::RateLimited { retry_after_secs }) => {
            return envelope::with_retry_after(
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    "Too many requests".into(),
                ),
                retry_after_secs,
            );
        }
    }
    let parts = match parse_multipart(&headers, &body) {
        Ok(parts) => parts,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_param", e),
    };
    let Some(file) = parts
        .iter()
        .find(|p| p.name == "file" && p.file_name.is_some())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "no_file_uploaded",
            "Please upload your file.".into(),
        );
    };
    let app = segments.get("app").cloned();
    let record = entry("dify", app, file, &parts);
    match admit(&shared, record, |_| {
        (uuid::Uuid::new_v4().to_string(), None)
    }) {
        Admit::Fault => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "service unavailable (injected)".into(),
        ),
        Admit::TooLarge(limit) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            format!("File size exceeded. {limit} bytes at most"),
        ),
        Admit::Recorded(e) => {
            hold::pass(&shared, Gate::UploadAnswers).await;
            let extension = e.file_name.rsplit_once('.').map(|(_, x)| x.to_owned());
            (
                StatusCode::CREATED,
                Json(json!({
                    "id": e.id,
                    "name": e.file_name,
                    "size": e.bytes,
                    "extension": extension,
                    "mime_type": e.content_type,
                    "created_by": e.user,
                    "created_at": chrono::Utc::now().timestamp(),
                })),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_are_read_part_by_part() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=XyZ".parse().unwrap(),
        );
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\ntemp_input\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n--x\r\n--XyZ--\r\n",
        );
        let parts = parse_multipart(&headers, &body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(text(&parts, "purpose").as_deref(), Some("temp_input"));
        assert_eq!(parts[1].file_name.as_deref(), Some("a.png"));
        assert_eq!(&parts[1].data[..], b"\x89PNG\r\n--x");
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(parse_multipart(&headers, &body).is_err());
    }
}
