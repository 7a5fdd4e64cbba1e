//! A test server for microVM sandboxes: HTTP/1.1 on `$PORT` (default 8080), one thread per
//! connection, memory that lives as long as the sandbox. Std only, static for the musl target.
//!
//! - `GET /count` — adds one to a counter kept in memory and answers it;
//! - `GET /random` — 16 bytes of `/dev/urandom` in hex (restored guests differ only if reseeded);
//! - `GET /time` — the guest's wall clock, Unix seconds (a restored guest's is corrected);
//! - `GET /env/NAME` — that environment variable;
//! - `POST /echo` — the request's body;
//! - `GET /events` — three server-sent events, one every 100 ms;
//! - `GET /ws` — a websocket that echoes every message.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static COUNT: AtomicU64 = AtomicU64::new(0);

fn main() {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).expect("bind");
    eprintln!("webapp: listening on {port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = serve(stream);
        });
    }
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("/").to_owned(),
        );
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let reply = |out: &mut TcpStream, status: &str, body: &[u8]| {
            write!(out, "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n", body.len())?;
            out.write_all(body)
        };
        match (method.as_str(), path.as_str()) {
            ("GET", "/count") => {
                let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
                reply(&mut out, "200 OK", n.to_string().as_bytes())?;
            }
            ("GET", "/random") => {
                let mut bytes = [0u8; 16];
                std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                reply(&mut out, "200 OK", hex.as_bytes())?;
            }
            ("GET", "/time") => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                reply(&mut out, "200 OK", format!("{:.3}", now.as_secs_f64()).as_bytes())?;
            }
            ("GET", p) if p.starts_with("/env/") => {
                let value = std::env::var(&p[5..]).unwrap_or_default();
                reply(&mut out, "200 OK", value.as_bytes())?;
            }
            ("POST", "/echo") => reply(&mut out, "200 OK", &body)?,
            ("GET", "/events") => {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                )?;
                for n in 1..=3 {
                    write!(out, "data: {n}\n\n")?;
                    out.flush()?;
                    std::thread::sleep(Duration::from_millis(100));
                }
                return Ok(());
            }
            ("GET", "/ws") => {
                let key = header("sec-websocket-key").unwrap_or_default();
                let accept = base64(&sha1(format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes()));
                write!(
                    out,
                    "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                     sec-websocket-accept: {accept}\r\n\r\n"
                )?;
                return echo_websocket(reader, out);
            }
            _ => reply(&mut out, "404 Not Found", b"no such path")?,
        }
    }
}

/// Echoes each message (text or binary) until the client closes.
fn echo_websocket(mut reader: BufReader<TcpStream>, mut out: TcpStream) -> std::io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        reader.read_exact(&mut head)?;
        let opcode = head[0] & 0x0f;
        let mut len = (head[1] & 0x7f) as u64;
        if len == 126 {
            let mut ext = [0u8; 2];
            reader.read_exact(&mut ext)?;
            len = u16::from_be_bytes(ext) as u64;
        } else if len == 127 {
            let mut ext = [0u8; 8];
            reader.read_exact(&mut ext)?;
            len = u64::from_be_bytes(ext);
        }
        let mut mask = [0u8; 4];
        if head[1] & 0x80 != 0 {
            reader.read_exact(&mut mask)?;
        }
        let mut payload = vec![0u8; len as usize];
        reader.read_exact(&mut payload)?;
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(n as u8),
            n if n < 65536 => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&payload);
        out.write_all(&frame)?;
        if opcode == 8 {
            return Ok(());
        }
    }
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476, 0xc3d2_e1f0];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(block[i * 4..i * 4 + 4].try_into().unwrap());
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5a82_7999),
                20..=39 => (b ^ c ^ d, 0x6ed9_eba1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*word);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, word) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_websocket_accept_key_is_rfc_6455s_example() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
        assert_eq!(
            super::base64(&super::sha1(key.as_bytes())),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
