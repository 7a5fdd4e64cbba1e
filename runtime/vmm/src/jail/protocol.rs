//! The host↔helper protocol: versioned, length-prefixed frames over the helper's stdin (host →
//! helper) and stdout (helper → host).
//!
//! ```text
//!  offset  size  field
//!  0       4     payload length N, little-endian u32 (bounded per kind, see `max_payload`)
//!  4       1     protocol version (VERSION)
//!  5       1     kind
//!  6       N     payload
//! ```
//!
//! All integers are little-endian. Inside a payload, a byte string is a `u32` length and the
//! bytes; a path is a `u16` length and the bytes (absolute, no NUL, at most `MAX_PATH`); a text
//! is a byte string of valid UTF-8 of at most `MAX_TEXT` bytes.
//!
//! | kind | direction | payload |
//! | --- | --- | --- |
//! | 1 RESTORE | host → helper | flags u8, timeout ns u64, log cap u32, seed \[32\], dir path, input bytes |
//! | 2 BOOT_FLAT64 | host → helper | flags u8, memory MiB u32, max MiB u32, timeout ns u64, dir path, image bytes |
//! | 3 BOOT_LINUX | host → helper | flags u8, memory MiB u32, max MiB u32, timeout ns u64, dir path, command line text, vmlinux bytes, initramfs bytes |
//! | 4 PROBE | host → helper | flags u8, dir path, attempt u8 (0 none, 1 `socket`, 2 `openat("/etc/passwd")`) |
//! | 5 SESSION | host → helper | flags u8, seed \[32\], clock (unix ns) u64, dir path, env bytes (`KEY=VALUE` NUL-ended): restore and keep running |
//! | 6 TO_GUEST | host → helper | during a session: a channel frame's kind u8, then its payload |
//! | 7 SUSPEND | host → helper | during a session: empty — snapshot the VM into the session's directory and end |
//! | 16 HELLO | helper → host | the worker's pid u32 (in the host's PID namespace) |
//! | 17 JAILED | helper → host | empty: the worker is jailed and about to run the guest (sent when flag 2 asks) |
//! | 18 REPLIED | helper → host | exit code i32, log truncated u8 (0/1), stdout bytes, log bytes |
//! | 19 BOOTED | helper → host | memory size u64, boot ns u64, snapshot ns u64 |
//! | 20 PROBED | helper → host | empty |
//! | 21 FAILED | helper → host | a failure: tag u8 and its fields (see `put_failure`; run errors keep their variant and fields) |
//! | 22 EXITED | helper → host | how the worker ended: 0 exit code i32, or 1 signal i32 (sent by the supervisor) |
//! | 23 STARTED | helper → host | empty: the session's VM is restored and running |
//! | 24 FROM_GUEST | helper → host | during a session: a channel frame's kind u8, then its payload |
//! | 25 SUSPENDED | helper → host | memory size u64, snapshot ns u64: the snapshot is written (state as `state.tmp`) |
//!
//! Request flags: bit 0 `Quirks::available_tss_on_restore`, bit 1 report JAILED; other bits are
//! refused. The decoder is strict: an unknown version, kind, tag or flag, a length over its bound,
//! a truncated field or a trailing byte is an error, never a guess. [`decode_frame`] is the entry
//! point a fuzzer drives.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::builder::{ConfigError, VmConfig};
use crate::devices::channel::{ChannelError, Frame, FrameKind, MAX_PAYLOAD};
use crate::invocation::{Reply, SEED_LEN};
use crate::linux::LayoutError;
use crate::vstate::vcpu::RunError;
use crate::vstate::vm::Quirks;

/// The protocol version this build speaks; a frame of another version is refused.
pub const VERSION: u8 = 1;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 6;
/// Largest request payload: a Linux boot carries the whole `vmlinux` and the initramfs.
pub const MAX_REQUEST_PAYLOAD: usize = 1 << 30;
/// Largest report payload: a reply's stdout (one channel frame) plus a log of at most `MAX_LOG_CAP`.
pub const MAX_REPORT_PAYLOAD: usize = MAX_PAYLOAD as usize + MAX_LOG_CAP as usize + 4096;
/// Largest log cap a request may ask for.
pub const MAX_LOG_CAP: u32 = 16 << 20;
/// Longest directory path.
pub const MAX_PATH: usize = 4096;
/// Longest text (error messages, the kernel command line).
pub const MAX_TEXT: usize = 64 << 10;

const FLAG_AVAILABLE_TSS: u8 = 1;
const FLAG_REPORT_JAILED: u8 = 2;

mod kind {
    pub const RESTORE: u8 = 1;
    pub const BOOT_FLAT64: u8 = 2;
    pub const BOOT_LINUX: u8 = 3;
    pub const PROBE: u8 = 4;
    pub const SESSION: u8 = 5;
    pub const TO_GUEST: u8 = 6;
    pub const SUSPEND: u8 = 7;
    pub const HELLO: u8 = 16;
    pub const JAILED: u8 = 17;
    pub const REPLIED: u8 = 18;
    pub const BOOTED: u8 = 19;
    pub const PROBED: u8 = 20;
    pub const FAILED: u8 = 21;
    pub const EXITED: u8 = 22;
    pub const STARTED: u8 = 23;
    pub const FROM_GUEST: u8 = 24;
    pub const SUSPENDED: u8 = 25;
}

/// Options every request carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestFlags {
    pub quirks: Quirks,
    /// Send JAILED once the worker is jailed and about to run the guest.
    pub report_jailed: bool,
}

/// A syscall the seccomp filter forbids, attempted on purpose by a PROBE (tests prove the filter
/// kills the helper).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForbiddenSyscall {
    /// `socket(AF_INET, SOCK_STREAM, 0)`.
    Socket,
    /// `openat(AT_FDCWD, "/etc/passwd", O_RDONLY)`.
    OpenEtcPasswd,
}

/// Restore a snapshot and run one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    pub flags: RequestFlags,
    pub timeout: Duration,
    pub log_cap: u32,
    pub seed: [u8; SEED_LEN],
    pub dir: PathBuf,
    pub input: Vec<u8>,
}

/// Boot a flat 64-bit test image to READY and snapshot it into `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFlat64Request {
    pub flags: RequestFlags,
    pub config: VmConfig,
    pub timeout: Duration,
    pub dir: PathBuf,
    pub image: Vec<u8>,
}

/// Boot Linux and the agent to READY and snapshot it into `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootLinuxRequest {
    pub flags: RequestFlags,
    pub config: VmConfig,
    pub timeout: Duration,
    pub dir: PathBuf,
    pub cmdline: String,
    pub vmlinux: Vec<u8>,
    pub initramfs: Vec<u8>,
}

/// Create a VM in the jail (and, for tests, attempt a forbidden syscall).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRequest {
    pub flags: RequestFlags,
    pub dir: PathBuf,
    pub attempt: Option<ForbiddenSyscall>,
}

/// Restore a snapshot and keep the VM running as a session (a sandbox): frames flow both ways
/// until the host asks for a snapshot (SUSPEND) or closes the pipe. `dir` holds the snapshot
/// (`memory`, `state`) and receives the next one (`memory.next`, `state.tmp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRequest {
    pub flags: RequestFlags,
    pub seed: [u8; SEED_LEN],
    /// The host's wall clock when it asked (since the Unix epoch): the guest sets its own.
    pub clock: Duration,
    pub dir: PathBuf,
    /// The sandbox's own environment, `KEY=VALUE` entries each ending in NUL (at most
    /// `MAX_TEXT` bytes), added to the function's when its server starts.
    pub env: Vec<u8>,
}

/// What a session's snapshot took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuspendReport {
    /// Guest memory in bytes.
    pub memory_size: u64,
    /// Writing the memory and state files.
    pub snapshot: Duration,
}

/// What a boot in the helper produced: a snapshot in the request's directory (its state still
/// named `state.tmp`: the host renames it) and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootReport {
    /// Guest memory in bytes.
    pub memory_size: u64,
    /// From creating the VM to the guest's READY.
    pub boot: Duration,
    /// Writing the memory and state files.
    pub snapshot: Duration,
}

/// How a helper's worker ended, as its supervisor saw it (or, if the supervisor itself was killed,
/// how the supervisor ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelperExit {
    Code(i32),
    Signal(i32),
}

/// A failure the helper reports, its structure kept where the server acts on it.
#[derive(Debug)]
pub enum Failure {
    /// The jail could not be built (namespaces refused, KVM unopenable, ...).
    Setup(String),
    Config(ConfigError),
    Layout(LayoutError),
    /// The vCPU stopped: timeout, memory limit, shutdown, ...
    Run(RunError),
    /// The guest broke the invocation protocol.
    Guest(String),
    /// KVM, memory or snapshot files failed.
    Vm(String),
    /// A Linux boot failed: the whole error (ending with the guest's console), and the run error
    /// behind it if the vCPU stopped.
    LinuxBoot {
        message: String,
        run: Option<RunError>,
    },
}

/// One frame's message.
#[derive(Debug)]
pub enum Message {
    Restore(RestoreRequest),
    BootFlat64(BootFlat64Request),
    BootLinux(BootLinuxRequest),
    Probe(ProbeRequest),
    Session(SessionRequest),
    ToGuest(Frame),
    Suspend,
    Hello { worker_pid: u32 },
    Jailed,
    Replied(Reply),
    Booted(BootReport),
    Probed,
    Failed(Failure),
    Exited(HelperExit),
    Started,
    FromGuest(Frame),
    Suspended(SuspendReport),
}

/// A frame the decoder refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the frame ends before its {0} is complete")]
    Truncated(&'static str),
    #[error("{0} bytes follow the frame's payload")]
    TrailingBytes(usize),
    #[error("protocol version {0} is not {VERSION}")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("a kind-{kind} frame of {len} bytes exceeds its limit of {max} bytes")]
    TooLong { kind: u8, len: usize, max: usize },
    #[error("a {what} of {len} bytes exceeds its limit of {max} bytes")]
    FieldTooLong { what: &'static str, len: usize, max: usize },
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Restore(_) => kind::RESTORE,
            Message::BootFlat64(_) => kind::BOOT_FLAT64,
            Message::BootLinux(_) => kind::BOOT_LINUX,
            Message::Probe(_) => kind::PROBE,
            Message::Session(_) => kind::SESSION,
            Message::ToGuest(_) => kind::TO_GUEST,
            Message::Suspend => kind::SUSPEND,
            Message::Hello { .. } => kind::HELLO,
            Message::Jailed => kind::JAILED,
            Message::Replied(_) => kind::REPLIED,
            Message::Booted(_) => kind::BOOTED,
            Message::Probed => kind::PROBED,
            Message::Failed(_) => kind::FAILED,
            Message::Exited(_) => kind::EXITED,
            Message::Started => kind::STARTED,
            Message::FromGuest(_) => kind::FROM_GUEST,
            Message::Suspended(_) => kind::SUSPENDED,
        }
    }

    /// Whether the host sends this message (the helper sends the others).
    pub fn is_request(&self) -> bool {
        kind_is_request(self.kind())
    }

    /// The message as one frame on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(vec![0; HEADER_LEN]);
        match self {
            Message::Restore(r) => {
                w.flags(r.flags);
                w.duration(r.timeout);
                w.u32(r.log_cap);
                w.put(&r.seed);
                w.path(&r.dir);
                w.bytes(&r.input);
            }
            Message::BootFlat64(r) => {
                w.flags(r.flags);
                w.config(r.config);
                w.duration(r.timeout);
                w.path(&r.dir);
                w.bytes(&r.image);
            }
            Message::BootLinux(r) => {
                w.flags(r.flags);
                w.config(r.config);
                w.duration(r.timeout);
                w.path(&r.dir);
                w.text(&r.cmdline);
                w.bytes(&r.vmlinux);
                w.bytes(&r.initramfs);
            }
            Message::Probe(r) => {
                w.flags(r.flags);
                w.path(&r.dir);
                w.u8(match r.attempt {
                    None => 0,
                    Some(ForbiddenSyscall::Socket) => 1,
                    Some(ForbiddenSyscall::OpenEtcPasswd) => 2,
                });
            }
            Message::Session(r) => {
                w.flags(r.flags);
                w.put(&r.seed);
                w.duration(r.clock);
                w.path(&r.dir);
                w.bytes(&r.env);
            }
            Message::ToGuest(frame) | Message::FromGuest(frame) => {
                w.u8(frame.kind as u8);
                w.put(&frame.payload);
            }
            Message::Suspended(report) => {
                w.u64(report.memory_size);
                w.duration(report.snapshot);
            }
            Message::Hello { worker_pid } => w.u32(*worker_pid),
            Message::Jailed | Message::Probed | Message::Suspend | Message::Started => {}
            Message::Replied(r) => {
                w.u32(r.exit_code as u32);
                w.u8(r.log_truncated as u8);
                w.bytes(&r.stdout);
                w.bytes(&r.log);
            }
            Message::Booted(b) => {
                w.u64(b.memory_size);
                w.duration(b.boot);
                w.duration(b.snapshot);
            }
            Message::Failed(f) => put_failure(&mut w, f),
            Message::Exited(HelperExit::Code(c)) => {
                w.u8(0);
                w.u32(*c as u32);
            }
            Message::Exited(HelperExit::Signal(s)) => {
                w.u8(1);
                w.u32(*s as u32);
            }
        }
        let mut out = w.0;
        let len = (out.len() - HEADER_LEN) as u32;
        out[..4].copy_from_slice(&len.to_le_bytes());
        out[4] = VERSION;
        out[5] = self.kind();
        out
    }
}

/// Whether a frame of `kind` travels host → helper (the helper sends the others).
pub fn kind_is_request(kind: u8) -> bool {
    kind < kind::HELLO
}

/// The largest payload a frame of `kind` may have, or `None` for an unknown kind.
fn max_payload(kind: u8) -> Option<usize> {
    Some(match kind {
        kind::RESTORE | kind::BOOT_FLAT64 | kind::BOOT_LINUX => MAX_REQUEST_PAYLOAD,
        kind::PROBE => 1 + 2 + MAX_PATH + 1,
        kind::SESSION => 1 + SEED_LEN + 8 + 2 + MAX_PATH + 4 + MAX_TEXT,
        kind::TO_GUEST | kind::FROM_GUEST => 1 + MAX_PAYLOAD as usize,
        kind::SUSPEND | kind::STARTED => 0,
        kind::SUSPENDED => 16,
        kind::HELLO => 4,
        kind::JAILED | kind::PROBED => 0,
        kind::REPLIED => MAX_REPORT_PAYLOAD,
        kind::BOOTED => 24,
        kind::FAILED => 1 + 4 + MAX_TEXT,
        kind::EXITED => 5,
        _ => return None,
    })
}

/// Checks a frame header and returns the kind and the payload length it announces, within that
/// kind's bound: how many more bytes a reader may take.
pub fn decode_header(header: &[u8; HEADER_LEN]) -> Result<(u8, usize), DecodeError> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if header[4] != VERSION {
        return Err(DecodeError::Version(header[4]));
    }
    let kind = header[5];
    let max = max_payload(kind).ok_or(DecodeError::UnknownKind(kind))?;
    if len > max {
        return Err(DecodeError::TooLong { kind, len, max });
    }
    Ok((kind, len))
}

/// Decodes exactly one frame, header and payload, refusing anything not exactly as
/// [`Message::encode`] writes it.
pub fn decode_frame(bytes: &[u8]) -> Result<Message, DecodeError> {
    let (header, payload) = bytes
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(DecodeError::Truncated("header"))?;
    let (kind, len) = decode_header(header)?;
    match payload.len() {
        n if n < len => return Err(DecodeError::Truncated("payload")),
        n if n > len => return Err(DecodeError::TrailingBytes(n - len)),
        _ => {}
    }
    let mut r = Reader(payload);
    let message = match kind {
        kind::RESTORE => Message::Restore(RestoreRequest {
            flags: r.flags()?,
            timeout: r.duration()?,
            log_cap: match r.u32()? {
                cap if cap > MAX_LOG_CAP => {
                    return Err(DecodeError::FieldTooLong {
                        what: "log cap",
                        len: cap as usize,
                        max: MAX_LOG_CAP as usize,
                    })
                }
                cap => cap,
            },
            seed: r.array()?,
            dir: r.path()?,
            input: r.bytes("input", MAX_PAYLOAD as usize)?.to_vec(),
        }),
        kind::BOOT_FLAT64 => Message::BootFlat64(BootFlat64Request {
            flags: r.flags()?,
            config: r.config()?,
            timeout: r.duration()?,
            dir: r.path()?,
            image: r.bytes("image", MAX_REQUEST_PAYLOAD)?.to_vec(),
        }),
        kind::BOOT_LINUX => Message::BootLinux(BootLinuxRequest {
            flags: r.flags()?,
            config: r.config()?,
            timeout: r.duration()?,
            dir: r.path()?,
            cmdline: r.text()?,
            vmlinux: r.bytes("vmlinux", MAX_REQUEST_PAYLOAD)?.to_vec(),
            initramfs: r.bytes("initramfs", MAX_REQUEST_PAYLOAD)?.to_vec(),
        }),
        kind::PROBE => Message::Probe(ProbeRequest {
            flags: r.flags()?,
            dir: r.path()?,
            attempt: match r.u8()? {
                0 => None,
                1 => Some(ForbiddenSyscall::Socket),
                2 => Some(ForbiddenSyscall::OpenEtcPasswd),
                _ => return Err(DecodeError::Invalid("probe attempt")),
            },
        }),
        kind::SESSION => Message::Session(SessionRequest {
            flags: r.flags()?,
            seed: r.array()?,
            clock: r.duration()?,
            dir: r.path()?,
            env: r.bytes("environment", MAX_TEXT)?.to_vec(),
        }),
        kind::TO_GUEST | kind::FROM_GUEST => {
            let frame = Frame {
                kind: FrameKind::from_byte(r.u8()?).ok_or(DecodeError::Invalid("channel frame kind"))?,
                payload: std::mem::take(&mut r.0).to_vec(),
            };
            if kind == kind::TO_GUEST {
                Message::ToGuest(frame)
            } else {
                Message::FromGuest(frame)
            }
        }
        kind::SUSPEND => Message::Suspend,
        kind::STARTED => Message::Started,
        kind::SUSPENDED => Message::Suspended(SuspendReport {
            memory_size: r.u64()?,
            snapshot: r.duration()?,
        }),
        kind::HELLO => Message::Hello { worker_pid: r.u32()? },
        kind::JAILED => Message::Jailed,
        kind::REPLIED => Message::Replied(Reply {
            exit_code: r.u32()? as i32,
            log_truncated: r.bool()?,
            stdout: r.bytes("stdout", MAX_PAYLOAD as usize)?.to_vec(),
            log: r.bytes("log", MAX_LOG_CAP as usize)?.to_vec(),
        }),
        kind::BOOTED => Message::Booted(BootReport {
            memory_size: r.u64()?,
            boot: r.duration()?,
            snapshot: r.duration()?,
        }),
        kind::PROBED => Message::Probed,
        kind::FAILED => Message::Failed(r.failure()?),
        kind::EXITED => Message::Exited(match r.u8()? {
            0 => HelperExit::Code(r.u32()? as i32),
            1 => HelperExit::Signal(r.u32()? as i32),
            _ => return Err(DecodeError::Invalid("exit kind")),
        }),
        _ => unreachable!("decode_header knows every kind"),
    };
    match r.0.len() {
        0 => Ok(message),
        n => Err(DecodeError::TrailingBytes(n)),
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn duration(&mut self, d: Duration) {
        self.u64(d.as_nanos().min(u64::MAX as u128) as u64);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.put(b);
    }
    fn text(&mut self, s: &str) {
        // Messages are cut (at a character boundary) rather than refused: an error must arrive.
        let mut end = s.len().min(MAX_TEXT);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes(&s.as_bytes()[..end]);
    }
    fn path(&mut self, p: &Path) {
        let b = p.as_os_str().as_bytes();
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.put(b);
    }
    fn flags(&mut self, f: RequestFlags) {
        let mut v = 0;
        if f.quirks.available_tss_on_restore {
            v |= FLAG_AVAILABLE_TSS;
        }
        if f.report_jailed {
            v |= FLAG_REPORT_JAILED;
        }
        self.u8(v);
    }
    fn config(&mut self, c: VmConfig) {
        self.u32(c.memory_mib);
        self.u32(c.max_memory_mib);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self.0.split_at_checked(n).ok_or(DecodeError::Truncated(what))?;
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N, "field")?.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("boolean")),
        }
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn duration(&mut self) -> Result<Duration, DecodeError> {
        Ok(Duration::from_nanos(self.u64()?))
    }
    fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(DecodeError::FieldTooLong { what, len, max });
        }
        self.take(len, what)
    }
    fn text(&mut self) -> Result<String, DecodeError> {
        let bytes = self.bytes("text", MAX_TEXT)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid("UTF-8 text"))
    }
    fn path(&mut self) -> Result<PathBuf, DecodeError> {
        let len = u16::from_le_bytes(self.array()?) as usize;
        if len > MAX_PATH {
            return Err(DecodeError::FieldTooLong {
                what: "path",
                len,
                max: MAX_PATH,
            });
        }
        let bytes = self.take(len, "path")?;
        if bytes.first() != Some(&b'/') || bytes.contains(&0) {
            return Err(DecodeError::Invalid("path (not absolute, or holds a NUL)"));
        }
        Ok(PathBuf::from(OsStr::from_bytes(bytes)))
    }
    fn flags(&mut self) -> Result<RequestFlags, DecodeError> {
        let v = self.u8()?;
        if v & !(FLAG_AVAILABLE_TSS | FLAG_REPORT_JAILED) != 0 {
            return Err(DecodeError::Invalid("request flags"));
        }
        Ok(RequestFlags {
            quirks: Quirks {
                available_tss_on_restore: v & FLAG_AVAILABLE_TSS != 0,
            },
            report_jailed: v & FLAG_REPORT_JAILED != 0,
        })
    }
    fn config(&mut self) -> Result<VmConfig, DecodeError> {
        Ok(VmConfig {
            memory_mib: self.u32()?,
            max_memory_mib: self.u32()?,
        })
    }
    fn usize64(&mut self) -> Result<usize, DecodeError> {
        usize::try_from(self.u64()?).map_err(|_| DecodeError::Invalid("size"))
    }

    fn failure(&mut self) -> Result<Failure, DecodeError> {
        Ok(match self.u8()? {
            0 => Failure::Setup(self.text()?),
            1 => Failure::Config(match self.u8()? {
                0 => ConfigError::MemorySize {
                    requested: self.u32()?,
                    min: self.u32()?,
                    max: self.u32()?,
                },
                1 => ConfigError::ImageTooLarge {
                    len: self.usize64()?,
                    memory_mib: self.u32()?,
                },
                _ => return Err(DecodeError::Invalid("configuration error")),
            }),
            2 => Failure::Layout(match self.u8()? {
                0 => LayoutError::CmdlineTooLong { len: self.usize64()? },
                1 => LayoutError::CmdlineNul,
                2 => LayoutError::TooSmall {
                    kernel_end: self.u64()?,
                    initramfs: self.usize64()?,
                    memory: self.usize64()?,
                },
                _ => return Err(DecodeError::Invalid("layout error")),
            }),
            3 => Failure::Run(self.run_error()?),
            4 => Failure::Guest(self.text()?),
            5 => Failure::Vm(self.text()?),
            6 => Failure::LinuxBoot {
                message: self.text()?,
                run: match self.u8()? {
                    0 => None,
                    1 => Some(self.run_error()?),
                    _ => return Err(DecodeError::Invalid("optional run error")),
                },
            },
            _ => return Err(DecodeError::Invalid("failure")),
        })
    }

    fn run_error(&mut self) -> Result<RunError, DecodeError> {
        Ok(match self.u8()? {
            0 => RunError::Timeout(self.duration()?),
            1 => RunError::MemoryExceeded {
                addr: self.u64()?,
                size: self.usize64()?,
            },
            2 => RunError::Shutdown,
            3 => RunError::Channel(match self.u8()? {
                0 => ChannelError::Underflow {
                    wanted: self.usize64()?,
                    queued: self.usize64()?,
                },
                1 => ChannelError::Oversized { len: self.u32()? },
                2 => ChannelError::UnknownKind(self.u8()?),
                3 => ChannelError::InputTooLarge { len: self.usize64()? },
                _ => return Err(DecodeError::Invalid("channel error")),
            }),
            4 => RunError::Internal,
            5 => RunError::UnexpectedExit(self.text()?),
            6 => RunError::Timer(std::io::Error::from_raw_os_error(self.u32()? as i32)),
            7 => RunError::Stopped,
            8 => RunError::Kvm(kvm_ioctls::Error::new(self.u32()? as i32)),
            _ => return Err(DecodeError::Invalid("run error")),
        })
    }
}

fn put_failure(w: &mut Writer, failure: &Failure) {
    match failure {
        Failure::Setup(m) => {
            w.u8(0);
            w.text(m);
        }
        Failure::Config(e) => {
            w.u8(1);
            match *e {
                ConfigError::MemorySize { requested, min, max } => {
                    w.u8(0);
                    w.u32(requested);
                    w.u32(min);
                    w.u32(max);
                }
                ConfigError::ImageTooLarge { len, memory_mib } => {
                    w.u8(1);
                    w.u64(len as u64);
                    w.u32(memory_mib);
                }
            }
        }
        Failure::Layout(e) => {
            w.u8(2);
            match *e {
                LayoutError::CmdlineTooLong { len } => {
                    w.u8(0);
                    w.u64(len as u64);
                }
                LayoutError::CmdlineNul => w.u8(1),
                LayoutError::TooSmall {
                    kernel_end,
                    initramfs,
                    memory,
                } => {
                    w.u8(2);
                    w.u64(kernel_end);
                    w.u64(initramfs as u64);
                    w.u64(memory as u64);
                }
            }
        }
        Failure::Run(e) => {
            w.u8(3);
            put_run_error(w, e);
        }
        Failure::Guest(m) => {
            w.u8(4);
            w.text(m);
        }
        Failure::Vm(m) => {
            w.u8(5);
            w.text(m);
        }
        Failure::LinuxBoot { message, run } => {
            w.u8(6);
            w.text(message);
            match run {
                None => w.u8(0),
                Some(e) => {
                    w.u8(1);
                    put_run_error(w, e);
                }
            }
        }
    }
}

fn put_run_error(w: &mut Writer, e: &RunError) {
    match e {
        RunError::Timeout(d) => {
            w.u8(0);
            w.duration(*d);
        }
        RunError::MemoryExceeded { addr, size } => {
            w.u8(1);
            w.u64(*addr);
            w.u64(*size as u64);
        }
        RunError::Shutdown => w.u8(2),
        RunError::Channel(c) => {
            w.u8(3);
            match *c {
                ChannelError::Underflow { wanted, queued } => {
                    w.u8(0);
                    w.u64(wanted as u64);
                    w.u64(queued as u64);
                }
                ChannelError::Oversized { len } => {
                    w.u8(1);
                    w.u32(len);
                }
                ChannelError::UnknownKind(k) => {
                    w.u8(2);
                    w.u8(k);
                }
                ChannelError::InputTooLarge { len } => {
                    w.u8(3);
                    w.u64(len as u64);
                }
            }
        }
        RunError::Internal => w.u8(4),
        RunError::UnexpectedExit(m) => {
            w.u8(5);
            w.text(m);
        }
        RunError::Timer(io) => {
            w.u8(6);
            w.u32(io.raw_os_error().unwrap_or(libc::EIO) as u32);
        }
        RunError::Stopped => w.u8(7),
        RunError::Kvm(k) => {
            w.u8(8);
            w.u32(k.errno() as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: Message) -> Message {
        let wire = message.encode();
        let back = decode_frame(&wire).unwrap_or_else(|e| panic!("{message:?}: {e}"));
        // Encoding is canonical: the decoded message encodes to the same bytes.
        assert_eq!(back.encode(), wire, "{message:?}");
        back
    }

    fn flags() -> RequestFlags {
        RequestFlags {
            quirks: Quirks {
                available_tss_on_restore: true,
            },
            report_jailed: true,
        }
    }

    #[test]
    fn every_message_round_trips() {
        let restore = RestoreRequest {
            flags: flags(),
            timeout: Duration::from_millis(1500),
            log_cap: 4096,
            seed: [7; SEED_LEN],
            dir: "/data/microvm/abc".into(),
            input: b"hello".to_vec(),
        };
        assert!(matches!(round_trip(Message::Restore(restore.clone())), Message::Restore(r) if r == restore));
        let boot = BootFlat64Request {
            flags: RequestFlags::default(),
            config: VmConfig::new(4),
            timeout: Duration::from_secs(10),
            dir: "/tmp/x".into(),
            image: vec![0x90; 100],
        };
        assert!(matches!(round_trip(Message::BootFlat64(boot.clone())), Message::BootFlat64(b) if b == boot));
        let linux = BootLinuxRequest {
            flags: RequestFlags::default(),
            config: VmConfig {
                memory_mib: 128,
                max_memory_mib: 1024,
            },
            timeout: Duration::from_secs(180),
            dir: "/s".into(),
            cmdline: "quiet panic=-1 ünïcode".into(),
            vmlinux: vec![1, 2, 3],
            initramfs: vec![],
        };
        assert!(matches!(round_trip(Message::BootLinux(linux.clone())), Message::BootLinux(b) if b == linux));
        for attempt in [
            None,
            Some(ForbiddenSyscall::Socket),
            Some(ForbiddenSyscall::OpenEtcPasswd),
        ] {
            let probe = ProbeRequest {
                flags: flags(),
                dir: "/p".into(),
                attempt,
            };
            assert!(matches!(round_trip(Message::Probe(probe.clone())), Message::Probe(p) if p == probe));
        }
        assert!(matches!(
            round_trip(Message::Hello { worker_pid: 4242 }),
            Message::Hello { worker_pid: 4242 }
        ));
        let session = SessionRequest {
            flags: flags(),
            seed: [9; SEED_LEN],
            clock: Duration::from_nanos(1_764_800_000_123_456_789),
            dir: "/data/sandboxes/vm/sbx_1/run".into(),
            env: b"ROLE=primary\0".to_vec(),
        };
        assert!(matches!(round_trip(Message::Session(session.clone())), Message::Session(s) if s == session));
        let frame = Frame::new(FrameKind::Data, b"\x01\0\0\0GET / HTTP/1.1".to_vec());
        assert!(matches!(round_trip(Message::ToGuest(frame.clone())), Message::ToGuest(f) if f == frame));
        assert!(matches!(round_trip(Message::FromGuest(frame.clone())), Message::FromGuest(f) if f == frame));
        assert!(matches!(round_trip(Message::Suspend), Message::Suspend));
        assert!(matches!(round_trip(Message::Started), Message::Started));
        let report = SuspendReport {
            memory_size: 256 << 20,
            snapshot: Duration::from_millis(850),
        };
        assert!(matches!(round_trip(Message::Suspended(report)), Message::Suspended(r) if r == report));
        // A channel frame of a kind the channel does not know is refused, not relayed.
        let mut wire = Message::ToGuest(Frame::new(FrameKind::Open, vec![])).encode();
        wire[HEADER_LEN] = 99;
        assert_eq!(
            decode_frame(&wire).err(),
            Some(DecodeError::Invalid("channel frame kind"))
        );
        assert!(matches!(round_trip(Message::Jailed), Message::Jailed));
        assert!(matches!(round_trip(Message::Probed), Message::Probed));
        let reply = Reply {
            exit_code: -3,
            stdout: b"out".to_vec(),
            log: b"err".to_vec(),
            log_truncated: true,
        };
        assert!(matches!(round_trip(Message::Replied(reply.clone())), Message::Replied(r) if r == reply));
        let report = BootReport {
            memory_size: 8 << 20,
            boot: Duration::from_micros(1234),
            snapshot: Duration::from_micros(99),
        };
        assert!(matches!(round_trip(Message::Booted(report)), Message::Booted(r) if r == report));
        for exit in [HelperExit::Code(0), HelperExit::Code(-1), HelperExit::Signal(31)] {
            assert!(matches!(round_trip(Message::Exited(exit)), Message::Exited(e) if e == exit));
        }
    }

    #[test]
    fn failures_keep_their_structure() {
        let failures = [
            Failure::Setup("unshare: EPERM".into()),
            Failure::Config(ConfigError::MemorySize {
                requested: 1,
                min: 2,
                max: 4096,
            }),
            Failure::Config(ConfigError::ImageTooLarge { len: 5, memory_mib: 2 }),
            Failure::Layout(LayoutError::CmdlineTooLong { len: 3000 }),
            Failure::Layout(LayoutError::CmdlineNul),
            Failure::Layout(LayoutError::TooSmall {
                kernel_end: 1,
                initramfs: 2,
                memory: 3,
            }),
            Failure::Run(RunError::Timeout(Duration::from_millis(100))),
            Failure::Run(RunError::MemoryExceeded {
                addr: 0x401234,
                size: 4 << 20,
            }),
            Failure::Run(RunError::Shutdown),
            Failure::Run(RunError::Channel(ChannelError::Underflow { wanted: 4, queued: 2 })),
            Failure::Run(RunError::Channel(ChannelError::Oversized { len: u32::MAX })),
            Failure::Run(RunError::Channel(ChannelError::UnknownKind(99))),
            Failure::Run(RunError::Channel(ChannelError::InputTooLarge { len: 1 << 30 })),
            Failure::Run(RunError::Internal),
            Failure::Run(RunError::UnexpectedExit("Hlt".into())),
            Failure::Run(RunError::Timer(std::io::Error::from_raw_os_error(libc::EAGAIN))),
            Failure::Run(RunError::Stopped),
            Failure::Run(RunError::Kvm(kvm_ioctls::Error::new(libc::EFAULT))),
            Failure::Guest("short response".into()),
            Failure::Vm("KVM_CREATE_VM: EMFILE".into()),
            Failure::LinuxBoot {
                message: "timeout; the guest's console said:\nPanic".into(),
                run: Some(RunError::Timeout(Duration::from_secs(3))),
            },
            Failure::LinuxBoot {
                message: "not ELF".into(),
                run: None,
            },
        ];
        for failure in failures {
            let text = format!("{failure:?}");
            match round_trip(Message::Failed(failure)) {
                Message::Failed(back) => assert_eq!(format!("{back:?}"), text),
                other => panic!("{other:?}"),
            }
        }
        // A RunError::Timeout decodes to the same duration, as the server's shaping needs.
        let wire = Message::Failed(Failure::Run(RunError::Timeout(Duration::from_millis(100)))).encode();
        assert!(matches!(
            decode_frame(&wire),
            Ok(Message::Failed(Failure::Run(RunError::Timeout(t)))) if t == Duration::from_millis(100)
        ));
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_TEXT);
        match round_trip(Message::Failed(Failure::Vm(long))) {
            Message::Failed(Failure::Vm(m)) => assert!(m.len() <= MAX_TEXT && m.chars().all(|c| c == 'é')),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_decoder_refuses_what_encode_never_writes() {
        let good = Message::Hello { worker_pid: 1 }.encode();
        assert_eq!(decode_frame(&good[..3]).unwrap_err(), DecodeError::Truncated("header"));
        assert_eq!(decode_frame(&good[..8]).unwrap_err(), DecodeError::Truncated("payload"));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode_frame(&trailing).unwrap_err(), DecodeError::TrailingBytes(1));
        let mut version = good.clone();
        version[4] = 2;
        assert_eq!(decode_frame(&version).unwrap_err(), DecodeError::Version(2));
        let mut unknown = good.clone();
        unknown[5] = 99;
        assert_eq!(decode_frame(&unknown).unwrap_err(), DecodeError::UnknownKind(99));
        // A length over the kind's bound is refused from the header alone, before any payload.
        let header = [5, 0, 0, 0, VERSION, kind::HELLO];
        assert_eq!(
            decode_header(&header).unwrap_err(),
            DecodeError::TooLong {
                kind: kind::HELLO,
                len: 5,
                max: 4
            }
        );
        let header = [0xff, 0xff, 0xff, 0xff, VERSION, kind::REPLIED];
        assert!(matches!(decode_header(&header), Err(DecodeError::TooLong { .. })));
        // A field whose own length runs past the payload.
        let reply = Message::Replied(Reply {
            exit_code: 0,
            stdout: vec![1; 10],
            log: vec![],
            log_truncated: false,
        })
        .encode();
        let mut lying = reply.clone();
        lying[HEADER_LEN + 5] = 200; // stdout length 200 in a 10-byte field
        assert_eq!(decode_frame(&lying).unwrap_err(), DecodeError::Truncated("stdout"));
        let mut bad_bool = reply;
        bad_bool[HEADER_LEN + 4] = 2;
        assert_eq!(decode_frame(&bad_bool).unwrap_err(), DecodeError::Invalid("boolean"));
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let probe = |dir: &str| {
            Message::Probe(ProbeRequest {
                flags: RequestFlags::default(),
                dir: dir.into(),
                attempt: None,
            })
            .encode()
        };
        assert!(decode_frame(&probe("/ok")).is_ok());
        assert!(matches!(decode_frame(&probe("relative")), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode_frame(&probe("/a\0b")), Err(DecodeError::Invalid(_))));
        let mut flags = probe("/ok");
        flags[HEADER_LEN] = 0x80;
        assert_eq!(decode_frame(&flags).unwrap_err(), DecodeError::Invalid("request flags"));
        let mut attempt = probe("/ok");
        *attempt.last_mut().unwrap() = 3;
        assert_eq!(
            decode_frame(&attempt).unwrap_err(),
            DecodeError::Invalid("probe attempt")
        );
        // A log cap over the limit.
        let mut restore = Message::Restore(RestoreRequest {
            flags: RequestFlags::default(),
            timeout: Duration::from_secs(1),
            log_cap: 0,
            seed: [0; SEED_LEN],
            dir: "/d".into(),
            input: vec![],
        })
        .encode();
        restore[HEADER_LEN + 9..HEADER_LEN + 13].copy_from_slice(&(MAX_LOG_CAP + 1).to_le_bytes());
        assert!(matches!(
            decode_frame(&restore),
            Err(DecodeError::FieldTooLong { what: "log cap", .. })
        ));
        // Text that is not UTF-8.
        let mut failed = Message::Failed(Failure::Guest("ab".into())).encode();
        let at = failed.len() - 1;
        failed[at] = 0xff;
        assert_eq!(decode_frame(&failed).unwrap_err(), DecodeError::Invalid("UTF-8 text"));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder() {
        // A cheap stand-in for the fuzzer: every prefix and single-byte corruption of valid frames.
        let frames = [
            Message::Restore(RestoreRequest {
                flags: flags(),
                timeout: Duration::from_secs(1),
                log_cap: 10,
                seed: [1; SEED_LEN],
                dir: "/d".into(),
                input: b"in".to_vec(),
            })
            .encode(),
            Message::Failed(Failure::Run(RunError::Channel(ChannelError::Underflow {
                wanted: 1,
                queued: 0,
            })))
            .encode(),
            Message::Exited(HelperExit::Signal(9)).encode(),
        ];
        for frame in frames {
            for end in 0..=frame.len() {
                let _ = decode_frame(&frame[..end]);
            }
            for at in 0..frame.len() {
                for value in [0u8, 1, 0x7f, 0xff] {
                    let mut corrupt = frame.clone();
                    corrupt[at] = value;
                    let _ = decode_frame(&corrupt);
                }
            }
        }
    }
}
