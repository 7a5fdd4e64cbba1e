//! A function whose start-up is expensive: it sieves the primes below 20 million (a fraction of a
//! second of work, and a table of 1.27 million primes; `PRIMES_LIMIT` in the config env changes
//! the bound) before it can answer `{"n": 1000}` with the 1000th prime. Built for `wasm32-wasip1`, the sieve runs once in the init hook, at deploy;
//! Kiln snapshots the memory, and every invocation starts with the table already built.
//!
//! The answer also says how it got there, so the snapshot can be checked from outside:
//! `init_runs` (times the init hook ran in this instance's history), `restores` (times the
//! restore hook ran), `built_during_invocation` (whether the table had to be built by the
//! function itself, as without a snapshot), and `nonce`, a random number drawn while building:
//! the same in every invocation of one snapshot, different per instance without one.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use kiln_sdk::config::ConfigError;

const DEFAULT_LIMIT: usize = 20_000_000;
const MAX_LIMIT: usize = 200_000_000;

struct Table {
    primes: Vec<u32>,
    nonce: u64,
    built_during_invocation: bool,
}

/// Built by the init hook (and then part of the snapshot), or on first use without one.
static TABLE: OnceLock<Table> = OnceLock::new();
static IN_INVOCATION: AtomicBool = AtomicBool::new(false);
static INIT_RUNS: AtomicU32 = AtomicU32::new(0);
static RESTORES: AtomicU32 = AtomicU32::new(0);

/// The table, built now if the init hook has not built it (no snapshot).
fn table() -> Result<&'static Table, ConfigError> {
    if let Some(table) = TABLE.get() {
        return Ok(table);
    }
    let limit = match kiln_sdk::config::parse("PRIMES_LIMIT")? {
        None => DEFAULT_LIMIT,
        Some(limit @ 3..=MAX_LIMIT) => limit,
        Some(other) => {
            return Err(ConfigError::Invalid {
                name: "PRIMES_LIMIT".into(),
                value: other.to_string(),
                reason: format!("must be between 3 and {MAX_LIMIT}"),
            })
        }
    };
    Ok(TABLE.get_or_init(|| build(limit)))
}

fn build(limit: usize) -> Table {
    kiln_sdk::info!("sieving", limit = limit);
    // Odd numbers only, one bit each: bit i stands for 2i + 1.
    let mut composite = vec![0u64; limit / 128 + 1];
    let mut primes = vec![2u32];
    let mut i = 1;
    while 2 * i + 1 < limit {
        if composite[i / 64] & (1 << (i % 64)) == 0 {
            let p = 2 * i + 1;
            primes.push(p as u32);
            // Multiples below p² were crossed off by smaller primes; past √limit there are none
            // left to cross (and p² would overflow a 32-bit usize).
            if p <= limit / p {
                let mut multiple = p * p;
                while multiple < limit {
                    let j = multiple / 2;
                    composite[j / 64] |= 1 << (j % 64);
                    multiple += 2 * p;
                }
            }
        }
        i += 1;
    }
    Table {
        primes,
        nonce: std::collections::hash_map::RandomState::new().hash_one(0u8),
        built_during_invocation: IN_INVOCATION.load(Ordering::Relaxed),
    }
}

#[kiln_sdk::init]
fn init() -> Result<(), ConfigError> {
    INIT_RUNS.fetch_add(1, Ordering::Relaxed);
    table().map(|_| ())
}

#[kiln_sdk::restore]
fn restore() {
    RESTORES.fetch_add(1, Ordering::Relaxed);
}

#[derive(Deserialize)]
struct Input {
    /// Which prime: 1 is 2, 2 is 3...
    n: usize,
}

#[derive(Serialize)]
struct Output {
    prime: u32,
    primes_known: usize,
    init_runs: u32,
    restores: u32,
    built_during_invocation: bool,
    nonce: String,
}

#[kiln_sdk::function]
fn handle(input: Input) -> Result<Output, String> {
    IN_INVOCATION.store(true, Ordering::Relaxed);
    let table = table().map_err(|e| e.to_string())?;
    let prime = input
        .n
        .checked_sub(1)
        .and_then(|i| table.primes.get(i))
        .ok_or_else(|| format!("primes: n must be between 1 and {}", table.primes.len()))?;
    Ok(Output {
        prime: *prime,
        primes_known: table.primes.len(),
        init_runs: INIT_RUNS.load(Ordering::Relaxed),
        restores: RESTORES.load(Ordering::Relaxed),
        built_during_invocation: table.built_during_invocation,
        nonce: format!("{:016x}", table.nonce),
    })
}
