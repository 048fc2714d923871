//! File uploads, shared by the clients: what is uploaded, what came back,
//! and a multipart body streamed from a local file (never whole in memory).

use std::path::Path;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::io::AsyncReadExt;

use super::{ProviderError, Unclear};

/// A local copy of an input file, ready to upload.
#[derive(Debug, Clone, Copy)]
pub struct UploadSource<'a> {
    /// The local copy.
    pub path: &'a Path,
    /// The name the provider is told.
    pub file_name: &'a str,
    /// Its content type.
    pub content_type: &'a str,
    /// Its size.
    pub bytes: u64,
    /// `image`, `video`, `audio` or `document`.
    pub media_kind: &'a str,
}

/// The provider's answer to an upload.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadOutcome {
    /// Stored at the provider under this id (chenyu `asset_uri`, Dify
    /// `upload_file_id`), until `expires_at` when told.
    Uploaded {
        /// What goes into the inputs.
        id: String,
        /// Until when the provider keeps it.
        expires_at: Option<DateTime<Utc>>,
    },
    /// Refused for good (too large, a type it does not take, ...).
    Refused(ProviderError),
    /// No usable answer: try again later.
    Unclear(Unclear),
}

/// Dify's upload limits (`system_parameters` of `GET /parameters`), in
/// bytes, and the file types each file input takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileLimits {
    /// Documents and anything else.
    pub file: Option<u64>,
    /// Images.
    pub image: Option<u64>,
    /// Audio.
    pub audio: Option<u64>,
    /// Video.
    pub video: Option<u64>,
    /// `allowed_file_types` of each `file` / `file-list` input, by variable
    /// (`image`, `document`, `audio`, `video`, `custom`).
    pub types: Vec<(String, Vec<String>)>,
}

impl FileLimits {
    /// The limit for a file of `media_kind`.
    pub fn for_kind(&self, media_kind: &str) -> Option<u64> {
        match media_kind {
            "image" => self.image.or(self.file),
            "audio" => self.audio.or(self.file),
            "video" => self.video.or(self.file),
            _ => self.file,
        }
    }

    /// Whether input `key` takes a file of `media_kind`: yes when the app
    /// names no types for it, or allows `custom` ones (by extension).
    pub fn accepts(&self, key: &str, media_kind: &str) -> bool {
        match self.types.iter().find(|(k, _)| k == key) {
            None => true,
            Some((_, types)) => {
                types.is_empty() || types.iter().any(|t| t == media_kind || t == "custom")
            }
        }
    }

    /// The types input `key` takes, as the app lists them.
    pub fn types_of(&self, key: &str) -> &[String] {
        self.types
            .iter()
            .find(|(k, _)| k == key)
            .map_or(&[], |(_, t)| t.as_slice())
    }
}

/// A multipart/form-data body: the text `fields`, then the file as part
/// `file`, streamed from disk. Returns the content type and the body.
pub(crate) async fn multipart(
    fields: &[(&str, &str)],
    source: &UploadSource<'_>,
) -> std::io::Result<(String, reqwest::Body, u64)> {
    let boundary = format!("wfq-{}", uuid::Uuid::new_v4().simple());
    let quote = |s: &str| s.replace(['"', '\r', '\n'], "_");
    let mut head = String::new();
    for (name, value) in fields {
        head.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{value}\r\n",
            quote(name)
        ));
    }
    head.push_str(&format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\nContent-Type: {}\r\n\r\n",
        quote(source.file_name),
        quote(source.content_type)
    ));
    let tail = format!("\r\n--{boundary}--\r\n");
    let length = head.len() as u64 + source.bytes + tail.len() as u64;
    let file = tokio::fs::File::open(source.path).await?;
    let head =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) });
    let tail =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(tail)) });
    let body = futures_util::stream::unfold(file, |mut file| async move {
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
    use futures_util::StreamExt;
    let stream = head.chain(body).chain(tail);
    Ok((
        format!("multipart/form-data; boundary={boundary}"),
        reqwest::Body::wrap_stream(stream),
        length,
    ))
}

/// An RFC 3339 time or a Unix time in seconds (or milliseconds), as a
/// provider might write an expiry.
pub(crate) fn read_time(value: &serde_json::Value) -> Option<DateTime<Utc>> {
    match value {
        serde_json::Value::String(s) => DateTime::parse_from_rfc3339(s.trim())
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        serde_json::Value::Number(n) => {
            let n = n.as_i64()?;
            let secs = if n > 100_000_000_000 { n / 1000 } else { n };
            DateTime::from_timestamp(secs, 0)
        }
        _ => None,
    }
}
