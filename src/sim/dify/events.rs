//! The streaming events of a run, as a timeline: each event with the moment
//! (after creation) it happens. Pure: the run stream and the resume
//! endpoint both send the prefix of this list that is due.
//!
//! Nodes: `start` and `llm` start when the queue time is over; the LLM node
//! finishes (and carries the tokens and price) at the end, then `end` runs,
//! then `workflow_finished`. A stop cuts the list at the stop: the running
//! node finishes `stopped`, then `workflow_finished` says `stopped`.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use super::apps::{Ending, NODE_FAILURE};
use super::run::{CURRENCY, DifyRun, price};
use crate::sim::hostile::{self, Variant};
use crate::sim::money::{ExactNumber, stable_hash};
use crate::sim::timeline::Timing;

/// One event, serialized, and when it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TimedEvent {
    pub at: Duration,
    pub json: String,
}

impl TimedEvent {
    /// The SSE block: `data: {json}\n\n`.
    pub(crate) fn frame(&self) -> String {
        format!("data: {}\n\n", self.json)
    }
}

/// A keep-alive, as Dify sends it: an SSE event without data.
pub(crate) const PING_FRAME: &str = "event: ping\n\n";

/// A node of the simulated graph.
#[derive(Debug, Clone, Copy)]
struct Node {
    node_id: &'static str,
    node_type: &'static str,
    title: &'static str,
    index: u32,
    predecessor: Option<&'static str>,
}

const START: Node = Node {
    node_id: "1718000000001",
    node_type: "start",
    title: "Start",
    index: 1,
    predecessor: None,
};
const LLM: Node = Node {
    node_id: "1718000000002",
    node_type: "llm",
    title: "LLM",
    index: 2,
    predecessor: Some("1718000000001"),
};
const END: Node = Node {
    node_id: "1718000000003",
    node_type: "end",
    title: "End",
    index: 3,
    predecessor: Some("1718000000002"),
};

/// `total_price` as both forms seen in the wild: a string for runs with an
/// even sequence number, an exact JSON number for the others.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum WirePrice {
    Text(String),
    Number(ExactNumber),
}

#[derive(Debug, Serialize)]
struct Metadata {
    total_tokens: i64,
    total_price: WirePrice,
    currency: String,
}

/// `node_finished` data: the plain fields plus the metadata, which cannot
/// live in a `Value` because of the exact number.
#[derive(Debug, Serialize)]
struct NodeFinished {
    #[serde(flatten)]
    fields: Value,
    execution_metadata: Metadata,
}

#[derive(Debug, Serialize)]
struct Event<'a, D> {
    event: &'static str,
    task_id: &'a str,
    workflow_run_id: &'a str,
    data: D,
}

/// The whole timeline of `run` as known now: the past, and the plan for
/// the rest, which a later stop can only cut, never rewrite. With
/// `hostile`, `workflow_finished` carries that entry (see `hostile`).
pub(crate) fn timeline(
    run: &DifyRun,
    timing: &Timing,
    hostile: Option<Variant>,
) -> Vec<TimedEvent> {
    let created = run.created_at.timestamp();
    let ends = run.ends_after(timing);
    let started = timing.queue;
    let stopped = run.stopped_after.is_some();
    let mut events = Vec::new();
    let mut push = |at: Duration, json: String| events.push(TimedEvent { at, json });
    let event = |name, data: &Value| envelope(run, name, data);

    push(
        Duration::ZERO,
        event(
            "workflow_started",
            &json!({
                "id": run.id,
                "workflow_id": run.app.workflow_id,
                "sequence_number": run.sequence_number,
                "created_at": created,
            }),
        ),
    );
    let node_started = |node: Node, at: Duration| {
        event("node_started", &node_fields(run, node, created + secs(at)))
    };
    let node_finished =
        |node: Node, at: Duration, status: &str, error: Option<&str>, tokens: i64| {
            let mut fields = node_fields(run, node, created + secs(started.min(at)));
            fields["process_data"] = Value::Null;
            fields["outputs"] = json!({});
            fields["status"] = json!(status);
            fields["error"] = json!(error);
            fields["elapsed_time"] = json!(at.saturating_sub(started).as_secs_f64());
            envelope(
                run,
                "node_finished",
                &NodeFinished {
                    fields,
                    execution_metadata: metadata(run, node, tokens),
                },
            )
        };
    if run.started(timing, ends) {
        push(started, node_started(START, started));
        push(started, node_finished(START, started, "succeeded", None, 0));
        push(started, node_started(LLM, started));
        let tokens = run.billed_tokens(timing);
        if stopped {
            push(ends, node_finished(LLM, ends, "stopped", None, tokens));
        } else {
            let (status, error) = match run.app.ending {
                Ending::Succeeds => ("succeeded", None),
                Ending::Fails => ("failed", Some(NODE_FAILURE)),
                // "continue on error": the node fails, the run goes on.
                Ending::PartlySucceeds => ("exception", Some(NODE_FAILURE)),
            };
            push(ends, node_finished(LLM, ends, status, error, tokens));
            if run.app.ending != Ending::Fails {
                push(ends, node_started(END, ends));
                push(ends, node_finished(END, ends, "succeeded", None, 0));
            }
        }
    }
    let finished = event(
        "workflow_finished",
        &finished_data(run, timing, ends, hostile.is_some()),
    );
    push(
        ends,
        match hostile {
            Some(variant) => hostile::splice(&finished, variant),
            None => finished,
        },
    );
    events
}

/// The `data` of `workflow_finished`, also the `data` of a blocking answer.
/// Dates are unix seconds here, as in the docs' stream examples. `hostile`:
/// marks for `hostile::splice` in the outputs or the failure.
pub(crate) fn finished_data(
    run: &DifyRun,
    timing: &Timing,
    elapsed: Duration,
    hostile: bool,
) -> Value {
    let finished_at = run.finished_at(timing, elapsed).map(|t| t.timestamp());
    json!({
        "id": run.id,
        "workflow_id": run.app.workflow_id,
        "status": run.status(timing, elapsed),
        "outputs": outputs(run, timing, elapsed, hostile),
        "error": error(run, timing, elapsed, hostile),
        "elapsed_time": run.elapsed_time(timing, elapsed),
        "total_tokens": run.tokens(timing, elapsed),
        "total_steps": run.total_steps(timing, elapsed),
        "created_at": run.created_at.timestamp(),
        "finished_at": finished_at,
    })
}

/// The run's outputs, marked for the hostile entry when `hostile`.
pub(crate) fn outputs(run: &DifyRun, timing: &Timing, elapsed: Duration, hostile: bool) -> Value {
    match run.outputs(timing, elapsed) {
        Some(outputs) if hostile => hostile::mark_outputs(outputs),
        Some(outputs) => outputs,
        None => Value::Null,
    }
}

/// The run's error, marked for the hostile entry when `hostile` and the
/// run failed (a stop's message is left alone).
pub(crate) fn error(run: &DifyRun, timing: &Timing, elapsed: Duration, hostile: bool) -> Value {
    match run.error(timing, elapsed) {
        Some(text) if hostile && run.stopped_after.is_none() => {
            Value::String(hostile::mark_message(text))
        }
        Some(text) => Value::String(text.to_owned()),
        None => Value::Null,
    }
}

fn node_fields(run: &DifyRun, node: Node, created_at: i64) -> Value {
    json!({
        "id": node_execution_id(&run.id, node.node_id),
        "node_id": node.node_id,
        "node_type": node.node_type,
        "title": node.title,
        "index": node.index,
        "predecessor_node_id": node.predecessor,
        "inputs": {},
        "created_at": created_at,
    })
}

fn metadata(run: &DifyRun, node: Node, tokens: i64) -> Metadata {
    let total = price(tokens);
    let currency = match &run.start_node_currency {
        Some(other) if node.node_id == START.node_id => other.clone(),
        _ => CURRENCY.to_owned(),
    };
    Metadata {
        total_tokens: tokens,
        total_price: if run.sequence_number.is_multiple_of(2) {
            WirePrice::Text(total.normalize().to_string())
        } else {
            WirePrice::Number(ExactNumber(total))
        },
        currency,
    }
}

/// A UUID-shaped id for a node execution, stable per run and node so that a
/// replay repeats the ids the stream sent.
fn node_execution_id(run_id: &str, node_id: &str) -> String {
    let a = stable_hash(run_id, node_id);
    let b = stable_hash(node_id, run_id);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// An event with its envelope, serialized.
fn envelope<D: Serialize>(run: &DifyRun, event: &'static str, data: &D) -> String {
    let e = Event {
        event,
        task_id: &run.task_id,
        workflow_run_id: &run.id,
        data,
    };
    // Plain data and RawValue numbers cannot fail to serialize.
    serde_json::to_string(&e).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::dify::run::tests::{T, run};

    fn names(events: &[TimedEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(&e.json).expect("json");
                format!(
                    "{}:{}",
                    v["event"].as_str().unwrap_or(""),
                    v["data"]["node_type"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    #[test]
    fn a_full_run_and_its_prices() {
        let mut r = run("text");
        let events = timeline(&r, &T, None);
        assert_eq!(
            names(&events),
            [
                "workflow_started:",
                "node_started:start",
                "node_finished:start",
                "node_started:llm",
                "node_finished:llm",
                "node_started:end",
                "node_finished:end",
                "workflow_finished:"
            ]
        );
        assert_eq!(events[0].at, Duration::ZERO);
        assert_eq!(events[7].at, T.queue + T.run);
        assert!(
            events[0]
                .frame()
                .starts_with("data: {\"event\":\"workflow_started\"")
        );
        let expected = price(r.full_tokens).normalize().to_string();
        r.sequence_number = 1;
        let llm = &timeline(&r, &T, None)[4].json;
        assert!(
            llm.contains(&format!("\"total_price\":{expected},")),
            "{llm}"
        );
        r.sequence_number = 2;
        let llm = &timeline(&r, &T, None)[4].json;
        assert!(
            llm.contains(&format!("\"total_price\":\"{expected}\"")),
            "{llm}"
        );
    }

    #[test]
    fn failures_and_stops_cut_the_graph() {
        let f = run("fails");
        let names_f = names(&timeline(&f, &T, None));
        assert_eq!(names_f.len(), 6);
        assert!(
            timeline(&f, &T, None)[4]
                .json
                .contains("\"status\":\"failed\"")
        );
        let mut s = run("text");
        s.stop(&T, Duration::from_millis(600));
        let events = timeline(&s, &T, None);
        assert_eq!(events.len(), 6);
        assert!(events[4].json.contains("\"status\":\"stopped\""));
        assert_eq!(events[5].at, Duration::from_millis(600));
        let mut q = run("text");
        q.stop(&T, Duration::from_millis(10));
        assert_eq!(
            names(&timeline(&q, &T, None)),
            ["workflow_started:", "workflow_finished:"]
        );
    }

    #[test]
    fn node_ids_are_stable_and_uuid_shaped() {
        let id = node_execution_id("run", "node");
        assert_eq!(id, node_execution_id("run", "node"));
        assert_eq!(id.len(), 36);
        assert_ne!(id, node_execution_id("run", "other"));
    }
}
