//! The helper's side: [`child_main`], run by `kiln vmm-jail` (or the `kiln-vmm-jail` test binary).
//!
//! Two processes, as the module doc of [`crate::jail`] explains:
//! - the **supervisor** (the process the host spawned): joins its cgroup, opens `/dev/kvm`, enters
//!   new user, mount, PID, network, IPC and UTS namespaces, forks the worker, says HELLO with the
//!   worker's pid, locks itself down (no capabilities, `no_new_privs`, a seccomp filter that allows
//!   little beyond `wait4`), waits for the worker and reports how it ended (EXITED);
//! - the **worker** (PID 1 of the new PID namespace): reads its one request, pivots its root into
//!   the VM's directory, opens the files it needs there, closes every other descriptor, drops
//!   every capability, sets `no_new_privs` and installs its seccomp filter — and only then reads
//!   the snapshot's state or runs the guest. It answers with one frame and exits.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use super::cgroup;
use super::protocol::{
    decode_frame, decode_header, BootFlat64Request, BootLinuxRequest, BootReport, Failure, ForbiddenSyscall,
    HelperExit, Message, ProbeRequest, RestoreRequest, SessionRequest, SuspendReport, HEADER_LEN,
};
use super::seccomp::{self, Role};
use crate::builder::{BootError, MicroVm, RequestError, VmConfig, MIN_MEMORY_MIB};
use crate::devices::channel::{Channel, Frame, FrameKind};
use crate::invocation::InvokeError;
use crate::linux::LinuxBootError;
use crate::persist::{Snapshot, MEMORY_FILE, NEXT_MEMORY_FILE, STATE_FILE, STATE_TMP_FILE};
use crate::vstate::vcpu::{install_kick_handler, SessionHost, SessionStop};
use crate::vstate::vm::Hypervisor;

/// The environment variable naming the helper's cgroup (see `cgroup`).
pub(crate) const CGROUP_ENV: &str = "KILN_JAIL_CGROUP";

/// The namespaces the helper enters.
const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// The jailed VM helper. Call it first thing in `main`, before any other thread exists (it forks),
/// when the process was started as a helper (`kiln vmm-jail`); it never returns. Its stdin and
/// stdout are the pipes of the host↔helper protocol (`jail::protocol`).
pub fn child_main() -> ! {
    let code = supervise();
    // SAFETY: `_exit` ends the process at once; nothing needs flushing (frames are written with
    // unbuffered writes), and skipping atexit handlers keeps the exit free of surprises.
    unsafe { libc::_exit(code) }
}

/// Writes one frame to stdout (the host's pipe).
fn send(message: &Message) -> io::Result<()> {
    // SAFETY: fd 1 is the host's pipe, open for the whole life of the process; ManuallyDrop keeps
    // this `File` from closing it.
    let mut out = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    out.write_all(&message.encode())
}

fn errno_text(op: &str) -> String {
    format!("{op}: {}", io::Error::last_os_error())
}

/// Fails with `op`'s errno unless `ret` is 0 (or positive).
fn check(ret: libc::c_long, op: &str) -> Result<(), String> {
    match ret {
        r if r < 0 => Err(errno_text(op)),
        _ => Ok(()),
    }
}

fn cstring(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{} holds a NUL byte", path.display()))
}

fn supervise() -> i32 {
    match supervisor() {
        Ok(code) => code,
        Err(message) => {
            let _ = send(&Message::Failed(Failure::Setup(message)));
            1
        }
    }
}

fn supervisor() -> Result<i32, String> {
    // Only descriptors 0..=2 may come from the host; anything else leaked into the exec is closed.
    close_from(3)?;
    let threads = std::fs::read_dir("/proc/self/task").map_err(|e| format!("/proc/self/task: {e}"))?;
    if threads.count() != 1 {
        return Err("child_main must run before any other thread starts (it forks)".into());
    }
    if let Some(path) = std::env::var_os(CGROUP_ENV) {
        cgroup::join(Path::new(&path)).map_err(|e| format!("cannot join the cgroup {}: {e}", path.display()))?;
    }
    let hypervisor = Hypervisor::open().map_err(|e| format!("cannot use KVM: {e}"))?;
    // The vCPU's deadline signal: installed now, as the filter refuses `rt_sigaction` later.
    install_kick_handler().map_err(|e| format!("cannot install the vCPU kick handler: {e}"))?;
    seccomp::report_violations().map_err(|e| format!("cannot install the SIGSYS reporter: {e}"))?;

    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // SAFETY: unshare with namespace flags only changes this (single-threaded) process.
    check(
        unsafe { libc::unshare(NAMESPACES) } as _,
        "unshare(user, mount, pid, net, ipc, uts)",
    )?;
    // Root in the new user namespace is the caller's own uid and gid outside: the helper gains no
    // host privilege, and drops even these namespace-local capabilities before it runs a guest.
    let write = |file: &str, text: String| std::fs::write(file, text).map_err(|e| format!("cannot write {file}: {e}"));
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))?;

    // SAFETY: this process is single-threaded (checked above), so the child may run any code.
    match unsafe { libc::fork() } {
        -1 => Err(errno_text("fork")),
        0 => worker_main(hypervisor),
        worker => {
            drop(hypervisor);
            // SAFETY: closing stdin, which only the worker reads.
            unsafe { libc::close(0) };
            lock_down(Role::Supervisor)?;
            send(&Message::Hello {
                worker_pid: worker as u32,
            })
            .map_err(|e| format!("cannot greet the host: {e}"))?;
            let exit = wait_for(worker)?;
            // The host may have gone (it killed us, or hung up): nothing more to do then.
            let _ = send(&Message::Exited(exit));
            Ok(0)
        }
    }
}

/// Waits for `pid` and says how it ended.
fn wait_for(pid: libc::pid_t) -> Result<HelperExit, String> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is valid for the call; `pid` is this process's child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(errno_text("waitpid"));
        }
    }
    Ok(if libc::WIFSIGNALED(status) {
        HelperExit::Signal(libc::WTERMSIG(status))
    } else {
        HelperExit::Code(libc::WEXITSTATUS(status))
    })
}

fn worker_main(hypervisor: Hypervisor) -> ! {
    // A panic (its message already on stderr) is exit code 101, as for any Rust program.
    let code = std::panic::catch_unwind(move || worker(hypervisor)).unwrap_or(101);
    // SAFETY: as in `child_main`.
    unsafe { libc::_exit(code) }
}

fn worker(hypervisor: Hypervisor) -> i32 {
    // Die with the supervisor: when the host kills it (a deadline), this process goes too.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) };
    // No core dumps of guest memory; /proc/<pid>/mem and ptrace closed to processes of the same uid.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointer; prctl with integer arguments.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let request = match read_request() {
        Ok(Some(request)) => request,
        // The host hung up without a request: a spare it no longer needs.
        Ok(None) => return 0,
        Err(message) => {
            let _ = send(&Message::Failed(Failure::Setup(message)));
            return 1;
        }
    };
    let answer = match request {
        Message::Restore(r) => restore(hypervisor, r),
        Message::BootFlat64(r) => boot_flat64(hypervisor, r),
        Message::BootLinux(r) => boot_linux(hypervisor, r),
        Message::Probe(r) => probe(hypervisor, r),
        Message::Session(r) => match session(hypervisor, r) {
            Ok(Some(message)) => Ok(message),
            // The host ended the session: nobody waits for an answer.
            Ok(None) => return 0,
            Err(failure) => Err(failure),
        },
        other => Err(Failure::Setup(format!("a {other:?} frame outside a session"))),
    };
    let message = match answer {
        Ok(message) => message,
        Err(failure) => Message::Failed(failure),
    };
    match send(&message) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// The one request, or `None` if the host closed the pipe first.
fn read_request() -> Result<Option<Message>, String> {
    // SAFETY: fd 0 is the host's pipe; ManuallyDrop keeps this `File` from closing it.
    let mut input = ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match input.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err("the request ends inside its header".into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read the request: {e}")),
        }
    }
    let (kind, len) = decode_header(&header).map_err(|e| format!("bad request: {e}"))?;
    if !super::protocol::kind_is_request(kind) {
        return Err(format!("frame kind {kind} is not a request"));
    }
    let mut frame = header.to_vec();
    frame.resize(HEADER_LEN + len, 0);
    input
        .read_exact(&mut frame[HEADER_LEN..])
        .map_err(|e| format!("cannot read the request: {e}"))?;
    decode_frame(&frame).map(Some).map_err(|e| format!("bad request: {e}"))
}

/// Whether the jail's root (the VM's directory) may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadOnly,
    Writable,
}

/// Builds the jail around this process: `dir` becomes its root (read-only unless `access` says
/// otherwise), `open` opens what it needs there (paths relative to the new root), every other
/// descriptor but stdout, stderr and KVM is closed (and at most `MAX_FILES` may be open),
/// capabilities are dropped, `no_new_privs` is set and `role`'s seccomp filter installed. Returns
/// what `open` opened. With `keep_stdin` the host's pipe stays open for [`say_jailed`].
fn enter_jail<T: AsFds>(
    hypervisor: &Hypervisor,
    dir: &Path,
    access: Access,
    role: Role,
    keep_stdin: bool,
    open: impl FnOnce() -> io::Result<T>,
) -> Result<T, Failure> {
    let setup = Failure::Setup;
    let program = seccomp::program(role).map_err(|e| setup(e.to_string()))?;
    pivot_into(dir, access).map_err(setup)?;
    let opened = open().map_err(|e| setup(format!("cannot open the VM's files in {}: {e}", dir.display())))?;
    let mut keep = vec![1, 2, hypervisor.kvm().as_raw_fd()];
    if keep_stdin {
        keep.push(0);
    }
    keep.extend(opened.fds());
    close_all_except(&mut keep).map_err(setup)?;
    // Room for what KVM hands out after this (the VM, the vCPU, a duplicate of the memory file):
    // no more.
    let files = libc::rlimit {
        rlim_cur: MAX_FILES,
        rlim_max: MAX_FILES,
    };
    // SAFETY: a valid rlimit for the call.
    check(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &files) } as _,
        "RLIMIT_NOFILE",
    )
    .map_err(setup)?;
    lock_down_with(&program).map_err(setup)?;
    Ok(opened)
}

/// Says `JAILED` (tests and tools ask for it) and waits for the host's go-ahead on stdin, so the
/// host's hook runs before the guest does; then closes stdin, as `enter_jail` would have.
fn say_jailed() -> Result<(), Failure> {
    send(&Message::Jailed).map_err(|e| Failure::Setup(format!("cannot report: {e}")))?;
    // SAFETY: fd 0 is the host's pipe, kept open by `enter_jail`; this `File` closes it.
    let mut stdin = unsafe { File::from_raw_fd(0) };
    let mut go = [0u8; 1];
    match stdin.read(&mut go) {
        Ok(1) => Ok(()),
        _ => Err(Failure::Setup("the host went away before its go-ahead".into())),
    }
}

/// The worker's descriptor limit (`RLIMIT_NOFILE`).
const MAX_FILES: libc::rlim_t = 16;

/// What a jail's `open` step returns: files whose descriptors must stay open.
trait AsFds {
    fn fds(&self) -> Vec<RawFd>;
}

impl AsFds for () {
    fn fds(&self) -> Vec<RawFd> {
        vec![]
    }
}

impl AsFds for (File, File, File, File) {
    fn fds(&self) -> Vec<RawFd> {
        vec![
            self.0.as_raw_fd(),
            self.1.as_raw_fd(),
            self.2.as_raw_fd(),
            self.3.as_raw_fd(),
        ]
    }
}

impl AsFds for (File, File) {
    fn fds(&self) -> Vec<RawFd> {
        vec![self.0.as_raw_fd(), self.1.as_raw_fd()]
    }
}

/// `statvfs`'s flag for a `relatime` mount (Linux's `ST_RELATIME`, which the `libc` crate lacks
/// for musl).
const ST_RELATIME: libc::c_ulong = 0x1000;

/// Makes `dir` the root of this process's mount namespace: a bind mount of it (read-only unless
/// `access` is writable; never suid, devices or exec), `pivot_root` onto it, the old root detached
/// (or, on an initial ramfs root, the mount moved over it and `chroot`).
fn pivot_into(dir: &Path, access: Access) -> Result<(), String> {
    let dir_c = cstring(dir)?;
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: mount with valid NUL-terminated strings (or null where the kernel allows it); it only
    // changes this process's own, private mount namespace.
    unsafe {
        // Nothing done here propagates back to the host's mounts.
        check(
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) as _,
            "making the mounts private",
        )?;
        check(
            libc::mount(dir_c.as_ptr(), dir_c.as_ptr(), null, libc::MS_BIND, std::ptr::null()) as _,
            &format!("bind-mounting {}", dir.display()),
        )?;
    }
    // A remount may add flags but not clear those the host's mount has and locked: keep them.
    // SAFETY: an all-zero statvfs is a valid out-buffer; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    check(unsafe { libc::statvfs(dir_c.as_ptr(), &mut st) } as _, "statvfs")?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (st_flag, ms_flag) in [
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_RDONLY, libc::MS_RDONLY),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    if access == Access::ReadOnly {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: remounting the bind mount made above, with valid arguments.
    unsafe {
        check(
            libc::mount(null, dir_c.as_ptr(), null, flags, std::ptr::null()) as _,
            "remounting the VM's directory",
        )?;
        check(libc::chdir(dir_c.as_ptr()) as _, "chdir")?;
        // pivot_root(".", "."): the old root is stacked under the new one, then detached.
        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0 {
            check(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH) as _,
                "detaching the old root",
            )?;
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // The root is the initial ramfs, which cannot be pivoted away (a system that runs from
            // its initramfs, as the nested test VM does): move the directory's mount over it and
            // chroot, as switch_root does. The ramfs stays underneath, out of reach: escaping a
            // chroot takes capabilities or syscalls the jail no longer has.
            check(
                libc::mount(c".".as_ptr(), c"/".as_ptr(), null, libc::MS_MOVE, std::ptr::null()) as _,
                "moving the VM's directory over the root",
            )?;
            check(libc::chroot(c".".as_ptr()) as _, "chroot")?;
        } else {
            return Err(errno_text("pivot_root"));
        }
        check(libc::chdir(c"/".as_ptr()) as _, "chdir /")?;
    }
    Ok(())
}

/// Closes every descriptor from `first` up.
fn close_from(first: u32) -> Result<(), String> {
    // SAFETY: close_range only closes descriptors; none of those above `first` is in use by Rust
    // objects at this point of the helper's start.
    check(
        unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) },
        "close_range",
    )
}

/// Closes every descriptor not in `keep`.
fn close_all_except(keep: &mut [RawFd]) -> Result<(), String> {
    keep.sort_unstable();
    let mut next: u32 = 0;
    for &fd in keep.iter() {
        let fd = fd as u32;
        if fd > next {
            // SAFETY: closes only descriptors the helper does not use (not in `keep`).
            check(
                unsafe { libc::syscall(libc::SYS_close_range, next, fd - 1, 0) },
                "close_range",
            )?;
        }
        next = next.max(fd + 1);
    }
    close_from(next)
}

/// Drops every capability (bounding, ambient, effective, permitted, inheritable) and locks the
/// securebits so none comes back, then sets `no_new_privs` and installs `role`'s filter.
fn lock_down(role: Role) -> Result<(), String> {
    let program = seccomp::program(role).map_err(|e| e.to_string())?;
    lock_down_with(&program)
}

fn lock_down_with(program: &seccompiler::BpfProgram) -> Result<(), String> {
    drop_capabilities()?;
    // SAFETY: prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as _,
        "PR_SET_NO_NEW_PRIVS",
    )?;
    seccomp::install(program).map_err(|e| e.to_string())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// SECBIT_NOROOT, SECBIT_NO_SETUID_FIXUP, SECBIT_NO_CAP_AMBIENT_RAISE and their locks, and the
/// lock of SECBIT_KEEP_CAPS (left off): uid 0 in the jail never regains capabilities.
const SECUREBITS: libc::c_ulong = 0b1110_1111;

fn drop_capabilities() -> Result<(), String> {
    // The bounding set first (it needs CAP_SETPCAP, dropped last); EINVAL past the last capability.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(errno_text("PR_CAPBSET_DROP"));
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        check(
            libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) as _,
            "PR_SET_SECUREBITS",
        )?;
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ) as _,
            "PR_CAP_AMBIENT_CLEAR_ALL",
        )?;
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, both valid for the call.
    check(
        unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) },
        "capset",
    )
}

fn restore(hypervisor: Hypervisor, request: RestoreRequest) -> Result<Message, Failure> {
    let (state, memory) = enter_jail(
        &hypervisor,
        &request.dir,
        Access::ReadOnly,
        Role::Restore,
        request.flags.report_jailed,
        || {
            let open = |name: &str| File::open(root_file(name)).map_err(|e| named(name, e));
            Ok((open(STATE_FILE)?, open(MEMORY_FILE)?))
        },
    )?;
    let hypervisor = hypervisor.with_quirks(request.flags.quirks);
    let mut vm = restore_from(&hypervisor, state, memory)?;
    if request.flags.report_jailed {
        say_jailed()?;
    }
    let reply = vm
        .invoke(&request.seed, &request.input, request.timeout, request.log_cap as usize)
        .map_err(|e| match e {
            InvokeError::Request(RequestError::Run(e)) => Failure::Run(e),
            e => Failure::Guest(e.to_string()),
        })?;
    // The process's exit tears the VM down; the reply need not wait for that.
    std::mem::forget(vm);
    Ok(Message::Replied(reply))
}

/// How often a session's vCPU is kicked to look for the host's frames when the guest does not
/// poll: a bound on how long a SUSPEND waits for a busy or broken guest.
const SESSION_TICK: std::time::Duration = std::time::Duration::from_millis(50);
/// Bytes of a session's console kept to explain how its guest died.
const CONSOLE_TAIL: usize = 4096;

/// Restores the snapshot in the request's directory and runs it as a session: frames flow between
/// the host's pipe and the guest's channel until the host asks for a snapshot (written into the
/// same directory as `memory.next` and `state.tmp`) or closes the pipe (`None`: nothing to say).
fn session(hypervisor: Hypervisor, request: SessionRequest) -> Result<Option<Message>, Failure> {
    let (state, memory, next_memory, mut next_state) =
        enter_jail(&hypervisor, &request.dir, Access::Writable, Role::Boot, true, || {
            let open = |name: &str| File::open(root_file(name)).map_err(|e| named(name, e));
            let (state, memory) = (open(STATE_FILE)?, open(MEMORY_FILE)?);
            let (next_memory, next_state) = (create_private(NEXT_MEMORY_FILE)?, create_private(STATE_TMP_FILE)?);
            // The host's frames are read between guest exits, never waited for.
            // SAFETY: fcntl on stdin, the host's pipe, with integer arguments.
            unsafe {
                let flags = libc::fcntl(0, libc::F_GETFL);
                if flags < 0 || libc::fcntl(0, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok((state, memory, next_memory, next_state))
        })?;
    let hypervisor = hypervisor.with_quirks(request.flags.quirks);
    let mut vm = restore_from(&hypervisor, state, memory)?;
    let mut host = SessionPipes::default();
    if request.flags.report_jailed {
        send(&Message::Jailed).map_err(|e| Failure::Setup(format!("cannot report: {e}")))?;
        // The go-ahead is one byte ahead of the host's frames.
        host.skip = 1;
    }
    let mut session = (request.clock.as_nanos() as u64).to_le_bytes().to_vec();
    session.extend_from_slice(&request.env);
    vm.send(&Frame::new(FrameKind::Reseed, request.seed.to_vec()))
        .and_then(|()| vm.send(&Frame::new(FrameKind::Session, session)))
        .map_err(|e| Failure::Guest(e.to_string()))?;
    send(&Message::Started).map_err(|e| Failure::Setup(format!("cannot report: {e}")))?;
    // A guest that dies (a panic, its init gone) says why on its console.
    vm.keep_console(CONSOLE_TAIL);
    let stop = vm.run_session(SESSION_TICK, &mut host).map_err(|e| {
        let console = String::from_utf8_lossy(&vm.console()).trim().to_owned();
        if console.is_empty() {
            Failure::Run(e)
        } else {
            Failure::Guest(format!("{e}; the guest's console ends with:\n{console}"))
        }
    })?;
    match stop {
        SessionStop::End => {
            std::mem::forget(vm);
            Ok(None)
        }
        SessionStop::Suspend => {
            let started = Instant::now();
            let snapshot = Snapshot::write_files(&hypervisor, &mut vm, next_memory, &mut next_state)
                .map_err(|e| Failure::Vm(format!("cannot write the snapshot: {e}")))?;
            let report = SuspendReport {
                memory_size: vm.memory().size() as u64,
                snapshot: started.elapsed(),
            };
            std::mem::forget((vm, snapshot));
            Ok(Some(Message::Suspended(report)))
        }
    }
}

/// A session's host side in the worker: the host's pipe (stdin, non-blocking) read between guest
/// exits, the guest's frames written to stdout.
#[derive(Default)]
struct SessionPipes {
    /// Bytes read and not yet a whole frame.
    pending: Vec<u8>,
    /// Bytes to drop before the first frame (the JAILED go-ahead).
    skip: usize,
}

impl SessionPipes {
    /// Reads what the host has written so far; true at the end of the pipe.
    fn fill(&mut self) -> bool {
        let mut buf = [0u8; 64 << 10];
        loop {
            // SAFETY: reading into a buffer we own from stdin.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => return true,
                n if n > 0 => {
                    let mut bytes = &buf[..n as usize];
                    let skipped = self.skip.min(bytes.len());
                    self.skip -= skipped;
                    bytes = &bytes[skipped..];
                    self.pending.extend_from_slice(bytes);
                }
                _ => match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return false,
                    _ => return true,
                },
            }
        }
    }

    /// The next whole frame read, if any; `Err` if the host broke the protocol.
    fn next_message(&mut self) -> Result<Option<Message>, ()> {
        let Some(header) = self.pending.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let (_, len) = decode_header(header).map_err(|_| ())?;
        if self.pending.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let frame: Vec<u8> = self.pending.drain(..HEADER_LEN + len).collect();
        decode_frame(&frame).map(Some).map_err(|_| ())
    }
}

impl SessionHost for SessionPipes {
    fn poll(&mut self, channel: &mut Channel) -> Option<SessionStop> {
        let ended = self.fill();
        loop {
            match self.next_message() {
                Ok(Some(Message::ToGuest(frame))) => {
                    if channel.send(&frame).is_err() {
                        return Some(SessionStop::End);
                    }
                }
                Ok(Some(Message::Suspend)) => return Some(SessionStop::Suspend),
                Ok(None) => break,
                Ok(Some(_)) | Err(()) => return Some(SessionStop::End),
            }
        }
        ended.then_some(SessionStop::End)
    }

    fn deliver(&mut self, frame: Frame) -> io::Result<()> {
        send(&Message::FromGuest(frame))
    }
}

/// A VM restored from the snapshot in `state` and `memory`, opened before the jail closed; both
/// files are closed once read (the guest runs with only the mapping of the memory).
fn restore_from(hypervisor: &Hypervisor, mut state: File, memory: File) -> Result<MicroVm, Failure> {
    let snapshot =
        Snapshot::from_files(&mut state, memory).map_err(|e| Failure::Vm(format!("cannot load the snapshot: {e}")))?;
    drop(state);
    snapshot
        .restore(hypervisor)
        .map_err(|e| Failure::Vm(format!("cannot restore the snapshot: {e}")))
}

/// `name` at the root of the jail (the VM's directory).
fn root_file(name: &str) -> std::path::PathBuf {
    Path::new("/").join(name)
}

/// `e`, naming the file it happened to.
fn named(name: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{name}: {e}"))
}

/// Opens the two files a snapshot is written through, created empty and private.
fn create_snapshot_files() -> io::Result<(File, File)> {
    Ok((create_private(MEMORY_FILE)?, create_private(STATE_TMP_FILE)?))
}

/// `name` at the jail's root, created empty (or emptied), readable and writable by its owner only.
fn create_private(name: &str) -> io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(root_file(name))
        .map_err(|e| named(name, e))
}

fn boot_failure(e: BootError) -> Failure {
    match e {
        BootError::Config(e) => Failure::Config(e),
        BootError::Run(e) => Failure::Run(e),
        BootError::NotReady(kind) => Failure::Guest(format!("the guest sent a {kind:?} frame before READY")),
        e => Failure::Vm(e.to_string()),
    }
}

/// Boots with `boot`, then writes the snapshot; the common half of both boots.
fn boot_and_snapshot(
    hypervisor: Hypervisor,
    dir: &Path,
    report_jailed: bool,
    boot: impl FnOnce(&Hypervisor) -> Result<MicroVm, Failure>,
) -> Result<Message, Failure> {
    let (memory, mut state) = enter_jail(
        &hypervisor,
        dir,
        Access::Writable,
        Role::Boot,
        report_jailed,
        create_snapshot_files,
    )?;
    if report_jailed {
        say_jailed()?;
    }
    let started = Instant::now();
    let mut vm = boot(&hypervisor)?;
    let booted = started.elapsed();
    let snapshot = Snapshot::write_files(&hypervisor, &mut vm, memory, &mut state)
        .map_err(|e| Failure::Vm(format!("cannot write the snapshot: {e}")))?;
    let report = BootReport {
        memory_size: vm.memory().size() as u64,
        boot: booted,
        snapshot: started.elapsed() - booted,
    };
    // As for a restore: the process's exit tears the VM down.
    std::mem::forget((vm, snapshot));
    Ok(Message::Booted(report))
}

fn boot_flat64(hypervisor: Hypervisor, request: BootFlat64Request) -> Result<Message, Failure> {
    let hypervisor = hypervisor.with_quirks(request.flags.quirks);
    boot_and_snapshot(hypervisor, &request.dir, request.flags.report_jailed, |hv| {
        MicroVm::boot_flat64(hv, request.config, &request.image, request.timeout).map_err(boot_failure)
    })
}

fn boot_linux(hypervisor: Hypervisor, request: BootLinuxRequest) -> Result<Message, Failure> {
    let hypervisor = hypervisor.with_quirks(request.flags.quirks);
    boot_and_snapshot(hypervisor, &request.dir, request.flags.report_jailed, |hv| {
        MicroVm::boot_linux(
            hv,
            request.config,
            &request.vmlinux,
            &request.initramfs,
            &request.cmdline,
            request.timeout,
        )
        .map_err(|e| match e {
            LinuxBootError::Layout(e) => Failure::Layout(e),
            LinuxBootError::Boot {
                source: BootError::Config(e),
                ..
            } => Failure::Config(e),
            e => {
                let message = e.to_string();
                let run = match e {
                    LinuxBootError::Boot {
                        source: BootError::Run(run),
                        ..
                    } => Some(run),
                    _ => None,
                };
                Failure::LinuxBoot { message, run }
            }
        })
    })
}

fn probe(hypervisor: Hypervisor, request: ProbeRequest) -> Result<Message, Failure> {
    enter_jail(
        &hypervisor,
        &request.dir,
        Access::ReadOnly,
        Role::Restore,
        request.flags.report_jailed,
        || Ok(()),
    )?;
    if request.flags.report_jailed {
        say_jailed()?;
    }
    match request.attempt {
        None => {
            MicroVm::empty(&hypervisor, VmConfig::new(MIN_MEMORY_MIB))
                .map_err(|e| Failure::Vm(format!("cannot create a VM in the jail: {e}")))?;
            Ok(Message::Probed)
        }
        Some(attempt) => {
            let result = match attempt {
                // SAFETY: socket has no memory arguments; the filter should kill the process here.
                ForbiddenSyscall::Socket => unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) },
                // SAFETY: a valid NUL-terminated path; the filter should kill the process here.
                ForbiddenSyscall::OpenEtcPasswd => unsafe {
                    libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY)
                },
            };
            Err(Failure::Setup(format!(
                "the seccomp filter let {attempt:?} through (it returned {result})"
            )))
        }
    }
}
