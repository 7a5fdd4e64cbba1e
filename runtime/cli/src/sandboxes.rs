//! `kiln sandbox run|ls|get|suspend|resume|fork|rm|token|curl|exec|upload|download|shell`:
//! sandboxes, one request each (the shell: one websocket, see [`crate::shell`]).

use std::io::Write;

use reqwest::Method;
use serde_json::{json, Map, Value};

use super::client::{CliError, Client};
use super::print_json;

#[derive(clap::Subcommand, Debug)]
pub enum SandboxCommand {
    /// Create a sandbox of a function (an HTTP-trigger function) and print its id.
    Run {
        function: String,
        /// Seconds without ingress before it is suspended (or terminated, with --on-idle terminate).
        #[arg(long = "idle-timeout-s")]
        idle_timeout_s: Option<u64>,
        /// What happens when it is idle: suspend or terminate.
        #[arg(long = "on-idle")]
        on_idle: Option<String>,
        /// Who may reach its ingress: token, public or off.
        #[arg(long)]
        ingress: Option<String>,
        /// Environment variables added to the function's (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Egress connector added to the function's policy (repeatable).
        #[arg(long = "connector", value_name = "NAME")]
        connector: Vec<String>,
    },
    /// List sandboxes.
    Ls {
        #[arg(long)]
        function: Option<String>,
        #[arg(long)]
        state: Option<String>,
    },
    /// Show a sandbox's record.
    Get { id: String },
    /// Suspend a running sandbox to disk.
    Suspend { id: String },
    /// Resume a suspended sandbox.
    Resume { id: String },
    /// Copy a sandbox into new ones; prints their ids.
    Fork {
        id: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Terminate a sandbox.
    Rm { id: String },
    /// Make a token for one sandbox (ingress by default); prints its secret.
    Token {
        id: String,
        /// Scopes: ingress, exec, shell, files (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long = "ttl-s", default_value_t = 3600)]
        ttl_s: u64,
    },
    /// Send one request through a sandbox's ingress and print the answer's body.
    Curl {
        id: String,
        /// The path the app sees, from `/`.
        #[arg(default_value = "/")]
        path: String,
        #[arg(short = 'X', long, default_value = "GET")]
        method: String,
        /// Request body.
        #[arg(short, long)]
        data: Option<String>,
    },
    /// Run a command in a microVM sandbox: its stdout and stderr are printed, and the CLI exits
    /// with its exit code. `kiln sandbox exec ID -- ls -la /`
    Exec {
        id: String,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
        /// Environment variables (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long = "timeout-ms")]
        timeout_ms: Option<u64>,
        /// Send this process's stdin to the command.
        #[arg(long)]
        stdin: bool,
    },
    /// Copy a local file into a microVM sandbox.
    Upload {
        id: String,
        local: std::path::PathBuf,
        /// Absolute path in the guest.
        remote: String,
        /// Octal permissions (0644).
        #[arg(long)]
        mode: Option<String>,
    },
    /// Copy a file out of a microVM sandbox (to stdout without LOCAL).
    Download {
        id: String,
        remote: String,
        local: Option<std::path::PathBuf>,
    },
    /// Open a login shell in a microVM sandbox on this terminal (exits with the shell's code).
    Shell { id: String },
}

pub fn run(client: &Client, command: SandboxCommand, json: bool) -> Result<(), CliError> {
    match command {
        SandboxCommand::Run {
            function,
            idle_timeout_s,
            on_idle,
            ingress,
            env,
            connector,
        } => {
            let mut body = Map::new();
            body.insert("function".into(), function.into());
            if let Some(v) = idle_timeout_s {
                body.insert("idle_timeout_s".into(), v.into());
            }
            if let Some(v) = on_idle {
                body.insert("on_idle".into(), v.into());
            }
            if let Some(v) = ingress {
                body.insert("ingress".into(), v.into());
            }
            if !env.is_empty() {
                body.insert("env".into(), env_map(&env)?);
            }
            if !connector.is_empty() {
                body.insert("connectors".into(), connector.into());
            }
            let created = client.json(client.request(Method::POST, "/v1/sandboxes").json(&Value::Object(body)))?;
            print_id_or_json(&created, json);
        }
        SandboxCommand::Ls { function, state } => {
            let mut query = Vec::new();
            if let Some(f) = function {
                query.push(format!("function={f}"));
            }
            if let Some(s) = state {
                query.push(format!("state={s}"));
            }
            let path = if query.is_empty() {
                "/v1/sandboxes".to_owned()
            } else {
                format!("/v1/sandboxes?{}", query.join("&"))
            };
            let listed = client.json(client.request(Method::GET, &path))?;
            if json {
                print_json(&listed);
            } else {
                println!(
                    "{:<31} {:<20} {:>7}  {:<10} CREATED",
                    "ID", "FUNCTION", "VERSION", "STATE"
                );
                for s in listed["sandboxes"].as_array().into_iter().flatten() {
                    println!(
                        "{:<31} {:<20} {:>7}  {:<10} {}",
                        s["id"].as_str().unwrap_or(""),
                        s["function"].as_str().unwrap_or(""),
                        s["version"],
                        s["state"].as_str().unwrap_or(""),
                        s["created_at"].as_str().unwrap_or("")
                    );
                }
            }
        }
        SandboxCommand::Get { id } => {
            print_json(&client.json(client.request(Method::GET, &format!("/v1/sandboxes/{id}")))?);
        }
        SandboxCommand::Suspend { id } => {
            let record = client.json(client.request(Method::POST, &format!("/v1/sandboxes/{id}/suspend")))?;
            print_state(&record, json);
        }
        SandboxCommand::Resume { id } => {
            let record = client.json(client.request(Method::POST, &format!("/v1/sandboxes/{id}/resume")))?;
            print_state(&record, json);
        }
        SandboxCommand::Fork { id, count } => {
            let forked = client.json(
                client
                    .request(Method::POST, &format!("/v1/sandboxes/{id}/fork"))
                    .json(&json!({ "count": count })),
            )?;
            if json {
                print_json(&forked);
            } else {
                for s in forked["sandboxes"].as_array().into_iter().flatten() {
                    println!("{}", s["id"].as_str().unwrap_or(""));
                }
            }
        }
        SandboxCommand::Rm { id } => {
            let record = client.json(client.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))?;
            print_state(&record, json);
        }
        SandboxCommand::Token { id, scopes, ttl_s } => {
            let scopes = if scopes.is_empty() {
                vec!["ingress".to_owned()]
            } else {
                scopes
            };
            let created = client.json(
                client
                    .request(Method::POST, &format!("/v1/sandboxes/{id}/tokens"))
                    .json(&json!({ "scopes": scopes, "ttl_s": ttl_s })),
            )?;
            if json {
                print_json(&created);
            } else {
                println!("{}", created["token"].as_str().unwrap_or(""));
            }
        }
        SandboxCommand::Curl { id, path, method, data } => {
            let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                .map_err(|_| CliError::Usage(format!("-X {method:?} is not an HTTP method")))?;
            let path = format!(
                "/sbx/{id}{}",
                if path.starts_with('/') {
                    path
                } else {
                    format!("/{path}")
                }
            );
            let mut request = client.request(method, &path);
            if let Some(data) = data {
                request = request.body(data);
            }
            let response = client.send_raw(request)?;
            let status = response.status();
            let bytes = response.bytes().map_err(|e| CliError::Protocol(e.to_string()))?;
            std::io::stdout()
                .write_all(&bytes)
                .map_err(|e| CliError::Protocol(e.to_string()))?;
            if !status.is_success() {
                return Err(CliError::Server {
                    status: status.as_u16(),
                    code: String::new(),
                    message: format!("the sandbox answered {status}"),
                    error: Value::Null,
                });
            }
        }
        SandboxCommand::Exec {
            id,
            argv,
            env,
            cwd,
            timeout_ms,
            stdin,
        } => {
            let mut body = Map::new();
            body.insert("argv".into(), json!(argv));
            body.insert("env".into(), env_map(&env)?);
            if let Some(cwd) = cwd {
                body.insert("cwd".into(), cwd.into());
            }
            if let Some(ms) = timeout_ms {
                body.insert("timeout_ms".into(), ms.into());
            }
            if stdin {
                let mut input = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)
                    .map_err(|e| CliError::Usage(format!("reading stdin (it must be UTF-8 text): {e}")))?;
                body.insert("stdin".into(), input.into());
            }
            let result = client.json(
                client
                    .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                    .json(&Value::Object(body)),
            )?;
            if json {
                print_json(&result);
            } else {
                let _ = std::io::stdout().write_all(result["stdout"].as_str().unwrap_or("").as_bytes());
                let _ = std::io::stderr().write_all(result["stderr"].as_str().unwrap_or("").as_bytes());
                if result["truncated"] == true {
                    eprintln!("kiln: the output was truncated at 1 MiB per stream");
                }
            }
            let code = result["exit_code"].as_i64().unwrap_or(1);
            if code != 0 {
                return Err(CliError::Exited(code.clamp(1, 255) as u8));
            }
        }
        SandboxCommand::Upload {
            id,
            local,
            remote,
            mode,
        } => {
            let bytes = std::fs::read(&local).map_err(|source| CliError::File {
                path: local.display().to_string(),
                source,
            })?;
            let mut path = format!("/v1/sandboxes/{id}/files?path={}", encode(&remote));
            if let Some(mode) = mode {
                path.push_str(&format!("&mode={}", encode(&mode)));
            }
            let written = client.json(client.request(Method::PUT, &path).body(bytes))?;
            if json {
                print_json(&written);
            } else {
                println!("{} bytes to {}", written["bytes"], remote);
            }
        }
        SandboxCommand::Download { id, remote, local } => {
            let path = format!("/v1/sandboxes/{id}/files?path={}", encode(&remote));
            let response = client.send(client.request(Method::GET, &path))?;
            let bytes = response.bytes().map_err(|e| CliError::Protocol(e.to_string()))?;
            match local {
                Some(local) => std::fs::write(&local, &bytes).map_err(|source| CliError::File {
                    path: local.display().to_string(),
                    source,
                })?,
                None => std::io::stdout()
                    .write_all(&bytes)
                    .map_err(|e| CliError::Protocol(e.to_string()))?,
            }
        }
        SandboxCommand::Shell { id } => {
            let code = crate::shell::run(client, &id)?;
            if code != 0 {
                return Err(CliError::Exited(code));
            }
        }
    }
    Ok(())
}

/// `--env KEY=VALUE` flags as a JSON object.
fn env_map(pairs: &[String]) -> Result<Value, CliError> {
    let mut vars = Map::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--env {pair:?}: expected KEY=VALUE")))?;
        vars.insert(key.into(), value.into());
    }
    Ok(Value::Object(vars))
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_id_or_json(record: &Value, json: bool) {
    if json {
        print_json(record);
    } else {
        println!("{}", record["id"].as_str().unwrap_or(""));
    }
}

fn print_state(record: &Value, json: bool) {
    if json {
        print_json(record);
    } else {
        println!(
            "{} {}",
            record["id"].as_str().unwrap_or(""),
            record["state"].as_str().unwrap_or("")
        );
    }
}
