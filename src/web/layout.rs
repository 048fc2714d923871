//! The page shell (navigation, live toggle) and the small pieces every page
//! uses: amounts, times, state badges, JSON blocks. User data is always
//! written through maud's escaping (`PreEscaped` is never given user data).

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use rust_decimal::Decimal;

use super::WebState;

/// The sections of the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// `/`
    Overview,
    /// `/runs`
    Runs,
    /// `/costs`
    Costs,
    /// `/providers`
    Providers,
    /// `/workers`
    Workers,
}

const NAV: [(Nav, &str, &str); 5] = [
    (Nav::Overview, "/", "Overview"),
    (Nav::Runs, "/runs", "Runs"),
    (Nav::Costs, "/costs", "Costs"),
    (Nav::Providers, "/providers", "Providers"),
    (Nav::Workers, "/workers", "Workers"),
];

/// A whole page: head, navigation, `body`.
pub fn page(state: &WebState, nav: Nav, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · wfq" }
                link rel="stylesheet" href="/assets/app.css";
                link rel="icon" href="data:,";
                script src="/assets/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { span.logo { "wfq" } }
                    nav {
                        @for (item, href, label) in NAV {
                            a.on[item == nav] href=(href) { (label) }
                        }
                    }
                    div.live-box {
                        @if state.read_only { span.pill.ro title="actions are hidden; POSTs are refused" { "read-only" } }
                        button #live-toggle type="button" hidden title="pause or resume the live refresh" { "Live" }
                        span #live-stamp {}
                    }
                }
                main { (body) }
                footer { "wfq " (env!("CARGO_PKG_VERSION")) " · times in UTC" }
            }
        }
    }
}

/// The hidden field every action form carries.
pub fn csrf_field(state: &WebState) -> Markup {
    html! { input type="hidden" name=(super::csrf::FIELD) value=(state.csrf.value()); }
}

/// An amount as stored (exact), without trailing zeros; `-` when unknown.
pub fn money(value: Option<Decimal>) -> String {
    value.map_or_else(|| "-".to_owned(), |d| d.normalize().to_string())
}

/// An amount with its currency.
pub fn money_in(value: Option<Decimal>, currency: Option<&str>) -> String {
    match (value, currency) {
        (None, _) => "-".to_owned(),
        (Some(v), Some(c)) if !c.is_empty() => format!("{} {c}", money(Some(v))),
        (Some(v), _) => money(Some(v)),
    }
}

/// `2026-12-07 08:01:02`.
pub fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// `3.2s ago`, `5m ago`, `2.1h ago`, `4d ago`; `in 5m` for the future.
pub fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - at).num_milliseconds() as f64 / 1000.0;
    let (future, secs) = (secs < 0.0, secs.abs());
    let text = match secs {
        s if s < 60.0 => format!("{s:.0}s"),
        s if s < 3600.0 => format!("{:.0}m", s / 60.0),
        s if s < 172_800.0 => format!("{:.1}h", s / 3600.0),
        s => format!("{:.0}d", s / 86_400.0),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// A time with its distance from now as a tooltip.
pub fn when(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Markup {
    match at {
        None => html! { span.muted { "-" } },
        Some(at) => html! { time datetime=(at.to_rfc3339()) title=(time(at)) { (ago(at, now)) } },
    }
}

/// The CSS class of a run state (a fixed set: unknown text gets none).
fn state_class(state: &str) -> &'static str {
    match state {
        "queued" => "badge s-queued",
        "submitting" => "badge s-submitting",
        "running" => "badge s-running",
        "succeeded" => "badge s-succeeded",
        "failed" => "badge s-failed",
        "canceled" => "badge s-canceled",
        _ => "badge",
    }
}

/// A run state as a coloured badge.
pub fn state_badge(state: &str) -> Markup {
    html! { span class=(state_class(state)) { (state) } }
}

/// A JSON value, pretty-printed and escaped.
pub fn json_block(value: Option<&serde_json::Value>) -> Markup {
    match value {
        None => html! { p.muted { "none" } },
        Some(v) => {
            let text = serde_json::to_string_pretty(v).unwrap_or_default();
            html! { pre.json { (text) } }
        }
    }
}

/// A message box: `kind` is `ok`, `warn` or `bad`.
pub fn notice(kind: &str, text: &str) -> Markup {
    let class = match kind {
        "ok" => "notice ok",
        "bad" => "notice bad",
        _ => "notice warn",
    };
    html! { div class=(class) role="status" { (text) } }
}

/// A link target with a query string, every value encoded.
pub fn href(path: &str, query: &[(&str, String)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in query {
        if !v.is_empty() {
            q.append_pair(k, v);
        }
    }
    let q = q.finish();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{q}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn amounts_and_times_read_well() {
        assert_eq!(money(Some("0.03000000".parse().unwrap())), "0.03");
        assert_eq!(money(Some("12".parse().unwrap())), "12");
        assert_eq!(money(None), "-");
        assert_eq!(
            money_in(Some("0.50".parse().unwrap()), Some("CNY")),
            "0.5 CNY"
        );
        let now = Utc.with_ymd_and_hms(2026, 12, 7, 8, 0, 0).unwrap();
        let cases = [
            (5, "5s ago"),
            (300, "5m ago"),
            (7200, "2.0h ago"),
            (-300, "in 5m"),
        ];
        for (secs, text) in cases {
            assert_eq!(ago(now - chrono::Duration::seconds(secs), now), text);
        }
        assert_eq!(
            href("/runs", &[("state", "a b&c".into()), ("x", String::new())]),
            "/runs?state=a+b%26c"
        );
    }
}
