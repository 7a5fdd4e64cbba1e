//! Kiln: a self-hosted serverless function runtime. Functions (WebAssembly modules and components)
//! are deployed over HTTP, compiled ahead of time for this CPU, and invoked in fresh instances from
//! a pooling allocator.
//!
//! The modules follow a request's path: `server` accepts connections, `api` routes and shapes
//! answers, `auth` checks tokens; `deploy` runs `validate` → `compile` → `store` → `registry`;
//! `invoke` runs a guest under `limits` in an instance from the `pool`. `app` holds it all.

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod compile;
pub mod config;
pub mod deploy;
pub mod egress;
pub mod invoke;
pub mod jobs;
pub mod limits;
pub mod log_output;
pub mod logs;
pub mod metrics;
pub mod microvm;
pub mod observe;
pub mod pool;
pub mod registry;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod signing;
pub mod snapshot;
pub mod store;
pub mod trigger;
pub mod validate;
