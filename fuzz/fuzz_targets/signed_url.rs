//! Signed result URLs (`Signer::verify`), against a fixed key and a fixed clock. The input is
//! `<id>\n<query>`. Whatever verifies is exactly a URL the signer produced; every URL the signer
//! produces verifies, for that id only.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kiln_core::clock::Clock;
use kiln_core::signing::{Signer, MAX_LIFETIME};
use libfuzzer_sys::fuzz_target;

/// 2027-01-15T08:00:00Z: the seeds' URLs are signed for this instant.
const NOW_SECS: u64 = 1_800_000_000;
/// The fixed key (`fuzz.key`): the seeds are signed with it (see ../README.md).
const KEY: [u8; 32] = [0x4b; 32];
const KID: &str = "fuzz";

struct Fixed;

impl Clock for Fixed {
    fn now_ms(&self) -> u64 {
        NOW_SECS * 1000
    }
}

fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| {
        // Kept for the whole run: the signer reads its key once.
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::write(dir.join(format!("{KID}.key")), KEY).unwrap();
        Signer::open(&dir, Arc::new(Fixed)).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (id, query) = text.split_once('\n').unwrap_or((text, ""));
    let signer = signer();
    assert!(signer.verify(id, None).is_err());

    if signer.verify(id, Some(query)).is_ok() {
        // Only the signer's own URL for this id verifies: same expiry, same key, same hex.
        let expires: u64 = query
            .strip_prefix("expires=")
            .and_then(|q| q.split('&').next())
            .and_then(|e| e.parse().ok())
            .expect("a verified query starts with its expiry");
        assert!(expires >= NOW_SECS && expires - NOW_SECS <= MAX_LIFETIME.as_secs());
        let url = signer.url(id, Duration::from_secs(expires - NOW_SECS));
        assert_eq!(
            url,
            format!("/v1/results/{id}?{query}"),
            "a URL the signer never made verifies"
        );
    }

    // Every URL the signer makes verifies, and only for its own id.
    let lifetime = Duration::from_secs(data.len() as u64 * 977 % (MAX_LIFETIME.as_secs() + 1));
    let url = signer.url(id, lifetime);
    let signed = url
        .strip_prefix(&format!("/v1/results/{id}?"))
        .expect("the URL is /v1/results/<id>?<query>");
    signer.verify(id, Some(signed)).expect("the signer's own URL verifies");
    let mut other = id.to_owned();
    if other.pop().is_none() {
        other.push('x');
    }
    assert!(
        signer.verify(&other, Some(signed)).is_err(),
        "a URL verifies for another id"
    );
});
