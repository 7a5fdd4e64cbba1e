//! `allowed_hosts` entries (`Rule::parse`, `check_allowed_hosts`): one entry per line. A parsed
//! rule round-trips through its canonical form, allows its own destination, and allows a host only
//! when the host is its name, one of its subdomains, or its address.
#![no_main]

use std::net::IpAddr;

use kiln_core::tier::wasm::egress::{check_allowed_hosts, Rule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let entries: Vec<String> = text.lines().map(str::to_owned).collect();
    let rules: Vec<Option<Rule>> = entries.iter().map(|e| Rule::parse(e).ok()).collect();
    assert_eq!(check_allowed_hosts(&entries).is_ok(), rules.iter().all(Option::is_some));

    for rule in rules.iter().flatten() {
        let canonical = rule.to_string();
        assert_eq!(
            Rule::parse(&canonical).as_ref(),
            Ok(rule),
            "{canonical} does not round-trip"
        );
        let (https, host, port) = parts(&canonical);
        match host.strip_prefix("*.") {
            Some(suffix) => {
                assert!(rule.allows(https, &format!("a.{suffix}"), port));
                assert!(!rule.allows(https, suffix, port), "*.{suffix} allows {suffix} itself");
            }
            None => assert!(rule.allows(https, host, port)),
        }
        assert!(!rule.allows(!https, host.trim_start_matches("*."), port));
        assert!(!rule.allows(https, host.trim_start_matches("*."), port.wrapping_add(1)));
        // Every line, taken as a host, against every rule.
        for candidate in text.lines() {
            if rule.allows(https, candidate, port) {
                assert!(
                    is_allowed_host(host, candidate),
                    "{canonical} allows the host {candidate:?}"
                );
            }
        }
    }
});

/// `scheme://host:port` of a canonical entry.
fn parts(canonical: &str) -> (bool, &str, u16) {
    let (scheme, rest) = canonical.split_once("://").unwrap();
    let (host, port) = rest.rsplit_once(':').unwrap();
    (scheme == "https", host, port.parse().unwrap())
}

/// The oracle: what `host` (a rule's canonical host) may match, written independently.
fn is_allowed_host(host: &str, candidate: &str) -> bool {
    let unbracket = |h: &str| h.trim_start_matches('[').trim_end_matches(']').to_owned();
    if let Ok(ip) = unbracket(host).parse::<IpAddr>() {
        return unbracket(candidate).parse::<IpAddr>() == Ok(ip);
    }
    if unbracket(candidate).parse::<IpAddr>().is_ok() {
        return false;
    }
    let name = candidate.trim_end_matches('.').to_ascii_lowercase();
    match host.strip_prefix("*.") {
        Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}")),
        None => name == host,
    }
}
