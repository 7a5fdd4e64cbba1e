//! The HTTP ceiling of this machine: hyper answering every request with a fixed body, on the same
//! server stack Kiln uses (hyper-util auto builder, HTTP/1.1 + h2c), with no work behind it.
//! Usage: bare-hyper [ADDR]   (default 127.0.0.1:7979)

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body like Kiln does, so both sides do the same HTTP work.
    let _ = req.into_body().collect().await;
    Ok(Response::new(Full::new(Bytes::from_static(b"Hello from Kiln!\n"))))
}

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7979".into());
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    eprintln!("bare-hyper listening on http://{}", listener.local_addr().unwrap());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
        });
    }
}
