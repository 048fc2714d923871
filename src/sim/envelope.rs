//! Response bodies: the `{code, msg, data}` envelope, chenyu's error shape,
//! injected faults and the "lost answer".

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::faults::Injected;

/// What an nginx in front of the API serves when the upstream is down.
const BAD_GATEWAY_HTML: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// A successful answer: `{code: 0, msg, data}`.
pub(crate) fn ok(msg: &str, data: Value) -> Response {
    Json(ok_body(msg, data)).into_response()
}

/// The body of a successful answer.
pub(crate) fn ok_body(msg: &str, data: Value) -> Value {
    json!({"code": 0, "msg": msg, "data": data})
}

/// An already serialized JSON body with HTTP 200.
pub(crate) fn json_text(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// A bare envelope with `data: null`, for transport-level answers
/// (401, 429, 5xx, unknown route).
pub(crate) fn plain(status: StatusCode, msg: &str) -> Response {
    let body = json!({"code": status.as_u16(), "msg": msg, "data": null});
    (status, Json(body)).into_response()
}

/// A business error in chenyu's documented shape. `http` is the status
/// line, `status_code` the one reported in the body: they differ when the
/// API answers a failure with HTTP 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub http: StatusCode,
    pub status_code: StatusCode,
    pub msg: &'static str,
    pub engine_code: std::borrow::Cow<'static, str>,
    pub detail: String,
}

impl ApiError {
    /// An error whose status line and body status agree.
    pub(crate) fn new(
        status: StatusCode,
        msg: &'static str,
        engine_code: impl Into<std::borrow::Cow<'static, str>>,
        detail: String,
    ) -> Self {
        ApiError {
            http: status,
            status_code: status,
            msg,
            engine_code: engine_code.into(),
            detail,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "code": 1,
            "msg": self.msg,
            "data": {"error": {
                "reason": self.msg,
                "detail": self.detail,
                "engine_code": self.engine_code,
                "status_code": self.status_code.as_u16(),
            }},
        });
        (self.http, Json(body)).into_response()
    }
}

/// The answer to a request hit by an injected fault.
pub(crate) fn injected(fault: Injected) -> Response {
    match fault {
        Injected::Unavailable => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable (injected)",
        ),
        // Half the errors come from the "proxy", to make sure clients
        // survive a body that is not JSON at all.
        Injected::ServerError if fastrand::bool() => (
            StatusCode::BAD_GATEWAY,
            [(header::CONTENT_TYPE, "text/html")],
            BAD_GATEWAY_HTML,
        )
            .into_response(),
        Injected::ServerError => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error (injected)",
        ),
        Injected::RateLimited { retry_after_secs } => {
            let response = plain(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests (injected)",
            );
            match retry_after_secs {
                Some(secs) => with_retry_after(response, secs),
                None => response,
            }
        }
    }
}

/// `response` with a `Retry-After` of `secs` whole seconds.
pub(crate) fn with_retry_after(mut response: Response, secs: u64) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// An answer that is lost in transit: the status line and headers say 200,
/// then the connection breaks inside the body. To a client this is a
/// transport error after the server did the work, the case idempotency keys
/// exist for.
pub(crate) fn lost_answer() -> Response {
    // hyper only flushes the head when the body stream is pending: an
    // immediate error (or a chunk followed by one) closes the connection with
    // nothing sent, which reqwest reports from `send()` instead. So: a first
    // chunk, a pause that flushes head and chunk, then the break.
    let first: Result<Bytes, std::io::Error> = Ok(Bytes::from_static(b"{\"code\":0,\"msg\":\""));
    let stream = futures_util::stream::iter([first]).chain(futures_util::stream::once(async {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated loss of the submit answer",
        ))
    }));
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// One of six malformed answers (`Faults::malformed_next_answers`), chosen by
/// `n` so that a run of them covers every kind.
pub(crate) fn malformed(n: u32) -> Response {
    use axum::response::IntoResponse;
    let (content_type, body) = match n % 6 {
        0 => (
            "text/html",
            "<html><body><h1>Service Temporarily Unavailable</h1></body></html>",
        ),
        1 => ("application/json", r#"{"code":0,"msg":"ok","data":{}}"#),
        2 => (
            "application/json",
            r#"{"code":0,"msg":"ok","data":{"run_status":"succeeded","settlement_status":"settled","final_amount":"12,5 CNY","released_amount":"n/a"}}"#,
        ),
        3 => (
            "application/json",
            r#"{"code":0,"msg":"ok","data":{"run_status":"quantum_superposition","surprise":{"nested":[1,2,3]}}}"#,
        ),
        4 => ("application/json", ""),
        _ => (
            "application/json",
            r#"{"code":0,"msg":"ok","data":{"run_order_id":"wfru"#,
        ),
    };
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, content_type)],
        body,
    )
        .into_response()
}
