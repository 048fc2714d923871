//! The `wfq` command line: thin wrappers around the library.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;

use wfq::config::{Config, DatabaseConfig, ProcessEnvironment, parse_duration};
use wfq::store::{self, NewRun};
use wfq::{demo, sim, table, telemetry, terminal};

/// A durable PostgreSQL queue and worker for paid workflow-run APIs.
#[derive(Debug, Parser)]
#[command(name = "wfq", version, about)]
struct Cli {
    /// worker.toml to read (default ./worker.toml; built-in defaults when that file does not exist).
    #[arg(long, global = true, env = "WFQ_CONFIG")]
    config: Option<PathBuf>,
    /// Log one JSON object per line instead of human-readable lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the wfq schema.
    Migrate,
    /// Run the worker daemon until SIGINT or SIGTERM.
    Worker,
    /// Enqueue a run and print its id.
    Enqueue(EnqueueArgs),
    /// Show one run with its events.
    Show {
        /// Run id.
        id: i64,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the newest runs.
    List {
        /// Only runs in this state.
        #[arg(long)]
        state: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued run, or stop a running Dify run at the provider.
    Cancel {
        /// Run id.
        id: i64,
        /// Why, recorded in error_message.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Enqueue a failed or canceled run again (new row, new idempotency key).
    Retry {
        /// Run id.
        id: i64,
    },
    /// Delete finished runs (and their events) older than a given age; with
    /// `[storage]` in the config their stored files first. A run whose files
    /// are still in the store is kept (and counted in a warning).
    Prune {
        /// Age, e.g. 30d, 12h.
        #[arg(long)]
        finished_before: String,
        /// Rows per statement.
        #[arg(long, default_value_t = 1000)]
        batch: i64,
    },
    /// The worker processes registered in wfq.workers: alive or not, runs in hand, last seen.
    Workers {
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Live counts of runs by provider and state, refreshed in place.
    Top {
        /// Print one snapshot and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// Time between refreshes.
        #[arg(long, default_value = "1s")]
        interval: String,
    },
    /// Files of runs kept in [storage].
    #[command(subcommand)]
    Media(MediaCommand),
    /// Run the chenyu simulator.
    Sim(SimArgs),
    /// Serve the dashboard (runs, money, providers, workers) until Ctrl-C.
    Web {
        /// Address to listen on (default: `[web] listen`, else 127.0.0.1:9188).
        #[arg(long)]
        listen: Option<String>,
        /// Hide every action and refuse every POST.
        #[arg(long)]
        read_only: bool,
    },
    /// Run the whole thing against the built-in simulator and print the results.
    Demo,
    /// Measure wfq (and the peers in benches/peers) on its own database; see BENCHMARKS.md.
    Bench(wfq::bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum MediaCommand {
    /// Copy a run's mirrored outputs from [storage] into a directory.
    Get {
        /// Run id.
        id: i64,
        /// Only this output key.
        key: Option<String>,
        /// Where to write them (as <key>[/<n>].<ext>).
        #[arg(short = 'o', long = "out", default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct EnqueueArgs {
    /// Workflow id, e.g. wf_861ef31e94dcfb10e6e7.
    #[arg(long)]
    workflow: String,
    /// Provider profile name from worker.toml.
    #[arg(long, default_value = "chenyu")]
    provider: String,
    /// Inputs as a JSON object.
    #[arg(long, default_value = "{}")]
    inputs: String,
    /// One input: KEY=VALUE (JSON, else text), KEY=@PATH (a local file,
    /// put into [storage] when configured, else passed as a file:// path),
    /// or KEY=@run:ID/OUTPUT (output OUTPUT of run ID: this run waits for
    /// it to succeed).
    #[arg(long = "input", value_name = "KEY=VALUE|KEY=@PATH|KEY=@run:ID/OUTPUT")]
    input: Vec<String>,
    /// Submit only once run ID has succeeded (repeatable); if it fails or
    /// is canceled, this run fails DEPENDENCY_FAILED.
    #[arg(long = "after", value_name = "ID")]
    after: Vec<i64>,
    /// What a failed or canceled dependency does to this run: fail
    /// (DEPENDENCY_FAILED) or cancel.
    #[arg(long, value_parser = ["fail", "cancel"])]
    on_dependency_failure: Option<String>,
    /// Revision to pin (default: the published one at submit).
    #[arg(long)]
    revision: Option<String>,
    /// Idempotency key (default: a fresh UUID).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Higher runs first (-1000..1000).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// Accept the workflow's external model costs.
    #[arg(long)]
    accept_external_cost_risk: bool,
    /// Do not submit before this time (RFC 3339) or this long from now (e.g. 10m).
    #[arg(long)]
    not_before: Option<String>,
    /// Your own JSON, stored and never sent.
    #[arg(long)]
    metadata: Option<String>,
    /// Follow the run until it is final (progress on stderr), print it, and
    /// exit 0 if it succeeded, 2 if it failed, 3 if it was canceled.
    #[arg(long)]
    wait: bool,
    /// With --wait: print the final run as JSON (like `wfq show --json`).
    #[arg(long, requires = "wait")]
    json: bool,
    /// POST the finished run here as signed JSON (needs [callbacks] in the worker's config).
    #[arg(long)]
    callback_url: Option<String>,
}

#[derive(Debug, clap::Args)]
struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: String,
    /// How long a new run stays queued.
    #[arg(long, default_value = "500ms")]
    queue_time: String,
    /// How long it then runs.
    #[arg(long, default_value = "2s")]
    run_time: String,
    /// Settlement delay after the run ends.
    #[arg(long, default_value = "500ms")]
    settle_delay: String,
    /// Accept only this bearer token, read from this environment variable (default: any non-empty token).
    #[arg(long)]
    api_key_env: Option<String>,
    /// Fraction of API requests answered with a 5xx (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of API requests answered with 429.
    #[arg(long, default_value_t = 0.0)]
    rate_limit_rate: f64,
    /// Retry-After seconds sent with 429s.
    #[arg(long)]
    retry_after: Option<u64>,
    /// Extra latency before every answer (e.g. 200ms).
    #[arg(long, default_value = "0s")]
    latency: String,
    /// Fraction of accepted submits whose answer is lost (the run exists, the client never hears).
    #[arg(long, default_value_t = 0.0)]
    drop_after_submit_rate: f64,
    /// Requests per second per API key, all APIs together; beyond it HTTP 429 with Retry-After.
    #[arg(long, value_parser = positive_number)]
    rate_limit_rps: Option<f64>,
    /// How the rate limit is enforced: token_bucket or sliding_window.
    #[arg(long, default_value = "token_bucket")]
    rate_limit_mode: sim::RateLimitMode,
    /// Token bucket size (default: one second's worth, at least 1).
    #[arg(long, value_parser = positive_number)]
    rate_limit_burst: Option<f64>,
    /// Most runs queued or running at once, per API kind; new runs beyond it are refused.
    #[arg(long)]
    max_running: Option<u32>,
    /// Account balance (exact decimal) that chenyu quotes freeze from and GPTBots runs spend (default: unlimited).
    #[arg(long, value_parser = exact_amount)]
    balance: Option<rust_decimal::Decimal>,
}

/// A decimal amount, refused rather than rounded when it has too many digits.
fn exact_amount(text: &str) -> Result<rust_decimal::Decimal, String> {
    rust_decimal::Decimal::from_str_exact(text.trim())
        .map_err(|e| format!("{text:?} is not an exact decimal amount: {e}"))
}

/// A finite number above zero, for rate flags.
fn positive_number(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n),
        _ => Err(format!("{text:?} is not a positive number")),
    }
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain; a backtrace (which
            // anyhow adds when RUST_BACKTRACE is set) helps nobody here.
            eprintln!("error: {}", explain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error chain, plus a hint for the mistakes people make first.
fn explain(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    if text.contains("relation \"wfq.runs\" does not exist") {
        format!("{text} (the wfq schema is missing: run `wfq migrate` first)")
    } else {
        text
    }
}

async fn run(cli: Cli) -> Result<()> {
    let default_filter = match cli.command {
        Command::Worker | Command::Sim(_) | Command::Web { .. } => "info,sqlx=warn",
        Command::Demo => "wfq=info,wfq::sim=warn,apalis=warn,apalis_core=warn,sqlx=warn,warn",
        _ => "warn",
    };
    telemetry::init(cli.log_json, default_filter);
    match cli.command {
        Command::Migrate => {
            let pool = connect(cli.config.as_deref()).await?;
            store::migrate(&pool).await.context("applying migrations")?;
            println!("wfq schema is up to date");
        }
        Command::Worker => {
            let config = load_config(cli.config.as_deref())?;
            if config.providers.is_empty() {
                bail!(
                    "no [providers.*] in the configuration: the worker would have nothing to submit to"
                );
            }
            let pool = store::connect(&config.database)
                .await
                .with_context(|| format!("connecting to {}", config.database.url))?;
            wfq::runtime::run_worker(&config, pool, shutdown_signal()).await?;
        }
        Command::Enqueue(args) => {
            let pool = connect(cli.config.as_deref()).await?;
            let (wait, json) = (args.wait, args.json);
            let mut input_args = Vec::new();
            let mut run_outputs = Vec::new();
            for text in &args.input {
                match wfq::chains::parse_run_input(text)? {
                    Some(reference) => run_outputs.push(reference),
                    None => input_args.push(text.clone()),
                }
            }
            let mut run = new_run(args)?;
            if let Value::Object(inputs) = &mut run.inputs {
                for (key, reference) in run_outputs {
                    inputs.insert(key, reference.to_json());
                }
            }
            if !input_args.is_empty() {
                let storage = load_storage(cli.config.as_deref())?;
                let inputs = run.inputs.as_object().cloned().unwrap_or_default();
                let merged =
                    wfq::files::cli::merge_inputs(inputs, &input_args, storage.as_ref()).await?;
                run.inputs = Value::Object(merged);
            }
            let id = store::enqueue_run(&pool, &run).await?;
            if wait {
                let provider = run.provider.as_deref().unwrap_or("chenyu");
                wait_for_run(cli.config.as_deref(), &pool, id, provider, json).await?;
            } else {
                println!("{id}");
            }
        }
        Command::Show { id, json } => {
            let pool = connect(cli.config.as_deref()).await?;
            let Some(run) = store::show_run(&pool, id).await? else {
                bail!("run {id} does not exist");
            };
            let events = store::run_events(&pool, id).await?;
            let files = store::run_files(&pool, id).await?;
            let (media_state, mirrored) = store::media_of_run(&pool, id).await?;
            let chain = store::chain_place(&pool, id).await?;
            let mut shown = serde_json::to_value(&run)?;
            if json {
                shown["chain"] = serde_json::to_value(&chain)?;
                shown["media_state"] = serde_json::to_value(&media_state)?;
                shown["mirrored_outputs"] = serde_json::to_value(&mirrored)?;
                shown["files"] = serde_json::to_value(&files)?;
                shown["events"] = serde_json::to_value(events)?;
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                print_show(&shown, &events);
                print_files(media_state.as_deref(), &files);
                print_chain(&chain);
            }
        }
        Command::List { state, limit, json } => {
            let pool = connect(cli.config.as_deref()).await?;
            let runs = store::list_runs(&pool, state.as_deref(), limit).await?;
            for pause in store::paused_providers(&pool).await? {
                eprintln!("{}", wfq::terminal::pauses::pause_line(&pause));
            }
            if json {
                for run in &runs {
                    println!("{}", serde_json::to_string(run)?);
                }
            } else {
                print_list(&runs);
            }
        }
        Command::Cancel { id, reason } => {
            let (text, origin) = config_text(cli.config.as_deref())?;
            let stoppable: Vec<String> = wfq::config::ProviderKind::of_profiles(&text, &origin)?
                .into_iter()
                .filter(|(_, kind)| *kind == wfq::config::ProviderKind::Dify)
                .map(|(name, _)| name)
                .collect();
            let pool = connect(cli.config.as_deref()).await?;
            match store::cancel_run(&pool, id, reason.as_deref(), &stoppable).await? {
                store::CancelOutcome::Canceled => println!("run {id} canceled"),
                store::CancelOutcome::StopRequested => println!(
                    "run {id}: stop requested; the worker stops it at the provider and records `canceled` once it has stopped"
                ),
            }
        }
        Command::Retry { id } => {
            let (text, origin) = config_text(cli.config.as_deref())?;
            let unfindable: Vec<String> = wfq::config::ProviderKind::of_profiles(&text, &origin)?
                .into_iter()
                .filter(|(_, kind)| *kind == wfq::config::ProviderKind::Gptbots)
                .map(|(name, _)| name)
                .collect();
            let pool = connect(cli.config.as_deref()).await?;
            match store::retry_run(&pool, id, &unfindable).await? {
                store::RetryOutcome::NewRun(new_id) => {
                    eprintln!("run {new_id} repeats run {id} with a new idempotency key");
                    println!("{new_id}");
                }
                store::RetryOutcome::Resumed(id) => {
                    eprintln!(
                        "run {id} resumed with its own idempotency key: its money was not settled, so a new run could be charged twice"
                    );
                    println!("{id}");
                }
            }
        }
        Command::Prune {
            finished_before,
            batch,
        } => {
            let age = parse_duration(&finished_before)
                .map_err(|e| anyhow::anyhow!("--finished-before: {e}"))?;
            let pool = connect(cli.config.as_deref()).await?;
            let storage = load_storage(cli.config.as_deref())?.map(std::sync::Arc::new);
            if let Some(storage) = &storage {
                let files =
                    wfq::files::cli::prune_stored_files(&pool, storage, age, batch.max(1)).await?;
                println!("deleted {files} stored files of finished runs");
            }
            let deleted = store::prune_finished_runs(&pool, age, batch.max(1)).await?;
            println!("deleted {deleted} finished runs and their events");
            let kept = store::runs_kept_for_their_files(&pool, age).await?;
            if kept > 0 {
                eprintln!(
                    "{}",
                    wfq::files::cli::kept_for_files_warning(kept, storage.is_some())
                );
            }
        }
        Command::Top { once, interval } => {
            let interval =
                parse_duration(&interval).map_err(|e| anyhow::anyhow!("--interval: {e}"))?;
            let pool = connect(cli.config.as_deref()).await?;
            let mut stdout = std::io::stdout();
            let options = terminal::top::TopOptions {
                interval,
                once,
                terminal: std::io::IsTerminal::is_terminal(&stdout),
            };
            terminal::top::run_top(&pool, options, &mut stdout, shutdown_signal()).await?;
        }
        Command::Workers { json } => {
            let pool = connect(cli.config.as_deref()).await?;
            let workers = store::list_workers(&pool).await?;
            if json {
                for worker in &workers {
                    println!("{}", serde_json::to_string(worker)?);
                }
            } else {
                print_workers(&workers, chrono::Utc::now());
            }
        }
        Command::Media(MediaCommand::Get { id, key, out }) => {
            let Some(storage) = load_storage(cli.config.as_deref())? else {
                bail!(
                    "no [storage] in the configuration: nothing is mirrored, so there is nothing to get"
                );
            };
            let pool = connect(cli.config.as_deref()).await?;
            let written =
                wfq::files::cli::media_get(&pool, &storage, id, key.as_deref(), &out).await?;
            if written.is_empty() {
                bail!(
                    "run {id} has no stored outputs{}",
                    key.map(|k| format!(" under key {k}")).unwrap_or_default()
                );
            }
            for path in written {
                println!("{}", path.display());
            }
        }
        Command::Web { listen, read_only } => {
            let (text, origin) = config_text(cli.config.as_deref())?;
            wfq::web::run_standalone(
                &text,
                &origin,
                &ProcessEnvironment,
                listen.as_deref(),
                read_only,
                shutdown_signal(),
            )
            .await?;
        }
        Command::Sim(args) => run_sim(args).await?,
        Command::Demo => demo::run_demo().await?,
        Command::Bench(args) => wfq::bench::run(args).await?,
    }
    Ok(())
}

/// The configured file, or the built-in defaults when the default path does not exist.
fn config_text(path: Option<&Path>) -> Result<(String, String)> {
    let (path, explicit) = match path {
        Some(p) => (p.to_owned(), true),
        None => (PathBuf::from("worker.toml"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((text, path.display().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok((String::new(), "built-in defaults".to_owned()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `[storage]` of the configuration, opened (`None` without one).
fn load_storage(path: Option<&Path>) -> Result<Option<wfq::files::Storage>> {
    let (text, origin) = config_text(path)?;
    let Some(config) = wfq::files::cli::storage_from_toml(&text, &origin, &ProcessEnvironment)?
    else {
        return Ok(None);
    };
    Ok(Some(wfq::files::Storage::open(&config)?))
}

/// The files of a run, under its show table.
fn print_files(media_state: Option<&str>, files: &[store::RunFileRow]) {
    if media_state.is_none() && files.is_empty() {
        return;
    }
    println!();
    println!("media_state  {}", media_state.unwrap_or("-"));
    for f in files {
        let place = f
            .stored_location
            .as_deref()
            .or(f.provider_file_id.as_deref())
            .unwrap_or("-");
        let problem = match (&f.error_code, &f.error) {
            (Some(code), Some(error)) => format!("  {code}: {error}"),
            (Some(code), None) => format!("  {code}"),
            _ => String::new(),
        };
        println!(
            "{:<6} {}[{}]  {}  attempts={}  {}{}",
            f.direction, f.key, f.position, f.state, f.attempts, place, problem
        );
    }
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    let (text, origin) = config_text(path)?;
    Ok(Config::from_toml(&text, &origin, &ProcessEnvironment)?)
}

async fn connect(path: Option<&Path>) -> Result<sqlx::PgPool> {
    let (text, origin) = config_text(path)?;
    let database = DatabaseConfig::from_toml(&text, &origin, &ProcessEnvironment)?;
    store::connect(&database)
        .await
        .with_context(|| format!("connecting to {}", database.url))
}

fn parse_json(what: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("--{what} is not valid JSON"))
}

fn new_run(args: EnqueueArgs) -> Result<NewRun> {
    let inputs = parse_json("inputs", &args.inputs)?;
    if !inputs.is_object() {
        bail!("--inputs must be a JSON object, e.g. '{{\"n6_text\": \"a cat\"}}'");
    }
    let not_before = match args.not_before.as_deref() {
        None => None,
        Some(text) => Some(match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(at) => at.with_timezone(&chrono::Utc),
            Err(_) => {
                let delay = parse_duration(text).map_err(|e| {
                    anyhow::anyhow!("--not-before: neither an RFC 3339 time nor a duration: {e}")
                })?;
                chrono::Utc::now() + chrono::Duration::from_std(delay)?
            }
        }),
    };
    Ok(NewRun {
        provider: Some(args.provider),
        workflow_id: args.workflow,
        revision_id: args.revision,
        inputs,
        idempotency_key: args.idempotency_key,
        accept_external_cost_risk: args.accept_external_cost_risk,
        priority: args.priority,
        not_before,
        metadata: args
            .metadata
            .map(|m| parse_json("metadata", &m))
            .transpose()?,
        callback_url: args.callback_url,
        depends_on: args.after,
        on_dependency_failure: args.on_dependency_failure,
    })
}

/// The runs a shown run waits for and the runs that wait for it.
fn print_chain(chain: &store::ChainPlace) {
    if chain.is_empty() {
        return;
    }
    let rows: Vec<Vec<String>> = chain
        .waits_on
        .iter()
        .map(|l| ("waits for", l))
        .chain(chain.waited_on_by.iter().map(|l| ("waited for by", l)))
        .map(|(how, l)| {
            vec![
                how.to_owned(),
                l.id.to_string(),
                l.workflow_id.clone(),
                l.state.clone(),
                l.error_code.clone().unwrap_or_default(),
            ]
        })
        .collect();
    println!(
        "\n{}",
        table::render(&["chain", "run", "workflow", "state", "error"], &rows)
    );
}

/// A run as `field  value` lines (empty fields left out), then its events.
/// Outputs and the error message are shown whole: they are what one reads
/// `show` for (and what `enqueue --wait` prints).
fn print_show(run: &Value, events: &[store::EventRow]) {
    let fields: Vec<Vec<String>> = run
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let text = match k.as_str() {
                "outputs" | "error_message" => text,
                _ => table::truncate(&text, 100),
            };
            vec![k.clone(), text]
        })
        .collect();
    println!("{}\n", table::render(&["field", "value"], &fields));
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
                e.kind.clone(),
                format!(
                    "{} -> {}",
                    e.from_state.as_deref().unwrap_or("-"),
                    e.to_state.as_deref().unwrap_or("-")
                ),
                e.worker.clone().unwrap_or_default(),
                table::truncate(
                    &e.detail.as_ref().map(Value::to_string).unwrap_or_default(),
                    70,
                ),
            ]
        })
        .collect();
    println!(
        "{}",
        table::render(&["at", "event", "state", "worker", "detail"], &rows)
    );
}

fn print_workers(workers: &[store::WorkerRow], now: chrono::DateTime<chrono::Utc>) {
    let ago = |at: chrono::DateTime<chrono::Utc>| {
        let secs = (now - at).num_milliseconds().max(0) as f64 / 1000.0;
        match secs {
            s if s < 120.0 => format!("{s:.1}s ago"),
            s if s < 7200.0 => format!("{:.0}m ago", s / 60.0),
            s => format!("{:.1}h ago", s / 3600.0),
        }
    };
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                match (w.alive, &w.died_cause) {
                    (Some(true), _) => "alive".to_owned(),
                    (_, Some(cause)) => cause.clone(),
                    (Some(false), None) => "gone".to_owned(),
                    // No session liveness: only its heartbeat tells.
                    (None, None) => "no session".to_owned(),
                },
                w.runs_in_hand.to_string(),
                ago(w.last_seen),
                w.host.clone(),
                w.pid.to_string(),
                w.version.clone(),
                table::truncate(&w.profiles.join(","), 40),
                ago(w.started_at),
            ]
        })
        .collect();
    println!(
        "{}",
        table::render(
            &[
                "id",
                "state",
                "runs",
                "last seen",
                "host",
                "pid",
                "version",
                "profiles",
                "started"
            ],
            &rows
        )
    );
}

fn print_list(runs: &[store::RunRow]) {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.state.clone(),
                r.provider.clone(),
                table::truncate(&r.workflow_id, 28),
                format!("{}/{}", r.attempts, r.polls),
                table::truncate(r.provider_run_id.as_deref().unwrap_or("-"), 28),
                r.currency.clone().unwrap_or_else(|| "-".into()),
                amount(r.frozen_amount),
                // What was charged; Dify and GPTBots report only a total.
                amount(r.final_amount.or(r.total_cost)),
                match &r.error_code {
                    Some(code) => table::truncate(
                        &format!("{code}: {}", r.error_message.as_deref().unwrap_or("")),
                        60,
                    ),
                    None => String::new(),
                },
            ]
        })
        .collect();
    println!(
        "{}",
        table::render(
            &[
                "id",
                "state",
                "provider",
                "workflow",
                "tries/polls",
                "provider run",
                "currency",
                "frozen",
                "final",
                "error"
            ],
            &rows
        )
    );
}

/// `wfq enqueue --wait`: follows run `id` with a progress line on stderr,
/// prints the final run on stdout and exits with its outcome (0 succeeded,
/// 2 failed, 3 canceled, 130 when Ctrl-C ended the wait).
async fn wait_for_run(
    config: Option<&Path>,
    pool: &sqlx::PgPool,
    id: i64,
    provider: &str,
    json: bool,
) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let mut stderr = std::io::stderr();
    let is_terminal = stderr.is_terminal();
    eprintln!("run {id} enqueued; waiting until it is final (Ctrl-C stops the wait, not the run)");
    // Progress needs the profile's key; without it the state alone is shown.
    let client =
        match config_text(config)
            .map_err(|e| format!("{e:#}"))
            .and_then(|(text, origin)| {
                terminal::wait::progress_client(&text, &origin, provider, &ProcessEnvironment)
            }) {
            Ok(client) => client,
            Err(why) => {
                eprintln!("note: no progress from the provider ({why}); showing the state only");
                None
            }
        };
    let end = terminal::wait::follow_run(
        pool,
        id,
        client.as_ref(),
        &mut stderr,
        is_terminal,
        shutdown_signal(),
    )
    .await?;
    let run = match end {
        terminal::wait::WaitEnd::Final(run) => run,
        terminal::wait::WaitEnd::Interrupted(run) => {
            eprintln!(
                "stopped waiting: run {id} is {} and goes on; `wfq show {id}` shows it later",
                run.state
            );
            std::process::exit(130);
        }
    };
    let events = store::run_events(pool, id).await?;
    let mut shown = serde_json::to_value(&run)?;
    if json {
        shown["events"] = serde_json::to_value(events)?;
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        print_show(&shown, &events);
    }
    let code = match run.state.as_str() {
        "succeeded" => return Ok(()),
        "canceled" => 3,
        _ => 2,
    };
    std::io::stdout().flush()?;
    std::process::exit(code);
}

fn amount(value: Option<rust_decimal::Decimal>) -> String {
    value.map_or_else(|| "-".to_owned(), |d| d.to_string())
}

async fn run_sim(args: SimArgs) -> Result<()> {
    let duration = |flag: &str, text: &str| -> Result<Duration> {
        parse_duration(text).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    let api_key = match args.api_key_env {
        Some(var) => {
            Some(std::env::var(&var).with_context(|| format!("--api-key-env: {var} is not set"))?)
        }
        None => None,
    };
    let config = sim::SimConfig {
        queue_time: duration("queue-time", &args.queue_time)?,
        run_time: duration("run-time", &args.run_time)?,
        settle_delay: duration("settle-delay", &args.settle_delay)?,
        api_key,
    };
    let addr = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?
        .next()
        .with_context(|| format!("--listen {}: no address", args.listen))?;
    let server = sim::SimServer::start(addr, config)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    server.set_faults(sim::Faults {
        error_rate: args.error_rate,
        rate_limit_rate: args.rate_limit_rate,
        retry_after_secs: args.retry_after,
        latency: duration("latency", &args.latency)?,
        drop_after_submit_rate: args.drop_after_submit_rate,
        rate_limit_rps: args.rate_limit_rps,
        rate_limit_mode: args.rate_limit_mode,
        rate_limit_burst: args.rate_limit_burst,
        max_running_runs: args.max_running,
        ..Default::default()
    });
    server.set_balance(args.balance);
    println!("chenyu simulator at {}", server.base_url());
    println!(
        "dify at {} (apps: text, fails, partial)",
        server.dify_base_url("{app}")
    );
    println!(
        "gptbots at {} (workflows: news, fails)",
        server.gptbots_base_url("{workflow}")
    );
    println!(
        "admin: http://{}/_sim/ledger, /_sim/dify/ledger, /_sim/gptbots/ledger, /_sim/stats, /_sim/faults (GET, PUT), /_sim/balance (GET, PUT), /_sim/balance/top_up (POST)",
        server.local_addr()
    );
    shutdown_signal().await;
    server.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
