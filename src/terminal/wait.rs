//! `wfq enqueue --wait`: follows one run until it is final, with a
//! one-line progress display. The provider's progress (chenyu
//! `run/execution`) is a nicety: without a profile or key, or when the
//! provider does not answer, the line shows the state alone.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::time::Instant;

use super::{CLEAR_LINE_END, format_elapsed};
use crate::config::{Config, Environment, ProviderKind};
use crate::providers::chenyu::{ChenyuClient, ProgressError, RunProgressReport};
use crate::store::{self, RunRow};

/// Re-read of the run when no notification came.
pub const REFRESH: Duration = Duration::from_millis(500);
/// Shortest time between two `run/execution` requests.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for one `run/execution` answer: the display must not stall.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(2);
/// Without a terminal, an unchanged line is repeated this often.
pub const PLAIN_REPEAT: Duration = Duration::from_secs(5);

/// Width of the progress bar, in characters between the brackets.
const BAR: usize = 20;

/// What the progress line shows.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitView<'a> {
    /// Run id.
    pub id: i64,
    /// Provider profile.
    pub provider: &'a str,
    /// The run's state in wfq.
    pub state: &'a str,
    /// Since the wait began.
    pub elapsed: Duration,
    /// The provider's progress, when known.
    pub progress: Option<&'a RunProgressReport>,
}

/// The progress line, e.g. `run 42 (chenyu): running  45% [#########-----------]  3.1s`.
pub fn progress_line(view: &WaitView<'_>) -> String {
    let mut line = format!("run {} ({}): {}", view.id, view.provider, view.state);
    if let Some(detail) = view
        .progress
        .filter(|_| view.state == "running")
        .and_then(progress_detail)
    {
        line.push_str("  ");
        line.push_str(&detail);
    }
    line.push_str("  ");
    line.push_str(&format_elapsed(view.elapsed));
    line
}

/// The provider's part of the line: its queue while queued, else a bar.
fn progress_detail(p: &RunProgressReport) -> Option<String> {
    let queued = p.status.as_deref() == Some("queued") || p.queue_position.is_some();
    if queued {
        let mut text = "queued at the provider".to_owned();
        match (p.queue_position, p.estimated_wait_sec) {
            (Some(at), Some(wait)) => text.push_str(&format!(": #{at}, ~{wait}s wait")),
            (Some(at), None) => text.push_str(&format!(": #{at}")),
            (None, Some(wait)) => text.push_str(&format!(": ~{wait}s wait")),
            (None, None) => {}
        }
        return Some(text);
    }
    let percent = p.progress_percent?;
    let filled = ((percent / 100.0) * BAR as f64).round() as usize;
    let filled = filled.min(BAR);
    Some(format!(
        "{:>3.0}% [{}{}]",
        percent.floor(),
        "#".repeat(filled),
        "-".repeat(BAR - filled)
    ))
}

/// How a wait ended.
#[derive(Debug)]
pub enum WaitEnd {
    /// The run is final (`succeeded`, `failed` or `canceled`).
    Final(Box<RunRow>),
    /// `stop` resolved first (Ctrl-C); the run goes on without us.
    Interrupted(Box<RunRow>),
}

/// Why a wait failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The database could not be read.
    #[error("{0}")]
    Database(#[from] sqlx::Error),
    /// The run was deleted while we waited (`wfq prune`, a `DELETE`).
    #[error("run {0} does not exist (any more)")]
    Gone(i64),
}

/// A client for `run/execution` of the run's profile, when there is one.
/// `Ok(None)`: the profile has no progress to show (not chenyu, or not
/// configured here); `Err`: why a chenyu profile cannot be asked (shown
/// once, then the wait goes on with the state alone). Other profiles'
/// missing keys do not matter.
pub fn progress_client(
    text: &str,
    origin: &str,
    provider: &str,
    env: &dyn Environment,
) -> Result<Option<ChenyuClient>, String> {
    let kinds = ProviderKind::of_profiles(text, origin).map_err(|e| e.to_string())?;
    if kinds.get(provider) != Some(&ProviderKind::Chenyu) {
        return Ok(None);
    }
    // Read the whole configuration with every missing secret as "", so that
    // only this profile's key decides.
    let config = Config::from_toml(text, origin, &Lenient(env)).map_err(|e| e.to_string())?;
    let Some(profile) = config.providers.get(provider) else {
        return Ok(None);
    };
    if profile.api_key.expose().is_empty() {
        return Err(format!(
            "no API key for provider profile `{provider}` in this environment"
        ));
    }
    ChenyuClient::new(&profile.base_url, profile.api_key.clone(), &config.http)
        .map(Some)
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

struct Lenient<'a>(&'a dyn Environment);

impl Environment for Lenient<'_> {
    fn var(&self, name: &str) -> Option<String> {
        match self.0.var(name) {
            None if !name.ends_with("DATABASE_URL") => Some(String::new()),
            value => value,
        }
    }
}

/// Draws the progress line: in place with `\r` on a terminal, else as
/// plain lines when it changed or every [`PLAIN_REPEAT`].
struct Display<'a> {
    out: &'a mut dyn Write,
    terminal: bool,
    last_key: String,
    last_print: Option<Instant>,
}

impl Display<'_> {
    /// `key` is the line without what changes all the time (the clock).
    fn draw(&mut self, line: &str, key: &str) {
        let now = Instant::now();
        // Output errors (a closed pipe) must not end the wait: ignored.
        if self.terminal {
            let _ = write!(self.out, "\r{line}{CLEAR_LINE_END}");
        } else if key != self.last_key
            || self
                .last_print
                .is_none_or(|at| now.duration_since(at) >= PLAIN_REPEAT)
        {
            let _ = writeln!(self.out, "{line}");
            self.last_key = key.to_owned();
            self.last_print = Some(now);
        }
        let _ = self.out.flush();
    }

    /// A line of its own (a note, or the last state), the progress line
    /// being redrawn below it afterwards.
    fn print(&mut self, line: &str) {
        if self.terminal {
            let _ = write!(self.out, "\r{line}{CLEAR_LINE_END}\n");
        } else {
            let _ = writeln!(self.out, "{line}");
        }
        let _ = self.out.flush();
    }
}

/// Follows run `id` until it is final or `stop` resolves, drawing the
/// progress line on `out`. Wakes on `wfq_run_finished` for this run and
/// re-reads the row every [`REFRESH`] in any case (the notification is
/// only sent for final states, and a lost `LISTEN` connection must not
/// hang the wait).
pub async fn follow_run(
    pool: &PgPool,
    id: i64,
    client: Option<&ChenyuClient>,
    out: &mut dyn Write,
    terminal: bool,
    stop: impl Future<Output = ()>,
) -> Result<WaitEnd, WaitError> {
    tokio::pin!(stop);
    let started = Instant::now();
    let mut listener = listen(pool).await;
    let mut display = Display {
        out,
        terminal,
        last_key: String::new(),
        last_print: None,
    };
    let mut client = client;
    let mut progress: Option<RunProgressReport> = None;
    let mut progress_asked: Option<Instant> = None;
    loop {
        let run = store::show_run(pool, id)
            .await?
            .ok_or(WaitError::Gone(id))?;
        let view = |progress| WaitView {
            id,
            provider: &run.provider,
            state: &run.state,
            elapsed: started.elapsed(),
            progress,
        };
        if !store::ACTIVE_STATES.contains(&run.state.as_str()) {
            display.print(&progress_line(&view(None)));
            return Ok(WaitEnd::Final(Box::new(run)));
        }
        let ask = run.state == "running"
            && progress_asked.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY);
        if let (true, Some(c), Some(run_order_id)) = (ask, client, &run.provider_run_id) {
            progress_asked = Some(Instant::now());
            match tokio::time::timeout(PROGRESS_TIMEOUT, c.progress(run_order_id)).await {
                Ok(Ok(report)) => progress = Some(report),
                // A refused key or request will be refused again: stop asking.
                Ok(Err(ProgressError::Rejected(e))) => {
                    display.print(&format!(
                        "note: no progress from the provider ({}: {}); showing the state only",
                        e.code, e.message
                    ));
                    client = None;
                    progress = None;
                }
                Ok(Err(ProgressError::Unclear(u))) if u.account_refused => {
                    display.print(&format!(
                        "note: no progress from the provider ({}); showing the state only",
                        u.reason
                    ));
                    client = None;
                    progress = None;
                }
                // A passing problem: the state alone until the next answer.
                Ok(Err(ProgressError::Unclear(_))) | Err(_) => progress = None,
            }
        }
        let shown = progress.as_ref().filter(|_| run.state == "running");
        let line = progress_line(&view(shown));
        let key = progress_line(&WaitView {
            elapsed: Duration::ZERO,
            ..view(shown)
        });
        display.draw(&line, &key);

        let woken = wake_for(&mut listener, id);
        tokio::select! {
            _ = &mut stop => {
                let run = store::show_run(pool, id).await?.ok_or(WaitError::Gone(id))?;
                if terminal {
                    display.print("");
                }
                return Ok(WaitEnd::Interrupted(Box::new(run)));
            }
            _ = tokio::time::timeout(REFRESH, woken) => {}
        }
    }
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut listener = PgListener::connect_with(pool).await.ok()?;
    listener.listen("wfq_run_finished").await.ok()?;
    Some(listener)
}

/// Resolves when run `id` is reported final. Without a listener (or once
/// it fails) it never resolves, and the periodic re-read takes over.
async fn wake_for(listener: &mut Option<PgListener>, id: i64) {
    let wanted = id.to_string();
    while let Some(l) = listener.as_mut() {
        match l.recv().await {
            Ok(n) if n.payload() == wanted => return,
            Ok(_) => {}
            Err(_) => *listener = None,
        }
    }
    std::future::pending::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn view<'a>(state: &'a str, progress: Option<&'a RunProgressReport>) -> WaitView<'a> {
        WaitView {
            id: 42,
            provider: "chenyu",
            state,
            elapsed: Duration::from_millis(3100),
            progress,
        }
    }

    #[test]
    fn states_alone_show_the_clock() {
        assert_eq!(
            progress_line(&view("queued", None)),
            "run 42 (chenyu): queued  3.1s"
        );
        assert_eq!(
            progress_line(&view("succeeded", None)),
            "run 42 (chenyu): succeeded  3.1s"
        );
    }

    #[test]
    fn a_running_run_shows_a_bar() {
        let p = RunProgressReport {
            status: Some("running".into()),
            progress_percent: Some(45.0),
            ..Default::default()
        };
        assert_eq!(
            progress_line(&view("running", Some(&p))),
            "run 42 (chenyu): running   45% [#########-----------]  3.1s"
        );
        let done = RunProgressReport {
            progress_percent: Some(100.0),
            ..p.clone()
        };
        assert!(
            progress_line(&view("running", Some(&done))).contains("100% [####################]")
        );
    }

    #[test]
    fn a_run_queued_at_the_provider_shows_its_place() {
        let p = RunProgressReport {
            status: Some("queued".into()),
            queue_position: Some(3),
            estimated_wait_sec: Some(12),
            progress_percent: Some(0.0),
        };
        assert_eq!(
            progress_line(&view("running", Some(&p))),
            "run 42 (chenyu): running  queued at the provider: #3, ~12s wait  3.1s"
        );
        let bare = RunProgressReport {
            status: Some("queued".into()),
            ..Default::default()
        };
        assert_eq!(
            progress_line(&view("running", Some(&bare))),
            "run 42 (chenyu): running  queued at the provider  3.1s"
        );
    }

    #[test]
    fn progress_is_shown_only_while_running_and_when_known() {
        let p = RunProgressReport {
            progress_percent: Some(50.0),
            ..Default::default()
        };
        assert_eq!(
            progress_line(&view("submitting", Some(&p))),
            "run 42 (chenyu): submitting  3.1s"
        );
        let unknown = RunProgressReport {
            status: Some("running".into()),
            ..Default::default()
        };
        assert_eq!(
            progress_line(&view("running", Some(&unknown))),
            "run 42 (chenyu): running  3.1s"
        );
    }

    #[test]
    fn plain_output_prints_changes_not_every_redraw() {
        let mut out = Vec::new();
        let mut d = Display {
            out: &mut out,
            terminal: false,
            last_key: String::new(),
            last_print: None,
        };
        d.draw("queued 0.1s", "queued");
        d.draw("queued 0.6s", "queued");
        d.draw("running 1.1s", "running");
        d.print("succeeded 2.0s");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "queued 0.1s\nrunning 1.1s\nsucceeded 2.0s\n"
        );
        let mut out = Vec::new();
        let mut d = Display {
            out: &mut out,
            terminal: true,
            last_key: String::new(),
            last_print: None,
        };
        d.draw("queued 0.1s", "queued");
        d.draw("queued 0.6s", "queued");
        d.print("succeeded 2.0s");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\rqueued 0.1s\x1b[K\rqueued 0.6s\x1b[K\rsucceeded 2.0s\x1b[K\n"
        );
    }

    struct Env(HashMap<&'static str, &'static str>);

    impl Environment for Env {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    const TWO_PROFILES: &str = "[providers.chenyu]\nkind = \"chenyu\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"K1\"\n\
         [providers.news]\nkind = \"gptbots\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"K2\"\n";

    #[test]
    fn only_the_runs_own_key_decides_whether_progress_is_shown() {
        let with_key = Env(HashMap::from([("K1", "secret")]));
        let client = progress_client(TWO_PROFILES, "t", "chenyu", &with_key);
        assert!(matches!(client, Ok(Some(_))), "{client:?}");
        let client = progress_client(TWO_PROFILES, "t", "chenyu", &Env(HashMap::new()));
        let why = client.expect_err("no key");
        assert!(
            why.contains("no API key for provider profile `chenyu`"),
            "{why}"
        );
        assert!(!why.contains("secret"));
        assert!(matches!(
            progress_client(TWO_PROFILES, "t", "news", &with_key),
            Ok(None)
        ));
        assert!(matches!(
            progress_client(TWO_PROFILES, "t", "elsewhere", &with_key),
            Ok(None)
        ));
        assert!(matches!(
            progress_client("", "t", "chenyu", &with_key),
            Ok(None)
        ));
    }
}
