//! Every error the core API raises reaches the client with the contract's status and JSON body,
//! and a failed deploy leaves nothing behind.

use serde_json::json;

use crate::support::{client, expect_error, raw_exchange, wat, Kiln};

#[test]
fn missing_or_wrong_token_is_401() {
    let kiln = Kiln::start();
    let url = kiln.url("/v1/functions");
    expect_error(client().get(&url).send().unwrap(), 401, "unauthorized");
    expect_error(
        client().get(&url).bearer_auth("kiln_wrong").send().unwrap(),
        401,
        "unauthorized",
    );
    expect_error(
        client()
            .get(&url)
            .header("authorization", kiln.token.clone())
            .send()
            .unwrap(),
        401,
        "unauthorized",
    );
    // Auth comes before anything else: no function is revealed or touched.
    expect_error(
        client().put(kiln.url("/v1/functions/x")).body("junk").send().unwrap(),
        401,
        "unauthorized",
    );
    // Health and metrics need no token.
    assert_eq!(client().get(kiln.url("/healthz")).send().unwrap().status(), 200);
    assert_eq!(client().get(kiln.url("/metrics")).send().unwrap().status(), 200);
}

#[test]
fn bad_names_queries_and_routes() {
    let kiln = Kiln::start();
    for name in ["Hello", "-x", "a.b", "a%20b", "caf%C3%A9", &"a".repeat(65)] {
        expect_error(kiln.deploy(name, wat("hello")), 400, "invalid_request");
        expect_error(kiln.invoke(name, ""), 400, "invalid_request");
    }
    kiln.must_deploy("hello", wat("hello"));
    expect_error(
        kiln.invoke_path("/v1/functions/hello/invoke?version=abc", ""),
        400,
        "invalid_request",
    );
    expect_error(
        kiln.invoke_path("/v1/functions/hello/invoke?version=7", ""),
        404,
        "not_found",
    );
    expect_error(kiln.invoke("nope", ""), 404, "not_found");
    expect_error(kiln.get("/v1/functions/nope"), 404, "not_found");
    expect_error(kiln.get("/v1/nothing-here"), 404, "not_found");
    expect_error(client().get(kiln.url("/elsewhere")).send().unwrap(), 404, "not_found");
    let wrong_method = client()
        .post(kiln.url("/v1/functions"))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    expect_error(wrong_method, 405, "method_not_allowed");
}

#[test]
fn invalid_code_is_422_and_leaves_nothing() {
    let kiln = Kiln::start();
    let hello = wat::parse_bytes(&wat("hello")).unwrap().into_owned();
    let elf = {
        let mut elf = b"\x7fELF\x02\x01\x01\0".to_vec();
        elf.resize(4096, 0);
        elf
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            (0..4096u32).map(|i| (i * 31 % 256) as u8).collect(),
            "\\0asm",
        ),
        ("elf", elf, "ELF"),
        ("truncated", hello[..hello.len() - 5].to_vec(), "invalid WebAssembly"),
        ("empty", Vec::new(), "empty"),
        (
            "bad-wat",
            b"(module (func (export \"_start\") (call 99)))".to_vec(),
            "invalid",
        ),
        ("no-start", b"(module (memory 1))".to_vec(), "_start"),
        (
            "env-import",
            br#"(module (import "env" "secret" (func)) (func (export "_start")))"#.to_vec(),
            "env::secret",
        ),
        (
            "unknown-wasi",
            br#"(module (import "wasi_snapshot_preview1" "no_such_call" (func)) (func (export "_start")))"#.to_vec(),
            "no_such_call",
        ),
    ];
    for (name, code, needle) in cases {
        let error = expect_error(kiln.deploy(name, code), 422, "invalid_code");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{name}: {message:?} should mention {needle:?}"
        );
        expect_error(kiln.get(&format!("/v1/functions/{name}")), 404, "not_found");
    }
    let list: serde_json::Value = kiln.get("/v1/functions").json().unwrap();
    assert_eq!(list["functions"].as_array().unwrap().len(), 0);
    assert_eq!(std::fs::read_dir(kiln.data.join("artifacts")).unwrap().count(), 0);
}

#[test]
fn bad_config_is_400() {
    let kiln = Kiln::start();
    let cases = [
        json!({"timeout_ms": 0}),
        json!({"memory_mb": 1_000_000}),
        json!({"nope": true}),
        json!({"env": {"A=B": "x"}}),
    ];
    for config in cases {
        expect_error(kiln.deploy_with("f", wat("hello"), config), 400, "invalid_request");
    }
    // Not JSON at all.
    let form = reqwest::blocking::multipart::Form::new()
        .part("code", reqwest::blocking::multipart::Part::bytes(wat("hello")))
        .part("config", reqwest::blocking::multipart::Part::text("{not json"));
    let response = client()
        .put(kiln.url("/v1/functions/f"))
        .bearer_auth(&kiln.token)
        .multipart(form)
        .send()
        .unwrap();
    expect_error(response, 400, "invalid_request");
    // No code part.
    let form = reqwest::blocking::multipart::Form::new().part("config", reqwest::blocking::multipart::Part::text("{}"));
    let response = client()
        .put(kiln.url("/v1/functions/f"))
        .bearer_auth(&kiln.token)
        .multipart(form)
        .send()
        .unwrap();
    expect_error(response, 400, "invalid_request");
    // Wasm sent to the microvm tier (more in microvm.rs).
    expect_error(
        kiln.deploy_with("f", wat("hello"), json!({"tier": "microvm"})),
        422,
        "invalid_code",
    );
}

#[test]
fn oversized_bodies_are_413() {
    let kiln = Kiln::start();
    kiln.must_deploy("echo", wat("echo"));
    let six_mib: usize = 6 << 20;
    // A declared length over the cap is refused before the body is sent (the client waits for
    // `100 Continue`, as curl does for large bodies).
    let invoke = format!(
        "POST /v1/functions/echo/invoke HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {}\r\n",
        kiln.token
    );
    let head = format!(
        "{invoke}Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        six_mib + 1
    );
    let (status, body) = raw_exchange(&kiln.addr, head.as_bytes());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");
    // A chunked body (no declared length) is cut off when it passes the cap.
    let mut chunked = format!("{invoke}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..7 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    let (status, _) = raw_exchange(&kiln.addr, &chunked);
    assert_eq!(status, 413);
    // Exactly at the cap is accepted (and echoed back whole: the output cap is the same 6 MiB).
    let response = kiln.invoke("echo", vec![b'x'; six_mib]);
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().unwrap().len(), six_mib);

    let deploy = format!(
        "PUT /v1/functions/big HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        kiln.token,
        (65 << 20)
    );
    let (status, body) = raw_exchange(&kiln.addr, deploy.as_bytes());
    assert_eq!(status, 413, "{body}");
    expect_error(kiln.get("/v1/functions/big"), 404, "not_found");
}

#[test]
fn guest_failures_are_502_with_trap_exit_code_and_stderr() {
    let kiln = Kiln::start();
    kiln.must_deploy("trap", wat("trap"));
    kiln.must_deploy("exit3", wat("exit3"));
    let response = kiln.invoke("trap", "");
    assert!(response.headers().contains_key("x-kiln-invocation-id"));
    let error = expect_error(response, 502, "function_failed");
    assert!(error["trap"].as_str().unwrap().contains("unreachable"), "{error}");
    assert_eq!(error["stderr"], "about to trap\n");

    let error = expect_error(kiln.invoke("exit3", ""), 502, "function_failed");
    assert_eq!(error["exit_code"], 3);
    assert_eq!(error["stderr"], "bad input\n");
    assert!(error.get("trap").is_none());
}

#[test]
fn time_spent_in_a_host_call_counts_toward_the_timeout() {
    let kiln = Kiln::start();
    let response = kiln.deploy_with("sleep", wat("sleep"), json!({"timeout_ms": 300}));
    assert_eq!(response.status(), 201);
    assert_eq!(kiln.invoke("sleep", "10").text().unwrap(), "slept");
    let started = std::time::Instant::now();
    expect_error(kiln.invoke("sleep", "5000"), 504, "timeout");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "the timeout ended the sleep"
    );
    assert_eq!(kiln.invoke("sleep", "1").text().unwrap(), "slept");
}
