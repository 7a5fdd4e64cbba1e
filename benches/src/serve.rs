//! The accept loop of the bench's own servers (`bare-hyper`, `fork-exec`, `http-floor`): the server
//! stack Kiln uses (hyper-util's auto builder, HTTP/1.1 and h2c, `TCP_NODELAY`), nothing else.

use std::convert::Infallible;
use std::future::Future;

use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Binds `addr`, prints `NAME listening on http://ADDR` on stderr (the smoke test and `run.sh`
/// read it; ADDR may use port 0), then answers every request with `handle`, forever.
pub async fn serve<H, F, B>(name: &str, addr: &str, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    eprintln!("{name} listening on http://{}", listener.local_addr().unwrap());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = handle(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
