//! Hostile connections against the real server: sockets that never speak, slowloris, HTTP/2
//! prefaces with nothing after them, idle HTTP/2 connections, rapid-reset floods, and crowds from
//! the real client's own address. What must hold: the real client is answered within the header
//! deadline + 1 s, the hostile sockets are closed by then, and the server's fds come back.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{wat, Kiln};

const SEC: Duration = Duration::from_secs(1);

/// One `GET /healthz` on a fresh connection; the status, or why there was none within `timeout`.
fn healthz(addr: &str, timeout: Duration) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no answer within {timeout:?}"));
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("no answer within {timeout:?}"))
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))
}

/// Whether the server closed `stream` (EOF or reset) before `deadline`; whatever it sent first
/// (an error answer, a GOAWAY) is skipped.
fn closed_by(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// The defect of issue 16: with 50 connection slots, 60 sockets that send nothing or only the
/// first bytes of an HTTP/2 preface took every slot for good, and no real client was answered.
#[test]
fn silent_sockets_and_partial_prefaces_do_not_starve_real_clients() {
    let kiln = Kiln::start_with(&["--max-connections", "50", "--header-read-timeout-ms", "2000"]);
    let mut hostile: Vec<TcpStream> = (0..60)
        .map(|i| {
            let mut s = TcpStream::connect(&kiln.addr).unwrap();
            if i % 2 == 1 {
                s.write_all(b"PRI * HT").unwrap();
            }
            s
        })
        .collect();
    let started = Instant::now();
    let budget = Duration::from_millis(2000) + SEC;
    let answer = healthz(&kiln.addr, budget);
    let took = started.elapsed();
    assert_eq!(answer, Ok(200), "the real client, after {took:?}");
    assert!(took <= budget, "the real client waited {took:?}");
    let open = hostile
        .iter_mut()
        .map(|s| closed_by(s, started + budget))
        .filter(|closed| !closed)
        .count();
    assert_eq!(open, 0, "{open} of 60 silent sockets still open after {budget:?}");
}

/// The "done when" of issue 16: 50 slots, 200 silent sockets and 200 slowloris sockets (a header
/// byte every 300 ms) from the real client's own address. The client is answered within the header
/// deadline + 1 s, every hostile socket is closed by then, and the server's fds come back.
#[test]
fn crowds_of_idle_and_slowloris_sockets_from_the_clients_address_cannot_starve_it() {
    let header = Duration::from_millis(1000);
    let kiln = Kiln::start_with(&["--max-connections", "50", "--header-read-timeout-ms", "1000"]);
    assert_eq!(healthz(&kiln.addr, 5 * SEC), Ok(200));
    // The answer was read to EOF, so the server has closed that connection's fd.
    let baseline = fds(kiln.pid());

    let mut idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(&kiln.addr).unwrap()).collect();
    let slowloris: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(&kiln.addr).unwrap();
            let _ = s.write_all(b"POST /v1/functions/hello/invoke HTTP/1.1\r\nHost: kiln\r\nX-Slow: ");
            s
        })
        .collect();
    let drip = Drip::start(slowloris.iter().map(|s| s.try_clone().unwrap()).collect());

    let started = Instant::now();
    let budget = header + SEC;
    let answer = healthz(&kiln.addr, budget);
    let took = started.elapsed();
    assert_eq!(answer, Ok(200), "the real client, after {took:?}");
    assert!(took <= budget, "the real client waited {took:?}");
    let idle_open = idle
        .iter_mut()
        .map(|s| closed_by(s, started + budget))
        .filter(|c| !c)
        .count();
    let mut slowloris = drip.stop();
    let slow_open = slowloris
        .iter_mut()
        .map(|s| closed_by(s, started + budget))
        .filter(|c| !c)
        .count();
    eprintln!("connections: the real client was answered in {took:.3?} among 400 hostile sockets");
    assert_eq!(
        idle_open, 0,
        "{idle_open} of 200 idle sockets still open after {budget:?}"
    );
    assert_eq!(
        slow_open, 0,
        "{slow_open} of 200 slowloris sockets still open after {budget:?}"
    );

    drop((idle, slowloris));
    let settled = wait_until(5 * SEC, || fds(kiln.pid()) <= baseline);
    assert!(
        settled,
        "the server holds {} fds, {baseline} before the crowd",
        fds(kiln.pid())
    );
    assert_eq!(healthz(&kiln.addr, 5 * SEC), Ok(200));
}

/// Writes one more header byte to each socket every 300 ms until stopped.
struct Drip {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<TcpStream>>,
}

impl Drip {
    fn start(mut sockets: Vec<TcpStream>) -> Drip {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for s in &mut sockets {
                    // A socket the server closed fails; the others keep dripping.
                    let _ = s.write_all(b"x");
                }
                std::thread::park_timeout(Duration::from_millis(300));
            }
            sockets
        });
        Drip { stop, thread }
    }

    fn stop(self) -> Vec<TcpStream> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.thread().unpark();
        self.thread.join().unwrap()
    }
}

fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc fd").count()
}

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Just enough HTTP/2 framing to be a hostile h2c client (RFC 9113 §4, HPACK static table only).
mod h2 {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const GOAWAY: u8 = 7;
    pub const END_STREAM: u8 = 1;
    pub const ENHANCE_YOUR_CALM: u32 = 11;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// The preface and an empty SETTINGS frame: what a client sends before any request.
    pub fn hello() -> Vec<u8> {
        [PREFACE.to_vec(), frame(4, 0, 0, &[])].concat()
    }

    /// `GET path` on `stream`, with no body.
    pub fn get(stream: u32, path: &str) -> Vec<u8> {
        // :method GET, :scheme http (static indexes 2, 6); :path and :authority as literals
        // with indexed names (4, 1), not added to the dynamic table.
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        block.extend([0x01, 4]);
        block.extend_from_slice(b"kiln");
        frame(HEADERS, END_STREAM | 0x4, stream, &block)
    }

    /// RST_STREAM with CANCEL, what a client sends to abandon a request.
    pub fn cancel(stream: u32) -> Vec<u8> {
        frame(3, 0, stream, &8u32.to_be_bytes())
    }

    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    pub enum Read2 {
        Frame(Frame),
        /// EOF or reset: the server closed the connection.
        Closed,
        TimedOut,
    }

    pub fn read(stream: &mut TcpStream, deadline: Instant) -> Read2 {
        let mut head = [0u8; 9];
        if let Some(end) = read_exact(stream, &mut head, deadline) {
            return end;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if let Some(end) = read_exact(stream, &mut payload, deadline) {
            return end;
        }
        Read2::Frame(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    }

    fn read_exact(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Option<Read2> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Some(Read2::TimedOut);
            }
            stream.set_read_timeout(Some(left)).unwrap();
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return Some(Read2::Closed),
                Ok(n) => filled += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Some(Read2::TimedOut)
                }
                Err(_) => return Some(Read2::Closed),
            }
        }
        None
    }

    /// Reads until the server closes the connection or `deadline`: when it closed (if it did)
    /// and the error code of the last GOAWAY it sent (if any).
    pub fn until_closed(stream: &mut TcpStream, deadline: Instant) -> (Option<Instant>, Option<u32>) {
        let mut goaway = None;
        loop {
            match read(stream, deadline) {
                Read2::Frame(f) if f.kind == GOAWAY && f.payload.len() >= 8 => {
                    goaway = Some(u32::from_be_bytes(f.payload[4..8].try_into().unwrap()));
                }
                Read2::Frame(_) => {}
                Read2::Closed => return (Some(Instant::now()), goaway),
                Read2::TimedOut => return (None, goaway),
            }
        }
    }

    pub fn send(stream: &mut TcpStream, bytes: &[u8]) {
        stream.write_all(bytes).expect("writing h2 frames");
    }
}

/// An h2c connection that sends the preface and SETTINGS but never a request is closed at the
/// header deadline, with a GOAWAY, like a silent HTTP/1 socket.
#[test]
fn an_h2_preface_without_a_request_is_closed_at_the_header_deadline() {
    let header = Duration::from_millis(1000);
    let kiln = Kiln::start_with(&["--header-read-timeout-ms", "1000"]);
    let started = Instant::now();
    let mut s = TcpStream::connect(&kiln.addr).unwrap();
    h2::send(&mut s, &h2::hello());
    let (closed, goaway) = h2::until_closed(&mut s, started + header + 2 * SEC);
    let closed = closed.map(|at| at - started);
    eprintln!("connections: a bare h2 preface was closed after {closed:?}, GOAWAY {goaway:?}");
    let closed = closed.expect("the server never closed a bare h2 connection");
    assert!(
        closed >= header - Duration::from_millis(50),
        "closed early, after {closed:?}"
    );
    assert!(closed <= header + SEC, "closed only after {closed:?}");
    assert!(goaway.is_some(), "no GOAWAY before the close");
}

/// An h2c connection that made a request and then holds no stream open is closed at the idle
/// timeout, however long the header deadline is.
#[test]
fn an_idle_h2_connection_is_closed_at_the_idle_timeout() {
    let idle = Duration::from_millis(1500);
    let kiln = Kiln::start_with(&["--idle-timeout-ms", "1500", "--header-read-timeout-ms", "30000"]);
    let mut s = TcpStream::connect(&kiln.addr).unwrap();
    h2::send(&mut s, &[h2::hello(), h2::get(1, "/healthz")].concat());
    let answered = loop {
        match h2::read(&mut s, Instant::now() + 5 * SEC) {
            h2::Read2::Frame(f) if f.stream == 1 && f.kind == h2::HEADERS => {
                let status = f.payload.first().copied();
                // HPACK static index 8 is `:status 200`.
                assert_eq!(status, Some(0x88), "the request was not answered 200");
                if f.flags & h2::END_STREAM != 0 {
                    break Instant::now();
                }
            }
            h2::Read2::Frame(f) if f.stream == 1 && f.kind == h2::DATA && f.flags & h2::END_STREAM != 0 => {
                break Instant::now()
            }
            h2::Read2::Frame(_) => {}
            h2::Read2::Closed => panic!("closed before answering"),
            h2::Read2::TimedOut => panic!("no answer"),
        }
    };
    let (closed, goaway) = h2::until_closed(&mut s, answered + idle + 3 * SEC);
    let closed = closed.map(|at| at - answered);
    eprintln!("connections: an idle h2 connection was closed {closed:?} after its last response, GOAWAY {goaway:?}");
    let closed = closed.expect("the server never closed an idle h2 connection");
    assert!(
        closed >= idle - Duration::from_millis(50),
        "closed early, after {closed:?}"
    );
    assert!(closed <= idle + SEC, "closed only after {closed:?}");
    assert!(goaway.is_some(), "no GOAWAY before the close");
}

/// Rapid reset (CVE-2023-44487): a client that opens streams and cancels them at once, as fast as
/// it can write, gets a GOAWAY (ENHANCE_YOUR_CALM) and a closed connection, while another client
/// is answered throughout.
#[test]
fn a_rapid_reset_flood_is_cut_off_while_others_are_served() {
    let kiln = Kiln::start();
    let mut s = TcpStream::connect(&kiln.addr).unwrap();
    h2::send(&mut s, &h2::hello());
    let mut reader = s.try_clone().unwrap();
    let observer = std::thread::spawn(move || h2::until_closed(&mut reader, Instant::now() + 30 * SEC));
    let flood = std::thread::spawn(move || {
        let mut streams = 0u32;
        // Up to 100,000 streams, 500 HEADERS + RST_STREAM pairs per write, until the server closes.
        for batch in 0..200u32 {
            let bytes: Vec<u8> = (0..500u32)
                .flat_map(|i| {
                    let id = 2 * (batch * 500 + i) + 1;
                    [h2::get(id, "/healthz"), h2::cancel(id)].concat()
                })
                .collect();
            if s.write_all(&bytes).is_err() {
                break;
            }
            streams += 500;
        }
        streams
    });
    let mut served = 0;
    while !flood.is_finished() || served == 0 {
        assert_eq!(healthz(&kiln.addr, 5 * SEC), Ok(200), "another client during the flood");
        served += 1;
    }
    let written = flood.join().unwrap();
    let (closed, goaway) = observer.join().unwrap();
    eprintln!(
        "connections: rapid reset: {written} streams written before the server closed; GOAWAY {goaway:?}; {served} other requests served meanwhile"
    );
    assert!(closed.is_some(), "the flooding connection was never closed");
    assert_eq!(goaway, Some(h2::ENHANCE_YOUR_CALM), "the GOAWAY's error code");
    assert!(written < 100_000, "the whole flood got through");
    assert_eq!(healthz(&kiln.addr, 5 * SEC), Ok(200));
}

/// A TCP connection to `addr` from the loopback address `source` (all of 127/8 is this host), as
/// a client behind another address would make.
fn connect_from(source: Ipv4Addr, addr: &str) -> TcpStream {
    use std::os::fd::{AsRawFd, FromRawFd};
    let target: SocketAddrV4 = addr.parse().expect("an IPv4 address");
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, owned by the TcpStream from here on (closed on any panic below).
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    };
    let (local, remote) = (sockaddr(source, 0), sockaddr(*target.ip(), target.port()));
    // SAFETY: the addresses are valid sockaddr_in values of the length given, alive for the calls.
    unsafe {
        let fd = stream.as_raw_fd();
        let bound = libc::bind(fd, &local as *const libc::sockaddr_in as *const libc::sockaddr, len);
        assert_eq!(bound, 0, "bind {source}: {}", std::io::Error::last_os_error());
        let connected = libc::connect(fd, &remote as *const libc::sockaddr_in as *const libc::sockaddr, len);
        assert_eq!(
            connected,
            0,
            "connect from {source}: {}",
            std::io::Error::last_os_error()
        );
    }
    stream
}

/// Reads until `needle` has arrived; the whole text read so far.
fn read_until(stream: &mut TcpStream, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&text).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {needle:?} within {timeout:?}: {:?}",
            String::from_utf8_lossy(&text)
        );
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => panic!("closed before {needle:?}: {:?}", String::from_utf8_lossy(&text)),
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading: {e}"),
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// `--max-connections-per-ip 3`: an address at its cap loses its oldest idle connection to its
/// newcomer; when all of its connections are serving requests, the newcomer is refused and those
/// requests finish; other addresses get in meanwhile.
#[test]
fn an_address_at_its_cap_gives_up_idle_slots_but_never_busy_ones() {
    let kiln = Kiln::start_with(&["--max-connections", "50", "--max-connections-per-ip", "3"]);
    kiln.must_deploy("hello", wat("hello"));
    let (first, second, third) = (
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
        Ipv4Addr::new(127, 0, 0, 4),
    );

    // Idle: three silent sockets, then a fourth from the same address, which takes the oldest's slot.
    let mut idle: Vec<TcpStream> = (0..3).map(|_| connect_from(first, &kiln.addr)).collect();
    let mut newcomer = connect_from(first, &kiln.addr);
    assert!(
        closed_by(&mut idle[0], Instant::now() + 2 * SEC),
        "the oldest idle socket kept its slot"
    );
    for s in &mut idle[1..] {
        assert!(
            !closed_by(s, Instant::now() + Duration::from_millis(200)),
            "a newer idle socket was closed"
        );
    }
    newcomer
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert!(read_until(&mut newcomer, "\r\n\r\n", 5 * SEC).starts_with("HTTP/1.1 200"));
    drop((idle, newcomer));

    // Busy: three requests in progress (the server asked for their bodies: 100 Continue).
    let head = format!(
        "POST /v1/functions/hello/invoke HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 2\r\nExpect: 100-continue\r\n\r\n",
        kiln.token
    );
    let mut busy: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = connect_from(second, &kiln.addr);
            s.write_all(head.as_bytes()).unwrap();
            read_until(&mut s, "100 Continue\r\n\r\n", 5 * SEC);
            s
        })
        .collect();
    let mut refused = connect_from(second, &kiln.addr);
    assert!(
        closed_by(&mut refused, Instant::now() + 2 * SEC),
        "a fourth connection got in"
    );
    // Other addresses are served meanwhile.
    let mut other = connect_from(third, &kiln.addr);
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert!(read_until(&mut other, "\r\n\r\n", 5 * SEC).starts_with("HTTP/1.1 200"));
    assert_eq!(healthz(&kiln.addr, 5 * SEC), Ok(200));
    // And the busy ones were never cut: their requests complete.
    for s in &mut busy {
        s.write_all(b"hi").unwrap();
        let answer = read_until(s, "Hello from Kiln!", 10 * SEC);
        assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    }
}

/// Starts `kiln serve` with the open-file limit set to `soft`/`hard`; its log up to the line that
/// says it listens (then it is stopped), or to its exit.
fn serve_with_open_files(soft: u64, hard: u64, args: &[&str]) -> (bool, String) {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--max-instances", "64", "--data"])
        .arg(dir.path())
        .args(args)
        .env_remove("KILN_ADMIN_TOKEN")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("starting kiln");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log.push_str(&line);
            log.push('\n');
            if line.contains("kiln listening on") {
                let _ = tx.send((true, log.clone()));
            }
        }
        let _ = tx.send((false, log));
    });
    let outcome = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("kiln neither listened nor exited");
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// At start-up `--max-connections` is fitted to RLIMIT_NOFILE: the soft limit is raised toward the
/// hard one; past the hard one the cap is lowered, with a warning; with no room at all the server
/// refuses to start. (The server reserves 256 + 64 instances + 8 × 32 microVMs = 576 files.)
#[test]
fn max_connections_is_fitted_to_the_open_file_limit() {
    let (listening, log) = serve_with_open_files(1000, 10_000, &["--max-connections", "5000"]);
    assert!(listening, "{log}");
    assert!(log.contains("raised the open-file limit from 1000 to 5576"), "{log}");

    let (listening, log) = serve_with_open_files(1000, 1000, &["--max-connections", "5000"]);
    assert!(listening, "{log}");
    assert!(
        log.contains("--max-connections 5000 needs 5576 open files but the limit is 1000")
            && log.contains("serving at most 424 connections"),
        "{log}"
    );

    let (listening, log) = serve_with_open_files(500, 500, &[]);
    assert!(!listening, "started with 500 files: {log}");
    assert!(log.contains("leaves no room for connections"), "{log}");
}
