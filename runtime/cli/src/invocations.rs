//! `kiln invoke`, `status`, `logs`.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use reqwest::blocking::Response;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{server_error, CliError, Client};
use super::print_json;

#[derive(clap::Args, Debug)]
pub struct InvokeArgs {
    pub name: String,
    /// The input: literal text (usually JSON), `@FILE`, or `@-` for stdin. Without it, stdin is
    /// read when it is not a terminal.
    #[arg(long, short = 'd')]
    pub data: Option<String>,
    /// Run this version instead of the latest.
    #[arg(long)]
    pub version: Option<u32>,
    /// Submit asynchronously and print the invocation id.
    #[arg(long = "async")]
    pub asynchronous: bool,
    /// Submit asynchronously, wait for the invocation to finish and print its result (implies
    /// --async).
    #[arg(long)]
    pub wait: bool,
}

fn read_input(data: Option<&str>) -> Result<Vec<u8>, CliError> {
    let stdin = || {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|source| CliError::File {
                path: "stdin".into(),
                source,
            })?;
        Ok(buf)
    };
    match data {
        Some("@-") => stdin(),
        Some(text) => match text.strip_prefix('@') {
            Some(path) => std::fs::read(path).map_err(|source| CliError::File {
                path: path.to_owned(),
                source,
            }),
            None => Ok(text.as_bytes().to_vec()),
        },
        None if std::io::stdin().is_terminal() => Ok(Vec::new()),
        None => stdin(),
    }
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Writes a function's output to stdout as bytes: it need not be text.
fn write_output(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|source| CliError::File {
            path: "stdout".into(),
            source,
        })
}

/// The output as a JSON value: parsed when it is JSON, else a string.
fn output_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned().into())
}

pub fn invoke(client: &Client, args: InvokeArgs, json: bool) -> Result<(), CliError> {
    let input = read_input(args.data.as_deref())?;
    let query = args.version.map(|v| format!("?version={v}")).unwrap_or_default();
    let asynchronous = args.asynchronous || args.wait;
    let kind = if asynchronous { "invoke-async" } else { "invoke" };
    let path = format!("/v1/functions/{}/{kind}{query}", args.name);
    let request = client.request(Method::POST, &path).body(input);
    if asynchronous {
        let submitted = client.json(request)?;
        let id = submitted["id"].as_str().unwrap_or_default().to_owned();
        if !args.wait {
            if json {
                print_json(&submitted);
            } else {
                println!("{id}");
            }
            return Ok(());
        }
        return wait(client, &id, json);
    }

    let response = client.send_raw(request)?;
    let id = header(&response, "x-kiln-invocation-id").unwrap_or_default();
    if !response.status().is_success() {
        let error = server_error(response);
        if let CliError::Server { error: object, .. } = &error {
            print_failure_details(&id, object);
        }
        return Err(error);
    }
    let version = header(&response, "x-kiln-version").and_then(|v| v.parse::<u64>().ok());
    let duration_us = header(&response, "x-kiln-duration-us").and_then(|v| v.parse::<u64>().ok());
    let bytes = response.bytes().map_err(|e| CliError::Protocol(e.to_string()))?;
    if json {
        print_json(&json!({
            "id": id, "version": version, "duration_us": duration_us, "output": output_value(&bytes),
        }));
        Ok(())
    } else {
        write_output(&bytes)
    }
}

/// A failed function's log tail and invocation id, on stderr, before the error message.
fn print_failure_details(id: &str, error: &Value) {
    if let Some(stderr) = error.get("stderr").and_then(Value::as_str).filter(|s| !s.is_empty()) {
        eprint!("{stderr}");
        if !stderr.ends_with('\n') {
            eprintln!();
        }
    }
    if !id.is_empty() {
        eprintln!("invocation {id}");
    }
}

/// Polls an asynchronous invocation until it has finished, then prints its result.
fn wait(client: &Client, id: &str, json: bool) -> Result<(), CliError> {
    let mut delay = Duration::from_millis(20);
    let record = loop {
        let record = client.json(client.request(Method::GET, &format!("/v1/invocations/{id}")))?;
        match record["state"].as_str() {
            Some("succeeded" | "failed") => break record,
            _ => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    };
    if record["state"] == "failed" {
        if json {
            print_json(&record);
        }
        let message = record["error"]["message"].as_str().unwrap_or("the function failed");
        // An asynchronous record keeps the stderr tail beside the error object.
        let mut error = record["error"].clone();
        if let (Some(object), Some(stderr)) = (error.as_object_mut(), record.get("stderr")) {
            object.entry("stderr").or_insert_with(|| stderr.clone());
        }
        print_failure_details(id, &error);
        return Err(CliError::FunctionFailed(message.to_owned()));
    }
    let result_url = record["result_url"]
        .as_str()
        .ok_or_else(|| CliError::Protocol("a succeeded invocation has no result_url".into()))?;
    let response = client.send(client.request(Method::GET, result_url))?;
    let bytes = response.bytes().map_err(|e| CliError::Protocol(e.to_string()))?;
    if json {
        print_json(&json!({ "invocation": record, "output": output_value(&bytes) }));
        Ok(())
    } else {
        write_output(&bytes)
    }
}

pub fn status(client: &Client, id: &str, json: bool) -> Result<(), CliError> {
    let record = client.json(client.request(Method::GET, &format!("/v1/invocations/{id}")))?;
    if json {
        print_json(&record);
        return Ok(());
    }
    let text = |key: &str| record[key].as_str().unwrap_or("-").to_owned();
    println!("{}", text("id"));
    println!("  function  {}@{}", text("function"), record["version"]);
    println!("  state     {}", text("state"));
    println!("  attempts  {}", record["attempts"]);
    println!("  created   {}", text("created_at"));
    println!("  finished  {}", text("finished_at"));
    if let Some(us) = record["duration_us"].as_u64() {
        println!("  duration  {:.3} ms", us as f64 / 1000.0);
    }
    if let Some(message) = record["error"]["message"].as_str() {
        println!("  error     {message}");
    }
    if let Some(url) = record["result_url"].as_str() {
        println!("  result    {}", client.url(url));
    }
    Ok(())
}

pub fn logs(client: &Client, id: &str, json: bool) -> Result<(), CliError> {
    let response = client.send(client.request(Method::GET, &format!("/v1/invocations/{id}/logs")))?;
    let text = response.text().map_err(|e| CliError::Protocol(e.to_string()))?;
    if json {
        print_json(&json!({ "id": id, "logs": text }));
        Ok(())
    } else {
        write_output(text.as_bytes())
    }
}
