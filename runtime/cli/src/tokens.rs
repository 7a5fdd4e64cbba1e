//! `kiln token create|ls|rm`: scoped, invoke-only tokens.

use reqwest::Method;
use serde_json::json;

use super::client::{CliError, Client};
use super::print_json;

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token that may only invoke these functions; prints its secret (shown once).
    Create {
        #[arg(required = true)]
        functions: Vec<String>,
    },
    /// List scoped tokens (without secrets).
    Ls,
    /// Revoke a token by id.
    Rm { id: String },
}

pub fn run(client: &Client, command: TokenCommand, json: bool) -> Result<(), CliError> {
    match command {
        TokenCommand::Create { functions } => {
            let request = client
                .request(Method::POST, "/v1/tokens")
                .json(&json!({ "functions": functions }));
            let created = client.json(request)?;
            if json {
                print_json(&created);
            } else {
                // The secret alone on stdout, so `KILN_TOKEN=$(kiln token create f)` works.
                println!("{}", created["token"].as_str().unwrap_or(""));
                eprintln!(
                    "token id {} (keep the secret: it is not shown again)",
                    created["id"].as_str().unwrap_or("")
                );
            }
        }
        TokenCommand::Ls => {
            let listed = client.json(client.request(Method::GET, "/v1/tokens"))?;
            if json {
                print_json(&listed);
                return Ok(());
            }
            for token in listed["tokens"].as_array().into_iter().flatten() {
                let functions: Vec<&str> = token["functions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str())
                    .collect();
                println!(
                    "{}  {}  {}",
                    token["id"].as_str().unwrap_or(""),
                    token["created_at"].as_str().unwrap_or(""),
                    functions.join(",")
                );
            }
        }
        TokenCommand::Rm { id } => {
            client.send(client.request(Method::DELETE, &format!("/v1/tokens/{id}")))?;
            if json {
                print_json(&json!({ "id": id, "revoked": true }));
            } else {
                println!("revoked {id}");
            }
        }
    }
    Ok(())
}
