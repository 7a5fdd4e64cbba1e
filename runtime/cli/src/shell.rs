//! `kiln sandbox shell ID`: this terminal attached to a login shell in a microVM sandbox, over
//! the `GET /v1/sandboxes/{id}/shell` websocket. The terminal is put in raw mode (restored on
//! the way out); keystrokes go as binary frames, the guest's output comes back the same way, and
//! a change of the terminal's size (looked at every 200 ms, which needs no signal handler) is sent
//! as a `resize` text frame. The exit code is the close frame's reason.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Connector, Message};

use crate::client::{CliError, Client};

pub fn run(client: &Client, id: &str) -> Result<u8, CliError> {
    let (base, token) = client.base_and_token();
    let url = reqwest::Url::parse(base).map_err(|e| CliError::Usage(e.to_string()))?;
    let (scheme, connector) = match url.scheme() {
        "http" => ("ws", None),
        "https" => ("wss", Some(Connector::Rustls(client.tls_config()?))),
        other => return Err(CliError::Usage(format!("--url: {other}:// is neither http nor https"))),
    };
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let (cols, rows) = terminal_size().unwrap_or((80, 24));
    let path = url.path().trim_end_matches('/');
    let mut request = format!("{scheme}://{host}:{port}{path}/v1/sandboxes/{id}/shell?cols={cols}&rows={rows}")
        .into_client_request()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| CliError::Usage("the token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let stream = TcpStream::connect((host.as_str(), port)).map_err(|e| CliError::Connect {
        url: base.to_owned(),
        reason: e.to_string(),
    })?;
    let (mut socket, _) =
        tungstenite::client_tls_with_config(request, stream, None, connector).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response)) => {
                let body = response.body().as_deref().unwrap_or_default();
                crate::client::server_error_from(response.status().as_u16(), body)
            }
            other => CliError::Protocol(other.to_string()),
        })?;
    let tcp = match socket.get_mut() {
        MaybeTlsStream::Plain(stream) => &*stream,
        MaybeTlsStream::Rustls(stream) => stream.get_ref(),
        _ => unreachable!("only plain and rustls streams are made here"),
    };
    tcp.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| CliError::Protocol(e.to_string()))?;

    let _raw = RawMode::enter();
    let (keys, typed) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || keys.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut size = (cols, rows);
    let mut looked = Instant::now();
    let mut stdout = std::io::stdout();
    loop {
        match socket.read() {
            Ok(Message::Binary(bytes)) => {
                let _ = stdout.write_all(&bytes);
                let _ = stdout.flush();
            }
            Ok(Message::Close(frame)) => {
                let code = frame.and_then(|f| f.reason.parse::<u8>().ok()).unwrap_or(0);
                return Ok(code);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => return Ok(0),
            Err(e) => return Err(CliError::Protocol(e.to_string())),
        }
        while let Ok(bytes) = typed.try_recv() {
            socket
                .send(Message::Binary(bytes.into()))
                .map_err(|e| CliError::Protocol(e.to_string()))?;
        }
        if looked.elapsed() > Duration::from_millis(200) {
            looked = Instant::now();
            if let Some(now) = terminal_size().filter(|now| *now != size) {
                size = now;
                let resize = serde_json::json!({"resize": {"cols": now.0, "rows": now.1}}).to_string();
                socket
                    .send(Message::Text(resize.into()))
                    .map_err(|e| CliError::Protocol(e.to_string()))?;
            }
        }
    }
}

/// The terminal's (columns, rows), if stdout is one.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes a winsize into valid memory.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some((size.ws_col, size.ws_row))
}

/// The terminal in raw mode while this lives (if stdin is a terminal).
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enter() -> RawMode {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return RawMode(None);
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw and tcsetattr on a valid termios and fd.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(fd, libc::TCSANOW, &raw);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restoring the settings read at the start.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, saved) };
        }
    }
}
