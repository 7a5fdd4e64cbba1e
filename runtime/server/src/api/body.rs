//! Reading request bodies under a size cap and a time limit, and building responses.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use kiln_core::problem::Problem;
use kiln_core::tier::wasm::trigger::GuestBody;

use super::error;

/// A response body: the API's own answers are whole; an HTTP-trigger function's is a stream the
/// guest writes while the client reads.
pub enum Body {
    Full(Full<Bytes>),
    Stream(GuestBody),
}

impl Body {
    pub fn new(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Full::new(bytes.into()))
    }
}

impl Default for Body {
    fn default() -> Body {
        Body::new(Bytes::new())
    }
}

impl From<String> for Body {
    fn from(text: String) -> Body {
        Body::new(text)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Full(full) => Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
            Body::Stream(stream) => Pin::new(stream).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Stream(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Stream(stream) => stream.size_hint(),
        }
    }
}

/// Reads a whole body of at most `limit` bytes within `timeout`. A declared `Content-Length` over
/// the limit is refused before a byte is read.
pub async fn read(headers: &HeaderMap, body: Incoming, limit: u64, timeout: Duration) -> Result<Bytes, Problem> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(error::payload_too_large(limit));
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit as usize).collect()).await;
    match collected {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error::payload_too_large(limit)),
        Ok(Err(e)) => Err(error::invalid_request(format!("reading the request body: {e}"))),
        Err(_) => Err(error::request_timeout(format!(
            "the request body was not received within {} s",
            timeout.as_secs()
        ))),
    }
}

pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("response types serialise");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::new(bytes))
        .expect("static headers are valid")
}

/// The answer to a failure: its status and JSON body (`error`).
pub fn error(problem: &Problem) -> Response<Body> {
    let status = error::status(problem.code);
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::new(error::body(problem)))
        .expect("static headers are valid");
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}
