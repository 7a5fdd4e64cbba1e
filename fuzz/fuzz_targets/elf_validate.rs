//! microVM upload validation (`validate_executable`): any bytes. Whatever is accepted must be what
//! the tier can boot: a 64-bit little-endian x86_64 ELF executable with an entry point.
#![no_main]

use kiln_core::tier::microvm::validate_executable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if validate_executable(data).is_ok() {
        assert!(
            data.starts_with(b"\x7fELF\x02"),
            "accepted something that is not a 64-bit ELF"
        );
        assert_eq!(data[5], 1, "accepted a big-endian ELF");
        assert_eq!(
            u16::from_le_bytes([data[18], data[19]]),
            62,
            "accepted a non-x86_64 ELF"
        );
        assert!(
            matches!(u16::from_le_bytes([data[16], data[17]]), 2 | 3),
            "accepted a non-executable"
        );
        assert_ne!(&data[24..32], &[0; 8], "accepted an ELF without an entry point");
    }
});
