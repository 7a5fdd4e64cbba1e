//! The CLI's connection to a Kiln server: base URL, bearer token, and the one place where an
//! answer becomes either a value or a `CliError` carrying the server's own error message.
//!
//! The HTTP client is reqwest's blocking client: it was already in the dependency tree (the
//! integration tests drive the server with it), a CLI makes one request at a time so blocking is
//! the simple shape, and with default features off it brings no TLS stack into the binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use serde_json::Value;

/// How a command failed; `main` prints the message and exits with `exit_code`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server answered with an error object (`code`, `message`).
    #[error("{message}")]
    Server {
        status: u16,
        code: String,
        message: String,
        error: Value,
    },
    /// The function itself failed (trap, non-zero exit, timeout).
    #[error("{0}")]
    FunctionFailed(String),
    #[error("cannot reach {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("the server's answer was not understood: {0}")]
    Protocol(String),
    /// A command run in a sandbox (exec, shell) ended with this exit code, which the CLI exits with.
    #[error("the command in the sandbox exited with code {0}")]
    Exited(u8),
}

impl CliError {
    /// 1: the function failed; 3: anything else went wrong (clap uses 2 for bad arguments).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::FunctionFailed(_) => 1,
            CliError::Exited(code) => *code,
            CliError::Server { code, .. } if code == "function_failed" || code == "timeout" => 1,
            _ => 3,
        }
    }
}

pub struct Client {
    http: Http,
    base: String,
    token: Option<String>,
    /// The extra CA certificates of `--ca`, for connections the HTTP client does not make.
    ca: Vec<Vec<u8>>,
}

/// Hosts for which the CLI looks for `<data>/admin.token` when no token is given.
fn is_local(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]" | "::1"))
}

/// The token to send: the explicit one, else the local server's admin token file.
pub fn resolve_token(explicit: Option<String>, url: &str, data_dir: &Path) -> Option<String> {
    if let Some(token) = explicit.filter(|t| !t.is_empty()) {
        return Some(token);
    }
    if !is_local(url) {
        return None;
    }
    let file: PathBuf = data_dir.join("admin.token");
    std::fs::read_to_string(file)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

impl Client {
    /// A client of the server at `url`; an `https://` one is verified against the system's roots
    /// and the CA certificates in the PEM file `ca`.
    pub fn new(url: &str, token: Option<String>, ca: Option<&Path>) -> Result<Client, CliError> {
        let base = url.trim_end_matches('/').to_owned();
        reqwest::Url::parse(&base).map_err(|e| CliError::Usage(format!("--url {url:?}: {e}")))?;
        // No overall timeout: a deploy compiles and an invoke runs for as long as the function's
        // own limit allows; the server bounds both.
        let mut http = Http::builder().connect_timeout(Duration::from_secs(10)).timeout(None);
        let mut extra = Vec::new();
        if let Some(ca) = ca {
            let bad = |e: &dyn std::fmt::Display| CliError::Usage(format!("--ca {}: {e}", ca.display()));
            let pem = std::fs::read(ca).map_err(|e| bad(&e))?;
            for certificate in CertificateDer::pem_slice_iter(&pem) {
                let der = certificate.map_err(|e| bad(&e))?;
                let certificate = reqwest::Certificate::from_der(&der).map_err(|e| bad(&e))?;
                http = http.add_root_certificate(certificate);
                extra.push(der.to_vec());
            }
            if extra.is_empty() {
                return Err(bad(&"no PEM certificate in it"));
            }
        }
        let http = http.build().map_err(|e| CliError::Protocol(e.to_string()))?;
        Ok(Client {
            http,
            base,
            token,
            ca: extra,
        })
    }

    /// The TLS settings of an `https://` server's connections the HTTP client does not make (the
    /// shell's websocket): the system's roots and `--ca`'s, as the HTTP client trusts.
    pub fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, CliError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        roots.add_parsable_certificates(self.ca.iter().map(|der| CertificateDer::from(der.clone())));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CliError::Protocol(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// The server's base URL and the token: for connections the HTTP client does not make (the
    /// shell's websocket).
    pub fn base_and_token(&self) -> (&str, Option<&str>) {
        (&self.base, self.token.as_deref())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let builder = self.http.request(method, self.url(path));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends a request; a transport failure becomes `Connect`. Any status is returned.
    pub fn send_raw(&self, request: RequestBuilder) -> Result<Response, CliError> {
        request.send().map_err(|e| CliError::Connect {
            url: self.base.clone(),
            reason: root_cause(&e),
        })
    }

    /// Sends a request; a transport failure becomes `Connect`, an error status `Server`.
    pub fn send(&self, request: RequestBuilder) -> Result<Response, CliError> {
        let response = self.send_raw(request)?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(server_error(response))
        }
    }

    /// Sends a request and parses its JSON answer.
    pub fn json(&self, request: RequestBuilder) -> Result<Value, CliError> {
        let response = self.send(request)?;
        response.json().map_err(|e| CliError::Protocol(e.to_string()))
    }
}

/// The innermost error of a reqwest failure ("connection refused", not the whole chain).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Turns an error answer into `Server`, keeping the contract's error object.
pub fn server_error(response: Response) -> CliError {
    let status = response.status().as_u16();
    let text = response.text().unwrap_or_default();
    server_error_from(status, text.as_bytes())
}

/// An error answer's status and body as `Server`.
pub fn server_error_from(status: u16, body: &[u8]) -> CliError {
    let text = String::from_utf8_lossy(body);
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    match parsed.as_ref().and_then(|v| v.get("error")) {
        Some(error) if error.get("message").is_some() => CliError::Server {
            status,
            code: error["code"].as_str().unwrap_or("").to_owned(),
            message: error["message"].as_str().unwrap_or("").to_owned(),
            error: error.clone(),
        },
        _ => CliError::Server {
            status,
            code: String::new(),
            message: format!("the server answered {status}: {}", text.trim()),
            error: Value::Null,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_urls() {
        assert!(is_local("http://127.0.0.1:7878"));
        assert!(is_local("http://localhost:1"));
        assert!(is_local("http://[::1]:7878"));
        assert!(!is_local("http://10.0.0.1:7878"));
        assert!(!is_local("https://kiln.example.com"));
    }

    #[test]
    fn token_resolution_prefers_explicit_then_local_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), "filetoken\n").unwrap();
        let local = "http://127.0.0.1:7878";
        assert_eq!(resolve_token(Some("x".into()), local, dir.path()).as_deref(), Some("x"));
        assert_eq!(resolve_token(None, local, dir.path()).as_deref(), Some("filetoken"));
        assert_eq!(resolve_token(None, "http://kiln.example.com", dir.path()), None);
        assert_eq!(resolve_token(None, local, &dir.path().join("none")), None);
    }
}
