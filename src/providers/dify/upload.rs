//! Dify `POST /files/upload` (multipart `file` and `user`): the answer's
//! `id` goes into the input as `{"type", "transfer_method": "local_file",
//! "upload_file_id"}`. The limits come from `GET /parameters`
//! (`system_parameters`, in MB).

use std::time::Duration;

use serde_json::Value;

use super::{DifyClient, Failure, classify_error};
use crate::providers::Unclear;
use crate::providers::files::{FileLimits, UploadOutcome, UploadSource, multipart};
use crate::providers::wire::{Call, repaired, unreadable};

fn parse_limits(body: &[u8], limits: &crate::providers::AnswerLimits) -> Option<FileLimits> {
    let value: Value = serde_json::from_str(&repaired(body, limits).0).ok()?;
    let system = value.get("system_parameters")?;
    // Each form item is `{"<control>": {variable, allowed_file_types, ...}}`.
    let types = value
        .get("user_input_form")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|item| item.iter())
        .filter(|(control, _)| matches!(control.as_str(), "file" | "file-list"))
        .filter_map(|(_, spec)| {
            let variable = spec.get("variable")?.as_str()?.to_owned();
            let allowed = spec
                .get("allowed_file_types")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            Some((variable, allowed))
        })
        .collect();
    let mb = |name: &str| {
        system
            .get(name)
            .and_then(Value::as_f64)
            .filter(|n| *n > 0.0)
            .map(|n| (n * 1024.0 * 1024.0) as u64)
    };
    Some(FileLimits {
        file: mb("file_size_limit"),
        image: mb("image_file_size_limit"),
        audio: mb("audio_file_size_limit"),
        video: mb("video_file_size_limit"),
        types,
    })
}

impl DifyClient {
    /// The app's upload limits and file types; `None` when they cannot be
    /// read.
    pub async fn file_limits(&self) -> Option<FileLimits> {
        let request = self
            .http
            .get(format!("{}/parameters", self.base_url))
            .query(&[("user", "wfq")]);
        let raw = self.send(request).await.ok()?;
        raw.status
            .is_success()
            .then(|| parse_limits(&raw.body, &self.limits))
            .flatten()
    }

    /// `POST /files/upload` as end user `user`, bounded by `timeout`.
    pub async fn upload_file(
        &self,
        source: &UploadSource<'_>,
        user: &str,
        timeout: Duration,
    ) -> UploadOutcome {
        let (content_type, body, length) = match multipart(&[("user", user)], source).await {
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
            .post(format!("{}/files/upload", self.base_url))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(reqwest::header::CONTENT_LENGTH, length)
            .timeout(timeout)
            .body(body);
        let raw = match self.send(request).await {
            Ok(raw) => raw,
            Err(u) => return UploadOutcome::Unclear(u),
        };
        if !raw.status.is_success() {
            return match classify_error(&raw, Call::Other, &self.limits) {
                Failure::Rejected(e) => UploadOutcome::Refused(e),
                Failure::Unclear(u) => UploadOutcome::Unclear(u),
            };
        }
        let answer: Result<Value, _> = serde_json::from_str(&repaired(&raw.body, &self.limits).0);
        match answer
            .ok()
            .as_ref()
            .and_then(|a| a.get("id"))
            .and_then(Value::as_str)
        {
            Some(id) if !id.trim().is_empty() => UploadOutcome::Uploaded {
                id: id.trim().to_owned(),
                expires_at: None,
            },
            _ => UploadOutcome::Unclear(unreadable("file upload", "no id in the answer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_read_in_megabytes() {
        let body = br#"{"user_input_form":[],"system_parameters":{"file_size_limit":15,"image_file_size_limit":10,"audio_file_size_limit":50,"video_file_size_limit":100}}"#;
        let limits = parse_limits(body, &Default::default()).unwrap();
        assert_eq!(limits.for_kind("image"), Some(10 << 20));
        assert_eq!(limits.for_kind("document"), Some(15 << 20));
        assert!(limits.accepts("anything", "video"));
        let body = br#"{"user_input_form":[{"paragraph":{"variable":"q"}},
            {"file":{"variable":"photo","allowed_file_types":["image"]}},
            {"file-list":{"variable":"docs","allowed_file_types":["document","custom"]}}],
            "system_parameters":{}}"#;
        let limits = parse_limits(body, &Default::default()).unwrap();
        assert!(limits.accepts("photo", "image") && !limits.accepts("photo", "audio"));
        assert!(
            limits.accepts("docs", "video"),
            "custom types go by extension"
        );
        assert_eq!(limits.types_of("photo"), ["image".to_owned()]);
        assert_eq!(limits.for_kind("image"), None);
        assert!(parse_limits(b"{}", &Default::default()).is_none());
    }
}
