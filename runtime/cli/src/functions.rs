//! `kiln deploy`, `ls`, `get`, `rm`.

use std::path::PathBuf;

use reqwest::blocking::multipart::{Form, Part};
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::client::{CliError, Client};
use super::print_json;
use super::progress::Upload;

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// Function name (`^[a-z0-9][a-z0-9_-]{0,63}$`).
    pub name: String,
    /// The artifact: a Wasm module or component (binary or WAT text), or source: a `.rb`, `.py`,
    /// `.js` or `.mjs` handler, or a zip or tar of a directory (with `--runtime`).
    pub file: PathBuf,
    /// Source: its language, when the file's name does not say it (an archive).
    #[arg(long, value_parser = ["ruby", "python", "javascript"])]
    pub runtime: Option<String>,
    /// Source: the entry file inside an archive (e.g. `src/handler.py`).
    #[arg(long)]
    pub handler: Option<String>,
    /// Memory limit of one instance, in MiB.
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Wall-clock limit of one invocation, in milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Invocations running at once; more get 429.
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Environment variable the guest sees (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Outbound HTTP destination the function may call (repeatable).
    #[arg(long = "allow-host", value_name = "URL")]
    pub allow_host: Vec<String>,
    /// Egress connector whose policy the function gets (repeatable).
    #[arg(long = "connector", value_name = "NAME")]
    pub connector: Vec<String>,
    /// Serve the function's HTTP trigger without a token.
    #[arg(long)]
    pub public: bool,
    /// Isolation tier.
    #[arg(long, value_parser = ["wasm", "microvm"])]
    pub tier: Option<String>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

impl DeployArgs {
    /// The config document of the deploy request: only the fields given, so the server's
    /// defaults apply to the rest.
    fn config(&self) -> Value {
        let mut config = Map::new();
        if let Some(tier) = &self.tier {
            config.insert("tier".into(), tier.clone().into());
        }
        if let Some(runtime) = &self.runtime {
            config.insert("runtime".into(), runtime.clone().into());
        }
        if let Some(handler) = &self.handler {
            config.insert("handler".into(), handler.clone().into());
        }
        if let Some(v) = self.memory_mb {
            config.insert("memory_mb".into(), v.into());
        }
        if let Some(v) = self.timeout_ms {
            config.insert("timeout_ms".into(), v.into());
        }
        if let Some(v) = self.max_concurrency {
            config.insert("max_concurrency".into(), v.into());
        }
        if !self.env.is_empty() {
            let env: Map<String, Value> = self.env.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
            config.insert("env".into(), env.into());
        }
        if !self.allow_host.is_empty() {
            config.insert("allowed_hosts".into(), self.allow_host.clone().into());
        }
        if !self.connector.is_empty() {
            config.insert("connectors".into(), self.connector.clone().into());
        }
        if self.public {
            config.insert("public".into(), true.into());
        }
        Value::Object(config)
    }
}

pub fn deploy(client: &Client, args: DeployArgs, json: bool) -> Result<(), CliError> {
    let file_error = |source| CliError::File {
        path: args.file.display().to_string(),
        source,
    };
    let file = std::fs::File::open(&args.file).map_err(file_error)?;
    let len = file.metadata().map_err(file_error)?.len();
    let upload = Upload::new(file, len, json);
    let bar = upload.bar();
    let code = Part::reader_with_length(upload, len)
        .file_name(
            args.file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )
        .mime_str("application/wasm")
        .expect("static MIME type");
    let form = Form::new()
        .part("code", code)
        .part("config", Part::text(args.config().to_string()));
    let request = client
        .request(Method::PUT, &format!("/v1/functions/{}", args.name))
        .multipart(form);
    let answer = client.json(request);
    bar.finish_and_clear();
    let version = answer?;
    if json {
        print_json(&version);
    } else {
        println!("{}", version["handle"].as_str().unwrap_or(""));
        println!("  digest   {}", version["digest"].as_str().unwrap_or(""));
        println!("  version  {}", version["version"]);
    }
    Ok(())
}

pub fn list(client: &Client, json: bool) -> Result<(), CliError> {
    let answer = client.json(client.request(Method::GET, "/v1/functions"))?;
    if json {
        print_json(&answer);
        return Ok(());
    }
    let empty = Vec::new();
    let functions = answer["functions"].as_array().unwrap_or(&empty);
    if functions.is_empty() {
        eprintln!("no functions deployed");
        return Ok(());
    }
    println!(
        "{:<24} {:>7}  {:<9}  {:<19}  CREATED",
        "NAME", "VERSION", "KIND", "DIGEST"
    );
    for f in functions {
        let digest = f["digest"].as_str().unwrap_or("");
        println!(
            "{:<24} {:>7}  {:<9}  {:<19}  {}",
            f["name"].as_str().unwrap_or(""),
            f["version"].to_string(),
            f["kind"].as_str().unwrap_or(""),
            short_digest(digest),
            f["created_at"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `sha256:` and the first 12 hex digits, as `docker images` shortens ids.
fn short_digest(digest: &str) -> &str {
    &digest[..digest.len().min("sha256:".len() + 12)]
}

pub fn get(client: &Client, name: &str, json: bool) -> Result<(), CliError> {
    let f = client.json(client.request(Method::GET, &format!("/v1/functions/{name}")))?;
    if json {
        print_json(&f);
        return Ok(());
    }
    println!("{}", f["handle"].as_str().unwrap_or(""));
    println!("  kind     {}", f["kind"].as_str().unwrap_or(""));
    println!("  tier     {}", f["tier"].as_str().unwrap_or(""));
    println!("  digest   {}", f["digest"].as_str().unwrap_or(""));
    println!("  created  {}", f["created_at"].as_str().unwrap_or(""));
    println!("  config   {}", f["config"]);
    println!("  versions");
    for v in f["versions"].as_array().into_iter().flatten() {
        println!(
            "    {:>5}  {}  {}",
            v["version"].to_string(),
            short_digest(v["digest"].as_str().unwrap_or("")),
            v["created_at"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub fn remove(client: &Client, name: &str, json: bool) -> Result<(), CliError> {
    client.send(client.request(Method::DELETE, &format!("/v1/functions/{name}")))?;
    if json {
        print_json(&json!({ "name": name, "removed": true }));
    } else {
        println!("removed {name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_holds_only_given_fields() {
        let args = DeployArgs {
            name: "f".into(),
            file: "f.wasm".into(),
            memory_mb: Some(64),
            timeout_ms: None,
            max_concurrency: None,
            env: vec![("A".into(), "1=2".into())],
            allow_host: vec![],
            connector: vec!["db".into()],
            public: false,
            tier: None,
            runtime: None,
            handler: None,
        };
        assert_eq!(
            args.config(),
            json!({"memory_mb": 64, "env": {"A": "1=2"}, "connectors": ["db"]})
        );
        assert_eq!(parse_env("A=1=2").unwrap(), ("A".into(), "1=2".into()));
        assert!(parse_env("=1").is_err());
        assert!(parse_env("A").is_err());
    }
}
