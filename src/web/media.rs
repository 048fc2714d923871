//! Previews of a run's outputs (images, videos, audio), from the mirrored
//! copy when there is one, else from the provider's URL; and the mirrored
//! copies themselves, served from `[storage]`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use serde_json::Value;

use super::queries::run::stored_file;
use super::{WebError, WebState};
use crate::files::media::by_extension;
use crate::store::RunFileRow;

/// How a preview is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// `<img>`.
    Image,
    /// `<video>`.
    Video,
    /// `<audio>`.
    Audio,
    /// A link.
    Other,
}

impl MediaKind {
    /// The kind of a content type (`image/svg+xml` is a link: it can carry
    /// script).
    pub fn of(content_type: &str) -> MediaKind {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.split_once('/') {
            _ if essence == "image/svg+xml" => MediaKind::Other,
            Some(("image", _)) => MediaKind::Image,
            Some(("video", _)) => MediaKind::Video,
            Some(("audio", _)) => MediaKind::Audio,
            _ => MediaKind::Other,
        }
    }
}

/// One output file to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    /// Where it sits in the outputs (`images[0]`).
    pub path: String,
    /// How to show it.
    pub kind: MediaKind,
    /// What the browser loads: `/files/ID` (the stored copy) or the
    /// provider's http(s) URL.
    pub src: String,
    /// Whether `src` is wfq's stored copy.
    pub stored: bool,
}

/// The outputs' files: every http(s) URL in `outputs`, shown from its
/// stored copy (a `done` output row of `files` with that source) when
/// there is one. Other schemes (`javascript:`, `data:`) are never used.
pub fn previews(outputs: Option<&Value>, files: &[RunFileRow]) -> Vec<Preview> {
    let mut found = Vec::new();
    if let Some(outputs) = outputs {
        walk(outputs, String::new(), &mut found);
    }
    found
        .into_iter()
        .map(|(path, url)| {
            let stored = files.iter().find(|f| {
                f.direction == "output"
                    && f.state == "done"
                    && f.stored_location.is_some()
                    && f.source.as_deref() == Some(url.as_str())
            });
            match stored {
                Some(f) => Preview {
                    path,
                    kind: MediaKind::of(
                        f.content_type
                            .as_deref()
                            .unwrap_or_else(|| by_extension(&url)),
                    ),
                    src: format!("/files/{}", f.id),
                    stored: true,
                },
                None => {
                    let file_name = url::Url::parse(&url)
                        .map(|u| u.path().to_owned())
                        .unwrap_or_default();
                    Preview {
                        path,
                        kind: MediaKind::of(by_extension(&file_name)),
                        src: url,
                        stored: false,
                    }
                }
            }
        })
        .collect()
}

fn walk(value: &Value, path: String, out: &mut Vec<(String, String)>) {
    match value {
        Value::String(s) => {
            let lower = s.trim_start().to_ascii_lowercase();
            if (lower.starts_with("https://") || lower.starts_with("http://"))
                && url::Url::parse(s.trim()).is_ok()
            {
                out.push((path, s.trim().to_owned()));
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(v, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(v, p, out);
            }
        }
        _ => {}
    }
}

/// `GET /files/{id}`: a stored copy, streamed from `[storage]`. Media is
/// shown inline; anything else (HTML, SVG, ...) is a download, so a
/// provider's output can never run as a page of the dashboard.
pub async fn serve_file(
    State(state): State<Arc<WebState>>,
    Path(id): Path<i64>,
) -> Result<Response, WebError> {
    let Some(storage) = &state.storage else {
        return Err(WebError::NotFound(
            "no [storage] is configured for the dashboard".into(),
        ));
    };
    let Some(file) = stored_file(&state.pool, id).await? else {
        return Err(WebError::NotFound(format!("file {id} is not stored")));
    };
    let relative = storage
        .relative_of(&file.stored_location)
        .map_err(|e| WebError::NotFound(e.to_string()))?;
    let (size, stream) = storage
        .read(&relative)
        .await
        .map_err(|e| WebError::NotFound(format!("file {id}: {e}")))?;
    let content_type = file
        .content_type
        .clone()
        .unwrap_or_else(|| by_extension(&relative).to_owned());
    let inline = MediaKind::of(&content_type) != MediaKind::Other;
    let mut response = Body::from_stream(stream.map_err(std::io::Error::other)).into_response();
    let h = response.headers_mut();
    let served_type = if inline {
        content_type.as_str()
    } else {
        "application/octet-stream"
    };
    if let Ok(v) = HeaderValue::from_str(served_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static(if inline { "inline" } else { "attachment" }),
    );
    if let Some(size) = size
        && let Ok(v) = HeaderValue::from_str(&size.to_string())
    {
        h.insert(header::CONTENT_LENGTH, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=3600"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(id: i64, source: &str, state: &str, content_type: &str) -> RunFileRow {
        RunFileRow {
            id,
            run_id: 1,
            direction: "output".into(),
            key: "k".into(),
            position: 0,
            profile: "chenyu".into(),
            source: Some(source.into()),
            sha256: None,
            bytes: None,
            content_type: Some(content_type.into()),
            provider_file_id: None,
            provider_expires_at: None,
            stored_location: Some("file:///m/1/k.png".into()),
            state: state.into(),
            attempts: 1,
            due_at: chrono::Utc::now(),
            error_code: None,
            error: None,
            updated_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn urls_become_previews_from_the_stored_copy_first() {
        let outputs = json!({
            "images": ["https://p.example/a.png", "https://p.example/b.jpg"],
            "video": "https://p.example/v.mp4?sig=1",
            "text": "hello",
            "evil": "javascript:alert(1)",
            "data": "data:image/png;base64,AAAA",
            "page": "https://p.example/x.html",
        });
        let files = [
            file(7, "https://p.example/a.png", "done", "image/png"),
            file(8, "https://p.example/b.jpg", "failed", "image/jpeg"),
        ];
        let got = previews(Some(&outputs), &files);
        let got: Vec<(&str, MediaKind, &str, bool)> = got
            .iter()
            .map(|p| (p.path.as_str(), p.kind, p.src.as_str(), p.stored))
            .collect();
        assert_eq!(
            got,
            vec![
                ("images[0]", MediaKind::Image, "/files/7", true),
                (
                    "images[1]",
                    MediaKind::Image,
                    "https://p.example/b.jpg",
                    false
                ),
                ("page", MediaKind::Other, "https://p.example/x.html", false),
                (
                    "video",
                    MediaKind::Video,
                    "https://p.example/v.mp4?sig=1",
                    false
                ),
            ]
        );
    }

    #[test]
    fn script_carrying_types_are_not_media() {
        assert_eq!(MediaKind::of("image/svg+xml"), MediaKind::Other);
        assert_eq!(MediaKind::of("text/html"), MediaKind::Other);
        assert_eq!(MediaKind::of("Audio/MPEG; x=1"), MediaKind::Audio);
    }
}
