//! Who may see the dashboard: nobody is asked on loopback without
//! credentials; otherwise a bearer token or basic auth, compared in
//! constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::Digest;

use super::WebState;
use super::config::WebAuth;

/// Lets a request through when `auth` accepts its `Authorization` header.
pub async fn require(State(state): State<Arc<WebState>>, request: Request, next: Next) -> Response {
    if accepts(&state.auth, request.headers()) {
        return next.run(request).await;
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        "wfq dashboard: authentication required\n",
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"wfq\", charset=\"UTF-8\""),
    );
    response
}

/// Whether the headers carry what `auth` asks for.
pub fn accepts(auth: &WebAuth, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match auth {
        WebAuth::Open => true,
        WebAuth::Token(token) => match given.split_once(' ') {
            Some((scheme, value)) if scheme.eq_ignore_ascii_case("bearer") => {
                same(value.trim(), token)
            }
            // A browser can only send basic auth: the token as the password.
            _ => basic(given).is_some_and(|(_, password)| same(&password, token)),
        },
        WebAuth::Basic { user, password } => {
            basic(given).is_some_and(|(u, p)| same(&u, user) & same(&p, password))
        }
    }
}

/// `Basic base64(user:password)` -> (user, password).
fn basic(header: &str) -> Option<(String, String)> {
    let (scheme, value) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Equality whose time does not depend on where the texts differ: both are
/// hashed first, and the digests compared byte by byte without stopping.
fn same(given: &str, expected: &str) -> bool {
    let a = sha2::Sha256::digest(given.as_bytes());
    let b = sha2::Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    fn basic_header(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    #[test]
    fn each_scheme_accepts_only_its_credentials() {
        let token = WebAuth::Token("0123456789abcdef".into());
        let user = WebAuth::Basic {
            user: "ops".into(),
            password: "a long password!".into(),
        };
        let cases = [
            (&WebAuth::Open, HeaderMap::new(), true),
            (&token, HeaderMap::new(), false),
            (&token, with("Bearer 0123456789abcdef"), true),
            (&token, with("bearer 0123456789abcdef"), true),
            (&token, with("Bearer 0123456789abcdeX"), false),
            (&token, with(&basic_header("any", "0123456789abcdef")), true),
            (&token, with(&basic_header("any", "wrong")), false),
            (&user, with(&basic_header("ops", "a long password!")), true),
            (&user, with(&basic_header("ops", "a long password?")), false),
            (
                &user,
                with(&basic_header("root", "a long password!")),
                false,
            ),
            (&user, with("Basic !!!"), false),
            (&user, with("Bearer a long password!"), false),
        ];
        for (i, (auth, headers, expected)) in cases.into_iter().enumerate() {
            assert_eq!(accepts(auth, &headers), expected, "case {i}");
        }
    }
}
