//! Integration tests: the real `kiln` binary over real sockets with real SQLite. One test binary
//! (one link) with a module per topic.

mod api;
mod asynchronous;
mod errors;
mod hostile;
mod lifecycle;
mod limits;
mod microvm;
mod snapshot;
mod support;
