//! `kiln token create|ls|rm`: scoped, invoke-only tokens; `kiln keys rotate`: retire every
//! result-URL signing key (every URL handed out so far stops working) and start signing identity
//! tokens with a new key (those signed before still verify until they expire).

use reqwest::Method;
use serde_json::json;

use super::client::{CliError, Client};
use super::print_json;

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token that may only invoke these functions; prints its secret (shown once).
    /// With --aws: an access key for the Lambda API (SigV4), printed as AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY; without functions it has the admin's rights.
    Create {
        #[arg(required_unless_present = "aws")]
        functions: Vec<String>,
        /// An AWS access key and secret (for boto3, the AWS CLI, the SDKs) instead of a token.
        #[arg(long)]
        aws: bool,
        /// Seconds the token is valid for [default: until revoked].
        #[arg(long = "ttl-s")]
        ttl_s: Option<u64>,
    },
    /// List scoped tokens (without secrets).
    Ls,
    /// Revoke a token by id.
    Rm { id: String },
}

pub fn run(client: &Client, command: TokenCommand, json: bool) -> Result<(), CliError> {
    match command {
        TokenCommand::Create { functions, aws, ttl_s } => {
            let mut body = if aws { json!({ "kind": "aws" }) } else { json!({}) };
            if !functions.is_empty() {
                body["functions"] = json!(functions);
            }
            if let Some(ttl_s) = ttl_s {
                body["ttl_s"] = ttl_s.into();
            }
            let request = client.request(Method::POST, "/v1/tokens").json(&body);
            let created = client.json(request)?;
            if json {
                print_json(&created);
            } else if aws {
                // As environment assignments: `eval "$(kiln token create --aws)"`, then `aws lambda …`.
                println!(
                    "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}",
                    created["access_key_id"].as_str().unwrap_or(""),
                    created["secret_access_key"].as_str().unwrap_or("")
                );
                eprintln!(
                    "token id {} (keep the secret: it is not shown again)",
                    created["id"].as_str().unwrap_or("")
                );
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
                let scope = match (token["kind"].as_str(), token["access_key_id"].as_str()) {
                    (Some("aws"), Some(key_id)) => format!("aws:{key_id}  "),
                    _ => String::new(),
                };
                let functions = if functions.is_empty() {
                    "(admin)".to_owned()
                } else {
                    functions.join(",")
                };
                println!(
                    "{}  {}  {scope}{functions}",
                    token["id"].as_str().unwrap_or(""),
                    token["created_at"].as_str().unwrap_or(""),
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

#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Sign result URLs with a new key and retire every older one: every result URL handed out
    /// so far is refused from now on. Also sign guests' identity tokens with a new key: the old
    /// one stays in /.well-known/jwks.json until the tokens it signed have expired.
    Rotate {
        /// Rotate only these keys.
        #[arg(long, value_enum)]
        only: Option<KeySet>,
    },
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum KeySet {
    /// The keys that sign result URLs.
    Results,
    /// The keys that sign guests' identity tokens.
    Identity,
}

pub fn keys(client: &Client, command: KeysCommand, json: bool) -> Result<(), CliError> {
    match command {
        KeysCommand::Rotate { only } => {
            let path = match only {
                None => "/v1/keys/rotate",
                Some(KeySet::Results) => "/v1/keys/rotate?keys=results",
                Some(KeySet::Identity) => "/v1/keys/rotate?keys=identity",
            };
            let rotated = client.json(client.request(Method::POST, path))?;
            if json {
                print_json(&rotated);
                return Ok(());
            }
            if let Some(kid) = rotated["kid"].as_str() {
                println!(
                    "signing key {kid} ({} retired: result URLs signed before are refused)",
                    rotated["retired"]
                );
            }
            if let Some(kid) = rotated["identity"]["kid"].as_str() {
                let published = rotated["identity"]["published"].as_array().map_or(0, Vec::len);
                println!(
                    "identity signing key {kid} ({published} published: tokens signed before verify until they expire)"
                );
            }
        }
    }
    Ok(())
}
