//! The Linux guest image — Debian's cloud kernel, and the initramfs Kiln builds with its guest
//! agent as `/init` and a function as `/function` — booted under QEMU with TCG (software
//! emulation: this host's KVM cannot run Linux, see the README), exchanging framed requests with
//! the agent over a serial port. One slow test (about 10–30 s); it proves the image and the
//! agent, not Kiln's VMM.
//!
//! Needs `qemu-system-x86_64`, the kernel at `target/kiln-guest/vmlinuz` (both installed by
//! `runtime/scripts/setup.sh`) and the `x86_64-unknown-linux-musl` Rust target; without them it
//! prints what is missing and passes without running.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_vmm::devices::channel::Channel;
use kiln_vmm::initramfs;
use kiln_vmm::{Frame, FrameKind};

#[path = "support/musl.rs"]
mod musl;

const BOOT_LIMIT: Duration = Duration::from_secs(50);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the agent and the test function as static musl executables.
fn build_guest_binaries() -> Result<(Vec<u8>, Vec<u8>), String> {
    let target_dir = workspace().join("target/kiln-guest/cargo");
    let bin = musl::build(&workspace(), &target_dir, &[&["-p", "kiln-guest-agent"]])?;
    let read = |name: &str| std::fs::read(bin.join(name)).expect("built guest binary");
    Ok((read("kiln-agent"), read("kiln-upper")))
}

struct Qemu {
    child: Child,
    stdin: std::process::ChildStdin,
    bytes: mpsc::Receiver<Vec<u8>>,
    channel: Channel,
}

impl Qemu {
    fn boot(kernel: &Path, initrd: &Path, console: &Path) -> Qemu {
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "256",
                "-smp",
                "1",
                "-nodefaults",
                "-no-reboot",
                "-display",
                "none",
            ])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet kiln.channel=/dev/ttyS1"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-serial", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qemu");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, bytes) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Qemu {
            child,
            stdin,
            bytes,
            channel: Channel::new(),
        }
    }

    fn receive(&mut self, deadline: Instant, console: &Path) -> Frame {
        loop {
            if let Some(frame) = self.channel.take_frame() {
                return frame;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.bytes.recv_timeout(left) {
                Ok(bytes) => {
                    self.channel.write(&bytes).expect("the agent's frames are well formed");
                }
                Err(_) => panic!(
                    "no frame from the agent in time; guest console:\n{}",
                    std::fs::read_to_string(console).unwrap_or_default()
                ),
            }
        }
    }

    fn send(&mut self, frame: Frame) {
        self.stdin.write_all(&frame.encode()).unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_debian_kernel_extracts_to_an_elf_vmlinux_and_loads() {
    let kernel = workspace().join("target/kiln-guest/vmlinuz");
    let Ok(bzimage) = std::fs::read(&kernel) else {
        return kiln_testkit::skip(
            "linux_guest::the_debian_kernel_extracts_to_an_elf_vmlinux_and_loads",
            &format!("needs {} (runtime/scripts/setup.sh fetches it)", kernel.display()),
        );
    };
    let vmlinux = kiln_vmm::kernel::extract_vmlinux(&bzimage).unwrap();
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([vmlinux[18], vmlinux[19]]), 62, "x86_64");
    let memory = kiln_vmm::vstate::memory::GuestMemory::anonymous(256 << 20).unwrap();
    let loaded = kiln_vmm::kernel::load_vmlinux(&memory, &vmlinux).unwrap();
    assert!(
        loaded.start >= 0x10_0000 && loaded.end > loaded.start && loaded.end < 256 << 20,
        "{loaded:?}"
    );
    assert!((loaded.start..loaded.end).contains(&loaded.entry), "{loaded:?}");
    let pvh = loaded.pvh_entry.expect("Debian's kernel has a PVH note");
    assert!((loaded.start..loaded.end).contains(&pvh), "{loaded:?}");
    for entry in [loaded.entry, pvh] {
        let mut code = [0u8; 16];
        memory.read(entry, &mut code).unwrap();
        assert_ne!(code, [0; 16], "nothing loaded at the entry point {entry:#x}");
    }
    eprintln!(
        "vmlinux: {} bytes, loaded at {:#x}..{:#x}, entry {:#x}, PVH entry {pvh:#x}",
        vmlinux.len(),
        loaded.start,
        loaded.end,
        loaded.entry
    );
}

#[test]
fn the_linux_image_boots_under_qemu_and_its_agent_serves_requests() {
    let kernel = workspace().join("target/kiln-guest/vmlinuz");
    let qemu_found = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();
    let skip = |reason: &str| {
        kiln_testkit::skip(
            "linux_guest::the_linux_image_boots_under_qemu_and_its_agent_serves_requests",
            reason,
        )
    };
    if !kernel.exists() || !qemu_found {
        return skip(&format!(
            "needs {} and qemu-system-x86_64 (runtime/scripts/setup.sh installs both)",
            kernel.display()
        ));
    }
    let (agent, function) = match build_guest_binaries() {
        Ok(binaries) => binaries,
        Err(reason) => return skip(&reason),
    };
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(
        &initrd,
        initramfs::function_image(&agent, &function, &[("GREETING", "hello")]),
    )
    .unwrap();
    let console = dir.path().join("console.log");

    let started = Instant::now();
    let mut qemu = Qemu::boot(&kernel, &initrd, &console);
    let ready = qemu.receive(started + BOOT_LIMIT, &console);
    assert_eq!(ready, Frame::new(FrameKind::Ready, Vec::new()));
    eprintln!("Linux + agent ready under QEMU TCG after {:?}", started.elapsed());

    let deadline = Instant::now() + Duration::from_secs(20);
    qemu.send(Frame::new(FrameKind::Reseed, vec![7u8; 32]));
    qemu.send(Frame::new(FrameKind::Request, b"hello from the host".to_vec()));
    let log = qemu.receive(deadline, &console);
    assert_eq!(log, Frame::new(FrameKind::Log, b"upper: 19 bytes\n".to_vec()));
    let response = qemu.receive(deadline, &console);
    let expected = [0i32.to_le_bytes().as_slice(), b"HELLO FROM THE HOST"].concat();
    assert_eq!(response, Frame::new(FrameKind::Response, expected));

    // The function sees exactly the environment of its image.
    qemu.send(Frame::new(FrameKind::Request, b"env".to_vec()));
    let response = qemu.receive(deadline, &console);
    let expected = [0i32.to_le_bytes().as_slice(), b"GREETING=hello\n"].concat();
    assert_eq!(response, Frame::new(FrameKind::Response, expected));

    // The function's exit code comes back; the agent keeps serving.
    qemu.send(Frame::new(FrameKind::Request, b"fail".to_vec()));
    let response = qemu.receive(deadline, &console);
    assert_eq!(response, Frame::new(FrameKind::Response, 3i32.to_le_bytes().to_vec()));
}
