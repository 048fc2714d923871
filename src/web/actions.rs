//! Cancel and retry, of one run or of a selection, through the same store
//! functions as `wfq cancel` and `wfq retry`. A selection is confirmed
//! first, with what each run would become and what it may cost.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use rust_decimal::Decimal;

use super::layout::{self, Nav, csrf_field, money, state_badge};
use super::queries::runs::{RunSummary, runs_by_ids};
use super::{WebError, WebState};
use crate::store::{self, CancelOutcome, RequestError, RetryOutcome};

/// Most runs one bulk action takes.
pub const MAX_SELECTION: usize = 200;

/// Cancel or retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `wfq cancel`.
    Cancel,
    /// `wfq retry`.
    Retry,
}

impl Action {
    fn parse(text: &str) -> Result<Action, WebError> {
        match text {
            "cancel" => Ok(Action::Cancel),
            "retry" => Ok(Action::Retry),
            other => Err(WebError::BadRequest(format!(
                "action: `{other}` is neither cancel nor retry"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Action::Cancel => "cancel",
            Action::Retry => "retry",
        }
    }
}

/// What an action would do to one run, decided from its row alone (the
/// store decides again, under its own conditions, when it is applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing was sent: canceled at once.
    CancelNow,
    /// A running run of a provider that can stop runs.
    StopAtProvider,
    /// A new run with a new idempotency key: a new charge.
    NewRun,
    /// Resumed with its own key: no second charge.
    Resume,
    /// The action does not apply; why.
    NotApplicable(&'static str),
}

/// The effect of `action` on `run`; `can_stop` says whether the run's
/// profile can stop running runs (Dify).
pub fn effect(action: Action, run: &RunSummary, can_stop: bool) -> Effect {
    match (action, run.state.as_str()) {
        (Action::Cancel, "queued") => Effect::CancelNow,
        (Action::Cancel, "running") if can_stop => Effect::StopAtProvider,
        (Action::Cancel, "running") => {
            Effect::NotApplicable("running at a provider that cannot stop runs")
        }
        (Action::Cancel, _) => Effect::NotApplicable("only queued (or stoppable running) runs"),
        (Action::Retry, "failed") if run.settled_at.is_none() && run.attempts > 0 => Effect::Resume,
        (Action::Retry, "failed" | "canceled") if run.settled_at.is_some() => Effect::NewRun,
        (Action::Retry, "failed" | "canceled") => {
            Effect::NotApplicable("its money is not settled and it was never sent")
        }
        (Action::Retry, _) => Effect::NotApplicable("only failed or canceled runs"),
    }
}

fn describe(effect: &Effect) -> String {
    match effect {
        Effect::CancelNow => "canceled now; nothing was sent, nothing is charged".into(),
        Effect::StopAtProvider => {
            "stop requested at the provider; what it already used may be charged".into()
        }
        Effect::NewRun => "repeated as a new run with a new idempotency key: a new charge".into(),
        Effect::Resume => {
            "resumed with its own idempotency key (money not settled): no second charge".into()
        }
        Effect::NotApplicable(why) => format!("left as it is: {why}"),
    }
}

fn selected_ids(pairs: &[(String, String)]) -> Result<Vec<i64>, WebError> {
    let mut ids: Vec<i64> = pairs
        .iter()
        .filter(|(k, _)| k == "id")
        .map(|(_, v)| {
            v.trim()
                .parse()
                .map_err(|_| WebError::BadRequest(format!("id: `{v}` is not a run id")))
        })
        .collect::<Result<_, _>>()?;
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Err(WebError::BadRequest(
            "no run selected: tick the runs first".into(),
        ));
    }
    if ids.len() > MAX_SELECTION {
        return Err(WebError::BadRequest(format!(
            "{} runs selected; at most {MAX_SELECTION} at once",
            ids.len()
        )));
    }
    Ok(ids)
}

fn action_of(pairs: &[(String, String)]) -> Result<Action, WebError> {
    Action::parse(
        pairs
            .iter()
            .find(|(k, _)| k == "action")
            .map(|(_, v)| v.as_str())
            .unwrap_or(""),
    )
}

/// `GET /runs/confirm?action=...&id=...`: what the action would do and cost.
pub async fn confirm(
    State(state): State<Arc<WebState>>,
    RawQuery(query): RawQuery,
) -> Result<Markup, WebError> {
    if state.read_only {
        return Err(WebError::Forbidden(
            "the dashboard is read-only: actions are refused".into(),
        ));
    }
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let action = action_of(&pairs)?;
    let ids = selected_ids(&pairs)?;
    let runs = runs_by_ids(&state.pool, &ids).await?;
    let effects: Vec<(RunSummary, Effect)> = runs
        .into_iter()
        .map(|r| {
            let can_stop = state
                .profile(&r.provider)
                .is_some_and(|p| p.can_stop_runs());
            let e = effect(action, &r, can_stop);
            (r, e)
        })
        .collect();
    let applicable = effects
        .iter()
        .filter(|(_, e)| !matches!(e, Effect::NotApplicable(_)))
        .count();
    // What it may cost: a new run is charged again, up to its quote (the
    // quote of the run it repeats); runs without a quote are priced by the
    // provider only as they run.
    let mut cost: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut unquoted = 0;
    for (run, e) in &effects {
        if *e == Effect::NewRun {
            match run.quote_amount.or(run.charged) {
                Some(q) => {
                    *cost
                        .entry(run.currency.clone().unwrap_or_default())
                        .or_default() += q
                }
                None => unquoted += 1,
            }
        }
    }
    let body = html! {
        h1 { "Confirm: " (action.name()) " " (applicable) " of " (effects.len()) " runs" }
        div.notice.warn {
            @match action {
                Action::Cancel => { "Canceling costs nothing: queued runs were never sent. A running run stopped at its provider may still be charged for what it used." }
                Action::Retry => {
                    @if cost.is_empty() && unquoted == 0 {
                        "No new charge: every run that can be retried is resumed with its own idempotency key."
                    } @else {
                        "Retrying may cost up to "
                        @for (i, (currency, sum)) in cost.iter().enumerate() {
                            @if i > 0 { " + " }
                            strong { (money(Some(*sum))) " " (currency) }
                        }
                        @if cost.is_empty() { strong { "an unknown amount" } }
                        " (the quotes of the runs repeated)"
                        @if unquoted > 0 { ", plus " (unquoted) " runs without a quote, priced by the provider as they run" }
                        "."
                    }
                }
            }
        }
        div.scroll {
            table.grid {
                thead { tr { th.n { "id" } th { "state" } th { "provider" } th { "workflow" } th.n { "quote" } th { "what happens" } } }
                tbody {
                    @for (run, e) in &effects {
                        tr.muted[matches!(e, Effect::NotApplicable(_))] {
                            td.n { a href=(format!("/runs/{}", run.id)) { (run.id) } }
                            td { (state_badge(&run.state)) }
                            td { (run.provider) }
                            td.wf { (run.workflow_id) }
                            td.n { (layout::money_in(run.quote_amount, run.currency.as_deref())) }
                            td { (describe(e)) }
                        }
                    }
                }
            }
        }
        form method="post" action="/runs/apply" {
            (csrf_field(&state))
            input type="hidden" name="action" value=(action.name());
            @for (run, e) in &effects {
                @if !matches!(e, Effect::NotApplicable(_)) {
                    input type="hidden" name="id" value=(run.id);
                }
            }
            div.buttons {
                @if applicable > 0 {
                    button.danger[action == Action::Cancel] type="submit" { (action.name()) " " (applicable) " runs" }
                }
                a.button.plain href="/runs" { "Back" }
            }
        }
    };
    Ok(layout::page(&state, Nav::Runs, "Confirm", body))
}

/// What one run became.
struct Done {
    ok: bool,
    text: String,
    link: Option<i64>,
    /// The fixed note the run's page shows after a single action.
    note: &'static str,
}

async fn apply_one(state: &WebState, action: Action, id: i64) -> Result<Done, WebError> {
    let stoppable: Vec<String> = state
        .profiles
        .iter()
        .filter(|p| p.can_stop_runs())
        .map(|p| p.name.clone())
        .collect();
    let unfindable: Vec<String> = state
        .profiles
        .iter()
        .filter(|p| p.unfindable())
        .map(|p| p.name.clone())
        .collect();
    let result = match action {
        Action::Cancel => store::cancel_run(
            &state.pool,
            id,
            Some(&format!("canceled from the dashboard ({})", state.actor)),
            &stoppable,
        )
        .await
        .map(|o| match o {
            CancelOutcome::Canceled => (format!("run {id} canceled"), Some(id), "canceled"),
            CancelOutcome::StopRequested => (
                format!("run {id}: stop requested; canceled once the provider has stopped it"),
                Some(id),
                "stop_requested",
            ),
        }),
        Action::Retry => store::retry_run(&state.pool, id, &unfindable)
            .await
            .map(|o| match o {
                RetryOutcome::NewRun(new) => (
                    format!("run {id} repeated as run {new} (new idempotency key)"),
                    Some(new),
                    "repeated",
                ),
                RetryOutcome::Resumed(id) => (
                    format!("run {id} resumed with its own idempotency key"),
                    Some(id),
                    "resumed",
                ),
            }),
    };
    match result {
        Ok((text, link, note)) => Ok(Done {
            ok: true,
            text,
            link,
            note,
        }),
        Err(RequestError::Database(e)) => Err(WebError::Database(e)),
        Err(e) => Ok(Done {
            ok: false,
            text: e.to_string(),
            link: Some(id),
            note: "refused",
        }),
    }
}

/// `POST /runs/apply`: the confirmed action, run by run.
pub async fn apply(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Markup, WebError> {
    state.guard_action(&headers, &form)?;
    let action = action_of(&form)?;
    let ids = selected_ids(&form)?;
    let mut done = Vec::new();
    for id in ids {
        done.push(apply_one(&state, action, id).await?);
    }
    let ok = done.iter().filter(|d| d.ok).count();
    let body = html! {
        h1 { (action.name()) ": " (ok) " of " (done.len()) " runs" }
        ul.outcomes {
            @for d in &done {
                li.ok[d.ok].bad[!d.ok] {
                    (d.text)
                    @if let Some(link) = d.link { " · " a href=(format!("/runs/{link}")) { "run " (link) } }
                }
            }
        }
        p { a.button href="/runs" { "Back to the runs" } }
    };
    Ok(layout::page(&state, Nav::Runs, "Done", body))
}

/// `POST /runs/{id}/cancel`.
pub async fn cancel_one(
    state: State<Arc<WebState>>,
    headers: HeaderMap,
    path: Path<i64>,
    form: Form<Vec<(String, String)>>,
) -> Result<Response, WebError> {
    one(state, headers, path, form, Action::Cancel).await
}

/// `POST /runs/{id}/retry`.
pub async fn retry_one(
    state: State<Arc<WebState>>,
    headers: HeaderMap,
    path: Path<i64>,
    form: Form<Vec<(String, String)>>,
) -> Result<Response, WebError> {
    one(state, headers, path, form, Action::Retry).await
}

async fn one(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(form): Form<Vec<(String, String)>>,
    action: Action,
) -> Result<Response, WebError> {
    state.guard_action(&headers, &form)?;
    let done = apply_one(&state, action, id).await?;
    let target = done.link.unwrap_or(id);
    // A fixed word, not the text: a link can never put words on the page.
    Ok(Redirect::to(&format!("/runs/{target}?note={}&from={id}", done.note)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: &str, settled: bool, attempts: i32) -> RunSummary {
        RunSummary {
            id: 1,
            provider: "chenyu".into(),
            workflow_id: "wf".into(),
            state: state.into(),
            created_at: chrono::Utc::now(),
            finished_at: None,
            currency: None,
            quote_amount: None,
            frozen_amount: None,
            charged: None,
            settled_at: settled.then(chrono::Utc::now),
            error_code: None,
            error_message: None,
            hold_reason: None,
            attempts,
            polls: 0,
        }
    }

    #[test]
    fn each_state_has_its_effect() {
        use Action::*;
        let cases = [
            (Cancel, run("queued", false, 0), false, Effect::CancelNow),
            (
                Cancel,
                run("running", false, 1),
                true,
                Effect::StopAtProvider,
            ),
            (Retry, run("failed", true, 1), false, Effect::NewRun),
            (Retry, run("canceled", true, 0), false, Effect::NewRun),
            (Retry, run("failed", false, 3), false, Effect::Resume),
        ];
        for (action, r, can_stop, expected) in cases {
            assert_eq!(
                effect(action, &r, can_stop),
                expected,
                "{action:?} {}",
                r.state
            );
        }
        for (action, r) in [
            (Cancel, run("running", false, 1)),
            (Cancel, run("succeeded", true, 1)),
            (Retry, run("queued", false, 0)),
            (Retry, run("succeeded", true, 1)),
        ] {
            assert!(matches!(
                effect(action, &r, false),
                Effect::NotApplicable(_)
            ));
        }
    }
}
