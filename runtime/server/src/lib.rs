//! `kiln serve`: Kiln's network edge over `kiln-core`. The listener accepts HTTP/1.1 and h2c on
//! one port, or HTTPS ([`tls`]), and guards it against hostile clients ([`listener`], with the
//! connection table of [`connections`] and the open-file check of [`open_files`]); the HTTP API of
//! `../shared/API.md` routes, authenticates and shapes answers ([`api`]) — the only place where
//! errors become HTTP statuses ([`api::error`]); [`outbound`] is the HTTP client behind
//! functions' egress. [`settings`] reads flags, environment and `kiln.toml` into a
//! [`config::ServerConfig`]; [`log_writer`] batches the per-invocation log lines on stderr.

pub mod api;
pub mod config;
pub mod connections;
pub mod lambda;
pub mod listener;
pub mod log_writer;
pub mod open_files;
pub mod outbound;
pub mod settings;
pub mod shutdown;
pub mod tls;

use std::sync::Arc;

use kiln_core::Kiln;

pub use config::ServerConfig;

/// What the API serves: the core, and the edge's own settings and budgets.
pub struct Server {
    pub kiln: Arc<Kiln>,
    pub config: ServerConfig,
    /// Request-body bytes held in memory at once.
    pub bodies: api::body::BodyBudget,
    /// The certificate, when the port speaks HTTPS.
    pub tls: Option<Arc<tls::Tls>>,
    /// This process's id among the nodes of a database (`GET /v1/cluster`).
    pub node: String,
    /// Lambda functions whose creation is still running (`lambda::creations`).
    pub lambda_creations: Arc<lambda::creations::Creations>,
}

impl Server {
    pub fn new(kiln: Arc<Kiln>, config: ServerConfig) -> Server {
        Server {
            bodies: api::body::BodyBudget::new(config.max_body_buffer_bytes),
            kiln,
            config,
            tls: None,
            node: format!("node-{}", uuid::Uuid::now_v7().simple()),
            lambda_creations: Arc::default(),
        }
    }
}

/// Opens the data directory, binds `config.listen` and serves until SIGINT or SIGTERM, then
/// drains. Logs where it listens (`kiln listening on http://ADDR`, or `https://`) once it accepts
/// connections.
pub async fn serve(mut config: ServerConfig) -> Result<(), String> {
    // Everything Kiln writes — the database with functions' secrets, inputs, results, keys — is
    // its own: no permission for group or others on what this process creates.
    // SAFETY: umask only sets the process's file-mode creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    open_files::fit(&mut config)?;
    let public_url = config.public_url.as_deref().map(config::check_public_url).transpose()?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::load(cert, key)?)),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listen = config.listen;
    // Bound before the core opens, so the default public URL (the issuer of identity tokens) has
    // the real port even when the address asked for port 0. Nothing is accepted until `run`.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    config.core.public_url = public_url.unwrap_or_else(|| format!("{scheme}://{local}"));
    let core = config.core.clone();
    let kiln = tokio::task::spawn_blocking(move || Kiln::open(core, Arc::new(outbound::HyperConnector)))
        .await
        .expect("start-up task panicked")
        .map_err(|e| e.to_string())?;
    if let Some(tls) = &tls {
        tls.clone()
            .reload_on_hangup()
            .map_err(|e| format!("installing a SIGHUP handler: {e}"))?;
    }
    tracing::info!(address = %local, data = %kiln.storage.layout.root.display(), "kiln listening on {scheme}://{local}");
    kiln.warm_up();
    kiln.start_queue();
    let mut server = Server::new(kiln.clone(), config);
    server.tls = tls;
    let server = Arc::new(server);
    api::start_heartbeat(kiln.clone(), server.node.clone(), kiln.config.public_url.clone());
    listener::run(server, listener, shutdown::signal_received()).await;
    // Invocation logs still queued for the disk are written before the process ends.
    let _ = tokio::task::spawn_blocking(move || kiln.telemetry.logs.flush()).await;
    log_writer::flush();
    Ok(())
}
