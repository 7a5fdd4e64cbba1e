//! The HTTP ceiling of this machine: hyper answering every request with a fixed body, on the same
//! server stack Kiln uses (hyper-util auto builder, HTTP/1.1 + h2c), with no work behind it.
//! Usage: bare-hyper [ADDR]   (default 127.0.0.1:7979)

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};

async fn hello(req: Request<Incoming>) -> Response<Full<Bytes>> {
    // Read the body like Kiln does, so both sides do the same HTTP work.
    let _ = req.into_body().collect().await;
    Response::new(Full::new(Bytes::from_static(b"Hello from Kiln!\n")))
}

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7979".into());
    kiln_bench::serve::serve("bare-hyper", &addr, hello).await;
}
