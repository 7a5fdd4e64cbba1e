//! Write Kiln functions in Rust.
//!
//! A Kiln function is a WebAssembly program: the invoke request's body is its stdin, its stdout
//! is the response, its stderr is its log, and a non-zero exit is a failure that Kiln reports as
//! `502 function_failed` with the tail of stderr. This crate turns that into an ordinary Rust
//! function from a deserialisable input to a serialisable output:
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Input {
//!     name: String,
//! }
//!
//! #[derive(Serialize)]
//! struct Output {
//!     greeting: String,
//! }
//!
//! #[kiln_sdk::function]
//! fn handle(input: Input) -> Result<Output, String> {
//!     if input.name.is_empty() {
//!         return Err("name is empty".into()); // → 502 function_failed, "name is empty" on stderr
//!     }
//!     Ok(Output { greeting: format!("Hello, {}!", input.name) })
//! }
//! ```
//!
//! Build it as a binary crate and deploy the `.wasm`:
//!
//! ```sh
//! cargo build --release --target wasm32-wasip1
//! curl -X PUT http://127.0.0.1:7878/v1/functions/hello -H "Authorization: Bearer $TOKEN" \
//!   --data-binary @target/wasm32-wasip1/release/hello.wasm
//! curl -X POST http://127.0.0.1:7878/v1/functions/hello/invoke -H "Authorization: Bearer $TOKEN" \
//!   -d '{"name": "Ada"}'
//! # {"greeting":"Hello, Ada!"}
//! ```
//!
//! # Which target
//!
//! | target | Kiln runs it as | init hook ([`init`]) | restore hook ([`restore`]) |
//! | --- | --- | --- | --- |
//! | `wasm32-wasip1` | a WASI preview 1 module | once, **at deploy**; every invocation starts from the snapshot | on every fresh instance, before the function |
//! | `wasm32-wasip2` | a `wasi:cli/command` component | when each instance starts (Kiln does not snapshot components) | never (nothing is restored) |
//!
//! Use **`wasm32-wasip1`** for functions with an init hook: only modules get the snapshot that
//! makes an expensive start-up free. Both targets run the same code; HTTP-trigger functions
//! ([`http`], feature `http`) are components and need `wasm32-wasip2`.
//!
//! # State built at init
//!
//! Keep what the init hook builds in a `static` that builds itself on first use
//! ([`std::sync::LazyLock`], or a [`std::sync::OnceLock`] filled by the hook), and have the hook
//! force it. With a snapshot the value is already in memory when an invocation starts; without
//! one (a component, or the module run outside Kiln) it is built on first use, so the function is
//! correct either way:
//!
//! ```no_run
//! use std::collections::HashSet;
//! use std::sync::LazyLock;
//!
//! static STOP_WORDS: LazyLock<HashSet<&'static str>> =
//!     LazyLock::new(|| ["a", "an", "the", "of"].into_iter().collect());
//!
//! #[kiln_sdk::init]
//! fn init() {
//!     LazyLock::force(&STOP_WORDS); // built at deploy, part of the snapshot
//! }
//!
//! #[kiln_sdk::function]
//! fn handle(text: String) -> Result<usize, String> {
//!     Ok(text.split_whitespace().filter(|w| !STOP_WORDS.contains(w)).count())
//! }
//! ```
//!
//! Randomness drawn during init is in the snapshot too, and so shared by every invocation: draw
//! per-invocation randomness in the function, or reseed in a [`restore`] hook. That includes
//! std's `HashMap` hashing keys, which are drawn once per thread: a map made at init fixes them
//! for every later `RandomState::new()` of the snapshot.
//!
//! # Also here
//!
//! - [`config`]: the function's configuration (`env` in its Kiln config) and its name.
//! - [`log`](mod@log) and the [`info!`], [`warn!`], [`error!`], [`debug!`] macros: structured (JSON
//!   lines) logs on stderr, which Kiln keeps with each invocation.
//! - [`http`] (feature `http`): HTTP-trigger functions over `wasi:http`, from the `wasi` crate.

#![warn(missing_docs)]
// The docs link to `http`, which exists only with its feature (docs.rs builds with all of them).
#![cfg_attr(not(feature = "http"), allow(rustdoc::broken_intra_doc_links))]

pub mod config;
mod entry;
#[cfg(feature = "http")]
pub mod http;
pub mod log;

pub use entry::{InitOutcome, EXIT_FAILED, EXIT_INVALID_INPUT, EXIT_INVALID_OUTPUT};

/// Makes a function the entry point of a Kiln function: reads its argument as JSON from stdin
/// (the request body), writes its `Ok` value as JSON on stdout (the response body).
///
/// The function takes one argument of a type that implements [`serde::Deserialize`] and returns
/// `Result<U, E>` where `U` implements [`serde::Serialize`] and `E` implements
/// [`std::fmt::Display`] (`String`, `anyhow::Error`, `Box<dyn Error>`, your own error type).
/// The macro writes `main`, so it goes in a binary crate (`src/main.rs`), once.
///
/// - An empty request body is read as JSON `null`: take `Option<T>` or `()` to accept it.
/// - A body that is not the expected JSON: the serde message on stderr, exit code
///   [`EXIT_INVALID_INPUT`].
/// - `Err(e)`: `e`'s text on stderr, exit code [`EXIT_FAILED`]. Kiln answers `502 function_failed`
///   with that text in the error body's stderr tail (components report any failure as exit 1).
/// - A panic aborts the instance: Kiln reports a trap, with the panic message from stderr.
///
/// ```no_run
/// #[kiln_sdk::function]
/// fn handle(numbers: Vec<i64>) -> Result<i64, String> {
///     numbers.iter().try_fold(0i64, |sum, n| sum.checked_add(*n)).ok_or_else(|| "overflow".into())
/// }
/// ```
pub use kiln_sdk_macros::function;

/// Marks the init hook: run once **at deploy** for a `wasm32-wasip1` module, whose memory Kiln
/// then snapshots, so every invocation starts with what the hook built.
///
/// The hook takes no arguments and returns `()` or `Result<(), E>` with `E: Display`. An `Err`,
/// a panic or a run past the function's `timeout_ms` fails the deploy (`422 invalid_code` with the
/// hook's stderr). It runs with the function's env and limits and an empty stdin; what it prints
/// on stdout is discarded.
///
/// It is exported as `wizer.initialize`, the name Kiln (and Wizer) look for. On `wasm32-wasip2`
/// Kiln takes no snapshot, so the hook runs when each instance starts instead, before the
/// function: the same program, without the speed-up. See the [crate docs](crate#state-built-at-init)
/// for how to keep what it builds.
///
/// ```no_run
/// use std::sync::OnceLock;
///
/// static PRIMES: OnceLock<Vec<u32>> = OnceLock::new();
///
/// fn sieve(limit: u32) -> Vec<u32> {
///     (2..limit).filter(|n| (2..*n).take_while(|d| d * d <= *n).all(|d| n % d != 0)).collect()
/// }
///
/// #[kiln_sdk::init]
/// fn init() {
///     PRIMES.get_or_init(|| sieve(1_000_000));
/// }
///
/// #[kiln_sdk::function]
/// fn handle(n: usize) -> Result<u32, String> {
///     let primes = PRIMES.get_or_init(|| sieve(1_000_000)); // already there after a snapshot
///     primes.get(n).copied().ok_or_else(|| format!("only {} primes known", primes.len()))
/// }
/// ```
pub use kiln_sdk_macros::init;

/// Marks the restore hook: run on every fresh instance of a snapshot, before the function
/// (exported as `kiln.restore`).
///
/// Use it to refresh what must not be shared by every invocation of a snapshot: reseed a random
/// generator (from the `getrandom` crate, which asks the host each time), forget a timestamp
/// taken at init. It takes no arguments and returns `()`. Only `wasm32-wasip1` modules have it;
/// components are never restored from a snapshot, so there it is not exported and never runs.
///
/// ```no_run
/// use std::sync::Mutex;
/// use std::time::SystemTime;
///
/// /// When this instance started: set at init, so wrong in every invocation until restored.
/// static STARTED: Mutex<Option<SystemTime>> = Mutex::new(None);
///
/// #[kiln_sdk::init]
/// fn init() {
///     *STARTED.lock().unwrap() = Some(SystemTime::now());
/// }
///
/// #[kiln_sdk::restore]
/// fn restore() {
///     *STARTED.lock().unwrap() = Some(SystemTime::now());
/// }
/// # #[kiln_sdk::function]
/// # fn handle(_: ()) -> Result<bool, String> { Ok(STARTED.lock().unwrap().is_some()) }
/// ```
pub use kiln_sdk_macros::restore;

/// What the macros expand to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::entry::{run_function, run_init, run_restore};
    pub use serde_json;
}

/// What the macros refuse, checked as doc tests (`cargo test`):
///
/// A handler named `main` (the macro writes `main`):
/// ```compile_fail
/// #[kiln_sdk::function]
/// fn main(input: String) -> Result<String, String> { Ok(input) }
/// ```
/// An async handler:
/// ```compile_fail
/// #[kiln_sdk::function]
/// async fn handle(input: String) -> Result<String, String> { Ok(input) }
/// ```
/// Arguments to the attribute:
/// ```compile_fail
/// #[kiln_sdk::init(fast)]
/// fn init() {}
/// # #[kiln_sdk::function] fn handle(_: ()) -> Result<(), String> { Ok(()) }
/// ```
/// A handler whose output cannot be serialised:
/// ```compile_fail
/// struct Opaque;
/// #[kiln_sdk::function]
/// fn handle(_: ()) -> Result<Opaque, String> { Ok(Opaque) }
/// ```
/// A restore hook that returns something:
/// ```compile_fail
/// #[kiln_sdk::restore]
/// fn restore() -> u32 { 1 }
/// # #[kiln_sdk::function] fn handle(_: ()) -> Result<(), String> { Ok(()) }
/// ```
#[cfg(doctest)]
pub struct MacroMisuse;
