//! A snapshot's state file (`Snapshot::load`'s decoder): any bytes. What decodes re-encodes to a
//! canonical form that decodes to itself.
#![no_main]

use kiln_vmm::persist::reencode_state;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(canonical) = reencode_state(data) {
        assert!(canonical.starts_with(b"KILNSNAP"));
        let again = reencode_state(&canonical).expect("an encoded state decodes");
        assert_eq!(again, canonical, "encoding is not canonical");
    }
});
