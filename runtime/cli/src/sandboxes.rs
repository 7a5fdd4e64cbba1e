//! `kiln sandbox run|ls|get|suspend|resume|fork|rm|token|curl`: sandboxes, one request each.

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
}

pub fn run(client: &Client, command: SandboxCommand, json: bool) -> Result<(), CliError> {
    match command {
        SandboxCommand::Run {
            function,
            idle_timeout_s,
            on_idle,
            ingress,
            env,
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
                let mut vars = Map::new();
                for pair in env {
                    let (key, value) = pair
                        .split_once('=')
                        .ok_or_else(|| CliError::Usage(format!("--env {pair:?}: expected KEY=VALUE")))?;
                    vars.insert(key.into(), value.into());
                }
                body.insert("env".into(), Value::Object(vars));
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
    }
    Ok(())
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
