//! Kiln's core: a self-hosted serverless function runtime without its network edge. Functions are
//! deployed (validated, stored content-addressed, compiled or booted and snapshotted, versioned)
//! and invoked on one of two isolation tiers — WebAssembly instances from a pooling allocator, or
//! KVM microVMs restored from a snapshot — synchronously or through a durable queue.
//!
//! This crate knows no HTTP server, client or status code: `kiln-server` is the only place where
//! requests are parsed and errors become statuses ([`problem`] is the vocabulary they share).
//!
//! The modules follow a function's life:
//! - [`function`]: a function's config, its kind of code, the rule for names;
//! - [`deploy`]: the stages of a deploy, written once over [`tier::Tier`];
//! - [`functions`] and [`registry`]: deployed functions, loaded once and shared;
//! - [`tier`]: the Wasm and microVM tiers behind one interface; [`permits`]: admission;
//! - [`outcome`] and [`problem`]: how an invocation ends, and how errors are told;
//! - [`invocations`]: asynchronous invocations (the durable queue);
//! - [`sandboxes`]: long-lived instances — create, ingress, suspend, resume, fork, terminate;
//! - [`lambda`]: Lambda's handler conventions on functions from source;
//! - [`connectors`]: named egress policies functions and sandboxes reference;
//! - [`auth`] (tokens) and [`signing`] (result URLs), on an injectable [`clock`];
//! - [`identity`]: signed tokens that tell other services which sandbox or invocation calls them;
//! - [`telemetry`]: metrics, the one log line per invocation, kept invocation logs;
//! - [`storage`]: metadata and blobs behind small interfaces (SQLite and the local disk today);
//! - [`cluster`]: the nodes sharing a database, by their heartbeats;
//! - [`kiln`]: all of it, built once at start-up.

pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connectors;
pub mod deploy;
pub mod digest;
pub mod function;
pub mod functions;
pub mod identity;
pub mod invocations;
pub mod json;
pub mod kiln;
pub mod lambda;
pub mod outcome;
pub mod permits;
pub mod problem;
pub mod registry;
pub mod sandboxes;
pub mod signing;
pub mod storage;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tier;

pub use kiln::Kiln;
