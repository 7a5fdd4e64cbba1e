//! Settings of one `kiln serve` process: the core's ([`CoreConfig`]) and what only the network
//! edge needs — where to listen, how many connections, how long a client may take, how large a
//! body may be.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_core::config::CoreConfig;

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The URL clients reach the server at (`--public-url`); `None`: `http(s)://<bound address>`.
    pub public_url: Option<String>,
    /// HTTPS with this PEM certificate chain and key (`tls.rs`); both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest artifact a deploy accepts (code and config together).
    pub max_code_bytes: u64,
    /// Largest body a synchronous invoke accepts.
    pub max_sync_input_bytes: u64,
    /// Largest body an asynchronous invoke accepts.
    pub max_async_input_bytes: u64,
    /// Open connections at once. At the cap, a new connection takes the slot of the oldest idle
    /// one (`connections.rs`), or waits in the kernel's accept queue while all are busy.
    pub max_connections: usize,
    /// Open connections from one client address at once; `None`: a quarter of `max_connections`.
    pub max_connections_per_ip: Option<usize>,
    /// Time a client gets from accept (or, on HTTP/1.1, from the end of its last request) to a
    /// complete request head, on every protocol (slowloris, silent sockets, bare h2 prefaces).
    pub header_read_timeout: Duration,
    /// Time a connection with no request in progress is kept after its last request (HTTP/2
    /// with no open stream; HTTP/1.1 is held to `header_read_timeout` between requests).
    pub idle_timeout: Duration,
    /// Time a client gets to send a whole request body.
    pub body_read_timeout: Duration,
    /// How long shutdown waits for in-flight requests before closing connections.
    pub shutdown_grace: Duration,
    /// Request-body bytes held in memory at once, all requests together (`api::body::BodyBudget`).
    pub max_body_buffer_bytes: u64,
    /// When set (`KILN_METRICS_TOKEN`), `/metrics` needs it (or the admin token) as a bearer
    /// token: function names and traffic are not everyone's business.
    pub metrics_token: Option<String>,
    pub core: CoreConfig,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            listen,
            public_url: None,
            tls_cert: None,
            tls_key: None,
            max_code_bytes: 64 * MIB,
            max_sync_input_bytes: 6 * MIB,
            max_async_input_bytes: MIB,
            max_connections: 10_000,
            max_connections_per_ip: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            // Room for 16 deploys of the largest code at once, or 170 sync inputs of 6 MiB.
            max_body_buffer_bytes: 1 << 30,
            metrics_token: None,
            core: CoreConfig::new(data_dir),
        }
    }
}

/// Checks a `--public-url`: an absolute `http` or `https` URL with a host, without a query or a
/// fragment; returns it without a trailing slash.
pub fn check_public_url(url: &str) -> Result<String, String> {
    let bad = |why: &str| format!("--public-url {url:?} {why}");
    let uri: http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("must start with http:// or https://"));
    }
    if uri.host().is_none_or(str::is_empty) || url.contains(['?', '#', '@']) {
        return Err(bad(
            "must be scheme://host[:port][/path], without a user, query or fragment",
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

impl ServerConfig {
    /// The per-address cap in force. A quarter by default: one address (NAT, a proxy, or one
    /// attacker) can then hold at most a quarter of the slots with requests in progress, which
    /// eviction cannot take back, while a proxy in front still gets thousands.
    pub fn max_connections_per_ip(&self) -> usize {
        self.max_connections_per_ip
            .unwrap_or(self.max_connections.div_ceil(4))
            .clamp(1, self.max_connections.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::check_public_url;

    #[test]
    fn public_urls_are_absolute_http_urls() {
        assert_eq!(
            check_public_url("https://kiln.example.com/").unwrap(),
            "https://kiln.example.com"
        );
        assert_eq!(
            check_public_url("http://10.0.0.5:7878/kiln").unwrap(),
            "http://10.0.0.5:7878/kiln"
        );
        for bad in [
            "kiln.example.com",
            "ftp://x",
            "https://",
            "https://a/?x=1",
            "https://u@a",
            "http://a/#f",
        ] {
            assert!(check_public_url(bad).is_err(), "{bad}");
        }
    }
}
