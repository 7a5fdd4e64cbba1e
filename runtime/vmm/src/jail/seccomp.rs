//! The helper's seccomp allow-lists, one per role, after Firecracker's per-thread filters: every
//! syscall not listed kills the whole process with SIGSYS, and `ioctl` is allowed only with the KVM
//! request numbers the run loop, restore and snapshot use. The filter traps (`SECCOMP_RET_TRAP`)
//! rather than kills outright so that [`report_violations`]'s handler can first name the syscall
//! on stderr (which the server logs): the process then dies of SIGSYS all the same.
//!
//! - [`Role::Restore`]: restore a snapshot and run an invocation (also the PROBE: create a VM).
//! - [`Role::Boot`]: boot a guest and write its snapshot through two files opened before the
//!   jail closed: adds `pwrite64`, `fsync`, `ftruncate` and the `KVM_GET_*` requests.
//! - [`Role::Supervisor`]: the process that waits for the worker and reports how it ended.
//!
//! No role can open a path, create a socket, fork, exec, mount, ptrace or change credentials. `mmap`
//! and `mprotect` are refused `PROT_EXEC`. The lists were taken from `strace -f` of the jail tests
//! and are exercised by them, built for glibc and for musl (whose wrappers differ: `fstat` is
//! `newfstatat(fd, "", AT_EMPTY_PATH)` there, `F_DUPFD_CLOEXEC` is followed by `F_SETFD`): a
//! missing entry kills a test with SIGSYS, and the helper's stderr names the syscall.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msrs,
    kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, KVMIO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

// The KVM request numbers, as `kvm-ioctls` defines them (its own are private).
ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, kvm_userspace_memory_region);
ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);

/// What the filtered process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Restore,
    Boot,
    Supervisor,
}

/// Failure to build or install a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    Install(seccompiler::Error),
}

/// The KVM requests a role may make.
fn kvm_requests(role: Role) -> Vec<u64> {
    let mut requests: Vec<u64> = vec![
        KVM_CREATE_VM(),
        KVM_CHECK_EXTENSION(),
        KVM_GET_VCPU_MMAP_SIZE(),
        KVM_CREATE_VCPU(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_SET_TSS_ADDR(),
        KVM_CREATE_IRQCHIP(),
        KVM_CREATE_PIT2(),
        KVM_SET_IRQCHIP(),
        KVM_SET_CLOCK(),
        KVM_SET_PIT2(),
        KVM_RUN(),
        KVM_SET_REGS(),
        KVM_SET_SREGS(),
        KVM_SET_MSRS(),
        KVM_SET_FPU(),
        KVM_SET_LAPIC(),
        KVM_SET_CPUID2(),
        KVM_SET_MP_STATE(),
        KVM_SET_VCPU_EVENTS(),
        KVM_SET_DEBUGREGS(),
        KVM_SET_XSAVE(),
        KVM_SET_XCRS(),
    ];
    if role == Role::Boot {
        // Booting reads registers to set up long mode, and the snapshot reads everything.
        requests.extend([
            KVM_GET_IRQCHIP(),
            KVM_GET_CLOCK(),
            KVM_GET_PIT2(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_FPU(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
        ]);
    }
    requests
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("argument index below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a rule has at least one condition")
}

/// `mmap`/`mprotect` without `PROT_EXEC`: the helper never needs new executable memory.
fn no_exec() -> Vec<SeccompRule> {
    vec![rule(vec![condition(
        2,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )])]
}

/// The allow-list of `role`, as syscall number → rules (an empty list allows every call).
fn rules(role: Role) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |syscalls: &[libc::c_long]| {
        for &nr in syscalls {
            rules.insert(nr, vec![]);
        }
    };
    // Every role: write its frames (and a panic message), memory for the allocator (`brk`,
    // `mremap` and `madvise` too), futexes for std's locks, return from the kick signal's handler,
    // the clock where the vDSO cannot serve it, exit. `gettid` arms the deadline timer.
    allow(&[
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_clock_gettime,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    if role == Role::Supervisor {
        // The supervisor only waits for the worker.
        allow(&[libc::SYS_wait4]);
    } else {
        // Reading the request and the snapshot's state (`statx`, `fstat`, `lseek` size the read),
        // and the vCPU's deadline timer.
        allow(&[
            libc::SYS_read,
            libc::SYS_statx,
            libc::SYS_fstat,
            libc::SYS_lseek,
            libc::SYS_timer_settime,
            libc::SYS_timer_delete,
        ]);
        if role == Role::Boot {
            // The snapshot's files, opened before the jail closed.
            allow(&[libc::SYS_pwrite64, libc::SYS_fsync, libc::SYS_ftruncate]);
        }
        // The deadline timer is a CLOCK_MONOTONIC POSIX timer signalling this thread.
        rules.insert(
            libc::SYS_timer_create,
            vec![rule(vec![condition(0, SeccompCmpOp::Eq, libc::CLOCK_MONOTONIC as u64)])],
        );
        // `fstat` as musl implements it (`fstatat(fd, "", AT_EMPTY_PATH)`): on a descriptor only.
        rules.insert(
            libc::SYS_newfstatat,
            vec![rule(vec![condition(3, SeccompCmpOp::Eq, libc::AT_EMPTY_PATH as u64)])],
        );
        // `File::try_clone` (the memory file handed to the mapping; musl then sets FD_CLOEXEC
        // again, for kernels older than F_DUPFD_CLOEXEC), and std's debug check that a
        // descriptor it adopts is open.
        let cmd = |cmd: libc::c_int| condition(1, SeccompCmpOp::Eq, cmd as u64);
        rules.insert(
            libc::SYS_fcntl,
            vec![
                rule(vec![cmd(libc::F_DUPFD_CLOEXEC)]),
                rule(vec![cmd(libc::F_GETFD)]),
                rule(vec![
                    cmd(libc::F_SETFD),
                    condition(2, SeccompCmpOp::Eq, libc::FD_CLOEXEC as u64),
                ]),
            ],
        );
        rules.insert(
            libc::SYS_ioctl,
            kvm_requests(role)
                .into_iter()
                .map(|request| rule(vec![condition(1, SeccompCmpOp::Eq, request)]))
                .collect(),
        );
    }
    rules.insert(libc::SYS_mmap, no_exec());
    rules.insert(libc::SYS_mprotect, no_exec());
    // mimalloc names each region it maps (`prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, …)`): a label
    // in /proc/<pid>/maps, nothing more. Refused, a helper whose allocator grew (a large write
    // under load) died of SIGSYS.
    rules.insert(
        libc::SYS_prctl,
        vec![rule(vec![
            condition(0, SeccompCmpOp::Eq, PR_SET_VMA),
            condition(1, SeccompCmpOp::Eq, PR_SET_VMA_ANON_NAME),
        ])],
    );
    rules
}

/// `<linux/prctl.h>`: name an anonymous mapping.
const PR_SET_VMA: u64 = 0x53564d41;
const PR_SET_VMA_ANON_NAME: u64 = 0;

/// The BPF program of `role`'s filter; built before the jail closes (it allocates).
pub fn program(role: Role) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules(role),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Build)
}

/// Installs the SIGSYS handler of [`SeccompAction::Trap`]: it writes "the seccomp filter refused
/// syscall N" to stderr, then makes a call no role allows — with SIGSYS blocked in its own
/// handler, the kernel kills the process with SIGSYS, as `SECCOMP_RET_KILL_PROCESS` would have.
/// Installed before the jail closes (the filter refuses `rt_sigaction`).
pub fn report_violations() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (write, syscall, _exit).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_violation as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_violation(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SIGSYS's siginfo (`_sigsys`): the call's address at offset 16, the syscall number at 24.
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let nr = unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) };
    let mut line = [0u8; 80];
    let prefix = b"kiln-vmm: the seccomp filter refused syscall ";
    line[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 12];
    let (mut n, mut count) = (nr.unsigned_abs(), 0);
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &digit in digits[..count].iter().rev() {
        line[len] = digit;
        len += 1;
    }
    line[len] = b'\n';
    len += 1;
    // SAFETY: writing our own buffer to stderr; then a call every role refuses (see above), and
    // `_exit` should the kernel ever let it through.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::syscall(libc::SYS_getppid);
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Installs `program` on the calling thread (the helper has no other). Sets `no_new_privs`,
/// which the kernel requires of an unprivileged filter.
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_request_numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> as the kernel computes them on x86_64.
        assert_eq!(KVM_CREATE_VM(), 0xae01);
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_CREATE_VCPU(), 0xae41);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_SET_CPUID2(), 0x4008_ae90);
        assert_eq!(KVM_SET_XSAVE(), 0x5000_aea5);
    }

    #[test]
    fn every_role_compiles_and_only_boot_may_write_files() {
        for role in [Role::Restore, Role::Boot, Role::Supervisor] {
            assert!(!program(role).unwrap().is_empty());
        }
        let restore = rules(Role::Restore);
        let boot = rules(Role::Boot);
        let supervisor = rules(Role::Supervisor);
        for forbidden in [
            libc::SYS_socket,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_fork,
            libc::SYS_mount,
            libc::SYS_ptrace,
            libc::SYS_setuid,
            libc::SYS_rt_sigaction,
            // The violation reporter's way to die of SIGSYS.
            libc::SYS_getppid,
        ] {
            for rules in [&restore, &boot, &supervisor] {
                assert!(!rules.contains_key(&forbidden), "syscall {forbidden} allowed");
            }
        }
        assert!(!restore.contains_key(&libc::SYS_pwrite64) && boot.contains_key(&libc::SYS_pwrite64));
        assert!(!supervisor.contains_key(&libc::SYS_ioctl) && !supervisor.contains_key(&libc::SYS_read));
        assert!(restore[&libc::SYS_ioctl].len() < boot[&libc::SYS_ioctl].len());
    }

    /// Runs `call` in a forked child under `role`'s filter (with the violation reporter) and
    /// returns how the child ended.
    fn under_filter(role: Role, call: fn() -> i64) -> libc::c_int {
        let program = program(role).unwrap();
        // SAFETY: the child makes only raw syscalls (no allocation, no locks) and `_exit`s.
        match unsafe { libc::fork() } {
            0 => unsafe {
                if report_violations().is_err() || install(&program).is_err() {
                    libc::_exit(90);
                }
                let code = if call() == 0 { 0 } else { 91 };
                libc::_exit(code);
            },
            pid => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                status
            }
        }
    }

    #[test]
    fn the_allocator_may_name_its_mappings_and_nothing_else_may_call_prctl() {
        // SAFETY (both calls): prctl with integer arguments; the name's pointer is a static string.
        let name_a_mapping = || unsafe {
            let size = 4096;
            let addr = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            // EINVAL on kernels without CONFIG_ANON_VMA_NAME: what matters is that it is not SIGSYS.
            libc::syscall(
                libc::SYS_prctl,
                PR_SET_VMA,
                PR_SET_VMA_ANON_NAME,
                addr,
                size,
                c"mimalloc".as_ptr(),
            );
            0
        };
        for role in [Role::Restore, Role::Boot, Role::Supervisor] {
            let status = under_filter(role, name_a_mapping);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{role:?}: {status:#x}"
            );
        }
        let drop_dumpable = || unsafe { libc::syscall(libc::SYS_prctl, libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
        let status = under_filter(Role::Restore, drop_dumpable);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{status:#x}"
        );
    }
}
