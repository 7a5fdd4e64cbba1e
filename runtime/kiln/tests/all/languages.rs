//! Functions from source: a Ruby, Python or JavaScript handler is uploaded as source, and Kiln
//! builds it — the language's runtime (`guests/runtimes/build.sh`) pre-initialised with the
//! handler loaded, snapshotted, compiled — and runs it like any Wasm function. One test per
//! language, each on its own server (a runtime's first deploy compiles the interpreter, tens of
//! seconds for Ruby; later deploys of the language reuse it). A language whose runtime cannot be
//! built here is skipped, saying why.

use std::process::Command;
use std::time::Duration;

use reqwest::blocking::{multipart, Client, Response};
use serde_json::{json, Value};

use crate::support::{client, expect_error, guests_dir, tar_of_files, wait_done, Kiln};

/// Builds `lang`'s runtime if needed; `None` (the test skipped) when it cannot be built here.
pub(crate) fn runtime(lang: &str, test: &str) -> Option<std::path::PathBuf> {
    let output = Command::new("bash")
        .arg(guests_dir().join("runtimes/build.sh"))
        .args(["install", lang])
        .output()
        .expect("running guests/runtimes/build.sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => Some(guests_dir().join("../target/kiln-runtimes")),
        Some(3) => {
            kiln_testkit::skip(test, &format!("the {lang} runtime cannot be built here: {stderr}"));
            None
        }
        _ => panic!("building the {lang} runtime failed ({}):\n{stderr}", output.status),
    }
}

/// Deploys take a while: an interpreter's snapshot is compiled (Ruby's is 34 MB of Wasm).
fn slow() -> Client {
    Client::builder().timeout(Duration::from_secs(900)).build().unwrap()
}

/// Deploys `code` as multipart, the `code` part named `file_name` when given.
fn deploy(kiln: &Kiln, name: &str, code: Vec<u8>, file_name: Option<&str>, config: Value) -> Response {
    let mut part = multipart::Part::bytes(code);
    if let Some(file_name) = file_name {
        part = part.file_name(file_name.to_owned());
    }
    let form = multipart::Form::new()
        .part("code", part)
        .part("config", multipart::Part::text(config.to_string()));
    slow()
        .put(kiln.url(&format!("/v1/functions/{name}")))
        .bearer_auth(&kiln.token)
        .multipart(form)
        .send()
        .expect("deploy")
}

fn must(response: Response) -> Value {
    let status = response.status();
    let body = response.text().unwrap();
    assert!(status.is_success(), "deploy failed: {status} {body}");
    serde_json::from_str(&body).unwrap()
}

fn invoke_json(kiln: &Kiln, name: &str, input: Value) -> Value {
    let response = kiln.invoke(name, input.to_string());
    let status = response.status();
    let content_type = response.headers().get("content-type").cloned();
    let body = response.text().unwrap();
    assert_eq!(status, 200, "{name}: {body}");
    assert_eq!(content_type.unwrap(), "application/json");
    serde_json::from_str(&body).unwrap_or_else(|_| panic!("{name}: not JSON: {body:?}"))
}

/// One language's files: the app (entry, a vendored dependency), a hello, and the failing loads.
struct Lang {
    name: &'static str,
    /// The app's files; its entry is the language's `main.*` unless `handler` says otherwise.
    app: Vec<(&'static str, &'static str)>,
    handler: Option<&'static str>,
    /// A single-file hello and its file name.
    hello: (&'static str, &'static str),
    load_error: &'static str,
    endless: &'static str,
    /// What an exception's stderr shows: its class and a frame of the file.
    exception: [&'static str; 3],
}

/// Every language's checks, on one server.
fn check(lang: Lang) {
    let test = format!("languages::{}", lang.name);
    let Some(runtimes) = runtime(lang.name, &test) else {
        return;
    };
    let kiln = Kiln::start_with(&["--runtimes-dir", runtimes.to_str().unwrap()]);
    let ext = lang.hello.0.rsplit('.').next().unwrap();

    // A single file, recognised by its name: the handler's JSON in and out.
    let hello = must(deploy(
        &kiln,
        "hello",
        lang.hello.1.into(),
        Some(lang.hello.0),
        json!({}),
    ));
    assert_eq!(hello["kind"], "module", "{hello}");
    assert_eq!(hello["config"]["runtime"], lang.name, "{hello}");
    assert_eq!(hello["config"]["handler"], lang.hello.0, "{hello}");
    assert_eq!(hello["runtime"]["language"], lang.name, "{hello}");
    assert!(hello["snapshot_digest"].is_string(), "{hello}");
    assert_eq!(
        invoke_json(&kiln, "hello", json!({"name": "Ada"})),
        json!({"hello": "Ada"})
    );
    // An empty body is `null`; a body that is not JSON fails with exit code 2 and the reason.
    assert_eq!(invoke_json(&kiln, "hello", json!(null)), json!({"hello": null}));
    let response = kiln.invoke("hello", "");
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().unwrap(), json!({"hello": null}));
    let error = expect_error(kiln.invoke("hello", "{bad json"), 502, "function_failed");
    assert_eq!(error["exit_code"], 2, "{error}");
    assert!(
        error["stderr"].as_str().unwrap().contains("invalid JSON input"),
        "{error}"
    );
    let got: Value = kiln.get("/v1/functions/hello").json().unwrap();
    let (interpreter, version) = (
        got["runtime"]["interpreter"].as_str(),
        got["runtime"]["version"].as_str(),
    );
    assert!(
        interpreter.is_some_and(|i| !i.is_empty()) && version.is_some_and(|v| !v.is_empty()),
        "{got}"
    );

    // A directory with a vendored dependency, as a tar, named by the config's runtime.
    let files: Vec<(String, Vec<u8>)> = lang
        .app
        .iter()
        .map(|(p, d)| (p.to_string(), d.as_bytes().to_vec()))
        .collect();
    let mut config = json!({"runtime": lang.name, "env": {"GREETING": "Hello"}});
    if let Some(handler) = lang.handler {
        config["handler"] = json!(handler);
    }
    let app = must(deploy(&kiln, "app", tar_of_files(&files), None, config));
    assert_eq!(app["runtime"]["language"], lang.name, "{app}");
    let mut seeds = Vec::new();
    let mut reseeded = Vec::new();
    for _ in 0..5 {
        let out = invoke_json(&kiln, "app", json!({"name": "Ada"}));
        assert_eq!(out["greeting"], "Hello, Ada!", "{out}");
        // The top level ran once, at deploy: its counter is 1 in every invocation.
        assert_eq!(out["counter"], 1, "{out}");
        seeds.push(out["seed"].clone());
        reseeded.push(out["reseeded"].clone());
    }
    assert!(seeds.iter().all(|s| s.is_number() && *s == seeds[0]), "{seeds:?}");
    reseeded.sort_by_key(|v| v.to_string());
    reseeded.dedup();
    assert_eq!(reseeded.len(), 5, "on_restore draws fresh values: {reseeded:?}");

    // An exception: 502 with its class, message and backtrace in stderr; prints go to the log.
    let error = expect_error(
        kiln.invoke("app", json!({"fail": true}).to_string()),
        502,
        "function_failed",
    );
    let stderr = error["stderr"].as_str().unwrap();
    for needle in lang.exception {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    }
    assert!(stderr.contains("printed by the handler"), "{stderr:?}");
    // Writes to the real stdout (Ruby's STDOUT, Python's sys.__stdout__) are the log's too: the
    // successful answers above stayed JSON.
    if lang.name != "javascript" {
        assert!(stderr.contains("written to the real stdout"), "{stderr:?}");
    }

    // Asynchronously, with a signed result URL.
    let response = client()
        .post(kiln.url("/v1/functions/app/invoke-async"))
        .bearer_auth(&kiln.token)
        .body(json!({"name": "Bo"}).to_string())
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let record = wait_done(&kiln, &id, Duration::from_secs(60));
    assert_eq!(record["state"], "succeeded", "{record}");
    let result = client()
        .get(kiln.url(record["result_url"].as_str().unwrap()))
        .send()
        .unwrap();
    assert_eq!(result.status(), 200);
    let result: Value = result.json().unwrap();
    assert_eq!(result["greeting"], "Hello, Bo!", "{result}");

    // Errors at load fail the deploy with the backtrace, and store nothing.
    let file = format!("broken.{ext}");
    let error = expect_error(
        deploy(&kiln, "broken", lang.load_error.into(), Some(&file), json!({})),
        422,
        "invalid_code",
    );
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("boom at load") && message.contains(&file), "{message}");
    expect_error(kiln.get("/v1/functions/broken"), 404, "not_found");
    // A top level that never ends is stopped by the function's timeout.
    let file = format!("endless.{ext}");
    let error = expect_error(
        deploy(
            &kiln,
            "endless",
            lang.endless.into(),
            Some(&file),
            json!({"timeout_ms": 1500}),
        ),
        422,
        "invalid_code",
    );
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("timeout of 1500 ms"), "{message}");
    expect_error(kiln.get("/v1/functions/endless"), 404, "not_found");
}

#[test]
fn ruby() {
    check(Lang {
        name: "ruby",
        app: vec![
            (
                "main.rb",
                r#"require "greeter"
$counter = 0
$counter += 1
SEED = rand(1_000_000_000)
$reseeded = nil
def on_restore
  $reseeded = rand(1_000_000_000)
end
def handler(event)
  puts "printed by the handler"
  STDOUT.puts "written to the real stdout"
  raise ArgumentError, "asked to fail" if event["fail"]
  { greeting: Greeter.greet(event["name"]), counter: $counter, seed: SEED, reseeded: $reseeded }
end
"#,
            ),
            (
                "vendor/greeter/lib/greeter.rb",
                "module Greeter\n  def self.greet(name) = \"#{ENV.fetch('GREETING')}, #{name}!\"\nend\n",
            ),
        ],
        handler: None,
        hello: (
            "handler.rb",
            "def handler(event)\n  { hello: event && event[\"name\"] }\nend\n",
        ),
        load_error: "x = 1\nraise \"boom at load\"\n",
        endless: "loop {}\n",
        exception: ["ArgumentError", "asked to fail", "main.rb:12"],
    });
}

#[test]
fn python() {
    check(Lang {
        name: "python",
        app: vec![
            (
                "src/app.py",
                r#"import random
import sys
import greeter
counter = 0
counter += 1
SEED = random.randrange(1_000_000_000)
reseeded = None
def on_restore():
    global reseeded
    reseeded = random.randrange(1_000_000_000)
def handler(event):
    print("printed by the handler")
    print("written to the real stdout", file=sys.__stdout__)
    if event.get("fail"):
        raise ValueError("asked to fail")
    return {"greeting": greeter.greet(event["name"]), "counter": counter, "seed": SEED, "reseeded": reseeded}
"#,
            ),
            (
                "vendor/greeter/__init__.py",
                "import os\ndef greet(name):\n    return f\"{os.environ['GREETING']}, {name}!\"\n",
            ),
        ],
        handler: Some("src/app.py"),
        hello: (
            "handler.py",
            "def handler(event):\n    return {\"hello\": event and event[\"name\"]}\n",
        ),
        load_error: "x = 1\nraise RuntimeError(\"boom at load\")\n",
        endless: "while True:\n    pass\n",
        exception: ["Traceback", "ValueError: asked to fail", "app.py"],
    });
}

#[test]
fn javascript() {
    check(Lang {
        name: "javascript",
        app: vec![
            (
                "main.mjs",
                r#"import { greet } from "greeter";
let counter = 0;
counter += 1;
const SEED = Math.floor(Math.random() * 1e9);
let reseeded = null;
export function onRestore() {
  reseeded = Math.floor(Math.random() * 1e9);
}
export default async function handler(event) {
  console.log("printed by the handler");
  if (event.fail) throw new TypeError("asked to fail");
  await null;
  return { greeting: greet(event.name), counter, seed: SEED, reseeded };
}
"#,
            ),
            (
                "node_modules/greeter/index.js",
                "export function greet(name) { return `Hello, ${name}!`; }\n",
            ),
        ],
        handler: Some("main.mjs"),
        hello: (
            "handler.js",
            "export function handler(event) {\n  return { hello: event && event.name };\n}\n",
        ),
        load_error: "const x = 1;\nthrow new Error(\"boom at load\");\n",
        endless: "for (;;) {}\n",
        exception: ["TypeError", "asked to fail", "main.mjs"],
    });
}

/// A raw body is source by its Content-Type; a top level that allocates without end fails its
/// deploy with the memory limit's message; source and config must agree.
#[test]
fn content_type_memory_limit_and_config_checks() {
    let test = "languages::content_type_memory_limit_and_config_checks";
    let Some(runtimes) = runtime("javascript", test) else {
        return;
    };
    let kiln = Kiln::start_with(&["--runtimes-dir", runtimes.to_str().unwrap()]);
    let response = slow()
        .put(kiln.url("/v1/functions/raw"))
        .bearer_auth(&kiln.token)
        .header("content-type", "text/javascript")
        .body("export default (event) => ({ raw: event });\n")
        .send()
        .unwrap();
    let deployed = must(response);
    assert_eq!(deployed["config"]["runtime"], "javascript", "{deployed}");
    assert_eq!(invoke_json(&kiln, "raw", json!([1])), json!({"raw": [1]}));

    let hog = "const a = [];\nfor (;;) a.push(new Uint8Array(1 << 20).fill(1));\n";
    let error = expect_error(
        deploy(&kiln, "hog", hog.into(), Some("hog.js"), json!({"memory_mb": 64})),
        422,
        "invalid_code",
    );
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("memory limit of 64 MiB"), "{message}");

    for (file, config, needle) in [
        ("a.js", json!({"runtime": "python"}), "is not a python file"),
        ("a.js", json!({"tier": "microvm"}), "wasm tier only"),
        (
            "a.txt",
            json!({"runtime": "ruby", "handler": "../a.rb"}),
            "relative path",
        ),
    ] {
        let error = expect_error(
            deploy(&kiln, "bad", b"1".to_vec(), Some(file), config),
            400,
            "invalid_request",
        );
        assert!(error["message"].as_str().unwrap().contains(needle), "{needle}: {error}");
    }
    // An archive without the entry it names.
    let tar = tar_of_files(&[("lib/x.js".to_owned(), b"export const x = 1;\n".to_vec())]);
    let error = expect_error(
        deploy(&kiln, "bad", tar, None, json!({"runtime": "javascript"})),
        422,
        "invalid_code",
    );
    assert!(error["message"].as_str().unwrap().contains("main.js"), "{error}");
}
