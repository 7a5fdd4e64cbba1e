//! Inside a microVM sandbox (`../shared/API.md`, "Inside a microVM sandbox"): exec, a shell on a
//! pty over a websocket, and files. Each is a stream over the VM's channel
//! (`kiln_core::tier::microvm::sandbox`); a suspended sandbox is resumed first, as ingress does.
//!
//! Who may: the admin token, a token scoped to the sandbox's function, or a sandbox token with
//! the `exec`, `shell` or `files` scope (as `X-Kiln-Sandbox-Token`, or for the shell's websocket
//! also the `kiln.token.<token>` subprotocol browsers can send).

use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kiln_core::auth::Auth;
use kiln_core::problem::{ErrorCode, Problem};
use kiln_core::sandboxes::record::Scope;
use kiln_core::sandboxes::{is_valid_id, Sandboxes};
use kiln_core::tier::microvm::sandbox::{ExecSpec, ExitReport, GuestStream, OpenError, Side, VmHandle};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::body::{self, Body, BodyBudget};
use super::error;
use super::openapi::{ErrorBody, ExecResult};
use super::sandboxes::{offered_protocols, sandbox_token, TOKEN_PROTOCOL};

/// The most of each of stdout and stderr a buffered exec answers with; the rest is counted and
/// dropped (`truncated`). Streaming (SSE) has no cap.
const BUFFERED_OUTPUT: usize = 1 << 20;
/// An exec's stdin and a written file are bounded, as any request body.
const MAX_STDIN: u64 = 16 << 20;
const MAX_FILE: u64 = 64 << 20;
const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The sandbox named by the path, once the caller may act in it with `scope`.
async fn authorize(
    auth: &Auth,
    sandboxes: &Sandboxes,
    id: &str,
    req: &Request<Incoming>,
    scope: Scope,
) -> Result<(), Problem> {
    if !is_valid_id(id) {
        return Err(error::not_found(format!("no sandbox {id:?}")));
    }
    let gate = sandboxes.gate(id).await?;
    let principal = auth.authenticate(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()));
    let token = sandbox_token(req);
    sandboxes.may_act(&gate, principal.as_ref(), token.as_deref(), scope)?;
    Ok(())
}

/// Why a stream did not open, as the API says it.
fn open_problem(e: OpenError, path: Option<&str>) -> Problem {
    match e {
        OpenError::Vm(e) => e.into(),
        OpenError::Busy(message) => Problem::new(ErrorCode::TooManyRequests, message),
        OpenError::Refused(exit) => match path {
            Some(path) => file_problem(&exit, path),
            None => Problem::new(ErrorCode::FunctionFailed, exit.message),
        },
    }
}

/// A file operation the guest refused, by its errno.
fn file_problem(exit: &ExitReport, path: &str) -> Problem {
    let code = match exit.status {
        libc::ENOENT => ErrorCode::NotFound,
        libc::EACCES | libc::EPERM | libc::EROFS => ErrorCode::Forbidden,
        libc::EISDIR | libc::ENOTDIR | libc::EINVAL | libc::ENAMETOOLONG | libc::ELOOP => ErrorCode::InvalidRequest,
        libc::EFBIG => ErrorCode::PayloadTooLarge,
        libc::ENOSPC | libc::EDQUOT => ErrorCode::InsufficientStorage,
        _ => ErrorCode::FunctionFailed,
    };
    Problem::new(code, format!("{path} in the sandbox: {}", exit.message))
}

/// An exec request (`../shared/API.md`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Exec {
    argv: Vec<String>,
    #[serde(default)]
    stdin: String,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id"),
        ("kill_on_disconnect" = Option<bool>, Query, description = "Streaming: kill the process if the client goes away (default: it runs on)")),
    request_body(content = String, content_type = "application/json",
        description = "{\"argv\": [..], \"stdin\": \"\", \"env\": {}, \"cwd\": \"/\", \"timeout_ms\": 30000}"),
    responses((status = 200, description = "The process ended: its exit code and output (capped, `truncated`); with `Accept: text/event-stream`, SSE events `stdout`, `stderr` (base64) and `exit`", body = ExecResult),
        (status = 400, description = "A bad request, or a Wasm sandbox (named in the message)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not exec here", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody), (status = 409, description = "Terminated or failed", body = ErrorBody),
        (status = 503, description = "The microVM tier is unavailable here", body = ErrorBody)))]
pub async fn exec(
    auth: &Auth,
    sandboxes: &Sandboxes,
    budget: &BodyBudget,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    authorize(auth, sandboxes, id, &req, Scope::Exec).await?;
    let streaming = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let detach = !query_flag(req.uri().query(), "kill_on_disconnect");
    let (parts, incoming) = req.into_parts();
    let (bytes, _held) = body::read(
        &parts.headers,
        incoming,
        MAX_STDIN + 64 * 1024,
        Duration::from_secs(30),
        budget,
    )
    .await?;
    let request: Exec = kiln_core::json::from_slice(&bytes).map_err(|e| {
        error::invalid_request(format!(
            "expected {{\"argv\": [...], \"stdin\", \"env\", \"cwd\", \"timeout_ms\"}}: {e}"
        ))
    })?;
    if request.argv.is_empty() || request.argv[0].is_empty() {
        return Err(error::invalid_request("argv must name a program"));
    }
    if request.cwd.as_deref().is_some_and(|cwd| !cwd.starts_with('/')) {
        return Err(error::invalid_request("cwd must be an absolute path"));
    }
    let timeout = match request.timeout_ms {
        None => DEFAULT_EXEC_TIMEOUT,
        Some(0) => return Err(error::invalid_request("timeout_ms must be at least 1")),
        Some(ms) if Duration::from_millis(ms) > MAX_EXEC_TIMEOUT => {
            return Err(error::invalid_request(format!(
                "timeout_ms may be at most {}",
                MAX_EXEC_TIMEOUT.as_millis()
            )))
        }
        Some(ms) => Duration::from_millis(ms),
    };
    let spec = ExecSpec {
        argv: request.argv,
        env: request.env.into_iter().collect(),
        cwd: request.cwd,
        timeout: Some(timeout),
        pty: None,
    };
    let vm = sandboxes.vm(id).await?;
    let started = Instant::now();
    let mut stream = vm
        .exec(&spec, streaming && detach)
        .await
        .map_err(|e| open_problem(e, None))?;
    let stdin = request.stdin.into_bytes();
    // stdin is written while the output is read: a process may answer before it read it all.
    let (mut output, mut input) = tokio::io::split(std::mem::replace(&mut stream.io, tokio::io::duplex(1).0));
    tokio::spawn(async move {
        let _ = input.write_all(&stdin).await;
        let _ = input.shutdown().await;
    });
    if streaming {
        return Ok(events(stream, output));
    }
    let mut stdout = Capped::default();
    let mut stderr = Capped::default();
    let mut buf = vec![0u8; 64 << 10];
    let mut exit = None;
    let mut output_open = true;
    while exit.is_none() {
        tokio::select! {
            read = output.read(&mut buf), if output_open => match read {
                Ok(0) | Err(_) => output_open = false,
                Ok(n) => stdout.push(&buf[..n]),
            },
            side = stream.side.recv() => match side {
                Some(Side::Stderr(bytes)) => stderr.push(&bytes),
                Some(Side::Exit(report)) => exit = Some(report),
                Some(Side::Lost(reason)) => return Err(stream_lost(&vm, "exec", Some(reason))),
                None => return Err(stream_lost(&vm, "exec", None)),
            },
        }
    }
    // What stdout still holds after the exit.
    while let Ok(n) = output.read(&mut buf).await {
        if n == 0 {
            break;
        }
        stdout.push(&buf[..n]);
    }
    let exit = exit.expect("loop ends with an exit");
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "exit_code": exit.status,
            "stdout": String::from_utf8_lossy(&stdout.bytes),
            "stderr": String::from_utf8_lossy(&stderr.bytes),
            "duration_ms": started.elapsed().as_millis() as u64,
            "truncated": stdout.dropped + stderr.dropped > 0,
            "timed_out": exit.timed_out,
        }),
    ))
}

/// A stream that ended without its EXIT: the VM failed (its reason), or the guest reset the
/// stream (its reason, when the stream told it).
fn stream_lost(vm: &VmHandle, during: &str, reason: Option<String>) -> Problem {
    match vm.failure() {
        Some(failure) => error::unavailable(format!("the sandbox's VM ended during the {during}: {failure}")),
        None => Problem::new(
            ErrorCode::FunctionFailed,
            match reason {
                Some(reason) => format!("the stream broke during the {during}: {reason}"),
                None => format!("the guest reset the stream during the {during}"),
            },
        ),
    }
}

/// Output kept up to [`BUFFERED_OUTPUT`]; the rest counted.
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    dropped: usize,
}

impl Capped {
    fn push(&mut self, chunk: &[u8]) {
        let room = BUFFERED_OUTPUT.saturating_sub(self.bytes.len()).min(chunk.len());
        self.bytes.extend_from_slice(&chunk[..room]);
        self.dropped += chunk.len() - room;
    }
}

/// An exec streamed as server-sent events: `stdout` and `stderr` (base64 data, each chunk once,
/// in order within its stream) and a final `exit`.
fn events(mut stream: GuestStream, mut output: tokio::io::ReadHalf<tokio::io::DuplexStream>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let b64 = base64::engine::general_purpose::STANDARD;
        let event = |name: &str, data: &str| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        let mut buf = vec![0u8; 64 << 10];
        let mut output_open = true;
        loop {
            let next = tokio::select! {
                read = output.read(&mut buf), if output_open => match read {
                    Ok(0) | Err(_) => { output_open = false; continue }
                    Ok(n) => event("stdout", &b64.encode(&buf[..n])),
                },
                side = stream.side.recv() => match side {
                    Some(Side::Stderr(bytes)) => event("stderr", &b64.encode(&bytes)),
                    Some(Side::Exit(exit)) => {
                        // stdout ends before the exit is sent: what is left is read first.
                        while let Ok(n) = output.read(&mut buf).await {
                            if n == 0 { break }
                            if tx.send(event("stdout", &b64.encode(&buf[..n]))).await.is_err() { return }
                        }
                        let data = json!({"exit_code": exit.status, "timed_out": exit.timed_out}).to_string();
                        let _ = tx.send(event("exit", &data)).await;
                        return;
                    }
                    Some(Side::Lost(reason)) => {
                        let data = json!({"error": format!("the stream broke during the exec: {reason}")}).to_string();
                        let _ = tx.send(event("error", &data)).await;
                        return;
                    }
                    None => {
                        let data = json!({"error": "the sandbox's VM ended during the exec"}).to_string();
                        let _ = tx.send(event("error", &data)).await;
                        return;
                    }
                },
                // The client went away: the stream is dropped (the process detached or killed).
                () = tx.closed() => return,
            };
            if tx.send(next).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(Body::Channel(rx));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn query_flag(query: Option<&str>, name: &str) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .any(|(key, value)| key == name && matches!(value, "true" | "1" | ""))
}

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| percent_decode(value))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `path` query parameter: an absolute path in the guest.
fn guest_path(query: Option<&str>) -> Result<String, Problem> {
    let path = query_value(query, "path")
        .ok_or_else(|| error::invalid_request("?path= (an absolute path in the sandbox) is required"))?;
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err(error::invalid_request(format!(
            "path {path:?} must be an absolute path in the sandbox"
        )));
    }
    Ok(path)
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Absolute path in the guest"),
        ("mode" = Option<String>, Query, description = "Octal permissions, default 0644")),
    request_body(content = String, content_type = "application/octet-stream", description = "The file's bytes (at most 64 MiB)"),
    responses((status = 200, description = "Written (atomically: renamed into place)"),
        (status = 400, description = "A bad path or mode, or a Wasm sandbox", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not touch files here, or the guest refused", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody), (status = 413, description = "Larger than 64 MiB", body = ErrorBody),
        (status = 503, description = "The microVM tier is unavailable here", body = ErrorBody)))]
pub async fn write_file(
    auth: &Auth,
    sandboxes: &Sandboxes,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    authorize(auth, sandboxes, id, &req, Scope::Files).await?;
    let path = guest_path(req.uri().query())?;
    let mode = match query_value(req.uri().query(), "mode") {
        None => 0o644,
        Some(text) => u32::from_str_radix(&text, 8)
            .ok()
            .filter(|mode| *mode <= 0o7777)
            .ok_or_else(|| error::invalid_request(format!("mode {text:?} must be octal permissions such as 0644")))?,
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_FILE) {
        return Err(error::payload_too_large(MAX_FILE));
    }
    let vm = sandboxes.vm(id).await?;
    let mut stream = vm
        .file(&path, Some(mode))
        .await
        .map_err(|e| open_problem(e, Some(&path)))?;
    let mut incoming = req.into_body();
    let mut written = 0u64;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| error::invalid_request(format!("reading the body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        written += data.len() as u64;
        if written > MAX_FILE {
            // Dropping the stream resets it: the guest removes what it wrote.
            return Err(error::payload_too_large(MAX_FILE));
        }
        if stream.io.write_all(&data).await.is_err() {
            break;
        }
    }
    let _ = stream.io.shutdown().await;
    loop {
        match stream.side.recv().await {
            Some(Side::Exit(exit)) if exit.status == 0 => break,
            Some(Side::Exit(exit)) => return Err(file_problem(&exit, &path)),
            Some(Side::Stderr(_)) => {}
            Some(Side::Lost(reason)) => return Err(stream_lost(&vm, "write", Some(reason))),
            None => return Err(stream_lost(&vm, "write", None)),
        }
    }
    Ok(body::json(
        StatusCode::OK,
        &json!({ "path": path, "bytes": written, "mode": format!("{mode:04o}") }),
    ))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Absolute path in the guest")),
    responses((status = 200, description = "The file's bytes, streamed"),
        (status = 400, description = "A bad path, a directory, or a Wasm sandbox", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not touch files here, or the guest refused", body = ErrorBody),
        (status = 404, description = "No such sandbox or file", body = ErrorBody), (status = 413, description = "Larger than 64 MiB", body = ErrorBody),
        (status = 503, description = "The microVM tier is unavailable here", body = ErrorBody)))]
pub async fn read_file(
    auth: &Auth,
    sandboxes: &Sandboxes,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    authorize(auth, sandboxes, id, &req, Scope::Files).await?;
    let path = guest_path(req.uri().query())?;
    let vm = sandboxes.vm(id).await?;
    let stream = vm.file(&path, None).await.map_err(|e| open_problem(e, Some(&path)))?;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        // The whole stream lives in the task: its `side` dropped early would read as the client
        // gone, and the transfer would be cut (a block using only `stream.io` captures only that).
        let mut stream = stream;
        let mut buf = BytesMut::zeroed(64 << 10);
        loop {
            tokio::select! {
                read = stream.io.read(&mut buf) => match read {
                    Ok(n) if n > 0 => {
                        if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                },
                () = tx.closed() => return,
            }
        }
    });
    let mut response = Response::new(Body::Channel(rx));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}

/// A resize the shell's client sends as a text frame.
#[derive(Deserialize)]
struct Resize {
    resize: Size,
}

#[derive(Deserialize)]
struct Size {
    cols: u16,
    rows: u16,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/shell", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id"), ("cols" = Option<u16>, Query, description = "Terminal columns (80)"),
        ("rows" = Option<u16>, Query, description = "Terminal rows (24)")),
    responses((status = 101, description = "A websocket to a login shell on a pty: binary frames both ways, `{\"resize\": {\"cols\", \"rows\"}}` text frames from the client, the exit code as the close reason"),
        (status = 400, description = "Not a websocket request, or a Wasm sandbox", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not open a shell here", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 503, description = "The microVM tier is unavailable here", body = ErrorBody)))]
pub async fn shell(
    auth: &Auth,
    sandboxes: &Sandboxes,
    id: &str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    authorize(auth, sandboxes, id, &req, Scope::Shell).await?;
    let vm = sandboxes.vm(id).await?;
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| {
            req.headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        })
        .ok_or_else(|| error::invalid_request("the shell is a websocket: send Upgrade: websocket"))?
        .clone();
    let size = |name: &str, default: u16| -> Result<u16, Problem> {
        match query_value(req.uri().query(), name) {
            None => Ok(default),
            Some(text) => text
                .parse::<u16>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| error::invalid_request(format!("{name} must be between 1 and 1000"))),
        }
    };
    let (cols, rows) = (size("cols", 80)?, size("rows", 24)?);
    // Browsers fail a handshake that offered subprotocols and got none back: one is echoed.
    let protocol = {
        let offered: Vec<&str> = offered_protocols(&req).collect();
        offered
            .iter()
            .find(|p| !p.starts_with(TOKEN_PROTOCOL))
            .or(offered.first())
            .map(|p| p.to_string())
    };
    let spec = ExecSpec {
        pty: Some((cols, rows)),
        ..ExecSpec::default()
    };
    let stream = vm.exec(&spec, false).await.map_err(|e| open_problem(e, None))?;
    let upgrade = hyper::upgrade::on(&mut req);
    let sandbox = id.to_owned();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                relay_shell(socket, stream).await;
            }
            Err(e) => tracing::info!(sandbox, error = %e, "the shell's websocket upgrade failed"),
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a header value"),
    );
    if let Some(protocol) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    Ok(response)
}

/// Terminal bytes both ways; the exit code as the close reason. The client closing first kills
/// the shell (the stream is dropped).
async fn relay_shell(socket: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, mut stream: GuestStream) {
    let (mut sink, mut messages) = socket.split();
    let (mut output, mut input) = tokio::io::split(std::mem::replace(&mut stream.io, tokio::io::duplex(1).0));
    let mut buf = vec![0u8; 32 << 10];
    let mut output_open = true;
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if input.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if let Ok(Resize { resize }) = serde_json::from_str::<Resize>(&text) {
                        stream.resize(resize.cols.max(1), resize.rows.max(1)).await;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            },
            read = output.read(&mut buf), if output_open => match read {
                Ok(0) | Err(_) => output_open = false,
                Ok(n) => {
                    if sink.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        return;
                    }
                }
            },
            side = stream.side.recv() => {
                let reason = match side {
                    Some(Side::Exit(exit)) => exit.status.to_string(),
                    Some(Side::Stderr(_)) => continue,
                    Some(Side::Lost(reason)) => reason,
                    None => "the sandbox's VM ended".to_owned(),
                };
                while let Ok(n) = output.read(&mut buf).await {
                    if n == 0 || sink.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        break;
                    }
                }
                // A close frame's reason has room for 123 bytes.
                let mut reason = reason;
                while reason.len() > 123 {
                    reason.pop();
                }
                let close = CloseFrame { code: CloseCode::Normal, reason: reason.into() };
                let _ = sink.send(Message::Close(Some(close))).await;
                let _ = sink.close().await;
                return;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded_and_flags_read() {
        assert_eq!(
            query_value(Some("path=%2Ftmp%2Fa%20b&mode=0600"), "path").as_deref(),
            Some("/tmp/a b")
        );
        assert_eq!(query_value(Some("mode=0600"), "path"), None);
        assert!(query_flag(Some("kill_on_disconnect=true"), "kill_on_disconnect"));
        assert!(!query_flag(Some("kill_on_disconnect=false"), "kill_on_disconnect"));
        assert!(!query_flag(None, "kill_on_disconnect"));
        assert_eq!(percent_decode("100%"), "100%");
    }
}
