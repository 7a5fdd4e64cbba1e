//! The `kiln` binary: `kiln serve` starts the server; every other command is the client
//! (`kiln::cli`), talking to a server over its HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use kiln::app::App;
use kiln::config::ServerConfig;

#[derive(Parser)]
#[command(name = "kiln", version, about = "A self-hosted serverless function runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connection: kiln::cli::Connection,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve(ServeArgs),
    #[command(flatten)]
    Client(kiln::cli::Command),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (HTTP/1.1 and h2c).
    #[arg(long, env = "KILN_LISTEN", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Data directory: database, artifacts, compiled code, admin token.
    #[arg(long, env = "KILN_DATA", default_value = "./kiln-data")]
    data: PathBuf,
    /// Guest instances alive at once, across all functions; sizes the instance pool and is the
    /// global concurrency cap.
    #[arg(long, env = "KILN_MAX_INSTANCES", default_value_t = 1000)]
    max_instances: u32,
    /// Asynchronous invocations waiting to run at most; past it submits get 429.
    #[arg(long, env = "KILN_MAX_QUEUED", default_value_t = 10_000)]
    max_queued: u64,
    /// Workers running asynchronous invocations (each runs up to 16 at once); 0 accepts
    /// asynchronous invocations without running them.
    #[arg(long, env = "KILN_ASYNC_WORKERS", default_value_t = 4)]
    async_workers: usize,
    /// Time a client gets to send a request's headers before the connection is closed.
    #[arg(long, env = "KILN_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// Log line format.
    #[arg(long, env = "KILN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Client(command) => {
            return match kiln::cli::run(&cli.connection, command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kiln: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    };
    init_logging(args.log_format);
    let mut config = ServerConfig::new(args.listen, args.data);
    config.max_instances = args.max_instances;
    config.max_queued = args.max_queued;
    config.async_workers = args.async_workers;
    config.header_read_timeout = std::time::Duration::from_millis(args.header_read_timeout_ms);
    config.admin_token = std::env::var("KILN_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("kiln: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: ServerConfig) -> Result<(), String> {
    let listen = config.listen;
    let app = tokio::task::spawn_blocking(move || App::open(config))
        .await
        .expect("start-up task panicked")
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(address = %local, data = %app.layout.root.display(), "kiln listening on http://{local}");
    app.warm_up();
    kiln::jobs::Jobs::start(&app);
    let logs_of = app.clone();
    kiln::server::run(app, listener, kiln::shutdown::signal_received()).await;
    // Invocation logs still queued for the disk are written before the process ends.
    let _ = tokio::task::spawn_blocking(move || logs_of.logs.flush()).await;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // wasmtime-wasi opens an INFO span for every WASI call a guest makes; recording them
        // would cost the invoke path more than the guest's own work.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,wasmtime_wasi=warn,wiggle=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
