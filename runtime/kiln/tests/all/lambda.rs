//! AWS Lambda's API (`runtime/server/src/lambda`): real clients — boto3 and the AWS CLI, from
//! PyPI, pinned in `runtime/kiln/tests/lambda/requirements.txt` and installed by the setup script —
//! run `runtime/kiln/tests/lambda/clients.py` against a server, with an access key made through
//! Kiln's own API. One server and one run for every check: each Ruby deploy compiles a 34 MB
//! snapshot.

use std::process::Command;

use serde_json::{json, Value};

use crate::support::{guests_dir, Kiln};

fn post(kiln: &Kiln, path: &str, body: Value) -> Value {
    let response = crate::support::client()
        .post(kiln.url(path))
        .bearer_auth(&kiln.token)
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json().unwrap()
}

#[test]
fn boto3_and_the_aws_cli_run_python_node_and_ruby_handlers_as_lambda_writes_them() {
    const TEST: &str = "lambda::boto3_and_the_aws_cli_run_python_node_and_ruby_handlers_as_lambda_writes_them";
    let root = guests_dir().join("..");
    let tools = root.join("target/tools/aws/bin");
    if !tools.join("aws").exists() {
        let reason = format!(
            "{} has no boto3 and AWS CLI (runtime/scripts/setup.sh installs them)",
            tools.display()
        );
        return kiln_testkit::skip(TEST, &reason);
    }
    let mut runtimes = None;
    for language in ["javascript", "python", "ruby"] {
        match crate::languages::runtime(language, TEST) {
            Some(dir) => runtimes = Some(dir),
            None => return,
        }
    }
    let runtimes = runtimes.expect("three languages");
    let kiln = Kiln::start_with(&["--runtimes-dir", runtimes.to_str().unwrap()]);
    let key = post(&kiln, "/v1/tokens", json!({"kind": "aws"}));
    assert_eq!(
        (key["kind"].as_str(), key["scope"].as_str()),
        (Some("aws"), Some("admin")),
        "{key}"
    );
    assert!(key.get("token").is_none(), "an AWS key has no bearer secret: {key}");
    // A function of Kiln's own API, invoked through Lambda's.
    let echo = guests_dir().join("wat/echo.wat");
    kiln.must_deploy("kiln-echo", std::fs::read(&echo).unwrap());

    let work = tempfile::tempdir().unwrap();
    let output = Command::new(tools.join("python"))
        .arg(root.join("runtime/kiln/tests/lambda/clients.py"))
        .arg(kiln.url(""))
        .args([
            key["access_key_id"].as_str().unwrap(),
            key["secret_access_key"].as_str().unwrap(),
        ])
        .arg(tools.join("aws"))
        .args(["node,python,ruby", echo.to_str().unwrap(), "kiln-echo"])
        .env("TMPDIR", work.path())
        .env("AWS_CONFIG_FILE", work.path().join("config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", work.path().join("credentials"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.trim_end().ends_with("all lambda checks passed"),
        "the Lambda clients failed:\n{stdout}\n{}\nthe server's log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        crate::microvm::tail(&kiln.log(), 4000)
    );

    // A function made through Lambda's API, seen and run through Kiln's.
    let got = kiln.get("/v1/functions/lambda-wasm");
    assert_eq!(got.status(), 200);
    let response = kiln.invoke("lambda-wasm", "through kiln");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().unwrap(), "through kiln");
    // Functions deleted through Lambda's API are gone from Kiln's.
    assert_eq!(kiln.get("/v1/functions/lambda-ruby").status(), 404);
    // The key is listed as one, without its secret.
    let listed: Value = kiln.get("/v1/tokens").json().unwrap();
    let ours = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == key["id"])
        .expect("the key is listed");
    assert_eq!(ours["access_key_id"], key["access_key_id"], "{ours}");
    assert!(ours.get("secret_access_key").is_none(), "{ours}");
}

/// Lambda's API without a valid key: Lambda's error shape, and nothing of the body read first
/// (a client declaring a huge upload with an unknown key is answered at once).
#[test]
fn unsigned_and_unknown_key_requests_are_refused_before_the_body_is_read() {
    let kiln = Kiln::start();
    let response = crate::support::client()
        .post(kiln.url("/2015-03-31/functions/hello/invocations"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-amzn-errortype"], "InvalidSignatureException");
    let body: Value = response.json().unwrap();
    assert_eq!(body["Type"], "User", "{body}");
    // Kiln's bearer token is no AWS signature.
    let response = crate::support::client()
        .get(kiln.url("/2015-03-31/functions/"))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(response.status(), 403);

    // Were the body awaited, no answer would come within raw_exchange's 10 s (the body's deadline is 60 s).
    let head = format!(
        "POST /2015-03-31/functions HTTP/1.1\r\nHost: {}\r\nContent-Length: 60000000\r\n\
         X-Amz-Date: 20261204T000000Z\r\nAuthorization: AWS4-HMAC-SHA256 \
         Credential=AKIAUNKNOWNUNKNOWN00/20261204/us-east-1/lambda/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature={}\r\n\r\n",
        kiln.addr,
        "0".repeat(64)
    );
    let (status, text) = crate::support::raw_exchange(&kiln.addr, head.as_bytes());
    assert_eq!(status, 403, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("unrecognizedclientexception"),
        "{text}"
    );
}
