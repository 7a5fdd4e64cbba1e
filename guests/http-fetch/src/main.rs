//! Fetches the URL given as the request body (`GET`, through `wasi:http/outgoing-handler`) and
//! answers `200` with the upstream status and body, or `502` with the error code the host gave
//! (Kiln denies destinations outside the function's `allowed_hosts`).

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam, Scheme,
};
use wasip2::io::streams::StreamError;

struct Fetch;

fn read_all(stream: &wasip2::io::streams::InputStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => return bytes,
            Err(StreamError::LastOperationFailed(e)) => panic!("reading a body: {}", e.to_debug_string()),
        }
    }
}

/// `http://host:port/path` → (scheme, authority, path-with-query).
fn split(url: &str) -> Option<(Scheme, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Some((scheme, authority.to_owned(), path.to_owned()))
}

fn fetch(url: &str) -> Result<(u16, Vec<u8>), String> {
    let (scheme, authority, path) = split(url).ok_or_else(|| format!("not a URL: {url:?}"))?;
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&scheme)).unwrap();
    request.set_authority(Some(&authority)).unwrap();
    request.set_path_with_query(Some(&path)).unwrap();
    let future = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    future.subscribe().block();
    let response = future.get().expect("ready").expect("first get").map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let body = response.consume().unwrap();
    let bytes = read_all(&body.stream().unwrap());
    Ok((status, bytes))
}

impl Guest for Fetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let incoming = request.consume().unwrap();
        let url = String::from_utf8_lossy(&read_all(&incoming.stream().unwrap())).trim().to_owned();
        let (status, body) = match fetch(&url) {
            Ok((upstream, bytes)) => {
                let mut body = format!("upstream {upstream}\n").into_bytes();
                body.extend_from_slice(&bytes);
                (200, body)
            }
            Err(error) => (502, format!("denied or failed: {error}\n").into_bytes()),
        };
        let response = OutgoingResponse::new(Fields::new());
        response.set_status_code(status).unwrap();
        let outgoing = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let stream = outgoing.write().unwrap();
        for chunk in body.chunks(4096) {
            stream.blocking_write_and_flush(chunk).unwrap();
        }
        drop(stream);
        OutgoingBody::finish(outgoing, None).unwrap();
    }
}

wasip2::http::proxy::export!(Fetch);

fn main() {}
