//! chenyu `GET /workflow/run/execution`: how far a run has got, for display
//! (`wfq enqueue --wait`). Never used for money or state decisions: costs
//! there are JSON numbers (floats), and `run/info` stays the source of truth.

use serde_json::Value;

use super::{Answer, ChenyuClient};
use crate::providers::edge::Storable;
use crate::providers::storable::{AnswerLimits, storable_text};
use crate::providers::wire::{Call, non_empty, unreadable};
use crate::providers::{ProviderError, Unclear};

/// What `run/execution` says about a run in progress. Every field is
/// optional: a field that is missing or not a number is left out rather than
/// failing the whole answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunProgressReport {
    /// The provider's `status`, verbatim (`queued`, `running`, `succeeded`, ...).
    pub status: Option<String>,
    /// 1-based place in the provider's queue (`queue_info.position`).
    pub queue_position: Option<u64>,
    /// The provider's estimate of the remaining queue time, in seconds.
    pub estimated_wait_sec: Option<u64>,
    /// Execution progress, 0 to 100.
    pub progress_percent: Option<f64>,
}

/// Why no progress could be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProgressError {
    /// The provider refused the request (e.g. an unknown run).
    #[error("{}: {}", .0.code, .0.message)]
    Rejected(ProviderError),
    /// No usable answer (timeout, 5xx, 401, unreadable body).
    #[error("{}", .0.reason)]
    Unclear(Unclear),
}

impl ChenyuClient {
    /// `GET /workflow/run/execution`: status, queue place and progress.
    pub async fn progress(&self, run_order_id: &str) -> Result<RunProgressReport, ProgressError> {
        let request = self
            .http
            .get(format!("{}/workflow/run/execution", self.base_url))
            .query(&[("run_order_id", run_order_id)]);
        let progress = match self.classify(Call::Other, self.send(request).await) {
            Answer::Data { data, .. } => parse_progress(&data).map_err(ProgressError::Unclear),
            Answer::Rejected(e) => Err(ProgressError::Rejected(e)),
            Answer::Unclear(u) => Err(ProgressError::Unclear(u)),
        };
        progress
            .map(|mut p| {
                p.status = p
                    .status
                    .map(|s| storable_text(&s, self.limits.max_string_bytes).into_owned());
                p
            })
            .storable(&self.limits)
    }
}

impl Storable for ProgressError {
    fn storable(self, limits: &AnswerLimits) -> Self {
        match self {
            ProgressError::Rejected(e) => ProgressError::Rejected(e.storable(limits)),
            ProgressError::Unclear(u) => ProgressError::Unclear(u.storable(limits)),
        }
    }
}

/// Reads the `data` of a `run/execution` answer.
pub(super) fn parse_progress(data: &str) -> Result<RunProgressReport, Unclear> {
    let value: Value = serde_json::from_str(data).map_err(|e| unreadable("run execution", e))?;
    let Value::Object(data) = value else {
        return Err(unreadable("run execution", "data is not an object"));
    };
    let queue = data.get("queue_info").filter(|q| q.is_object());
    let queue_field = |key: &str| queue.and_then(|q| q.get(key)).and_then(whole_number);
    Ok(RunProgressReport {
        status: non_empty(
            data.get("status")
                .and_then(Value::as_str)
                .map(str::to_owned),
        ),
        queue_position: queue_field("position"),
        estimated_wait_sec: queue_field("estimated_wait_sec"),
        progress_percent: data
            .get("progress_percent")
            .and_then(number)
            .filter(|p| p.is_finite())
            .map(|p| p.clamp(0.0, 100.0)),
    })
}

/// A JSON number, or a string holding one.
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A non-negative whole number (a fraction is rounded up: "~0.4 s" is
/// shown as 1 s, not 0).
fn whole_number(value: &Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return Some(n);
    }
    number(value)
        .filter(|n| n.is_finite() && *n >= 0.0 && *n < u64::MAX as f64)
        .map(|n| n.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_queued_run_has_a_place_and_a_wait() {
        let p = parse_progress(
            &json!({
                "run_order_id": "wfrun_1", "status": "queued",
                "queue_info": {"position": 3, "estimated_wait_sec": 12},
                "progress_percent": 0, "logs": [], "outputs": {}, "error": null,
                "compute_cost": null, "external_model_cost": null, "total_cost": null
            })
            .to_string(),
        )
        .unwrap();
        assert_eq!(
            p,
            RunProgressReport {
                status: Some("queued".into()),
                queue_position: Some(3),
                estimated_wait_sec: Some(12),
                progress_percent: Some(0.0),
            }
        );
    }

    #[test]
    fn a_running_run_has_a_percentage_and_no_queue() {
        let p = parse_progress(
            &json!({"status": "running", "queue_info": null, "progress_percent": 42.5,
                    "total_cost": 0.0002878})
            .to_string(),
        )
        .unwrap();
        assert_eq!(p.status.as_deref(), Some("running"));
        assert_eq!(p.queue_position, None);
        assert_eq!(p.estimated_wait_sec, None);
        assert_eq!(p.progress_percent, Some(42.5));
    }

    #[test]
    fn odd_fields_are_left_out_not_fatal() {
        let p = parse_progress(
            &json!({"status": "", "queue_info": {"position": "2", "estimated_wait_sec": 0.4},
                    "progress_percent": 140})
            .to_string(),
        )
        .unwrap();
        assert_eq!(p.status, None);
        assert_eq!(p.queue_position, Some(2));
        assert_eq!(p.estimated_wait_sec, Some(1));
        assert_eq!(p.progress_percent, Some(100.0));
        let p = parse_progress(
            &json!({"status": "running", "queue_info": {"position": -1}, "progress_percent": "n/a"})
                .to_string(),
        )
        .unwrap();
        assert_eq!(p.queue_position, None);
        assert_eq!(p.progress_percent, None);
        assert_eq!(parse_progress("{}").unwrap(), RunProgressReport::default());
    }

    #[test]
    fn a_body_that_is_not_an_object_is_unclear() {
        assert!(parse_progress("null").is_err());
        assert!(parse_progress("[1]").is_err());
        assert!(parse_progress("{").is_err());
    }
}
