//! TODO
mod config;
mod device;
mod network;
mod packet;
mod stack;

pub use config::{Config, ConfigError};
pub use network::Network;
pub use stack::{ConnId, Connection, ConnectionError, Decision, DnsQuery, Event, Policy, Stack, Stats};
