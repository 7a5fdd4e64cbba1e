//! The VMM's mechanics, end to end on the real `/dev/kvm`, with the tiny guests of
//! `kiln_vmm::test_guest`: boot, framed requests, snapshot, copy-on-write restores, timeouts and
//! the memory limit. Timing numbers come from `kiln-bench`'s `microvm` binary, not from here.

use std::time::{Duration, Instant};

use kiln_vmm::builder::IMAGE_ADDRESS;
use kiln_vmm::test_guest::{self, AGENT_LOG, BUFFER_ADDRESS, COUNTER_ADDRESS, SEED_ADDRESS};
use kiln_vmm::{BootError, ConfigError, Hypervisor, MicroVm, Reply, RequestError, RunError, Snapshot, VmConfig};

const BOOT: Duration = Duration::from_secs(10);
const REQUEST: Duration = Duration::from_secs(10);

/// The host's KVM, or `None` (with the skip recorded for `test`) where there is none: these
/// tests need it.
fn hypervisor(test: &str) -> Option<Hypervisor> {
    match Hypervisor::open() {
        Ok(h) => Some(h),
        Err(e) => {
            kiln_testkit::skip(test, &format!("this host has no usable KVM ({e})"));
            None
        }
    }
}

fn response(count: u32, text: &[u8]) -> Vec<u8> {
    [count.to_le_bytes().as_slice(), text].concat()
}

#[test]
fn echo_guest_boots_and_answers_framed_requests() {
    let Some(hv) = hypervisor("microvm::echo_guest_boots_and_answers_framed_requests") else {
        return;
    };
    let mut vm = MicroVm::boot_flat64(&hv, VmConfig::new(4), &test_guest::echo(), BOOT).unwrap();
    assert_eq!(vm.request(b"hello, vm", REQUEST).unwrap(), response(1, b"HELLO, VM"));
    // The guest's state persists within one VM: the counter moves on.
    assert_eq!(vm.request(b"", REQUEST).unwrap(), response(2, b""));
    let big: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let upper: Vec<u8> = big.iter().map(u8::to_ascii_uppercase).collect();
    assert_eq!(vm.request(&big, REQUEST).unwrap(), response(3, &upper));
    let mut counter = [0u8; 4];
    vm.memory().read(COUNTER_ADDRESS.into(), &mut counter).unwrap();
    assert_eq!(u32::from_le_bytes(counter), 3);
}

#[test]
fn string_io_moves_whole_buffers_over_the_channel() {
    let Some(hv) = hypervisor("microvm::string_io_moves_whole_buffers_over_the_channel") else {
        return;
    };
    let mut vm = MicroVm::boot_flat64(&hv, VmConfig::new(4), &test_guest::bulk(), BOOT).unwrap();
    // `rep insb`/`rep outsb`: on hardware KVM up to a page per exit; PVM emulates them one byte
    // per exit (~10 µs each here), so the size stays modest.
    let input: Vec<u8> = (0..(64u32 << 10)).map(|i| (i * 7 % 251) as u8).collect();
    assert!(vm.request(&input, Duration::from_secs(30)).unwrap() == input);
    assert_eq!(vm.request(b"", REQUEST).unwrap(), b"");
    assert_eq!(vm.request(b"tail", REQUEST).unwrap(), b"tail");
}

#[test]
fn restores_from_one_snapshot_are_copy_on_write() {
    let Some(hv) = hypervisor("microvm::restores_from_one_snapshot_are_copy_on_write") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut booted = MicroVm::boot_flat64(&hv, VmConfig::new(8), &test_guest::echo(), BOOT).unwrap();
    let created = Snapshot::create(&hv, &mut booted, dir.path()).unwrap();
    // The VM a snapshot was taken from runs on, unaffected.
    assert_eq!(booted.request(b"origin", REQUEST).unwrap(), response(1, b"ORIGIN"));
    drop(booted);

    let memory_file = dir.path().join("memory");
    let before = std::fs::read(&memory_file).unwrap();
    assert_eq!(before.len(), 8 << 20);
    let loaded = Snapshot::load(dir.path()).unwrap();
    for (i, snapshot) in [&created, &loaded].into_iter().cycle().take(40).enumerate() {
        let mut vm = snapshot.restore(&hv).unwrap();
        // What the previous restore wrote into its buffer is not there.
        let mut buffer = [0xaau8; 16];
        vm.memory().read(BUFFER_ADDRESS.into(), &mut buffer).unwrap();
        assert_eq!(buffer, [0; 16], "restore {i} sees an earlier restore's write");
        let input = format!("restore {i}");
        let want = response(1, input.to_ascii_uppercase().as_bytes());
        assert_eq!(vm.request(input.as_bytes(), REQUEST).unwrap(), want, "restore {i}");
        assert_eq!(vm.request(b"x", REQUEST).unwrap(), response(2, b"X"));
    }
    assert!(
        std::fs::read(&memory_file).unwrap() == before,
        "the snapshot's memory file changed"
    );
}

#[test]
fn a_vm_reset_in_place_from_its_snapshot_forgets_everything() {
    let Some(hv) = hypervisor("microvm::a_vm_reset_in_place_from_its_snapshot_forgets_everything") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut booted = MicroVm::boot_flat64(&hv, VmConfig::new(4), &test_guest::echo(), BOOT).unwrap();
    let snapshot = Snapshot::create(&hv, &mut booted, dir.path()).unwrap();
    let before = std::fs::read(dir.path().join("memory")).unwrap();
    let mut vm = snapshot.restore(&hv).unwrap();
    for i in 0..30 {
        let input = format!("reset {i}");
        assert_eq!(
            vm.request(input.as_bytes(), REQUEST).unwrap(),
            response(1, input.to_ascii_uppercase().as_bytes())
        );
        assert_eq!(vm.request(b"b", REQUEST).unwrap(), response(2, b"B"));
        snapshot.reset(&mut vm).unwrap();
        let mut buffer = [0xaau8; 8];
        vm.memory().read(BUFFER_ADDRESS.into(), &mut buffer).unwrap();
        assert_eq!(buffer, [0; 8], "reset {i} kept the guest's write");
    }
    // A VM stopped by a timeout runs again after a reset.
    let spin_dir = tempfile::tempdir().unwrap();
    let mut spinner = MicroVm::boot_flat64(&hv, VmConfig::new(4), &test_guest::spin(), BOOT).unwrap();
    let spin = Snapshot::create(&hv, &mut spinner, spin_dir.path()).unwrap();
    // Any VM of the snapshot's memory size can be reset to it: here the echo VM becomes a spinner.
    spin.reset(&mut vm).unwrap();
    assert!(matches!(
        vm.request(b"", Duration::from_millis(50)),
        Err(RequestError::Run(RunError::Timeout(_)))
    ));
    snapshot.reset(&mut vm).unwrap();
    assert_eq!(vm.request(b"ok", REQUEST).unwrap(), response(1, b"OK"));
    assert!(std::fs::read(dir.path().join("memory")).unwrap() == before);
}

#[test]
fn threads_restore_and_time_out_concurrently_from_shared_snapshots() {
    let Some(hv) = hypervisor("microvm::threads_restore_and_time_out_concurrently_from_shared_snapshots") else {
        return;
    };
    let (echo_dir, spin_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut vm = MicroVm::boot_flat64(&hv, VmConfig::new(2), &test_guest::echo(), BOOT).unwrap();
    let echo = Snapshot::create(&hv, &mut vm, echo_dir.path()).unwrap();
    let mut vm = MicroVm::boot_flat64(&hv, VmConfig::new(2), &test_guest::spin(), BOOT).unwrap();
    let spin = Snapshot::create(&hv, &mut vm, spin_dir.path()).unwrap();
    // Each thread runs its own vCPUs; a timeout on one thread must kick only that thread's vCPU.
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (hv, echo, spin) = (&hv, &echo, &spin);
            scope.spawn(move || {
                for i in 0..10 {
                    if (t + i) % 3 == 0 {
                        let mut vm = spin.restore(hv).unwrap();
                        let err = vm.request(b"", Duration::from_millis(20)).unwrap_err();
                        assert!(matches!(err, RequestError::Run(RunError::Timeout(_))), "{err}");
                    } else {
                        let mut vm = echo.restore(hv).unwrap();
                        let input = format!("thread {t} run {i}");
                        let want = response(1, input.to_ascii_uppercase().as_bytes());
                        assert_eq!(vm.request(input.as_bytes(), REQUEST).unwrap(), want);
                    }
                }
            });
        }
    });
}

#[test]
fn a_spinning_guest_is_stopped_at_its_timeout() {
    let Some(hv) = hypervisor("microvm::a_spinning_guest_is_stopped_at_its_timeout") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut vm = MicroVm::boot_flat64(&hv, VmConfig::new(2), &test_guest::spin(), BOOT).unwrap();
    let snapshot = Snapshot::create(&hv, &mut vm, dir.path()).unwrap();
    for timeout in [Duration::from_millis(50), Duration::from_millis(300)] {
        let mut vm = snapshot.restore(&hv).unwrap();
        let started = Instant::now();
        let err = vm.request(b"spin", timeout).unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(err, RequestError::Run(RunError::Timeout(t)) if t == timeout),
            "{err}"
        );
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "stopped after {took:?}"
        );
        // A VM stopped by a failure does not run again.
        assert!(matches!(vm.request(b"again", REQUEST), Err(RequestError::Stopped)));
    }
    // A guest that never becomes ready is stopped by the boot timeout. `jmp $` = EB FE.
    let err = MicroVm::boot_flat64(&hv, VmConfig::new(2), &[0xeb, 0xfe], Duration::from_millis(100)).unwrap_err();
    assert!(matches!(err, BootError::Run(RunError::Timeout(_))), "{err}");
}

#[test]
fn memory_beyond_the_limit_is_refused() {
    let Some(hv) = hypervisor("microvm::memory_beyond_the_limit_is_refused") else {
        return;
    };
    let size: u64 = 4 << 20;
    let beyond = size + 0x1234;
    let mut vm = MicroVm::boot_flat64(&hv, VmConfig::new(4), &test_guest::touch(beyond), BOOT).unwrap();
    match vm.request(b"", REQUEST) {
        Err(RequestError::Run(RunError::MemoryExceeded { addr, size: s })) => {
            assert_eq!((addr, s as u64), (beyond, size));
        }
        other => panic!("expected MemoryExceeded, got {other:?}"),
    }
    // Sizes outside the limits are refused before any VM exists.
    let capped = VmConfig {
        memory_mib: 64,
        max_memory_mib: 32,
    };
    let err = MicroVm::boot_flat64(&hv, capped, &test_guest::echo(), BOOT).unwrap_err();
    assert!(
        matches!(
            err,
            BootError::Config(ConfigError::MemorySize {
                requested: 64,
                max: 32,
                ..
            })
        ),
        "{err}"
    );
    let err = MicroVm::boot_flat64(&hv, VmConfig::new(1), &test_guest::echo(), BOOT).unwrap_err();
    assert!(
        matches!(err, BootError::Config(ConfigError::MemorySize { .. })),
        "{err}"
    );
    let huge = vec![0x90; (2 << 20) - IMAGE_ADDRESS as usize + 1];
    let err = MicroVm::boot_flat64(&hv, VmConfig::new(2), &huge, BOOT).unwrap_err();
    assert!(
        matches!(err, BootError::Config(ConfigError::ImageTooLarge { .. })),
        "{err}"
    );
}

#[test]
fn restored_guests_take_reseed_then_request_and_answer_with_log_and_exit_code() {
    let Some(hv) = hypervisor("microvm::restored_guests_take_reseed_then_request_and_answer_with_log_and_exit_code")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut booted = MicroVm::boot_flat64(&hv, VmConfig::new(4), &test_guest::agent(), BOOT).unwrap();
    let snapshot = Snapshot::create(&hv, &mut booted, dir.path()).unwrap();
    drop(booted);
    let reply = |exit_code: i32, seed: &[u8; 32], input: &[u8]| Reply {
        exit_code,
        stdout: [seed.as_slice(), input].concat(),
        log: AGENT_LOG.to_vec(),
        log_truncated: false,
    };
    for i in 0..8u8 {
        // What Kiln does per invocation: restore, RESEED + REQUEST, read LOG and RESPONSE, drop.
        let mut vm = snapshot.restore(&hv).unwrap();
        let mut seed_before = [0xaau8; 32];
        vm.memory().read(SEED_ADDRESS.into(), &mut seed_before).unwrap();
        assert_eq!(seed_before, [0; 32], "restore {i} sees an earlier restore's seed");
        let seed = [i + 1; 32];
        let input = format!("invocation {i}");
        let got = vm.invoke(&seed, input.as_bytes(), REQUEST, 4096).unwrap();
        assert_eq!(got, reply(0, &seed, input.as_bytes()), "restore {i}");
        // The same VM again: its state moved on (the exit code counts requests), the new seed
        // replaced the old one.
        let seed2 = [0x80 | i; 32];
        assert_eq!(vm.invoke(&seed2, b"", REQUEST, 4096).unwrap(), reply(1, &seed2, b""));
    }
    // The log is capped at what the caller keeps.
    let mut vm = snapshot.restore(&hv).unwrap();
    let got = vm.invoke(&[9; 32], b"x", REQUEST, 2).unwrap();
    assert_eq!((got.log.as_slice(), got.log_truncated), (&b"lo"[..], true));

    // A guest that never answers is stopped at the invocation's deadline, reported whole.
    let spin_dir = tempfile::tempdir().unwrap();
    let mut spinner = MicroVm::boot_flat64(&hv, VmConfig::new(2), &test_guest::spin(), BOOT).unwrap();
    let spin = Snapshot::create(&hv, &mut spinner, spin_dir.path()).unwrap();
    let mut vm = spin.restore(&hv).unwrap();
    let timeout = Duration::from_millis(80);
    let started = Instant::now();
    let err = vm.invoke(&[0; 32], b"in", timeout, 4096).unwrap_err();
    assert!(
        matches!(err.run_error(), Some(RunError::Timeout(t)) if *t == timeout),
        "{err}"
    );
    assert!(started.elapsed() < timeout + Duration::from_secs(1));
    // The echo guest does not know RESEED: it answers it as a request (count 1, the seed
    // upper-cased), which the host reads as exit code 1. The agent's protocol is what the test
    // guest above proves, not a property of any guest.
    let echo_dir = tempfile::tempdir().unwrap();
    let mut echo = MicroVm::boot_flat64(&hv, VmConfig::new(4), &test_guest::echo(), BOOT).unwrap();
    let echo = Snapshot::create(&hv, &mut echo, echo_dir.path()).unwrap();
    let mut vm = echo.restore(&hv).unwrap();
    let got = vm.invoke(&[b'a'; 32], b"zz", REQUEST, 4096).unwrap();
    assert_eq!(
        (got.exit_code, got.stdout),
        (1, vec![b'A'; 32]),
        "the RESEED was echoed"
    );
}
