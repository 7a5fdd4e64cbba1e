//! `--max-connections` against the open-file limit (`RLIMIT_NOFILE`), once at start-up.
//!
//! Every connection is a file descriptor, and so is everything else the server opens: the
//! database, compiled code, guests' outbound sockets, microVMs. Past the limit `accept` fails
//! with `EMFILE`, and so does opening the database or a guest's socket, so the connection cap must
//! fit inside the limit with room for the rest ([`reserve`]).
//!
//! The soft limit is raised toward the hard one as far as needed (any process may). When even the
//! hard limit is too low, the cap is lowered to what fits, with a warning that names both numbers
//! and how to raise the limit, rather than refusing to start: the default cap (10,000) is above
//! hard limits that are common (4,096), and a server that will not start on its defaults helps
//! no one, while a lowered cap still serves, evicting idle connections as it would at any cap.
//! Start-up fails only when the limit leaves room for almost no connections at all.

use crate::config::ServerConfig;

/// Fewer connections than this is no server: refuse to start.
const MIN_CONNECTIONS: u64 = 16;

/// File descriptors the server may need besides connections: a fixed allowance (database and its
/// journal, listener, epoll, the compiled-code cache, logs), one per guest instance (an outbound
/// socket or file each) and a few per microVM (KVM, vCPU, event and memory fds).
pub fn reserve(config: &ServerConfig) -> u64 {
    256 + u64::from(config.core.max_instances) + 8 * u64::from(config.core.microvm_max_vms)
}

#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// The soft limit is enough as it is.
    Enough,
    /// Raise the soft limit to this.
    Raise(u64),
    /// Raise the soft limit to the hard one and serve at most this many connections.
    Lower { soft: u64, connections: u64 },
    /// No room: refuse to start.
    TooLow,
}

/// `soft`/`hard`: the current limits, `None` for unlimited.
fn plan(connections: u64, reserve: u64, soft: Option<u64>, hard: Option<u64>) -> Plan {
    let needed = connections + reserve;
    if soft.is_none_or(|soft| soft >= needed) {
        return Plan::Enough;
    }
    match hard {
        Some(hard) if hard < needed => {
            let fits = hard.saturating_sub(reserve);
            if fits < MIN_CONNECTIONS {
                Plan::TooLow
            } else {
                Plan::Lower {
                    soft: hard,
                    connections: fits,
                }
            }
        }
        _ => Plan::Raise(needed),
    }
}

/// Raises the soft open-file limit as far as `config.max_connections` needs, or lowers
/// `max_connections` to what the hard limit allows; an error when it allows almost none.
pub fn fit(config: &mut ServerConfig) -> Result<(), String> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let reserve = reserve(config);
    let wanted = config.max_connections as u64;
    let set_soft = |soft: u64| {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(soft),
                maximum: limit.maximum,
            },
        )
    };
    let show = |limit: Option<u64>| limit.map_or("unlimited".to_owned(), |l| l.to_string());
    match plan(wanted, reserve, limit.current, limit.maximum) {
        Plan::Enough => Ok(()),
        Plan::Raise(soft) => match set_soft(soft) {
            Ok(()) => {
                tracing::info!(
                    "raised the open-file limit from {} to {soft} for --max-connections {wanted} (+{reserve} for the rest of the server)",
                    show(limit.current)
                );
                Ok(())
            }
            // Cannot happen below the hard limit; if it does, serve what the current limit fits.
            Err(e) => lower(
                config,
                limit.current.unwrap_or(0),
                reserve,
                &format!("raising it failed: {e}"),
            ),
        },
        Plan::Lower { soft, .. } => {
            let reached = if set_soft(soft).is_ok() {
                soft
            } else {
                limit.current.unwrap_or(0)
            };
            lower(
                config,
                reached,
                reserve,
                &format!("the hard limit is {}", show(limit.maximum)),
            )
        }
        Plan::TooLow => Err(format!(
            "the open-file limit (soft {}, hard {}) leaves no room for connections: the server needs {reserve} files \
             besides them; raise it (ulimit -n, systemd LimitNOFILE=)",
            show(limit.current),
            show(limit.maximum)
        )),
    }
}

fn lower(config: &mut ServerConfig, soft: u64, reserve: u64, why: &str) -> Result<(), String> {
    let fits = soft.saturating_sub(reserve);
    if fits < MIN_CONNECTIONS {
        return Err(format!(
            "the open-file limit ({soft}) leaves no room for connections: the server needs {reserve} files \
             besides them; raise it (ulimit -n, systemd LimitNOFILE=)"
        ));
    }
    tracing::warn!(
        "--max-connections {} needs {} open files but the limit is {soft} ({why}): serving at most {fits} connections; \
         raise the limit (ulimit -Hn, systemd LimitNOFILE=) to allow more",
        config.max_connections,
        config.max_connections as u64 + reserve,
    );
    config.max_connections = fits as usize;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_lower_or_refuse() {
        assert_eq!(plan(10_000, 500, Some(20_000), Some(20_000)), Plan::Enough);
        assert_eq!(plan(10_000, 500, None, None), Plan::Enough);
        assert_eq!(plan(10_000, 500, Some(1024), Some(524_288)), Plan::Raise(10_500));
        assert_eq!(plan(10_000, 500, Some(1024), None), Plan::Raise(10_500));
        assert_eq!(
            plan(10_000, 500, Some(1024), Some(4096)),
            Plan::Lower {
                soft: 4096,
                connections: 3596
            }
        );
        assert_eq!(plan(10_000, 500, Some(256), Some(510)), Plan::TooLow);
    }

    #[test]
    fn the_reserve_grows_with_instances_and_vms() {
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), "/nonexistent".into());
        config.core.max_instances = 1000;
        config.core.microvm_max_vms = 32;
        assert_eq!(reserve(&config), 256 + 1000 + 256);
    }
}
