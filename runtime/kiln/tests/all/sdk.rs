//! The guest SDK (`sdk/`) through a real Kiln: the example functions under `guests/` built with
//! it, as `wasm32-wasip1` modules and `wasm32-wasip2` components, deployed and invoked over HTTP.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{component, expect_error, guests_dir, wait_done, Kiln};

/// The SDK guests that run as commands (the HTTP one is a proxy component).
const COMMANDS: [&str; 3] = ["hello", "wordcount", "primes"];

/// An SDK guest built as a `wasm32-wasip1` module (all of them once per test process).
fn module(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let out = BUILT.get_or_init(|| {
        let dir = guests_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .current_dir(&dir)
            .args(["build", "--release", "--target", "wasm32-wasip1", "--target-dir"])
            .arg(dir.join("target"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS");
        for guest in COMMANDS {
            build.args(["-p", guest]);
        }
        let status = build.status().expect("running cargo for the SDK guests");
        assert!(
            status.success(),
            "building the SDK guests failed (is the wasm32-wasip1 target installed? run runtime/scripts/setup.sh)"
        );
        dir.join("target/wasm32-wasip1/release")
    });
    std::fs::read(out.join(format!("{name}.wasm"))).expect("built SDK guest")
}

fn invoke_json(kiln: &Kiln, name: &str, input: Value) -> Value {
    let response = kiln.invoke(name, input.to_string());
    let status = response.status();
    let body = response.text().unwrap();
    assert_eq!(status, 200, "{name}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|_| panic!("{name} answered no JSON: {body:?}"))
}

#[test]
fn hello_takes_json_and_answers_json_as_module_and_component() {
    let kiln = Kiln::start();
    for (name, code, kind) in [
        ("hello-p1", module("hello"), "module"),
        ("hello-p2", component("hello"), "component"),
    ] {
        assert_eq!(kiln.must_deploy(name, code)["kind"], kind);
        let answer = invoke_json(&kiln, name, json!({"name": "Ada"}));
        assert_eq!(answer, json!({"greeting": "Hello, Ada!"}), "{name}");
        // Unknown fields are ignored, as serde does by default.
        let answer = invoke_json(&kiln, name, json!({"name": "Grace", "extra": [1, 2]}));
        assert_eq!(answer["greeting"], "Hello, Grace!", "{name}");
    }
}

#[test]
fn an_error_is_function_failed_with_the_message() {
    let kiln = Kiln::start();
    kiln.must_deploy("hello", module("hello"));
    kiln.must_deploy("hello-p2", component("hello"));

    // The function's Err: exit code 1, its text on stderr.
    let error = expect_error(kiln.invoke("hello", r#"{"name": " "}"#), 502, "function_failed");
    assert_eq!(error["exit_code"], 1, "{error}");
    assert_eq!(error["stderr"], "hello: the name is empty\n", "{error}");
    // A component can only say that it failed (exit 1), with the same message.
    let error = expect_error(kiln.invoke("hello-p2", r#"{"name": ""}"#), 502, "function_failed");
    assert_eq!(error["stderr"], "hello: the name is empty\n", "{error}");

    // Input that is not the JSON the function takes: exit code 2, serde's reason.
    for bad in ["not json", r#"{"nom": "Ada"}"#, ""] {
        let error = expect_error(kiln.invoke("hello", bad), 502, "function_failed");
        assert_eq!(error["exit_code"], 2, "{bad:?}: {error}");
        let stderr = error["stderr"].as_str().unwrap();
        assert!(stderr.starts_with("invalid input: "), "{bad:?}: {stderr}");
    }
    let error = expect_error(kiln.invoke("hello", r#"{"nom": "Ada"}"#), 502, "function_failed");
    assert!(
        error["stderr"].as_str().unwrap().contains("missing field `name`"),
        "{error}"
    );
}

#[test]
fn wordcount_reads_its_config_and_logs_json_lines() {
    let kiln = Kiln::start();
    let deployed = kiln.deploy_with(
        "wc",
        module("wordcount"),
        json!({"env": {"MIN_LENGTH": "3", "KILN_LOG": "info"}}),
    );
    assert_eq!(deployed.status(), 201);
    let text = "The cat and the hat; THE end of it. A cat!";
    let answer = invoke_json(&kiln, "wc", json!({"text": text, "top": 2}));
    // Words of three letters or more: the ×3, cat ×2, and, hat, end.
    assert_eq!(
        answer,
        json!({"words": 8, "distinct": 5, "top": [["the", 3], ["cat", 2]]})
    );
    let error = expect_error(kiln.invoke("wc", r#"{"text": "a b c"}"#), 502, "function_failed");
    assert_eq!(error["stderr"], "wordcount: the text has no words\n");

    // The structured log line is the invocation's stderr, kept with an asynchronous invocation.
    let submitted: Value = kiln
        .invoke_path(
            "/v1/functions/wc/invoke-async",
            json!({"text": "one two two"}).to_string(),
        )
        .json()
        .unwrap();
    let id = submitted["id"].as_str().expect("an invocation id");
    let record = wait_done(&kiln, id, Duration::from_secs(30));
    assert_eq!(record["state"], "succeeded", "{record}");
    let line: Value = serde_json::from_str(record["stderr"].as_str().expect("a stderr tail").trim())
        .unwrap_or_else(|_| panic!("not one JSON line: {record}"));
    assert_eq!(
        line,
        json!({"level": "info", "message": "counted", "words": 3, "distinct": 2})
    );

    // A config value of the wrong type is reported by name.
    let deployed = kiln.deploy_with("wc-bad", module("wordcount"), json!({"env": {"MIN_LENGTH": "three"}}));
    assert_eq!(deployed.status(), 201);
    let error = expect_error(kiln.invoke("wc-bad", r#"{"text": "a"}"#), 502, "function_failed");
    let stderr = error["stderr"].as_str().unwrap();
    assert!(
        stderr.starts_with(r#"config variable MIN_LENGTH="three" is invalid"#),
        "{stderr}"
    );
}

#[test]
fn the_init_hook_runs_once_at_deploy_and_invocations_start_from_its_snapshot() {
    let kiln = Kiln::start();
    let deployed = kiln.must_deploy("primes", module("primes"));
    assert!(
        deployed["snapshot_digest"].is_string(),
        "a module with #[kiln_sdk::init] is snapshotted: {deployed}"
    );
    assert!(kiln.log().contains("running the init hook"), "{}", kiln.log());

    let answers: Vec<Value> = (1..=4)
        .map(|_| invoke_json(&kiln, "primes", json!({"n": 1000})))
        .collect();
    for answer in &answers {
        assert_eq!(answer["prime"], 7919);
        assert_eq!(answer["primes_known"], 1_270_607, "primes below 20 million");
        assert_eq!(answer["init_runs"], 1, "the hook ran once, at deploy: {answer}");
        assert_eq!(answer["built_during_invocation"], false, "{answer}");
        assert_eq!(
            answer["restores"], 1,
            "#[kiln_sdk::restore] ran on this instance: {answer}"
        );
    }
    let nonces: HashSet<_> = answers.iter().map(|a| a["nonce"].to_string()).collect();
    assert_eq!(
        nonces.len(),
        1,
        "every invocation starts from the same snapshot: {answers:?}"
    );

    // The function's own errors still work after a snapshot.
    let error = expect_error(kiln.invoke("primes", r#"{"n": 0}"#), 502, "function_failed");
    assert_eq!(error["stderr"], "primes: n must be between 1 and 1270607\n");
}

#[test]
fn a_failing_init_hook_fails_the_deploy_with_its_message() {
    let kiln = Kiln::start();
    let response = kiln.deploy_with("primes", module("primes"), json!({"env": {"PRIMES_LIMIT": "lots"}}));
    let error = expect_error(response, 422, "invalid_code");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("wizer.initialize"), "{message}");
    assert!(
        message.contains(r#"init failed: config variable PRIMES_LIMIT="lots" is invalid"#),
        "{message}"
    );
    expect_error(kiln.get("/v1/functions/primes"), 404, "not_found");

    // A smaller table, chosen by config, is built at deploy all the same.
    let response = kiln.deploy_with("primes", module("primes"), json!({"env": {"PRIMES_LIMIT": "100"}}));
    assert_eq!(response.status(), 201);
    let answer = invoke_json(&kiln, "primes", json!({"n": 25}));
    assert_eq!(
        (answer["prime"].clone(), answer["primes_known"].clone()),
        (json!(97), json!(25))
    );
}

#[test]
fn on_a_component_the_init_hook_runs_when_each_instance_starts() {
    let kiln = Kiln::start();
    let deployed = kiln.deploy_with(
        "primes",
        component("primes"),
        json!({"env": {"PRIMES_LIMIT": "100000"}}),
    );
    let deployed: Value = deployed.json().unwrap();
    assert_eq!(deployed["kind"], "component");
    assert!(deployed.get("snapshot_digest").is_none_or(Value::is_null), "{deployed}");

    let answers: Vec<Value> = (1..=3).map(|_| invoke_json(&kiln, "primes", json!({"n": 2}))).collect();
    for answer in &answers {
        assert_eq!(answer["prime"], 3);
        // The hook ran before the function (as a constructor), so the state was there for it.
        assert_eq!(answer["init_runs"], 1, "{answer}");
        assert_eq!(answer["built_during_invocation"], false, "{answer}");
        assert_eq!(answer["restores"], 0, "components have no restore hook: {answer}");
    }
    let nonces: HashSet<_> = answers.iter().map(|a| a["nonce"].to_string()).collect();
    assert_eq!(
        nonces.len(),
        answers.len(),
        "no snapshot: each instance built its own: {answers:?}"
    );
}

#[test]
fn the_sdk_http_guest_is_served_as_an_http_trigger() {
    let kiln = Kiln::start();
    kiln.must_deploy("hi", component("sdk_http"));
    let get = crate::support::client()
        .get(kiln.url("/fn/hi/Ada"))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(get.text().unwrap(), "Hello, Ada!\n");
    let post = crate::support::client()
        .post(kiln.url("/fn/hi/"))
        .bearer_auth(&kiln.token)
        .body("echo me")
        .send()
        .unwrap();
    assert_eq!(post.status(), 200);
    assert_eq!(post.text().unwrap(), "echo me");
}
