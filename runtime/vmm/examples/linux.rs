//! The Linux guest on Kiln's VMM, timed: boot the kernel with an initramfs of the guest agent and
//! a function to the agent's READY, snapshot it, then RUNS times restore + RESEED + REQUEST +
//! teardown — the microvm tier's deploy and invoke paths without the server. Needs hardware
//! virtualization (a PVM `/dev/kvm` cannot boot Linux).
//!
//! Usage: cargo run --release -p kiln-vmm --example linux -- KERNEL AGENT FUNCTION [RUNS] [MEMORY_MIB]
//!        KERNEL is a bzImage or an ELF vmlinux; AGENT and FUNCTION static executables
//!        (defaults: 50 runs, 256 MiB).
//!
//! Run as PID 1 (`/init` of a nested test VM) it first mounts `/proc`, `/sys` and `/dev`, loads
//! the kernel modules in `/modules` in name order (KVM inside the VM), takes its inputs from
//! `/vmlinuz`, `/agent` and `/function`, and powers the VM off at the end. If the VM has a file
//! `/run` (a command line, arguments separated by NUL; `/run-env` likewise holds `KEY=VALUE`
//! entries), it brings up the loopback interface and runs that command instead — e.g. Kiln's API
//! test binary, to drive the `kiln` server inside the nested VM.
//!
//! Then (as PID 1, or with `KILN_JAIL` set) the same through the jail (`kiln_vmm::jail`): boot and
//! snapshot in a jailed helper, then RUNS jailed restores + invocations. The example is its own
//! helper (`linux vmm-jail`), as Kiln's binary is.
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use kiln_vmm::jail::{Jail, JailConfig};
use kiln_vmm::linux::DEFAULT_CMDLINE;
use kiln_vmm::{initramfs, kernel, Hypervisor, MicroVm, Quirks, Snapshot, VmConfig};

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{name:<32} median {:>10.1} µs   p99 {:>10.1} µs   ({} runs)",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}

/// PID 1 of a nested test VM: mounts and loads the KVM modules shipped in `/modules`.
fn prepare_nested_host() {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sys", "/sys", "sysfs"),
        ("dev", "/dev", "devtmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (source, target, fstype) = (c(source), c(target), c(fstype));
        // SAFETY: all pointers are valid NUL-terminated strings for the call.
        unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    }
    let mut modules: Vec<_> = std::fs::read_dir("/modules")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    modules.sort();
    for module in modules {
        let file = std::fs::File::open(&module).expect("module file");
        // SAFETY: finit_module reads the open module file; the empty parameter string is valid.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
        let outcome = match rc {
            0 => "loaded".to_owned(),
            _ => format!("failed: {}", std::io::Error::last_os_error()),
        };
        println!("insmod {}: {outcome}", module.display());
    }
    println!("/dev/kvm exists: {}", std::path::Path::new("/dev/kvm").exists());
}

fn main() {
    if std::env::args_os().nth(1).as_deref() == Some("vmm-jail".as_ref()) {
        kiln_vmm::jail::child_main();
    }
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    if pid1 && std::path::Path::new("/run").exists() {
        prepare_nested_host();
        run_command();
        // SAFETY: reboot with POWER_OFF has no memory-safety preconditions.
        unsafe { libc::reboot(libc::RB_POWER_OFF) };
    }
    let (args, options): (Vec<String>, _) = if pid1 {
        prepare_nested_host();
        let options = Options {
            // Nested under QEMU's TCG: see `kiln_vmm::Quirks`.
            quirks: Quirks {
                available_tss_on_restore: true,
            },
            cmdline_extra: "loglevel=7 print-fatal-signals=1".into(),
            check_original: true,
            jail: true,
        };
        let args = ["/vmlinuz", "/agent", "/function", "5", "256"]
            .map(String::from)
            .to_vec();
        (args, options)
    } else {
        let options = Options {
            quirks: Quirks {
                available_tss_on_restore: std::env::var_os("KILN_QUIRK_AVAILABLE_TSS").is_some(),
            },
            cmdline_extra: std::env::var("KILN_GUEST_CMDLINE_EXTRA").unwrap_or_default(),
            check_original: std::env::var_os("KILN_CHECK_ORIGINAL").is_some(),
            jail: std::env::var_os("KILN_JAIL").is_some(),
        };
        (std::env::args().skip(1).collect(), options)
    };
    let result = std::panic::catch_unwind(|| run(&args, &options));
    if pid1 {
        println!("nested run finished: {}", if result.is_ok() { "ok" } else { "failed" });
        // SAFETY: reboot with POWER_OFF has no memory-safety preconditions.
        unsafe { libc::reboot(libc::RB_POWER_OFF) };
    }
    if result.is_err() {
        std::process::exit(1);
    }
}

/// Brings `lo` up and runs `/run` with `/run-env` as its environment, on this console.
fn run_command() {
    // SAFETY: a plain datagram socket, closed below; `ifreq` is 16 bytes of name then the flags.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut ifreq = [0u8; 40];
        ifreq[..2].copy_from_slice(b"lo");
        let flags = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        let rc = libc::ioctl(socket, libc::SIOCSIFFLAGS as _, ifreq.as_mut_ptr());
        println!(
            "lo up: {}",
            if rc == 0 {
                "ok".to_owned()
            } else {
                std::io::Error::last_os_error().to_string()
            }
        );
        libc::close(socket);
    }
    let split = |path: &str| -> Vec<String> {
        std::fs::read(path)
            .unwrap_or_default()
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let argv = split("/run");
    let env: Vec<(String, String)> = split("/run-env")
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    println!("running {argv:?}");
    let status = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(env)
        .status();
    println!("command finished: {status:?}");
}

/// Knobs, from the environment (or fixed, as PID 1): `KILN_QUIRK_AVAILABLE_TSS` when KVM runs
/// nested under QEMU's TCG, `KILN_GUEST_CMDLINE_EXTRA` appended to Kiln's command line (e.g.
/// `loglevel=7 print-fatal-signals=1`), `KILN_CHECK_ORIGINAL` to invoke the snapshotted VM itself
/// once before restoring, `KILN_JAIL` to run the jailed phase too.
struct Options {
    quirks: Quirks,
    cmdline_extra: String,
    check_original: bool,
    jail: bool,
}

fn run(args: &[String], options: &Options) {
    let [kernel_path, agent_path, function_path, rest @ ..] = args else {
        panic!("usage: linux KERNEL AGENT FUNCTION [RUNS] [MEMORY_MIB]");
    };
    let runs: usize = rest.first().map_or(50, |a| a.parse().expect("RUNS is a number"));
    let memory_mib: u32 = rest.get(1).map_or(256, |a| a.parse().expect("MEMORY_MIB is a number"));
    let read = |path: &str| std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let kernel_file = read(kernel_path);
    let vmlinux = match kernel_file.starts_with(b"\x7fELF") {
        true => kernel_file,
        false => kernel::extract_vmlinux(&kernel_file).expect("a bzImage with an LZ4 payload"),
    };
    let image = initramfs::function_image(&read(agent_path), &read(function_path), &[("GREETING", "hi")]);
    let hv = Hypervisor::open()
        .expect("this example needs /dev/kvm")
        .with_quirks(options.quirks);
    let cmdline = format!("{DEFAULT_CMDLINE} {}", options.cmdline_extra);

    let started = Instant::now();
    let booted = MicroVm::boot_linux(
        &hv,
        VmConfig::new(memory_mib),
        &vmlinux,
        &image,
        cmdline.trim_end(),
        Duration::from_secs(600),
    );
    let mut vm = match booted {
        Ok(vm) => vm,
        Err(e) => panic!("boot failed after {:?}: {e}", started.elapsed()),
    };
    println!(
        "boot to READY                    {:>10.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    println!("at READY: {}", vm.describe_vcpu());
    let snapshot = Snapshot::create(&hv, &mut vm, dir.path()).expect("snapshot");
    println!("snapshotted at: {}", vm.describe_vcpu());
    println!(
        "snapshot                         {:>10.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    if options.check_original {
        vm.keep_console(16 << 10);
        let reply = vm.invoke(&[7; 32], b"on the snapshotted VM", Duration::from_secs(60), 4096);
        println!(
            "the snapshotted VM itself: {reply:?} ({})\n  console: {}",
            vm.describe_vcpu(),
            String::from_utf8_lossy(&vm.console())
        );
    }
    drop(vm);

    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let seed = [i as u8 + 1; 32];
        let started = Instant::now();
        let mut vm = snapshot.restore(&hv).expect("restore");
        let restored = vm.describe_vcpu();
        vm.keep_console(16 << 10);
        let reply = match vm.invoke(&seed, b"hello from the host", Duration::from_secs(60), 4096) {
            Ok(reply) => reply,
            Err(e) => panic!(
                "invoke {i}: {e}\n  restored at: {restored}\n  stopped at:  {}\n  console: {}",
                vm.describe_vcpu(),
                String::from_utf8_lossy(&vm.console())
            ),
        };
        drop(vm);
        samples.push(started.elapsed());
        if i == 0 {
            println!(
                "first reply: exit {} stdout {:?} log {:?}",
                reply.exit_code,
                String::from_utf8_lossy(&reply.stdout),
                String::from_utf8_lossy(&reply.log)
            );
        }
    }
    report("restore + invoke + teardown", samples);

    // The memory limit: a function that outgrows the guest's RAM is killed by its kernel.
    let mut vm = snapshot.restore(&hv).expect("restore");
    match vm.invoke(&[9; 32], b"hog", Duration::from_secs(300), 4096) {
        Ok(reply) => println!("hog reply: exit {}", reply.exit_code),
        Err(e) => println!("hog failed: {e}"),
    }

    drop(snapshot);
    if options.jail {
        run_jailed(&vmlinux, &image, cmdline.trim_end(), memory_mib, runs, options);
    }
}

/// Deploy and invoke through the jail: boot + snapshot in one jailed helper, each restore +
/// invocation in another.
fn run_jailed(vmlinux: &[u8], image: &[u8], cmdline: &str, memory_mib: u32, runs: usize, options: &Options) {
    let exe = std::env::current_exe().expect("this executable");
    let mut config = JailConfig::new(exe, vec!["vmm-jail".into()]);
    config.quirks = options.quirks;
    let jail = Jail::new(config);
    match jail.probe() {
        Ok(()) => println!("jail probe: ok"),
        Err(e) => panic!("jail probe: {e}"),
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let booted = jail.boot_linux_and_snapshot(
        vmlinux,
        image,
        cmdline,
        VmConfig::new(memory_mib),
        Duration::from_secs(600),
        dir.path(),
    );
    match booted {
        Ok(report) => println!(
            "jailed boot to READY + snapshot  {:>10.1} ms (boot {:?}, snapshot {:?})",
            started.elapsed().as_secs_f64() * 1e3,
            report.boot,
            report.snapshot
        ),
        Err(e) => panic!(
            "jailed boot failed after {:?}: {e}{}",
            started.elapsed(),
            seccomp_kills()
        ),
    }
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let seed = [i as u8 + 1; 32];
        let started = Instant::now();
        let reply = jail
            .restore_and_invoke(dir.path(), &seed, b"hello from the jail", Duration::from_secs(60), 4096)
            .unwrap_or_else(|e| panic!("jailed invoke {i}: {e}{}", seccomp_kills()));
        samples.push(started.elapsed());
        if i == 0 {
            println!(
                "jailed reply: exit {} stdout {:?} log {:?}",
                reply.exit_code,
                String::from_utf8_lossy(&reply.stdout),
                String::from_utf8_lossy(&reply.log)
            );
        }
    }
    report("jailed restore + invoke", samples);
}

/// The kernel's log lines about seccomp kills (audit type 1326: which syscall, which process), to
/// say what a helper killed by SIGSYS attempted.
fn seccomp_kills() -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut kmsg) = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return String::new();
    };
    // /dev/kmsg hands out one record per read, until EAGAIN.
    let mut lines = String::new();
    let mut record = [0u8; 8192];
    while let Ok(n @ 1..) = kmsg.read(&mut record) {
        let text = String::from_utf8_lossy(&record[..n]);
        if text.contains("type=1326") {
            lines.push_str("\n  ");
            lines.push_str(text.trim_end());
        }
    }
    lines
}
