//! HTTP-trigger functions: components exporting `wasi:http/incoming-handler` (the
//! `wasi:http/proxy` world), which Kiln serves at `/fn/{name}/{*path}`.
//!
//! This is the `wasi` crate's own HTTP binding, re-exported so a function needs one dependency,
//! plus two helpers for the common case of a whole body in and a whole response out. Nothing here
//! is an HTTP implementation of its own: requests and responses are the host's `wasi:http`
//! resources, streamed by Kiln.
//!
//! Needs the `http` feature and the `wasm32-wasip2` target, in a library crate built as a
//! `cdylib` (a proxy component has no `main`):
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! kiln-sdk = { path = "../kiln/sdk", features = ["http"] }
//! ```
//!
//! ```no_run
//! use kiln_sdk::http::{self, IncomingRequest, ResponseOutparam};
//!
//! struct Echo;
//!
//! impl http::Handler for Echo {
//!     fn handle(request: IncomingRequest, out: ResponseOutparam) {
//!         match http::read_body(&request) {
//!             Ok(body) => http::respond(out, 200, &[("content-type", "text/plain")], &body),
//!             Err(e) => http::respond(out, 400, &[], e.to_string().as_bytes()),
//!         }
//!     }
//! }
//!
//! kiln_sdk::http::export!(Echo);
//! ```

use std::io::{Read, Write};

/// The whole `wasi` crate, for what the re-exports above leave out (outgoing requests, streams,
/// clocks...).
pub use wasi;
pub use wasi::exports::http::incoming_handler::Guest as Handler;
/// Exports a type implementing [`Handler`] as the component's `wasi:http/incoming-handler`
/// (`wasi::http::proxy::export!`). Use it once, at the crate's top level.
pub use wasi::http::proxy::export;
pub use wasi::http::types::{
    ErrorCode, Fields, Headers, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse,
    ResponseOutparam, Scheme,
};

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// The body was already taken from this request.
    Consumed,
    /// Reading the stream failed.
    Read(std::io::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Consumed => f.write_str("the request body was already consumed"),
            BodyError::Read(e) => write!(f, "reading the request body failed: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Reads the request's whole body (the body can be taken once per request).
pub fn read_body(request: &IncomingRequest) -> Result<Vec<u8>, BodyError> {
    let body = request.consume().map_err(|()| BodyError::Consumed)?;
    let mut bytes = Vec::new();
    {
        // The stream is a child of the body and must be dropped before the body is finished.
        let mut stream = body.stream().map_err(|()| BodyError::Consumed)?;
        stream.read_to_end(&mut bytes).map_err(BodyError::Read)?;
    }
    drop(IncomingBody::finish(body));
    Ok(bytes)
}

/// Sends a complete response: `status`, `headers` and `body`. Header names and values the host
/// refuses (invalid or forbidden ones) are left out; an invalid status becomes 500.
pub fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let fields = Fields::new();
    for (name, value) in headers {
        let _ = fields.append(name, value.as_bytes());
    }
    let response = OutgoingResponse::new(fields);
    if response.set_status_code(status).is_err() {
        let _ = response.set_status_code(500);
    }
    let Ok(outgoing) = response.body() else {
        ResponseOutparam::set(out, Ok(response));
        return;
    };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(mut stream) = outgoing.write() {
        // The host stream takes the body in chunks; `write_all` loops until it is all written.
        let _ = stream.write_all(body).and_then(|()| Write::flush(&mut stream));
    }
    let _ = OutgoingBody::finish(outgoing, None);
}
