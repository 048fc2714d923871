//! `/runs/{id}`: one run: request, outputs with previews, money with the
//! settlement check, events, callbacks; cancel and retry.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use rust_decimal::Decimal;

use super::layout::{self, Nav, csrf_field, json_block, money, state_badge, time};
use super::media::{MediaKind, previews};
use super::queries::run as q;
use super::{WebError, WebState};
use crate::store::{self, RunRow};

/// The whole page.
pub async fn page(
    State(state): State<Arc<WebState>>,
    Path(id): Path<i64>,
    RawQuery(query): RawQuery,
) -> Result<Markup, WebError> {
    let (detail, active) = detail(&state, id).await?;
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let from = get("from")
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(id);
    let note = get("note").and_then(|n| action_note(n, id, from));
    let body = html! {
        @if let Some((kind, text)) = &note {
            (layout::notice(kind, text))
        }
        @if active {
            div data-live=(format!("/runs/{id}/live")) { (detail) }
        } @else {
            (detail)
        }
    };
    Ok(layout::page(&state, Nav::Runs, &format!("Run {id}"), body))
}

/// The live region alone.
pub async fn fragment(
    State(state): State<Arc<WebState>>,
    Path(id): Path<i64>,
) -> Result<Markup, WebError> {
    Ok(detail(&state, id).await?.0)
}

/// The note shown after an action (`note` is one of a fixed set of words,
/// so a crafted link cannot write on the page).
fn action_note(note: &str, id: i64, from: i64) -> Option<(&'static str, String)> {
    Some(match note {
        "canceled" => ("ok", format!("Run {id} canceled.")),
        "stop_requested" => (
            "ok",
            format!("Run {id}: stop requested; it is canceled once the provider has stopped it."),
        ),
        "repeated" => (
            "ok",
            format!("Run {from} repeated as this run, with a new idempotency key."),
        ),
        "resumed" => (
            "ok",
            format!("Run {id} resumed with its own idempotency key."),
        ),
        "refused" => (
            "bad",
            format!("Run {id} was left as it is: its state does not allow that."),
        ),
        _ => return None,
    })
}

/// The settlement check: `frozen = final + released` and `total = compute
/// + external` once the money is final.
pub fn settlement_check(run: &RunRow) -> (Option<bool>, String) {
    let (Some(final_amount), Some(released)) = (run.final_amount, run.released_amount) else {
        return match run.settled_at {
            Some(_) => (
                None,
                "settled; the provider reported no final and released amounts".into(),
            ),
            None if run.frozen_amount.is_some() => (
                None,
                "not settled yet: the frozen amount is still held".into(),
            ),
            None => (None, "nothing frozen".into()),
        };
    };
    let frozen_ok = run.frozen_amount == Some(final_amount + released);
    let total_ok = match (run.total_cost, run.compute_cost, run.external_model_cost) {
        (Some(t), Some(c), Some(e)) => t == c + e,
        _ => true,
    };
    match (frozen_ok, total_ok) {
        (true, true) => (Some(true), "frozen = final + released".into()),
        (false, _) => (
            Some(false),
            format!(
                "frozen {} <> final {} + released {}",
                money(run.frozen_amount),
                money(Some(final_amount)),
                money(Some(released))
            ),
        ),
        (true, false) => (
            Some(false),
            "total_cost <> compute_cost + external_model_cost".into(),
        ),
    }
}

/// A callback URL without its query string (it may carry a token).
fn callback_shown(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let had_query = u.query().is_some();
            u.set_query(None);
            u.set_fragment(None);
            let _ = u.set_password(None);
            let _ = u.set_username("");
            format!("{u}{}", if had_query { "?…" } else { "" })
        }
        Err(_) => "(not a URL)".into(),
    }
}

async fn detail(state: &WebState, id: i64) -> Result<(Markup, bool), WebError> {
    let pool = &state.pool;
    let Some(run) = store::show_run(pool, id).await? else {
        return Err(WebError::NotFound(format!("run {id} does not exist")));
    };
    let extras = q::run_extras(pool, id).await?.unwrap_or_default();
    let events = q::recent_events(pool, id).await?;
    let callbacks = q::callback_attempts(pool, id).await?;
    let files = store::run_files(pool, id).await?;
    let shown = previews(run.outputs.as_ref(), &files);
    let now = Utc::now();
    let active = crate::store::ACTIVE_STATES.contains(&run.state.as_str());
    let profile = state.profile(&run.provider);
    let can_cancel = matches!(run.state.as_str(), "queued" | "waiting")
        || (run.state == "running" && profile.is_some_and(|p| p.can_stop_runs()));
    let can_retry = matches!(run.state.as_str(), "failed" | "canceled");
    let (check_ok, check_text) = settlement_check(&run);
    let currency = run.currency.as_deref().unwrap_or("");
    let fact = |label: &'static str, value: Option<String>| (label, value);
    let facts: Vec<(&str, Option<String>)> = vec![
        fact("provider", Some(run.provider.clone())),
        fact("workflow", Some(run.workflow_id.clone())),
        fact("revision", run.revision_id.clone()),
        fact("idempotency key", Some(run.idempotency_key.clone())),
        fact("priority", Some(run.priority.to_string())),
        fact(
            "submits / polls",
            Some(format!("{} / {}", run.attempts, run.polls)),
        ),
        fact("provider run", run.provider_run_id.clone()),
        fact(
            "task / prompt",
            match (&run.task_id, &run.prompt_id) {
                (None, None) => None,
                (t, p) => Some(format!(
                    "{} / {}",
                    t.as_deref().unwrap_or("-"),
                    p.as_deref().unwrap_or("-")
                )),
            },
        ),
        fact("provider status", run.run_status.clone()),
        fact("settlement", run.settlement_status.clone()),
        fact("hold", extras.hold_reason.clone()),
        fact(
            "queue place",
            extras.queue_position.map(|p| format!("#{p}")),
        ),
        fact(
            "lease",
            run.lease_owner.as_ref().map(|o| {
                format!(
                    "{o} until {}",
                    run.lease_expires_at.map(time).unwrap_or_default()
                )
            }),
        ),
        fact("tokens", run.total_tokens.map(|t| t.to_string())),
        fact("media", extras.media_state.clone()),
        fact(
            "callback",
            extras.callback_url.as_deref().map(|u| {
                format!(
                    "{} ({}, {} attempts)",
                    callback_shown(u),
                    extras.callback_state.as_deref().unwrap_or("not due"),
                    extras.callback_attempts
                )
            }),
        ),
    ];
    let times: [(&str, Option<DateTime<Utc>>); 7] = [
        ("created", Some(run.created_at)),
        ("not before", run.not_before),
        ("submitted", run.submitted_at),
        ("finished", run.finished_at),
        ("settled", run.settled_at),
        ("next step due", active.then_some(run.due_at)),
        ("updated", Some(run.updated_at)),
    ];
    let amounts: [(&str, Option<Decimal>); 7] = [
        ("quote", run.quote_amount),
        ("frozen", run.frozen_amount),
        ("final", run.final_amount),
        ("released", run.released_amount),
        ("compute cost", run.compute_cost),
        ("external model cost", run.external_model_cost),
        ("total cost", run.total_cost),
    ];
    let markup = html! {
        div.run-head {
            h1 { "Run " (run.id) " " (state_badge(&run.state)) }
            @if let Some(of) = run.retry_of { span.muted { "repeats " a href=(format!("/runs/{of}")) { "run " (of) } } }
            @if !state.read_only {
                div.buttons {
                    @if can_cancel {
                        form method="post" action=(format!("/runs/{id}/cancel")) {
                            (csrf_field(state))
                            button.danger type="submit" data-confirm="Cancel this run?" { "Cancel run" }
                        }
                    }
                    @if can_retry {
                        form method="post" action=(format!("/runs/{id}/retry")) {
                            (csrf_field(state))
                            button type="submit" data-confirm=(retry_question(&run)) { "Retry run" }
                        }
                    }
                }
            }
        }
        @if let Some(code) = &run.error_code {
            div.notice.bad {
                strong.code { (code) } " "
                (run.error_message.as_deref().unwrap_or(""))
            }
        }
        div.columns {
            section.panel {
                h2 { "Run" }
                dl.facts {
                    @for (label, value) in &facts {
                        @if let Some(v) = value { dt { (label) } dd { (v) } }
                    }
                    @for (label, at) in &times {
                        @if let Some(at) = at { dt { (label) } dd { (time(*at)) " " span.muted { "(" (layout::ago(*at, now)) ")" } } }
                    }
                }
            }
            section.panel {
                h2 { "Money " @if !currency.is_empty() { span.muted.small { (currency) } } }
                table.money {
                    tbody {
                        @for (label, amount) in &amounts {
                            tr { th { (label) } td.n { (money(*amount)) } }
                        }
                    }
                }
                p.check.ok[check_ok == Some(true)].bad[check_ok == Some(false)] {
                    @match check_ok { Some(true) => "✓ ", Some(false) => "✗ ", None => "… " }
                    (check_text)
                }
            }
        }
        section.panel {
            h2 { "Outputs" }
            @if !shown.is_empty() {
                div.gallery {
                    @for p in &shown {
                        figure {
                            @match p.kind {
                                MediaKind::Image => { a href=(p.src) target="_blank" rel="noopener noreferrer" { img src=(p.src) alt=(p.path) loading="lazy"; } }
                                MediaKind::Video => { video src=(p.src) controls preload="metadata" {} }
                                MediaKind::Audio => { audio src=(p.src) controls preload="none" {} }
                                MediaKind::Other => { a.file href=(p.src) target="_blank" rel="noopener noreferrer" { "open file" } }
                            }
                            figcaption { code { (p.path) } " · " @if p.stored { "stored copy" } @else { "provider's URL" } }
                        }
                    }
                }
            }
            (json_block(run.outputs.as_ref()))
        }
        div.columns {
            section.panel { h2 { "Inputs" } (json_block(Some(&run.inputs))) }
            section.panel { h2 { "Sent inputs" } (json_block(run.sent_inputs.as_ref())) }
        }
        div.columns {
            section.panel { h2 { "Metadata" } (json_block(run.metadata.as_ref())) }
            @if run.error_detail.is_some() { section.panel { h2 { "Error detail" } (json_block(run.error_detail.as_ref())) } }
        }
        @if !files.is_empty() {
            section.panel {
                h2 { "Files" }
                div.scroll { table.grid {
                    thead { tr { th { "direction" } th { "key" } th { "state" } th { "type" } th.n { "bytes" } th { "where" } th { "error" } } }
                    tbody { @for f in &files { tr {
                        td { (f.direction) } td { code { (f.key) "[" (f.position) "]" } } td { (f.state) }
                        td { (f.content_type.as_deref().unwrap_or("-")) } td.n { (f.bytes.map(|b| b.to_string()).unwrap_or_default()) }
                        td.wf { (f.stored_location.as_deref().or(f.provider_file_id.as_deref()).unwrap_or("-")) }
                        td { (f.error_code.as_deref().unwrap_or("")) " " span.muted { (f.error.as_deref().unwrap_or("")) } }
                    } } }
                } }
            }
        }
        section.panel {
            h2 { "Events " span.muted.small { (extras.events) @if extras.events > q::EVENTS_SHOWN { ", the newest " (q::EVENTS_SHOWN) " shown" } } }
            ol.timeline {
                @for e in &events {
                    li {
                        span.at title=(time(e.at)) { (e.at.format("%H:%M:%S%.3f")) }
                        span.kind { (e.kind) }
                        @if e.from_state.is_some() || e.to_state.is_some() {
                            span.states { (e.from_state.as_deref().unwrap_or("-")) " → " (e.to_state.as_deref().unwrap_or("-")) }
                        }
                        @if let Some(w) = &e.worker { span.muted { (w) } }
                        @if let Some(d) = &e.detail {
                            details { summary { (crate::table::truncate(&d.to_string(), 90)) } (json_block(Some(d))) }
                        }
                    }
                }
            }
        }
        @if !callbacks.is_empty() {
            section.panel {
                h2 { "Callback attempts" }
                div.scroll { table.grid {
                    thead { tr { th.n { "#" } th { "at" } th { "result" } th.n { "status" } th.n { "ms" } th { "error" } th { "next" } th { "worker" } } }
                    tbody { @for c in &callbacks { tr {
                        td.n { (c.attempt) } td { (time(c.started_at)) } td { (c.result) }
                        td.n { (c.http_status.map(|s| s.to_string()).unwrap_or_default()) } td.n { (c.duration_ms) }
                        td { (c.error.as_deref().unwrap_or("")) } td { (c.next_attempt_at.map(time).unwrap_or_default()) } td { (c.worker) }
                    } } }
                } }
            }
        }
    };
    Ok((markup, active))
}

fn retry_question(run: &RunRow) -> String {
    if run.state == "failed" && run.settled_at.is_none() {
        "Resume this run with its own idempotency key? (no second charge)".into()
    } else {
        match run.quote_amount {
            Some(q) => format!(
                "Repeat this run as a new run? It may cost up to {} {}.",
                money(Some(q)),
                run.currency.as_deref().unwrap_or("")
            ),
            None => "Repeat this run as a new run? It is charged again.".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_urls_lose_their_secrets() {
        assert_eq!(
            callback_shown("https://u:p@h.example/cb?token=abc"),
            "https://h.example/cb?…"
        );
        assert_eq!(callback_shown("http://h.example/cb"), "http://h.example/cb");
    }
}
