//! Processes the agent starts: the function (a command of the image, or `/function`), exec'd
//! commands on pipes or a pty, and the image's lifecycle hooks.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the image says about how its command runs (files of the initramfs written by Kiln at
/// deploy: `/kiln/command`, `/kiln/workdir`, `/kiln/user`, `/kiln/hook_timeout_s`; `/env`).
#[derive(Clone, Debug)]
pub struct Image {
    /// The argv of the function; `/function` alone when the image has no command.
    pub command: Vec<String>,
    /// Whether the image named a command (a root filesystem or an OCI image) rather than being
    /// a single executable: such an image's server starts at boot, before the snapshot.
    pub has_command: bool,
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    pub env: Vec<(String, String)>,
    pub hook_timeout: Duration,
}

/// The search path a process gets when the image's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Image {
    pub fn load() -> Image {
        let command: Vec<String> = std::fs::read("/kiln/command")
            .map(|bytes| {
                bytes
                    .split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let has_command = !command.is_empty();
        let workdir = std::fs::read_to_string("/kiln/workdir")
            .ok()
            .map(|w| w.trim().to_owned())
            .filter(|w| w.starts_with('/'))
            .unwrap_or_else(|| "/".into());
        let (uid, gid) = std::fs::read_to_string("/kiln/user")
            .ok()
            .and_then(|user| {
                let (uid, gid) = user.trim().split_once(':').unwrap_or((user.trim(), "0"));
                Some((uid.parse().ok()?, gid.parse().ok()?))
            })
            .unwrap_or((0, 0));
        let hook_timeout = std::fs::read_to_string("/kiln/hook_timeout_s")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(10), |s| Duration::from_secs(s.clamp(1, 60)));
        let mut env = crate::session::parse_env(&std::fs::read("/env").unwrap_or_default());
        if !env.iter().any(|(k, _)| k == "PATH") && has_command {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        Image {
            command: if has_command { command } else { vec!["/function".into()] },
            has_command,
            workdir,
            uid,
            gid,
            env,
            hook_timeout,
        }
    }

    /// A command of this image: its user, its working directory and exactly `env`.
    pub fn command(&self, argv: &[String], cwd: Option<&str>, env: &[(String, String)]) -> Command {
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd.unwrap_or(&self.workdir));
        if self.uid != 0 || self.gid != 0 {
            command.uid(self.uid).gid(self.gid);
        }
        command
    }

    /// The image's environment with `extra` on top.
    pub fn env_with(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        env.extend(extra.iter().cloned());
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        env
    }
}

/// What an OPEN asks to run: a command on pipes, or a shell on a pty.
#[derive(Debug, PartialEq)]
pub struct ExecRequest {
    pub timeout: Option<Duration>,
    /// A pty of this many columns and rows; pipes when `None`.
    pub pty: Option<(u16, u16)>,
    pub cwd: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl ExecRequest {
    /// Parses OPEN's process target (after its tag byte); `None` if malformed.
    pub fn parse(body: &[u8]) -> Option<ExecRequest> {
        let timeout_ms = u32::from_le_bytes(*body.first_chunk::<4>()?);
        let pty = *body.get(4)?;
        let cols = u16::from_le_bytes([*body.get(5)?, *body.get(6)?]);
        let rows = u16::from_le_bytes([*body.get(7)?, *body.get(8)?]);
        let mut rest = body.get(9..)?;
        let cwd = take_string(&mut rest)?;
        let argc = u16::from_le_bytes(*rest.first_chunk::<2>()?);
        rest = &rest[2..];
        let argv = (0..argc).map(|_| take_string(&mut rest)).collect::<Option<Vec<_>>>()?;
        Some(ExecRequest {
            timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into())),
            pty: (pty != 0).then_some((cols.max(1), rows.max(1))),
            cwd: (!cwd.is_empty()).then_some(cwd),
            argv,
            env: crate::session::parse_env(rest),
        })
    }
}

/// The NUL-terminated string at the start of `rest`, which moves past it.
fn take_string(rest: &mut &[u8]) -> Option<String> {
    let end = rest.iter().position(|&b| b == 0)?;
    let s = String::from_utf8_lossy(&rest[..end]).into_owned();
    *rest = &rest[end + 1..];
    Some(s)
}

/// A process being run for a stream: its input, its outputs, and how it ended.
pub struct Process {
    pub child: Child,
    /// stdin (pipes) or the pty's master.
    pub input: Option<OwnedFd>,
    /// stdout (pipes) or the pty's master (a second descriptor of it).
    pub output: Option<OwnedFd>,
    /// stderr; `None` on a pty, where it is the terminal.
    pub errors: Option<OwnedFd>,
    pub pty: bool,
    pub deadline: Option<Instant>,
    pub timed_out: bool,
    /// The exit status once it has ended (a signal is 128 + its number).
    pub status: Option<i32>,
    /// When the process ended: its outputs get a moment to drain, then are closed (a
    /// background child may hold them open for good).
    pub ended_at: Option<Instant>,
}

impl Process {
    /// Starts `request` as `image`'s user; in its own session (a pty's controlling terminal) or
    /// process group, so a timeout or a reset kills everything it started.
    pub fn start(image: &Image, request: &ExecRequest) -> io::Result<Process> {
        let mut argv = request.argv.clone();
        if argv.is_empty() {
            // A login shell: the image's bash if it has one, else sh.
            let shell = if std::path::Path::new("/bin/bash").exists() {
                "/bin/bash"
            } else {
                "/bin/sh"
            };
            argv = vec![shell.into(), "-l".into()];
        }
        let mut env = image.env_with(&request.env);
        if request.pty.is_some() {
            for (key, value) in [("TERM", "xterm-256color"), ("HOME", "/root")] {
                if !env.iter().any(|(k, _)| k == key) {
                    env.push((key.into(), value.into()));
                }
            }
        }
        let mut command = image.command(&argv, request.cwd.as_deref(), &env);
        let deadline = request.timeout.map(|t| Instant::now() + t);
        match request.pty {
            None => {
                command
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                // SAFETY: setpgid is async-signal-safe.
                unsafe {
                    command.pre_exec(|| {
                        libc::setpgid(0, 0);
                        Ok(())
                    })
                };
                let mut child = command.spawn()?;
                let input: OwnedFd = child.stdin.take().expect("piped").into();
                let output: OwnedFd = child.stdout.take().expect("piped").into();
                let errors: OwnedFd = child.stderr.take().expect("piped").into();
                for fd in [&input, &output, &errors] {
                    set_nonblocking(fd.as_raw_fd());
                }
                Ok(Process {
                    child,
                    input: Some(input),
                    output: Some(output),
                    errors: Some(errors),
                    pty: false,
                    deadline,
                    timed_out: false,
                    status: None,
                    ended_at: None,
                })
            }
            Some((cols, rows)) => {
                let (master, slave) = open_pty(cols, rows)?;
                command
                    .stdin(Stdio::from(slave.try_clone()?))
                    .stdout(Stdio::from(slave.try_clone()?))
                    .stderr(Stdio::from(slave));
                // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the pty's slave here.
                unsafe {
                    command.pre_exec(|| {
                        if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    })
                };
                let child = command.spawn()?;
                set_nonblocking(master.as_raw_fd());
                let output = master.try_clone()?;
                Ok(Process {
                    child,
                    input: Some(master),
                    output: Some(output),
                    errors: None,
                    pty: true,
                    deadline,
                    timed_out: false,
                    status: None,
                    ended_at: None,
                })
            }
        }
    }

    /// Notes the process's end (without blocking); kills it past its deadline.
    pub fn check(&mut self) {
        if self.status.is_some() {
            return;
        }
        let ended = match self.child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                Some(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
            }
            Ok(None) => None,
            // Reaped by [`reap_orphans`] first.
            Err(_) => reaped(self.child.id()),
        };
        if let Some(status) = ended {
            self.status = Some(status);
            self.ended_at = Some(Instant::now());
            return;
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) && !self.timed_out {
            self.timed_out = true;
            self.kill();
        }
    }

    /// Kills the process and everything in its group or session.
    pub fn kill(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signals to our own child's group, then the child itself.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }

    /// Resizes the pty (a no-op on pipes).
    pub fn resize(&self, cols: u16, rows: u16) {
        if let (true, Some(master)) = (self.pty, &self.input) {
            let size = winsize(cols, rows);
            // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
            unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ as _, &size) };
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
            let _ = self.child.wait();
        }
    }
}

/// Exit statuses [`reap_orphans`] collected, by pid, for the owners that ask after them.
static REAPED: std::sync::Mutex<Vec<(u32, i32)>> = std::sync::Mutex::new(Vec::new());

/// As PID 1 the agent inherits every orphan (a daemon's children, a shell's background jobs):
/// each is reaped here, so none stays a zombie. A child of the agent's own reaped here keeps its
/// status for [`Process::check`].
pub fn reap_orphans() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a valid int.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        let mut reaped = REAPED.lock().unwrap_or_else(|e| e.into_inner());
        reaped.push((pid as u32, code));
        // Orphans nobody asks after: keep the list bounded.
        if reaped.len() > 4096 {
            reaped.drain(..2048);
        }
    }
}

fn reaped(pid: u32) -> Option<i32> {
    let mut reaped = REAPED.lock().unwrap_or_else(|e| e.into_inner());
    let at = reaped.iter().position(|(p, _)| *p == pid)?;
    Some(reaped.remove(at).1)
}

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A pty pair (`/dev/ptmx` and devpts, mounted by the agent at start).
fn open_pty(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let size = winsize(cols, rows);
    // SAFETY: openpty writes two descriptors; the name pointer may be null; termios null.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty returned two descriptors owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: fcntl with integer arguments on descriptors we own.
    unsafe {
        libc::fcntl(master.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(slave.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
    Ok((master, slave))
}

pub fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl with integer arguments on a descriptor the caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

pub const READY_HOOK: &str = "/kiln/hooks/ready";

/// The lifecycle hooks an image may provide, by the number the channel's HOOK frames use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Hook {
    Ready = 0,
    Restore = 1,
    Suspend = 2,
    Terminate = 3,
}

impl Hook {
    pub fn from_byte(byte: u8) -> Option<Hook> {
        Some(match byte {
            0 => Hook::Ready,
            1 => Hook::Restore,
            2 => Hook::Suspend,
            3 => Hook::Terminate,
            _ => return None,
        })
    }

    fn path(self) -> &'static str {
        match self {
            Hook::Ready => READY_HOOK,
            Hook::Restore => "/kiln/hooks/restore",
            Hook::Suspend => "/kiln/hooks/suspend",
            Hook::Terminate => "/kiln/hooks/terminate",
        }
    }
}

/// Runs the image's `hook`, if it has one, within the image's hook timeout: (status, output —
/// stdout and stderr together). No hook is status 0 with no output; a hook past its timeout is
/// killed and fails.
pub fn run_hook(image: &Image, hook: Hook) -> (i32, Vec<u8>) {
    let path = hook.path();
    if !std::path::Path::new(path).exists() {
        return (0, Vec::new());
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return (
            -1,
            format!("kiln-agent: {path}: {}\n", io::Error::last_os_error()).into_bytes(),
        );
    }
    // SAFETY: pipe2 just returned these two descriptors, owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let env = image.env_with(&[]);
    let mut command = image.command(&[path.to_owned()], None, &env);
    let stderr = match write.try_clone() {
        Ok(fd) => fd,
        Err(e) => return (-1, format!("kiln-agent: {path}: {e}\n").into_bytes()),
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(stderr));
    // SAFETY: setpgid is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::setpgid(0, 0);
            Ok(())
        })
    };
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return (-1, format!("kiln-agent: cannot run {path}: {e}\n").into_bytes()),
    };
    drop(command);
    let deadline = Instant::now() + image.hook_timeout;
    set_nonblocking(read.as_raw_fd());
    let mut reader = std::fs::File::from(read);
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    let status = loop {
        loop {
            match reader.read(&mut buf) {
                Ok(n) if n > 0 => {
                    if output.len() < 64 << 10 {
                        output.extend_from_slice(&buf[..n]);
                    }
                }
                _ => break,
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            use std::os::unix::process::ExitStatusExt;
            break status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        }
        if Instant::now() >= deadline {
            let pid = child.id() as i32;
            // SAFETY: signals to our own child's group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            output.extend_from_slice(
                format!("kiln-agent: {path} ran past its timeout of {:?}\n", image.hook_timeout).as_bytes(),
            );
            break -1;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // What the hook wrote just before it ended.
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 || output.len() >= 64 << 10 {
            break;
        }
        output.extend_from_slice(&buf[..n]);
    }
    (status, output)
}

/// A file path from the host: absolute, no NUL.
pub fn guest_path(bytes: &[u8]) -> Option<CString> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let path = &bytes[..end];
    (path.first() == Some(&b'/')).then(|| CString::new(path).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_request_parses_as_the_host_encodes_it() {
        let mut body = 1500u32.to_le_bytes().to_vec();
        body.push(1);
        body.extend_from_slice(&120u16.to_le_bytes());
        body.extend_from_slice(&40u16.to_le_bytes());
        body.extend_from_slice(b"/tmp\0");
        body.extend_from_slice(&2u16.to_le_bytes());
        body.extend_from_slice(b"sh\0-l\0A=1\0B=x=y\0");
        let request = ExecRequest::parse(&body).unwrap();
        assert_eq!(
            request,
            ExecRequest {
                timeout: Some(Duration::from_millis(1500)),
                pty: Some((120, 40)),
                cwd: Some("/tmp".into()),
                argv: vec!["sh".into(), "-l".into()],
                env: vec![("A".into(), "1".into()), ("B".into(), "x=y".into())],
            }
        );
        assert_eq!(ExecRequest::parse(&body[..12]), None, "truncated");
    }
}
