//! The core's own settings, with their defaults and the reason for each. The server's
//! `ServerConfig` wraps this with what only a network listener needs (address, connection caps,
//! request timeouts, body sizes); `kiln serve`'s flags, environment and `kiln.toml` fill both.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub data_dir: PathBuf,
    /// Where metadata, the async queue and the logs live: a SQLite file (`None`: `kiln.db` in the
    /// data directory) or a `postgres://` URL several nodes share.
    pub database: Option<String>,
    /// With PostgreSQL, how long an async invocation a node claimed stays its own without a
    /// renewal (renewed every third of it): how soon another node runs again what a dead node
    /// was running. Shorter means faster recovery and more renewals.
    pub async_lease: Duration,
    /// Where blobs (artifacts, large async results, sandbox states) live: `file://DIR`, a
    /// directory nodes may share (`None`: the data directory).
    pub blob_store: Option<String>,
    /// The URL this server is reached at, the `iss` of the identity tokens it signs
    /// (`--public-url`; the server's default is `http://<listen address>`).
    pub public_url: String,
    /// The one sizing number of the instance pool: how many guest instances may be alive at once,
    /// across all functions. Every pool dimension (memories, tables, stacks) derives from it, and it
    /// is also the global concurrency cap (past it invocations are refused).
    pub max_instances: u32,
    /// Asynchronous invocations waiting to run; past it submits are refused.
    pub max_queued: u64,
    /// Asynchronous invocations running at once.
    pub async_workers: usize,
    /// How long finished asynchronous invocations (and their results) are kept.
    pub retention: Duration,
    /// Logs of synchronous invocations kept at most (the newest); older ones also go after
    /// `retention`. 100k entries of at most 4 KiB stderr each bound the table to ~400 MiB.
    pub max_kept_logs: u64,
    /// Where the admin token comes from when `KILN_ADMIN_TOKEN` is set.
    pub admin_token: Option<String>,
    /// The microvm tier's guest kernel: Debian's cloud bzImage or its ELF `vmlinux`. Without it
    /// (and the agent) the tier is unavailable.
    pub microvm_kernel: Option<PathBuf>,
    /// The microvm tier's guest agent: the static `kiln-agent` executable, `/init` of every guest.
    pub microvm_agent: Option<PathBuf>,
    /// Sandboxes running at once (each holds a live instance); past it creating or resuming one
    /// is refused (`too_many_requests`).
    pub max_sandboxes: u32,
    /// Free bytes the data directory's file system keeps: deploys and asynchronous submits that
    /// would go below it are refused (`insufficient_storage`), so the database can still commit.
    pub min_free_bytes: u64,
    /// The data directory's size at most (`None`: no cap but the free-space floor).
    pub max_data_bytes: Option<u64>,
    /// MicroVMs running at once, across all functions; past it invocations are refused. Each holds a
    /// thread (its vCPU) and up to its function's `memory_mb` of RAM.
    pub microvm_max_vms: u32,
    /// Jailed VM helpers kept started and waiting (each still runs one VM, then exits): takes the
    /// helper's start-up — exec, namespaces, KVM — off the invocation's path. 0 starts one per VM.
    pub microvm_prestart: usize,
    /// The language runtimes of functions from source (`tier::wasm::source`):
    /// `{ruby,python,javascript}.wasm` and `python-lib/`. The default is `../kiln-runtimes` beside
    /// the executable when it exists (`target/kiln-runtimes` in a checkout, where
    /// `guests/runtimes/build.sh` builds them); without it, deploys from source are refused.
    pub runtimes_dir: Option<PathBuf>,
}

impl CoreConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        CoreConfig {
            data_dir,
            database: None,
            async_lease: Duration::from_secs(30),
            blob_store: None,
            public_url: "http://127.0.0.1:7878".to_owned(),
            max_instances: 1000,
            max_queued: 10_000,
            async_workers: 64,
            retention: Duration::from_secs(7 * 24 * 3600),
            max_kept_logs: 100_000,
            admin_token: None,
            max_sandboxes: 100,
            min_free_bytes: 256 << 20,
            max_data_bytes: None,
            microvm_kernel: None,
            microvm_agent: None,
            microvm_max_vms: 32,
            microvm_prestart: 2,
            runtimes_dir: default_runtimes_dir(),
        }
    }
}

/// `../kiln-runtimes` beside the running executable, if it is there.
fn default_runtimes_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?.join("kiln-runtimes");
    dir.is_dir().then_some(dir)
}
