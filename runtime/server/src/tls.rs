//! HTTPS on the listening port (`--tls-cert`, `--tls-key`): rustls with the ring provider, TLS 1.2
//! and 1.3, HTTP/2 or HTTP/1.1 chosen by ALPN. The certificate chain and key are PEM files, read
//! at start-up (a bad pair stops the start with the reason) and again on SIGHUP: a renewed
//! certificate (certbot, cert-manager) is served to new connections without a restart, and a
//! pair that does not load is logged and the old one kept, never a server without a certificate.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::signal::unix::{signal, SignalKind};
use tokio_rustls::TlsAcceptor;

/// The certificate in force, and where it came from.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<TlsAcceptor>,
}

impl Tls {
    /// Loads the pair; an error names the file and what is wrong with it.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let acceptor = acceptor(cert, key)?;
        Ok(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(acceptor),
        })
    }

    /// What accepts a new connection now.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the files again; on success new connections get the new certificate.
    pub fn reload(&self) -> Result<(), String> {
        let acceptor = acceptor(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
        Ok(())
    }

    /// Reloads on every SIGHUP, for the life of the process.
    pub fn reload_on_hangup(self: Arc<Self>) -> io::Result<()> {
        let mut hangups = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match self.reload() {
                    Ok(()) => tracing::info!(cert = %self.cert.display(), "SIGHUP: TLS certificate reloaded"),
                    Err(error) => {
                        tracing::error!(%error, "SIGHUP: TLS certificate not reloaded; the previous one stays in use")
                    }
                }
            }
        });
        Ok(())
    }
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("--tls-cert {}: no PEM certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert and --tls-key do not make a pair: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
