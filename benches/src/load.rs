//! A small HTTP/1.1 load generator on hyper, for what `wrk` cannot do: spread requests round-robin
//! over many paths (10,000 deployed functions), deploy over keep-alive connections, and keep every
//! latency sample (p99.9 of a few thousand requests needs the samples, not a histogram's buckets).
//!
//! Each connection is a task that sends one request, waits for the whole answer, and sends the
//! next (closed loop, like `wrk`); a shared counter picks the next path, so the paths are visited
//! in turn whichever connection is free.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("{method} {path}: {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
}

/// One keep-alive connection with a bearer token.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    authorization: Option<String>,
    host: String,
}

impl Conn {
    pub async fn open(addr: SocketAddr, token: Option<&str>) -> Result<Conn, LoadError> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| LoadError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn {
            sender,
            authorization: token.map(|t| format!("Bearer {t}")),
            host: addr.to_string(),
        })
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(&mut self, method: Method, path: &str, body: Bytes) -> Result<(StatusCode, Bytes), LoadError> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host);
        if let Some(authorization) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, authorization);
        }
        let request = request.body(Full::new(body)).expect("a valid request");
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// Sends one request and fails unless the status is a success.
    pub async fn expect_ok(&mut self, method: Method, path: &str, body: Bytes) -> Result<Bytes, LoadError> {
        let (status, answer) = self.send(method.clone(), path, body).await?;
        if !status.is_success() {
            return Err(LoadError::Status {
                method,
                path: path.to_owned(),
                status,
                body: String::from_utf8_lossy(&answer).into_owned(),
            });
        }
        Ok(answer)
    }
}

/// What a closed-loop run measured.
pub struct LoadResult {
    /// Latency of every successful request.
    pub samples: Vec<Duration>,
    /// Answers that were not a success (their latency is not in `samples`).
    pub failures: usize,
    pub elapsed: Duration,
}

impl LoadResult {
    pub fn requests_per_second(&self) -> f64 {
        (self.samples.len() + self.failures) as f64 / self.elapsed.as_secs_f64()
    }
}

/// How to drive: which paths (in turn), over how many connections, for how long or how many.
pub struct Load {
    pub addr: SocketAddr,
    pub token: Option<String>,
    pub paths: Arc<Vec<String>>,
    pub body: Bytes,
    pub connections: usize,
    pub duration: Duration,
    /// Stop after this many requests in total, whichever comes first.
    pub max_requests: usize,
}

impl Load {
    /// POSTs `body` to the paths in turn until `duration` or `max_requests` is reached.
    pub async fn run(&self) -> Result<LoadResult, LoadError> {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let deadline = started + self.duration;
        let mut tasks = Vec::with_capacity(self.connections);
        for _ in 0..self.connections.max(1) {
            let mut conn = Conn::open(self.addr, self.token.as_deref()).await?;
            let (paths, next, body, max) = (self.paths.clone(), next.clone(), self.body.clone(), self.max_requests);
            tasks.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut failures = 0;
                while Instant::now() < deadline {
                    let turn = next.fetch_add(1, Ordering::Relaxed);
                    if turn >= max {
                        break;
                    }
                    let path = &paths[turn % paths.len()];
                    let sent = Instant::now();
                    let (status, _) = conn.send(Method::POST, path, body.clone()).await?;
                    if status.is_success() {
                        samples.push(sent.elapsed());
                    } else {
                        failures += 1;
                    }
                }
                Ok::<_, LoadError>((samples, failures))
            }));
        }
        let mut result = LoadResult {
            samples: Vec::new(),
            failures: 0,
            elapsed: Duration::ZERO,
        };
        for task in tasks {
            let (samples, failures) = task.await.expect("load task panicked")?;
            result.samples.extend(samples);
            result.failures += failures;
        }
        result.elapsed = started.elapsed();
        Ok(result)
    }
}
