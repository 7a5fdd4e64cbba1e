//! Kiln's guest agent: PID 1 of the microVM's Linux guest (the initramfs's `/init`).
//!
//! It speaks the framed protocol of `kiln-vmm`'s `devices::channel` (u32 little-endian payload
//! length, one kind byte, payload) with the host:
//! 1. mounts `/dev` and `/proc`, opens the channel, sends READY — the host snapshots the VM here;
//! 2. for each REQUEST, runs `/function` with the payload as stdin, and answers RESPONSE
//!    (i32 little-endian exit code, then stdout); a non-empty stderr goes first as a LOG frame;
//! 3. a RESEED frame (sent by the host after each restore) is added to the kernel's entropy pool
//!    and the CRNG reseeded from it at once, so VMs restored from one snapshot do not share random
//!    state (a failure is reported as a LOG frame);
//! 4. a SESSION frame (a sandbox) switches to session mode for good: the function runs as a server
//!    and the host's streams — connections, processes, files — are served (see [`session`]).
//!
//! The function is `/function` (a static executable), or the command an image names in
//! `/kiln/command` (a root filesystem or an OCI image; see [`process::Image`]). An image with a
//! command starts it at boot and runs its ready hook (`/kiln/hooks/ready`) before READY, so the
//! snapshot holds the server already started; a failing ready hook is told on the console and
//! with a LOG frame in place of READY, which fails the build.
//!
//! The channel is chosen on the kernel command line: `kiln.channel=port` uses Kiln's I/O port
//! (0x510, through `ioperm`, on Kiln's own VMM); `kiln.channel=/dev/ttyS1` (or any serial device)
//! uses that device in raw mode (under QEMU, whose machine has no such port).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::process::Stdio;

mod network;
mod process;
mod session;

use process::{Hook, Image};

const READY: u8 = 1;
const REQUEST: u8 = 2;
const RESPONSE: u8 = 3;
const RESEED: u8 = 4;
const LOG: u8 = 5;
const SESSION: u8 = 6;
const OPEN: u8 = 7;
const DATA: u8 = 8;
const CLOSE: u8 = 9;
const WINDOW: u8 = 10;
const EXIT: u8 = 11;
const STDERR: u8 = 12;
const RESIZE: u8 = 13;
const HOOK: u8 = 14;
const PACKET: u8 = 15;
const MAX_PAYLOAD: u32 = 16 << 20;
const PORT: u16 = 0x510;
/// Reads how many bytes the host has queued for us (the channel has no interrupt).
const STATUS_PORT: u16 = 0x511;
/// `out` a length here with the bytes' address in `rsi`: the host copies them in one exit.
const BULK_PORT: u16 = 0x515;

/// The byte stream to the host.
enum Channel {
    Serial(File),
    /// Kiln's I/O ports; `bulk` once in session mode: frames go out through the bulk doorbell,
    /// one exit each, instead of `rep outsb`.
    Port {
        bulk: bool,
        landing: Landing,
    },
}

impl Channel {
    fn open(spec: &str) -> io::Result<Self> {
        if spec == "port" {
            // SAFETY: ioperm only changes this process's I/O permission bitmap.
            // The data port, the status port read 4 bytes wide (an `in eax, dx` needs the
            // permission of all four ports it spans, 0x511..=0x514) and the bulk doorbell
            // written 4 bytes wide (0x515..=0x518).
            if unsafe { libc::ioperm(PORT.into(), 9, 1) } != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(Channel::Port {
                bulk: false,
                landing: Landing::new(),
            });
        }
        let file = File::options().read(true).write(true).open(spec)?;
        // SAFETY: `termios` is plain data; tcgetattr fills it for a valid fd.
        let mut tio: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is open for the duration of the calls; `tio` is valid.
        unsafe {
            if libc::tcgetattr(file.as_raw_fd(), &mut tio) == 0 {
                libc::cfmakeraw(&mut tio);
                libc::tcsetattr(file.as_raw_fd(), libc::TCSANOW, &tio);
            }
        }
        Ok(Channel::Serial(file))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Channel::Serial(f) => f.read_exact(buf),
            Channel::Port { landing, .. } => {
                // Through a landing buffer whose pages cannot move or fault (see `Landing`).
                for chunk in buf.chunks_mut(LANDING_BYTES) {
                    let bytes = &mut landing.bytes()[..chunk.len()];
                    prefault(bytes);
                    port_read(bytes);
                    chunk.copy_from_slice(bytes);
                }
                Ok(())
            }
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Channel::Serial(f) => f.write_all(buf).and_then(|()| f.flush()),
            Channel::Port { bulk: false, .. } => {
                port_write(buf);
                Ok(())
            }
            Channel::Port { bulk: true, .. } => {
                // The host reads the bytes through our page tables: every page must be mapped.
                // A frame's buffer was just written whole; touching each page makes sure.
                touch(buf);
                bulk_write(buf);
                Ok(())
            }
        }
    }

    /// From now on frames go out through the bulk doorbell (the host's session loop serves it).
    fn use_bulk(&mut self) {
        if let Channel::Port { bulk, .. } = self {
            *bulk = true;
        }
    }

    /// Bytes the host has queued for us; always 0 on a serial channel, which cannot say (sessions
    /// need the port).
    fn status(&mut self) -> u32 {
        match self {
            Channel::Serial(_) => 0,
            Channel::Port { .. } => port_status(),
        }
    }

    /// Reads bytes `status` said are queued.
    fn read_queued(&mut self, buf: &mut [u8]) {
        let _ = self.read_exact(buf);
    }

    fn send(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(5 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.push(kind);
        frame.extend_from_slice(payload);
        self.write_all(&frame)
    }

    fn receive(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        self.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            return Err(io::Error::other(format!("frame of {len} bytes from the host")));
        }
        let mut payload = vec![0u8; len as usize];
        self.read_exact(&mut payload)?;
        Ok((header[4], payload))
    }
}

/// Bytes `rep insb` lands in at once.
const LANDING_BYTES: usize = 256 << 10;

/// Where `rep insb` writes: pages of their own mapping, locked in memory and never part of a huge
/// page. KVM reads up to 1 KiB from the port ahead of writing it into the guest, and a fault in
/// between loses those bytes for good (the instruction restarts with the next ones); touching the
/// pages first is not enough where the kernel may move them meanwhile — compaction migrating them,
/// or khugepaged collapsing them into a huge page (THP is `always` in Debian's cloud kernel).
/// Locked, unmigratable (`compact_unevictable_allowed = 0`) and `MADV_NOHUGEPAGE`, these stay put.
/// Owned by the channel, so only its `&mut` borrow reaches the bytes; never unmapped (the agent is
/// PID 1 and keeps its channel for life).
struct Landing(*mut u8);

impl Landing {
    fn new() -> Landing {
        let _ = std::fs::write("/proc/sys/vm/compact_unevictable_allowed", "0");
        // SAFETY: a fresh private anonymous mapping, owned by this value for the process's life.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                LANDING_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            );
            assert!(
                at != libc::MAP_FAILED,
                "kiln-agent: cannot map the channel's landing buffer"
            );
            libc::madvise(at, LANDING_BYTES, libc::MADV_NOHUGEPAGE);
            libc::mlock(at, LANDING_BYTES);
            Landing(at.cast())
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is LANDING_BYTES long, private to this value and never unmapped;
        // `&mut self` makes this the only borrow of it.
        unsafe { std::slice::from_raw_parts_mut(self.0, LANDING_BYTES) }
    }
}

/// Writes to every page of `buf`, so that none faults while `rep insb` fills it: KVM reads the
/// port ahead (up to 1 KiB per exit) and a page fault in the middle of the instruction restarts
/// it after the guest handled the fault — with the bytes already taken from the host's queue
/// lost.
fn prefault(buf: &mut [u8]) {
    const PAGE: usize = 4096;
    let base = buf.as_mut_ptr() as usize;
    let mut offset = 0;
    while offset < buf.len() {
        // SAFETY: `offset` is within `buf`; a volatile write of the byte already there.
        unsafe {
            let byte = buf.as_mut_ptr().add(offset);
            byte.write_volatile(byte.read_volatile());
        }
        // The first byte of the next page.
        offset = ((base + offset) / PAGE + 1) * PAGE - base;
    }
}

/// Reads a byte of every page of `buf`, so each is mapped.
fn touch(buf: &[u8]) {
    for page in buf.chunks(4096) {
        // SAFETY: a volatile read of a byte `buf` owns.
        unsafe { std::ptr::read_volatile(page.as_ptr()) };
    }
}

/// Reads `buf.len()` bytes from the channel port with `rep insb`: on hardware KVM the VMM gets up
/// to a page per exit instead of one exit per byte.
#[cfg(target_arch = "x86_64")]
fn port_read(buf: &mut [u8]) {
    // SAFETY: ioperm granted the port; `rep insb` writes exactly `rcx` bytes at `rdi`, which is
    // `buf`; the direction flag is clear on entry to inline assembly (Rust's ABI guarantees it).
    unsafe {
        std::arch::asm!("rep insb", in("dx") PORT, inout("rdi") buf.as_mut_ptr() => _,
            inout("rcx") buf.len() => _, options(nostack, preserves_flags))
    };
}

/// A 4-byte `in` from the status port.
#[cfg(target_arch = "x86_64")]
fn port_status() -> u32 {
    let value: u32;
    // SAFETY: ioperm granted the port; `in eax, dx` only reads it.
    unsafe { std::arch::asm!("in eax, dx", in("dx") STATUS_PORT, out("eax") value, options(nostack, preserves_flags)) };
    value
}

#[cfg(not(target_arch = "x86_64"))]
fn port_status() -> u32 {
    unreachable!("the port channel exists on x86_64 only")
}

/// Hands `buf` to the host in one exit: its length to the bulk doorbell, its address in `rsi`.
#[cfg(target_arch = "x86_64")]
fn bulk_write(buf: &[u8]) {
    // SAFETY: ioperm granted the port; the `out` only reads eax, and the host only reads the
    // `buf.len()` bytes at `rsi`, which `buf` owns for the duration of the instruction.
    unsafe {
        std::arch::asm!("out dx, eax", in("dx") BULK_PORT, in("eax") buf.len() as u32,
            in("rsi") buf.as_ptr(), options(nostack, readonly, preserves_flags))
    };
}

#[cfg(not(target_arch = "x86_64"))]
fn bulk_write(_: &[u8]) {
    unreachable!("the port channel exists on x86_64 only")
}

/// Writes `buf` to the channel port with `rep outsb`.
#[cfg(target_arch = "x86_64")]
fn port_write(buf: &[u8]) {
    // SAFETY: ioperm granted the port; `rep outsb` reads exactly `rcx` bytes at `rsi`, which is
    // `buf`; the direction flag is clear on entry to inline assembly.
    unsafe {
        std::arch::asm!("rep outsb", in("dx") PORT, inout("rsi") buf.as_ptr() => _,
            inout("rcx") buf.len() => _, options(nostack, readonly, preserves_flags))
    };
}

#[cfg(not(target_arch = "x86_64"))]
fn port_read(_: &mut [u8]) {
    unreachable!("the port channel exists on x86_64 only")
}

#[cfg(not(target_arch = "x86_64"))]
fn port_write(_: &[u8]) {
    unreachable!("the port channel exists on x86_64 only")
}

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (source, target, fstype) = (c(source), c(target), c(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
}

/// Runs the function once with `input` as stdin and the image's environment:
/// (exit code, stdout, stderr).
fn run_function(input: &[u8], image: &Image) -> (i32, Vec<u8>, Vec<u8>) {
    let child = image
        .command(&image.command, None, &image.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            return (
                127,
                Vec::new(),
                format!("kiln-agent: cannot start {}: {e}", image.command[0]).into_bytes(),
            )
        }
    };
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    // Feed stdin from a thread so a function that writes before reading cannot deadlock us.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let output = child.wait_with_output();
    let _ = feeder.join();
    match output {
        Ok(out) => {
            use std::os::unix::process::ExitStatusExt;
            let code = out
                .status
                .code()
                .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0));
            (code, out.stdout, out.stderr)
        }
        Err(e) => (
            127,
            Vec::new(),
            format!("kiln-agent: waiting for the function: {e}").into_bytes(),
        ),
    }
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`) and `RNDRESEEDCRNG` (`_IO('R', 0x07)`).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes the host's bytes into the kernel's entropy pool, credited as entropy, and forces the
/// CRNG to reseed from it at once. A plain write to `/dev/urandom` would only mix them in: the
/// kernel (since 5.18) reseeds its CRNG on its own schedule, so guests restored from one snapshot
/// would keep returning the same random bytes until then.
fn reseed(seed: &[u8]) -> io::Result<()> {
    let random = File::options().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: `info` is a complete rand_pool_info whose buf_size matches the bytes that follow;
    // the fd is open for the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn serve(channel: &mut Channel) -> io::Result<()> {
    let image = Image::load();
    // Before the server starts, so that it starts with its network (and the snapshot holds it).
    // Its failure is told on the console now and to the host with the first session.
    let mut network = network::up().map_err(|e| {
        let message = format!("kiln-agent: no network: {e}\n");
        eprint!("{message}");
        message
    });
    // The only module the guest loads is loaded: from here on nothing can load one (one way).
    if let Err(e) = std::fs::write("/proc/sys/kernel/modules_disabled", "1") {
        eprintln!("kiln-agent: cannot disable module loading: {e}");
    }
    let server = if image.has_command {
        Some(start_at_boot(channel, &image)?)
    } else {
        None
    };
    channel.send(READY, &[])?;
    let mut server = server;
    loop {
        let (kind, payload) = channel.receive()?;
        match kind {
            REQUEST => {
                let (code, stdout, stderr) = run_function(&payload, &image);
                if !stderr.is_empty() {
                    channel.send(LOG, &stderr)?;
                }
                let mut response = code.to_le_bytes().to_vec();
                response.extend_from_slice(&stdout);
                channel.send(RESPONSE, &response)?;
            }
            SESSION => {
                let tun = std::mem::replace(&mut network, Err(String::new()));
                session::run(channel, &payload, &image, server.take(), tun)
            }
            RESEED => {
                if let Err(e) = reseed(&payload) {
                    channel.send(
                        LOG,
                        format!("kiln-agent: cannot reseed the kernel's RNG: {e}\n").as_bytes(),
                    )?;
                }
            }
            other => eprintln!("kiln-agent: ignoring a frame of kind {other}"),
        }
    }
}

/// An image's server, started before the snapshot, and its ready hook run: a hook that fails
/// (or a command that cannot start) is told on the console and in a LOG frame in place of READY.
fn start_at_boot(channel: &mut Channel, image: &Image) -> io::Result<session::Server> {
    let fail = |channel: &mut Channel, message: String| -> io::Result<session::Server> {
        eprintln!("{message}");
        channel.send(LOG, message.as_bytes())?;
        Err(io::Error::other(message))
    };
    let server = match session::start_server(image) {
        Ok(server) => server,
        Err(e) => return fail(channel, format!("kiln-agent: cannot start {}: {e}", image.command[0])),
    };
    if !std::path::Path::new(process::READY_HOOK).exists() {
        // No ready hook: ready is the server listening (the snapshot then holds a server that is
        // up), or its end, or a few seconds — a command that serves nothing is not waited for long.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !listening() && !server.has_exited() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let (status, output) = process::run_hook(image, Hook::Ready);
    if status != 0 {
        let output = String::from_utf8_lossy(&output);
        return fail(
            channel,
            format!("kiln-agent: the ready hook failed (status {status}):\n{output}"),
        );
    }
    Ok(server)
}

/// Whether any TCP socket in the guest is listening (state 0A in `/proc/net/tcp` or `tcp6`).
fn listening() -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| line.split_whitespace().nth(3) == Some("0A"))
    })
}

/// Brings up the loopback interface: a sandbox's streams reach its server through it.
fn loopback_up() {
    // SAFETY: a plain datagram socket, closed below; `ifreq` is 16 bytes of name, then the flags.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if socket < 0 {
            return;
        }
        let mut ifreq = [0u8; 40];
        ifreq[..2].copy_from_slice(b"lo");
        let flags = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        if libc::ioctl(socket, libc::SIOCSIFFLAGS as _, ifreq.as_mut_ptr()) != 0 {
            eprintln!("kiln-agent: cannot bring up lo: {}", io::Error::last_os_error());
        }
        libc::close(socket);
    }
}

fn main() {
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("proc", "/proc", "proc");
    // Ptys for shells: openpty uses /dev/ptmx and devpts.
    mount("devpts", "/dev/pts", "devpts");
    loopback_up();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let spec = cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("kiln.channel="))
        .unwrap_or("port")
        .to_owned();
    let result = Channel::open(&spec).and_then(|mut channel| serve(&mut channel));
    if let Err(e) = result {
        eprintln!("kiln-agent: channel {spec}: {e}");
    }
    // PID 1 must not exit while the VM is wanted; powering off ends the VM cleanly instead.
    // SAFETY: reboot with POWER_OFF has no memory-safety preconditions.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
}
