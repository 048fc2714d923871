//! chenyu `POST /assets`: upload an input file (multipart `file`,
//! `media_type`, `purpose=temp_input`, `ttl_hours`); the answer's
//! `asset_uri` goes into the inputs. The shape comes from a secondary
//! source, so the answer is read defensively: the URI under `asset_uri`,
//! `uri` or `asset.asset_uri`, an `asset://` or http(s) value, an expiry
//! when one is given; anything else is unclear rather than guessed.

use std::time::Duration;

use serde_json::Value;

use super::{Answer, ChenyuClient};
use crate::providers::Unclear;
use crate::providers::files::{UploadOutcome, UploadSource, multipart, read_time};
use crate::providers::wire::{Call, unreadable};

/// The uploaded asset's URI and expiry, from the `data` of the answer.
fn parse_asset(data: &str) -> Result<(String, Option<chrono::DateTime<chrono::Utc>>), Unclear> {
    let data: Value = serde_json::from_str(data).map_err(|e| unreadable("asset upload", e))?;
    let candidates = [
        data.get("asset_uri"),
        data.get("uri"),
        data.pointer("/asset/asset_uri"),
        data.pointer("/asset/uri"),
    ];
    let uri = candidates
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::trim)
        .find(|u| {
            let rest = |p: &str| u.strip_prefix(p).is_some_and(|r| !r.is_empty());
            rest("asset://") || rest("https://") || rest("http://")
        })
        .ok_or_else(|| unreadable("asset upload", "no asset_uri in the answer"))?;
    let expires = [data.get("expires_at"), data.pointer("/asset/expires_at")]
        .into_iter()
        .flatten()
        .find_map(read_time);
    Ok((uri.to_owned(), expires))
}

impl ChenyuClient {
    /// `POST /assets`, bounded by `timeout` (a file takes longer than a call).
    pub async fn upload_asset(
        &self,
        source: &UploadSource<'_>,
        ttl_hours: u32,
        timeout: Duration,
    ) -> UploadOutcome {
        let ttl = ttl_hours.to_string();
        let fields = [
            ("media_type", source.media_kind),
            ("purpose", "temp_input"),
            ("ttl_hours", ttl.as_str()),
        ];
        let (content_type, body, length) = match multipart(&fields, source).await {
            Ok(parts) => parts,
            Err(e) => {
                return UploadOutcome::Unclear(Unclear::new(
                    format!("cannot read the local copy: {e}"),
                    None,
                ));
            }
        };
        let request = self
            .http
            .post(format!("{}/assets", self.base_url))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(reqwest::header::CONTENT_LENGTH, length)
            .timeout(timeout)
            .body(body);
        match self.classify(Call::Other, self.send(request).await) {
            Answer::Data { data, .. } => match parse_asset(&data) {
                Ok((id, expires_at)) => UploadOutcome::Uploaded { id, expires_at },
                Err(u) => UploadOutcome::Unclear(u),
            },
            Answer::Rejected(e) => UploadOutcome::Refused(e),
            Answer::Unclear(u) => UploadOutcome::Unclear(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_answers_are_read_defensively() {
        let (uri, expires) =
            parse_asset(r#"{"asset_uri":"asset://u/1","expires_at":"2030-01-01T00:00:00Z"}"#)
                .unwrap();
        assert_eq!(uri, "asset://u/1");
        assert!(expires.is_some());
        assert_eq!(
            parse_asset(r#"{"asset":{"asset_uri":"asset://u/2"}}"#)
                .unwrap()
                .0,
            "asset://u/2"
        );
        assert_eq!(
            parse_asset(r#"{"uri":"https://cdn/x.png","expires_at":1893456000}"#)
                .unwrap()
                .0,
            "https://cdn/x.png"
        );
        for odd in [
            r#"{}"#,
            r#"{"asset_uri":""}"#,
            r#"{"asset_uri":5}"#,
            r#"{"asset_uri":"asset://"}"#,
            "[]",
            "nope",
        ] {
            assert!(parse_asset(odd).is_err(), "{odd}");
        }
    }
}
