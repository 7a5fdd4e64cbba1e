//! Integration tests: the real `kiln` binary over real sockets with real SQLite. One test binary
//! (one link) with a module per topic.

mod api;
mod asynchronous;
mod cli;
mod connections;
mod connectors;
mod console;
mod errors;
mod hardening;
mod hostile;
mod http_trigger;
mod identity;
mod lambda;
mod languages;
mod lifecycle;
mod limits;
mod microvm;
mod microvm_inside;
#[path = "../../../vmm/tests/support/musl.rs"]
mod musl;
mod openapi;
mod ops;
mod polyglot;
mod postgres;
mod s3;
mod sandboxes;
mod sdk;
mod snapshot;
mod support;
mod tls;
mod tokens;
