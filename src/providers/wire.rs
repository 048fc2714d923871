//! Small readers shared by the provider clients: headers, body snippets for
//! log lines, empty-string handling.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde_json::Value;

use super::Unclear;

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs and is ignored).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The start of a body, for a log line about an unreadable answer.
pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut cut: String = text.chars().take(160).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `None` for a missing, empty or blank string.
pub(crate) fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// An answer that arrived (HTTP 200) but cannot be read.
pub(crate) fn unreadable(what: &str, e: impl std::fmt::Display) -> Unclear {
    Unclear::new(format!("unreadable {what}: {e}"), Some(200))
}

/// The answer's JSON text as a `Value`, for the audit trail only (never for money).
pub(crate) fn audit_copy(data: &str) -> Value {
    serde_json::from_str(data).unwrap_or(Value::Null)
}

/// The HTTP client of one provider profile, with its own connection pool.
/// `http.timeout` bounds every call as a whole, a streamed body included.
pub(crate) fn http_client(
    http: &crate::config::HttpConfig,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(http.timeout)
        .connect_timeout(http.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("wfq/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The bytes of an answer, before interpretation.
#[derive(Debug)]
pub(crate) struct RawAnswer {
    /// The status line.
    pub status: reqwest::StatusCode,
    /// `Retry-After`, when sent.
    pub retry_after: Option<Duration>,
    /// The whole body.
    pub body: Vec<u8>,
}

/// Sends `request` with the profile's key and reads the whole answer.
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
    api_key: &crate::config::ApiKey,
) -> Result<RawAnswer, Unclear> {
    let response = request
        .bearer_auth(api_key.expose())
        .send()
        .await
        .map_err(Unclear::from_transport)?;
    let status = response.status();
    let retry_after = retry_after(response.headers());
    // A body that breaks off is as unclear as no answer at all: the
    // provider may have done the work (that is the lost-answer case).
    let body = response.bytes().await.map_err(|e| Unclear {
        http_status: Some(status.as_u16()),
        ..Unclear::from_transport(e)
    })?;
    Ok(RawAnswer {
        status,
        retry_after,
        body: body.to_vec(),
    })
}

/// How an error answer reads when its status line decides (Dify, GPTBots):
/// `Ok` is worth asking again, `Err` a definite refusal. `quota` marks an
/// answer that says the account may not run anything now (Dify's
/// `rate_limit_error`), which pauses the profile like a refused key.
pub(crate) fn classify_error_status(
    status: u16,
    retry_after: Option<Duration>,
    code: Option<String>,
    message: String,
    quota: bool,
    body: &[u8],
) -> Result<Unclear, super::ProviderError> {
    let unclear = |reason: String, nothing_created: bool, account_refused: bool| Unclear {
        reason,
        http_status: Some(status),
        retry_after,
        account_refused,
        nothing_created,
    };
    match status {
        401 | 403 => Ok(unclear(
            format!("HTTP {status}: the provider refused the API key ({message})"),
            true,
            true,
        )),
        // Quota, not concurrency: retrying the run cannot help until the
        // account is topped up, so the profile pauses.
        429 if quota => Ok(unclear(
            format!("HTTP 429: the account's quota is exhausted ({message})"),
            true,
            true,
        )),
        // Refused before any work, so nothing was created.
        429 => Ok(unclear(
            format!("HTTP 429: too many requests ({message})"),
            true,
            false,
        )),
        500..=599 | 408 | 409 | 423 | 425 => {
            Ok(unclear(format!("HTTP {status}: {message}"), false, false))
        }
        _ => Err(super::ProviderError {
            code: code.unwrap_or_else(|| format!("HTTP_{status}")),
            message,
            detail: serde_json::from_slice(body)
                .unwrap_or_else(|_| serde_json::json!({ "body": snippet(body) })),
            http_status: status,
        }),
    }
}

/// An answer with `status` and `body`, for the clients' unit tests.
#[cfg(test)]
pub(crate) fn test_answer(status: u16, body: &str) -> RawAnswer {
    RawAnswer {
        status: reqwest::StatusCode::from_u16(status).expect("a valid status"),
        retry_after: None,
        body: body.as_bytes().to_vec(),
    }
}
