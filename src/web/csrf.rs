//! Cross-site request forgery: every action is a POST that must carry the
//! process's random token twice, in the `wfq_csrf` cookie and in the form's
//! `csrf` field (double submit). Another site can make a browser send the
//! cookie, but cannot read it to fill in the field.

use axum::http::{HeaderMap, header};

/// The cookie's name.
pub const COOKIE: &str = "wfq_csrf";
/// The form field's name.
pub const FIELD: &str = "csrf";

/// This process's token: 244 random bits, hex.
#[derive(Clone)]
pub struct CsrfToken(String);

impl std::fmt::Debug for CsrfToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CsrfToken(***)")
    }
}

impl Default for CsrfToken {
    fn default() -> Self {
        Self::random()
    }
}

impl CsrfToken {
    /// A fresh random token.
    pub fn random() -> Self {
        CsrfToken(format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// The token, for the hidden form field.
    pub fn value(&self) -> &str {
        &self.0
    }

    /// The `Set-Cookie` value that hands the token to the browser.
    pub fn set_cookie(&self) -> String {
        format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", self.0)
    }

    /// Whether a POST carries the token in both its cookie and its form
    /// field, and was not sent from another site (when the browser says).
    pub fn check(&self, headers: &HeaderMap, field: Option<&str>) -> bool {
        let cross_site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|site| site == "cross-site" || site == "same-site");
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == COOKIE)
            .map(|(_, value)| value);
        !cross_site && cookie == Some(self.0.as_str()) && field == Some(self.0.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn both_copies_must_match() {
        let token = CsrfToken::random();
        let other = CsrfToken::random();
        let headers = |cookie: &str, site: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
            if let Some(site) = site {
                h.insert("sec-fetch-site", HeaderValue::from_str(site).unwrap());
            }
            h
        };
        let good = format!("a=b; {COOKIE}={}", token.value());
        let cases = [
            (headers(&good, None), Some(token.value()), true),
            (
                headers(&good, Some("same-origin")),
                Some(token.value()),
                true,
            ),
            (
                headers(&good, Some("cross-site")),
                Some(token.value()),
                false,
            ),
            (headers(&good, None), None, false),
            (headers(&good, None), Some(other.value()), false),
            (headers("a=b", None), Some(token.value()), false),
            (
                headers(&format!("{COOKIE}={}", other.value()), None),
                Some(token.value()),
                false,
            ),
        ];
        for (i, (h, field, expected)) in cases.into_iter().enumerate() {
            assert_eq!(token.check(&h, field), expected, "case {i}");
        }
    }
}
