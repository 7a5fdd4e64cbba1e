//! The guest's network as it sees it, and the limits that bound what one guest can cost the host.

use std::net::Ipv4Addr;
use std::time::Duration;

/// One microVM's network.
///
/// The defaults are QEMU's user-mode network (guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3), which
/// guest images and their documentation already expect.
#[derive(Clone, Debug)]
pub struct Config {
    /// The guest's only address: packets from any other source are dropped.
    pub guest: Ipv4Addr,
    /// The guest's prefix length (its netmask), used to check the gateway and DNS are on-link.
    pub prefix_len: u8,
    /// The guest's default route. The stack answers for every address, so the gateway is just the
    /// address the guest sends everything to.
    pub gateway: Ipv4Addr,
    /// Kiln's resolver (port 53); the guest's resolv.conf names it.
    pub dns: Ipv4Addr,
    /// The largest IP packet either way, as configured on the guest's interface. It sets the MSS the
    /// stack announces, so TCP never needs fragments.
    pub mtu: usize,
    /// Open connections (including ones still connecting upstream) above which a new SYN is reset.
    /// Default 256: a guest that opens more is misbehaving or scanning.
    pub max_connections: usize,
    /// Each connection's buffer, each way. It is the TCP window the guest sees and the most a slow
    /// peer can make the host hold for one connection. Pages are touched only as data passes, so the
    /// resident cost is what is in flight, not this number. Default 256 KiB: enough for ~20 MB/s at
    /// 10 ms round trips; worst case 256 connections × 2 × 256 KiB = 128 MiB per VM.
    pub buffer_size: usize,
    /// How long the driver waits for the upstream connect before resetting the guest's connection.
    /// The guest's SYN waits unanswered meanwhile (its own SYN retries are longer than this).
    pub connect_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            guest: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            mtu: 1500,
            max_connections: 256,
            buffer_size: 256 * 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A configuration the stack cannot run with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the MTU must be between 576 and 65535 bytes, not {0}")]
    Mtu(usize),
    #[error("the prefix length must be between 8 and 30, not {0}")]
    PrefixLen(u8),
    #[error("{name} {addr} is not a unicast address in the guest's network {guest}/{prefix_len}")]
    OffLink {
        name: &'static str,
        addr: Ipv4Addr,
        guest: Ipv4Addr,
        prefix_len: u8,
    },
    #[error("the guest, gateway and DNS addresses must differ")]
    SameAddress,
    #[error("max_connections must be at least 1 and buffer_size at least 1 KiB")]
    Limits,
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(576..=65535).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        if !(8..=30).contains(&self.prefix_len) {
            return Err(ConfigError::PrefixLen(self.prefix_len));
        }
        let mask = u32::MAX << (32 - self.prefix_len);
        let network = u32::from(self.guest) & mask;
        for (name, addr) in [
            ("the guest", self.guest),
            ("the gateway", self.gateway),
            ("the DNS address", self.dns),
        ] {
            let host = u32::from(addr) & !mask;
            if u32::from(addr) & mask != network || host == 0 || host == !mask {
                return Err(ConfigError::OffLink {
                    name,
                    addr,
                    guest: self.guest,
                    prefix_len: self.prefix_len,
                });
            }
        }
        if self.guest == self.gateway || self.guest == self.dns || self.gateway == self.dns {
            return Err(ConfigError::SameAddress);
        }
        if self.max_connections == 0 || self.buffer_size < 1024 {
            return Err(ConfigError::Limits);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid_and_bad_ones_name_the_problem() {
        assert_eq!(Config::default().validate(), Ok(()));
        let bad = Config {
            mtu: 100,
            ..Config::default()
        };
        assert_eq!(bad.validate(), Err(ConfigError::Mtu(100)));
        let bad = Config {
            dns: Ipv4Addr::new(10, 0, 3, 3),
            ..Config::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::OffLink {
                name: "the DNS address",
                ..
            })
        ));
        let bad = Config {
            gateway: Ipv4Addr::new(10, 0, 2, 255),
            ..Config::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::OffLink {
                name: "the gateway",
                ..
            })
        ));
        let bad = Config {
            dns: Ipv4Addr::new(10, 0, 2, 2),
            ..Config::default()
        };
        assert_eq!(bad.validate(), Err(ConfigError::SameAddress));
    }
}
