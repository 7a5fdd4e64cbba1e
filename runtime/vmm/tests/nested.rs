//! Kiln's own VMM booting the real Linux guest, on a host whose KVM cannot run Linux (PVM) or that
//! has no KVM at all: by nesting. QEMU with software emulation (TCG, `-cpu max`: AMD SVM with
//! nested paging, emulated) runs Debian's kernel with its KVM modules; the VM's `/init` is the
//! `linux` example in PID-1 mode, which loads the modules and then, on `/dev/kvm` inside the VM,
//! boots the kernel + Kiln's initramfs (agent + `kiln-upper`) on `kiln-vmm` to the agent's READY
//! (64-bit boot protocol), snapshots it, invokes the snapshotted VM, and restores five VMs from
//! the snapshot, each reseeded and invoked; then does the same through the jail (`kiln_vmm::jail`):
//! boot and snapshot in one jailed helper, five restores + invocations in five more. It proves the Linux path's correctness, not its speed:
//! everything runs emulated (a boot to READY takes 20–60 s here).
//!
//! Slow (one to three minutes). Needs `qemu-system-x86_64`, the kernel and its KVM modules in
//! `target/kiln-guest/` (`runtime/vmm/scripts/guest-kernel.sh`), and the
//! `x86_64-unknown-linux-musl` target; without them it prints what is missing and passes without
//! running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_vmm::initramfs::Initramfs;

#[path = "support/musl.rs"]
mod musl;

const LIMIT: Duration = Duration::from_secs(900);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the agent, the test function and the `linux` example as static musl executables.
fn build(target_dir: &Path) -> Result<(), String> {
    let packages: [&[&str]; 2] = [&["-p", "kiln-guest-agent"], &["-p", "kiln-vmm", "--example", "linux"]];
    musl::build(&workspace(), target_dir, &packages).map(drop)
}

#[test]
fn kilns_vmm_boots_snapshots_and_restores_the_linux_guest_nested_in_qemu() {
    let guest = workspace().join("target/kiln-guest");
    let kernel = guest.join("vmlinuz");
    let modules = ["1-irqbypass.ko", "2-kvm.ko", "3-kvm-amd.ko"].map(|m| guest.join("modules").join(m));
    let qemu_found = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();
    let skip = |reason: &str| {
        kiln_testkit::skip(
            "nested::kilns_vmm_boots_snapshots_and_restores_the_linux_guest_nested_in_qemu",
            reason,
        )
    };
    if !kernel.exists() || modules.iter().any(|m| !m.exists()) || !qemu_found {
        return skip(&format!(
            "needs {}, the KVM modules in {} (runtime/vmm/scripts/guest-kernel.sh) and qemu-system-x86_64",
            kernel.display(),
            guest.join("modules").display()
        ));
    }
    let target_dir = guest.join("cargo");
    if let Err(reason) = build(&target_dir) {
        return skip(&reason);
    }
    let bin = target_dir.join("x86_64-unknown-linux-musl/release");
    let read = |path: &Path| std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    // The outer VM's initramfs: the runner as /init, its inputs, the KVM modules.
    let mut image = Initramfs::new();
    for dir in ["dev", "proc", "sys", "tmp", "modules"] {
        image.dir(dir, 0o755);
    }
    image
        .char_device("dev/console", 0o600, 5, 1)
        .char_device("dev/null", 0o666, 1, 3);
    image.file("init", 0o755, &read(&bin.join("examples/linux")));
    image.file("agent", 0o755, &read(&bin.join("kiln-agent")));
    image.file("function", 0o755, &read(&bin.join("kiln-upper")));
    image.file("vmlinuz", 0o644, &read(&kernel));
    for module in &modules {
        let name = module.file_name().unwrap().to_str().unwrap();
        image.file(&format!("modules/{name}"), 0o644, &read(module));
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("outer.cpio");
    std::fs::write(&initrd, image.finish()).unwrap();

    let started = Instant::now();
    let output = Command::new("timeout")
        .arg(LIMIT.as_secs().to_string())
        .args([
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init quiet"])
        .output()
        .expect("running qemu");
    let console = String::from_utf8_lossy(&output.stdout);
    eprintln!("nested run took {:?}; its console:\n{console}", started.elapsed());

    if !console.contains("/dev/kvm exists: true") {
        // This QEMU emulates no SVM (or its kernel refused the modules): nothing to nest in.
        return skip("KVM did not load inside the emulated VM (see its console above)");
    }
    // The VM booted to READY by Kiln's VMM serves a request...
    assert!(
        console.contains("the snapshotted VM itself: Ok(Reply { exit_code: 0"),
        "the booted guest did not answer"
    );
    // ...and so does every VM restored from its snapshot (reseeded, then the request).
    assert!(
        console.contains(r#"first reply: exit 0 stdout "HELLO FROM THE HOST" log "upper: 19 bytes\n""#),
        "a restored guest did not answer"
    );
    assert!(
        console.contains("restore + invoke + teardown"),
        "not every restore answered"
    );
    // A function that outgrows the guest's memory is killed by the guest's kernel (SIGKILL: 137).
    assert!(
        console.contains("hog reply: exit 137"),
        "the memory hog was not OOM-killed"
    );
    // The same deploy and invocations through the jail: a helper process per VM, in its own
    // namespaces, behind its seccomp filter.
    assert!(
        console.contains("jail probe: ok"),
        "the jail does not work in the nested VM"
    );
    assert!(
        console.contains(r#"jailed reply: exit 0 stdout "HELLO FROM THE JAIL" log "upper: 19 bytes\n""#),
        "a guest booted and restored in the jail did not answer"
    );
    assert!(
        console.contains("jailed restore + invoke"),
        "not every jailed restore answered"
    );
    assert!(console.contains("nested run finished: ok"));
}
