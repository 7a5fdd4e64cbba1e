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
