//! The SDK's hello in C (zig cc, a preview 1 module), Python (componentize-py) and JavaScript
//! (componentize-js), both components, built by `guests/polyglot/build.sh` and run through a real
//! Kiln: other languages' functions run too. Each test is skipped, saying why, only when its
//! toolchain cannot be installed here (no network, no Python or Node.js).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{expect_error, guests_dir, Kiln};

/// The hello for `lang`, built (and its toolchain installed) by the script; `None` when the
/// toolchain cannot be installed.
fn build(lang: &str) -> Option<Vec<u8>> {
    let dir = guests_dir().join("polyglot");
    let output = Command::new("bash")
        .arg(dir.join("build.sh"))
        .args(["build", lang])
        .output()
        .expect("running guests/polyglot/build.sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {}
        Some(3) => {
            kiln_testkit::skip(
                &format!("polyglot::{lang}"),
                &format!("its toolchain could not be installed: {stderr}"),
            );
            return None;
        }
        _ => panic!("building the {lang} hello failed ({}):\n{stderr}", output.status),
    }
    let wasm = guests_dir().join(format!("target/polyglot/hello-{lang}.wasm"));
    Some(std::fs::read(&wasm).unwrap_or_else(|e| panic!("{}: {e}", wasm.display())))
}

/// Deploys the hello and checks what every hello does: JSON in, JSON out, and a body without a
/// name is `function_failed` with the guest's message.
fn check_hello(lang: &str, kind: &str) {
    let started = Instant::now();
    let Some(code) = build(lang) else { return };
    let built = started.elapsed();
    let kiln = Kiln::start();
    let name = format!("hello-{lang}");
    let started = Instant::now();
    // Compiling a 15 MB engine takes a minute on a busy 2-core machine: more than the suite's
    // usual client timeout allows.
    let response = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
        .put(kiln.url(&format!("/v1/functions/{name}")))
        .bearer_auth(&kiln.token)
        .header("content-type", "application/wasm")
        .body(code.clone())
        .send()
        .expect("deploy");
    let status = response.status();
    let deployed: Value = response.json().unwrap();
    assert!(status.is_success(), "deploy of {name} failed: {status} {deployed}");
    assert_eq!(deployed["kind"], kind);
    // These toolchains are slow and their output big (the Python and JS engines are ~15 MB of
    // Wasm to compile): say where the time goes, so CI's budget can be watched.
    eprintln!(
        "polyglot {lang}: built in {:.1} s, {} KiB, deployed (compiled) in {:.1} s",
        built.as_secs_f64(),
        code.len() / 1024,
        started.elapsed().as_secs_f64()
    );

    let response = kiln.invoke(&name, json!({"name": "Ada"}).to_string());
    let status = response.status();
    let body = response.text().unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    assert_eq!(answer, json!({"greeting": "Hello, Ada!"}));

    let error = expect_error(kiln.invoke(&name, "{}"), 502, "function_failed");
    let stderr = error["stderr"].as_str().unwrap_or_default();
    assert!(stderr.contains(r#"hello: send {"name": "..."}"#), "{error}");
}

#[test]
fn the_c_hello_runs_as_a_module() {
    check_hello("c", "module");
}

#[test]
fn the_python_hello_runs_as_a_component() {
    check_hello("python", "component");
}

#[test]
fn the_javascript_hello_runs_as_a_component() {
    check_hello("js", "component");
}
