//! The JSON answers: the async invoke answer and the query/result body
//! (also the synchronous invoke answer), as in the docs.
//!
//! Undocumented, chosen here: before the end `output`, `endTime` and
//! `workflowExecutionTime` are `null` and `totalCost`/`totalTokens` are 0;
//! a `FAILED` run has `output: null` and an `errorMessage`.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use super::run::GptRun;
use crate::sim::hostile::{self, Variant};
use crate::sim::money::ExactNumber;
use crate::sim::timeline::Timing;

/// The query/result body. A struct, not a `Value`, so that `totalCost` is
/// an exact number.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RunResult<'a> {
    workflow_id: &'a str,
    workflow_name: &'a str,
    workflow_version: &'a str,
    workflow_run_id: &'a str,
    input: &'a Value,
    output: Value,
    workflow_execution_time: Option<u64>,
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_cost: Option<ExactNumber>,
    total_tokens: i64,
    start_time: i64,
    end_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<String>,
}

/// How a finished run's answer is bent (`Faults`); the default bends
/// nothing.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Oddities<'a> {
    /// `hostile_outputs`: the entry for this run.
    pub hostile: Option<Variant>,
    /// `gptbots_unknown_status`: reported instead of `SUCCEED`/`FAILED`.
    pub unknown_status: Option<&'a str>,
    /// `gptbots_omit_total_cost`: no `totalCost` member at all.
    pub omit_total_cost: bool,
}

/// The body of `query/result` (and of a synchronous invoke), serialized.
/// `odd` applies only once the run is over.
pub(crate) fn result(run: &GptRun, timing: &Timing, elapsed: Duration, odd: &Oddities) -> String {
    let over = run.is_over(timing, elapsed);
    let odd = if over { *odd } else { Oddities::default() };
    let hostile = odd.hostile.is_some();
    let failed = over && run.workflow.fails;
    let start = run.created_at.timestamp_millis();
    let ends = timing.queue.saturating_add(timing.run);
    let body = RunResult {
        workflow_id: run.workflow.workflow_id,
        workflow_name: run.workflow.workflow_name,
        workflow_version: run.workflow.workflow_version,
        workflow_run_id: &run.id,
        input: &run.input,
        output: match (over && !failed, hostile) {
            (true, true) => hostile::mark_outputs(run.workflow.output(&run.input)),
            (true, false) => run.workflow.output(&run.input),
            (false, _) => Value::Null,
        },
        // Time spent executing, without the queue: slightly less than
        // end - start, as in the documented example.
        workflow_execution_time: over.then(|| millis(timing.run)),
        status: odd
            .unknown_status
            .unwrap_or_else(|| run.status(timing, elapsed)),
        total_cost: (!odd.omit_total_cost).then(|| ExactNumber(run.cost(timing, elapsed))),
        total_tokens: run.tokens(timing, elapsed),
        start_time: start,
        end_time: over.then(|| start.saturating_add(i64::try_from(millis(ends)).unwrap_or(0))),
        error_message: failed.then(|| {
            let message = run.workflow.failure(&run.input);
            if hostile {
                hostile::mark_message(&message)
            } else {
                message
            }
        }),
    };
    let text = serde_json::to_string(&body).unwrap_or_default();
    match odd.hostile {
        Some(variant) => hostile::splice(&text, variant),
        None => text,
    }
}

/// The answer to an async invoke.
pub(crate) fn pending(run: &GptRun) -> Value {
    json!({
        "workflowId": run.workflow.workflow_id,
        "workflowName": run.workflow.workflow_name,
        "workflowVersion": run.workflow.workflow_version,
        "workflowRunId": run.id,
        "status": "PENDING",
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::gptbots::run::tests::{T, run};

    #[test]
    fn results_before_and_after_the_end() {
        let r = run("news");
        let pending: Value =
            serde_json::from_str(&result(&r, &T, Duration::ZERO, &Oddities::default()))
                .expect("json");
        assert_eq!(pending["status"], "PENDING");
        assert_eq!(pending["output"], Value::Null);
        assert_eq!(pending["totalCost"], 0);
        assert!(pending.get("errorMessage").is_none());
        let text = result(&r, &T, Duration::from_secs(5), &Oddities::default());
        let cost = r.cost(&T, Duration::from_secs(5)).normalize().to_string();
        assert!(text.contains(&format!("\"totalCost\":{cost},")), "{text}");
        let done: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(done["status"], "SUCCEED");
        assert_eq!(done["workflowExecutionTime"], 1000);
        assert_eq!(
            done["endTime"].as_i64().expect("end") - done["startTime"].as_i64().expect("start"),
            1100
        );
        let failed: Value = serde_json::from_str(&result(
            &run("fails"),
            &T,
            Duration::from_secs(5),
            &Oddities::default(),
        ))
        .expect("json");
        assert_eq!(failed["status"], "FAILED");
        assert_eq!(failed["output"], Value::Null);
        assert_eq!(failed["errorMessage"], super::super::workflows::FAILURE);
    }
}
