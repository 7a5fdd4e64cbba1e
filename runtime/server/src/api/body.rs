//! Reading request bodies under a size cap and a time limit, and building responses.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use kiln_core::problem::Problem;
use kiln_core::tier::wasm::trigger::GuestBody;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error;

/// A response body: the API's own answers are whole; an HTTP-trigger function's is a stream the
/// guest writes while the client reads.
pub enum Body {
    Full(Full<Bytes>),
    Stream(GuestBody),
    /// A stored result, read from its file as the client takes it.
    File(FileBody),
    /// Chunks a task sends as they come (exec's events, a file read from a sandbox); ends when
    /// the task drops its sender.
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
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
            Body::File(file) => Pin::new(file).poll_frame(cx),
            Body::Channel(chunks) => chunks.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(Frame::data(c)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Stream(stream) => stream.is_end_stream(),
            Body::File(file) => file.remaining == 0,
            Body::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Stream(stream) => stream.size_hint(),
            Body::File(file) => SizeHint::with_exact(file.remaining),
            Body::Channel(_) => SizeHint::default(),
        }
    }
}

/// A file sent as it is read, 64 KiB at a time: a 6 MiB result costs the server 64 KiB, not 6 MiB,
/// however slowly its client reads.
pub struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
}

impl FileBody {
    pub fn new(file: std::fs::File) -> std::io::Result<FileBody> {
        let remaining = file.metadata()?.len();
        Ok(FileBody {
            file: tokio::fs::File::from_std(file),
            remaining,
        })
    }
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let mut chunk = BytesMut::zeroed(this.remaining.min(64 * 1024) as usize);
        let mut buf = tokio::io::ReadBuf::new(&mut chunk);
        match std::task::ready!(tokio::io::AsyncRead::poll_read(Pin::new(&mut this.file), cx, &mut buf)) {
            Err(e) => Poll::Ready(Some(Err(e.into()))),
            Ok(()) if buf.filled().is_empty() => {
                Poll::Ready(Some(Err("the result file ended before its length".into())))
            }
            Ok(()) => {
                let read = buf.filled().len();
                chunk.truncate(read);
                this.remaining -= read as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk.freeze()))))
            }
        }
    }
}

/// The request-body bytes the server holds in memory at once, all requests together. Every body
/// read whole (deploys, invoke inputs, token requests) holds its share until its request is done;
/// past the budget a request is answered `503` (retry) instead of growing the server. A declared
/// `Content-Length` is reserved before the first byte is read; a chunked body reserves as it comes.
pub struct BodyBudget {
    kib: Arc<Semaphore>,
    bytes: u64,
}

/// A body's share of the budget, given back when dropped.
pub struct Held {
    _share: OwnedSemaphorePermit,
}

impl BodyBudget {
    pub fn new(bytes: u64) -> BodyBudget {
        let kib = bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS as u64) as usize;
        BodyBudget {
            kib: Arc::new(Semaphore::new(kib)),
            bytes,
        }
    }

    fn reserve(&self, bytes: u64) -> Result<OwnedSemaphorePermit, Problem> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        self.kib.clone().try_acquire_many_owned(kib).map_err(|_| {
            error::unavailable(format!(
                "the server holds its maximum of {} bytes of request bodies; retry shortly",
                self.bytes
            ))
        })
    }
}

/// Reads a whole body of at most `limit` bytes within `timeout`, holding its bytes' share of
/// `budget`. A declared `Content-Length` over the limit is refused before a byte is read.
pub async fn read(
    headers: &HeaderMap,
    mut body: Incoming,
    limit: u64,
    timeout: Duration,
    budget: &BodyBudget,
) -> Result<(Bytes, Held), Problem> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(error::payload_too_large(limit));
    }
    let mut held = budget.reserve(declared.unwrap_or(0))?;
    let mut reserved = declared.unwrap_or(0).div_ceil(1024) * 1024;
    let mut bytes = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    let collect = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| error::invalid_request(format!("reading the request body: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            let total = bytes.len() as u64 + data.len() as u64;
            if total > limit {
                return Err(error::payload_too_large(limit));
            }
            if total > reserved {
                let more = (total - reserved).div_ceil(1024) * 1024;
                held.merge(budget.reserve(more)?);
                reserved += more;
            }
            bytes.extend_from_slice(&data);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, collect).await {
        Ok(Ok(())) => Ok((bytes.freeze(), Held { _share: held })),
        Ok(Err(problem)) => Err(problem),
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
