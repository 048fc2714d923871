//! `/workers`: the fleet from `wfq.workers_live`: alive or not, runs in
//! hand, last heartbeat, profiles.

use std::sync::Arc;

use axum::extract::State;
use chrono::Utc;
use maud::{Markup, html};

use super::layout::{self, Nav};
use super::{WebError, WebState};
use crate::store;

/// The whole page.
pub async fn page(State(state): State<Arc<WebState>>) -> Result<Markup, WebError> {
    let body = body(&state).await?;
    Ok(layout::page(
        &state,
        Nav::Workers,
        "Workers",
        html! {
            h1 { "Workers" }
            div data-live="/fragments/workers" { (body) }
        },
    ))
}

/// The live region alone, shared by every open dashboard for up to
/// [`super::LIVE_REUSE`].
pub async fn fragment(State(state): State<Arc<WebState>>) -> Result<Markup, WebError> {
    super::live_region(&state.live.workers, || body(&state)).await
}

async fn body(state: &WebState) -> Result<Markup, WebError> {
    let workers = store::list_workers(&state.pool).await?;
    let now = Utc::now();
    let alive = workers.iter().filter(|w| w.alive == Some(true)).count();
    let in_hand: i64 = workers.iter().map(|w| w.runs_in_hand).sum();
    Ok(html! {
        section.cards {
            div.card { div.label { "Alive" } div.big { (alive) } }
            div.card { div.label { "Runs in hand" } div.big { (in_hand) } }
            div.card { div.label { "Registered" } div.big { (workers.len()) } }
        }
        @if workers.is_empty() {
            p.muted.empty { "No worker has registered yet: start one with `wfq worker`." }
        } @else {
            div.scroll {
                table.grid {
                    thead { tr {
                        th { "worker" } th { "state" } th.n { "runs" } th.n { "concurrency" } th { "last seen" }
                        th { "host" } th.n { "pid" } th { "version" } th { "profiles" } th { "started" }
                    } }
                    tbody {
                        @for w in &workers {
                            tr.muted[w.died_at.is_some()] {
                                td.wf { (w.id) }
                                td {
                                    @match (w.alive, w.died_cause.as_deref()) {
                                        (Some(true), _) => span.pill.ok { "alive" },
                                        (_, Some("crash")) => span.pill.bad { "crashed" },
                                        (_, Some(cause)) => span.pill { (cause) },
                                        (Some(false), None) => span.pill.warn { "gone" },
                                        (None, None) => span.pill title="no session liveness: see its last heartbeat" { "no session" },
                                    }
                                }
                                td.n { (w.runs_in_hand) }
                                td.n { (w.concurrency) }
                                td { (layout::ago(w.last_seen, now)) }
                                td { (w.host) }
                                td.n { (w.pid) }
                                td { (w.version) }
                                td { (w.profiles.join(", ")) }
                                td { (layout::ago(w.started_at, now)) }
                            }
                        }
                    }
                }
            }
        }
    })
}
