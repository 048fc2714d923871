//! The worker under test, as users run it: a `wfq worker` child process
//! with its own configuration file, logging to a file.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::process::{Child, Command};

use super::{BenchError, Plan};
use crate::sim::{SimConfig, SimServer};

/// The bearer token the bench's simulators accept.
pub(crate) const API_KEY: &str = "bench-key-not-secret";
const API_KEY_ENV: &str = "WFQ_BENCH_KEY";

/// The `wfq` binary that runs `wfq bench` also runs the worker.
pub(crate) fn worker_exe() -> Result<PathBuf, BenchError> {
    Ok(std::env::current_exe()?)
}

/// A simulator with these phase times, on a free loopback port.
pub(crate) async fn start_sim(
    queue: Duration,
    run: Duration,
    settle: Duration,
) -> Result<SimServer, BenchError> {
    Ok(SimServer::start(
        "127.0.0.1:0".parse().expect("a valid socket address"),
        SimConfig {
            queue_time: queue,
            run_time: run,
            settle_delay: settle,
            api_key: Some(API_KEY.to_owned()),
        },
    )
    .await?)
}

/// A running `wfq worker` child.
pub(crate) struct WorkerProcess {
    child: Child,
    pid: u32,
    log: PathBuf,
    _dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl WorkerProcess {
    /// Starts a worker against `sim` with `poll` as its `[poll]` table body
    /// (e.g. `initial = "10ms"`), and waits until it listens.
    pub async fn start(
        plan: &Plan,
        url: &str,
        pool: &PgPool,
        sim: &SimServer,
        poll: &str,
    ) -> Result<WorkerProcess, BenchError> {
        Self::start_with(plan, url, pool, sim, poll, "").await
    }

    /// [`WorkerProcess::start`] with more keys for the chenyu profile
    /// (e.g. `requests_per_second = 50`).
    pub async fn start_with(
        plan: &Plan,
        url: &str,
        pool: &PgPool,
        sim: &SimServer,
        poll: &str,
        profile: &str,
    ) -> Result<WorkerProcess, BenchError> {
        let dir = std::env::temp_dir().join(format!(
            "wfq-bench-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        let config = dir.0.join("worker.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[database]
max_connections = {pool_size}
[worker]
concurrency = {concurrency}
fallback_poll = "1s"
shutdown_grace = "2s"
[poll]
{poll}
[providers.chenyu]
kind = "chenyu"
base_url = "{base}"
api_key_env = "{API_KEY_ENV}"
{profile}
"#,
                pool_size = plan.args.max_connections,
                concurrency = plan.args.concurrency,
                base = sim.base_url(),
            ),
        )?;
        let log = dir.0.join("worker.log");
        let child = Command::new(worker_exe()?)
            .arg("worker")
            .arg("--config")
            .arg(&config)
            .env("WFQ_DATABASE_URL", url)
            .env(API_KEY_ENV, API_KEY)
            .env_remove("WFQ_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Failed("the worker exited at once".into()))?;
        let mut worker = WorkerProcess {
            child,
            pid,
            log,
            _dir: dir,
        };
        worker.wait_listening(pool).await?;
        Ok(worker)
    }

    async fn wait_listening(&mut self, pool: &PgPool) -> Result<(), BenchError> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(BenchError::Failed(format!(
                    "the worker exited with {status}: {}",
                    self.log_tail()
                )));
            }
            let listening: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname = current_database() AND query LIKE 'LISTEN%')",
            )
            .fetch_one(pool)
            .await?;
            if listening {
                // The first claim after start finds nothing and the loop
                // goes to sleep on LISTEN: let it get there.
                tokio::time::sleep(Duration::from_millis(300)).await;
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(15) {
                return Err(BenchError::Failed(format!(
                    "the worker did not LISTEN within 15 s: {}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the worker is registered in `wfq.workers` and its
    /// liveness session holds its lock; returns its worker id.
    pub async fn wait_registered(&mut self, pool: &PgPool) -> Result<String, BenchError> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let id: Option<String> = sqlx::query_scalar(
                "SELECT id FROM wfq.workers_live WHERE pid = $1 AND alive AND died_at IS NULL",
            )
            .bind(self.pid as i32)
            .fetch_optional(pool)
            .await?;
            if let Some(id) = id {
                return Ok(id);
            }
            if started.elapsed() > Duration::from_secs(15) {
                return Err(BenchError::Failed(format!(
                    "the worker did not register within 15 s: {}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(mut self) -> Result<(), BenchError> {
        self.child.kill().await?;
        Ok(())
    }

    /// VmRSS of the worker in kB.
    pub fn rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Fails when the worker has died.
    pub fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(BenchError::Failed(format!(
                "the worker exited with {status}: {}",
                self.log_tail()
            ))),
        }
    }

    /// Everything the worker logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        Ok(())
    }
}
