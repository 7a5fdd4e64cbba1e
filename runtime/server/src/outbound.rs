//! The HTTP client behind functions' egress: the core's policy (`kiln_core::tier::wasm::egress`)
//! decides whether a guest's outbound request may go and to which checked addresses; this
//! connects to exactly those (never a second lookup a DNS rebinding could change), speaks TLS
//! where the request is `https` (rustls with the web PKI roots), and sends it over HTTP/1.1.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use http_body_util::BodyExt;
use kiln_core::tier::wasm::egress::{Connector, Destination, IoFuture, Sent};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::{Error, WasiBody};

/// Kiln's outbound connector: hyper's HTTP/1 client on a TCP (or TLS) stream of our own.
#[derive(Debug, Default, Clone, Copy)]
pub struct HyperConnector;

impl Connector for HyperConnector {
    fn send(
        &self,
        destination: Destination,
        request: http::Request<WasiBody>,
    ) -> Pin<Box<dyn Future<Output = Sent> + Send>> {
        Box::pin(send(destination, request))
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.into(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Sends a request the policy allowed, to one of the checked addresses.
async fn send(destination: Destination, mut request: http::Request<WasiBody>) -> Sent {
    let Destination {
        addresses,
        https,
        server_name,
        connect_timeout,
        first_byte_timeout,
    } = destination;
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(&addresses[..]))
        .await
        .map_err(|_| Error::ConnectionTimeout)?
        .map_err(Error::Connect)?;
    let stream: Box<dyn Stream> = if https {
        let server_name = match server_name.parse::<IpAddr>() {
            Ok(ip) => rustls::pki_types::ServerName::from(ip),
            Err(_) => rustls::pki_types::ServerName::try_from(server_name).map_err(|_| Error::HttpRequestUriInvalid)?,
        };
        let handshake = tokio_rustls::TlsConnector::from(tls_config()).connect(server_name, tcp);
        let tls = tokio::time::timeout(connect_timeout, handshake)
            .await
            .map_err(|_| Error::ConnectionTimeout)?
            .map_err(Error::Tls)?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(Error::from)?;
    // The request line carries only the path; the authority travels in the Host header.
    let path = request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;
    // The connection must be driven while the response is awaited; it may also finish first (the
    // server answered and closed), and then the response is already there to be taken.
    let send = tokio::time::timeout(first_byte_timeout, sender.send_request(request));
    tokio::pin!(send);
    let mut connection = Some(Box::pin(connection));
    let response = loop {
        tokio::select! {
            biased;
            response = &mut send => {
                break response.map_err(|_| Error::ConnectionReadTimeout)?.map_err(Error::from)?;
            }
            ended = async { connection.as_mut().expect("guarded").await }, if connection.is_some() => {
                ended.map_err(Error::from)?;
                connection = None;
            }
        }
    };
    let response = response.map(|body| body.map_err(Error::from).boxed_unsync());
    let io: IoFuture = Box::new(async move {
        match connection {
            Some(connection) => connection.await.map_err(Error::from),
            None => Ok(()),
        }
    });
    Ok((response, io))
}
