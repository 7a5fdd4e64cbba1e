//! Asynchronous invocations: durable submits, retries, signed result URLs, crash safety.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{client, expect_error, raw_exchange, wait_done, wait_until, wat, Kiln};

fn submit(kiln: &Kiln, name: &str, input: &str, key: Option<&str>) -> reqwest::blocking::Response {
    let mut request = client()
        .post(kiln.url(&format!("/v1/functions/{name}/invoke-async")))
        .bearer_auth(&kiln.token)
        .body(input.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().unwrap()
}

fn accepted(response: reqwest::blocking::Response) -> String {
    assert_eq!(response.status(), 202);
    let body: Value = response.json().unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(body["status_url"], format!("/v1/invocations/{id}"));
    id
}

#[test]
fn submit_poll_and_fetch_the_result_without_a_token() {
    let kiln = Kiln::start();
    kiln.must_deploy("echo", wat("echo"));
    let id = accepted(submit(&kiln, "echo", "async hello", None));
    let record = wait_done(&kiln, &id, Duration::from_secs(10));
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["function"], "echo");
    assert_eq!(record["version"], 1);
    assert_eq!(record["attempts"], 1);
    assert!(
        record["finished_at"].is_string() && record["error"].is_null(),
        "{record}"
    );
    let url = record["result_url"].as_str().unwrap();
    let result = client().get(kiln.url(url)).send().unwrap();
    assert_eq!(result.status(), 200);
    assert_eq!(result.text().unwrap(), "async hello");

    // The record itself needs the token; unknown or malformed ids are 404.
    expect_error(
        client().get(kiln.url(&format!("/v1/invocations/{id}"))).send().unwrap(),
        401,
        "unauthorized",
    );
    expect_error(
        kiln.get("/v1/invocations/0193c8a4-0000-7000-8000-000000000001"),
        404,
        "not_found",
    );
    expect_error(kiln.get("/v1/invocations/..%2f..%2fetc"), 404, "not_found");
    expect_error(submit(&kiln, "nope", "", None), 404, "not_found");
    let head = format!(
        "POST /v1/functions/echo/invoke-async HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        kiln.token,
        (1 << 20) + 1
    );
    let (status, body) = raw_exchange(&kiln.addr, head.as_bytes());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");
}

#[test]
pub(crate) fn an_idempotency_key_makes_a_retried_submit_return_the_same_id() {
    let kiln = Kiln::start();
    kiln.must_deploy("echo", wat("echo"));
    let first = accepted(submit(&kiln, "echo", "once", Some("order-42")));
    let again = accepted(submit(&kiln, "echo", "once", Some("order-42")));
    assert_eq!(first, again);
    let other = accepted(submit(&kiln, "echo", "once", Some("order-43")));
    assert_ne!(first, other);
    let plain = accepted(submit(&kiln, "echo", "once", None));
    assert_ne!(plain, first);
    assert_eq!(
        wait_done(&kiln, &first, Duration::from_secs(10))["attempts"],
        1,
        "ran once"
    );
}

#[test]
pub(crate) fn failures_are_retried_and_counted() {
    let kiln = Kiln::start();
    let response = kiln.deploy_with("trap", wat("trap"), json!({"retries": 1}));
    assert_eq!(response.status(), 201);
    let id = accepted(submit(&kiln, "trap", "", None));
    let record = wait_done(&kiln, &id, Duration::from_secs(15));
    assert_eq!(record["state"], "failed", "{record}");
    assert_eq!(record["attempts"], 2, "one run and one retry: {record}");
    assert_eq!(record["error"]["code"], "function_failed");
    assert!(
        record["error"]["trap"].as_str().unwrap().contains("unreachable"),
        "{record}"
    );
    assert_eq!(record["stderr"], "about to trap\n");
    assert!(record["result_url"].is_null());
}

#[test]
fn signed_result_urls_refuse_every_single_byte_change_and_expire() {
    let kiln = Kiln::start();
    kiln.must_deploy("echo", wat("echo"));
    let id = accepted(submit(&kiln, "echo", "secret result", None));
    wait_done(&kiln, &id, Duration::from_secs(10));
    let record: Value = kiln.get(&format!("/v1/invocations/{id}")).json().unwrap();
    let url = record["result_url"].as_str().unwrap().to_owned();
    assert_eq!(
        client().get(kiln.url(&url)).send().unwrap().text().unwrap(),
        "secret result"
    );
    // Every byte after the route prefix: the id, the query's names, values and separators.
    let prefix = "/v1/results/".len();
    for position in prefix..url.len() {
        let mut bytes = url.clone().into_bytes();
        bytes[position] = if bytes[position] == b'a' { b'b' } else { b'a' };
        let mutated = String::from_utf8(bytes).unwrap();
        let response = client().get(kiln.url(&mutated)).send().unwrap();
        assert_eq!(response.status(), 403, "mutation at {position} accepted: {mutated}");
    }
    // Dropping or adding parameters is refused too.
    let (path, query) = url.split_once('?').unwrap();
    for changed in [
        path.to_owned(),
        format!("{url}&x=1"),
        format!("{path}?{}", query.replace("&sig=", "&sig=00")),
    ] {
        assert_eq!(
            client().get(kiln.url(&changed)).send().unwrap().status(),
            403,
            "{changed}"
        );
    }
    // A short-lived URL stops working once past its time (the exact second is the signer's unit
    // test, on its own clock): here it must work at first and then be refused, within 3 s.
    let record: Value = kiln.get(&format!("/v1/invocations/{id}?expires_in=1")).json().unwrap();
    let short = record["result_url"].as_str().unwrap().to_owned();
    let expires: u64 = short
        .split("expires=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now < expires {
        assert_eq!(
            client().get(kiln.url(&short)).send().unwrap().status(),
            200,
            "valid until it expires"
        );
    }
    wait_until("the short-lived URL is refused", Duration::from_secs(3), || {
        client().get(kiln.url(&short)).send().unwrap().status() == 403
    });
    expect_error(client().get(kiln.url(&short)).send().unwrap(), 403, "forbidden");
    expect_error(
        kiln.get(&format!("/v1/invocations/{id}?expires_in=99999999")),
        400,
        "invalid_request",
    );
}

#[test]
fn a_full_queue_answers_429() {
    // No workers: what is accepted stays queued, so the cap is exact.
    let kiln = Kiln::start_with(&["--max-queued", "3", "--async-workers", "0"]);
    kiln.must_deploy("echo", wat("echo"));
    for _ in 0..3 {
        accepted(submit(&kiln, "echo", "x", None));
    }
    let error = expect_error(submit(&kiln, "echo", "x", None), 429, "too_many_requests");
    assert!(
        error["message"].as_str().unwrap().contains("3 invocations waiting"),
        "{error}"
    );
    // A retried submit of an accepted one is still answered: it takes no new place.
    let kiln = Kiln::start_with(&["--max-queued", "1", "--async-workers", "0"]);
    kiln.must_deploy("echo", wat("echo"));
    let id = accepted(submit(&kiln, "echo", "x", Some("k")));
    assert_eq!(accepted(submit(&kiln, "echo", "x", Some("k"))), id);
    expect_error(submit(&kiln, "echo", "x", None), 429, "too_many_requests");
}

#[test]
fn every_accepted_invocation_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut kiln = Kiln::start_in(dir.path(), &[]);
    kiln.must_deploy("echo", wat("echo"));
    let (tx, rx) = std::sync::mpsc::channel();
    let submitters: Vec<_> = (0..8)
        .map(|t| {
            let (url, token, tx) = (
                kiln.url("/v1/functions/echo/invoke-async"),
                kiln.token.clone(),
                tx.clone(),
            );
            std::thread::spawn(move || {
                for i in 0..100 {
                    let body = format!("t{t}-{i}");
                    match client().post(&url).bearer_auth(&token).body(body.clone()).send() {
                        Ok(r) if r.status() == 202 => {
                            let id = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
                            let _ = tx.send((id, body));
                        }
                        _ => break, // the server is gone
                    }
                }
            })
        })
        .collect();
    drop(tx);
    // Kill once a good part has been accepted, while submits and runs are in flight.
    let mut accepted = Vec::new();
    while accepted.len() < 250 {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(item) => accepted.push(item),
            Err(_) => break,
        }
    }
    kiln.kill();
    for s in submitters {
        s.join().unwrap();
    }
    accepted.extend(rx.try_iter());
    assert!(
        accepted.len() >= 250,
        "only {} accepted before the kill",
        accepted.len()
    );

    let kiln = Kiln::start_in(dir.path(), &[]);
    let ids: HashSet<_> = accepted.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), accepted.len(), "ids are unique");
    for (id, body) in &accepted {
        let record = wait_done(&kiln, id, Duration::from_secs(60));
        assert_eq!(record["state"], "succeeded", "{record}");
        let result = client()
            .get(kiln.url(record["result_url"].as_str().unwrap()))
            .send()
            .unwrap();
        assert_eq!(
            &result.text().unwrap(),
            body,
            "invocation {id} has its own input's result"
        );
    }
}

#[test]
pub(crate) fn a_slow_invocation_does_not_hold_back_others_and_large_results_are_files() {
    let kiln = Kiln::start();
    kiln.must_deploy("echo", wat("echo"));
    kiln.must_deploy("sleep", wat("sleep"));
    let slow = accepted(submit(&kiln, "sleep", "5000", None));
    // Larger than what a row keeps inline: stored as a file named by its digest.
    let big: String = (0..300_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let fast = accepted(submit(&kiln, "echo", &big, None));
    let record = wait_done(&kiln, &fast, Duration::from_secs(10));
    assert_eq!(record["state"], "succeeded", "{record}");
    // Its outcome was recorded while the slow one still runs.
    let slow_record: Value = kiln.get(&format!("/v1/invocations/{slow}")).json().unwrap();
    assert_eq!(slow_record["state"], "running", "{slow_record}");

    let url = record["result_url"].as_str().unwrap();
    let result = client().get(kiln.url(url)).send().unwrap();
    assert_eq!(result.status(), 200);
    assert!(result.text().unwrap() == big, "the stored result is not the input");
    use sha2::Digest as _;
    let digest = hex::encode(sha2::Sha256::digest(big.as_bytes()));
    let files: Vec<String> = std::fs::read_dir(kiln.data.join("results"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, vec![digest]);
}
