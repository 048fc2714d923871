//! `wfq top`: counts of runs by provider profile and state, the money still
//! frozen, and the runs finished in the last minute, refreshed in place.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;

use super::{CLEAR_LINE_END, CLEAR_SCREEN, CLEAR_SCREEN_END, CURSOR_HOME};
use crate::store::{self, StateCount};
use crate::table;

/// The states in the order `wfq top` shows them.
pub const STATES: [&str; 7] = crate::store::RUN_STATES;

/// The counts of one provider profile (or of all: [`Snapshot::total`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderCounts {
    /// Runs per state, in the order of [`STATES`].
    pub by_state: [i64; STATES.len()],
    /// Runs that became final in the last minute.
    pub finished_last_minute: i64,
    /// Frozen and not yet settled, per currency (zero amounts left out).
    pub outstanding_frozen: BTreeMap<String, Decimal>,
}

impl ProviderCounts {
    fn add(&mut self, other: &ProviderCounts) {
        for (mine, theirs) in self.by_state.iter_mut().zip(other.by_state) {
            *mine += theirs;
        }
        self.finished_last_minute += other.finished_last_minute;
        for (currency, amount) in &other.outstanding_frozen {
            *self.outstanding_frozen.entry(currency.clone()).or_default() += amount;
        }
    }
}

/// One refresh of `wfq top`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Counts per provider profile, by name.
    pub providers: BTreeMap<String, ProviderCounts>,
    /// The profiles paused now, each as a line that says why and what ends
    /// it.
    pub pauses: Vec<String>,
}

impl Snapshot {
    /// Folds the grouped rows of [`store::queue_stats`] into counts per profile.
    pub fn from_counts(rows: &[StateCount]) -> Snapshot {
        let mut providers: BTreeMap<String, ProviderCounts> = BTreeMap::new();
        for row in rows {
            let counts = providers.entry(row.provider.clone()).or_default();
            // The table's CHECK constraint allows only these states.
            if let Some(i) = STATES.iter().position(|s| *s == row.state) {
                counts.by_state[i] += row.runs;
            }
            counts.finished_last_minute += row.finished_last_minute;
            if !row.outstanding_frozen.is_zero() {
                let currency = row.currency.clone().unwrap_or_else(|| "?".to_owned());
                *counts.outstanding_frozen.entry(currency).or_default() += row.outstanding_frozen;
            }
        }
        Snapshot {
            providers,
            pauses: Vec::new(),
        }
    }

    /// All profiles together.
    pub fn total(&self) -> ProviderCounts {
        let mut total = ProviderCounts::default();
        for counts in self.providers.values() {
            total.add(counts);
        }
        total
    }
}

/// The lines of one snapshot taken at `at`: a title and a table with a
/// `total` row.
pub fn render_snapshot(snapshot: &Snapshot, at: DateTime<Utc>) -> Vec<String> {
    let mut lines = vec![format!("wfq top  {}", at.format("%Y-%m-%d %H:%M:%S UTC"))];
    lines.push(String::new());
    if snapshot.providers.is_empty() {
        lines.push("no runs".to_owned());
        return lines;
    }
    let row = |name: &str, c: &ProviderCounts| {
        let mut cells = vec![name.to_owned()];
        cells.extend(c.by_state.iter().map(i64::to_string));
        cells.push(c.finished_last_minute.to_string());
        cells.push(frozen_text(&c.outstanding_frozen));
        cells
    };
    let mut rows: Vec<Vec<String>> = snapshot
        .providers
        .iter()
        .map(|(name, counts)| row(name, counts))
        .collect();
    if snapshot.providers.len() > 1 {
        rows.push(row("total", &snapshot.total()));
    }
    let mut headers = vec!["provider"];
    headers.extend(STATES);
    headers.extend(["finished/1m", "frozen (unsettled)"]);
    lines.extend(table::render(&headers, &rows).lines().map(str::to_owned));
    if !snapshot.pauses.is_empty() {
        lines.push(String::new());
        lines.extend(snapshot.pauses.iter().cloned());
    }
    lines
}

fn frozen_text(frozen: &BTreeMap<String, Decimal>) -> String {
    if frozen.is_empty() {
        return "-".to_owned();
    }
    frozen
        .iter()
        .map(|(currency, amount)| format!("{amount} {currency}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One frame for a terminal: cursor home, every line cleared to its end,
/// the rest of the screen cleared (no flicker, no leftovers of a longer
/// frame). The first frame clears the whole screen.
pub fn terminal_frame(lines: &[String], first: bool) -> String {
    let mut frame = String::new();
    if first {
        frame.push_str(CLEAR_SCREEN);
    }
    frame.push_str(CURSOR_HOME);
    for line in lines {
        frame.push_str(line);
        frame.push_str(CLEAR_LINE_END);
        frame.push('\n');
    }
    frame.push_str(CLEAR_SCREEN_END);
    frame
}

/// How `wfq top` draws.
#[derive(Debug, Clone, Copy)]
pub struct TopOptions {
    /// Time between refreshes.
    pub interval: Duration,
    /// One plain snapshot, then return.
    pub once: bool,
    /// Redraw in place with ANSI sequences (stdout is a terminal).
    pub terminal: bool,
}

/// Shows snapshots on `out` until `stop` resolves (or once). A database
/// error ends `--once`; the live view shows it and tries again.
pub async fn run_top(
    pool: &PgPool,
    options: TopOptions,
    out: &mut dyn Write,
    stop: impl Future<Output = ()>,
) -> Result<(), sqlx::Error> {
    tokio::pin!(stop);
    let mut first = true;
    let mut ticks = tokio::time::interval(options.interval.max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticks.tick() => {}
        }
        let read = async {
            let rows = store::queue_stats(pool).await?;
            let pauses = store::paused_providers(pool).await?;
            let mut snapshot = Snapshot::from_counts(&rows);
            snapshot.pauses = pauses.iter().map(super::pauses::pause_line).collect();
            Ok::<_, sqlx::Error>(snapshot)
        };
        let lines = match read.await {
            Ok(snapshot) => render_snapshot(&snapshot, Utc::now()),
            Err(e) if !options.once => vec![
                format!("wfq top  {}", Utc::now().format("%Y-%m-%d %H:%M:%S UTC")),
                String::new(),
                format!("cannot read wfq.runs: {e}; trying again"),
            ],
            Err(e) => return Err(e),
        };
        let text = if options.terminal && !options.once {
            let mut lines = lines;
            lines.push(String::new());
            lines.push(format!("every {:?}; Ctrl-C quits", options.interval));
            terminal_frame(&lines, first)
        } else {
            lines.join("\n") + "\n\n"
        };
        first = false;
        // A closed pipe (`wfq top | head`) ends the view quietly.
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
            || options.once
        {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn count(provider: &str, state: &str, currency: Option<&str>, runs: i64) -> StateCount {
        StateCount {
            provider: provider.into(),
            state: state.into(),
            currency: currency.map(Into::into),
            runs,
            outstanding_frozen: Decimal::ZERO,
            finished_last_minute: 0,
        }
    }

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn example() -> Snapshot {
        Snapshot::from_counts(&[
            StateCount {
                outstanding_frozen: d("0.53000000"),
                ..count("chenyu", "running", Some("CNY"), 2)
            },
            count("chenyu", "queued", None, 3),
            StateCount {
                finished_last_minute: 4,
                ..count("chenyu", "succeeded", Some("CNY"), 120)
            },
            StateCount {
                finished_last_minute: 1,
                outstanding_frozen: d("0.5"),
                ..count("chenyu", "failed", Some("CNY"), 5)
            },
            count("dify", "running", Some("USD"), 1),
        ])
    }

    #[test]
    fn rows_fold_into_counts_per_provider() {
        let s = example();
        let chenyu = &s.providers["chenyu"];
        assert_eq!(chenyu.by_state, [0, 3, 0, 2, 120, 5, 0]);
        assert_eq!(chenyu.finished_last_minute, 5);
        assert_eq!(chenyu.outstanding_frozen["CNY"], d("1.03"));
        let total = s.total();
        assert_eq!(total.by_state, [0, 3, 0, 3, 120, 5, 0]);
        assert!(s.providers["dify"].outstanding_frozen.is_empty());
    }

    #[test]
    fn a_snapshot_renders_as_a_table_with_a_total() {
        let at = DateTime::parse_from_rfc3339("2026-05-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let lines = render_snapshot(&example(), at);
        assert_eq!(
            lines,
            vec![
                "wfq top  2026-05-01 12:00:00 UTC",
                "",
                "provider  waiting  queued  submitting  running  succeeded  failed  canceled  finished/1m  frozen (unsettled)",
                "--------  -------  ------  ----------  -------  ---------  ------  --------  -----------  ------------------",
                "chenyu    0        3       0           2        120        5       0         5            1.03000000 CNY",
                "dify      0        0       0           1        0          0       0         0            -",
                "total     0        3       0           3        120        5       0         5            1.03000000 CNY",
            ]
        );
        assert_eq!(
            render_snapshot(&Snapshot::default(), at)[2],
            "no runs",
            "an empty queue says so"
        );
    }

    #[test]
    fn one_provider_needs_no_total_and_currencies_stay_apart() {
        let s = Snapshot::from_counts(&[
            StateCount {
                outstanding_frozen: d("1"),
                ..count("p", "running", Some("CNY"), 1)
            },
            StateCount {
                outstanding_frozen: d("2.5"),
                ..count("p", "running", Some("USD"), 1)
            },
        ]);
        let lines = render_snapshot(&s, Utc::now());
        assert_eq!(lines.len(), 5);
        assert!(lines[4].ends_with("1 CNY, 2.5 USD"), "{}", lines[4]);
    }

    #[test]
    fn terminal_frames_redraw_in_place() {
        let lines = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(
            terminal_frame(&lines, true),
            "\x1b[2J\x1b[Ha\x1b[K\nb\x1b[K\n\x1b[J"
        );
        assert_eq!(
            terminal_frame(&lines, false),
            "\x1b[Ha\x1b[K\nb\x1b[K\n\x1b[J"
        );
    }
}
