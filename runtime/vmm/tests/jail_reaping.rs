//! Every jailed helper is reaped, whatever its operation ended in: answers, timeouts, a worker
//! killed mid-invoke, a stopped helper killed at the host's deadline, seccomp kills, helpers
//! dropped unused, pre-started helpers of a jail that is dropped. Alone in its file (its own test
//! process), so the children it counts are its own.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use kiln_vmm::jail::{ForbiddenSyscall, HelperExit, JailError};
use kiln_vmm::test_guest;

#[path = "support/jail.rs"]
mod support;
use support::{jail, snapshot, HELPER};

const REQUEST: Duration = Duration::from_secs(10);

/// The pids of the processes whose parent is this one (zombies included), and of those that run
/// the helper's executable, whoever their parent.
fn children_and_helpers() -> (Vec<u32>, Vec<u32>) {
    let me = std::process::id();
    let helper = std::fs::canonicalize(HELPER).unwrap();
    let (mut children, mut helpers) = (vec![], vec![]);
    for entry in std::fs::read_dir("/proc").unwrap() {
        let Ok(pid) = entry.unwrap().file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A process may end while it is read: skip what vanished.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let ppid: u32 = after.split_whitespace().nth(1).unwrap().parse().unwrap();
            if ppid == me {
                children.push(pid);
            }
        }
        if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == helper) {
            helpers.push(pid);
        }
    }
    (children, helpers)
}

#[test]
fn every_helper_is_reaped_whatever_its_operation_ended_in() {
    let mut config = support::config();
    config.margin = Duration::from_millis(300);
    let Some((hv, jail)) = jail("every_helper_is_reaped_whatever_its_operation_ended_in", config) else {
        return;
    };
    // As a server running as a container's PID 1 would: orphans are reparented to this process,
    // so a worker left behind by its supervisor would show up below as a child (a zombie).
    // SAFETY: prctl with integer arguments.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let (agent, spin) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    snapshot(&hv, &test_guest::agent(), 4, agent.path());
    snapshot(&hv, &test_guest::spin(), 2, spin.path());

    for i in 0..40u8 {
        let reply = jail
            .restore_and_invoke(agent.path(), &[i; 32], b"x", REQUEST, 4096)
            .unwrap();
        assert_eq!(reply.exit_code, 0);
    }
    for _ in 0..5 {
        let err = jail
            .restore_and_invoke(spin.path(), &[0; 32], b"", Duration::from_millis(50), 4096)
            .unwrap_err();
        assert!(matches!(err, JailError::Run(_)), "{err}");
    }
    // A worker killed mid-invoke, and one stopped until the host's deadline kills it.
    for stop in [false, true] {
        for _ in 0..3 {
            let mut helper = jail.spawn().unwrap();
            let (jailed, on_jailed) = mpsc::channel();
            helper.on_jailed(move |pid| {
                if stop {
                    // SAFETY: kill with the worker's pid.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
                }
                jailed.send(pid).unwrap();
            });
            let dir = spin.path().to_path_buf();
            let run = std::thread::spawn(move || {
                // Long enough for a loaded machine to get the helper jailed before the deadline.
                helper.restore_and_invoke(&dir, &[0; 32], b"", Duration::from_secs(1), 4096)
            });
            let pid = match on_jailed.recv_timeout(REQUEST) {
                Ok(pid) => pid,
                Err(e) => panic!("no JAILED ({e}): the invocation gave {:?}", run.join().unwrap()),
            };
            if !stop {
                // SAFETY: kill with the worker's pid.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            let err = run.join().unwrap().unwrap_err();
            match stop {
                true => assert!(matches!(err, JailError::Hung(_)), "{err}"),
                false => assert!(
                    matches!(err, JailError::Died(HelperExit::Signal(libc::SIGKILL))),
                    "{err}"
                ),
            }
        }
    }
    for _ in 0..3 {
        let err = jail.probe_forbidden(ForbiddenSyscall::Socket);
        assert!(
            matches!(err, JailError::Died(HelperExit::Signal(libc::SIGSYS))),
            "{err}"
        );
    }
    for _ in 0..5 {
        drop(jail.spawn().unwrap());
    }
    drop(jail);
    let mut config = support::config();
    config.prestart = 3;
    let prestarted = kiln_vmm::jail::Jail::new(config);
    for i in 0..10u8 {
        prestarted
            .restore_and_invoke(agent.path(), &[i; 32], b"p", REQUEST, 4096)
            .unwrap();
    }
    drop(prestarted);

    // The host reaps each helper's supervisor before the operation returns: no child is left,
    // not even a zombie.
    let (children, _) = children_and_helpers();
    assert!(children.is_empty(), "children left: {children:?}");
    // Nor any helper process elsewhere: a worker the host had to kill was reaped by its own
    // supervisor, never left for a reaper to adopt.
    let (_, helpers) = children_and_helpers();
    assert!(helpers.is_empty(), "helper processes left: {helpers:?}");
    assert!(Path::new(agent.path()).join("state").exists());
}
