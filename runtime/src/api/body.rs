//! Reading request bodies under a size cap and a time limit, and building responses.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::error::ApiError;

pub type Body = Full<Bytes>;

/// Reads a whole body of at most `limit` bytes within `timeout`. A declared `Content-Length` over
/// the limit is refused before a byte is read.
pub async fn read(headers: &HeaderMap, body: Incoming, limit: u64, timeout: Duration) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit as usize).collect()).await;
    match collected {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
        Ok(Err(e)) => Err(ApiError::invalid_request(format!("reading the request body: {e}"))),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body was not received within {} s", timeout.as_secs()),
        )),
    }
}

pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("response types serialise");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static headers are valid")
}

pub fn error(e: &ApiError) -> Response<Body> {
    let mut response = Response::builder()
        .status(e.status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(e.body())))
        .expect("static headers are valid");
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}
