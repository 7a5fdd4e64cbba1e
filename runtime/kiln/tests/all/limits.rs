//! Limits that keep one guest from hurting the host or the other guests.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{client, expect_error, hostile, wait_until, Kiln};

#[test]
fn spinning_guests_time_out_without_starving_the_server() {
    let kiln = Kiln::start();
    let response = kiln.deploy_with("spin", hostile("loop"), json!({"timeout_ms": 1500}));
    assert_eq!(response.status(), 201);
    let started = Instant::now();
    // More spinning guests than this machine has cores.
    let spinners: Vec<_> = (0..4)
        .map(|_| {
            let url = kiln.url("/v1/functions/spin/invoke");
            let token = kiln.token.clone();
            std::thread::spawn(move || client().post(url).bearer_auth(token).send().unwrap())
        })
        .collect();
    wait_until("the four spinners run", Duration::from_secs(5), || {
        kiln.metric("kiln_pool_instances_in_use ") == 4
    });
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(1200) {
        let asked = Instant::now();
        assert_eq!(client().get(kiln.url("/healthz")).send().unwrap().status(), 200);
        slowest = slowest.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        slowest < Duration::from_millis(500),
        "healthz took {slowest:?} while guests spun"
    );
    for spinner in spinners {
        expect_error(spinner.join().unwrap(), 504, "timeout");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "timeouts fired late: {:?}",
        started.elapsed()
    );
}

#[test]
fn guests_see_only_the_configured_environment() {
    let kiln = Kiln::start();
    let config = json!({"env": {"ONLY": "this", "AND": "that=too"}});
    assert_eq!(kiln.deploy_with("env", hostile("env_probe"), config).status(), 201);
    let seen = kiln.invoke("env", "").text().unwrap();
    let mut lines: Vec<&str> = seen.lines().collect();
    lines.sort();
    assert_eq!(lines, ["AND=that=too", "ONLY=this"], "the guest saw: {seen:?}");
    // With no env configured, nothing at all (the server itself runs with PATH, HOME, RUST_LOG...).
    kiln.must_deploy("bare", hostile("env_probe"));
    assert_eq!(kiln.invoke("bare", "").text().unwrap(), "");
}

#[test]
fn the_global_instance_cap_answers_429() {
    let kiln = Kiln::start_with(&["--max-instances", "2"]);
    let response = kiln.deploy_with("sleep", crate::support::wat("sleep"), json!({"timeout_ms": 5000}));
    assert_eq!(response.status(), 201);
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let url = kiln.url("/v1/functions/sleep/invoke");
            let token = kiln.token.clone();
            std::thread::spawn(move || client().post(url).bearer_auth(token).body("700").send().unwrap())
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for call in calls {
        let response = call.join().unwrap();
        if response.status() == 200 {
            ok += 1;
        } else {
            let error = expect_error(response, 429, "too_many_requests");
            assert!(
                error["message"]
                    .as_str()
                    .unwrap()
                    .contains("maximum of 2 concurrent instances"),
                "{error}"
            );
            refused += 1;
        }
    }
    assert!(ok >= 2 && refused >= 1, "{ok} ran, {refused} refused");
    assert!(
        ok <= 4,
        "at most two ran at once, so not all five fit in the 700 ms: {ok}"
    );
}

#[test]
fn components_cannot_hoard_handles_but_may_churn_them() {
    let kiln = Kiln::start();
    let response = kiln.deploy_with("churn", crate::support::component("churn"), json!({"timeout_ms": 5000}));
    assert_eq!(response.status(), 201);
    let error = expect_error(kiln.invoke("churn", "hoard"), 502, "function_failed");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("resource table has no free keys"),
        "{error}"
    );
    assert_eq!(kiln.invoke("churn", "churn 50000").text().unwrap(), "churned 50000\n");
    assert_eq!(client().get(kiln.url("/healthz")).send().unwrap().status(), 200);
}
