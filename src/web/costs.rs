//! `/costs`: money per budget day, provider and workflow for a chosen
//! range, as a chart drawn on the server (SVG) and a table; `/costs.csv`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{Duration, NaiveDate};
use maud::{Markup, html};
use rust_decimal::Decimal;

use super::layout::{self, Nav, money};
use super::queries::money::{CostRow, budget_timezone, costs};
use super::queries::runs::submitting_providers;
use super::{WebError, WebState};

/// Longest range one request reads.
pub const MAX_DAYS: i64 = 366;

/// The chosen range and provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostQuery {
    /// First day.
    pub from: NaiveDate,
    /// Last day (included).
    pub to: NaiveDate,
    /// One provider, or all.
    pub provider: Option<String>,
}

/// Parses `from`, `to` (dates) and `provider`; the last 7 days up to
/// `today` by default (the page reads every run of its range, through
/// `runs_provider_submitted_idx`).
pub fn parse_query(query: &str, today: NaiveDate) -> Result<CostQuery, WebError> {
    let mut q = CostQuery {
        from: today - Duration::days(6),
        to: today,
        provider: None,
    };
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        let date = || {
            NaiveDate::parse_from_str(v, "%Y-%m-%d")
                .map_err(|_| WebError::BadRequest(format!("{k}: `{v}` is not a date (2026-12-07)")))
        };
        match k.as_ref() {
            "from" => q.from = date()?,
            "to" => q.to = date()?,
            "provider" => q.provider = Some(v.to_owned()),
            _ => {}
        }
    }
    if q.to < q.from {
        return Err(WebError::BadRequest("to: before from".into()));
    }
    if (q.to - q.from).num_days() >= MAX_DAYS {
        return Err(WebError::BadRequest(format!(
            "from..to: at most {MAX_DAYS} days at once"
        )));
    }
    Ok(q)
}

async fn read(
    state: &WebState,
    query: Option<String>,
) -> Result<(CostQuery, Vec<CostRow>, Vec<String>, String), WebError> {
    let zone = budget_timezone(&state.pool).await?;
    let today = sqlx::query_scalar::<_, NaiveDate>("SELECT (now() AT TIME ZONE $1)::date")
        .bind(&zone)
        .fetch_one(&state.pool)
        .await?;
    let q = parse_query(query.as_deref().unwrap_or(""), today)?;
    let mut providers = state.profile_names();
    for p in submitting_providers(&state.pool).await? {
        if !providers.contains(&p) {
            providers.push(p);
        }
    }
    let chosen: Vec<String> = match &q.provider {
        Some(p) => vec![p.clone()],
        None => providers.clone(),
    };
    let rows = costs(&state.pool, &chosen, q.from, q.to, &zone).await?;
    Ok((q, rows, providers, zone))
}

/// The page.
pub async fn page(
    State(state): State<Arc<WebState>>,
    RawQuery(query): RawQuery,
) -> Result<Markup, WebError> {
    let (q, rows, providers, zone) = read(&state, query).await?;
    let params = [
        ("from", q.from.to_string()),
        ("to", q.to.to_string()),
        ("provider", q.provider.clone().unwrap_or_default()),
    ];
    let currencies: BTreeSet<&str> = rows.iter().map(|r| r.currency.as_str()).collect();
    let body = html! {
        h1 { "Costs " span.muted.small { "budget days in " (zone) } }
        form.filters method="get" action="/costs" {
            label { "From" input type="date" name="from" value=(q.from.to_string()); }
            label { "To" input type="date" name="to" value=(q.to.to_string()); }
            label { "Provider"
                select name="provider" {
                    option value="" { "all" }
                    @for p in &providers { option value=(p) selected[q.provider.as_deref() == Some(p.as_str())] { (p) } }
                }
            }
            div.buttons {
                button type="submit" { "Show" }
                a.button.plain href=(layout::href("/costs.csv", &params)) download { "CSV" }
            }
        }
        @if rows.is_empty() {
            p.muted.empty { "No run was submitted in this range." }
        }
        @for currency in &currencies {
            section.panel {
                h2 { "Charged per day" @if !currency.is_empty() { " · " (currency) } }
                (chart(&rows, currency, q.from, q.to))
            }
        }
        @if !rows.is_empty() {
            div.scroll {
                table.grid {
                    thead { tr {
                        th { "day" } th { "provider" } th { "workflow" } th.n { "runs" } th.n { "succeeded" } th.n { "failed" }
                        th.n { "charged" } th.n { "frozen" } th.n { "released" } th.n { "unsettled" } th { "currency" }
                    } }
                    tbody {
                        @for r in &rows {
                            tr {
                                td { (r.budget_date.to_string()) } td { (r.provider) } td.wf { (r.workflow_id) }
                                td.n { (r.runs) } td.n { (r.succeeded) } td.n { (r.failed) }
                                td.n { (money(Some(r.charged()))) } td.n { (money(Some(r.frozen))) }
                                td.n { (money(Some(r.released))) } td.n { (money(Some(r.outstanding_frozen))) }
                                td { (r.currency) }
                            }
                        }
                    }
                    tfoot {
                        @for currency in &currencies {
                            @let of: Vec<&CostRow> = rows.iter().filter(|r| r.currency == *currency).collect();
                            tr {
                                th colspan="3" { "total " (currency) }
                                td.n { (of.iter().map(|r| r.runs).sum::<i64>()) }
                                td.n { (of.iter().map(|r| r.succeeded).sum::<i64>()) }
                                td.n { (of.iter().map(|r| r.failed).sum::<i64>()) }
                                td.n { (money(Some(of.iter().map(|r| r.charged()).sum()))) }
                                td.n { (money(Some(of.iter().map(|r| r.frozen).sum()))) }
                                td.n { (money(Some(of.iter().map(|r| r.released).sum()))) }
                                td.n { (money(Some(of.iter().map(|r| r.outstanding_frozen).sum()))) }
                                td { (currency) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&state, Nav::Costs, "Costs", body))
}

/// `GET /costs.csv`: the table as CSV.
pub async fn csv(
    State(state): State<Arc<WebState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, WebError> {
    let (q, rows, _, _) = read(&state, query).await?;
    let text = csv_text(&rows);
    let name = format!("wfq-costs-{}-{}.csv", q.from, q.to);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        text,
    )
        .into_response())
}

/// The rows as CSV (RFC 4180 quoting; a text cell that a spreadsheet
/// would run as a formula is prefixed with `'`).
pub fn csv_text(rows: &[CostRow]) -> String {
    let mut out = String::from(
        "budget_date,provider,workflow_id,currency,runs,succeeded,failed,final,total_cost,frozen,released,outstanding_frozen\n",
    );
    for r in rows {
        let cells = [
            r.budget_date.to_string(),
            cell(&r.provider),
            cell(&r.workflow_id),
            cell(&r.currency),
            r.runs.to_string(),
            r.succeeded.to_string(),
            r.failed.to_string(),
            r.final_amount.to_string(),
            r.total_cost.to_string(),
            r.frozen.to_string(),
            r.released.to_string(),
            r.outstanding_frozen.to_string(),
        ];
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn cell(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

const PALETTE: [&str; 8] = [
    "#4f7cff", "#22b07d", "#f2a93b", "#e5534b", "#9b6bff", "#20a4c4", "#c9b400", "#8a8f98",
];

/// Bars per day, stacked by provider, for one currency.
fn chart(rows: &[CostRow], currency: &str, from: NaiveDate, to: NaiveDate) -> Markup {
    let days = (to - from).num_days() as usize + 1;
    let providers: Vec<&str> = rows
        .iter()
        .filter(|r| r.currency == currency)
        .map(|r| r.provider.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut per_day: BTreeMap<(usize, usize), Decimal> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.currency == currency) {
        let day = (r.budget_date - from).num_days();
        let p = providers.iter().position(|p| *p == r.provider).unwrap_or(0);
        if (0..days as i64).contains(&day) {
            *per_day.entry((day as usize, p)).or_default() += r.charged();
        }
    }
    let mut day_totals = vec![Decimal::ZERO; days];
    for ((day, _), v) in &per_day {
        day_totals[*day] += *v;
    }
    let max = day_totals.iter().copied().max().unwrap_or(Decimal::ZERO);
    let top_value = nice_ceiling(max.to_string().parse::<f64>().unwrap_or(0.0));
    let (w, h, left, bottom, top) = (1000.0, 240.0, 78.0, 26.0, 12.0);
    let plot_w = w - left - 10.0;
    let plot_h = h - bottom - top;
    let slot = plot_w / days as f64;
    let bar = (slot * 0.72).clamp(1.0, 48.0);
    let label_every = days.div_ceil(8).max(1);
    html! {
        svg.chart viewBox=(format!("0 0 {w} {h}")) role="img" aria-label=(format!("charged per day, {currency}")) {
            @for step in 0..=4 {
                @let y = h - bottom - plot_h * step as f64 / 4.0;
                line x1=(left) y1=(format!("{y:.1}")) x2=(w - 10.0) y2=(format!("{y:.1}")) class=(if step == 0 { "axis" } else { "grid" }) {}
                text x=(left - 8.0) y=(format!("{:.1}", y + 4.0)) text-anchor="end" class="tick" { (tick(top_value * step as f64 / 4.0)) }
            }
            @for day in 0..days {
                @let x = left + day as f64 * slot + (slot - bar) / 2.0;
                @let mut y = h - bottom;
                @for (p, provider) in providers.iter().enumerate() {
                    @if let Some(v) = per_day.get(&(day, p)) {
                        @let height = v.to_string().parse::<f64>().unwrap_or(0.0) / top_value * plot_h;
                        @let y0 = { y -= height; y };
                        rect x=(format!("{x:.1}")) y=(format!("{y0:.1}")) width=(format!("{bar:.1}")) height=(format!("{height:.1}")) rx="2" fill=(PALETTE[p % PALETTE.len()]) {
                            title { (from + Duration::days(day as i64)) " · " (provider) ": " (money(Some(*v))) " " (currency) }
                        }
                    }
                }
                @if day % label_every == 0 {
                    text x=(format!("{:.1}", left + day as f64 * slot + slot / 2.0)) y=(h - 8.0) text-anchor="middle" class="tick" {
                        ((from + Duration::days(day as i64)).format("%m-%d").to_string())
                    }
                }
            }
        }
        div.legend {
            @for (p, provider) in providers.iter().enumerate() {
                span { i.swatch.{"c" (p % PALETTE.len())} {} (provider) }
            }
        }
    }
}

/// The axis' top: 1, 2 or 5 times a power of ten, at least `max`.
fn nice_ceiling(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|v| *v >= max * 0.999_999)
        .unwrap_or(10.0 * power)
}

/// An axis label: as few decimals as the step needs.
fn tick(value: f64) -> String {
    if value == 0.0 {
        return "0".into();
    }
    let decimals = (-value.abs().log10().floor() + 1.0).clamp(0.0, 8.0) as usize;
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round() {
        assert_eq!(nice_ceiling(0.017197), 0.02);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(10.0), 10.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(tick(0.005), "0.0050");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(250.0), "250");
    }

    #[test]
    fn ranges_are_checked() {
        let today = NaiveDate::from_ymd_opt(2026, 12, 7).unwrap();
        let q = parse_query("", today).unwrap();
        assert_eq!(
            (q.from.to_string(), q.to.to_string()),
            ("2026-12-01".into(), "2026-12-07".into())
        );
        let q = parse_query("from=2026-12-01&to=2026-12-03&provider=dify", today).unwrap();
        assert_eq!(q.provider.as_deref(), Some("dify"));
        assert!(parse_query("from=2026-12-05&to=2026-12-01", today).is_err());
        assert!(parse_query("from=2024-01-01&to=2026-12-01", today).is_err());
        assert!(parse_query("from=yesterday", today).is_err());
    }

    #[test]
    fn csv_quotes_and_defuses_cells() {
        let row = CostRow {
            budget_date: NaiveDate::from_ymd_opt(2026, 12, 7).unwrap(),
            provider: "chenyu".into(),
            workflow_id: "=HYPERLINK(\"x\",\"y\")".into(),
            currency: "CNY".into(),
            runs: 2,
            succeeded: 1,
            failed: 1,
            final_amount: "0.50".parse().unwrap(),
            total_cost: Decimal::ZERO,
            frozen: "1.00".parse().unwrap(),
            released: "0.50".parse().unwrap(),
            outstanding_frozen: Decimal::ZERO,
        };
        let text = csv_text(&[row]);
        assert_eq!(
            text.lines().nth(1).unwrap(),
            "2026-12-07,chenyu,\"'=HYPERLINK(\"\"x\"\",\"\"y\"\")\",CNY,2,1,1,0.50,0,1.00,0.50,0"
        );
    }
}
