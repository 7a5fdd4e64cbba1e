//! Kiln's side of the microVM tier: what it accepts (a static x86_64 Linux ELF executable) and
//! whether this host can run it at all.
//!
//! The VMM itself is the `kiln-vmm` crate (KVM, snapshots, copy-on-write restores, the framed
//! host↔guest channel). Running a user's executable needs a Linux guest (kernel + initramfs with
//! Kiln's guest agent) on that VMM, and a Linux guest needs hardware virtualization: on a KVM
//! without `vmx`/`svm` — a nested PVM backend, as on Kiln's development machines — KVM emulates a
//! non-PVM guest instruction by instruction and Linux never finishes booting. So at start-up Kiln
//! probes the host once ([`Capability::probe`]); where the tier cannot run, a deploy to it gets
//! `503 unavailable` with the reason, after the upload was validated (bad input is `422` on every
//! host, so a client learns about a broken upload before it learns about the host).

use std::path::Path;

use object::elf;
use object::read::elf::{Dyn as _, ElfFile64, FileHeader as _, ProgramHeader as _};
use object::{Endianness, FileKind};

/// Whether this host can run the microvm tier, decided once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    Available,
    Unavailable(String),
}

impl Capability {
    /// Looks at `/dev/kvm` and the CPU's virtualization flags.
    pub fn probe() -> Self {
        Self::decide(
            Path::new("/dev/kvm").exists(),
            kiln_vmm::Hypervisor::open().err().map(|e| e.to_string()),
            &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            Path::new("/sys/module/kvm_pvm").exists(),
        )
    }

    fn decide(has_kvm: bool, kvm_error: Option<String>, cpuinfo: &str, pvm: bool) -> Self {
        if !has_kvm {
            return Self::Unavailable("the microvm tier needs KVM and this host has no /dev/kvm".into());
        }
        if let Some(error) = kvm_error {
            return Self::Unavailable(format!(
                "the microvm tier needs KVM and /dev/kvm cannot be used: {error}"
            ));
        }
        let hardware = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(|l| l.split_whitespace())
            .any(|flag| flag == "vmx" || flag == "svm");
        if !hardware {
            let backend = if pvm { "the nested PVM backend" } else { "a backend" };
            return Self::Unavailable(format!(
                "the microvm tier is not available on this host: its KVM is {backend} without hardware \
                 virtualization (no vmx or svm CPU flag), which cannot boot the Linux guest that runs \
                 native executables"
            ));
        }
        Self::Unavailable(
            "the microvm tier is not available yet: this host has hardware virtualization, but this \
             Kiln build cannot yet boot its Linux guest image (kernel and guest agent) on its VMM"
                .into(),
        )
    }

    pub fn is_available(&self) -> bool {
        matches!(self, Self::Available)
    }

    /// Why the tier cannot run here, if it cannot.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Available => None,
            Self::Unavailable(reason) => Some(reason),
        }
    }
}

/// Checks that `upload` is something the microvm tier could run: a static x86_64 ELF executable.
/// The error is the reason, for a `422 invalid_code`.
pub fn validate_executable(upload: &[u8]) -> Result<(), String> {
    if upload.is_empty() {
        return Err("the upload is empty; the microvm tier runs a static x86_64 Linux executable".into());
    }
    if looks_like_wasm(upload) {
        return Err(
            "this is WebAssembly, which runs on the wasm tier; the microvm tier runs a static \
                    x86_64 Linux ELF executable (deploy Wasm with \"tier\": \"wasm\")"
                .into(),
        );
    }
    match FileKind::parse(upload) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => {
            let machine = upload.get(18..20).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
            return Err(format!(
                "this is a 32-bit ELF for {}; the microvm tier runs x86_64 executables",
                machine_name(machine)
            ));
        }
        _ => return Err("not an ELF executable; the microvm tier runs a static x86_64 Linux executable".into()),
    }
    let file = ElfFile64::<Endianness>::parse(upload).map_err(|e| format!("malformed ELF: {e}"))?;
    let (header, endian) = (file.elf_header(), file.endian());
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(format!(
            "this ELF is built for {}; the microvm tier runs x86_64 executables",
            machine_name(machine)
        ));
    }
    let kind = header.e_type(endian);
    if kind != elf::ET_EXEC && kind != elf::ET_DYN {
        return Err("this ELF is not an executable (an object file or a core dump?)".into());
    }
    for segment in file.elf_program_headers() {
        match segment.p_type(endian) {
            elf::PT_INTERP => {
                let interpreter = segment
                    .interpreter(endian, upload)
                    .ok()
                    .flatten()
                    .map(|i| String::from_utf8_lossy(i).into_owned())
                    .unwrap_or_default();
                return Err(format!(
                    "this executable is dynamically linked (it asks for the loader {interpreter}); \
                     the microvm tier runs static executables (e.g. built for x86_64-unknown-linux-musl)"
                ));
            }
            elf::PT_DYNAMIC => {
                let entries = segment.dynamic(endian, upload).ok().flatten().unwrap_or_default();
                if entries.iter().any(|d| d.d_tag(endian) == elf::DT_NEEDED) {
                    return Err(
                        "this ELF needs shared libraries (DT_NEEDED); the microvm tier runs static \
                                executables (e.g. built for x86_64-unknown-linux-musl)"
                            .into(),
                    );
                }
            }
            _ => {}
        }
    }
    if header.e_entry(endian) == 0 {
        return Err("this ELF has no entry point; is it a shared library?".into());
    }
    Ok(())
}

/// Binary Wasm, or WAT text (which Kiln's wasm tier also accepts).
fn looks_like_wasm(upload: &[u8]) -> bool {
    if upload.starts_with(b"\0asm") {
        return true;
    }
    let text = String::from_utf8_lossy(&upload[..upload.len().min(4096)]);
    let mut rest = text.trim_start();
    while let Some(after) = rest.strip_prefix(";;") {
        rest = after.split_once('\n').map_or("", |(_, tail)| tail).trim_start();
    }
    rest.starts_with("(module") || rest.starts_with("(component")
}

fn machine_name(machine: u16) -> String {
    match machine {
        elf::EM_386 => "x86 (32-bit)".into(),
        elf::EM_ARM => "arm".into(),
        elf::EM_AARCH64 => "aarch64".into(),
        elf::EM_RISCV => "riscv".into(),
        elf::EM_PPC64 => "ppc64".into(),
        elf::EM_S390 => "s390x".into(),
        elf::EM_X86_64 => "x86_64 (32-bit ELF: x32)".into(),
        other => format!("machine type {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capability_names_the_missing_piece() {
        let no_kvm = Capability::decide(false, None, "", false);
        assert!(no_kvm.reason().unwrap().contains("no /dev/kvm"));
        let broken = Capability::decide(true, Some("permission denied".into()), "", false);
        assert!(broken.reason().unwrap().contains("permission denied"));
        let pvm = Capability::decide(true, None, "flags\t: fpu sse2 avx2 hypervisor\n", true);
        let reason = pvm.reason().unwrap();
        assert!(reason.contains("PVM") && reason.contains("vmx"), "{reason}");
        let hardware = Capability::decide(true, None, "flags\t: fpu vmx sse2\n", false);
        assert!(hardware.reason().unwrap().contains("guest image"));
        assert!(!hardware.is_available());
    }

    #[test]
    fn wat_text_is_recognised_behind_comments() {
        assert!(looks_like_wasm(b";; a guest\n  (module)"));
        assert!(looks_like_wasm(b"\0asm\x01\0\0\0"));
        assert!(!looks_like_wasm(b"\x7fELF"));
    }
}
