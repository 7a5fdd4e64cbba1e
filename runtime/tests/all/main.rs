//! Integration tests: the real `kiln` binary over real sockets with real SQLite. One test binary
//! (one link) with a module per topic.

mod api;
mod asynchronous;
mod cli;
mod errors;
mod hostile;
mod lifecycle;
mod limits;
mod openapi;
mod ops;
mod snapshot;
mod support;
mod tokens;
