//! The microVM tier in a jail: every VM — the deploy-time boot and snapshot, and each restore and
//! invocation — runs its vCPU in a helper process of its own, so the server never holds a KVM file
//! descriptor and a guest that escapes KVM lands in a process that can do almost nothing.
//!
//! # Why
//! Without it, vCPUs run on the server's blocking pool, in the address space that holds the
//! result-URL signing keys, the tokens and the database. A KVM or VMM bug a guest can reach would
//! be a bug in the server. Firecracker's answer is its *jailer*: the VMM runs in a process of its
//! own, chrooted, in fresh namespaces, in a cgroup, without privileges, behind a seccomp filter per
//! thread. This module is that model, shaped for Kiln: one short-lived helper per VM (no API
//! socket, no long-lived VMM), started by the server itself, speaking a tiny framed protocol.
//!
//! # The helper
//! The server runs its own executable as `kiln vmm-jail` (tests: the `kiln-vmm-jail` binary), both
//! of which call [`child_main`] first thing. The helper is two processes:
//!
//! 1. The **supervisor**, the server's child: closes every inherited descriptor above 2, joins its
//!    cgroup (if any), opens `/dev/kvm` (this is the only KVM descriptor, and it is the helper's),
//!    installs the vCPU kick handler, then `unshare`s new **user, mount, PID, network, IPC and UTS
//!    namespaces** (root inside is the caller's own uid and gid outside: no host privilege is
//!    gained) and forks. It says HELLO (the worker's pid), drops every capability, sets
//!    `no_new_privs`, installs a seccomp filter that allows `wait4` and little else, waits for the
//!    worker and reports how it ended (EXITED). It exists because a new PID namespace takes effect
//!    for children only: the worker is **PID 1** of its namespace, and cannot see or signal any
//!    other process.
//! 2. The **worker** (dies with the supervisor: `PR_SET_PDEATHSIG`; no core dumps; not dumpable)
//!    reads its one request from stdin, then — before it touches any guest data — **pivots its
//!    root into the VM's own directory** (a bind mount of the snapshot or staging directory,
//!    read-only for a restore, always `nosuid,nodev,noexec`; the old root is detached), opens the
//!    two files it needs there, **closes every descriptor** but stdout, stderr, KVM and those two
//!    (`RLIMIT_NOFILE` 16 from then on), **drops every capability** (bounding set, ambient,
//!    effective, permitted, inheritable; securebits locked), sets **`no_new_privs`** and installs
//!    its **seccomp allow-list** (`seccomp`: KVM `ioctl`s by request number, read/write, memory,
//!    futex, the deadline timer, signal return, exit; kill the process on anything else — no
//!    `open`, `socket`, `fork`, `exec`, `mount`, `ptrace`). Only then does it parse the snapshot's
//!    state, restore the VM and run the guest on its one thread (the POSIX timer that kicks the
//!    vCPU at the timeout works as in process). It answers with one frame and exits.
//!
//! A boot writes its snapshot through `memory` and `state.tmp`, opened before the filter; the host
//! renames `state.tmp` to `state` after the helper reported success (the worker can rename
//! nothing). The cgroup (see [`cgroup`]): where the host delegates cgroup v2's `memory` and `cpu`
//! controllers, each helper gets a cgroup with `memory.max` = guest RAM + request + 128 MiB,
//! `memory.swap.max` = 0, `cpu.max` = one CPU and `pids.max` = 2; elsewhere — this development
//! host is cgroup v1 / hybrid, its `/sys/fs/cgroup/unified` has no controllers — [`Jail::new`]
//! logs once why not and helpers run without (guest RAM is still bounded by the VM's memory size
//! and its time by the timeout).
//!
//! # The protocol and the host's deadline
//! Versioned, length-prefixed frames on the helper's stdin and stdout ([`protocol`]; its strict
//! decoder, [`protocol::decode_frame`], is the fuzzing target). The host reads with `poll` against a
//! deadline — the operation's own timeout plus [`JailConfig::margin`] — and kills a helper that
//! passes it ([`JailError::Hung`]). A helper that dies mid-invoke ends the pipe at once: the host
//! answers [`JailError::Died`] with the worker's signal or exit code (`SIGSYS` for a seccomp kill).
//! Every helper is reaped, whatever happened, and its cgroup removed: one that answered by the
//! jail's reaper thread, while the caller goes on (the helper's exit — the VM's teardown, the
//! namespaces' — takes a few milliseconds nobody needs to wait for); one that failed, hung or died
//! before the operation returns; an unused [`Helper`] when dropped (its worker is killed through a
//! pidfd, so its supervisor reaps it: no process is ever left for init, or a server running as a
//! container's PID 1, to adopt). Dropping the [`Jail`] waits until all are reaped. A guest that
//! runs past its timeout gives [`JailError::Run`]`(RunError::Timeout(timeout))`, the error an
//! in-process run gives; run errors cross the pipe with their variant and fields.
//!
//! Starting a helper costs a fork and exec of the server's binary, the namespaces and KVM's
//! set-up: [`JailConfig::prestart`] keeps that many helpers started and waiting for their request
//! (each still runs one VM, then exits), which takes the start-up off the invocation's path.
//!
//! # How the server calls it
//! 1. **Dispatch**, first thing in `main`, before any thread exists (the helper forks):
//!    ```ignore
//!    if std::env::args_os().nth(1).as_deref() == Some("vmm-jail".as_ref()) {
//!        kiln_vmm::jail::child_main(); // never returns
//!    }
//!    ```
//! 2. **Start-up** (`microvm/mod.rs`), instead of `Hypervisor::open`:
//!    ```ignore
//!    let mut config = JailConfig::new(std::env::current_exe()?, vec!["vmm-jail".into()]);
//!    config.quirks = quirks;   // KILN_MICROVM_QUIRKS=available-tss, as today
//!    config.prestart = 2;      // helpers kept started (see below); 0 starts one per VM
//!    let jail = Arc::new(Jail::new(config)); // logs once if helpers get no cgroup limits
//!    let kvm = jail.probe();   // Err(reason): the tier's 503 reason (`HostFacts::kvm_error`)
//!    ```
//!    `probe` starts one helper that opens `/dev/kvm`, enters its jail and creates a VM there: it
//!    answers "can this host run jailed VMs", and the server itself never opens `/dev/kvm`.
//! 3. **Deploy** (`microvm/deploy.rs`, on the blocking pool, holding the VM permit), instead of
//!    `MicroVm::boot_linux` + `Snapshot::create`:
//!    `jail.boot_linux_and_snapshot(&image.vmlinux, &initramfs, &image.cmdline, config,
//!    BOOT_TIMEOUT, staged.path())` → [`BootReport`] (`boot` and `snapshot` durations for the log
//!    line). [`JailError::Layout`] is the `422` `LinuxBootError::Layout` was; anything else is the
//!    `503` (its text already says "the microVM's Linux guest did not boot" with the console tail).
//! 4. **Invoke** (`microvm/invoke.rs`): a loaded version no longer holds a `Snapshot`, only its
//!    directory; on the blocking pool, holding both permits:
//!    `jail.restore_and_invoke(&dir, &seed, &input, config.timeout(), STDERR_CAP)` → [`Reply`],
//!    shaped as today. `JailError::run_error()` replaces `InvokeError::run_error()`: `Timeout` →
//!    `504`, `MemoryExceeded` → `502` naming the limit, `Shutdown` as today; every other
//!    `JailError` (`Died`, `Hung`, `Setup`, ...) is a `502` with its text.
//!
//! Costs and choices for the lead: a helper that answered is reaped in the background, so its VM
//! permit is released a few milliseconds before its process is gone. Starting a helper execs the
//! server's binary: a large binary (the debug `kiln`, 225 MB, takes ~13 ms to exec and print its
//! version here) is a reason for `prestart`, or for pointing [`JailConfig::exe`] at the small
//! `kiln-vmm-jail` binary this crate builds. Issue 16's integrity check of snapshot files fits the
//! host side: verify the directory once when a version is loaded (the helper only reads it, through
//! a read-only bind mount). Unprivileged servers need user namespaces (some distributions restrict
//! them, e.g. Ubuntu's AppArmor `apparmor_restrict_unprivileged_userns`): `probe` says so.

pub mod cgroup;
mod child;
mod host;
pub mod protocol;
pub mod seccomp;

pub use cgroup::CgroupSetting;
pub use child::child_main;
pub use host::{Helper, Jail, JailConfig, JailError, Session};
pub use protocol::{decode_frame, BootReport, DecodeError, ForbiddenSyscall, HelperExit, SuspendReport};

#[doc(no_inline)]
pub use crate::invocation::Reply;
