//! The microvm tier through the API: uploads it refuses (422 with a reason, on every host) and,
//! on a host that cannot run it, the 503 and the `/healthz` report that say why.

use serde_json::json;

use crate::support::{client, expect_error, wat, Kiln};

const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

/// A minimal ELF64 executable for `machine`: one PT_LOAD of the whole file (code: `exit(0)`),
/// plus a PT_INTERP naming the glibc loader when `interpreter` is set (a dynamic executable).
fn elf64(machine: u16, interpreter: bool) -> Vec<u8> {
    const EH: usize = 64;
    const PH: usize = 56;
    let phnum = if interpreter { 2 } else { 1 };
    let code_at = EH + PH * phnum;
    let code: &[u8] = &[0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05]; // mov eax, 60; xor edi, edi; syscall
    let interp = b"/lib64/ld-linux-x86-64.so.2\0";
    let interp_at = code_at + code.len();
    let len = interp_at + if interpreter { interp.len() } else { 0 };
    let base = 0x40_0000u64;

    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&machine.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(base + code_at as u64).to_le_bytes()); // e_entry
    f.extend_from_slice(&(EH as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for half in [EH as u16, PH as u16, phnum as u16, 64, 0, 0] {
        f.extend_from_slice(&half.to_le_bytes());
    }
    let mut segment = |kind: u32, flags: u32, offset: usize, size: usize, align: u64| {
        for word in [kind, flags] {
            f.extend_from_slice(&word.to_le_bytes());
        }
        let addr = base + offset as u64;
        for quad in [offset as u64, addr, addr, size as u64, size as u64, align] {
            f.extend_from_slice(&quad.to_le_bytes());
        }
    };
    if interpreter {
        segment(3, 4, interp_at, interp.len(), 1); // PT_INTERP, R
    }
    segment(1, 5, 0, len, 0x1000); // PT_LOAD, R+X, the whole file at `base`
    f.extend_from_slice(code);
    if interpreter {
        f.extend_from_slice(interp);
    }
    assert_eq!(f.len(), len);
    f
}

fn deploy_microvm(kiln: &Kiln, code: Vec<u8>) -> reqwest::blocking::Response {
    kiln.deploy_with("native", code, json!({"tier": "microvm"}))
}

fn refused(kiln: &Kiln, code: Vec<u8>, needle: &str) {
    let error = expect_error(deploy_microvm(kiln, code), 422, "invalid_code");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

#[test]
fn uploads_the_microvm_tier_cannot_run_are_422_with_the_reason() {
    let kiln = Kiln::start();
    refused(&kiln, Vec::new(), "empty");
    refused(&kiln, wat("hello"), "WebAssembly");
    let binary_wasm = b"\0asm\x01\0\0\0".to_vec();
    refused(&kiln, binary_wasm, "WebAssembly");
    refused(&kiln, elf64(EM_X86_64, true), "dynamically linked");
    // A real dynamic executable: the host's `true` (glibc, PIE; Kiln's own binary is over the
    // 64 MiB code cap in debug builds).
    refused(&kiln, std::fs::read("/bin/true").unwrap(), "dynamically linked");
    refused(&kiln, elf64(EM_AARCH64, false), "aarch64");
    let mut elf32 = elf64(EM_386, false);
    elf32[4] = 1; // ELFCLASS32
    refused(&kiln, elf32, "32-bit");
    refused(&kiln, b"#!/bin/sh\necho hi\n".to_vec(), "not an ELF");
    let mut truncated = elf64(EM_X86_64, false);
    truncated.truncate(70);
    refused(&kiln, truncated, "ELF");
    // Nothing was stored.
    expect_error(kiln.get("/v1/functions/native"), 404, "not_found");
}

#[test]
fn a_valid_executable_meets_the_hosts_capability_check() {
    let kiln = Kiln::start();
    let health: serde_json::Value = client().get(kiln.url("/healthz")).send().unwrap().json().unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["tiers"]["wasm"], true);
    // No Kiln build ships the Linux guest image yet, so the tier is unavailable on every host;
    // the reason differs (no /dev/kvm, no hardware virtualization, no image) and is reported.
    assert_eq!(health["tiers"]["microvm"], false, "{health}");
    let reason = health["unavailable"]["microvm"].as_str().unwrap().to_owned();
    let has_hardware_virtualization = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .split_whitespace()
        .any(|flag| flag == "vmx" || flag == "svm");
    if !has_hardware_virtualization {
        assert!(reason.contains("vmx") || reason.contains("/dev/kvm"), "{reason}");
    }

    let error = expect_error(deploy_microvm(&kiln, elf64(EM_X86_64, false)), 503, "unavailable");
    assert_eq!(error["message"], reason.as_str());
    // A real static-pie musl executable (the VMM's test function), when its Linux-guest test has
    // built it, passes validation as well.
    let upper = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/kiln-guest/cargo/x86_64-unknown-linux-musl/release/kiln-upper");
    match std::fs::read(&upper) {
        Ok(code) => {
            expect_error(deploy_microvm(&kiln, code), 503, "unavailable");
        }
        Err(_) => eprintln!(
            "not checked: {} is not built (cargo test -p kiln-vmm builds it)",
            upper.display()
        ),
    }
    expect_error(kiln.get("/v1/functions/native"), 404, "not_found");
    // The wasm tier is unaffected.
    kiln.must_deploy("hello", wat("hello"));
}
