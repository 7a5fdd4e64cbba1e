//! `kiln connector create|ls|get|rm`: egress connectors, the named network policies functions
//! and sandboxes reference (`--connector` on `kiln deploy` and `kiln sandbox run`). Admin only.

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{CliError, Client};
use super::print_json;

#[derive(clap::Subcommand, Debug)]
pub enum ConnectorCommand {
    /// Create a connector (it never changes afterwards: a new policy is a new connector).
    Create {
        name: String,
        /// A host its users may reach, `scheme://host[:port]` (repeatable).
        #[arg(long = "allow-host", value_name = "URL")]
        allow_host: Vec<String>,
        /// An internal range those hosts may resolve into, CIDR (repeatable).
        #[arg(long = "allow-private", value_name = "CIDR")]
        allow_private: Vec<String>,
        /// Let UDP leave microVMs through it.
        #[arg(long)]
        udp: bool,
    },
    /// List connectors and what uses each.
    Ls,
    /// Show one connector.
    Get { name: String },
    /// Delete a connector nothing uses.
    Rm { name: String },
}

pub fn run(client: &Client, command: ConnectorCommand, json: bool) -> Result<(), CliError> {
    match command {
        ConnectorCommand::Create {
            name,
            allow_host,
            allow_private,
            udp,
        } => {
            let body = json!({"name": name, "allowed_hosts": allow_host, "allow_private": allow_private, "udp": udp});
            let created = client.json(client.request(Method::POST, "/v1/connectors").json(&body))?;
            if json {
                print_json(&created);
            } else {
                println!("{}", line(&created));
            }
        }
        ConnectorCommand::Ls => {
            let listed = client.json(client.request(Method::GET, "/v1/connectors"))?;
            if json {
                print_json(&listed);
                return Ok(());
            }
            for connector in listed["connectors"].as_array().into_iter().flatten() {
                println!("{}", line(connector));
            }
        }
        ConnectorCommand::Get { name } => {
            let connector = client.json(client.request(Method::GET, &format!("/v1/connectors/{name}")))?;
            if json {
                print_json(&connector);
            } else {
                println!("{}", line(&connector));
                for user in connector["used_by"].as_array().into_iter().flatten() {
                    match (user["function"].as_str(), user["sandbox"].as_str()) {
                        (Some(function), _) => println!("  used by {function}@{}", user["version"]),
                        (None, Some(sandbox)) => println!("  used by sandbox {sandbox}"),
                        _ => {}
                    }
                }
            }
        }
        ConnectorCommand::Rm { name } => {
            client.send(client.request(Method::DELETE, &format!("/v1/connectors/{name}")))?;
            if json {
                print_json(&json!({ "name": name, "deleted": true }));
            } else {
                println!("deleted {name}");
            }
        }
    }
    Ok(())
}

/// `name  hosts  ranges  [udp]  used by N`.
fn line(connector: &Value) -> String {
    let list = |field: &str| -> String {
        let items: Vec<&str> = connector[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if items.is_empty() {
            "-".into()
        } else {
            items.join(",")
        }
    };
    let used = connector["used_by"].as_array().map_or(0, Vec::len);
    format!(
        "{}  {}  {}{}  used by {used}",
        connector["name"].as_str().unwrap_or(""),
        list("allowed_hosts"),
        list("allow_private"),
        if connector["udp"] == true { "  udp" } else { "" },
    )
}
