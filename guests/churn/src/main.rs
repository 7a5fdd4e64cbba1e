//! Hostile component: churns WASI resource handles (pollables from the monotonic clock).
//! stdin `hoard`: creates handles and never drops them. Expected: 502 function_failed, "resource
//! table has no free keys" (Kiln allows 10,000 host objects per instance), host memory flat.
//! stdin `churn N`: creates and drops N handles one at a time. Expected: 200 "churned N" (dropped
//! handles are freed, so churn is not hoarding).

use std::io::Read;

use wasi::clocks::monotonic_clock::subscribe_duration;

fn main() {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).unwrap();
    let mut words = input.split_whitespace();
    match words.next() {
        Some("hoard") => {
            let mut held = Vec::new();
            loop {
                held.push(subscribe_duration(1_000_000_000));
            }
        }
        Some("churn") => {
            let n: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
            for _ in 0..n {
                drop(subscribe_duration(1_000_000_000));
            }
            println!("churned {n}");
        }
        _ => {
            eprintln!("churn: say `hoard` or `churn N`");
            std::process::exit(2);
        }
    }
}
