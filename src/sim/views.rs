//! The JSON `data` of run answers: submit, `run/info` and `run/execution`,
//! each a pure function of a run and its phase.

use chrono::SecondsFormat;
use rust_decimal::Decimal;
use serde_json::{Map, Number, Value, json};

use super::catalog::Outcome;
use super::hostile;
use super::money::amount8;
use super::run::Run;
use super::timeline::{Phase, Timing};

/// `run_status` at `phase`.
fn run_status(run: &Run, phase: Phase) -> &'static str {
    match (phase, run.workflow.outcome) {
        (Phase::Queued, _) => "queued",
        (Phase::Running, _) => "running",
        (Phase::Finished | Phase::Settled, Outcome::Succeeds) => "succeeded",
        (Phase::Finished | Phase::Settled, Outcome::Fails { .. }) => "failed",
    }
}

fn freeze_status(phase: Phase) -> &'static str {
    if phase == Phase::Settled {
        "released"
    } else {
        "frozen"
    }
}

/// The engine error of a failed run: `(code, message)`.
fn failure(run: &Run, phase: Phase) -> Option<(&'static str, &'static str)> {
    match run.workflow.outcome {
        Outcome::Fails {
            error_code,
            error_message,
            ..
        } if phase >= Phase::Finished => Some((error_code, error_message)),
        _ => None,
    }
}

/// Output URLs, present once the run has succeeded; with the hostile
/// member's mark when `hostile`.
fn outputs(run: &Run, phase: Phase, hostile: bool) -> Value {
    let mut map = Map::new();
    if run_status(run, phase) == "succeeded" {
        for output in run.workflow.outputs {
            let url = format!(
                "https://sim.chenyu.local/media/{}/{}.{}",
                run.run_order_id,
                output.key,
                output.ty.extension()
            );
            map.insert(output.key.to_owned(), Value::String(url));
        }
        if hostile {
            return hostile::mark_outputs(Value::Object(map));
        }
    }
    Value::Object(map)
}

/// An error message, with the hostile suffix's mark when `hostile`.
fn message(text: &str, hostile: bool) -> String {
    if hostile {
        hostile::mark_message(text)
    } else {
        text.to_owned()
    }
}

/// The `data` of a submit answer (new or replayed).
pub(crate) fn submit_answer(run: &Run, phase: Phase, replay: bool) -> Value {
    let wf = run.workflow;
    json!({
        "run_order_id": run.run_order_id,
        "workflow_id": wf.workflow_id,
        "revision_id": wf.revision_id,
        "quote_currency": "CNY",
        "quote_amount": amount8(wf.quote()),
        "freeze_status": freeze_status(phase),
        "run_status": run_status(run, phase),
        "task_id": run.task_id,
        "prompt_id": run.prompt_id,
        "billing_run_id": run.billing_run_id,
        "idempotent_replay": replay,
    })
}

/// The `data` of `run/info`. Amounts are 8-place strings once settled and
/// `""` before (the documented value before settlement is unknown; empty
/// strings are the hardest case for a client). `hostile`: marks for
/// `hostile::splice` in the outputs and error message of a finished run.
pub(crate) fn run_info(run: &Run, phase: Phase, timing: &Timing, hostile: bool) -> Value {
    let wf = run.workflow;
    let settled = phase == Phase::Settled;
    let money = |d: Decimal| if settled { amount8(d) } else { String::new() };
    let s = &run.settlement;
    let (error_code, error_message) = match failure(run, phase) {
        Some((code, text)) => (code, message(text, hostile)),
        None => ("", String::new()),
    };
    let updated_at = run.created_at + timing.entered(phase);
    json!({
        "run_order_id": run.run_order_id,
        "workflow_id": wf.workflow_id,
        "revision_id": wf.revision_id,
        "quote_amount": amount8(wf.quote()),
        "quote_currency": "CNY",
        "freeze_status": freeze_status(phase),
        "submission_status": "submitted",
        "run_status": run_status(run, phase),
        "settlement_status": if settled { "settled" } else { "unsettled" },
        "task_id": run.task_id,
        "prompt_id": run.prompt_id,
        "inputs": run.inputs,
        "outputs": outputs(run, phase, hostile),
        "compute_cost": money(s.compute_cost),
        "external_model_cost": money(s.external_model_cost),
        "total_cost": money(s.total_cost),
        "final_amount": money(s.final_amount),
        "released_amount": money(s.released),
        "error_code": error_code,
        "error_message": error_message,
        "created_at": run.created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        "updated_at": updated_at.to_rfc3339_opts(SecondsFormat::Secs, true),
    })
}

/// Where a queued run waits, for `run/execution`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueInfo {
    /// 1-based position in the queue.
    pub position: usize,
    pub estimated_wait_sec: u64,
}

/// The `data` of `run/execution`. Costs are JSON numbers here, unlike
/// `run/info`, and `null` until settled. `hostile` as for `run_info`.
pub(crate) fn execution(
    run: &Run,
    phase: Phase,
    progress: u32,
    queue: Option<QueueInfo>,
    hostile: bool,
) -> Value {
    let settled = phase == Phase::Settled;
    let cost = |d: Decimal| {
        if settled {
            decimal_number(d)
        } else {
            Value::Null
        }
    };
    let s = &run.settlement;
    json!({
        "run_order_id": run.run_order_id,
        "status": run_status(run, phase),
        "queue_info": queue.map(|q| json!({"position": q.position, "estimated_wait_sec": q.estimated_wait_sec})),
        "progress_percent": progress,
        "logs": [],
        "outputs": outputs(run, phase, hostile),
        "error": failure(run, phase).map(|(code, text)| json!({"code": code, "message": message(text, hostile)})),
        "compute_cost": cost(s.compute_cost),
        "external_model_cost": cost(s.external_model_cost),
        "total_cost": cost(s.total_cost),
    })
}

/// A decimal as a JSON number. The wire format is a float, so it goes
/// through `f64`, but by parsing the decimal's text: the nearest double,
/// which serde_json prints back as the same shortest digits ("0.0002878").
fn decimal_number(d: Decimal) -> Value {
    d.normalize()
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::catalog::find;
    use std::time::{Duration, Instant};

    const T: Timing = Timing {
        queue: Duration::from_millis(10),
        run: Duration::from_millis(10),
        settle: Duration::from_millis(10),
    };

    fn run(workflow_id: &str) -> Run {
        let wf = find(workflow_id).expect("catalog");
        Run::new(
            "wfrun_00000000000000000001".into(),
            wf,
            "key".into(),
            json!({}),
            Instant::now(),
            1,
        )
    }

    #[test]
    fn info_hides_money_until_settled() {
        let r = run("wf_861ef31e94dcfb10e6e7");
        let before = run_info(&r, Phase::Finished, &T, false);
        assert_eq!(before["settlement_status"], "unsettled");
        assert_eq!(before["final_amount"], "");
        assert_eq!(
            before["outputs"]["n9_images"],
            "https://sim.chenyu.local/media/wfrun_00000000000000000001/n9_images.png"
        );
        let after = run_info(&r, Phase::Settled, &T, false);
        assert_eq!(after["freeze_status"], "released");
        let amount = |k: &str| {
            after[k]
                .as_str()
                .unwrap_or_default()
                .parse::<Decimal>()
                .expect(k)
        };
        assert_eq!(
            amount("final_amount") + amount("released_amount"),
            amount("quote_amount")
        );
        assert_eq!(
            amount("compute_cost") + amount("external_model_cost"),
            amount("total_cost")
        );
    }

    #[test]
    fn failed_runs_report_the_error() {
        let r = run("wf_always_fails_9d1a");
        let info = run_info(&r, Phase::Settled, &T, false);
        assert_eq!(info["run_status"], "failed");
        assert_eq!(info["error_code"], "ENGINE_EXECUTION_FAILED");
        assert_eq!(info["outputs"], json!({}));
        let exec = execution(&r, Phase::Settled, 100, None, false);
        assert_eq!(exec["error"]["code"], "ENGINE_EXECUTION_FAILED");
        assert_eq!(exec["total_cost"], json!(0.01));
    }

    #[test]
    fn execution_costs_are_exact_numbers() {
        assert_eq!(
            decimal_number(Decimal::new(28_780, 8)).to_string(),
            "0.0002878"
        );
        let r = run("wf_seedance_video_2f0c");
        let exec = execution(&r, Phase::Running, 40, None, false);
        assert_eq!(exec["compute_cost"], Value::Null);
        assert_eq!(exec["error"], Value::Null);
    }
}
