//! The `kiln` binary: `kiln serve` starts the server (`kiln-server`); every other command is the
//! client (`kiln-cli`), talking to a server over its HTTP API.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use kiln_server::settings::{LogFormat, ServeSettings};

// Every request allocates and frees a few hundred small objects (a store, a WASI context, hyper's
// buffers, the guest's resource tables); mimalloc's thread-local free lists serve them with less
// work than glibc's malloc (measured with perf on the HTTP-trigger path: 8% of the CPU was in malloc/free).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kiln",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("KILN_COMMIT"), ")"),
    about = "A self-hosted serverless function runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connection: kiln_cli::Connection,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve(Box<ServeSettings>),
    #[command(flatten)]
    Client(Box<kiln_cli::Command>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    // `kiln vmm-jail` is the jailed microVM helper the server starts for every VM
    // (`kiln_vmm::jail`). It branches off before anything else runs: it forks, so no thread may
    // exist yet, and it speaks its own protocol on stdin/stdout, so clap must not see it.
    if std::env::args_os().nth(1).as_deref() == Some(kiln_core::tier::microvm::HELPER_ARG.as_ref()) {
        kiln_vmm::jail::child_main();
    }
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Client(command) => {
            return match kiln_cli::run(&cli.connection, *command) {
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
    // Secrets come from the environment only, never from flags (visible in `ps`) or kiln.toml.
    config.core.admin_token = std::env::var("KILN_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
    config.metrics_token = std::env::var("KILN_METRICS_TOKEN").ok().filter(|t| !t.is_empty());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(kiln_server::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("kiln: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // wasmtime-wasi opens an INFO span for every WASI call a guest makes; recording them
        // would cost the invoke path more than the guest's own work.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,wasmtime_wasi=warn,wiggle=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(kiln_server::log_writer::Stderr::install())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
