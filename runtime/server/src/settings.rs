//! Settings of `kiln serve` from three sources, in order of precedence: command-line flags, then
//! `KILN_*` environment variables, then a TOML file, then the defaults of [`ServerConfig`] and
//! `CoreConfig`.
//!
//! The file is `--config PATH` (`KILN_CONFIG`) if given, which must exist; otherwise
//! `<data>/kiln.toml` if it exists. Its keys are the flags' names with `_` for `-`; an unknown key
//! is an error, so a typo does not silently fall back to a default. The admin token is not a
//! setting of the file: it comes from `KILN_ADMIN_TOKEN` or `<data>/admin.token` only.
//!
//! One struct serves both clap and serde, so a new setting cannot be added to one and not the
//! other; every field is an `Option` so that "not given" can fall through to the next source.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::ServerConfig;

/// Where the data directory is when no source names it.
pub const DEFAULT_DATA: &str = "./kiln-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
}

#[derive(clap::Args, Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    /// TOML file of settings [default: <data>/kiln.toml when it exists].
    #[arg(long, env = "KILN_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on (HTTP/1.1 and h2c; HTTPS with --tls-cert) [default: 127.0.0.1:7878].
    #[arg(long, env = "KILN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this PEM certificate chain, leaf first;
    /// needs --tls-key. Both files are read again on SIGHUP [default: plain HTTP].
    #[arg(long, env = "KILN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "KILN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The URL clients reach this server at (scheme, host, port, optional path): the `iss` of
    /// guests' identity tokens, whose keys are at `<URL>/.well-known/jwks.json`
    /// [default: http://<listen address>].
    #[arg(long, env = "KILN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Data directory: database, artifacts, compiled code, admin token [default: ./kiln-data].
    #[arg(long, env = "KILN_DATA")]
    pub data: Option<PathBuf>,
    /// Where functions, versions, tokens, sandboxes' records, the async queue and logs live: a
    /// SQLite file's path, or `postgres://USER@HOST:PORT/DB` for a database several nodes share
    /// [default: <data>/kiln.db].
    #[arg(long, env = "KILN_DATABASE_URL")]
    pub database: Option<String>,
    /// With PostgreSQL: how long an async invocation a node claimed stays its own without a renewal,
    /// so how soon another node runs again what a dead node was running [default: 30000].
    #[arg(long, env = "KILN_ASYNC_LEASE_MS")]
    pub async_lease_ms: Option<u64>,
    /// Where artifacts, large async results and sandbox states live: `file://DIR`, a directory
    /// several nodes may share [default: the data directory].
    #[arg(long, env = "KILN_BLOB_STORE")]
    pub blob_store: Option<String>,
    /// Guest instances alive at once, across all functions; sizes the instance pool and is the
    /// global concurrency cap [default: 1000].
    #[arg(long, env = "KILN_MAX_INSTANCES")]
    pub max_instances: Option<u32>,
    /// Asynchronous invocations waiting to run at most; past it submits get 429 [default: 10000].
    #[arg(long, env = "KILN_MAX_QUEUED")]
    pub max_queued: Option<u64>,
    /// Sandboxes running at once (live instances); past it creating or resuming one is 429
    /// [default: 100].
    #[arg(long, env = "KILN_MAX_SANDBOXES")]
    pub max_sandboxes: Option<u32>,
    /// Asynchronous invocations running at once; 0 accepts asynchronous invocations without
    /// running them [default: 64].
    #[arg(long, env = "KILN_ASYNC_WORKERS")]
    pub async_workers: Option<usize>,
    /// Largest deploy upload, in bytes [default: 64 MiB].
    #[arg(long, env = "KILN_MAX_CODE_BYTES")]
    pub max_code_bytes: Option<u64>,
    /// Largest synchronous invoke body, in bytes [default: 6 MiB].
    #[arg(long, env = "KILN_MAX_SYNC_INPUT_BYTES")]
    pub max_sync_input_bytes: Option<u64>,
    /// Largest asynchronous invoke body, in bytes [default: 1 MiB].
    #[arg(long, env = "KILN_MAX_ASYNC_INPUT_BYTES")]
    pub max_async_input_bytes: Option<u64>,
    /// Open connections at once; at the cap a new connection takes the slot of the oldest idle
    /// one, or waits in the kernel's accept queue while all are busy; lowered at start-up to fit
    /// the open-file limit [default: 10000].
    #[arg(long, env = "KILN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open connections from one client address at once; at it, that address's oldest idle
    /// connection makes room, or the new one is refused [default: a quarter of --max-connections].
    #[arg(long, env = "KILN_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Time a client gets from connecting (or from the end of its last HTTP/1.1 request) to a
    /// complete request head, on HTTP/1.1 and HTTP/2 alike [default: 10000].
    #[arg(long, env = "KILN_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// Time a connection with no request in progress stays open after its last request (HTTP/2
    /// with no open stream) [default: 60000].
    #[arg(long, env = "KILN_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Time a client gets to send a whole request body [default: 60000].
    #[arg(long, env = "KILN_BODY_READ_TIMEOUT_MS")]
    pub body_read_timeout_ms: Option<u64>,
    /// How long shutdown waits for in-flight requests [default: 30000].
    #[arg(long, env = "KILN_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// How long finished invocations, their results and logs are kept, in seconds [default: 604800].
    #[arg(long, env = "KILN_RETENTION_SECS")]
    pub retention_secs: Option<u64>,
    /// Request-body bytes held in memory at once, all requests together; past it requests get 503
    /// [default: 1 GiB].
    #[arg(long, env = "KILN_MAX_BODY_BUFFER_BYTES")]
    pub max_body_buffer_bytes: Option<u64>,
    /// Free bytes the data directory's file system keeps; deploys and asynchronous submits that
    /// would go below it get 507 [default: 256 MiB].
    #[arg(long, env = "KILN_MIN_FREE_BYTES")]
    pub min_free_bytes: Option<u64>,
    /// The data directory's size at most; deploys and asynchronous submits past it get 507
    /// [default: no cap].
    #[arg(long, env = "KILN_MAX_DATA_BYTES")]
    pub max_data_bytes: Option<u64>,
    /// Logs of synchronous invocations kept at most (the newest) [default: 100000].
    #[arg(long, env = "KILN_MAX_KEPT_LOGS")]
    pub max_kept_logs: Option<u64>,
    /// The microvm tier's guest kernel (a bzImage or ELF vmlinux; `runtime/vmm/scripts/guest-kernel.sh`
    /// fetches Debian's) [default: none: the tier is unavailable].
    #[arg(long, env = "KILN_MICROVM_KERNEL")]
    pub microvm_kernel: Option<PathBuf>,
    /// The microvm tier's guest agent, the static `kiln-agent` executable [default: none].
    #[arg(long, env = "KILN_MICROVM_AGENT")]
    pub microvm_agent: Option<PathBuf>,
    /// MicroVMs running at once, across all functions; past it invocations get 429 [default: 32].
    #[arg(long, env = "KILN_MICROVM_MAX_VMS")]
    pub microvm_max_vms: Option<u32>,
    /// Jailed microVM helpers kept started, ready for the next VM; 0 starts one per VM [default: 2].
    #[arg(long, env = "KILN_MICROVM_PRESTART")]
    pub microvm_prestart: Option<usize>,
    /// Where the language runtimes of functions from source are (`{ruby,python,javascript}.wasm`,
    /// built by `guests/runtimes/build.sh install`) [default: `../kiln-runtimes` beside the `kiln`
    /// executable when it exists — `target/kiln-runtimes` in a checkout; otherwise none, and
    /// deploys from source answer 503].
    #[arg(long, env = "KILN_RUNTIMES_DIR")]
    pub runtimes_dir: Option<PathBuf>,
    /// Log line format [default: text].
    #[arg(long, env = "KILN_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

impl ServeSettings {
    /// Fills what flags and env left unset from the config file, then from the defaults.
    pub fn resolve(self) -> Result<(ServerConfig, LogFormat), SettingsError> {
        let file = match &self.config {
            Some(path) => Some(read_file(path)?),
            None => {
                let data = self.data.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
                let default_path = data.join("kiln.toml");
                if default_path.exists() {
                    Some(read_file(&default_path)?)
                } else {
                    None
                }
            }
        };
        Ok(self.merge(file.unwrap_or_default()))
    }

    fn merge(self, file: ServeSettings) -> (ServerConfig, LogFormat) {
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address"));
        let data = self.data.or(file.data).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
        let mut c = ServerConfig::new(listen, data);
        c.public_url = self.public_url.or(file.public_url);
        c.tls_cert = self.tls_cert.or(file.tls_cert);
        c.tls_key = self.tls_key.or(file.tls_key);
        macro_rules! pick {
            ($field:ident => $target:expr, $convert:expr) => {
                if let Some(value) = self.$field.or(file.$field) {
                    $target = $convert(value);
                }
            };
        }
        pick!(database => c.core.database, Some);
        pick!(blob_store => c.core.blob_store, Some);
        pick!(async_lease_ms => c.core.async_lease, |v: u64| Duration::from_millis(v.max(100)));
        pick!(max_instances => c.core.max_instances, |v| v);
        pick!(max_queued => c.core.max_queued, |v| v);
        pick!(async_workers => c.core.async_workers, |v| v);
        pick!(max_sandboxes => c.core.max_sandboxes, |v| v);
        pick!(max_code_bytes => c.max_code_bytes, |v| v);
        pick!(max_sync_input_bytes => c.max_sync_input_bytes, |v| v);
        pick!(max_async_input_bytes => c.max_async_input_bytes, |v| v);
        pick!(max_connections => c.max_connections, |v| v);
        pick!(max_connections_per_ip => c.max_connections_per_ip, Some);
        pick!(header_read_timeout_ms => c.header_read_timeout, Duration::from_millis);
        pick!(idle_timeout_ms => c.idle_timeout, Duration::from_millis);
        pick!(body_read_timeout_ms => c.body_read_timeout, Duration::from_millis);
        pick!(shutdown_grace_ms => c.shutdown_grace, Duration::from_millis);
        pick!(retention_secs => c.core.retention, Duration::from_secs);
        pick!(max_kept_logs => c.core.max_kept_logs, |v| v);
        pick!(max_body_buffer_bytes => c.max_body_buffer_bytes, |v| v);
        pick!(min_free_bytes => c.core.min_free_bytes, |v| v);
        pick!(max_data_bytes => c.core.max_data_bytes, Some);
        pick!(microvm_kernel => c.core.microvm_kernel, Some);
        pick!(microvm_agent => c.core.microvm_agent, Some);
        pick!(microvm_max_vms => c.core.microvm_max_vms, |v: u32| v.max(1));
        pick!(microvm_prestart => c.core.microvm_prestart, |v| v);
        pick!(runtimes_dir => c.core.runtimes_dir, Some);
        let log_format = self.log_format.or(file.log_format).unwrap_or_default();
        (c, log_format)
    }
}

fn read_file(path: &Path) -> Result<ServeSettings, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.display().to_string(),
        message: e.message().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_over_file_over_defaults() {
        let file: ServeSettings = toml::from_str(
            r#"
            listen = "0.0.0.0:9000"
            max_instances = 7
            retention_secs = 60
            log_format = "json"
            "#,
        )
        .unwrap();
        let flags = ServeSettings {
            max_instances: Some(9),
            ..Default::default()
        };
        let (config, format) = flags.merge(file);
        assert_eq!(config.core.max_instances, 9, "the flag wins");
        assert_eq!(config.listen.to_string(), "0.0.0.0:9000", "the file fills in");
        assert_eq!(config.core.retention, Duration::from_secs(60));
        assert_eq!(format, LogFormat::Json);
        assert_eq!(config.core.max_queued, 10_000, "the default remains");
        assert_eq!(config.core.microvm_prestart, 2, "helpers pre-started by default");
        let file: ServeSettings = toml::from_str("microvm_prestart = 0").unwrap();
        let (config, _) = ServeSettings::default().merge(file);
        assert_eq!(config.core.microvm_prestart, 0);
        assert_eq!(config.core.data_dir, PathBuf::from(DEFAULT_DATA));
    }

    #[test]
    fn the_shared_database_settings_from_the_file_and_flags() {
        let (config, _) = ServeSettings::default().merge(ServeSettings::default());
        assert_eq!(config.core.database, None, "SQLite in the data directory by default");
        assert_eq!(config.core.blob_store, None);
        let file: ServeSettings = toml::from_str(
            r#"
            database = "postgres://kiln@db:5432/kiln"
            blob_store = "file:///mnt/blobs"
            async_lease_ms = 5000
            "#,
        )
        .unwrap();
        let flags = ServeSettings {
            database: Some("postgres://kiln@other:5432/kiln".into()),
            ..Default::default()
        };
        let (config, _) = flags.merge(file);
        assert_eq!(config.core.database.as_deref(), Some("postgres://kiln@other:5432/kiln"));
        assert_eq!(config.core.blob_store.as_deref(), Some("file:///mnt/blobs"));
        assert_eq!(config.core.async_lease, Duration::from_secs(5));
    }

    #[test]
    fn connection_settings_from_the_file() {
        let file: ServeSettings = toml::from_str(
            r#"
            max_connections = 100
            max_connections_per_ip = 10
            idle_timeout_ms = 5000
            "#,
        )
        .unwrap();
        let (config, _) = ServeSettings::default().merge(file);
        assert_eq!(config.max_connections_per_ip(), 10);
        assert_eq!(config.idle_timeout, Duration::from_secs(5));
        let (defaults, _) = ServeSettings::default().merge(ServeSettings::default());
        assert_eq!(defaults.max_connections_per_ip(), 2_500, "a quarter of 10,000");
        assert_eq!(defaults.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "max_instance = 3\n").unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        assert!(err.contains("max_instance"), "{err}");
        let explicit = ServeSettings {
            config: Some(dir.path().join("missing.toml")),
            ..Default::default()
        };
        assert!(matches!(explicit.resolve(), Err(SettingsError::Read { .. })));
        // Without --config, a missing <data>/kiln.toml just means defaults.
        let implicit = ServeSettings {
            data: Some(dir.path().join("nothing-here")),
            ..Default::default()
        };
        assert!(implicit.resolve().is_ok());
    }
}
