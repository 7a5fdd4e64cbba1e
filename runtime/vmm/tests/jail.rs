//! The microVM tier in a jail (`kiln_vmm::jail`), on this host's real `/dev/kvm` with the test
//! guests: jailed restores answer as in-process ones do; the worker runs in its own namespaces
//! with seccomp and `no_new_privs`; a forbidden syscall is killed with SIGSYS; a killed or stopped
//! helper is an error, promptly, never a hang; timeouts and the memory limit keep their errors;
//! snapshots booted in the jail restore anywhere. Each test skips (visibly) where there is no KVM
//! or the namespaces are refused.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_vmm::jail::protocol::{decode_frame, decode_header, Message, HEADER_LEN};
use kiln_vmm::jail::{ForbiddenSyscall, HelperExit, JailError};
use kiln_vmm::test_guest::{self, AGENT_LOG};
use kiln_vmm::{ConfigError, Frame, FrameKind, Reply, RunError, Snapshot, VmConfig};

#[path = "support/jail.rs"]
mod support;
use support::{jail, snapshot, BOOT};

const REQUEST: Duration = Duration::from_secs(10);

fn agent_reply(exit_code: i32, seed: &[u8; 32], input: &[u8]) -> Reply {
    Reply {
        exit_code,
        stdout: [seed.as_slice(), input].concat(),
        log: AGENT_LOG.to_vec(),
        log_truncated: false,
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill with a pid the test got from the jail and a signal number.
    assert_eq!(
        unsafe { libc::kill(pid as libc::pid_t, signal) },
        0,
        "kill({pid}, {signal})"
    );
}

#[test]
fn jailed_restores_answer_like_in_process_ones_with_a_fresh_seed_each() {
    let Some((hv, jail)) = jail("jailed_restores_answer_like_in_process_ones", support::config()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot(&hv, &test_guest::agent(), 4, dir.path());
    for i in 0..6u8 {
        let seed = [i + 1; 32];
        let input = format!("invocation {i}");
        let jailed = jail
            .restore_and_invoke(dir.path(), &seed, input.as_bytes(), REQUEST, 4096)
            .unwrap();
        let in_process = snapshot
            .restore(&hv)
            .unwrap()
            .invoke(&seed, input.as_bytes(), REQUEST, 4096)
            .unwrap();
        assert_eq!(jailed, in_process, "restore {i}");
        // Exit code 0: the first request after a restore, each time; the guest echoes this seed.
        assert_eq!(jailed, agent_reply(0, &seed, input.as_bytes()), "restore {i}");
    }
    // The log cap holds across the process boundary.
    let capped = jail.restore_and_invoke(dir.path(), &[9; 32], b"x", REQUEST, 2).unwrap();
    assert_eq!((capped.log.as_slice(), capped.log_truncated), (&b"lo"[..], true));
}

/// `/proc/<pid>/ns/<name>` of a process, as a link target (`mnt:[4026531841]`).
fn namespace(pid: &str, name: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{name}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{name}: {e}"))
        .display()
        .to_string()
}

fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
        .trim()
        .to_owned()
}

#[test]
fn the_worker_runs_in_its_own_namespaces_with_seccomp_and_no_new_privs() {
    let test = "the_worker_runs_in_its_own_namespaces_with_seccomp_and_no_new_privs";
    let Some((hv, jail)) = jail(test, support::config()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    snapshot(&hv, &test_guest::spin(), 2, dir.path());
    let mut helper = jail.spawn().unwrap();
    let pid = helper.worker_pid();
    assert_ne!(pid, helper.supervisor_pid());
    let (jailed, on_jailed) = mpsc::channel();
    helper.on_jailed(move |pid| jailed.send(pid).unwrap());
    let snapshot_dir = dir.path().to_path_buf();
    let invocation = std::thread::spawn(move || {
        helper.restore_and_invoke(&snapshot_dir, &[0; 32], b"spin", Duration::from_secs(60), 4096)
    });
    // The spinning guest keeps the worker alive until the test is done looking at it.
    assert_eq!(on_jailed.recv_timeout(REQUEST).unwrap(), pid);
    let pid_text = pid.to_string();
    for ns in ["mnt", "pid", "net", "user", "ipc", "uts"] {
        assert_ne!(
            namespace(&pid_text, ns),
            namespace("self", ns),
            "the worker shares the {ns} namespace"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&status, "Seccomp"), "2", "seccomp filter mode");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&status, caps), "0000000000000000", "{caps}");
    }
    // PID 1 of its own PID namespace.
    assert_eq!(status_field(&status, "NSpid").split_whitespace().last(), Some("1"));
    // Its root is the snapshot's directory (the same inode; the path reads "/" from outside, as
    // its mount exists only in the worker's namespace) holding the snapshot's two files...
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata(format!("/proc/{pid}/root/.")).unwrap();
    let snapshot_dir = std::fs::metadata(dir.path()).unwrap();
    assert_eq!((root.dev(), root.ino()), (snapshot_dir.dev(), snapshot_dir.ino()));
    // Its whole mount table is that one directory, read-only, without devices, suid or exec.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let lines: Vec<&str> = mounts.lines().collect();
    assert_eq!(lines.len(), 1, "{mounts}");
    let fields: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(fields[4], "/", "{mounts}");
    for flag in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(fields[5].split(',').any(|f| f == flag), "mount options {}", fields[5]);
    }
    let mut seen: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, ["memory", "state"]);
    // ...and it holds no descriptor to anything else: the pipes, KVM (/dev/kvm, the VM, the vCPU)
    // and the snapshot's memory file (the state file is read and closed).
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| std::fs::read_link(e.unwrap().path()).unwrap().display().to_string())
        .collect();
    for fd in &fds {
        let allowed =
            fd.starts_with("pipe:") || fd == "/dev/kvm" || fd.starts_with("anon_inode:kvm") || fd == "/memory";
        assert!(allowed, "the worker holds {fd} (all: {fds:?})");
    }
    assert!(
        fds.iter().any(|fd| fd == "/dev/kvm") && fds.iter().any(|fd| fd == "/memory"),
        "{fds:?}"
    );
    signal(pid, libc::SIGKILL);
    let err = invocation.join().unwrap().unwrap_err();
    assert!(
        matches!(err, JailError::Died(HelperExit::Signal(libc::SIGKILL))),
        "{err}"
    );
}

#[test]
fn a_forbidden_syscall_kills_the_helper_with_sigsys() {
    let Some((_hv, jail)) = jail("a_forbidden_syscall_kills_the_helper_with_sigsys", support::config()) else {
        return;
    };
    for syscall in [ForbiddenSyscall::Socket, ForbiddenSyscall::OpenEtcPasswd] {
        let err = jail.probe_forbidden(syscall);
        assert!(
            matches!(err, JailError::Died(HelperExit::Signal(libc::SIGSYS))),
            "{syscall:?}: {err}"
        );
    }
}

#[test]
fn killing_the_worker_mid_invoke_answers_died_within_a_second() {
    let Some((hv, jail)) = jail("killing_the_worker_mid_invoke_answers_died", support::config()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    snapshot(&hv, &test_guest::spin(), 2, dir.path());
    for _ in 0..3 {
        let mut helper = jail.spawn().unwrap();
        let (jailed, on_jailed) = mpsc::channel();
        helper.on_jailed(move |pid| jailed.send(pid).unwrap());
        let snapshot_dir = dir.path().to_path_buf();
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let outcome = helper.restore_and_invoke(&snapshot_dir, &[1; 32], b"", Duration::from_secs(60), 4096);
            done.send((outcome, Instant::now())).unwrap();
        });
        let pid = on_jailed.recv_timeout(REQUEST).unwrap();
        let killed = Instant::now();
        signal(pid, libc::SIGKILL);
        let (outcome, answered) = finished.recv_timeout(Duration::from_secs(5)).expect("the host hangs");
        let err = outcome.unwrap_err();
        assert!(
            matches!(err, JailError::Died(HelperExit::Signal(libc::SIGKILL))),
            "{err}"
        );
        let took = answered - killed;
        assert!(took < Duration::from_secs(1), "Died came {took:?} after the kill");
    }
}

#[test]
fn a_spinning_guest_stops_at_its_timeout_with_the_in_process_error() {
    let Some((hv, jail)) = jail("a_spinning_guest_stops_at_its_timeout", support::config()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    snapshot(&hv, &test_guest::spin(), 2, dir.path());
    let timeout = Duration::from_millis(100);
    for _ in 0..3 {
        let started = Instant::now();
        let err = jail
            .restore_and_invoke(dir.path(), &[0; 32], b"in", timeout, 4096)
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(err.run_error(), Some(RunError::Timeout(t)) if *t == timeout),
            "{err}"
        );
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(2),
            "took {took:?}"
        );
    }
    // The memory limit keeps its error too.
    let size: u64 = 4 << 20;
    let touch_dir = tempfile::tempdir().unwrap();
    snapshot(&hv, &test_guest::touch(size + 0x1234), 4, touch_dir.path());
    let err = jail
        .restore_and_invoke(touch_dir.path(), &[0; 32], b"", REQUEST, 4096)
        .unwrap_err();
    assert!(
        matches!(err.run_error(), Some(RunError::MemoryExceeded { addr, size: s }) if *addr == size + 0x1234 && *s as u64 == size),
        "{err}"
    );
}

#[test]
fn a_stopped_helper_is_killed_at_the_host_deadline() {
    let mut config = support::config();
    config.margin = Duration::from_millis(300);
    let Some((hv, jail)) = jail("a_stopped_helper_is_killed_at_the_host_deadline", config) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    snapshot(&hv, &test_guest::agent(), 2, dir.path());
    let mut helper = jail.spawn().unwrap();
    // Stopped as soon as it is jailed: it never answers, and its own timer cannot help.
    let (stopped, was_stopped) = mpsc::channel();
    helper.on_jailed(move |pid| {
        signal(pid, libc::SIGSTOP);
        stopped.send(()).unwrap();
    });
    let started = Instant::now();
    // Long enough for a loaded machine to get the helper jailed before the host's deadline.
    let timeout = Duration::from_secs(1);
    let err = helper
        .restore_and_invoke(dir.path(), &[0; 32], b"", timeout, 4096)
        .unwrap_err();
    let took = started.elapsed();
    was_stopped.try_recv().expect("the worker was never jailed");
    let waited = timeout + Duration::from_millis(300);
    assert!(matches!(err, JailError::Hung(d) if d == waited), "{err}");
    // Killed at the deadline, then reaped: its supervisor reports within a second.
    assert!(
        took >= waited && took < waited + Duration::from_secs(1),
        "took {took:?}"
    );
}

#[test]
fn a_snapshot_booted_in_the_jail_restores_in_and_out_of_it() {
    let Some((hv, jail)) = jail("a_snapshot_booted_in_the_jail_restores", support::config()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let report = jail
        .boot_flat64_and_snapshot(&test_guest::agent(), VmConfig::new(4), BOOT, &staging)
        .unwrap();
    assert_eq!(report.memory_size, 4 << 20);
    assert!(staging.join("state").exists() && !staging.join("state.tmp").exists());
    // In process, from the files the jail wrote...
    let snapshot = Snapshot::load(&staging).unwrap();
    let got = snapshot
        .restore(&hv)
        .unwrap()
        .invoke(&[3; 32], b"a", REQUEST, 4096)
        .unwrap();
    assert_eq!(got, agent_reply(0, &[3; 32], b"a"));
    // ...and in the jail.
    let got = jail
        .restore_and_invoke(&staging, &[4; 32], b"b", REQUEST, 4096)
        .unwrap();
    assert_eq!(got, agent_reply(0, &[4; 32], b"b"));
    // Boot failures keep their structure: a size outside the limits, a guest that never gets ready.
    let err = jail
        .boot_flat64_and_snapshot(&test_guest::agent(), VmConfig::new(1), BOOT, &dir.path().join("small"))
        .unwrap_err();
    assert!(
        matches!(err, JailError::Config(ConfigError::MemorySize { requested: 1, .. })),
        "{err}"
    );
    let timeout = Duration::from_millis(100);
    let err = jail
        .boot_flat64_and_snapshot(&[0xeb, 0xfe], VmConfig::new(2), timeout, &dir.path().join("hang"))
        .unwrap_err();
    assert!(
        matches!(err.run_error(), Some(RunError::Timeout(t)) if *t == timeout),
        "{err}"
    );
}

#[test]
fn prestarted_helpers_serve_one_invocation_each() {
    let mut config = support::config();
    config.prestart = 2;
    let Some((hv, jail)) = jail("prestarted_helpers_serve_one_invocation_each", config) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    snapshot(&hv, &test_guest::agent(), 4, dir.path());
    for i in 0..8u8 {
        let seed = [i; 32];
        let got = jail
            .restore_and_invoke(dir.path(), &seed, b"pre", REQUEST, 4096)
            .unwrap();
        assert_eq!(got, agent_reply(0, &seed, b"pre"), "invocation {i}");
    }
}

#[test]
fn a_missing_snapshot_is_an_error_not_a_hang() {
    let Some((_hv, jail)) = jail("a_missing_snapshot_is_an_error_not_a_hang", support::config()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let err = jail
        .restore_and_invoke(&dir.path().join("absent"), &[0; 32], b"", REQUEST, 4096)
        .unwrap_err();
    assert!(matches!(err, JailError::Files(_)), "{err}");
    // A directory without a state file: the helper reports it from inside its jail.
    std::fs::write(dir.path().join("memory"), vec![0; 2 << 20]).unwrap();
    let err = jail
        .restore_and_invoke(dir.path(), &[0; 32], b"", REQUEST, 4096)
        .unwrap_err();
    assert!(matches!(err, JailError::Setup(ref m) if m.contains("state")), "{err}");
    assert!(Path::new(dir.path()).join("memory").exists());
    // An input over the channel's frame limit, refused as in process.
    let huge = vec![0; kiln_vmm::devices::channel::MAX_PAYLOAD as usize + 1];
    let err = jail
        .restore_and_invoke(dir.path(), &[0; 32], &huge, REQUEST, 4096)
        .unwrap_err();
    assert!(matches!(err, JailError::TooLarge { what: "input", .. }), "{err}");
}

#[test]
fn a_jail_is_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<kiln_vmm::jail::Jail>();
    fn send<T: Send>() {}
    send::<kiln_vmm::jail::Helper>();
}

/// The Linux guest kernel `runtime/scripts/setup.sh` fetches, if it is there.
fn guest_kernel() -> Option<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-guest/vmlinuz");
    std::fs::read(path).ok()
}

#[test]
fn a_linux_boot_goes_through_the_jail_as_in_process() {
    let test = "a_linux_boot_goes_through_the_jail_as_in_process";
    let Some((hv, jail)) = jail(test, support::config()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Refused before any VM exists, with the error deploy turns into a 422.
    let long = "x".repeat(kiln_vmm::linux::CMDLINE_MAX);
    let err = jail
        .boot_linux_and_snapshot(&[], &[], &long, VmConfig::new(64), BOOT, &dir.path().join("a"))
        .unwrap_err();
    // The kernel is loaded (and refused) before the command line is checked.
    assert!(
        matches!(err, JailError::LinuxBoot { ref message, run: None } if message.contains("ELF")),
        "{err}"
    );
    let Some(bzimage) = guest_kernel() else {
        kiln_testkit::skip(
            test,
            "no guest kernel at target/kiln-guest/vmlinuz (runtime/scripts/setup.sh fetches it)",
        );
        return;
    };
    let vmlinux = kiln_vmm::kernel::extract_vmlinux(&bzimage).unwrap();
    let err = jail
        .boot_linux_and_snapshot(&vmlinux, &[], &long, VmConfig::new(64), BOOT, &dir.path().join("b"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            JailError::Layout(kiln_vmm::linux::LayoutError::CmdlineTooLong { .. })
        ),
        "{err}"
    );
    // A real boot, whose /init is no agent: it never gets READY. On PVM the kernel barely starts
    // before the timeout; on hardware it panics (no init) and resets. Either way the jailed boot
    // ends as the in-process one does.
    let initramfs = kiln_vmm::initramfs::function_image(b"not an agent", b"", &[]);
    let timeout = Duration::from_secs(2);
    let config = VmConfig::new(128);
    let cmdline = kiln_vmm::linux::DEFAULT_CMDLINE;
    let in_process = match kiln_vmm::MicroVm::boot_linux(&hv, config, &vmlinux, &initramfs, cmdline, timeout) {
        Err(kiln_vmm::LinuxBootError::Boot {
            source: kiln_vmm::BootError::Run(e),
            ..
        }) => e,
        other => panic!("the in-process boot did not stop: {:?}", other.map(drop)),
    };
    let jailed = jail
        .boot_linux_and_snapshot(&vmlinux, &initramfs, cmdline, config, timeout, &dir.path().join("c"))
        .unwrap_err();
    let run = jailed.run_error().unwrap_or_else(|| panic!("{jailed}"));
    assert_eq!(
        std::mem::discriminant(run),
        std::mem::discriminant(&in_process),
        "jailed: {run}; in process: {in_process}"
    );
    assert!(!dir.path().join("c/state").exists());
}

#[test]
fn helpers_get_a_cgroup_where_the_host_delegates_one_and_say_why_not_elsewhere() {
    let test = "helpers_get_a_cgroup_where_the_host_delegates_one";
    let Some((hv, jail)) = jail(test, support::config()) else {
        return;
    };
    let Some(parent) = jail.cgroup_parent() else {
        // This development host: cgroup v1 / hybrid, no controllers in the unified hierarchy.
        let reason = jail.cgroup_unavailable().expect("a reason when there is no cgroup");
        kiln_testkit::skip(test, &format!("helpers run without cgroup limits here: {reason}"));
        return;
    };
    assert!(jail.cgroup_unavailable().is_none());
    let dir = tempfile::tempdir().unwrap();
    snapshot(&hv, &test_guest::spin(), 2, dir.path());
    let mut helper = jail.spawn().unwrap();
    let (jailed, on_jailed) = mpsc::channel();
    helper.on_jailed(move |pid| jailed.send(pid).unwrap());
    let snapshot_dir = dir.path().to_path_buf();
    let run = std::thread::spawn(move || {
        helper.restore_and_invoke(&snapshot_dir, &[0; 32], b"", Duration::from_secs(60), 4096)
    });
    let pid = on_jailed.recv_timeout(REQUEST).unwrap();
    // The worker's cgroup (as the host sees it: the worker's own view is namespaced)...
    let mount = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = kiln_vmm::jail::cgroup::cgroup2_mount(&mount).unwrap();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let cgroup = mount.join(
        kiln_vmm::jail::cgroup::own_cgroup(&own)
            .unwrap()
            .trim_start_matches('/'),
    );
    assert_eq!(cgroup.parent(), Some(parent), "{}", cgroup.display());
    // ...holds its limits: the guest's 2 MiB plus the overhead, one CPU.
    let memory_max: u64 = std::fs::read_to_string(cgroup.join("memory.max"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(memory_max, (2 << 20) + kiln_vmm::jail::cgroup::OVERHEAD_BYTES);
    assert_eq!(
        std::fs::read_to_string(cgroup.join("cpu.max")).unwrap().trim(),
        "100000 100000"
    );
    signal(pid, libc::SIGKILL);
    assert!(matches!(run.join().unwrap(), Err(JailError::Died(_))));
    // Removed once the helper is reaped.
    assert!(!cgroup.exists());
}

#[test]
fn helpers_join_their_cgroup_and_get_its_limits_before_their_request() {
    // A stand-in for a delegated cgroup v2 directory (this host has none): plain files where the
    // kernel's would be, so the jail's cgroup path runs end to end, if without the kernel's effect.
    let fake = tempfile::tempdir().unwrap();
    std::fs::write(fake.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
    let mut config = support::config();
    config.cgroup = kiln_vmm::jail::CgroupSetting::Under(fake.path().into());
    let Some((hv, jail)) = jail("helpers_join_their_cgroup_and_get_its_limits", config) else {
        return;
    };
    assert_eq!(jail.cgroup_parent(), Some(fake.path()));
    let dir = tempfile::tempdir().unwrap();
    snapshot(&hv, &test_guest::agent(), 4, dir.path());
    let before: Vec<_> = std::fs::read_dir(fake.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let reply = jail
        .restore_and_invoke(dir.path(), &[5; 32], b"cg", REQUEST, 4096)
        .unwrap();
    assert_eq!(reply, agent_reply(0, &[5; 32], b"cg"));
    drop(jail);
    let helper = std::fs::read_dir(fake.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir() && !before.contains(p))
        .expect("the helper's cgroup");
    let read = |file: &str| std::fs::read_to_string(helper.join(file)).unwrap();
    // The supervisor wrote itself in (its worker, forked after, follows), and the host set the
    // memory limit for a 4 MiB guest before it sent the request.
    assert_eq!(read("cgroup.procs"), "0");
    assert_eq!(
        read("memory.max"),
        ((4u64 << 20) + 2 + kiln_vmm::jail::cgroup::OVERHEAD_BYTES).to_string()
    );
    assert_eq!(read("cpu.max"), "100000 100000");
}

/// Reads the next helper → host message of a session from its (non-blocking) pipe by `deadline`.
fn next_message(from: &std::os::fd::OwnedFd, pending: &mut Vec<u8>, deadline: Instant) -> Message {
    use std::os::fd::AsRawFd;
    loop {
        if let Some(header) = pending.first_chunk::<HEADER_LEN>() {
            let (_, len) = decode_header(header).unwrap();
            if pending.len() >= HEADER_LEN + len {
                let frame: Vec<u8> = pending.drain(..HEADER_LEN + len).collect();
                return decode_frame(&frame).unwrap();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no message from the session in time");
        let mut ready = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a buffer we own for the read.
        let n = unsafe {
            libc::poll(&mut ready, 1, left.as_millis() as i32);
            let mut buf = [0u8; 64 << 10];
            let n = libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                pending.extend_from_slice(&buf[..n as usize]);
            }
            n
        };
        assert_ne!(n, 0, "the session's pipe closed");
    }
}

/// Writes `message` whole to a session's (non-blocking) pipe.
fn send_message(to: &std::os::fd::OwnedFd, message: &Message) {
    use std::os::fd::AsRawFd;
    let bytes = message.encode();
    let mut written = 0;
    while written < bytes.len() {
        // SAFETY: writing from a buffer we own; one valid pollfd.
        let n = unsafe { libc::write(to.as_raw_fd(), bytes[written..].as_ptr().cast(), bytes.len() - written) };
        if n > 0 {
            written += n as usize;
        } else {
            let mut ready = libc::pollfd {
                fd: to.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: as above.
            unsafe { libc::poll(&mut ready, 1, 1000) };
        }
    }
}

/// The next message must be this frame from the guest.
fn expect_frame(from: &std::os::fd::OwnedFd, pending: &mut Vec<u8>, kind: FrameKind, payload: &[u8]) {
    match next_message(from, pending, Instant::now() + REQUEST) {
        Message::FromGuest(frame) => assert!(
            frame.kind == kind && frame.payload == payload,
            "a {:?} frame of {:?} instead of {kind:?} {payload:?}",
            frame.kind,
            &frame.payload[..frame.payload.len().min(64)]
        ),
        other => panic!("{other:?} instead of a {kind:?} frame"),
    }
}

#[test]
fn a_session_relays_frames_both_ways_and_its_snapshot_restores_into_a_session_that_carries_on() {
    let Some((hv, jail)) = jail(
        "a_session_relays_frames_both_ways_and_its_snapshot_restores_into_a_session_that_carries_on",
        support::config(),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    snapshot(&hv, &test_guest::session(), 4, dir.path());
    let clock = Duration::from_secs(1_800_000_000);
    let mut session_frame = (clock.as_nanos() as u64).to_le_bytes().to_vec();
    session_frame.extend_from_slice(b"ROLE=a\0");

    let session = jail
        .start_session(dir.path(), &[1; 32], clock, b"ROLE=a\0", BOOT)
        .unwrap();
    let (to, from) = session.pipes().unwrap();
    let mut pending = Vec::new();
    // The guest echoes what the helper queued first: RESEED with this seed, then SESSION with the
    // clock and the environment.
    expect_frame(&from, &mut pending, FrameKind::Reseed, &[1; 32]);
    expect_frame(&from, &mut pending, FrameKind::Session, &session_frame);
    for size in [0usize, 1, 5, 4096, 20_000] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        send_message(&to, &Message::ToGuest(Frame::new(FrameKind::Data, payload.clone())));
        match next_message(&from, &mut pending, Instant::now() + REQUEST) {
            Message::FromGuest(frame) => assert!(
                frame.kind == FrameKind::Data && frame.payload == payload,
                "a {size}-byte frame came back changed"
            ),
            other => panic!("{other:?}"),
        }
    }
    // SUSPEND: the snapshot is written beside the one the VM runs from, and the helper ends.
    send_message(&to, &Message::Suspend);
    match next_message(&from, &mut pending, Instant::now() + REQUEST) {
        Message::Suspended(report) => assert_eq!(report.memory_size, 4 << 20),
        other => panic!("{other:?} instead of SUSPENDED"),
    }
    session.finish();
    drop((to, from));
    for (next, name) in [("memory.next", "memory"), ("state.tmp", "state")] {
        std::fs::rename(dir.path().join(next), dir.path().join(name)).unwrap();
    }

    // The new snapshot restores into a session that carries on from where it was, reseeded.
    let session = jail.start_session(dir.path(), &[2; 32], clock, b"", BOOT).unwrap();
    let (to, from) = session.pipes().unwrap();
    let mut pending = Vec::new();
    expect_frame(&from, &mut pending, FrameKind::Reseed, &[2; 32]);
    expect_frame(&from, &mut pending, FrameKind::Session, &session_frame[..8]);
    send_message(&to, &Message::ToGuest(Frame::new(FrameKind::Data, b"after".to_vec())));
    expect_frame(&from, &mut pending, FrameKind::Data, b"after");
    // Dropped: the helper is killed and reaped.
    let worker = session.worker_pid();
    drop(session);
    assert!(
        !Path::new(&format!("/proc/{worker}")).exists(),
        "the session's worker outlived it"
    );
}
