//! One copy: GET the provider's link and stream its body into the store,
//! with a size limit and a timeout, hashing it on the way. Never holds the
//! file in memory; never sends a provider's API key to a link.

use futures_util::StreamExt;

use super::decide::Attempt;
use crate::files::media;
use crate::files::{Storage, WriteError};
use crate::store::ClaimedMirror;

/// The stored name of a copy: `<run id>/<key>.<ext>` for a single value,
/// `<run id>/<key>/<n>.<ext>` for an item of a list.
pub fn relative_path(claim: &ClaimedMirror, extension: &str) -> String {
    let safe = |s: &str| -> String {
        let cleaned: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        match cleaned.trim_matches('.') {
            "" => "_".to_owned(),
            t => t.to_owned(),
        }
    };
    let in_list = claim
        .json_path
        .get(1)
        .is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()));
    if in_list {
        format!(
            "{}/{}/{}.{extension}",
            claim.run_id,
            safe(&claim.key),
            claim.position
        )
    } else {
        format!("{}/{}.{extension}", claim.run_id, safe(&claim.key))
    }
}

/// Copies `claim`'s link into `storage`; `declared` is the output's type in
/// the workflow's output manifest, when known.
pub async fn copy(
    http: &reqwest::Client,
    storage: &Storage,
    claim: &ClaimedMirror,
    declared: Option<&str>,
) -> Attempt {
    let Some(source) = claim.source.as_deref() else {
        return Attempt::Refused {
            reason: "no source URL recorded".into(),
        };
    };
    let url = match url::Url::parse(source) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => url,
        _ => {
            return Attempt::Refused {
                reason: "the output is not an http(s) URL".into(),
            };
        }
    };
    let limit = storage.config().max_file_bytes;
    let response = match http.get(url.clone()).send().await {
        Ok(response) => response,
        Err(e) => {
            return Attempt::Transient {
                reason: format!("no answer: {}", e.without_url()),
            };
        }
    };
    let status = response.status().as_u16();
    match status {
        200..=299 => {}
        401 | 403 | 404 | 410 => return Attempt::Expired { status },
        408 | 425 | 429 | 500..=599 => {
            return Attempt::Transient {
                reason: format!("HTTP {status}"),
            };
        }
        _ => {
            return Attempt::Refused {
                reason: format!("the link answered HTTP {status}"),
            };
        }
    }
    let announced = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media::essence)
        .unwrap_or_default();
    let file_name = url
        .path_segments()
        .and_then(|mut s| s.next_back().map(str::to_owned))
        .unwrap_or_default();
    // A server that does not say what it sends is judged by the name.
    let mut content_type = if announced.is_empty() || announced == "application/octet-stream" {
        media::by_extension(&file_name).to_owned()
    } else {
        announced
    };
    if !media::output_is_media(declared, &content_type) {
        return Attempt::NotMedia { content_type };
    }
    if !media::is_media(&content_type) {
        // Media by the manifest, though the link does not say which kind:
        // stored as bytes (`.bin`) rather than under a wrong extension.
        content_type = "application/octet-stream".to_owned();
    }
    if let Some(length) = response.content_length()
        && length > limit
    {
        return Attempt::TooLarge {
            limit,
            seen: length,
        };
    }
    let relative = relative_path(claim, media::extension(&content_type));
    let body = response
        .bytes_stream()
        .map(|chunk| chunk.map_err(|e| e.without_url()));
    match storage.write_stream(&relative, body, limit).await {
        Ok(stored) => Attempt::Stored {
            stored,
            content_type,
        },
        Err(WriteError::TooLarge { limit, seen }) => Attempt::TooLarge { limit, seen },
        Err(WriteError::Source { seen, message }) => Attempt::Transient {
            reason: format!("the download broke off after {seen} bytes: {message}"),
        },
        Err(WriteError::Store(e)) => Attempt::Transient {
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names() {
        let claim = |key: &str, position: i32, path: &[&str]| ClaimedMirror {
            id: 1,
            run_id: 42,
            key: key.into(),
            position,
            source: None,
            attempts: 0,
            json_path: path.iter().map(|s| (*s).to_owned()).collect(),
            profile: "chenyu".into(),
            workflow_id: "wf".into(),
        };
        assert_eq!(
            relative_path(&claim("n9_images", 0, &["n9_images"]), "png"),
            "42/n9_images.png"
        );
        assert_eq!(
            relative_path(&claim("frames", 3, &["frames", "3"]), "png"),
            "42/frames/3.png"
        );
        assert_eq!(
            relative_path(&claim("doc", 0, &["doc", "url"]), "pdf"),
            "42/doc.pdf"
        );
        assert_eq!(
            relative_path(&claim("../x/y", 0, &["../x/y"]), "png"),
            "42/_x_y.png"
        );
    }
}
