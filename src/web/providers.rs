//! `/providers`: each profile's kind, limits, pause (and what ends it),
//! held runs, money against its limits, and recent errors by code; pause
//! and resume a profile by hand (a row of `wfq.provider_pauses` of kind
//! `manual`, which every worker follows).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};

use super::layout::{self, Nav, csrf_field, money};
use super::queries::{money as mq, overview as oq};
use super::{WebError, WebState};
use crate::store;
use crate::terminal::pauses::what_ends;

/// The whole page.
pub async fn page(State(state): State<Arc<WebState>>) -> Result<Markup, WebError> {
    let body = body(&state).await?;
    Ok(layout::page(
        &state,
        Nav::Providers,
        "Providers",
        html! {
            h1 { "Providers" }
            div data-live="/fragments/providers" { (body) }
        },
    ))
}

/// The live region alone, shared by every open dashboard for up to
/// [`super::LIVE_REUSE`].
pub async fn fragment(State(state): State<Arc<WebState>>) -> Result<Markup, WebError> {
    super::live_region(&state.live.providers, || body(&state)).await
}

async fn body(state: &WebState) -> Result<Markup, WebError> {
    let pool = &state.pool;
    let pauses = store::paused_providers(pool).await?;
    let active = store::count_runs(pool).await?;
    let held = oq::held_runs(pool).await?;
    let errors = oq::recent_errors(pool).await?;
    let zone = mq::budget_timezone(pool).await?;
    let mut names: BTreeSet<String> = state.profiles.iter().map(|p| p.name.clone()).collect();
    names.extend(pauses.iter().map(|p| p.profile.clone()));
    names.extend(active.iter().map(|(p, _, _)| p.clone()));
    let mut cards = Vec::new();
    for name in &names {
        let profile = state.profile(name);
        let committed = match profile {
            Some(p) if p.daily_budget.is_some() || p.max_outstanding_frozen.is_some() => {
                Some(store::committed_now(pool, name, &zone, p.unknown_cost).await?)
            }
            _ => None,
        };
        let pause = pauses.iter().find(|p| p.profile == *name);
        let count = |st: &str| {
            active
                .iter()
                .filter(|(p, s, _)| p == name && s == st)
                .map(|(_, _, n)| *n)
                .sum::<i64>()
        };
        cards.push(html! {
            article.provider {
                header {
                    h2 { (name) }
                    @match profile {
                        Some(p) => span.pill { (p.kind_name()) },
                        None => span.pill.warn title="runs name this profile, but this configuration does not" { "not configured" },
                    }
                    @match pause {
                        Some(p) => span.pill.bad { "paused: " (p.kind) },
                        None => span.pill.ok { "submitting" },
                    }
                }
                @if let Some(p) = pause {
                    div.notice.bad {
                        strong { "Paused since " (layout::time(p.paused_at)) } " by " (p.worker) ": " (p.reason)
                        br;
                        span.muted {
                            @if p.kind == "manual" { "Paused by hand: every worker holds its queued runs until it is resumed." }
                            @else { (what_ends(&p.kind, &p.profile)) }
                        }
                    }
                }
                div.stats {
                    span { b { (count("queued")) } " queued" }
                    span { b { (count("submitting")) } " submitting" }
                    span { b { (count("running")) } " running" }
                    @for (p, hold, n) in &held {
                        @if p == name { span.warn { b { (n) } " held (" (hold) ")" } }
                    }
                }
                @if let Some(p) = profile {
                    @if !p.limits.is_empty() {
                        dl.facts.inline {
                            @for (k, v) in &p.limits { dt { (k) } dd { (v) } }
                        }
                    }
                    @if let Some(c) = committed {
                        p.small {
                            @if let Some(limit) = p.daily_budget { "today " (money(Some(c.today))) " of " (money(Some(limit))) ". " }
                            @if let Some(limit) = p.max_outstanding_frozen { "outstanding " (money(Some(c.outstanding))) " of " (money(Some(limit))) "." }
                        }
                    }
                }
                @let own: Vec<_> = errors.iter().filter(|(p, _, _, _)| p == name).collect();
                @if !own.is_empty() {
                    h3 { "Failures in the last hour" }
                    table.grid.small {
                        tbody {
                            @for (_, code, n, message) in &own {
                                tr {
                                    td { a href=(layout::href("/runs", &[("provider", name.clone()), ("state", "failed".into()), ("error_code", code.clone())])) { span.code { (code) } } }
                                    td.n { (n) }
                                    td.muted.msg title=(message.as_deref().unwrap_or("")) { (message.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                }
                @if !state.read_only {
                    @if pause.is_some_and(|p| p.kind == "manual") {
                        form.inline method="post" action=(format!("/providers/{}/resume", urlencode(name))) {
                            (csrf_field(state))
                            button type="submit" { "Resume" }
                        }
                    } @else {
                        form.inline method="post" action=(format!("/providers/{}/pause", urlencode(name))) {
                            (csrf_field(state))
                            input name="reason" placeholder="why (shown to everyone)" maxlength="200";
                            button.danger type="submit" { "Pause" }
                        }
                    }
                }
            }
        });
    }
    Ok(html! {
        p.muted.small { "A paused profile submits nothing; runs already at the provider are still followed. The learned request rate and chenyu's balance live in the workers: see their /metrics." }
        div.providers { @for card in &cards { (card) } }
    })
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// `POST /providers/{name}/pause`.
pub async fn pause(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, WebError> {
    state.guard_action(&headers, &form)?;
    let reason = form
        .iter()
        .find(|(k, _)| k == "reason")
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
        .unwrap_or("paused from the dashboard");
    let reason: String = reason.chars().take(200).collect();
    if name.trim().is_empty() {
        return Err(WebError::BadRequest("the profile name is empty".into()));
    }
    mq::pause_profile(&state.pool, &name, &state.actor, &reason).await?;
    tracing::info!(profile = %name, by = %state.actor, "provider profile paused by hand from the dashboard");
    Ok(Redirect::to("/providers").into_response())
}

/// `POST /providers/{name}/resume`.
pub async fn resume(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, WebError> {
    state.guard_action(&headers, &form)?;
    if !mq::resume_profile(&state.pool, &name).await? {
        return Err(WebError::NotFound(format!(
            "profile {name} has no pause by hand to lift"
        )));
    }
    tracing::info!(profile = %name, by = %state.actor, "provider profile resumed from the dashboard");
    Ok(Redirect::to("/providers").into_response())
}
