//! Configuration: the server's own settings (flags of `kiln serve`) and each function's deploy-time
//! config (the JSON of `../shared/API.md`). Every default lives here, next to the reason for it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const MIB: u64 = 1 << 20;

/// Settings of one `kiln serve` process.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The one sizing number of the instance pool: how many guest instances may be alive at once,
    /// across all functions. Every pool dimension (memories, tables, stacks) derives from it, and it
    /// is also the global concurrency cap (past it invocations get 429).
    pub max_instances: u32,
    /// Largest artifact a deploy accepts (code and config together).
    pub max_code_bytes: u64,
    /// Largest body a synchronous invoke accepts.
    pub max_sync_input_bytes: u64,
    /// Open connections at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time a client gets to send a request's headers (slowloris guard).
    pub header_read_timeout: Duration,
    /// Largest body an asynchronous invoke accepts.
    pub max_async_input_bytes: u64,
    /// Asynchronous invocations waiting to run; past it submits get 429.
    pub max_queued: u64,
    /// Asynchronous invocations running at once.
    pub async_workers: usize,
    /// How long finished asynchronous invocations (and their results) are kept.
    pub retention: Duration,
    /// Time a client gets to send a whole request body.
    pub body_read_timeout: Duration,
    /// How long shutdown waits for in-flight requests before closing connections.
    pub shutdown_grace: Duration,
    /// Where the admin token comes from when `KILN_ADMIN_TOKEN` is set.
    pub admin_token: Option<String>,
    /// Logs of synchronous invocations kept at most (the newest); older ones also go after
    /// `retention`. 100k entries of at most 4 KiB stderr each bound the table to ~400 MiB.
    pub max_kept_logs: u64,
    /// The microvm tier's guest kernel: Debian's cloud bzImage or its ELF `vmlinux`. Without it
    /// (and the agent) the tier is unavailable.
    pub microvm_kernel: Option<PathBuf>,
    /// The microvm tier's guest agent: the static `kiln-agent` executable, `/init` of every guest.
    pub microvm_agent: Option<PathBuf>,
    /// MicroVMs running at once, across all functions; past it invocations get 429. Each holds a
    /// thread (its vCPU) and up to its function's `memory_mb` of RAM.
    pub microvm_max_vms: u32,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            listen,
            data_dir,
            max_instances: 1000,
            max_code_bytes: 64 * MIB,
            max_sync_input_bytes: 6 * MIB,
            max_async_input_bytes: MIB,
            max_queued: 10_000,
            async_workers: 64,
            retention: Duration::from_secs(7 * 24 * 3600),
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            admin_token: None,
            max_kept_logs: 100_000,
            microvm_kernel: None,
            microvm_agent: None,
            microvm_max_vms: 32,
        }
    }
}

/// Upper bounds a function's config may ask for. They keep one function from reserving the host.
pub const MAX_TIMEOUT_MS: u64 = 15 * 60 * 1000;
pub const MAX_MEMORY_MB: u64 = 4096;
pub const MAX_ENV_VARS: usize = 256;
pub const MAX_RETRIES: u32 = 10;
pub const MAX_ALLOWED_HOSTS: usize = 256;
pub const MAX_ENV_BYTES: usize = 64 * 1024;

/// Which isolation tier runs the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    #[default]
    Wasm,
    Microvm,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Wasm => "wasm",
            Tier::Microvm => "microvm",
        }
    }
}

/// A function's config as the deploy request gives it. Every field is optional on the wire; the
/// stored form has every default filled in, so a version's record says exactly what it runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionConfig {
    pub tier: Tier,
    /// Wall-clock limit of one invocation, guest code and host calls together.
    pub timeout_ms: u64,
    /// Linear-memory limit of one instance (all its memories together).
    pub memory_mb: u64,
    /// Invocations of this function running at once; the next one gets 429.
    pub max_concurrency: u32,
    /// Environment variables the guest sees; nothing of the host's environment leaks in.
    pub env: BTreeMap<String, String>,
    /// Outbound HTTP destinations a component may call (HTTP-trigger functions).
    pub allowed_hosts: Vec<String>,
    /// Serve the HTTP trigger without a bearer token.
    pub public: bool,
    /// Times a failed asynchronous invocation is run again (with exponential backoff).
    pub retries: u32,
}

impl Default for FunctionConfig {
    fn default() -> Self {
        FunctionConfig {
            tier: Tier::Wasm,
            timeout_ms: 10_000,
            memory_mb: 128,
            max_concurrency: 64,
            env: BTreeMap::new(),
            allowed_hosts: Vec::new(),
            public: false,
            retries: 2,
        }
    }
}

impl FunctionConfig {
    /// Parses and checks a config document; the error text is shown to the user as is.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let config: FunctionConfig = serde_json::from_slice(bytes).map_err(|e| format!("config is not valid: {e}"))?;
        config.check()?;
        Ok(config)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!("timeout_ms must be between 1 and {MAX_TIMEOUT_MS}"));
        }
        if self.memory_mb == 0 || self.memory_mb > MAX_MEMORY_MB {
            return Err(format!("memory_mb must be between 1 and {MAX_MEMORY_MB}"));
        }
        if self.retries > MAX_RETRIES {
            return Err(format!("retries must be at most {MAX_RETRIES}"));
        }
        if self.max_concurrency == 0 {
            return Err("max_concurrency must be at least 1".into());
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(format!("env has more than {MAX_ENV_VARS} variables"));
        }
        let env_bytes: usize = self.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > MAX_ENV_BYTES {
            return Err(format!("env is larger than {MAX_ENV_BYTES} bytes"));
        }
        for key in self.env.keys() {
            let valid = !key.is_empty()
                && !key.contains('=')
                && !key.contains('\0')
                && !key.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(format!("env key {key:?} is not a valid variable name"));
            }
        }
        if self.env.values().any(|v| v.contains('\0')) {
            return Err("env values must not contain NUL bytes".into());
        }
        if self.allowed_hosts.len() > MAX_ALLOWED_HOSTS {
            return Err(format!("at most {MAX_ALLOWED_HOSTS} allowed_hosts entries"));
        }
        crate::egress::Egress::new(&self.allowed_hosts)?;
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn memory_bytes(&self) -> usize {
        (self.memory_mb * MIB) as usize
    }
}

/// Output caps of one invocation. The body cap matches the sync input cap (Lambda's 6 MB); stderr
/// is a log, kept short so a flood cannot grow the host.
pub const STDOUT_CAP: usize = 6 * MIB as usize;
pub const STDERR_CAP: usize = 64 * 1024;

/// `^[a-z0-9][a-z0-9_-]{0,63}$`, checked before a name touches a path or a query.
pub fn is_valid_function_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && matches!(bytes[0], b'a'..=b'z' | b'0'..=b'9')
        && bytes[1..]
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "hello", "0x", "a-b_c", &"a".repeat(64)] {
            assert!(is_valid_function_name(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", "A", "a.b", "a/b", "..", "a b", &"a".repeat(65), "é"] {
            assert!(!is_valid_function_name(bad), "{bad}");
        }
    }

    #[test]
    fn config_defaults_and_checks() {
        let c = FunctionConfig::from_json(b"{}").unwrap();
        assert_eq!(c, FunctionConfig::default());
        let c = FunctionConfig::from_json(br#"{"timeout_ms": 50, "env": {"A": "1"}}"#).unwrap();
        assert_eq!(c.timeout_ms, 50);
        assert!(FunctionConfig::from_json(br#"{"timeout_ms": 0}"#).is_err());
        assert!(FunctionConfig::from_json(br#"{"memory_mb": 100000}"#).is_err());
        assert!(FunctionConfig::from_json(br#"{"bogus": 1}"#).is_err());
        assert!(FunctionConfig::from_json(br#"{"env": {"A=B": "1"}}"#).is_err());
        assert!(FunctionConfig::from_json(br#"{"allowed_hosts": ["ftp://x"]}"#).is_err());
        assert!(FunctionConfig::from_json(b"not json").is_err());
    }
}
