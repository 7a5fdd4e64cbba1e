//! A throwaway PostgreSQL server for tests: Debian's binaries, a fresh cluster in a temporary
//! directory, listening on loopback only, run as the `postgres` user (it refuses root).
//!
//! The server runs under a small `sh` guard whose standard input is a pipe from this process:
//! when the pipe closes — [`Postgres`] dropped, or the test process gone, even by `kill -9` — the
//! guard stops the server (fast shutdown) and removes the directory. So a shared server kept in
//! a `static`, which Rust never drops, is not left running either.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running server, stopped when dropped.
pub struct Postgres {
    guard: Child,
    stdin: Option<ChildStdin>,
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb`, if PostgreSQL is installed.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// `program args...`, as the `postgres` user when we are root.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Postgres {
    /// Creates a cluster and starts it; `Err` says why PostgreSQL cannot run here (the caller
    /// skips with that reason).
    pub fn start() -> Result<Postgres, String> {
        let bin = bin_dir().ok_or("PostgreSQL is not installed (apt-get install postgresql)")?;
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-pg-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        if is_root() {
            let chown = Command::new("chown").arg("postgres:postgres").arg(&dir).status();
            if !chown.is_ok_and(|s| s.success()) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err("cannot give the temporary directory to the `postgres` user".into());
            }
        }
        let data = dir.join("data");
        let init = as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !init.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&init.stderr)));
        }
        let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
        // `exec`-less on purpose: the guard waits for the server, then removes the directory.
        let script = format!(
            "{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c max_connections=400 -c shared_buffers=32MB >{dir}/log 2>&1 & pid=$!; \
             cat >/dev/null; kill -INT $pid; wait $pid; rm -rf {dir}",
            postgres = bin.join("postgres").display(),
            data = data.display(),
            dir = dir.display(),
        );
        let mut guard = as_postgres(Path::new("sh"))
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        let stdin = guard.stdin.take();
        let server = Postgres {
            guard,
            stdin,
            bin,
            dir,
            port,
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// A server shared by every test of this process (stopped when the process exits), or why
    /// there is none.
    pub fn shared() -> Result<&'static Postgres, String> {
        static SHARED: OnceLock<Result<Postgres, String>> = OnceLock::new();
        SHARED.get_or_init(Postgres::start).as_ref().map_err(Clone::clone)
    }

    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status();
            if ready.is_ok_and(|s| s.success()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        Err(format!(
            "postgres did not accept connections within 60 s; its log:\n{log}"
        ))
    }

    /// Runs one SQL statement as the superuser.
    pub fn sql(&self, database: &str, statement: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .args(["-p", &self.port.to_string(), "-d", database, "-c", statement])
            .output()
            .map_err(|e| format!("running psql: {e}"))?;
        if !out.status.success() {
            return Err(format!("{statement}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self) -> Result<String, String> {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let name = format!("kiln_{}_{}", std::process::id(), COUNT.fetch_add(1, Ordering::Relaxed));
        self.sql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Closing the pipe tells the guard to stop the server and clean up.
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.guard.wait();
    }
}
