//! `/runs`: filter, page (keyset, never OFFSET), select and act.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use maud::{Markup, html};
use serde_json::Value;

use super::layout::{self, Nav, money_in, state_badge};
use super::queries::runs::{self as q, RunFilter, RunSummary};
use super::{WebError, WebState};

/// The run states, in lifecycle order.
pub const STATES: [&str; 7] = crate::store::RUN_STATES;

/// The query string of `/runs`, parsed: the filter and the page's start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunsQuery {
    /// What to show.
    pub filter: RunFilter,
    /// Ids below this one.
    pub before: Option<i64>,
    /// The fields as typed, to fill the form again.
    pub raw: Vec<(String, String)>,
}

/// Parses the query string; a bad field is named in the error.
pub fn parse_query(query: &str) -> Result<RunsQuery, WebError> {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.trim().to_owned()))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let mut out = RunsQuery::default();
    let bad = |field: &str, why: String| WebError::BadRequest(format!("{field}: {why}"));
    for (key, value) in &pairs {
        let v = value.clone();
        let f = &mut out.filter;
        match key.as_str() {
            "id" => {
                f.id = Some(
                    v.parse()
                        .map_err(|_| bad("id", format!("`{v}` is not a run id")))?,
                )
            }
            "before" => {
                out.before = Some(
                    v.parse()
                        .map_err(|_| bad("before", format!("`{v}` is not a run id")))?,
                )
            }
            "state" if STATES.contains(&v.as_str()) => f.state = Some(v),
            "state" => return Err(bad("state", format!("`{v}` is not a run state"))),
            "provider" => f.provider = Some(v),
            "workflow" => f.workflow = Some(v),
            "error_code" => f.error_code = Some(v),
            "key" => f.idempotency_key = Some(v),
            "created_from" => f.created_from = Some(instant("created_from", &v)?),
            "created_to" => f.created_to = Some(instant("created_to", &v)?),
            "finished_from" => f.finished_from = Some(instant("finished_from", &v)?),
            "finished_to" => f.finished_to = Some(instant("finished_to", &v)?),
            "meta" => f.metadata = Some(metadata_filter(&v)?),
            _ => {}
        }
    }
    out.raw = pairs.into_iter().filter(|(k, _)| k != "before").collect();
    Ok(out)
}

/// `2026-12-07`, `2026-12-07T08:30` or RFC 3339, as UTC.
fn instant(field: &str, text: &str) -> Result<DateTime<Utc>, WebError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(at.and_utc());
        }
    }
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(WebError::BadRequest(format!(
        "{field}: `{text}` is not a time (2026-12-07, 2026-12-07T08:30, RFC 3339; UTC)"
    )))
}

/// `key=value` -> `{"key": value}`: the value as JSON when it is JSON
/// (`5`, `true`, `"text"`), else as text.
fn metadata_filter(text: &str) -> Result<Value, WebError> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(WebError::BadRequest(format!(
            "meta: `{text}` is not key=value (e.g. customer=acme)"
        )));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(WebError::BadRequest("meta: the key is empty".into()));
    }
    let value = value.trim();
    let value = serde_json::from_str::<Value>(value)
        .ok()
        .filter(|v| !v.is_object() && !v.is_array())
        .unwrap_or_else(|| Value::String(value.to_owned()));
    Ok(serde_json::json!({ key: value }))
}

/// The page.
pub async fn page(
    State(state): State<Arc<WebState>>,
    RawQuery(query): RawQuery,
) -> Result<Markup, WebError> {
    let query = parse_query(query.as_deref().unwrap_or(""))?;
    let mut providers = state.profile_names();
    for p in q::submitting_providers(&state.pool).await? {
        if !providers.contains(&p) {
            providers.push(p);
        }
    }
    let page = q::runs_page(&state.pool, &query.filter, query.before, &providers).await?;
    let now = Utc::now();
    let raw = |k: &str| {
        query
            .raw
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let next = page.next_before.map(|before| {
        let mut pairs: Vec<(&str, String)> = query
            .raw
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        pairs.push(("before", before.to_string()));
        layout::href("/runs", &pairs)
    });
    let newest = {
        let pairs: Vec<(&str, String)> = query
            .raw
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        layout::href("/runs", &pairs)
    };
    let body = html! {
        h1 { "Runs" }
        form.filters method="get" action="/runs" {
            label { "State"
                select name="state" {
                    option value="" { "any" }
                    @for s in STATES { option value=(s) selected[raw("state") == s] { (s) } }
                }
            }
            label { "Provider"
                select name="provider" {
                    option value="" { "any" }
                    @for p in &providers { option value=(p) selected[raw("provider") == *p] { (p) } }
                }
            }
            label { "Workflow" input name="workflow" value=(raw("workflow")) placeholder="wf_…"; }
            label { "Error code" input name="error_code" value=(raw("error_code")) placeholder="ENGINE_EXECUTION_FAILED"; }
            label { "Created from" input type="datetime-local" name="created_from" value=(raw("created_from")); }
            label { "Created to" input type="datetime-local" name="created_to" value=(raw("created_to")); }
            label { "Finished from" input type="datetime-local" name="finished_from" value=(raw("finished_from")); }
            label { "Finished to" input type="datetime-local" name="finished_to" value=(raw("finished_to")); }
            label { "Idempotency key" input name="key" value=(raw("key")); }
            label { "Run id" input name="id" inputmode="numeric" value=(raw("id")); }
            label { "Metadata" input name="meta" value=(raw("meta")) placeholder="key=value"; }
            div.buttons {
                button type="submit" { "Filter" }
                a.button.plain href="/runs" { "Clear" }
            }
        }
        form method="get" action="/runs/confirm" {
            @if !state.read_only {
                div.actions {
                    span.muted { "Selected runs:" }
                    button type="submit" name="action" value="cancel" { "Cancel…" }
                    button type="submit" name="action" value="retry" { "Retry…" }
                }
            }
            div.scroll {
                table.grid.runs {
                    thead { tr {
                        @if !state.read_only { th { input type="checkbox" data-select-all title="select every run on this page"; } }
                        th.n { "id" } th { "state" } th { "provider" } th { "workflow" }
                        th { "created" } th { "finished" } th.n { "quote" } th.n { "charged" } th { "error / hold" }
                    } }
                    tbody {
                        @for run in &page.runs { (row(&state, run, now)) }
                        @if page.runs.is_empty() {
                            tr { td colspan="10" { p.muted.empty { "No run matches here." } } }
                        }
                    }
                }
            }
        }
        div.pager {
            @if query.before.is_some() { a.button.plain href=(newest) { "← Newest" } }
            @if let (Some((lowest, below)), Some(_)) = (page.searched, page.next_before) {
                span.muted { "Searched runs " (lowest) "–" (below - 1) "." }
            }
            @if let Some(next) = &next {
                a.button href=(next) { @if page.searched.is_some() { "Search older runs →" } @else { "Older →" } }
            }
        }
    };
    Ok(layout::page(&state, Nav::Runs, "Runs", body))
}

fn row(state: &WebState, run: &RunSummary, now: DateTime<Utc>) -> Markup {
    let currency = run.currency.as_deref();
    html! {
        tr {
            @if !state.read_only { td { input type="checkbox" name="id" value=(run.id) aria-label=(format!("select run {}", run.id)); } }
            td.n { a href=(format!("/runs/{}", run.id)) { (run.id) } }
            td { (state_badge(&run.state)) }
            td { (run.provider) }
            td.wf title=(run.workflow_id) { (run.workflow_id) }
            td { (layout::when(Some(run.created_at), now)) }
            td { (layout::when(run.finished_at, now)) }
            td.n { (money_in(run.quote_amount, currency)) }
            td.n { (money_in(run.charged, currency)) }
            td.err {
                @if let Some(code) = &run.error_code {
                    span.code { (code) } " "
                    span.muted title=(run.error_message.as_deref().unwrap_or("")) {
                        (crate::table::truncate(run.error_message.as_deref().unwrap_or(""), 60))
                    }
                } @else if let Some(hold) = &run.hold_reason {
                    span.pill.warn title=(hold) { "held" } " " span.muted { (crate::table::truncate(hold, 50)) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_string_becomes_a_filter() {
        let q = parse_query(
            "state=failed&provider=chenyu&meta=customer%3Dacme&created_from=2026-12-01&finished_to=2026-12-07T08%3A30&before=900&id=",
        )
        .unwrap();
        assert_eq!(q.filter.state.as_deref(), Some("failed"));
        assert_eq!(q.filter.provider.as_deref(), Some("chenyu"));
        assert_eq!(
            q.filter.metadata,
            Some(serde_json::json!({"customer": "acme"}))
        );
        assert_eq!(q.before, Some(900));
        assert_eq!(q.filter.id, None);
        assert_eq!(
            q.filter.created_from.unwrap().to_rfc3339(),
            "2026-12-01T00:00:00+00:00"
        );
        assert_eq!(
            q.filter.finished_to.unwrap().to_rfc3339(),
            "2026-12-07T08:30:00+00:00"
        );
        assert_eq!(
            parse_query("meta=n%3D5").unwrap().filter.metadata,
            Some(serde_json::json!({"n": 5}))
        );
        for (bad, field) in [
            ("state=lost", "state"),
            ("id=abc", "id"),
            ("meta=novalue", "meta"),
            ("created_to=yesterday", "created_to"),
        ] {
            let e = parse_query(bad).unwrap_err().to_string();
            assert!(e.starts_with(field), "{bad}: {e}");
        }
    }
}
