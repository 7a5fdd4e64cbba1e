//! Hostile connections against the real server: sockets that never speak, slowloris, HTTP/2
//! prefaces with nothing after them, idle HTTP/2 connections, rapid-reset floods, and crowds from
//! the real client's own address. What must hold: the real client is answered within the header
//! deadline + 1 s, the hostile sockets are closed by then, and the server's fds come back.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::Kiln;

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
    let open = hostile.iter_mut().map(|s| closed_by(s, started + budget)).filter(|closed| !closed).count();
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
    let idle_open = idle.iter_mut().map(|s| closed_by(s, started + budget)).filter(|c| !c).count();
    let mut slowloris = drip.stop();
    let slow_open = slowloris.iter_mut().map(|s| closed_by(s, started + budget)).filter(|c| !c).count();
    eprintln!("connections: the real client was answered in {took:.3?} among 400 hostile sockets");
    assert_eq!(idle_open, 0, "{idle_open} of 200 idle sockets still open after {budget:?}");
    assert_eq!(slow_open, 0, "{slow_open} of 200 slowloris sockets still open after {budget:?}");

    drop((idle, slowloris));
    let settled = wait_until(5 * SEC, || fds(kiln.pid()) <= baseline);
    assert!(settled, "the server holds {} fds, {baseline} before the crowd", fds(kiln.pid()));
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
    assert!(closed >= header - Duration::from_millis(50), "closed early, after {closed:?}");
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
    assert!(closed >= idle - Duration::from_millis(50), "closed early, after {closed:?}");
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
