//! Kiln's benchmark harness as a library, shared by the binaries in `src/bin`, the criterion
//! micro-bench and the smoke test that CI runs:
//!
//! - `record`: one measurement as a JSON line, the format every tool of a run appends to;
//! - `load`: a keep-alive HTTP/1.1 load generator on hyper (round-robin over many paths, full
//!   latency distribution) for the scenarios `wrk` cannot drive;
//! - `report`: a run's records turned into the results JSON, the Markdown table and the SVG plot,
//!   with the ratios SPECIFICATION.md promises;
//! - `guests`: generated modules, each one distinct so that every deploy compiles;
//! - `inproc`: one invocation in process, through Kiln and through raw wasmtime;
//! - `serve`: the accept loop of the bench's own HTTP servers.
//!
//! `benches/run.sh` orchestrates: it starts the servers, runs `wrk` and the binaries, and calls
//! `report` at the end.

pub mod guests;
pub mod inproc;
pub mod load;
pub mod record;
pub mod report;
pub mod serve;
mod svg;
