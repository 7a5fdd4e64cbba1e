//! Limits that keep one guest from hurting the host or the other guests.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{client, expect_error, hostile, Kiln};

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
    std::thread::sleep(Duration::from_millis(200));
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
