//! Sandboxes on the Wasm tier (`../shared/API.md`, "Sandboxes"): one instance of an HTTP-trigger
//! component kept alive behind `/sbx/{id}/`, whose memory survives requests, suspend and resume
//! (explicit, idle, on demand), a graceful restart, and — back to its last suspend point — a
//! kill -9; forks; the ways in (tokens, `off`, `public`); server-sent events; concurrent
//! transitions; limits. `guests/http-counter` counts its requests and keeps a buffer whose
//! checksum every answer reports, so a lost byte of state shows.

use std::io::Read;
use std::time::{Duration, Instant};

use reqwest::blocking::{RequestBuilder, Response};
use serde_json::{json, Value};

use crate::support::{client, component, expect_error, wait_until, Kiln};

const SEC: Duration = Duration::from_secs(1);

fn create(kiln: &Kiln, body: Value) -> Response {
    client()
        .post(kiln.url("/v1/sandboxes"))
        .bearer_auth(&kiln.token)
        .json(&body)
        .send()
        .unwrap()
}

/// Creates a sandbox and returns its record (201 asserted).
fn must_create(kiln: &Kiln, body: Value) -> Value {
    let response = create(kiln, body);
    assert_eq!(response.status(), 201);
    response.json().unwrap()
}

/// Creates a sandbox of `counter` once the running cap has room again (waiting for a teardown
/// that frees a place); its id.
fn created_when_room(kiln: &Kiln) -> String {
    let started = std::time::Instant::now();
    loop {
        let response = create(kiln, json!({"function": "counter"}));
        if response.status() == 201 || started.elapsed() > 10 * SEC {
            assert_eq!(response.status(), 201, "{}", response.text().unwrap());
            return response.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Creates a sandbox, which must succeed; its id.
fn created(kiln: &Kiln, body: Value) -> String {
    must_create(kiln, body)["id"].as_str().unwrap().to_owned()
}

fn record(kiln: &Kiln, id: &str) -> Value {
    let response = kiln.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(response.status(), 200);
    response.json().unwrap()
}

fn action(kiln: &Kiln, id: &str, what: &str) -> Response {
    client()
        .post(kiln.url(&format!("/v1/sandboxes/{id}/{what}")))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap()
}

/// Suspends or resumes and returns the record (200 asserted).
fn must(kiln: &Kiln, id: &str, what: &str) -> Value {
    let response = action(kiln, id, what);
    let status = response.status();
    let body = response.text().unwrap();
    assert_eq!(status, 200, "{what} {id}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// A request through ingress, as the admin.
fn ingress(kiln: &Kiln, id: &str, path: &str) -> RequestBuilder {
    client().get(kiln.url(&format!("/sbx/{id}{path}")))
}

/// The counter's answer through ingress with the admin token.
fn counter(kiln: &Kiln, id: &str, path: &str) -> String {
    let response = ingress(kiln, id, path).bearer_auth(&kiln.token).send().unwrap();
    let status = response.status();
    let body = response.text().unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body.trim().to_owned()
}

/// `count=N` of an answer.
fn count_of(answer: &str) -> u64 {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("count="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {answer:?}"))
}

/// `len=L sum=S` of an answer: the buffer as the guest holds it.
fn buffer_of(answer: &str) -> String {
    answer.split_once(' ').map(|(_, rest)| rest.to_owned()).unwrap()
}

fn deploy_counter(kiln: &Kiln, config: Value) {
    let response = kiln.deploy_with("counter", component("http-counter"), config);
    assert!(response.status().is_success(), "{}", response.text().unwrap());
}

#[test]
pub(crate) fn a_sandbox_keeps_its_memory_across_requests_suspend_resume_and_a_restart() {
    let mut kiln = Kiln::start();
    deploy_counter(&kiln, json!({}));
    let sandbox = must_create(&kiln, json!({"function": "counter", "metadata": {"team": "a"}}));
    let id = sandbox["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sbx_") && id.len() == 30, "{id}");
    assert_eq!(sandbox["state"], "running");
    assert_eq!(sandbox["tier"], "wasm");
    assert_eq!(sandbox["version"], 1);
    assert_eq!(sandbox["ingress_url"], format!("/sbx/{id}/"));
    assert_eq!(sandbox["metadata"]["team"], "a");
    // A retried create with the same Idempotency-Key is the same sandbox.
    let keyed = |key: &str| {
        client()
            .post(kiln.url("/v1/sandboxes"))
            .bearer_auth(&kiln.token)
            .header("idempotency-key", key)
            .json(&json!({"function": "counter", "ingress": "off"}))
            .send()
            .unwrap()
    };
    let first = keyed("k1");
    assert_eq!(first.status(), 201);
    let first: Value = first.json().unwrap();
    let again = keyed("k1");
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().unwrap()["id"], first["id"]);
    kiln.delete(&format!("/v1/sandboxes/{}", first["id"].as_str().unwrap()));

    assert_eq!(count_of(&counter(&kiln, &id, "/")), 1);
    assert_eq!(count_of(&counter(&kiln, &id, "/a/b?c=d")), 2);
    // 4 MiB of a pattern no zero-page shortcut can skip.
    let grown = counter(&kiln, &id, "/grow?kib=4096&seed=7");
    assert_eq!(count_of(&grown), 3);
    let buffer = buffer_of(&grown);
    assert!(buffer.starts_with("len=4194304 "), "{grown}");

    let suspended = must(&kiln, &id, "suspend");
    assert_eq!(suspended["state"], "suspended");
    let bytes = suspended["state_bytes"].as_u64().unwrap();
    assert!(bytes > 4 << 20, "the 4 MiB buffer is in the state: {bytes} bytes");
    assert_eq!(kiln.metric("kiln_sandboxes{state=\"suspended\"} "), 1);
    // Suspended twice is a conflict; so is resuming a running one.
    expect_error(action(&kiln, &id, "suspend"), 409, "conflict");
    let resumed = must(&kiln, &id, "resume");
    assert_eq!(resumed["state"], "running");
    expect_error(action(&kiln, &id, "resume"), 409, "conflict");
    let after = counter(&kiln, &id, "/");
    assert_eq!((count_of(&after), buffer_of(&after)), (4, buffer.clone()));

    // A request to a suspended sandbox resumes it and is served.
    must(&kiln, &id, "suspend");
    let after = counter(&kiln, &id, "/");
    assert_eq!((count_of(&after), buffer_of(&after)), (5, buffer.clone()));
    assert_eq!(record(&kiln, &id)["state"], "running");

    // A graceful stop suspends it; after the restart it resumes on demand with its state.
    assert!(kiln.terminate().success());
    let data = kiln.data.clone();
    // What a crash between writing a state and registering it would leave: swept at start-up,
    // while the sandbox's own state stays.
    let stray = [
        data.join("sandboxes").join("ab".repeat(32)),
        data.join("sandboxes").join("chunks").join("cd".repeat(32)),
    ];
    for path in &stray {
        std::fs::write(path, b"half a save").unwrap();
    }
    let kiln = Kiln::start_in(&data, &[]);
    for path in &stray {
        assert!(!path.exists(), "{} swept", path.display());
    }
    let restarted = record(&kiln, &id);
    assert_eq!(restarted["state"], "suspended", "{restarted}");
    assert!(restarted["resumed_from"].is_null(), "{restarted}");
    let after = counter(&kiln, &id, "/");
    assert_eq!((count_of(&after), buffer_of(&after)), (6, buffer));
    let listed: Value = kiln.get("/v1/sandboxes?function=counter&state=running").json().unwrap();
    let ids: Vec<&str> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);

    // Terminated: gone from ingress, its state deleted, the record kept.
    let terminated: Value = kiln.delete(&format!("/v1/sandboxes/{id}")).json().unwrap();
    assert_eq!(terminated["state"], "terminated");
    assert_eq!(terminated["state_bytes"], 0);
    expect_error(
        ingress(&kiln, &id, "/").bearer_auth(&kiln.token).send().unwrap(),
        409,
        "conflict",
    );
    assert_eq!(
        files_under(&kiln.data.join("sandboxes")),
        0,
        "a terminated sandbox's state and its chunks are deleted"
    );
    expect_error(
        kiln.get("/v1/sandboxes/sbx_00000000000000000000000000"),
        404,
        "not_found",
    );
}

#[test]
fn a_suspend_writes_only_what_changed_and_shared_chunks_outlive_each_owner() {
    let kiln = Kiln::start();
    deploy_counter(&kiln, json!({}));
    let id = created(&kiln, json!({"function": "counter"}));
    counter(&kiln, &id, "/grow?kib=1024&seed=5");
    let chunks = kiln.data.join("sandboxes").join("chunks");
    let names = || -> std::collections::BTreeSet<_> {
        std::fs::read_dir(&chunks)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    must(&kiln, &id, "suspend");
    let first = names();
    assert!(
        first.len() >= 16,
        "1 MiB of state is at least 16 chunks of 64 KiB: {}",
        first.len()
    );

    // The counter changes, the megabyte does not: a chunk or two more, not another sixteen.
    must(&kiln, &id, "resume");
    let answer = counter(&kiln, &id, "/");
    let buffer = buffer_of(&answer);
    must(&kiln, &id, "suspend");
    // The first state is released after the suspend answers, with the chunks only it had; the
    // shared ones stay: as many chunks as before, and no other file (manifests are in the store).
    let all = || files_under(&kiln.data.join("sandboxes"));
    wait_until("the first state released", Duration::from_secs(10), || {
        names().len() == first.len() && all() == first.len()
    });
    let second = names();
    let written = second.difference(&first).count();
    // The counter's page and maybe the stack's: the state's directory and checksum, which
    // change on every save, are in the manifest.
    assert!(
        (1..=2).contains(&written),
        "only the changed chunks are written: {written} of {}",
        second.len()
    );

    // A fork shares the suspended state; it outlives its source, then goes with its last owner.
    let response = client()
        .post(kiln.url(&format!("/v1/sandboxes/{id}/fork")))
        .bearer_auth(&kiln.token)
        .json(&json!({"count": 1}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    let forked: Value = response.json().unwrap();
    let fork = forked["sandboxes"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(names(), second, "a fork of a suspended sandbox writes nothing");
    kiln.delete(&format!("/v1/sandboxes/{id}")).json::<Value>().unwrap();
    let resumed = counter(&kiln, &fork, "/");
    assert_eq!(
        (count_of(&resumed), buffer_of(&resumed)),
        (count_of(&answer) + 1, buffer)
    );
    kiln.delete(&format!("/v1/sandboxes/{fork}")).json::<Value>().unwrap();
    assert_eq!(
        files_under(&kiln.data.join("sandboxes")),
        0,
        "nothing left once no one holds it"
    );

    // The same bytes in sandboxes of two functions are stored twice: chunks are named within
    // their function, so a suspend's cost says nothing about another function's memory.
    let response = kiln.deploy_with("twin", component("http-counter"), json!({}));
    assert!(response.status().is_success());
    let mut chunk_sets = Vec::new();
    for function in ["counter", "twin"] {
        let id = created(&kiln, json!({"function": function}));
        counter(&kiln, &id, "/grow?kib=256&seed=9");
        let before = names();
        must(&kiln, &id, "suspend");
        chunk_sets.push(names().difference(&before).cloned().collect::<Vec<_>>());
    }
    assert!(chunk_sets[0].len() >= 4 && chunk_sets[1].len() >= 4, "{chunk_sets:?}");
    assert!(
        chunk_sets[0].iter().all(|c| !chunk_sets[1].contains(c)),
        "no chunk shared across functions"
    );
}

#[test]
fn after_kill_9_a_sandbox_is_back_at_its_last_suspend_point_or_failed() {
    let mut kiln = Kiln::start();
    deploy_counter(&kiln, json!({}));
    let saved = created(&kiln, json!({"function": "counter"}));
    counter(&kiln, &saved, "/");
    must(&kiln, &saved, "suspend");
    must(&kiln, &saved, "resume");
    // Served after the suspend point: lost with the crash.
    assert_eq!(count_of(&counter(&kiln, &saved, "/")), 2);
    let never = created(&kiln, json!({"function": "counter"}));
    counter(&kiln, &never, "/");

    kiln.kill();
    let data = kiln.data.clone();
    let kiln = Kiln::start_in(&data, &[]);
    let back = record(&kiln, &saved);
    assert_eq!(back["state"], "suspended", "{back}");
    assert!(
        back["resumed_from"].is_string(),
        "it says where it went back to: {back}"
    );
    assert_eq!(back["resumed_from"], back["suspended_at"], "{back}");
    assert_eq!(
        count_of(&counter(&kiln, &saved, "/")),
        2,
        "the state of the suspend point, one request counted before it"
    );
    let failed = record(&kiln, &never);
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("the host restarted"),
        "{failed}"
    );
    expect_error(
        ingress(&kiln, &never, "/").bearer_auth(&kiln.token).send().unwrap(),
        409,
        "conflict",
    );
}

#[test]
fn idle_sandboxes_are_suspended_or_terminated_and_lifetime_counts_running_time_only() {
    let kiln = Kiln::start();
    deploy_counter(&kiln, json!({}));
    let sleepy = must_create(
        &kiln,
        json!({"function": "counter", "idle_timeout_s": 1, "on_idle": "suspend"}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let gone = must_create(
        &kiln,
        json!({"function": "counter", "idle_timeout_s": 1, "on_idle": "terminate"}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let short = must_create(
        &kiln,
        json!({"function": "counter", "max_lifetime_s": 2, "idle_timeout_s": 1}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    counter(&kiln, &sleepy, "/grow?kib=64&seed=3");
    let buffer = buffer_of(&counter(&kiln, &sleepy, "/"));
    wait_until("the idle sandbox is suspended", 10 * SEC, || {
        record(&kiln, &sleepy)["state"] == "suspended"
    });
    wait_until("the other is terminated", 10 * SEC, || {
        record(&kiln, &gone)["state"] == "terminated"
    });
    let resumed = counter(&kiln, &sleepy, "/");
    assert_eq!((count_of(&resumed), buffer_of(&resumed)), (3, buffer));
    let suspended_s = record(&kiln, &sleepy)["suspended_s"].as_f64().unwrap();
    assert!(suspended_s > 0.0, "{suspended_s}");

    // `short` is suspended when idle, and its suspended time does not count: resumed for a
    // request, it runs again until 2 s of running time in all.
    wait_until("the short-lived sandbox is suspended", 10 * SEC, || {
        record(&kiln, &short)["state"] == "suspended"
    });
    let running_s = record(&kiln, &short)["running_s"].as_f64().unwrap();
    assert!(running_s < 2.0, "suspended before its lifetime: {running_s}");
    counter(&kiln, &short, "/");
    let started = Instant::now();
    wait_until("its lifetime is over", 10 * SEC, || {
        record(&kiln, &short)["state"] == "terminated"
    });
    let ran = record(&kiln, &short)["running_s"].as_f64().unwrap();
    assert!(ran >= 2.0, "terminated after {ran} s of running time");
    assert!(started.elapsed() < 5 * SEC);
}

#[test]
fn forks_are_independent_copies_with_their_own_randomness_and_tokens() {
    let kiln = Kiln::start();
    deploy_counter(&kiln, json!({}));
    let source = created(&kiln, json!({"function": "counter"}));
    counter(&kiln, &source, "/grow?kib=256&seed=11");
    let buffer = buffer_of(&counter(&kiln, &source, "/"));
    let token = sandbox_token(&kiln, &source, &["ingress"]);

    let response = client()
        .post(kiln.url(&format!("/v1/sandboxes/{source}/fork")))
        .bearer_auth(&kiln.token)
        .json(&json!({"count": 2}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    let forks: Value = response.json().unwrap();
    let forks: Vec<String> = forks["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert_eq!(f["state"], "suspended", "{f}");
            f["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(forks.len(), 2);
    assert!(forks[0] != forks[1] && !forks.contains(&source));

    // Each copy starts where the source was, then goes its own way.
    for fork in &forks {
        let first = counter(&kiln, fork, "/");
        assert_eq!((count_of(&first), buffer_of(&first)), (3, buffer.clone()));
    }
    assert_eq!(count_of(&counter(&kiln, &forks[0], "/")), 4);
    assert_eq!(count_of(&counter(&kiln, &forks[1], "/grow?kib=1&seed=5")), 4);
    assert_eq!(count_of(&counter(&kiln, &source, "/")), 3);
    assert_eq!(buffer_of(&counter(&kiln, &forks[0], "/")), buffer);

    // Randomness is the instance's own: no two copies draw the same bytes.
    let draws: Vec<String> = [&source, &forks[0], &forks[1]]
        .iter()
        .map(|id| counter(&kiln, id, "/random"))
        .collect();
    assert!(
        draws[0] != draws[1] && draws[1] != draws[2] && draws[0] != draws[2],
        "{draws:?}"
    );

    // The source's token is the source's only.
    let status = ingress(&kiln, &forks[0], "/")
        .header("x-kiln-sandbox-token", &token)
        .send()
        .unwrap()
        .status();
    assert_eq!(status, 403);
    let own = sandbox_token(&kiln, &forks[0], &["ingress"]);
    let status = ingress(&kiln, &forks[0], "/")
        .header("x-kiln-sandbox-token", &own)
        .send()
        .unwrap()
        .status();
    assert_eq!(status, 200);
    expect_error(
        client()
            .post(kiln.url(&format!("/v1/sandboxes/{source}/fork")))
            .bearer_auth(&kiln.token)
            .json(&json!({"count": 0}))
            .send()
            .unwrap(),
        400,
        "invalid_request",
    );
}

fn sandbox_token(kiln: &Kiln, id: &str, scopes: &[&str]) -> String {
    token_with(kiln, id, json!({"scopes": scopes, "ttl_s": 3600}))
}

fn token_with(kiln: &Kiln, id: &str, body: Value) -> String {
    let response = client()
        .post(kiln.url(&format!("/v1/sandboxes/{id}/tokens")))
        .bearer_auth(&kiln.token)
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    let token: Value = response.json().unwrap();
    let secret = token["token"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("kiln_sbx_"), "{secret}");
    secret
}

fn function_token(kiln: &Kiln, function: &str) -> String {
    let response = client()
        .post(kiln.url("/v1/tokens"))
        .bearer_auth(&kiln.token)
        .json(&json!({"functions": [function]}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    let token: Value = response.json().unwrap();
    token["token"].as_str().unwrap().to_owned()
}

#[test]
fn ingress_takes_the_admin_a_function_token_or_the_sandboxs_own_token() {
    let kiln = Kiln::start();
    kiln.must_deploy("hello", component("http-hello"));
    deploy_counter(&kiln, json!({}));
    let id = created(&kiln, json!({"function": "hello"}));
    let other = created(&kiln, json!({"function": "hello"}));
    let status = |request: RequestBuilder| request.send().unwrap().status().as_u16();
    let url = |id: &str| kiln.url(&format!("/sbx/{id}/x?y=1"));

    assert_eq!(status(client().get(url(&id))), 401, "no token");
    assert_eq!(status(client().get(url(&id)).bearer_auth("kiln_wrong")), 401);
    assert_eq!(status(client().get(url(&id)).bearer_auth(&kiln.token)), 200);
    assert_eq!(
        status(client().get(url(&id)).bearer_auth(function_token(&kiln, "hello"))),
        200
    );
    assert_eq!(
        status(client().get(url(&id)).bearer_auth(function_token(&kiln, "counter"))),
        403,
        "a token of another function"
    );

    // The sandbox's own token, in its header: the app's Authorization passes untouched, the
    // token does not reach it.
    let token = sandbox_token(&kiln, &id, &["ingress"]);
    let response = client()
        .get(url(&id))
        .header("x-kiln-sandbox-token", &token)
        .header("authorization", "Basic YXBwOnVzZXI=")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().unwrap();
    assert!(body.contains("path: /x?y=1\n"), "{body}");
    let headers = body.lines().find_map(|l| l.strip_prefix("headers: ")).unwrap();
    let headers: Vec<&str> = headers.split(',').collect();
    assert!(headers.contains(&"authorization"), "{body}");
    assert!(!headers.contains(&"x-kiln-sandbox-token"), "{body}");
    // Not for another sandbox, not without the ingress scope, not once expired.
    let on_other = client().get(url(&other)).header("x-kiln-sandbox-token", &token);
    assert_eq!(status(on_other), 403);
    let exec_only = sandbox_token(&kiln, &id, &["exec"]);
    assert_eq!(
        status(client().get(url(&id)).header("x-kiln-sandbox-token", &exec_only)),
        403
    );
    let brief = token_with(&kiln, &id, json!({"scopes": ["ingress"], "ttl_s": 1}));
    assert_eq!(
        status(client().get(url(&id)).header("x-kiln-sandbox-token", &brief)),
        200
    );
    wait_until("the 1 s token expires", 5 * SEC, || {
        status(client().get(url(&id)).header("x-kiln-sandbox-token", &brief)) == 401
    });
    // A sandbox token is no API token.
    assert_eq!(
        status(
            client()
                .get(kiln.url(&format!("/v1/sandboxes/{id}")))
                .bearer_auth(&token)
        ),
        401
    );

    let off = created(&kiln, json!({"function": "hello", "ingress": "off"}));
    expect_error(
        client().get(url(&off)).bearer_auth(&kiln.token).send().unwrap(),
        403,
        "forbidden",
    );
    let public = created(&kiln, json!({"function": "hello", "ingress": "public"}));
    assert_eq!(status(client().get(url(&public))), 200);
    // Over HTTP/2 too.
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2.get(url(&public)).send().unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
}

#[test]
fn server_sent_events_stream_through_ingress() {
    let kiln = Kiln::start();
    deploy_counter(&kiln, json!({}));
    let id = created(&kiln, json!({"function": "counter"}));
    let started = Instant::now();
    let mut response = ingress(&kiln, &id, "/events?n=4&ms=400")
        .bearer_auth(&kiln.token)
        .header("accept", "text/event-stream")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    // The first event arrives while the guest still waits to write the others (1.2 s more).
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while !first.ends_with(b"\n\n") {
        assert_eq!(response.read(&mut byte).unwrap(), 1, "the stream ended early");
        first.push(byte[0]);
    }
    let first_at = started.elapsed();
    assert_eq!(String::from_utf8(first).unwrap(), "id: 1\ndata: count=1\n\n");
    let mut rest = String::new();
    response.read_to_string(&mut rest).unwrap();
    let ended_at = started.elapsed();
    assert_eq!(
        rest,
        "id: 2\ndata: count=1\n\nid: 3\ndata: count=1\n\nid: 4\ndata: count=1\n\n"
    );
    assert!(
        ended_at - first_at >= Duration::from_millis(1000),
        "streamed, not buffered: first event at {first_at:?}, end at {ended_at:?}"
    );
    // The instance serves on after the stream.
    assert_eq!(count_of(&counter(&kiln, &id, "/")), 2);
}

#[test]
fn concurrent_transitions_of_one_sandbox_are_serialised() {
    let kiln = Kiln::start();
    deploy_counter(&kiln, json!({}));
    let id = created(&kiln, json!({"function": "counter"}));
    counter(&kiln, &id, "/grow?kib=2048&seed=1");
    for (what, to) in [
        ("suspend", "suspended"),
        ("resume", "running"),
        ("suspend", "suspended"),
    ] {
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..6)
                .map(|_| s.spawn(|| action(&kiln, &id, what).status().as_u16()))
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let won = statuses.iter().filter(|&&s| s == 200).count();
        let refused = statuses.iter().filter(|&&s| s == 409).count();
        assert_eq!((won, refused), (1, 5), "{what}: {statuses:?}");
        assert_eq!(record(&kiln, &id)["state"], to);
    }
    // A terminate racing requests and a resume: whatever order, it ends terminated and every
    // other answer is a clean one.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let mut racers = vec![s.spawn(|| kiln.delete(&format!("/v1/sandboxes/{id}")).status().as_u16())];
        racers.push(s.spawn(|| action(&kiln, &id, "resume").status().as_u16()));
        for _ in 0..4 {
            racers.push(s.spawn(|| {
                ingress(&kiln, &id, "/")
                    .bearer_auth(&kiln.token)
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert!(statuses.iter().all(|s| [200, 409].contains(s)), "{statuses:?}");
    assert_eq!(record(&kiln, &id)["state"], "terminated");
    assert_eq!(kiln.metric("kiln_sandboxes{state=\"running\"} "), 0);
}

#[test]
fn limits_running_sandboxes_suspended_state_on_disk_memory_and_concurrency() {
    let kiln = Kiln::start_with(&["--max-sandboxes", "2", "--max-data-bytes", "41943040"]);
    deploy_counter(&kiln, json!({"memory_mb": 64, "max_concurrency": 1}));
    let a = created(&kiln, json!({"function": "counter"}));
    let b = created(&kiln, json!({"function": "counter"}));
    let refused = expect_error(create(&kiln, json!({"function": "counter"})), 429, "too_many_requests");
    assert!(refused["message"].as_str().unwrap().contains('2'), "{refused}");
    // Suspended sandboxes do not count; resuming past the cap is refused and loses nothing.
    counter(&kiln, &a, "/grow?kib=64&seed=2");
    let buffer = buffer_of(&counter(&kiln, &a, "/"));
    must(&kiln, &a, "suspend");
    // A suspend answers once the state is durable; the instance's place among the running is
    // given back when its teardown ends, a moment later.
    let c = created_when_room(&kiln);
    expect_error(action(&kiln, &a, "resume"), 429, "too_many_requests");
    assert_eq!(record(&kiln, &a)["state"], "suspended");
    kiln.delete(&format!("/v1/sandboxes/{c}"));
    assert_eq!(buffer_of(&counter(&kiln, &a, "/")), buffer);

    // The function's max_concurrency holds for its sandboxes' requests: one at a time.
    std::thread::scope(|s| {
        let (streaming, first_event) = std::sync::mpsc::channel();
        let (kiln, a) = (&kiln, &a);
        let stream = s.spawn(move || {
            let mut response = ingress(kiln, a, "/events?n=3&ms=300")
                .bearer_auth(&kiln.token)
                .send()
                .unwrap();
            let mut all = Vec::new();
            let mut byte = [0u8; 1];
            while !all.ends_with(b"\n\n") {
                assert_eq!(response.read(&mut byte).unwrap(), 1);
                all.push(byte[0]);
            }
            streaming.send(()).unwrap();
            response.read_to_end(&mut all).unwrap();
            String::from_utf8(all).unwrap()
        });
        first_event.recv_timeout(10 * SEC).expect("the stream started");
        expect_error(
            ingress(kiln, &b, "/").bearer_auth(&kiln.token).send().unwrap(),
            429,
            "too_many_requests",
        );
        assert!(stream.join().unwrap().ends_with("id: 3\ndata: count=4\n\n"));
    });

    // memory_mb holds inside a sandbox as in any invocation: past it the guest traps, and the
    // sandbox fails with the reason (its memory is not trusted after a trap).
    let response = ingress(&kiln, &b, "/grow?kib=65536")
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(response.status(), 502, "{}", response.text().unwrap());
    let failed = record(&kiln, &b);
    assert_eq!(failed["state"], "failed");
    assert!(!failed["error"].as_str().unwrap().is_empty(), "{failed}");

    // The disk budget: a state that would pass --max-data-bytes (40 MiB) is 507, and the sandbox runs on
    // with its memory as it was.
    let d = created_when_room(&kiln);
    let huge = counter(&kiln, &d, "/grow?kib=49152&seed=9");
    expect_error(action(&kiln, &d, "suspend"), 507, "insufficient_storage");
    assert_eq!(record(&kiln, &d)["state"], "running");
    let after = counter(&kiln, &d, "/");
    assert_eq!((count_of(&after), buffer_of(&after)), (2, buffer_of(&huge)));
}

#[test]
fn bad_sandbox_requests_get_clear_errors() {
    let kiln = Kiln::start();
    kiln.must_deploy("plain", crate::support::wat("hello"));
    expect_error(create(&kiln, json!({"function": "nope"})), 404, "not_found");
    expect_error(create(&kiln, json!({"function": "plain"})), 400, "invalid_request");
    expect_error(create(&kiln, json!({"function": "../x"})), 400, "invalid_request");
    expect_error(
        create(&kiln, json!({"function": "plain", "on_idle": "explode"})),
        400,
        "invalid_request",
    );
    expect_error(kiln.get("/v1/sandboxes/not-an-id"), 404, "not_found");
    expect_error(
        client()
            .get(kiln.url("/sbx/sbx_zzzzzzzzzzzzzzzzzzzzzzzzzz/"))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap(),
        404,
        "not_found",
    );
    // exec, shell and files are the microVM tier's: a Wasm sandbox says so, naming its tier.
    kiln.must_deploy("hello", component("http-hello"));
    let id = created(&kiln, json!({"function": "hello"}));
    for (method, what) in [
        (reqwest::Method::POST, "exec"),
        (reqwest::Method::GET, "shell"),
        (reqwest::Method::GET, "files?path=/etc/hostname"),
        (reqwest::Method::PUT, "files?path=/tmp/x"),
    ] {
        let error = expect_error(
            client()
                .request(method, kiln.url(&format!("/v1/sandboxes/{id}/{what}")))
                .bearer_auth(&kiln.token)
                .json(&json!({"argv": ["ls"]}))
                .send()
                .unwrap(),
            400,
            "invalid_request",
        );
        assert!(error["message"].as_str().unwrap().contains("wasm tier"), "{error}");
    }
    expect_error(
        kiln.get("/v1/sandboxes/sbx_zzzzzzzzzzzzzzzzzzzzzzzzzz/shell"),
        404,
        "not_found",
    );
    expect_error(kiln.get(&format!("/v1/sandboxes/{id}/exec")), 405, "method_not_allowed");
    // A sandbox token with the exec scope stands in for Kiln's token there (and reaches the
    // tier's answer); one with only the ingress scope, or none, does not.
    let exec_token = sandbox_token(&kiln, &id, &["exec"]);
    let ingress_token = sandbox_token(&kiln, &id, &["ingress"]);
    let exec = |token: Option<&str>| {
        let request = client()
            .post(kiln.url(&format!("/v1/sandboxes/{id}/exec")))
            .json(&json!({"argv": ["ls"]}));
        match token {
            Some(token) => request.header("x-kiln-sandbox-token", token),
            None => request,
        }
        .send()
        .unwrap()
    };
    expect_error(exec(Some(&exec_token)), 400, "invalid_request");
    expect_error(exec(Some(&ingress_token)), 403, "forbidden");
    expect_error(exec(None), 401, "unauthorized");
}

/// Regular files under `dir`, at any depth.
fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => files_under(&e.path()),
                    Ok(t) if t.is_file() => 1,
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
