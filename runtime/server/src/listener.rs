//! The accept loop: HTTP/1.1 and h2c on one port (hyper-util's auto builder), guarded against
//! hostile clients from the first byte — a cap on open connections, a deadline for request headers
//! (slowloris), capped header sizes and h2 streams; bodies have their own limits in `api::body`.
//!
//! Shutdown: stop accepting, answer new requests on open connections with 503, let in-flight ones
//! finish (bounded by `shutdown_grace`), then return.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{api, Server};

const MAX_HEADER_BYTES: usize = 64 * 1024;
const MAX_H2_STREAMS: u32 = 256;

fn http_builder(server: &Server) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.config.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves on `listener` until `shutdown` resolves, then drains.
pub async fn run(server: Arc<Server>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let builder = http_builder(&server);
    let graceful = GracefulShutdown::new();
    let connection_permits = Arc::new(Semaphore::new(server.config.max_connections));
    tokio::pin!(shutdown);

    loop {
        // Waiting for a permit before accepting leaves excess clients in the kernel's backlog
        // rather than holding sockets we cannot serve.
        let permit = tokio::select! {
            permit = connection_permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let service = service_fn(move |req| api::handle(server.clone(), req));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }

    server.kiln.begin_shutdown();
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests and async invocations");
    let grace = server.config.shutdown_grace;
    let connections = async {
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(grace) => {
                tracing::warn!(?grace, "connections still open after the grace period; closing")
            }
        }
    };
    tokio::join!(connections, server.kiln.queue.stop(grace));
    // Running sandboxes keep their state across the restart: each is suspended to disk.
    server.kiln.sandboxes.suspend_all().await;
}
