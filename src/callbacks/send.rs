//! One delivery attempt over HTTP: a signed POST, timed, and what came back.
//! Nothing here prints a callback URL beyond its origin, or the secret.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER, USER_AGENT};

use super::decision::AttemptOutcome;
use super::signature::{SIGNATURE_HEADER, sign};
use crate::config::ApiKey;

/// An attempt, as recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When the request was sent.
    pub started_at: DateTime<Utc>,
    /// Until the answer's status line (or the error).
    pub duration: Duration,
    /// What came back.
    pub outcome: AttemptOutcome,
}

/// Sends callbacks: one HTTP client, the signing secret.
pub struct Sender {
    client: reqwest::Client,
    secret: ApiKey,
    timeout: Duration,
}

impl Sender {
    /// A client with `timeout` per attempt that follows no redirects (a
    /// signed POST is not handed on to wherever a 3xx points).
    pub fn new(secret: ApiKey, timeout: Duration) -> Result<Sender, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Sender {
            client,
            secret,
            timeout,
        })
    }

    /// POSTs `body` to `url`, signed now.
    pub async fn send(&self, url: &str, run_id: i64, attempt: u32, body: Vec<u8>) -> Attempt {
        let started_at = Utc::now();
        let started = Instant::now();
        let outcome = match parse(url) {
            Err(why) => AttemptOutcome::InvalidUrl(why),
            Ok(url) => {
                let signature = sign(
                    self.secret.expose().as_bytes(),
                    started_at.timestamp(),
                    &body,
                );
                let sent = self
                    .client
                    .post(url)
                    .header(CONTENT_TYPE, "application/json")
                    .header(USER_AGENT, concat!("wfq/", env!("CARGO_PKG_VERSION")))
                    .header(SIGNATURE_HEADER, signature)
                    .header("wfq-run-id", run_id.to_string())
                    .header("wfq-attempt", attempt.to_string())
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(answer) => AttemptOutcome::Answered {
                        status: answer.status().as_u16(),
                        retry_after: retry_after(answer.headers()),
                    },
                    Err(e) => AttemptOutcome::NoAnswer(describe(&e, self.timeout)),
                }
            }
        };
        Attempt {
            started_at,
            duration: started.elapsed(),
            outcome,
        }
    }
}

fn parse(url: &str) -> Result<url::Url, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    match parsed.scheme() {
        "http" | "https" if parsed.host().is_some() => Ok(parsed),
        _ => Err("not an http(s) URL with a host".to_owned()),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Why no answer arrived, without the URL (reqwest puts it in its errors,
/// and a callback URL may carry a token).
fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!("no answer within {timeout:?}");
    }
    let mut text = if error.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The part of a callback URL that may be logged: scheme, host and port.
/// Paths and query strings often carry tokens (`/hooks/T0/B0/XYZ`,
/// `?token=`), user info carries passwords; none of them is shown.
pub fn origin(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) if parsed.host().is_some() => parsed.origin().ascii_serialization(),
        _ => "<invalid callback URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_urls_are_logged_by_their_origin_only() {
        assert_eq!(
            origin("https://user:pw@hooks.example.com:8443/t/SECRET?token=abc#x"),
            "https://hooks.example.com:8443"
        );
        assert_eq!(origin("http://127.0.0.1:9/x?k=v"), "http://127.0.0.1:9");
        assert_eq!(origin("https://example.com/a"), "https://example.com");
        assert_eq!(origin("not a url ?token=abc"), "<invalid callback URL>");
    }

    #[test]
    fn only_http_urls_with_a_host_are_requested() {
        assert!(parse("https://example.com/x?y=1").is_ok());
        assert!(parse("ftp://example.com/").is_err());
        assert!(parse("http://[::1").is_err());
    }

    #[tokio::test]
    async fn transport_errors_do_not_carry_the_url() {
        // A port bound but not listening, kept for the whole test: a
        // connection is refused, and no other test can take the port.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        let sender = Sender::new(ApiKey::new("s".repeat(16)), Duration::from_secs(2)).unwrap();
        let url = format!("http://127.0.0.1:{port}/hook?token=tok-123");
        let attempt = sender.send(&url, 1, 1, b"{}".to_vec()).await;
        let AttemptOutcome::NoAnswer(why) = &attempt.outcome else {
            panic!("{attempt:?}");
        };
        assert!(why.starts_with("connection failed"), "{why}");
        assert!(!why.contains("tok-123") && !why.contains("/hook"), "{why}");
        drop(socket);
    }
}
