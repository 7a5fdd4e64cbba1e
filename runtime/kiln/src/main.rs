//! The `kiln` binary: `kiln serve` starts the server; every other command is the client
//! (`kiln::cli`), talking to a server over its HTTP API.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use kiln::app::App;
use kiln::config::ServerConfig;
use kiln::settings::LogFormat;

// Every request allocates and frees a few hundred small objects (a store, a WASI context, hyper's
// buffers, the guest's resource tables); mimalloc's thread-local free lists serve them with less
// work than glibc's malloc (measured with perf on the HTTP-trigger path: 8% of the CPU was in malloc/free).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Serve(kiln::settings::ServeSettings),
    #[command(flatten)]
    Client(kiln::cli::Command),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
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
    let (mut config, log_format) = match args.resolve() {
        Ok(resolved) => resolved,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(log_format);
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
    kiln::log_output::flush();
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // wasmtime-wasi opens an INFO span for every WASI call a guest makes; recording them
        // would cost the invoke path more than the guest's own work.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,wasmtime_wasi=warn,wiggle=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(kiln::log_output::Stderr::install())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
