//! The OpenAPI document against the router: every documented operation answers (neither the
//! router's 404 nor 405), every undocumented method on a documented path is refused, and every
//! literal path segment the router matches appears in the document.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{client, wat, Kiln};

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "PATCH"];

/// True when the router itself refused: 405, or its "no route" 404.
fn router_refused(status: u16, body: &str) -> bool {
    status == 405 || (status == 404 && body.contains("no route for"))
}

#[test]
fn every_documented_route_answers_and_every_route_is_documented() {
    let kiln = Kiln::start();
    kiln.must_deploy("hello", wat("hello"));
    let submitted: Value = kiln.invoke_path("/v1/functions/hello/invoke-async", "").json().unwrap();
    let invocation = submitted["id"].as_str().unwrap().to_owned();
    let token: Value = client()
        .post(kiln.url("/v1/tokens"))
        .bearer_auth(&kiln.token)
        .json(&json!({"functions": ["hello"]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token_id = token["id"].as_str().unwrap().to_owned();

    let response = kiln.get("/v1/openapi.json");
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 12, "{paths:?}");

    // DELETEs last, so the function and token the other probes use still exist.
    let mut probes: Vec<(String, &str, bool)> = Vec::new();
    for (template, operations) in paths {
        let path = template.replace("{name}", "hello").replace(
            "{id}",
            if template.starts_with("/v1/tokens") {
                &token_id
            } else {
                &invocation
            },
        );
        for method in METHODS {
            let documented = operations.get(method.to_lowercase()).is_some();
            probes.push((path.clone(), method, documented));
        }
    }
    probes.sort_by_key(|(_, method, _)| *method == "DELETE");
    for (path, method, documented) in probes {
        let mut request = client()
            .request(Method::from_bytes(method.as_bytes()).unwrap(), kiln.url(&path))
            .bearer_auth(&kiln.token);
        if method == "PUT" {
            request = request.header("content-type", "application/wasm").body(wat("hello"));
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let body = response.text().unwrap();
        if documented {
            assert!(
                !router_refused(status, &body),
                "{method} {path} is documented but not routed: {status} {body}"
            );
        } else {
            assert!(
                router_refused(status, &body),
                "{method} {path} is routed ({status}) but not documented"
            );
        }
    }

    // Each literal segment the router matches on is in some documented path.
    let documented: BTreeSet<&str> = paths.keys().flat_map(|p| p.split('/')).collect();
    let router = include_str!("../../../server/src/api/mod.rs");
    let mut literals = BTreeSet::new();
    for line in router.lines().map(str::trim_start) {
        if !(line.starts_with("([") || line.starts_with('[') || line.starts_with("if let [")) {
            continue;
        }
        let pattern = line.split("=>").next().unwrap();
        for (i, piece) in pattern.split('"').enumerate() {
            if i % 2 == 1 {
                literals.insert(piece.to_owned());
            }
        }
    }
    for route in ["healthz", "metrics"] {
        literals.insert(route.to_owned());
    }
    assert!(
        literals.contains("invoke-async") && literals.contains("tokens"),
        "{literals:?}"
    );
    for literal in &literals {
        assert!(
            documented.contains(literal.as_str()),
            "the router matches {literal:?}, the document does not"
        );
    }
}

#[test]
fn the_document_needs_a_token() {
    let kiln = Kiln::start();
    let response = client().get(kiln.url("/v1/openapi.json")).send().unwrap();
    crate::support::expect_error(response, 401, "unauthorized");
}

/// Schemathesis (PyPI, pinned in `runtime/kiln/tests/schemathesis/requirements.txt`, installed by
/// the setup script) generates requests from the served document — examples, the coverage and
/// fuzzing phases, and stateful sequences following its links — and checks every answer against
/// it: no server error, documented statuses, content types, headers and schemas, schema-valid
/// requests accepted and invalid ones refused, `405` with `Allow`, authentication honoured. The
/// few rules JSON Schema cannot state are listed, with why, in `schemathesis.toml`. A fixed seed
/// keeps CI reproducible; `KILN_SCHEMATHESIS_SEED` picks another.
#[test]
fn schemathesis_finds_nothing_wrong_between_the_document_and_the_server() {
    const TEST: &str = "openapi::schemathesis_finds_nothing_wrong_between_the_document_and_the_server";
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let st = std::env::var_os("KILN_SCHEMATHESIS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/tools/schemathesis/bin/st"));
    if !st.exists() {
        let reason = format!(
            "{} is not installed (runtime/scripts/setup.sh installs it)",
            st.display()
        );
        return kiln_testkit::skip(TEST, &reason);
    }
    let kiln = Kiln::start();
    let seed = std::env::var("KILN_SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261204".into());
    let work = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(&st)
        .arg("--config-file")
        .arg(root.join("runtime/kiln/tests/schemathesis/schemathesis.toml"))
        .args(["--no-color", "run", &kiln.url("/v1/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {}", kiln.token)])
        .args(["--max-examples", "30", "--workers", "1", "--seed", &seed])
        .current_dir(work.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found failures (seed {seed}):\n{report}\n{}\nthe server's log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        crate::microvm::tail(&kiln.log(), 4000)
    );
    // Every phase ran (the examples phase deploys the document's example function).
    for phase in ["Examples", "Coverage", "Fuzzing", "Stateful"] {
        assert!(
            report.contains(&format!("✅  {phase}")),
            "{phase} did not pass:\n{report}"
        );
    }
}
