//! A throw-away PostgreSQL cluster in a temporary directory, for `wfq demo`
//! on a machine where no server runs. Stopped and deleted on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why no scratch cluster could be started.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    /// No `initdb` was found.
    #[error("no PostgreSQL server binaries (initdb) found in /usr/lib/postgresql/*/bin or on PATH")]
    NoBinaries,
    /// A step failed.
    #[error("{step} failed: {detail}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// Its output.
        detail: String,
    },
}

/// A running scratch cluster.
#[derive(Debug)]
pub struct ScratchCluster {
    dir: PathBuf,
    bindir: PathBuf,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub url: String,
}

/// The newest installed server binaries.
pub fn find_bindir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().or_else(|| {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).find(|p| p.join("initdb").is_file()))
    })
}

fn is_root() -> bool {
    // The real uid from /proc, which spares a libc dependency for one call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// initdb and pg_ctl refuse to run as root; run them as `postgres` then.
fn command(bindir: &Path, program: &str) -> Command {
    let path = bindir.join(program);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path).current_dir("/");
        c
    } else {
        Command::new(path)
    }
}

fn run(step: &'static str, mut c: Command) -> Result<(), ScratchError> {
    let out = c.output().map_err(|e| ScratchError::Step {
        step,
        detail: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(ScratchError::Step {
        step,
        detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

impl ScratchCluster {
    /// initdb + pg_ctl start on a free port; blocks until it accepts connections.
    pub fn start() -> Result<ScratchCluster, ScratchError> {
        let bindir = find_bindir().ok_or(ScratchError::NoBinaries)?;
        let dir = std::env::temp_dir().join(format!("wfq-demo-pg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| ScratchError::Step {
            step: "creating the data directory",
            detail: e.to_string(),
        })?;
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:").arg(&dir);
            run("chown", chown)?;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| ScratchError::Step {
                step: "finding a free port",
                detail: e.to_string(),
            })?;
        let cluster = ScratchCluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir: dir.clone(),
            bindir: bindir.clone(),
        };
        let data = dir.join("data");
        let mut initdb = command(&bindir, "initdb");
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        run("initdb", initdb)?;
        let mut start = command(&bindir, "pg_ctl");
        start
            .arg("start")
            .arg("-D")
            .arg(&data)
            .args(["-w", "-t", "60", "-s", "-l"])
            .arg(dir.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.display()
            ));
        // Not `output()`: the server inherits pg_ctl's pipes, so reading
        // them to the end would wait for the server to exit. The server's
        // own messages go to server.log, which is what a failure shows.
        let started = start
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| ScratchError::Step {
                step: "pg_ctl start",
                detail: e.to_string(),
            })?;
        if !started.success() {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            return Err(ScratchError::Step {
                step: "pg_ctl start",
                detail: log.lines().last().unwrap_or("no server log").to_owned(),
            });
        }
        Ok(cluster)
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        let mut stop = command(&self.bindir, "pg_ctl");
        stop.arg("stop")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-s"]);
        let _ = stop.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
