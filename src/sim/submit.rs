//! `POST /workflow/run/submit`: parsing the body and deciding, atomically,
//! between an injected fault, a replay, a rejection and a new run.

use std::time::Instant;

use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::catalog::{self, Workflow};
use super::envelope::ApiError;
use super::faults::Injected;
use super::inputs;
use super::limits::under_cap;
use super::money::{amount8, stable_hash};
use super::run::{Run, new_run_order_id};
use super::state::{Inner, Shared};
use super::views;

/// Longest accepted idempotency key, as at Stripe.
const MAX_KEY_LEN: usize = 255;

/// A submit body, with each field type-checked but not yet validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SubmitRequest {
    pub workflow_id: Option<String>,
    pub revision_id: Option<String>,
    pub inputs: Option<Value>,
    pub idempotency_key: Option<String>,
    pub accept_external_cost_risk: bool,
}

/// What to answer a submit with.
#[derive(Debug)]
pub(crate) enum SubmitOutcome {
    Fault(Injected),
    Rejected(ApiError),
    /// A new run or a replay; `drop_answer` when the answer is to be lost.
    Accepted {
        data: Value,
        drop_answer: bool,
    },
}

/// Parses a submit body. Absent and `null` fields are `None`; a field of
/// the wrong JSON type makes the whole body invalid.
pub(crate) fn parse(body: &[u8]) -> Result<SubmitRequest, ApiError> {
    let invalid = |detail: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "Request body is invalid.",
            "INVALID_REQUEST_BODY",
            detail,
        )
    };
    let value: Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("body is not JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(invalid("body must be a JSON object".to_owned()));
    };
    let mut string = |field: &str| match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{field} must be a string"))),
    };
    let workflow_id = string("workflow_id")?;
    // An empty revision means "the published one", like an absent one.
    let revision_id = string("revision_id")?.filter(|r| !r.is_empty());
    let idempotency_key = string("idempotency_key")?;
    let accept_external_cost_risk = match map.remove("accept_external_cost_risk") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(invalid(
                "accept_external_cost_risk must be a bool".to_owned(),
            ));
        }
    };
    Ok(SubmitRequest {
        workflow_id,
        revision_id,
        inputs: map.remove("inputs"),
        idempotency_key,
        accept_external_cost_risk,
    })
}

/// Decides the outcome of one authorised submit and records it. Runs under
/// the state lock, so two concurrent submits with one key cannot both
/// create a run. Order: injected faults, the body, a replay of a known key
/// (never refused below), validation, the run cap, the balance (the quote
/// is frozen from it), then the new run.
pub(crate) fn decide(
    shared: &Shared,
    inner: &mut Inner,
    request: Result<SubmitRequest, ApiError>,
    now: Instant,
) -> SubmitOutcome {
    inner.stats.submit_requests += 1;
    // Faults first: a 503 or 429 means the request was never processed.
    if let Some(fault) = inner.faults.take_submit_fault() {
        inner.record_injected(fault);
        return SubmitOutcome::Fault(fault);
    }
    let request = match request {
        Ok(request) => request,
        Err(error) => return reject(inner, error),
    };
    if let Some(run) = replay_target(inner, &request) {
        run.submit_requests += 1;
        let mismatched = run.inputs != inputs_as_sent(&request);
        let data = views::submit_answer(run, shared.phase_now(run, now), true);
        inner.stats.replays += 1;
        inner.stats.mismatched_replays += u64::from(mismatched);
        return accepted(inner, data);
    }
    let (workflow, key) = match validate(&request) {
        Ok(valid) => valid,
        Err(error) => return reject(inner, error),
    };
    if let Some(code) = inner.faults.refuse_submits_code.clone() {
        inner.stats.rejected += 1;
        return SubmitOutcome::Rejected(ApiError {
            http: StatusCode::OK,
            status_code: StatusCode::FORBIDDEN,
            msg: "refused",
            engine_code: code.into(),
            detail: "refused by the refuse_submits_code fault".to_owned(),
        });
    }
    let running = inner.chenyu_running(&shared.timing, now);
    if !under_cap(running, inner.faults.max_running_runs) {
        inner.stats.cap_refusals += 1;
        return SubmitOutcome::Rejected(ApiError {
            http: StatusCode::OK,
            status_code: StatusCode::TOO_MANY_REQUESTS,
            msg: "concurrent run limit exceeded",
            engine_code: "CONCURRENT_RUN_LIMIT_EXCEEDED".into(),
            detail: format!(
                "{running} runs are queued or running; the account allows {}",
                inner.faults.max_running_runs.unwrap_or_default()
            ),
        });
    }
    let mut run_order_id = new_run_order_id();
    while inner.runs.contains_key(&run_order_id) {
        run_order_id = new_run_order_id();
    }
    inner.settle_account(&shared.timing, now);
    if let Err(short) = inner.account.freeze(workflow.quote(), &run_order_id) {
        inner.stats.balance_refusals += 1;
        return SubmitOutcome::Rejected(ApiError {
            http: StatusCode::OK,
            status_code: StatusCode::PAYMENT_REQUIRED,
            msg: "insufficient balance",
            engine_code: "INSUFFICIENT_BALANCE".into(),
            detail: format!(
                "the quote {} CNY exceeds the balance {} CNY",
                amount8(short.quote),
                amount8(short.balance)
            ),
        });
    }
    inner.chenyu_created += 1;
    let run = Run::new(
        run_order_id.clone(),
        workflow,
        key.clone(),
        inputs_as_sent(&request),
        now,
        inner.chenyu_created,
    );
    let data = views::submit_answer(&run, shared.phase_now(&run, now), false);
    inner
        .by_key
        .insert((workflow.workflow_id.to_owned(), key), run_order_id.clone());
    inner.runs.insert(run_order_id, run);
    inner.stats.accepted_new += 1;
    accepted(inner, data)
}

/// The existing run for this workflow and key, if any. A replay is
/// answered even when the inputs differ: the key decides, as documented.
fn replay_target<'a>(inner: &'a mut Inner, request: &SubmitRequest) -> Option<&'a mut Run> {
    let index_key = (
        request.workflow_id.clone()?,
        request.idempotency_key.clone()?,
    );
    let run_order_id = inner.by_key.get(&index_key)?;
    inner.runs.get_mut(run_order_id)
}

/// The checks for a new run, in the order chenyu applies them.
fn validate(request: &SubmitRequest) -> Result<(&'static Workflow, String), ApiError> {
    let workflow_id = request.workflow_id.as_deref().unwrap_or_default();
    let Some(workflow) = catalog::find(workflow_id) else {
        return Err(workflow_not_found(workflow_id));
    };
    if let Some(revision) = request.revision_id.as_deref()
        && revision != workflow.revision_id
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "revision not found",
            "REVISION_NOT_FOUND",
            format!("revision {revision} is not the published revision of {workflow_id}"),
        ));
    }
    let key = match request.idempotency_key.as_deref() {
        None | Some("") => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "idempotency_key is required",
                "IDEMPOTENCY_KEY_REQUIRED",
                "idempotency_key must be a non-empty string".to_owned(),
            ));
        }
        Some(key) if key.chars().count() > MAX_KEY_LEN => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "idempotency_key is too long",
                "IDEMPOTENCY_KEY_TOO_LONG",
                format!("idempotency_key must be at most {MAX_KEY_LEN} characters"),
            ));
        }
        Some(key) => key,
    };
    if workflow.may_incur_external_model_cost && !request.accept_external_cost_risk {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "external model cost risk not accepted",
            "EXTERNAL_COST_RISK_NOT_ACCEPTED",
            format!(
                "{workflow_id} may incur third-party model cost; pass accept_external_cost_risk: true"
            ),
        ));
    }
    inputs::validate(workflow, request.inputs.as_ref())
        .map_err(|detail| invalid_input(key, detail))?;
    Ok((workflow, key.to_owned()))
}

/// `INVALID_WORKFLOW_INPUT`. The docs warn that a non-zero `code` can come
/// with HTTP 200, so half the keys (deterministically) get 200 and half 400.
fn invalid_input(key: &str, detail: String) -> ApiError {
    let http = if stable_hash("input-status", key).is_multiple_of(2) {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError {
        http,
        status_code: StatusCode::BAD_REQUEST,
        msg: "Workflow input content is invalid.",
        engine_code: "INVALID_WORKFLOW_INPUT".into(),
        detail,
    }
}

/// `WORKFLOW_NOT_FOUND`, shared with `market/info`.
pub(crate) fn workflow_not_found(workflow_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "workflow not found",
        "WORKFLOW_NOT_FOUND",
        format!("workflow {workflow_id:?} does not exist or is not published"),
    )
}

/// The inputs to store and echo: what was sent, `{}` when nothing was.
fn inputs_as_sent(request: &SubmitRequest) -> Value {
    request
        .inputs
        .clone()
        .unwrap_or_else(|| Value::Object(Map::new()))
}

fn reject(inner: &mut Inner, error: ApiError) -> SubmitOutcome {
    inner.stats.rejected += 1;
    SubmitOutcome::Rejected(error)
}

/// An accepted submit; the answer-loss faults apply only here, after the work.
fn accepted(inner: &mut Inner, mut data: Value) -> SubmitOutcome {
    if let (Some(status), Value::Object(fields)) = (&inner.faults.submit_freeze_status, &mut data) {
        fields.insert("freeze_status".into(), Value::String(status.clone()));
    }
    let drop_answer = inner.faults.take_answer_drop();
    inner.stats.dropped_answers += u64::from(drop_answer);
    SubmitOutcome::Accepted { data, drop_answer }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::timeline::Timing;
    use serde_json::json;
    use std::time::Duration;

    fn shared() -> Shared {
        let t = Duration::from_millis(100);
        Shared::new(
            Timing {
                queue: t,
                run: t,
                settle: t,
            },
            None,
        )
    }

    fn body(value: Value) -> Result<SubmitRequest, ApiError> {
        parse(value.to_string().as_bytes())
    }

    fn engine_code(outcome: &SubmitOutcome) -> String {
        match outcome {
            SubmitOutcome::Rejected(e) => e.engine_code.to_string(),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn parse_rejects_wrong_field_types() {
        assert!(parse(b"not json").is_err());
        assert!(parse(b"[]").is_err());
        assert!(body(json!({"workflow_id": 1})).is_err());
        assert!(body(json!({"accept_external_cost_risk": "true"})).is_err());
        let ok = body(json!({"workflow_id": "w", "revision_id": "", "idempotency_key": "k"}))
            .expect("valid");
        assert_eq!(ok.revision_id, None);
    }

    #[test]
    fn checks_run_in_documented_order() {
        let s = shared();
        let mut inner = Inner::default();
        let now = Instant::now();
        let cases = [
            (
                json!({"workflow_id": "nope", "idempotency_key": "k"}),
                "WORKFLOW_NOT_FOUND",
            ),
            (
                json!({"workflow_id": "wf_861ef31e94dcfb10e6e7", "revision_id": "wfr_x"}),
                "REVISION_NOT_FOUND",
            ),
            (
                json!({"workflow_id": "wf_861ef31e94dcfb10e6e7"}),
                "IDEMPOTENCY_KEY_REQUIRED",
            ),
            (
                json!({"workflow_id": "wf_861ef31e94dcfb10e6e7", "idempotency_key": "k".repeat(256)}),
                "IDEMPOTENCY_KEY_TOO_LONG",
            ),
            (
                json!({"workflow_id": "wf_seedance_video_2f0c", "idempotency_key": "k", "inputs": {"bad": 1}}),
                "EXTERNAL_COST_RISK_NOT_ACCEPTED",
            ),
            (
                json!({"workflow_id": "wf_seedance_video_2f0c", "idempotency_key": "k",
                       "accept_external_cost_risk": true, "inputs": {"bad": 1}}),
                "INVALID_WORKFLOW_INPUT",
            ),
        ];
        for (request, code) in cases {
            assert_eq!(
                engine_code(&decide(&s, &mut inner, body(request), now)),
                code
            );
        }
        assert_eq!(inner.stats.rejected, 6);
        assert!(inner.runs.is_empty());
    }

    #[test]
    fn same_key_replays_without_freezing_again() {
        let s = shared();
        let mut inner = Inner::default();
        let now = Instant::now();
        let first = json!({"workflow_id": "wf_861ef31e94dcfb10e6e7", "idempotency_key": "k1"});
        let changed = json!({"workflow_id": "wf_861ef31e94dcfb10e6e7", "idempotency_key": "k1",
                             "inputs": {"n3_seed": 2}});
        let ids: Vec<Value> = [first.clone(), first, changed]
            .into_iter()
            .map(|b| match decide(&s, &mut inner, body(b), now) {
                SubmitOutcome::Accepted { data, .. } => data,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids[0]["idempotent_replay"], false);
        assert_eq!(ids[1]["idempotent_replay"], true);
        assert_eq!(ids[0]["run_order_id"], ids[2]["run_order_id"]);
        assert_eq!(
            (
                inner.stats.accepted_new,
                inner.stats.replays,
                inner.stats.mismatched_replays
            ),
            (1, 2, 1)
        );
        let run = inner.runs.values().next().expect("one run");
        assert_eq!((run.submit_requests, run.charges), (3, 1));
    }

    #[test]
    fn input_errors_alternate_between_200_and_400() {
        let statuses: std::collections::HashSet<StatusCode> = (0..32)
            .map(|i| invalid_input(&format!("key-{i}"), String::new()).http)
            .collect();
        assert_eq!(statuses.len(), 2);
    }
}
