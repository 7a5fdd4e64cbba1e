//! The process's life: restarts, crashes mid-deploy, graceful shutdown, hostile connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{client, component, expect_error, signal, wait_until, wat, Kiln};

#[test]
pub(crate) fn restart_keeps_functions_and_does_not_recompile() {
    let dir = tempfile::tempdir().unwrap();
    let mut kiln = Kiln::start_in(dir.path(), &[]);
    kiln.must_deploy("hello", wat("hello"));
    kiln.must_deploy("greet", component("greet"));
    assert_eq!(kiln.metric("kiln_compilations_total"), 2);
    let token = kiln.token.clone();
    assert!(kiln.terminate().success());

    let kiln = Kiln::start_in(dir.path(), &[]);
    assert_eq!(kiln.token, token, "the admin token survives a restart");
    assert_eq!(kiln.invoke("hello", "").text().unwrap(), "Hello from Kiln!\n");
    assert_eq!(kiln.invoke("greet", "Bo").text().unwrap(), "Hello, Bo! (from greet)\n");
    assert_eq!(
        kiln.metric("kiln_compilations_total"),
        0,
        "code came from the compile cache"
    );
    assert_eq!(kiln.metric("kiln_functions"), 2);

    // A node with another CPU or engine finds no cache entry under its key and recompiles on
    // demand: simulate by removing the cache.
    drop(kiln);
    std::fs::remove_dir_all(dir.path().join("compiled")).unwrap();
    let kiln = Kiln::start_in(dir.path(), &[]);
    assert_eq!(kiln.invoke("hello", "").text().unwrap(), "Hello from Kiln!\n");
    assert_eq!(kiln.invoke("greet", "Bo").text().unwrap(), "Hello, Bo! (from greet)\n");
    assert_eq!(kiln.metric("kiln_compilations_total"), 2);
    assert!(kiln.log().contains("compiling for this engine/CPU"), "{}", kiln.log());
}

/// A module that takes Cranelift a while: many functions with long bodies.
fn slow_to_compile() -> String {
    let mut wat = String::from("(module (memory 1) (func (export \"_start\"))\n");
    for f in 0..600 {
        wat.push_str(&format!("(func $f{f} (param i32) (result i32) (local.get 0)"));
        for i in 0..400 {
            wat.push_str(&format!(" (i32.add (i32.const {i})) (i32.mul (local.get 0))"));
        }
        wat.push_str(")\n");
    }
    wat.push(')');
    wat
}

#[test]
fn a_deploy_killed_mid_compile_leaves_no_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut kiln = Kiln::start_in(dir.path(), &[]);
    kiln.must_deploy("keep", wat("hello"));
    let url = kiln.url("/v1/functions/doomed");
    let token = kiln.token.clone();
    let upload = std::thread::spawn(move || client().put(url).bearer_auth(token).body(slow_to_compile()).send());
    assert!(
        kiln.wait_for_log("function=\"doomed\"", Duration::from_secs(60)),
        "{}",
        kiln.log()
    );
    kiln.kill();
    assert!(upload.join().unwrap().is_err(), "the deploy never answered");

    let kiln = Kiln::start_in(dir.path(), &[]);
    expect_error(kiln.get("/v1/functions/doomed"), 404, "not_found");
    let list: serde_json::Value = kiln.get("/v1/functions").json().unwrap();
    assert_eq!(list["functions"].as_array().unwrap().len(), 1);
    assert_eq!(kiln.invoke("keep", "").text().unwrap(), "Hello from Kiln!\n");
    assert_eq!(std::fs::read_dir(dir.path().join("artifacts")).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn sigterm_lets_in_flight_invocations_finish() {
    let mut kiln = Kiln::start();
    let response = kiln.deploy_with("sleep", wat("sleep"), json!({"timeout_ms": 5000}));
    assert_eq!(response.status(), 201);
    let url = kiln.url("/v1/functions/sleep/invoke");
    let token = kiln.token.clone();
    let in_flight = std::thread::spawn(move || client().post(url).bearer_auth(token).body("800").send().unwrap());
    wait_until("the invocation runs", Duration::from_secs(5), || {
        kiln.metric("kiln_pool_instances_in_use ") == 1
    });
    signal(kiln.pid(), libc::SIGTERM);
    let response = in_flight.join().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().unwrap(), "slept");
    assert!(kiln.terminate().success());
    assert!(kiln.log().contains("SIGTERM received"));
}

#[test]
fn slow_header_clients_neither_starve_others_nor_stay_open() {
    let kiln = Kiln::start_with(&["--header-read-timeout-ms", "500"]);
    kiln.must_deploy("hello", wat("hello"));
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(&kiln.addr).unwrap();
            s.write_all(b"POST /v1/functions/hello/invoke HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    // Real clients are served meanwhile.
    for _ in 0..20 {
        assert_eq!(kiln.invoke("hello", "").status(), 200);
    }
    // And the slow ones are cut off once their header time is up.
    let started = Instant::now();
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1024];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue, // an error response before closing is fine
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(closed, "a slow client was not disconnected");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}
