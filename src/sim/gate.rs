//! The checks every simulated API runs before its handler proper: the
//! configured latency, the bearer token, the hold gates, and the
//! "malformed answer" fault.
//!
//! Shared by the chenyu, Dify and GPTBots APIs, which only differ in how
//! they render a refusal, so this returns a [`Denied`] for each to render.

use std::time::Instant;

use axum::http::{HeaderMap, header};

use super::hold::{self, Gate};
use super::limits::Admission;
use super::state::Shared;

/// What kind of request passes the gate: decides which hold applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// A request that starts a run.
    Submit,
    /// A request that reads a run's state.
    StatusCheck,
    /// Anything else (parameters, market info, stop).
    Other,
}

impl Endpoint {
    fn gate(self) -> Option<Gate> {
        match self {
            Endpoint::Submit => Some(Gate::Submits),
            Endpoint::StatusCheck => Some(Gate::StatusChecks),
            Endpoint::Other => None,
        }
    }
}

/// Why a request was stopped at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// Missing, wrong or refused key (counted in `SimStats::unauthorized`).
    Unauthorized,
    /// A `malformed_next_answers` fault fired; the number picks the kind.
    Malformed(u32),
    /// Beyond `rate_limit_rps` for this key (`SimStats::limit_refusals`).
    RateLimited { retry_after_secs: u64 },
}

/// Applies the configured latency, then checks the bearer token, then
/// waits at the endpoint's hold gate if it is closed, then applies the
/// key's rate limit, then consumes a malformed-answer fault if one is
/// pending. Nothing after a refusal here is recorded.
pub(crate) async fn check(
    shared: &Shared,
    headers: &HeaderMap,
    endpoint: Endpoint,
) -> Result<(), Denied> {
    let (latency, refuse_keys) = {
        let state = shared.lock();
        (state.faults.latency, state.faults.refuse_keys)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let key = match authorized(shared.api_key.as_deref(), headers) {
        Some(key) if !refuse_keys => key,
        _ => {
            shared.lock().stats.unauthorized += 1;
            return Err(Denied::Unauthorized);
        }
    };
    shared.lock().stats.api_requests += 1;
    if let Some(gate) = endpoint.gate() {
        hold::pass(shared, gate).await;
    }
    let malformed = {
        let mut state = shared.lock();
        if let Some(limit) = state.faults.rate_limit() {
            let admission = state.limiter.admit(key, &limit, Instant::now());
            if let Admission::Refused { retry_after_secs } = admission {
                state.stats.limit_refusals += 1;
                return Err(Denied::RateLimited { retry_after_secs });
            }
        }
        let left = state.faults.malformed_next_answers;
        state.faults.malformed_next_answers = left.saturating_sub(1);
        left
    };
    if malformed > 0 {
        return Err(Denied::Malformed(malformed));
    }
    Ok(())
}

/// The token of `Authorization: Bearer <token>`, when it is non-empty
/// and, if the simulator has a key, equal to it.
pub(crate) fn authorized<'h>(expected: Option<&str>, headers: &'h HeaderMap) -> Option<&'h str> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && expected.is_none_or(|key| key == token))
    .then_some(token)
}

/// The query string of an API request, as axum hands it over.
pub(crate) type Params = Result<
    axum::extract::Query<std::collections::HashMap<String, String>>,
    axum::extract::rejection::QueryRejection,
>;

/// A query parameter, `""` when absent or when the query is unreadable.
pub(crate) fn param<'a>(params: &'a Params, name: &str) -> &'a str {
    params
        .as_ref()
        .ok()
        .and_then(|axum::extract::Query(map)| map.get(name))
        .map_or("", String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(auth).expect("ascii"),
        );
        h
    }

    #[test]
    fn bearer_rules() {
        assert_eq!(authorized(None, &headers("Bearer abc")), Some("abc"));
        assert_eq!(authorized(None, &headers("bearer  abc ")), Some("abc"));
        assert_eq!(authorized(None, &headers("Bearer ")), None);
        assert_eq!(authorized(None, &headers("Basic abc")), None);
        assert_eq!(authorized(None, &HeaderMap::new()), None);
        assert_eq!(authorized(Some("k"), &headers("Bearer k")), Some("k"));
        assert_eq!(authorized(Some("k"), &headers("Bearer j")), None);
    }
}
