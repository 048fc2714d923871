//! `/`: what is going on now. Runs by state and provider, runs finished
//! per minute, today's money against each profile's budget, and the
//! providers' health. Refreshed live every 2 s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::State;
use maud::{Markup, html};
use rust_decimal::Decimal;

use super::layout::{self, Nav, money};
use super::queries::overview as q;
use super::{WebError, WebState};
use crate::store;

/// The whole page.
pub async fn page(State(state): State<Arc<WebState>>) -> Result<Markup, WebError> {
    let body = body(&state).await?;
    Ok(layout::page(
        &state,
        Nav::Overview,
        "Overview",
        html! {
            h1 { "Overview" }
            div data-live="/fragments/overview" { (body) }
        },
    ))
}

/// The live region alone, shared by every open dashboard for up to
/// [`super::LIVE_REUSE`].
pub async fn fragment(State(state): State<Arc<WebState>>) -> Result<Markup, WebError> {
    super::live_region(&state.live.overview, || body(&state)).await
}

/// One provider's line of the table.
#[derive(Default)]
struct Line {
    active: BTreeMap<String, i64>,
    finished: BTreeMap<String, i64>,
    held: Vec<(String, i64)>,
    overdue: i64,
}

async fn body(state: &WebState) -> Result<Markup, WebError> {
    let pool = &state.pool;
    let active = store::count_runs(pool).await?;
    let finished = q::finished_last_hour(pool).await?;
    let per_minute = q::finished_per_minute(pool).await?;
    let frozen = store::outstanding_frozen(pool).await?;
    let pauses = store::paused_providers(pool).await?;
    let held = q::held_runs(pool).await?;
    let overdue = q::overdue_runs(pool).await?;
    let zone = super::queries::money::budget_timezone(pool).await?;

    let mut lines: BTreeMap<String, Line> = state
        .profiles
        .iter()
        .map(|p| (p.name.clone(), Line::default()))
        .collect();
    for (provider, st, n) in &active {
        *lines
            .entry(provider.clone())
            .or_default()
            .active
            .entry(st.clone())
            .or_default() += n;
    }
    for (provider, st, n) in &finished {
        *lines
            .entry(provider.clone())
            .or_default()
            .finished
            .entry(st.clone())
            .or_default() += n;
    }
    for (provider, hold, n) in &held {
        lines
            .entry(provider.clone())
            .or_default()
            .held
            .push((hold.clone(), *n));
    }
    for (provider, n) in &overdue {
        lines.entry(provider.clone()).or_default().overdue = *n;
    }
    let total = |states: &[&str], of_finished: bool| -> i64 {
        lines
            .values()
            .map(|l| {
                let m = if of_finished { &l.finished } else { &l.active };
                states
                    .iter()
                    .map(|s| m.get(*s).copied().unwrap_or(0))
                    .sum::<i64>()
            })
            .sum()
    };
    let mut minutes = [0i64; 60];
    for (ago, n) in &per_minute {
        if (0..60).contains(ago) {
            minutes[59 - *ago as usize] = *n;
        }
    }
    let last_minute = minutes[58];
    let paused: BTreeMap<&str, &store::ProviderPause> =
        pauses.iter().map(|p| (p.profile.as_str(), p)).collect();

    let mut budgets = Vec::new();
    for profile in &state.profiles {
        if profile.daily_budget.is_none() && profile.max_outstanding_frozen.is_none() {
            continue;
        }
        let committed =
            store::committed_now(pool, &profile.name, &zone, profile.unknown_cost).await?;
        budgets.push((profile, committed));
    }
    let currencies: BTreeSet<&str> = frozen.iter().map(|(_, c, _)| c.as_str()).collect();

    Ok(html! {
        section.cards {
            div.card { div.label { "Queued" } div.big { (total(&["queued"], false)) } }
            div.card { div.label { "Submitting" } div.big { (total(&["submitting"], false)) } }
            div.card { div.label { "Running" } div.big { (total(&["running"], false)) } }
            div.card {
                div.label { "Finished, last hour" }
                div.big { (total(&["succeeded", "failed", "canceled"], true)) }
                div.sub {
                    span.ok { (total(&["succeeded"], true)) " ok" } " · "
                    span.bad { (total(&["failed"], true)) " failed" } " · "
                    (total(&["canceled"], true)) " canceled"
                }
            }
            div.card.wide {
                div.label { "Runs finished per minute, last hour" }
                div.big { (last_minute) span.unit { "/min" } }
                (sparkline(&minutes))
            }
            div.card {
                div.label { "Frozen, not settled" }
                @if currencies.is_empty() { div.big { "0" } }
                @for currency in &currencies {
                    @let sum: Decimal = frozen.iter().filter(|(_, c, _)| c == currency).map(|(_, _, d)| *d).sum();
                    div.big.money { (money(Some(sum))) " " span.unit { (currency) } }
                }
            }
        }
        h2 { "Providers" }
        div.scroll {
            table.grid {
                thead { tr {
                    th { "profile" } th { "health" }
                    th.n { "queued" } th.n { "submitting" } th.n { "running" }
                    th.n { "succeeded 1h" } th.n { "failed 1h" } th.n { "canceled 1h" } th.n { "error rate 1h" }
                } }
                tbody {
                    @for (name, line) in &lines {
                        @let get = |m: &BTreeMap<String, i64>, s: &str| m.get(s).copied().unwrap_or(0);
                        @let done = get(&line.finished, "succeeded") + get(&line.finished, "failed");
                        tr {
                            td { a href=(layout::href("/runs", &[("provider", name.clone())])) { (name) } }
                            td { (health(paused.get(name.as_str()).copied(), &line.held, line.overdue)) }
                            td.n { (get(&line.active, "queued")) }
                            td.n { (get(&line.active, "submitting")) }
                            td.n { (get(&line.active, "running")) }
                            td.n { (get(&line.finished, "succeeded")) }
                            td.n { (get(&line.finished, "failed")) }
                            td.n { (get(&line.finished, "canceled")) }
                            td.n {
                                @if done == 0 { span.muted { "-" } }
                                @else {
                                    @let rate = get(&line.finished, "failed") as f64 * 100.0 / done as f64;
                                    span.bad[rate >= 20.0] { (format!("{rate:.0}%")) }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if !budgets.is_empty() {
            h2 { "Money today " span.muted.small { "(budget day in " (zone) ")" } }
            div.budgets {
                @for (profile, committed) in &budgets {
                    div.budget {
                        div.label { a href="/providers" { (profile.name) } }
                        @if let Some(limit) = profile.daily_budget {
                            (meter("committed today", committed.today, limit))
                        }
                        @if let Some(limit) = profile.max_outstanding_frozen {
                            (meter("outstanding frozen", committed.outstanding, limit))
                        }
                    }
                }
            }
        }
    })
}

/// A profile's health: paused (and why), held runs, or fine.
fn health(pause: Option<&store::ProviderPause>, held: &[(String, i64)], overdue: i64) -> Markup {
    html! {
        @if let Some(p) = pause {
            span.pill.bad title=(p.reason) { "paused: " (p.kind) }
        }
        @for (hold, n) in held {
            span.pill.warn title="queued runs a limit of the profile holds back" { (n) " held: " (hold) }
        }
        @if overdue > 0 {
            span.pill.warn title="queued runs due over 10 s ago and not taken yet: held back by the profile's rate, submit slots or the workers' capacity" { (overdue) " overdue" }
        }
        @if pause.is_none() && held.is_empty() && overdue == 0 { span.pill.ok { "ok" } }
    }
}

/// `used` of `limit` as a bar.
fn meter(label: &str, used: Decimal, limit: Decimal) -> Markup {
    let f = |d: Decimal| d.to_string().parse::<f64>().unwrap_or(0.0);
    html! {
        div.meter-line {
            span.muted { (label) }
            meter min="0" max=(f(limit)) low=(f(limit) * 0.7) high=(f(limit) * 0.9) optimum="0" value=(f(used).min(f(limit))) {}
            span.n { (money(Some(used))) " / " (money(Some(limit))) }
        }
    }
}

/// Sixty bars, one a minute, scaled to the busiest minute.
fn sparkline(minutes: &[i64; 60]) -> Markup {
    let max = minutes.iter().copied().max().unwrap_or(0).max(1) as f64;
    html! {
        svg.spark viewBox="0 0 240 40" preserveAspectRatio="none" role="img" aria-label="runs finished per minute" {
            @for (i, n) in minutes.iter().enumerate() {
                @let h = (*n as f64 / max * 38.0).max(if *n > 0 { 1.5 } else { 0.5 });
                rect x=(i * 4) y=(format!("{:.1}", 40.0 - h)) width="3" height=(format!("{h:.1}")) {}
            }
        }
    }
}
