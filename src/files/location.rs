//! `{"$file": "<location>"}` input values, read at the edge into typed
//! locations; and the inputs with those values set aside.

use std::borrow::Cow;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::inputs::InputError;

/// The member that marks a file input.
pub const FILE_MARKER: &str = "$file";

/// Where an input file is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileLocation {
    /// A path in the configured `[storage]` (no scheme, no leading slash).
    Stored(String),
    /// An object in an S3 bucket.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
    /// A file on the worker's machine (`file:///abs/path`).
    Local(PathBuf),
    /// An http(s) URL to fetch and upload again (GPTBots gets it as is).
    Web(url::Url),
}

impl FileLocation {
    /// Reads a location; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<FileLocation, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("an empty location".into());
        }
        let Some((scheme, _)) = text.split_once("://") else {
            if text.starts_with('/') || text.split('/').any(|part| part == ".." || part.is_empty())
            {
                return Err(format!(
                    "`{text}`: a path in the store is relative, without `..` or empty parts (use file:///abs/path for a local file)"
                ));
            }
            return Ok(FileLocation::Stored(text.to_owned()));
        };
        let url = url::Url::parse(text).map_err(|e| format!("`{text}`: {e}"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "file" => url
                .to_file_path()
                .map(FileLocation::Local)
                .map_err(|()| format!("`{text}`: not an absolute local path")),
            "s3" => {
                let bucket = url.host_str().unwrap_or_default().to_owned();
                let key = url.path().trim_start_matches('/').to_owned();
                if bucket.is_empty() || key.is_empty() {
                    return Err(format!("`{text}`: use s3://bucket/key"));
                }
                Ok(FileLocation::S3 { bucket, key })
            }
            "http" | "https" if url.host_str().is_some() => Ok(FileLocation::Web(url)),
            other => Err(format!(
                "`{text}`: scheme {other}: is not readable (a store path, file://, s3://, http(s)://)"
            )),
        }
    }

    /// The file's name, for the upload and for content-type guesses.
    pub fn file_name(&self) -> String {
        let name = match self {
            FileLocation::Stored(path) => path.rsplit('/').next().unwrap_or_default().to_owned(),
            FileLocation::S3 { key, .. } => key.rsplit('/').next().unwrap_or_default().to_owned(),
            FileLocation::Local(path) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            FileLocation::Web(url) => url
                .path_segments()
                .and_then(|mut s| s.next_back().map(str::to_owned))
                .unwrap_or_default(),
        };
        if name.is_empty() {
            "file".to_owned()
        } else {
            name
        }
    }
}

/// Whether `url` carries a signature in its query (an S3/GCS presigned
/// URL, or any `signature` / `sig` parameter): such a URL grants access
/// like a password for as long as it is valid.
pub fn is_signed_url(url: &url::Url) -> bool {
    url.query_pairs().any(|(name, _)| {
        let name = name.to_ascii_lowercase();
        name.contains("signature") || name.contains("credential") || name == "sig"
    })
}

/// Drops the query of every signed http(s) URL in the strings of `value`
/// (e.g. a provider's echo of the inputs it was sent, or an error object
/// quoting a link), so that a presigned URL is never recorded.
pub fn redact_signed_urls(value: &mut Value) {
    match value {
        Value::String(text) => {
            if let Cow::Owned(clean) = redact_signed_urls_in_text_cow(text) {
                *text = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_signed_urls),
        Value::Object(members) => members.values_mut().for_each(redact_signed_urls),
        _ => {}
    }
}

/// `text` with the query of every signed http(s) URL in it dropped (an
/// error message that quotes the link it could not fetch), and the value
/// of every signing parameter left elsewhere in it replaced (see
/// [`scrub_signing_values`]).
pub fn redact_signed_urls_in_text(text: &str) -> String {
    redact_signed_urls_in_text_cow(text).into_owned()
}

fn redact_signed_urls_in_text_cow(text: &str) -> Cow<'_, str> {
    let urls_cut = if text.contains("http://") || text.contains("https://") {
        Cow::Owned(drop_signed_queries(text))
    } else {
        Cow::Borrowed(text)
    };
    match scrub_signing_values(&urls_cut) {
        Cow::Owned(scrubbed) => Cow::Owned(scrubbed),
        Cow::Borrowed(_) => urls_cut,
    }
}

/// The query parameters that carry an S3/GCS signature or the key it was
/// made with; their values are scrubbed wherever they appear.
const SIGNING_PARAMETERS: [&str; 5] = [
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
];

/// What a scrubbed signing value is replaced with.
pub const SCRUBBED: &str = "REDACTED";

/// `text` with the value of every signing parameter (`X-Amz-Signature`,
/// `X-Amz-Credential`, `X-Amz-Security-Token`, `X-Goog-Signature`,
/// `X-Goog-Credential`, in any case) replaced by [`SCRUBBED`]. This
/// catches what the URL pass cannot see as a URL: a JSON-escaped link
/// (`https:\/\/...`) in a body snippet, a percent-encoded one (`%3D`
/// after the name, `%26` ending the value), or a bare `name=value`.
/// A name not followed by `=`, `:` or `%3D` is left alone.
pub fn scrub_signing_values(text: &str) -> Cow<'_, str> {
    let lower = text.to_ascii_lowercase();
    let mut out = String::new();
    let mut copied = 0;
    let mut from = 0;
    while let Some((at, name)) = SIGNING_PARAMETERS
        .iter()
        .filter_map(|name| lower[from..].find(name).map(|i| (from + i, name.len())))
        .min()
    {
        let after_name = at + name;
        from = after_name;
        let Some(value_start) = value_start(&lower, after_name) else {
            continue;
        };
        let value_end = value_end(&lower, value_start);
        if value_end == value_start {
            continue;
        }
        out.push_str(&text[copied..value_start]);
        out.push_str(SCRUBBED);
        copied = value_end;
        from = value_end;
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Where the value after a signing parameter's name starts: past the
/// separator (`=`, `:`, `%3D`, `%253D`, JSON's `\u003d`) and any quotes, backslashes or
/// blanks around it; `None` when no separator follows the name.
fn value_start(lower: &str, mut at: usize) -> Option<usize> {
    let skip_filler = |at: &mut usize| {
        while let Some(c) = lower[*at..].chars().next() {
            if c.is_whitespace() || "\"'\\".contains(c) {
                *at += c.len_utf8();
            } else if lower[*at..].starts_with("%22") {
                *at += 3;
            } else {
                break;
            }
        }
    };
    skip_filler(&mut at);
    let rest = &lower[at..];
    let separator = ["=", ":", "%3d", "%253d", "u003d"]
        .into_iter()
        .find(|s| rest.starts_with(s))?;
    at += separator.len();
    skip_filler(&mut at);
    Some(at)
}

/// Where a signing value starting at `at` ends: at a blank, a quote, a
/// bracket, a backslash (a JSON escape such as `\u0026`), `&`, `#`, `,`,
/// `;`, or a percent-encoded `&` (`%26`, `%2526`).
fn value_end(lower: &str, at: usize) -> usize {
    let mut end = at;
    while let Some(c) = lower[end..].chars().next() {
        let rest = &lower[end..];
        if c.is_whitespace()
            || "\"'<>()[]{},;&#`\\".contains(c)
            || rest.starts_with("%26")
            || rest.starts_with("%2526")
        {
            break;
        }
        end += c.len_utf8();
    }
    end
}

/// `text` with the query of every signed http(s) URL in it dropped.
fn drop_signed_queries(text: &str) -> String {
    let ends = |c: char| c.is_whitespace() || "\"'<>()[]{},\\`".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest
        .find("http://")
        .into_iter()
        .chain(rest.find("https://"))
        .min()
    {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let len = tail.find(ends).unwrap_or(tail.len());
        // Punctuation closing the sentence the link is in is not the link's.
        let len = tail[..len]
            .trim_end_matches(['.', ':', ';', '!', '?'])
            .len();
        let (candidate, after) = tail.split_at(len);
        match url::Url::parse(candidate) {
            Ok(mut url) if is_signed_url(&url) => {
                url.set_query(None);
                url.set_fragment(None);
                out.push_str(url.as_str());
            }
            _ => out.push_str(candidate),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// One file input of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInput {
    /// The inputs key.
    pub key: String,
    /// Where to read it.
    pub location: FileLocation,
    /// The location as written (recorded as the file's source).
    pub written: String,
}

/// The inputs with every file value replaced by a placeholder that passes
/// the manifest's media checks, and the files themselves.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitInputs {
    /// The inputs to check against the manifest.
    pub inputs: Map<String, Value>,
    /// The file inputs, in key order.
    pub files: Vec<FileInput>,
}

/// The placeholder a file value stands as until it is uploaded.
pub fn placeholder(key: &str) -> Value {
    Value::String(format!("asset://wfq-pending/{key}"))
}

/// Sets the `{"$file": ...}` values of `inputs` aside. A value that has a
/// `$file` member and is not exactly `{"$file": "<location>"}` is refused,
/// naming its key.
pub fn split_inputs(inputs: &Map<String, Value>) -> Result<SplitInputs, InputError> {
    let mut out = inputs.clone();
    let mut files = Vec::new();
    for (key, value) in inputs {
        let Value::Object(object) = value else {
            continue;
        };
        let Some(location) = object.get(FILE_MARKER) else {
            continue;
        };
        let wrong = |got: String| InputError::WrongType {
            key: key.clone(),
            expected: r#"a file as {"$file": "<store path | file:// | s3:// | https:// URL>"}"#
                .into(),
            got,
        };
        if object.len() != 1 {
            return Err(wrong(format!("an object with {} members", object.len())));
        }
        let Some(text) = location.as_str() else {
            return Err(wrong(format!("$file = {location}")));
        };
        let location = FileLocation::parse(text).map_err(wrong)?;
        files.push(FileInput {
            key: key.clone(),
            location,
            written: text.trim().to_owned(),
        });
        out.insert(key.clone(), placeholder(key));
    }
    Ok(SplitInputs { inputs: out, files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn locations() {
        assert_eq!(
            FileLocation::parse("inputs/boat.png"),
            Ok(FileLocation::Stored("inputs/boat.png".into()))
        );
        assert_eq!(
            FileLocation::parse("file:///tmp/boat.png"),
            Ok(FileLocation::Local("/tmp/boat.png".into()))
        );
        assert_eq!(
            FileLocation::parse("s3://b/in/boat.png"),
            Ok(FileLocation::S3 {
                bucket: "b".into(),
                key: "in/boat.png".into()
            })
        );
        assert!(matches!(
            FileLocation::parse("https://example.com/a/boat.png?sig=1"),
            Ok(FileLocation::Web(_))
        ));
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "ftp://x/y",
            "s3://bucket",
            "file://relative",
        ] {
            assert!(FileLocation::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            FileLocation::parse("https://x/a/boat.png?x=1")
                .unwrap()
                .file_name(),
            "boat.png"
        );
    }

    #[test]
    fn signed_urls_lose_their_query() {
        let mut echo = json!({"topic": "x", "files": [
            "https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4&X-Amz-Signature=abc",
            "https://cdn.example/p.png?size=2",
            "https://storage.googleapis.com/b/o?X-Goog-Credential=a&X-Goog-Signature=b",
            "not a url ?sig=1",
        ]});
        redact_signed_urls(&mut echo);
        assert_eq!(
            redact_signed_urls_in_text(
                "cannot fetch \"https://b.s3.x/k.png?X-Amz-Signature=abc&a=1\": 403; see http://docs/x?page=2 or https://h/p?sig=9"
            ),
            "cannot fetch \"https://b.s3.x/k.png\": 403; see http://docs/x?page=2 or https://h/p"
        );
        assert_eq!(redact_signed_urls_in_text("no links"), "no links");
        assert_eq!(
            echo,
            json!({"topic": "x", "files": [
                "https://b.s3.amazonaws.com/k.png",
                "https://cdn.example/p.png?size=2",
                "https://storage.googleapis.com/b/o",
                "not a url ?sig=1",
            ]})
        );
    }

    #[test]
    fn signing_values_are_scrubbed_wherever_they_appear() {
        let table = [
            // A JSON-escaped link in a body snippet: not seen as a URL.
            (
                r#"{"error":"cannot fetch https:\/\/b.s3.x\/k.png?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc"}"#,
                r#"{"error":"cannot fetch https:\/\/b.s3.x\/k.png?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"}"#,
            ),
            // Percent-encoded, as a link passed in another link's query.
            (
                "u=https%3A%2F%2Fb%2Fk%3FX-Amz-Signature%3Dabc%26X-Amz-Security-Token%3DT0k%2Bn%3D%26a%3D1",
                "u=https%3A%2F%2Fb%2Fk%3FX-Amz-Signature%3DREDACTED%26X-Amz-Security-Token%3DREDACTED%26a%3D1",
            ),
            (
                "double: X-Goog-Signature%253Dsig%2526x",
                "double: X-Goog-Signature%253DREDACTED%2526x",
            ),
            // Any case, bare, or as a JSON member, or behind a JSON escape.
            (
                "x-goog-credential=k@p.iam/2026 and X-GOOG-SIGNATURE=ff00",
                "x-goog-credential=REDACTED and X-GOOG-SIGNATURE=REDACTED",
            ),
            (
                r#"{"X-Amz-Security-Token": "FQo+/=", "n": 1}"#,
                r#"{"X-Amz-Security-Token": "REDACTED", "n": 1}"#,
            ),
            (
                r#"X-Amz-Signature\u003dabc\u0026b=1"#,
                r#"X-Amz-Signature\u003dREDACTED\u0026b=1"#,
            ),
            // A literal signed URL still loses its whole query.
            (
                "see https://b/k?X-Amz-Signature=abc&a=1.",
                "see https://b/k.",
            ),
            (
                "cannot fetch https://b/k?X-Amz-Signature=abc: 403",
                "cannot fetch https://b/k: 403",
            ),
            // A name without a value, and other parameters, stay.
            (
                "X-Amz-Signature is missing; X-Amz-Date=2026",
                "X-Amz-Signature is missing; X-Amz-Date=2026",
            ),
            ("X-Amz-Signature=", "X-Amz-Signature="),
            ("no signature here", "no signature here"),
        ];
        for (text, expected) in table {
            assert_eq!(redact_signed_urls_in_text(text), expected, "{text}");
        }
        let mut snippet = json!({"body": "<html>https:\\/\\/b\\/k?X-Amz-Signature=abc</html>"});
        redact_signed_urls(&mut snippet);
        assert!(!snippet.to_string().contains("abc"), "{snippet}");
    }

    #[test]
    fn file_values_are_set_aside_and_bad_ones_named() {
        let inputs =
            json!({"prompt": "a boat", "image": {"$file": "in/boat.png"}, "meta": {"a": 1}});
        let split = split_inputs(inputs.as_object().unwrap()).unwrap();
        assert_eq!(split.files.len(), 1);
        assert_eq!(split.files[0].key, "image");
        assert_eq!(split.inputs["image"], "asset://wfq-pending/image");
        assert_eq!(split.inputs["meta"], json!({"a": 1}));
        for (bad, says) in [
            (
                json!({"image": {"$file": 5}}),
                "inputs.image: expected a file",
            ),
            (
                json!({"image": {"$file": "x", "y": 1}}),
                "an object with 2 members",
            ),
            (json!({"image": {"$file": "ftp://h/x"}}), "scheme ftp"),
        ] {
            let e = split_inputs(bad.as_object().unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
