//! The microVM tier's costs on this host, with the VMM's tiny echo guest (`kiln_vmm::test_guest`):
//! creating an empty VM (memory + VM + vCPU, then teardown), booting the guest to its ready
//! signal, and the per-invocation path — restore from a snapshot (memory mapped copy-on-write),
//! one framed request, teardown — and the same request on a VM reset in place from the snapshot
//! (`Snapshot::reset`: memory remapped copy-on-write, state set back, no VM created), and Kiln's
//! invocation exchange (RESEED + REQUEST, LOG + RESPONSE) with the agent-protocol test guest.
//!
//! Then the same invocation through the jail (`kiln_vmm::jail`): a helper process per VM, started
//! for the invocation, or started beforehand and waiting (`JailConfig::prestart`), and what
//! starting one costs. This example is its own helper (`microvm vmm-jail`), as Kiln's binary is.
//!
//! Usage: cargo run --release -p kiln-vmm --example microvm -- [RUNS] [MEMORY_MIB]
//!        (defaults: 200, 128)
//! Prints median and p99 per phase in microseconds.

use std::time::{Duration, Instant};

use kiln_vmm::jail::{Jail, JailConfig};
use kiln_vmm::{test_guest, Hypervisor, MicroVm, Snapshot, VmConfig};

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{name:<34} median {:>9.1} µs   p99 {:>9.1} µs   ({} runs)",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}

fn time(runs: usize, mut f: impl FnMut()) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect()
}

fn main() {
    if std::env::args_os().nth(1).as_deref() == Some("vmm-jail".as_ref()) {
        kiln_vmm::jail::child_main();
    }
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().map_or(200, |a| a.parse().expect("RUNS is a number"));
    let memory_mib: u32 = args.next().map_or(128, |a| a.parse().expect("MEMORY_MIB is a number"));
    let hv = Hypervisor::open().expect("this benchmark needs /dev/kvm");
    let config = VmConfig::new(memory_mib);
    let guest = test_guest::echo();
    let timeout = Duration::from_secs(10);
    println!("microVM tier, echo test guest, {memory_mib} MiB of guest memory");

    report(
        "create VM + memory + vCPU, drop",
        time(runs, || drop(MicroVm::empty(&hv, config).unwrap())),
    );
    report(
        "boot to READY, drop",
        time(runs, || {
            drop(MicroVm::boot_flat64(&hv, config, &guest, timeout).unwrap())
        }),
    );

    let dir = tempfile::tempdir().unwrap();
    let mut booted = MicroVm::boot_flat64(&hv, config, &guest, timeout).unwrap();
    let started = Instant::now();
    let snapshot = Snapshot::create(&hv, &mut booted, dir.path()).unwrap();
    println!(
        "{:<34} {:>16.1} µs",
        "snapshot (write memory + state)",
        started.elapsed().as_secs_f64() * 1e6
    );
    drop(booted);

    report("restore, drop", time(runs, || drop(snapshot.restore(&hv).unwrap())));
    let input = b"hello from the benchmark";
    let expected: Vec<u8> = [&1u32.to_le_bytes()[..], &input.to_ascii_uppercase()].concat();
    report(
        "restore + request + teardown",
        time(runs, || {
            let mut vm = snapshot.restore(&hv).unwrap();
            assert_eq!(vm.request(input, timeout).unwrap(), expected);
            drop(vm);
        }),
    );
    // Kiln's invocation: restore, RESEED + REQUEST, LOG + RESPONSE, teardown, with the test guest
    // that speaks the agent's side of the protocol.
    let agent_dir = tempfile::tempdir().unwrap();
    let mut booted = MicroVm::boot_flat64(&hv, config, &test_guest::agent(), timeout).unwrap();
    let agent = Snapshot::create(&hv, &mut booted, agent_dir.path()).unwrap();
    drop(booted);
    report(
        "restore + reseed + invoke + drop",
        time(runs, || {
            let mut vm = agent.restore(&hv).unwrap();
            let reply = vm.invoke(&[7; 32], input, timeout, 4096).unwrap();
            assert_eq!((reply.exit_code, &reply.stdout[32..]), (0, &input[..]));
        }),
    );
    let mut vm = snapshot.restore(&hv).unwrap();
    report(
        "reset in place + request",
        time(runs, || {
            snapshot.reset(&mut vm).unwrap();
            assert_eq!(vm.request(input, timeout).unwrap(), expected);
        }),
    );

    drop(vm);

    // The jail: the same invocation in a helper process per VM.
    let mut config = JailConfig::new(std::env::current_exe().unwrap(), vec!["vmm-jail".into()]);
    config.cgroup = kiln_vmm::jail::CgroupSetting::Off;
    let jail = Jail::new(config.clone());
    jail.probe().expect("the jail works here");
    let check = |reply: kiln_vmm::Reply| assert_eq!((reply.exit_code, &reply.stdout[32..]), (0, &input[..]));
    report(
        "jail: start a helper (to HELLO), drop",
        time(runs, || drop(jail.spawn().unwrap())),
    );
    report(
        "jail: restore + invoke, new helper",
        time(runs, || {
            check(
                jail.restore_and_invoke(agent_dir.path(), &[7; 32], input, timeout, 4096)
                    .unwrap(),
            )
        }),
    );
    // A helper started beforehand (outside the timing) and waiting for its request: the
    // invocation's path when the pool of pre-started helpers keeps up.
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let helper = jail.spawn().unwrap();
        let started = Instant::now();
        check(
            helper
                .restore_and_invoke(agent_dir.path(), &[7; 32], input, timeout, 4096)
                .unwrap(),
        );
        samples.push(started.elapsed());
    }
    report("jail: restore + invoke, pre-started", samples);
    // Back to back through a pool of two: as fast as helpers can be started behind the calls.
    config.prestart = 2;
    let pooled = Jail::new(config);
    report(
        "jail: back to back, prestart 2",
        time(runs, || {
            check(
                pooled
                    .restore_and_invoke(agent_dir.path(), &[7; 32], input, timeout, 4096)
                    .unwrap(),
            )
        }),
    );
}
