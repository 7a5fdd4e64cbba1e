//! A stateful `wasi:http/proxy` function, for sandbox suspend/resume tests: what it keeps in memory
//! between requests must survive a snapshot of its instance.
//!
//! - any path: counts the request and answers `count=N len=L sum=S` (the buffer's length in bytes
//!   and its FNV-1a checksum, in hex);
//! - `/grow?kib=N[&seed=S]`: also replaces the buffer with N KiB of a pseudo-random pattern (mostly
//!   non-zero bytes, so nothing of it can be skipped as zero pages);
//! - `/zeros?kib=N`: replaces the buffer with N KiB of zeros;
//! - `/hold`: keeps a host resource (a clock pollable) alive in a static, so the instance is not
//!   quiescent; `/release` drops it.
//! - `/random`: answers 16 bytes of the host's `wasi:random` in hex (a fork must draw its own);
//! - `/events?n=N&ms=M`: counts the request, then streams N server-sent events
//!   (`id: K\ndata: count=C\n\n`, C the request's count), M ms apart, flushing each one.

use std::cell::RefCell;

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};
use wasip2::io::poll::Pollable;

struct Counter;

struct State {
    count: u64,
    buffer: Vec<u8>,
}

thread_local! {
    static STATE: RefCell<State> = const { RefCell::new(State { count: 0, buffer: Vec::new() }) };
    static HELD: RefCell<Option<Pollable>> = const { RefCell::new(None) };
}

/// A query parameter as a number.
fn param(query: &str, name: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}

/// N bytes of xorshift output: a pattern a checksum can tell apart from any other seed's.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let word = x.to_le_bytes();
        let take = word.len().min(len - out.len());
        out.extend_from_slice(&word[..take]);
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Guest for Counter {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_default();
        drop(request);
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let kib = param(query, "kib").unwrap_or(0).min(256 * 1024) as usize;
        match path {
            "/hold" => HELD.with(|held| {
                *held.borrow_mut() = Some(wasip2::clocks::monotonic_clock::subscribe_duration(3_600_000_000_000))
            }),
            "/release" => HELD.with(|held| drop(held.borrow_mut().take())),
            _ => {}
        }
        let count = STATE.with(|state| {
            let mut state = state.borrow_mut();
            state.count += 1;
            match path {
                "/grow" => {
                    let seed = param(query, "seed").unwrap_or(state.count);
                    state.buffer = pattern(kib * 1024, seed);
                }
                "/zeros" => state.buffer = vec![0; kib * 1024],
                _ => {}
            }
            state.count
        });
        match path {
            "/random" => {
                let bytes = wasip2::random::random::get_random_bytes(16);
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                respond(out, "text/plain", &[format!("{hex}\n")], 0);
            }
            "/events" => {
                let n = param(query, "n").unwrap_or(1).min(1000);
                let ms = param(query, "ms").unwrap_or(0).min(60_000);
                let events: Vec<String> = (1..=n).map(|id| format!("id: {id}\ndata: count={count}\n\n")).collect();
                respond(out, "text/event-stream", &events, ms);
            }
            _ => {
                let body = STATE.with(|state| {
                    let state = state.borrow();
                    format!("count={} len={} sum={:016x}\n", state.count, state.buffer.len(), fnv1a(&state.buffer))
                });
                respond(out, "text/plain", &[body], 0);
            }
        }
    }
}

/// Answers with `chunks`, each written and flushed on its own, `pause_ms` apart.
fn respond(out: ResponseOutparam, content_type: &str, chunks: &[String], pause_ms: u64) {
    let headers = Fields::from_list(&[("content-type".to_owned(), content_type.as_bytes().to_vec())]).unwrap();
    let response = OutgoingResponse::new(headers);
    let outgoing = response.body().unwrap();
    ResponseOutparam::set(out, Ok(response));
    let stream = outgoing.write().unwrap();
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 && pause_ms > 0 {
            wasip2::clocks::monotonic_clock::subscribe_duration(pause_ms * 1_000_000).block();
        }
        for piece in chunk.as_bytes().chunks(4096) {
            stream.blocking_write_and_flush(piece).unwrap();
        }
    }
    drop(stream);
    OutgoingBody::finish(outgoing, None).unwrap();
}

wasip2::http::proxy::export!(Counter);

fn main() {}
