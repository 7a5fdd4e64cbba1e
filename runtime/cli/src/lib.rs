//! The client half of the `kiln` binary: `kiln deploy`, `invoke`, `ls`, `get`, `rm`, `logs`,
//! `status`, `token`, `connector`, `sandbox`, `ui`. Each command is one or two requests to the HTTP API of `../shared/API.md`; the server
//! is the only source of truth, so the CLI holds no state of its own.
//!
//! Output is for people by default and the server's JSON with `--json`, for scripts. Errors print
//! the server's error message (never a stack trace); the exit code says whose fault it was
//! (`client::CliError::exit_code`).

mod client;
mod connectors;
mod functions;
mod invocations;
mod progress;
mod sandboxes;
mod shell;
mod tokens;

use std::path::PathBuf;

pub use client::{resolve_token, CliError, Client};

/// Options every client command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// URL of the Kiln server.
    #[arg(long, global = true, env = "KILN_URL", default_value = "http://127.0.0.1:7878")]
    pub url: String,
    /// Bearer token; default: the admin token file of `--data-dir` when the URL is local.
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A PEM file of CA certificates to trust for an https:// URL, besides the system's roots.
    #[arg(long, global = true, env = "KILN_CA")]
    pub ca: Option<PathBuf>,
    /// The local server's data directory, where its admin token file is.
    #[arg(long = "data-dir", global = true, env = "KILN_DATA", default_value = "./kiln-data")]
    pub data_dir: PathBuf,
    /// Print the server's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Deploy a new version of a function from a Wasm file.
    Deploy(functions::DeployArgs),
    /// Invoke a function and print its output.
    Invoke(invocations::InvokeArgs),
    /// List functions.
    Ls,
    /// Show a function's latest version and its version list.
    Get { name: String },
    /// Remove a function and all its versions.
    Rm { name: String },
    /// Print the log (the guest's stderr) of an invocation.
    Logs { invocation_id: String },
    /// Show the state of an asynchronous invocation.
    Status { invocation_id: String },
    /// Manage scoped (invoke-only) tokens.
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    /// Manage egress connectors (named network policies).
    #[command(subcommand)]
    Connector(connectors::ConnectorCommand),
    /// Manage the keys that sign result URLs and guests' identity tokens.
    #[command(subcommand)]
    Keys(tokens::KeysCommand),
    /// Sandboxes: long-lived instances of a function.
    #[command(subcommand)]
    Sandbox(sandboxes::SandboxCommand),
    /// Print the web console's link, signed in with the token (the local admin token by default).
    Ui,
}

/// Runs one client command against the server.
pub fn run(connection: &Connection, command: Command) -> Result<(), CliError> {
    let token = resolve_token(connection.token.clone(), &connection.url, &connection.data_dir);
    let client = Client::new(&connection.url, token, connection.ca.as_deref())?;
    let json = connection.json;
    match command {
        Command::Deploy(args) => functions::deploy(&client, args, json),
        Command::Invoke(args) => invocations::invoke(&client, args, json),
        Command::Ls => functions::list(&client, json),
        Command::Get { name } => functions::get(&client, &name, json),
        Command::Rm { name } => functions::remove(&client, &name, json),
        Command::Logs { invocation_id } => invocations::logs(&client, &invocation_id, json),
        Command::Status { invocation_id } => invocations::status(&client, &invocation_id, json),
        Command::Token(command) => tokens::run(&client, command, json),
        Command::Keys(command) => tokens::keys(&client, command, json),
        Command::Connector(command) => connectors::run(&client, command, json),
        Command::Sandbox(command) => sandboxes::run(&client, command, json),
        Command::Ui => ui(&client, json),
    }
}

/// `kiln ui`: the console's address with the token in the fragment (`#token=…`), which the
/// browser keeps to itself (a fragment is never sent to a server) and the console removes from
/// the address bar once it has read it.
fn ui(client: &Client, json: bool) -> Result<(), CliError> {
    let (base, token) = client.base_and_token();
    let token = token.ok_or_else(|| {
        CliError::Usage(
            "no token: give --token (or KILN_TOKEN), or run on the server's machine with --data-dir pointing at its data".into(),
        )
    })?;
    let encoded: String = token
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let link = format!("{base}/ui/#token={encoded}");
    if json {
        print_json(&serde_json::json!({ "url": link }));
    } else {
        println!("{link}");
    }
    Ok(())
}

/// Prints a JSON value the way `--json` promises: one document, pretty for people reading it.
fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialise")
    );
}
