//! Small readers shared by the provider clients: bounded bodies, headers,
//! body snippets for log lines, empty-string handling.

use std::borrow::Cow;
use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde_json::Value;

use super::Unclear;
use super::storable::{AnswerLimits, Repairs, repair_json_bytes};

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs and is ignored).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The start of a body, for a log line about an unreadable answer: storable
/// text (no NUL, which a `text` column refuses; at most 160 characters).
pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut cut: String = text
        .chars()
        .take(160)
        .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect();
    if text.chars().nth(160).is_some() {
        cut.push('…');
    }
    cut.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A body's JSON text repaired to be parseable and storable (see
/// [`repair_json_bytes`]); parse this, never the body itself.
pub(crate) fn repaired<'a>(body: &'a [u8], limits: &AnswerLimits) -> (Cow<'a, str>, Repairs) {
    repair_json_bytes(body, limits.max_depth)
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

/// Sends `request` with the profile's key and reads the whole answer, up to
/// `max_bytes` of body.
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
    api_key: &crate::config::ApiKey,
    max_bytes: usize,
) -> Result<RawAnswer, Unclear> {
    let response = request
        .bearer_auth(api_key.expose())
        .send()
        .await
        .map_err(Unclear::from_transport)?;
    read_answer(response, max_bytes).await
}

/// Reads an answer's body, but no more than `max_bytes` of it: a larger
/// answer is unclear (the provider may have done the work, as with any
/// answer that cannot be read), and memory stays bounded whatever is sent.
pub(crate) async fn read_answer(
    mut response: reqwest::Response,
    max_bytes: usize,
) -> Result<RawAnswer, Unclear> {
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let too_large = |what: String| Unclear {
        retry_after,
        ..Unclear::new(
            format!(
                "the answer is larger than http.max_answer_bytes ({max_bytes} bytes): {what}; not read"
            ),
            Some(status.as_u16()),
        )
    };
    if let Some(length) = response.content_length()
        && length > max_bytes as u64
    {
        return Err(too_large(format!("Content-Length {length}")));
    }
    let mut body = Vec::new();
    loop {
        // A body that breaks off is as unclear as no answer at all: the
        // provider may have done the work (that is the lost-answer case).
        let chunk = response.chunk().await.map_err(|e| Unclear {
            http_status: Some(status.as_u16()),
            ..Unclear::from_transport(e)
        })?;
        let Some(chunk) = chunk else {
            break;
        };
        if body.len() + chunk.len() > max_bytes {
            return Err(too_large(format!(
                "over {} bytes arrived",
                body.len() + chunk.len()
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(RawAnswer {
        status,
        retry_after,
        body,
    })
}

/// The request an error answer is to: only a submit's can refuse the
/// account.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Call<'a> {
    /// A submit, read against the profile's `account_refusals`.
    Submit {
        /// The profile's refusal codes about the account.
        account_refusals: &'a [String],
    },
    /// Any other request (a status check, a manifest, a lookup, a stop):
    /// it asks about a run or a workflow, not for room to start one, so
    /// it never refuses the account, and a 429 to it is the rate.
    Other,
}

impl Call<'_> {
    /// Whether an answer carrying `code` refuses the account: a code the
    /// profile lists, on a submit.
    pub(crate) fn refuses_account(&self, code: Option<&str>) -> bool {
        match (self, code) {
            (Call::Submit { account_refusals }, Some(code)) => {
                super::is_account_refusal(code, account_refusals)
            }
            _ => false,
        }
    }
}

/// An error answer (Dify, GPTBots), its body read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorAnswer<'a> {
    /// The status line.
    pub status: u16,
    /// `Retry-After`, when sent.
    pub retry_after: Option<Duration>,
    /// The body's error code, when it has one.
    pub code: Option<&'a str>,
    /// What the body says, or its start.
    pub message: &'a str,
    /// The whole body, for the refusal's detail.
    pub body: &'a [u8],
}

/// How an error answer reads (Dify, GPTBots): `Ok` is worth asking again,
/// `Err` a definite refusal.
///
/// The body's code decides first: on a submit, a code the profile lists as
/// about the account is a refusal with that code whatever the status line below 500
/// (a cap on runs at once comes as HTTP 429, a balance as 403 or 200); the
/// worker then pauses the profile and puts the run back, and the answer
/// teaches the rate nothing. Otherwise the status line decides, and a 429
/// is the rate. `quota` marks an answer that says the account may not run
/// anything now (Dify's `rate_limit_error`), which pauses the profile like
/// a refused key.
pub(crate) fn classify_error_status(
    answer: ErrorAnswer<'_>,
    call: Call<'_>,
    quota: bool,
    limits: &AnswerLimits,
) -> Result<Unclear, super::ProviderError> {
    let ErrorAnswer {
        status,
        retry_after,
        code,
        message,
        body,
    } = answer;
    let refusal = |code: Option<&str>| super::ProviderError {
        code: code.map_or_else(|| format!("HTTP_{status}"), str::to_owned),
        message: message.to_owned(),
        detail: error_detail(body, limits),
        http_status: status,
    };
    // Only a refusal that says nothing was started is taken at its word: a
    // server error or a timeout/conflict status (408, 409, 423, 425) may
    // have come after the run was created (GPTBots and Dify have no
    // idempotency key), so putting that run back could bill it twice; it
    // stays unclear below.
    let maybe_created = status >= 500 || matches!(status, 408 | 409 | 423 | 425);
    if !maybe_created && call.refuses_account(code) {
        return Err(refusal(code));
    }
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
        // A listed account code still pauses the profile (the next runs
        // would meet the same refusal), while this run stays unclear.
        500..=599 | 408 | 409 | 423 | 425 => Ok(unclear(
            format!("HTTP {status}: {message}"),
            false,
            call.refuses_account(code),
        )),
        _ => Err(refusal(code)),
    }
}

/// A refusal's body as its error object: the repaired JSON with what was
/// repaired noted in it, or the start of a body that is not JSON.
pub(crate) fn error_detail(body: &[u8], limits: &AnswerLimits) -> Value {
    let (text, repairs) = repaired(body, limits);
    match serde_json::from_str(&text) {
        Ok(mut detail) => {
            super::edge::note_repairs(&mut detail, repairs);
            detail
        }
        Err(_) => serde_json::json!({ "body": snippet(body) }),
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

/// A hostile provider's outputs, for the clients' unit tests.
#[cfg(test)]
pub(crate) mod hostile {
    use serde_json::Value;

    use crate::providers::storable::AnswerLimits;
    use crate::providers::{Repairs, RunReport};

    #[test]
    fn the_repairs_serialise_as_the_worker_records_them() {
        assert_eq!(
            repairs().to_json(),
            serde_json::json!({"nul": 2, "lone_surrogate": 2, "control_char": 1,
                "number_as_text": 1, "cut_depth": 1, "cut_strings": 2})
        );
    }

    /// Length of the long string in [`outputs`]: twice `max_string_bytes`.
    pub(crate) const BIG: usize = 2 * 1024 * 1024;

    /// Outputs as JSON text with a NUL (escaped), a NUL in a key, lone
    /// surrogates, a raw tab, a 2 MiB string, 200 levels of nesting and 1e400.
    pub(crate) fn outputs() -> String {
        format!(
            r#"{{"nul":"a\u0000b","k\u0000ey":1,"lone":"\ud800x","low":"x\udc00","tab":"a{}b","big":"{}","deep":{}1{},"huge":1e400}}"#,
            '\t',
            "x".repeat(BIG),
            "[".repeat(200),
            "]".repeat(200),
        )
    }

    /// What the text pass changes in [`outputs`], and the long string cut
    /// twice: in the outputs and in the audit copy that holds them.
    pub(crate) fn repairs() -> Repairs {
        Repairs {
            nul: 2,
            lone_surrogate: 2,
            control_char: 1,
            number_as_text: 1,
            cut_depth: 1,
            cut_strings: 2,
            ..Repairs::default()
        }
    }

    fn check(value: &Value, depth: usize, limits: &AnswerLimits) {
        assert!(depth <= limits.max_depth, "nested {depth} deep");
        match value {
            Value::String(s) => assert!(
                !s.contains('\0') && s.len() <= limits.max_string_bytes,
                "{:.80}",
                s
            ),
            Value::Array(items) => items.iter().for_each(|v| check(v, depth + 1, limits)),
            Value::Object(map) => {
                for (k, v) in map {
                    assert!(!k.contains('\0') && k.len() <= limits.max_string_bytes);
                    check(v, depth + 1, limits);
                }
            }
            _ => {}
        }
    }

    /// A value PostgreSQL stores: no NUL anywhere, within the limits (lone
    /// surrogates cannot exist in a Rust string at all).
    pub(crate) fn assert_storable(value: &Value, limits: &AnswerLimits) {
        check(value, 0, limits);
        let text = serde_json::to_string(value).expect("serialises");
        assert!(!text.contains("\\u0000"));
        assert!(text.len() <= limits.max_value_bytes);
    }

    /// The report's outputs are [`outputs`], repaired; they and the audit
    /// copy are storable (the caller checks `report.repairs`).
    pub(crate) fn assert_outputs_repaired(report: &RunReport, limits: &AnswerLimits) {
        let outputs = report.outputs.as_ref().expect("outputs");
        assert_storable(outputs, limits);
        assert_storable(&report.raw, limits);
        assert_eq!(outputs["nul"], "a\u{FFFD}b");
        assert_eq!(outputs["k\u{FFFD}ey"], 1);
        assert_eq!(outputs["lone"], "\u{FFFD}x");
        assert_eq!(outputs["low"], "x\u{FFFD}");
        assert_eq!(outputs["tab"], "a\tb");
        assert_eq!(outputs["huge"], "1e400", "the digits, kept as text");
        let big = outputs["big"].as_str().expect("a string");
        assert!(big.starts_with("xxxx") && big.len() <= limits.max_string_bytes);
        assert!(
            big.contains(&format!("…<cut: {BIG} bytes, sha256 ")),
            "{:.80}",
            &big[big.len() - 100..]
        );
        let mut deep = &outputs["deep"];
        while let Value::Array(items) = deep {
            deep = &items[0];
        }
        assert_eq!(
            deep,
            &Value::String(super::super::storable::depth_marker(limits.max_depth))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_storable_text() {
        assert_eq!(
            snippet(b"<html>\0 bad\n gateway</html>"),
            "<html>\u{FFFD} bad gateway</html>"
        );
        let long = "x".repeat(500);
        let cut = snippet(long.as_bytes());
        assert_eq!(cut.chars().count(), 161);
        assert!(cut.ends_with('…'));
        assert_eq!(
            snippet("é".repeat(160).as_bytes()),
            "é".repeat(160),
            "not cut"
        );
    }

    /// How a read answer is summed up in the table below.
    fn read(answer: Result<Unclear, crate::providers::ProviderError>) -> String {
        match answer {
            Err(e) => format!("refused {} ({})", e.code, e.http_status),
            Ok(u) if u.account_refused => "key or quota".to_owned(),
            Ok(u) if u.http_status == Some(429) && u.nothing_created => "rate".to_owned(),
            Ok(u) if u.nothing_created => "again, nothing created".to_owned(),
            Ok(_) => "again, maybe created".to_owned(),
        }
    }

    #[test]
    fn a_listed_code_refuses_the_account_on_a_submit_below_500() {
        let listed = [
            "403200".to_owned(),
            "429001".to_owned(),
            "quota_exceeded".to_owned(),
        ];
        let submit = Call::Submit {
            account_refusals: &listed,
        };
        let limits = AnswerLimits::default();
        // (call, status, code, quota flag, reading)
        let table: &[(Call<'_>, u16, Option<&str>, bool, &str)] = &[
            // A cap on runs at once (GPTBots, Dify) and a balance, listed.
            (submit, 429, Some("429001"), false, "refused 429001 (429)"),
            (submit, 403, Some("403200"), false, "refused 403200 (403)"),
            (
                submit,
                400,
                Some("QUOTA_EXCEEDED"),
                false,
                "refused QUOTA_EXCEEDED (400)",
            ),
            // A server error may come after the run was created: unclear,
            // never put back (that could bill twice).
            // The profile pauses all the same (read here as "key or quota";
            // the run itself stays unclear: see the end of this test).
            (submit, 503, Some("quota_exceeded"), false, "key or quota"),
            (submit, 409, Some("quota_exceeded"), false, "key or quota"),
            // The list wins over the quota flag.
            (
                submit,
                429,
                Some("quota_exceeded"),
                true,
                "refused quota_exceeded (429)",
            ),
            // A 429 without a listed code is the rate.
            (submit, 429, Some("429000"), false, "rate"),
            (submit, 429, Some("too_many_requests"), false, "rate"),
            (submit, 429, None, false, "rate"),
            (submit, 429, Some("rate_limit_error"), true, "key or quota"),
            (submit, 401, Some("401001"), false, "key or quota"),
            (submit, 500, None, false, "again, maybe created"),
            (submit, 400, Some("400001"), false, "refused 400001 (400)"),
            (submit, 404, None, false, "refused HTTP_404 (404)"),
            // A status check never refuses the account.
            (Call::Other, 429, Some("429001"), false, "rate"),
            (Call::Other, 403, Some("403200"), false, "key or quota"),
            (
                Call::Other,
                503,
                Some("quota_exceeded"),
                false,
                "again, maybe created",
            ),
            (
                Call::Submit {
                    account_refusals: &[],
                },
                429,
                Some("429001"),
                false,
                "rate",
            ),
        ];
        for &(call, status, code, quota, expected) in table {
            let answer = ErrorAnswer {
                status,
                retry_after: None,
                code,
                message: "no",
                body: br#"{"code":"x"}"#,
            };
            assert_eq!(
                read(classify_error_status(answer, call, quota, &limits)),
                expected,
                "{call:?} {status} {code:?} quota={quota}"
            );
        }
        // A listed code on a status that may come after the run was made:
        // the profile pauses, and the run is not put back.
        for status in [409, 503] {
            let answer = ErrorAnswer {
                status,
                retry_after: None,
                code: Some("quota_exceeded"),
                message: "no",
                body: b"{}",
            };
            let u = classify_error_status(answer, submit, false, &limits).expect("unclear");
            assert!(u.account_refused && !u.nothing_created, "{status}: {u:?}");
        }
    }

    #[test]
    fn error_details_are_repaired_and_say_so() {
        let limits = AnswerLimits::default();
        let detail = error_detail(br#"{"code":"x\u0000","message":"\ud800"}"#, &limits);
        assert_eq!(detail["code"], "x\u{FFFD}");
        assert_eq!(detail["message"], "\u{FFFD}");
        assert_eq!(
            detail[super::super::ERROR_REPAIRS_KEY],
            serde_json::json!({"nul": 1, "lone_surrogate": 1})
        );
        assert_eq!(
            error_detail(b"<html>\0</html>", &limits),
            serde_json::json!({"body": "<html>\u{FFFD}</html>"})
        );
        assert_eq!(
            error_detail(br#"{"code":"x"}"#, &limits),
            serde_json::json!({"code": "x"})
        );
    }
}
