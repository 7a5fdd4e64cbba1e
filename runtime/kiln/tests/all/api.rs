//! Deploy, invoke, list, get and delete through the HTTP API.

use serde_json::json;

use crate::support::{client, component, expect_error, wat, Kiln};

#[test]
fn module_round_trip() {
    let kiln = Kiln::start();
    let deployed = kiln.must_deploy("hello", wat("hello"));
    assert_eq!(deployed["name"], "hello");
    assert_eq!(deployed["version"], 1);
    assert_eq!(deployed["kind"], "module");
    assert_eq!(deployed["tier"], "wasm");
    assert_eq!(deployed["handle"], "hello@1");
    assert!(deployed["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(deployed["config"]["timeout_ms"], 10000);

    let response = kiln.invoke("hello", "");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["x-kiln-version"], "1");
    assert_eq!(headers["x-kiln-invocation-id"].len(), 36);
    assert!(headers["x-kiln-duration-us"].to_str().unwrap().parse::<u64>().is_ok());
    assert_eq!(response.text().unwrap(), "Hello from Kiln!\n");
}

#[test]
fn input_reaches_stdin_and_stdout_comes_back_byte_for_byte() {
    let kiln = Kiln::start();
    kiln.must_deploy("echo", wat("echo"));
    let input: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let response = kiln.invoke("echo", input.clone());
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().unwrap().to_vec(), input);
    // Each invocation starts fresh: nothing of the previous input remains.
    assert_eq!(kiln.invoke("echo", "short").text().unwrap(), "short");
}

#[test]
fn component_round_trip_with_env_and_args() {
    let kiln = Kiln::start();
    let code = component("greet");
    let response = kiln.deploy("greet", code.clone());
    assert_eq!(response.status(), 201);
    let deployed: serde_json::Value = response.json().unwrap();
    assert_eq!(deployed["kind"], "component");
    assert_eq!(
        kiln.invoke("greet", "Ada").text().unwrap(),
        "Hello, Ada! (from greet)\n"
    );

    let response = kiln.deploy_with("greet", code, json!({"env": {"GREETING": "Bonjour"}}));
    assert_eq!(response.status(), 201);
    assert_eq!(response.json::<serde_json::Value>().unwrap()["version"], 2);
    assert_eq!(
        kiln.invoke("greet", "Ada").text().unwrap(),
        "Bonjour, Ada! (from greet)\n"
    );
    // Older versions stay invocable by number.
    let response = kiln.invoke_path("/v1/functions/greet/invoke?version=1", "Ada");
    assert_eq!(response.headers()["x-kiln-version"], "1");
    assert_eq!(response.text().unwrap(), "Hello, Ada! (from greet)\n");

    // The guest's own failure (empty input → exit 2) is the function's failure, with its stderr.
    // WASI 0.2's `exit` carries only success or failure, so a component's failure is code 1.
    let error = expect_error(kiln.invoke("greet", ""), 502, "function_failed");
    assert_eq!(error["exit_code"], 1);
    assert!(error["stderr"].as_str().unwrap().contains("send a name"), "{error}");
}

#[test]
pub(crate) fn redeploying_the_same_code_and_config_is_idempotent() {
    let kiln = Kiln::start();
    let first = kiln.deploy("hello", wat("hello"));
    assert_eq!(first.status(), 201);
    let first: serde_json::Value = first.json().unwrap();
    let again = kiln.deploy("hello", wat("hello"));
    assert_eq!(again.status(), 200);
    let again: serde_json::Value = again.json().unwrap();
    assert_eq!(again["version"], 1);
    assert_eq!(again["digest"], first["digest"]);
    assert_eq!(again["created_at"], first["created_at"]);
    // Same code, new config: a new version. Then the same again: that version.
    let changed = kiln.deploy_with("hello", wat("hello"), json!({"timeout_ms": 500}));
    assert_eq!(changed.status(), 201);
    assert_eq!(changed.json::<serde_json::Value>().unwrap()["version"], 2);
    let same = kiln.deploy_with("hello", wat("hello"), json!({"timeout_ms": 500}));
    assert_eq!(same.status(), 200);
    assert_eq!(same.json::<serde_json::Value>().unwrap()["version"], 2);
    // WAT text and its binary are the same artifact.
    let binary = wat::parse_bytes(&wat("hello")).unwrap().into_owned();
    let bin = kiln.deploy_with("hello", binary, json!({"timeout_ms": 500}));
    assert_eq!(bin.status(), 200);
}

#[test]
pub(crate) fn list_get_and_delete() {
    let kiln = Kiln::start();
    kiln.must_deploy("a-fn", wat("hello"));
    kiln.must_deploy("b_fn", wat("echo"));
    kiln.must_deploy("b_fn", wat("hello"));
    // Shares its artifact with a-fn: deleting a-fn must leave it runnable.
    kiln.must_deploy("c", wat("hello"));

    let list: serde_json::Value = kiln.get("/v1/functions").json().unwrap();
    let functions = list["functions"].as_array().unwrap();
    let names: Vec<_> = functions.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a-fn", "b_fn", "c"]);
    assert_eq!(functions[1]["version"], 2);

    let got: serde_json::Value = kiln.get("/v1/functions/b_fn").json().unwrap();
    assert_eq!(got["version"], 2);
    assert_eq!(got["versions"].as_array().unwrap().len(), 2);
    assert_eq!(got["versions"][0]["handle"], "b_fn@1");

    assert_eq!(kiln.delete("/v1/functions/a-fn").status(), 204);
    expect_error(kiln.get("/v1/functions/a-fn"), 404, "not_found");
    expect_error(kiln.invoke("a-fn", ""), 404, "not_found");
    expect_error(kiln.delete("/v1/functions/a-fn"), 404, "not_found");
    assert_eq!(kiln.invoke("c", "").text().unwrap(), "Hello from Kiln!\n");
    let artifacts = std::fs::read_dir(kiln.data.join("artifacts")).unwrap().count();
    assert_eq!(artifacts, 2, "the shared artifact stays, no other is removed");

    // A deleted name can be deployed again; version numbers are never reused.
    let again = kiln.must_deploy("a-fn", wat("echo"));
    assert_eq!(again["version"], 2);
}

#[test]
fn http2_prior_knowledge_h2c() {
    let kiln = Kiln::start();
    kiln.must_deploy("hello", wat("hello"));
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .post(kiln.url("/v1/functions/hello/invoke"))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().unwrap(), "Hello from Kiln!\n");
    let health = client().get(kiln.url("/healthz")).send().unwrap();
    assert_eq!(health.version(), reqwest::Version::HTTP_11);
    assert_eq!(health.status(), 200);
}
