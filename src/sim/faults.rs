//! Fault injection: the knobs (`Faults`) and the decision of which fault, if
//! any, hits a request.
//!
//! Deterministic counters ("the next N submits") make tests exact; the rates
//! make soak runs and demos realistic. Counters are decremented as they
//! fire, under the state lock, so concurrent requests never share one.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::limits::{Limit, RateLimitMode};

/// Fault-injection settings. Replace them with `SimServer::set_faults` or
/// `PUT /_sim/faults`; every field defaults to "no fault".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Fraction of API requests answered with a server error: half the time
    /// an nginx-style HTML "502 Bad Gateway" page (HTTP 502), otherwise HTTP
    /// 500 with a `{code: 500, ...}` JSON body.
    pub error_rate: f64,
    /// Fraction of API requests answered HTTP 429 with a `{code: 429}` body.
    pub rate_limit_rate: f64,
    /// `Retry-After` (seconds) sent with every injected 429 when set.
    pub retry_after_secs: Option<u64>,
    /// Delay added before every API answer (`latency_ms` on the wire).
    #[serde(rename = "latency_ms", with = "millis")]
    pub latency: Duration,
    /// Fraction of accepted submits (new or replayed) whose answer is lost
    /// after the run was recorded and the quote frozen.
    pub drop_after_submit_rate: f64,
    /// The next N submit requests get HTTP 503 before anything is recorded.
    pub fail_next_submits: u32,
    /// The next N submit requests get HTTP 429 before anything is recorded.
    pub rate_limit_next_submits: u32,
    /// The next N accepted submits are recorded, then their answer is lost.
    pub drop_next_submit_answers: u32,
    /// The next N `run/info` or `run/execution` requests get HTTP 503.
    pub fail_next_polls: u32,
    /// Every API request is refused with HTTP 401, whatever its key: a
    /// revoked or mistyped key, until the knob is turned off again.
    pub refuse_keys: bool,
    /// The next N API answers (any endpoint, after the key check, before
    /// anything is recorded) are malformed, cycling through: an HTML page
    /// with HTTP 200, `code: 0` without the expected fields, amounts that are
    /// not numbers, an unknown `run_status` with extra fields, an empty body,
    /// and JSON cut off half-way.
    pub malformed_next_answers: u32,
    /// chenyu: every new submit is refused with HTTP 200, a non-zero
    /// `code` and this `engine_code` (a code nobody documented, e.g. an
    /// account problem the provider added), before anything is recorded.
    pub refuse_submits_code: Option<String>,
    /// Dify only: every run request is refused with HTTP 429
    /// `rate_limit_error` (the quota is spent; retrying does not help).
    pub dify_quota_exceeded: bool,
    /// Dify only: `GET /workflows/logs` lists runs that are still running.
    /// Dify's docs do not say whether it does, so by default the simulator
    /// takes the harder case for a client and lists finished runs only.
    pub dify_logs_include_running: bool,
    /// Dify: a run whose own stream (the run request's) is closed by the
    /// client before `workflow_finished` stays `running` for good, is never
    /// logged and bills nothing more, as several Dify versions behave. Also
    /// applies to runs whose answer was lost.
    pub dify_runs_die_with_their_stream: bool,
    /// Dify only: the interval between `ping` events on open streams, in
    /// milliseconds; `None` is Dify's 10 s.
    pub dify_ping_interval_ms: Option<u64>,
    /// Every status check (chenyu `run/info` and `run/execution`; Dify
    /// `GET /workflows/run/{id}`, `GET /workflow/{id}/events` and
    /// `GET /workflows/logs`; GPTBots `query/result`) waits, after the key
    /// check, until this is turned off again; then all go on at once.
    pub hold_status_checks: bool,
    /// The same for submits (chenyu `run/submit`, Dify `workflows/run`,
    /// GPTBots `invoke`), which wait before anything is recorded.
    pub hold_submits: bool,
    /// Dify: open run streams (the run request's own and resumed event
    /// streams) keep sending pings but send nothing beyond the events that
    /// were due when they saw the hold, and never `workflow_finished`,
    /// until this is turned off again. A stream counts as held while it
    /// keeps back an event that is due.
    pub hold_streams: bool,
    /// Requests per second per API key (the bearer token), all three APIs
    /// and every endpoint together; `/_sim/*` never counts. A request
    /// beyond it gets HTTP 429 with `Retry-After` before anything is
    /// recorded (`SimStats::limit_refusals`). `None`: no limit.
    pub rate_limit_rps: Option<f64>,
    /// How the rate is enforced. Changing it (or the rate) keeps what each
    /// key already did.
    pub rate_limit_mode: RateLimitMode,
    /// The token bucket's size; default one second's worth, at least 1.
    pub rate_limit_burst: Option<f64>,
    /// Most runs accepted and not yet finished (queued or running at the
    /// provider's clock), counted per API kind. A new run beyond it is
    /// refused before anything is created (`SimStats::cap_refusals`):
    /// chenyu HTTP 200 with `engine_code: CONCURRENT_RUN_LIMIT_EXCEEDED`
    /// (a replay of a known key never is), Dify HTTP 429
    /// `too_many_requests`, GPTBots HTTP 429 `code: 429001`.
    pub max_running_runs: Option<u32>,
    /// Finished runs' outputs and failed runs' error messages (chenyu
    /// `run/info` and `run/execution`, Dify `workflow_finished`, blocking
    /// answer and run detail, GPTBots `query/result`) carry hostile but
    /// valid JSON, cycling per run through a fixed corpus (NUL, a lone
    /// surrogate, 2 MiB, 200 levels deep, a NUL in a key, `1e400` and
    /// friends, oddly escaped control characters, all at once; see
    /// `sim::hostile`). Money fields stay valid.
    pub hostile_outputs: bool,
    /// GPTBots: finished runs report this status instead of `SUCCEED` or
    /// `FAILED` (e.g. `"ARCHIVED"`); `SimStats::gptbots_unknown_statuses`.
    pub gptbots_unknown_status: Option<String>,
    /// GPTBots: finished runs' `query/result` answers have no `totalCost`
    /// member at all; `SimStats::gptbots_costs_omitted`.
    pub gptbots_omit_total_cost: bool,
    /// chenyu: `GET /balance/info` answers HTTP 404 (an account or API
    /// version without it), after the key check.
    pub balance_info_missing: bool,
    /// chenyu: accepted submit answers (new runs and replays) carry this
    /// `freeze_status` instead of the run's own (e.g. `"pending"`, a value
    /// nobody documented); `run/info` and the money stay as they are.
    pub submit_freeze_status: Option<String>,
    /// Dify: runs created while set price their Start node (at 0) in this
    /// currency, the LLM node staying in USD: no single total exists.
    pub dify_start_node_currency: Option<String>,
    /// How long a finished run's output links (`GET /media/...`) stay
    /// valid, in milliseconds from the run's end; `None` is one hour. Past
    /// it a link answers HTTP 403 "Request has expired", as presigned
    /// URLs do (`SimStats::media_expired`).
    pub media_ttl_ms: Option<u64>,
    /// The next N output downloads get HTTP 503.
    pub fail_next_downloads: u32,
    /// Every output download sends this many bytes instead of the small
    /// file, chunked without a `Content-Length` (to test size limits on a
    /// stream); the bytes are made as they are sent.
    pub media_size_bytes: Option<u64>,
    /// Output downloads announce this `Content-Type` instead of the one
    /// their name implies (e.g. `text/plain` from a misconfigured CDN).
    pub media_content_type: Option<String>,
    /// Accepted uploads (chenyu `POST /assets`, Dify `POST /files/upload`)
    /// are recorded, then their answers wait until this is cleared: the
    /// provider holds the file and the client does not know it yet.
    pub hold_upload_answers: bool,
    /// The next N uploads (chenyu `POST /assets`, Dify `POST
    /// /files/upload`) get HTTP 503 before anything is recorded.
    pub fail_next_uploads: u32,
    /// Uploads larger than this are refused (chenyu HTTP 200 with
    /// `engine_code: FILE_TOO_LARGE`, Dify HTTP 413 `file_too_large`), and
    /// Dify's `GET /parameters` states it as every upload limit (in MB).
    pub max_upload_bytes: Option<u64>,
}

/// A fault chosen for one request, rendered by `envelope::injected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injected {
    /// HTTP 503 from a deterministic counter.
    Unavailable,
    /// A random server error (500 JSON or 502 HTML).
    ServerError,
    /// HTTP 429, with `Retry-After` when known.
    RateLimited { retry_after_secs: Option<u64> },
}

impl Faults {
    /// Rejects settings that cannot be meant: rates outside `0..=1` or NaN.
    pub(crate) fn check(&self) -> Result<(), String> {
        let rates = [
            ("error_rate", self.error_rate),
            ("rate_limit_rate", self.rate_limit_rate),
            ("drop_after_submit_rate", self.drop_after_submit_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        let positive = [
            ("rate_limit_rps", self.rate_limit_rps),
            ("rate_limit_burst", self.rate_limit_burst),
        ];
        for (name, value) in positive {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0)
            {
                return Err(format!("{name} must be a positive number, got {v}"));
            }
        }
        Ok(())
    }

    /// Consumes one `fail_next_downloads`.
    pub(crate) fn take_download_fault(&mut self) -> bool {
        take(&mut self.fail_next_downloads)
    }

    /// Consumes one `fail_next_uploads`.
    pub(crate) fn take_upload_fault(&mut self) -> bool {
        take(&mut self.fail_next_uploads)
    }

    /// The per-key rate limit in force, if any.
    pub(crate) fn rate_limit(&self) -> Option<Limit> {
        self.rate_limit_rps
            .map(|rps| Limit::new(rps, self.rate_limit_burst, self.rate_limit_mode))
    }

    /// The fault for a submit request, consuming a deterministic counter if
    /// one fires. 503s take precedence over 429s, then the random faults.
    pub(crate) fn take_submit_fault(&mut self) -> Option<Injected> {
        if take(&mut self.fail_next_submits) {
            return Some(Injected::Unavailable);
        }
        if take(&mut self.rate_limit_next_submits) {
            return Some(self.rate_limited());
        }
        self.random_fault()
    }

    /// The fault for a `run/info` or `run/execution` request.
    pub(crate) fn take_poll_fault(&mut self) -> Option<Injected> {
        if take(&mut self.fail_next_polls) {
            return Some(Injected::Unavailable);
        }
        self.random_fault()
    }

    /// A fault drawn from the configured rates, for any API request.
    pub(crate) fn random_fault(&self) -> Option<Injected> {
        if self.error_rate <= 0.0 && self.rate_limit_rate <= 0.0 {
            return None;
        }
        let roll = fastrand::f64();
        if roll < self.error_rate {
            Some(Injected::ServerError)
        } else if roll < self.error_rate + self.rate_limit_rate {
            Some(self.rate_limited())
        } else {
            None
        }
    }

    /// Whether the answer to an accepted submit is to be lost.
    pub(crate) fn take_answer_drop(&mut self) -> bool {
        take(&mut self.drop_next_submit_answers)
            || (self.drop_after_submit_rate > 0.0 && fastrand::f64() < self.drop_after_submit_rate)
    }

    fn rate_limited(&self) -> Injected {
        Injected::RateLimited {
            retry_after_secs: self.retry_after_secs,
        }
    }
}

/// Consumes one unit of a counter; false when it is already zero.
fn take(counter: &mut u32) -> bool {
    match counter.checked_sub(1) {
        Some(rest) => {
            *counter = rest;
            true
        }
        None => false,
    }
}

/// `Duration` as whole milliseconds, the unit people type into fault files.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_fire_in_order_then_stop() {
        let mut f = Faults {
            fail_next_submits: 1,
            rate_limit_next_submits: 1,
            retry_after_secs: Some(7),
            ..Faults::default()
        };
        assert_eq!(f.take_submit_fault(), Some(Injected::Unavailable));
        assert_eq!(
            f.take_submit_fault(),
            Some(Injected::RateLimited {
                retry_after_secs: Some(7)
            })
        );
        assert_eq!(f.take_submit_fault(), None);
        assert_eq!((f.fail_next_submits, f.rate_limit_next_submits), (0, 0));
    }

    #[test]
    fn rates_of_one_always_fire() {
        let mut f = Faults {
            error_rate: 1.0,
            drop_after_submit_rate: 1.0,
            ..Faults::default()
        };
        assert_eq!(f.take_poll_fault(), Some(Injected::ServerError));
        assert!(f.take_answer_drop());
        assert!(!Faults::default().take_answer_drop());
    }

    #[test]
    fn wire_format_uses_latency_ms_and_defaults() {
        let f: Faults = serde_json::from_str(r#"{"latency_ms": 250, "fail_next_polls": 2}"#)
            .expect("valid faults");
        assert_eq!(f.latency, Duration::from_millis(250));
        assert_eq!(f.fail_next_polls, 2);
        let back = serde_json::to_value(&f).expect("serialize");
        assert_eq!(back["latency_ms"], 250);
        assert!(
            Faults {
                error_rate: 1.5,
                ..f
            }
            .check()
            .is_err()
        );
        assert!(
            Faults {
                error_rate: f64::NAN,
                ..Faults::default()
            }
            .check()
            .is_err()
        );
    }
}
