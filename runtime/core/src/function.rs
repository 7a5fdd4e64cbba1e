//! A function as deployed: its config (the JSON of `../shared/API.md`, every default filled in
//! and checked here, next to the reason for it), the kind of code it runs, and the rule for names.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

const MIB: u64 = 1 << 20;

/// What kind of artifact a version runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    /// A core module, WASI preview 1 command (`_start`).
    Module,
    /// A component targeting `wasi:cli/command` (exports `wasi:cli/run`).
    Component,
    /// A static x86_64 Linux executable, run by the microvm tier (see `crate::tier::microvm`).
    Native,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Module => "module",
            ArtifactKind::Component => "component",
            ArtifactKind::Native => "native",
        }
    }

    pub fn parse(s: &str) -> Option<ArtifactKind> {
        match s {
            "module" => Some(ArtifactKind::Module),
            "component" => Some(ArtifactKind::Component),
            "native" => Some(ArtifactKind::Native),
            _ => None,
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

    pub fn parse(text: &str) -> Option<Tier> {
        match text {
            "wasm" => Some(Tier::Wasm),
            "microvm" => Some(Tier::Microvm),
            _ => None,
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
    /// Invocations of this function running at once; the next one is refused (`too_many_requests`).
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
        crate::tier::wasm::egress::check_allowed_hosts(&self.allowed_hosts)?;
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn memory_bytes(&self) -> usize {
        (self.memory_mb * MIB) as usize
    }
}

/// One deployed version of a function, as stored.
#[derive(Debug, Clone)]
pub struct VersionRecord {
    pub name: String,
    pub version: u32,
    /// SHA-256 of the upload (in binary form).
    pub digest: Digest,
    /// SHA-256 of the code that runs: the init-hook snapshot, or the upload itself.
    pub code_digest: Digest,
    pub kind: ArtifactKind,
    pub config: FunctionConfig,
    pub created_at: String,
}

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
