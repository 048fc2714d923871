//! `[storage]` in worker.toml: where mirrored outputs (and CLI input
//! files) are kept, and how the mirror service works. Parsed at the edge
//! into typed values; credentials come from the environment only.

use std::time::Duration;

use serde::Deserialize;

use crate::backoff::RetryPolicy;
use crate::config::{ApiKey, Environment, parse_duration};

/// `[storage]`: without it nothing is mirrored and input files can only be
/// read from `file://`, `s3://` (with credentials) or `https://` locations.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// `file:///var/lib/wfq/media` or `s3://bucket/prefix`.
    pub url: StorageUrl,
    /// S3: the region (`region`, else `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`).
    pub region: String,
    /// S3: an S3-compatible endpoint (`endpoint`, else `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// S3: credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
    /// (and `AWS_SESSION_TOKEN`); redacted in Debug output.
    pub credentials: Option<S3Credentials>,
    /// The largest file one download (or input upload) may be.
    pub max_file_bytes: u64,
    /// The whole time one download may take.
    pub timeout: Duration,
    /// Downloads at once, per worker process.
    pub concurrency: usize,
    /// Attempts and the durable schedule between them.
    pub retry: RetryPolicy,
    /// Runs that succeeded longer ago than this are not mirrored (e.g.
    /// runs from before `[storage]` was configured).
    pub lookback: Duration,
}

/// Where files are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// A local directory (absolute path).
    Local(std::path::PathBuf),
    /// An S3 bucket and a key prefix (no leading or trailing slash; may be empty).
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix.
        prefix: String,
    },
}

impl StorageUrl {
    /// Reads `file:///abs/dir` or `s3://bucket[/prefix]`.
    pub fn parse(text: &str) -> Result<StorageUrl, String> {
        let url = url::Url::parse(text).map_err(|e| {
            format!("`{text}` is not a URL ({e}); use file:///dir or s3://bucket/prefix")
        })?;
        match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| format!("`{text}`: not an absolute local path"))?;
                Ok(StorageUrl::Local(path))
            }
            "s3" => {
                let bucket = url.host_str().unwrap_or_default().to_owned();
                if bucket.is_empty() {
                    return Err(format!("`{text}`: no bucket (use s3://bucket/prefix)"));
                }
                let prefix = url.path().trim_matches('/').to_owned();
                Ok(StorageUrl::S3 { bucket, prefix })
            }
            other => Err(format!(
                "`{text}`: scheme {other}: is not supported (use file:///dir or s3://bucket/prefix)"
            )),
        }
    }

    /// The URL again, normalised (no trailing slash).
    pub fn render(&self) -> String {
        match self {
            StorageUrl::Local(path) => format!("file://{}", path.display())
                .trim_end_matches('/')
                .to_owned(),
            StorageUrl::S3 { bucket, prefix } if prefix.is_empty() => format!("s3://{bucket}"),
            StorageUrl::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
        }
    }
}

/// S3 credentials, from the environment.
#[derive(Clone)]
pub struct S3Credentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: ApiKey,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: ApiKey,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<ApiKey>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("S3Credentials(<redacted>)")
    }
}

/// `[storage]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorageConfig {
    url: String,
    region: Option<String>,
    endpoint: Option<String>,
    max_file_bytes: Option<ByteSize>,
    timeout: Option<String>,
    concurrency: Option<usize>,
    max_attempts: Option<u32>,
    initial: Option<String>,
    max: Option<String>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
    lookback: Option<String>,
}

/// A size: a whole number of bytes, or text such as `"512MiB"`, `"2GB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ByteSize {
    Bytes(u64),
    Text(String),
}

/// Reads `512`, `64KiB`, `512MiB`, `2GiB`, `10MB`, `1GB` (KB/MB/GB are
/// powers of 1000, KiB/MiB/GiB of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 512MiB, 2GB or a number of bytes)"))?;
    let unit_bytes: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(unit_bytes)
        .ok_or_else(|| format!("`{text}` is too large"))
}

impl RawStorageConfig {
    /// `[storage]` with only a URL (every other value its default).
    pub fn minimal(url: &str) -> RawStorageConfig {
        RawStorageConfig {
            url: url.to_owned(),
            region: None,
            endpoint: None,
            max_file_bytes: None,
            timeout: None,
            concurrency: None,
            max_attempts: None,
            initial: None,
            max: None,
            multiplier: None,
            jitter: None,
            lookback: None,
        }
    }

    /// Checks every value; `Err((key, message))` names the key.
    pub fn parse(self, env: &dyn Environment) -> Result<StorageConfig, (String, String)> {
        let bad = |key: &str, m: String| (format!("storage.{key}"), m);
        let url = StorageUrl::parse(&self.url).map_err(|m| bad("url", m))?;
        let duration = |key: &str, value: &Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(text) => parse_duration(text).map_err(|m| bad(key, m)),
        };
        let max_file_bytes = match &self.max_file_bytes {
            None => 2 << 30,
            Some(ByteSize::Bytes(n)) => *n,
            Some(ByteSize::Text(t)) => parse_size(t).map_err(|m| bad("max_file_bytes", m))?,
        };
        if max_file_bytes == 0 {
            return Err(bad("max_file_bytes", "must be above zero".into()));
        }
        let timeout = duration("timeout", &self.timeout, Duration::from_secs(600))?;
        if timeout.is_zero() {
            return Err(bad("timeout", "must be above zero".into()));
        }
        let concurrency = self.concurrency.unwrap_or(4);
        if concurrency == 0 {
            return Err(bad("concurrency", "must be at least 1".into()));
        }
        let retry = RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(8),
            initial: duration("initial", &self.initial, Duration::from_secs(10))?,
            max: duration("max", &self.max, Duration::from_secs(3600))?,
            multiplier: self.multiplier.unwrap_or(2.0),
            jitter: self.jitter.unwrap_or(0.2),
        };
        if retry.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1".into()));
        }
        if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
            return Err(bad("multiplier", "must be a number of at least 1.0".into()));
        }
        if !(0.0..=1.0).contains(&retry.jitter) {
            return Err(bad("jitter", "must be between 0.0 and 1.0".into()));
        }
        if retry.max < retry.initial {
            return Err(bad(
                "max",
                "must not be smaller than storage.initial".into(),
            ));
        }
        let lookback = duration("lookback", &self.lookback, Duration::from_secs(7 * 86400))?;
        let var = |name: &str| env.var(name).filter(|v| !v.trim().is_empty());
        let region = self
            .region
            .or_else(|| var("AWS_REGION"))
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_owned());
        let endpoint = self
            .endpoint
            .or_else(|| var("AWS_ENDPOINT_URL"))
            .or_else(|| var("AWS_ENDPOINT"));
        if let Some(e) = &endpoint
            && url::Url::parse(e).map_or(true, |u| !matches!(u.scheme(), "http" | "https"))
        {
            return Err(bad("endpoint", format!("`{e}` is not an http(s) URL")));
        }
        let credentials = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => Some(S3Credentials {
                access_key_id: ApiKey::new(id),
                secret_access_key: ApiKey::new(secret),
                session_token: var("AWS_SESSION_TOKEN").map(ApiKey::new),
            }),
            _ => None,
        };
        Ok(StorageConfig {
            url,
            region,
            endpoint,
            credentials,
            max_file_bytes,
            timeout,
            concurrency,
            retry,
            lookback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Env(Vec<(&'static str, &'static str)>);
    impl Environment for Env {
        fn var(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn parse(text: &str, env: &Env) -> Result<StorageConfig, (String, String)> {
        let raw: RawStorageConfig = toml::from_str(text).expect("toml");
        raw.parse(env)
    }

    #[test]
    fn urls_sizes_and_defaults() {
        let c = parse("url = \"file:///var/lib/wfq/media/\"", &Env(vec![])).unwrap();
        assert_eq!(c.url, StorageUrl::Local("/var/lib/wfq/media/".into()));
        assert_eq!(c.url.render(), "file:///var/lib/wfq/media");
        assert_eq!(c.max_file_bytes, 2 << 30);
        assert_eq!(c.concurrency, 4);
        assert!(c.credentials.is_none());
        let env = Env(vec![
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-value"),
            ("AWS_REGION", "eu-west-1"),
        ]);
        let c = parse(
            "url = \"s3://media-bucket/wfq/out/\"\nmax_file_bytes = \"512MiB\"\nendpoint = \"http://127.0.0.1:9000\"",
            &env,
        )
        .unwrap();
        assert_eq!(
            c.url,
            StorageUrl::S3 {
                bucket: "media-bucket".into(),
                prefix: "wfq/out".into()
            }
        );
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(c.max_file_bytes, 512 << 20);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("AKIDEXAMPLE"),
            "{shown}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("url = \"ftp://x/y\"", "storage.url"),
            ("url = \"s3:///nobucket\"", "storage.url"),
            ("url = \"relative/dir\"", "storage.url"),
            (
                "url = \"file:///d\"\nmax_file_bytes = \"12 parsecs\"",
                "storage.max_file_bytes",
            ),
            (
                "url = \"file:///d\"\nconcurrency = 0",
                "storage.concurrency",
            ),
            ("url = \"file:///d\"\ntimeout = \"soon\"", "storage.timeout"),
            (
                "url = \"file:///d\"\nendpoint = \"localhost:9000\"",
                "storage.endpoint",
            ),
            ("url = \"file:///d\"\njitter = 2.0", "storage.jitter"),
        ] {
            let (got, message) = parse(text, &Env(vec![])).expect_err(text);
            assert_eq!(got, key, "{text}: {message}");
        }
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1024"), Ok(1024));
    }
}
