//! The accept loop: HTTP/1.1 and h2c on one port (hyper-util's auto builder), guarded against
//! hostile clients from the first byte.
//!
//! - Slots: every connection holds one in the connection table ([`connections`]), which caps
//!   connections in all and per client address, and makes a full table give the oldest idle
//!   connection's slot to a newcomer instead of leaving the newcomer in the kernel's queue.
//! - Deadlines, one watchdog per connection ([`drive`]): from accept to a complete request head,
//!   `header_read_timeout`, on every protocol, including the protocol detection that precedes
//!   hyper's own HTTP/1 header timer and HTTP/2, which has none; after the last request,
//!   `idle_timeout` (HTTP/2's pings keep a live but idle peer open, so they cannot be the bound).
//!   A missed deadline starts a graceful close (HTTP/2: GOAWAY) that may take `CLOSE_GRACE` at
//!   most unless a request races in.
//! - Sizes and rates: 64 KiB of headers, 256 concurrent h2 streams, and h2's reset limits against
//!   rapid reset (CVE-2023-44487); bodies have their own limits in `api::body`.
//! - TLS ([`crate::tls`]): the handshake runs in the connection's own task, holding its slot (an
//!   idle one: an eviction ends it), and must finish within `header_read_timeout`; then the same
//!   HTTP/1.1-or-h2 service runs over it.
//!
//! Shutdown: stop accepting, tell every connection to close gracefully (the API answers requests
//! that still arrive with 503), let in-flight ones finish (bounded by `shutdown_grace`), return.
//!
//! [`connections`]: crate::connections

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep_until, Instant};

use crate::connections::{Check, Connections, Limits, Slot, Tracked};
use crate::{api, Server};

const MAX_HEADER_BYTES: usize = 64 * 1024;
const MAX_H2_STREAMS: u32 = 256;
/// Streams a client may reset before the server has even accepted them: the rapid-reset pattern
/// (HEADERS then RST_STREAM at once). A real client cancelling requests rarely has more than a
/// few such in one read; past this the connection gets GOAWAY (ENHANCE_YOUR_CALM). h2's default.
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server may have to reset for a client's protocol errors before it closes the
/// connection; a correct client causes none.
const MAX_LOCAL_ERROR_RESETS: usize = 128;
/// How long a connection closed for a missed deadline gets to flush a GOAWAY and take a racing
/// request before its socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// How often the listener logs what it evicted, refused and closed, when it did any of that.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

fn http_builder(server: &Server) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Also bounds the wait for the next request on a keep-alive connection (hyper restarts
        // it there); the first request's deadline is the watchdog's, from accept.
        .header_read_timeout(server.config.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
        // Pings find peers that vanished during a long request; idle ones are the watchdog's.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves on `listener` until `shutdown` resolves, then drains.
pub async fn run(server: Arc<Server>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let builder = Arc::new(http_builder(&server));
    let config = &server.config;
    let connections = Connections::new(Limits {
        max_connections: config.max_connections,
        max_per_ip: config.max_connections_per_ip(),
        header_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
    });
    let (closing_tx, closing) = watch::channel(false);
    let server_tls = server.tls.clone();
    let summary = tokio::spawn(summarize(connections.clone()));
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // While every slot is busy this waits with one accepted socket in hand, and the rest stay
        // in the kernel's backlog.
        let admitted = tokio::select! {
            admitted = connections.admit(peer.ip()) => admitted,
            () = &mut shutdown => break,
        };
        let Some((slot, evicted)) = admitted else {
            tracing::debug!(%peer, "refused: its address is at --max-connections-per-ip, all busy");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let requests = slot.requests();
        let raced = Arc::new(AtomicBool::new(false));
        let raced_here = raced.clone();
        let service = service_fn(move |req| {
            let server = server.clone();
            let guard = requests.begin();
            if guard.is_none() {
                raced_here.store(true, Ordering::Relaxed);
            }
            async move {
                let Ok(response) = api::handle(server, req).await;
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, guard)))
            }
        });
        let closing = closing.clone();
        match &server_tls {
            None => {
                // With upgrades: a websocket to a microVM sandbox switches protocols on this connection.
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                tokio::spawn(drive(connection, slot, evicted, raced, closing));
            }
            Some(tls) => {
                let (acceptor, builder) = (tls.acceptor(), builder.clone());
                let deadline = config.header_read_timeout;
                tokio::spawn(async move {
                    let mut evicted = evicted;
                    // A connection still shaking hands is idle: an eviction for a newcomer ends it.
                    let handshake = tokio::time::timeout(deadline, acceptor.accept(stream));
                    let stream = tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
                            Err(_) => return tracing::debug!(%peer, "TLS handshake not done in time"),
                        },
                        _ = &mut evicted => return,
                    };
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    drive(connection, slot, evicted, raced, closing).await
                });
            }
        }
        // The new connection's first poll (which parses a request head that came with the
        // handshake, making it busy) runs before the next accept, so that under a flood of
        // newcomers a real client is not evicted before its request was even read.
        tokio::task::yield_now().await;
    }

    server.kiln.begin_shutdown();
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests and async invocations");
    let _ = closing_tx.send(true);
    let grace = server.config.shutdown_grace;
    let drained = async {
        tokio::select! {
            () = connections.all_closed() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(grace) => {
                tracing::warn!(?grace, "connections still open after the grace period; closing")
            }
        }
    };
    tokio::join!(drained, server.kiln.queue.stop(grace));
    summary.abort();
    // Running sandboxes keep their state across the restart: each is suspended to disk.
    server.kiln.sandboxes.suspend_all().await;
}

/// Serves one connection until it ends, is evicted, misses a deadline or is closed by shutdown.
/// Returning drops the connection, which closes its socket, and the slot.
///
/// `raced`: a request head was parsed after the connection had been evicted (it arrived while
/// the eviction was on its way). That request is served, outside the table, and the connection
/// closes after it: the client did nothing wrong, and it is one request, bounded by its own limits.
async fn drive<C>(
    connection: C,
    slot: Slot,
    mut evicted: oneshot::Receiver<()>,
    raced: Arc<AtomicBool>,
    mut closing: watch::Receiver<bool>,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(connection);
    // The watchdog is not told when the connection's state changes; it looks at least this often
    // instead. A connection that goes idle at t has its deadline at t + idle or later, so looking
    // every min(header, idle) is never late, and costs one timer per connection per period.
    let limits = slot.limits();
    let period = limits.header_timeout.min(limits.idle_timeout);
    let mut check_at = Instant::now() + period;
    // Set once a graceful close has begun (deadline, eviction with a raced request, shutdown).
    let mut closed_by_deadline = false;
    let mut was_evicted = false;
    let mut shutting_down = false;
    loop {
        tokio::select! {
            // The connection first: a request head already received is parsed (and marks the
            // connection busy, or raced) before an eviction is acted on.
            biased;
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = &mut evicted, if !was_evicted => {
                // Idle, its slot given to a newcomer: nothing is in progress, so drop it.
                if !raced.load(Ordering::Relaxed) {
                    return;
                }
                was_evicted = true;
                connection.as_mut().graceful_shutdown();
            }
            () = sleep_until(check_at) => match slot.check() {
                Check::Gone if !raced.load(Ordering::Relaxed) => return,
                // Its request has limits of its own; look again in case it goes idle.
                Check::Gone | Check::Busy => check_at = Instant::now() + period,
                Check::Until(at) => check_at = at.min(Instant::now() + period),
                Check::Missed(_) if closed_by_deadline => return,
                Check::Missed(deadline) => {
                    slot.count_deadline(deadline);
                    tracing::debug!(?deadline, "closing a connection that missed its deadline");
                    connection.as_mut().graceful_shutdown();
                    closed_by_deadline = true;
                    check_at = Instant::now() + CLOSE_GRACE;
                }
            },
            changed = closing.changed(), if !shutting_down => {
                shutting_down = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Logs, at most once per `SUMMARY_EVERY`, how many connections were evicted, refused and closed
/// at a deadline: the counts an operator needs to see an attack or a cap set too low.
async fn summarize(connections: Arc<Connections>) {
    let mut every = tokio::time::interval(SUMMARY_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let c = &connections.counters;
        let take = |counter: &std::sync::atomic::AtomicU64| counter.swap(0, Ordering::Relaxed);
        let (evicted, refused, header, idle) = (
            take(&c.evicted),
            take(&c.refused),
            take(&c.header_deadline),
            take(&c.idle_deadline),
        );
        if evicted + refused + header + idle > 0 {
            tracing::info!(
                evicted,
                refused,
                header_deadline = header,
                idle_deadline = idle,
                open = connections.open(),
                "connections in the last {} s: {evicted} idle ones evicted for newcomers, {refused} refused over \
                 --max-connections-per-ip, {header} closed without a request head in time, {idle} closed idle",
                SUMMARY_EVERY.as_secs()
            );
        }
    }
}
