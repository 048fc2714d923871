//! The JSON answers about runs: run detail, blocking answer and log
//! entries, each a pure function of a run and the time since its creation.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::events::{error, finished_data, outputs};
use super::run::DifyRun;
use crate::sim::timeline::Timing;

/// How a run's dates are written on the detail and logs endpoints. The
/// docs show both unix seconds and an RFC 2822-like text, so runs
/// alternate (in pairs, so that both date forms meet both price forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DateStyle {
    Unix,
    Text,
}

impl DateStyle {
    /// The style of `run`'s dates.
    pub(crate) fn of(run: &DifyRun) -> DateStyle {
        if (run.sequence_number / 2).is_multiple_of(2) {
            DateStyle::Unix
        } else {
            DateStyle::Text
        }
    }

    /// `at` in this style.
    pub(crate) fn format(self, at: DateTime<Utc>) -> Value {
        match self {
            DateStyle::Unix => json!(at.timestamp()),
            DateStyle::Text => json!(at.format("%a, %d %b %Y %H:%M:%S -0000").to_string()),
        }
    }
}

/// `GET /workflows/run/{id}`. `inputs` is a JSON *string* with Dify's
/// system variables, as in the docs; there is no price here, as in Dify.
/// `hostile`: marks for `hostile::splice`.
pub(crate) fn detail(run: &DifyRun, timing: &Timing, elapsed: Duration, hostile: bool) -> Value {
    let style = DateStyle::of(run);
    let mut inputs: Map<String, Value> = run.inputs.clone();
    inputs.insert("sys.files".into(), json!([]));
    inputs.insert("sys.user_id".into(), json!(run.user));
    json!({
        "id": run.id,
        "workflow_id": run.app.workflow_id,
        "status": run.status(timing, elapsed),
        "inputs": Value::Object(inputs).to_string(),
        "outputs": outputs(run, timing, elapsed, hostile),
        "error": error(run, timing, elapsed, hostile),
        "total_steps": run.total_steps(timing, elapsed),
        "total_tokens": run.tokens(timing, elapsed),
        "created_at": style.format(run.created_at),
        "finished_at": run.finished_at(timing, elapsed).map(|t| style.format(t)),
        "elapsed_time": run.elapsed_time(timing, elapsed),
    })
}

/// The answer to a blocking run request.
pub(crate) fn blocking(run: &DifyRun, timing: &Timing, elapsed: Duration, hostile: bool) -> Value {
    json!({
        "workflow_run_id": run.id,
        "task_id": run.task_id,
        "data": finished_data(run, timing, elapsed, hostile),
    })
}

/// One entry of `GET /workflows/logs`. `written_at_start`: the row was
/// written when the run started (newer Dify, `dify_logs_include_running`),
/// not when it ended.
pub(crate) fn log_entry(
    run: &DifyRun,
    timing: &Timing,
    elapsed: Duration,
    written_at_start: bool,
) -> Value {
    let style = DateStyle::of(run);
    let finished_at = run.finished_at(timing, elapsed);
    json!({
        "id": run.log_id,
        "workflow_run": {
            "id": run.id,
            "version": run.app.version,
            "status": run.status(timing, elapsed),
            "error": run.error(timing, elapsed),
            "elapsed_time": run.elapsed_time(timing, elapsed),
            "total_tokens": run.tokens(timing, elapsed),
            "total_steps": run.total_steps(timing, elapsed),
            "created_at": style.format(run.created_at),
            "finished_at": finished_at.map(|t| style.format(t)),
        },
        "created_from": "service-api",
        "created_by_role": "end_user",
        "created_by_account": null,
        "created_by_end_user": {
            "id": run.end_user_id,
            "type": "service_api",
            "is_anonymous": false,
            "session_id": run.user,
        },
        "created_at": if written_at_start {
            run.created_at
        } else {
            finished_at.unwrap_or(run.created_at)
        }
        .timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::dify::run::tests::{T, run};

    #[test]
    fn detail_has_the_documented_shape() {
        let mut r = run("text");
        r.sequence_number = 1;
        let running = detail(&r, &T, Duration::ZERO, false);
        assert_eq!(running["status"], "running");
        assert_eq!(running["finished_at"], Value::Null);
        assert_eq!(running["outputs"], Value::Null);
        assert!(running["created_at"].is_i64());
        let inputs: Value =
            serde_json::from_str(running["inputs"].as_str().expect("a string")).expect("json");
        assert_eq!(inputs["sys.user_id"], "u1");
        assert_eq!(inputs["query"], "a b c");
        r.sequence_number = 2;
        let done = detail(&r, &T, Duration::from_secs(5), false);
        assert_eq!(done["status"], "succeeded");
        let text = done["finished_at"].as_str().expect("text date");
        assert!(text.ends_with(" -0000") && text.contains(", "), "{text}");
        assert!(done.get("total_price").is_none());
    }

    #[test]
    fn log_entries_name_the_end_user() {
        let r = run("fails");
        let entry = log_entry(&r, &T, Duration::from_secs(5), false);
        assert_eq!(entry["created_by_end_user"]["session_id"], "u1");
        assert_eq!(entry["workflow_run"]["status"], "failed");
        assert_eq!(
            entry["workflow_run"]["version"],
            "2025-01-06 09:31:00.000000"
        );
        let b = blocking(&r, &T, Duration::from_secs(5), false);
        assert_eq!(b["data"]["error"], "simulated node failure");
        assert_eq!(b["workflow_run_id"], b["data"]["id"]);
    }
}
