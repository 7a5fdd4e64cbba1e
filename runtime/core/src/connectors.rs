//! Egress connectors: named network policies with their own lifecycle. An operator (the admin
//! token) creates one — the hosts it reaches, the private ranges it may reach them on, whether
//! UDP may leave — and functions and sandboxes reference it by name in their config
//! (`"connectors": ["payments-api"]`), alone or beside their own `allowed_hosts`.
//!
//! A connector never changes: to change a policy, create another and redeploy. So a function's
//! effective policy is settled when its version is loaded, and a connector cannot be deleted
//! while a function version or a live sandbox references it (the store checks both in the
//! transaction that deletes it, and every reference is written in the transaction that commits
//! the version or the sandbox, so neither can slip between).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::function::is_valid_function_name;
use crate::storage::{Metadata, StorageError};
use crate::tier::wasm::egress::{check_allowed_hosts, Rule};

/// Entries of `allowed_hosts` and of `allow_private`, each.
pub const MAX_ENTRIES: usize = 256;
/// Connectors one function or sandbox may reference.
pub const MAX_PER_CONFIG: usize = 16;

/// A connector as it is created (`POST /v1/connectors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectorSpec {
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64)]
    pub name: String,
    /// `scheme://host[:port]` entries, as a function's `allowed_hosts`.
    #[serde(default)]
    #[schema(value_type = Vec<crate::function::HostEntry>)]
    pub allowed_hosts: Vec<String>,
    /// Private, loopback or link-local ranges (CIDR, or a lone address) the hosts above may
    /// resolve to and still be reached; every other internal address stays refused.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub allow_private: Vec<IpNet>,
    /// Whether a microVM's datagrams may go to the same hosts and ports too (DNS is Kiln's own
    /// either way; Wasm guests have no UDP).
    #[serde(default)]
    pub udp: bool,
}

/// A stored connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connector {
    pub spec: ConnectorSpec,
    pub created_at: String,
}

/// Something that references a connector and keeps it from being deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ConnectorUse {
    Version { function: String, version: u32 },
    Sandbox { sandbox: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("{0}")]
    Invalid(String),
    #[error("no connector named `{0}`")]
    NotFound(String),
    #[error("a connector named `{0}` exists (connectors never change: create one with another name)")]
    Exists(String),
    #[error("connector `{name}` is in use by {}", describe(.uses))]
    InUse { name: String, uses: Vec<ConnectorUse> },
    #[error(transparent)]
    Store(#[from] StorageError),
}

fn describe(uses: &[ConnectorUse]) -> String {
    let mut shown: Vec<String> = uses
        .iter()
        .take(5)
        .map(|u| match u {
            ConnectorUse::Version { function, version } => format!("function `{function}` version {version}"),
            ConnectorUse::Sandbox { sandbox } => format!("sandbox {sandbox}"),
        })
        .collect();
    if uses.len() > 5 {
        shown.push(format!("{} more", uses.len() - 5));
    }
    shown.join(", ")
}

impl ConnectorSpec {
    /// Checks a new connector; the error text is shown to the user as is.
    pub fn check(&self) -> Result<(), String> {
        if !is_valid_function_name(&self.name) {
            return Err(format!(
                "connector name {:?} must be 1-64 of a-z, 0-9, '-' and '_', starting with a letter or digit",
                self.name
            ));
        }
        if self.allowed_hosts.len() > MAX_ENTRIES || self.allow_private.len() > MAX_ENTRIES {
            return Err(format!(
                "at most {MAX_ENTRIES} allowed_hosts and {MAX_ENTRIES} allow_private entries"
            ));
        }
        check_allowed_hosts(&self.allowed_hosts)?;
        for net in &self.allow_private {
            if net.network() != net.addr() {
                return Err(format!(
                    "allow_private entry {net} has host bits set: write {}",
                    net.trunc()
                ));
            }
            if !crate::tier::wasm::egress::is_internal(net.addr()) {
                return Err(format!(
                    "allow_private entry {net} is not a private range: public addresses need no permission"
                ));
            }
        }
        Ok(())
    }

    /// The connector's egress rules: its hosts, each reachable on its private ranges (and over
    /// UDP too when it says so).
    pub fn rules(&self) -> Vec<Rule> {
        let private: Arc<[IpNet]> = self.allow_private.clone().into();
        self.allowed_hosts
            .iter()
            .filter_map(|entry| Rule::parse(entry).ok())
            .map(|rule| rule.reaching(private.clone()).with_udp(self.udp))
            .collect()
    }
}

/// Checks a config's list of connector names (that they exist is the store's to say).
pub fn check_references(names: &[String]) -> Result<(), String> {
    if names.len() > MAX_PER_CONFIG {
        return Err(format!("at most {MAX_PER_CONFIG} connectors"));
    }
    for (i, name) in names.iter().enumerate() {
        if !is_valid_function_name(name) {
            return Err(format!("{name:?} is not a connector name"));
        }
        if names[..i].contains(name) {
            return Err(format!("connector `{name}` is named twice"));
        }
    }
    Ok(())
}

/// Whether `ip` is in one of `ranges`.
pub fn in_ranges(ranges: &[IpNet], ip: IpAddr) -> bool {
    ranges.iter().any(|net| net.contains(&ip))
}

/// Every connector, kept in memory (they are few and never change) over the store.
pub struct Connectors {
    metadata: Arc<dyn Metadata>,
    known: RwLock<HashMap<String, Arc<Connector>>>,
}

impl Connectors {
    /// Loads every stored connector. Blocking (the store).
    pub fn open(metadata: Arc<dyn Metadata>) -> Result<Connectors, StorageError> {
        let known = metadata
            .connectors()?
            .into_iter()
            .map(|c| (c.spec.name.clone(), Arc::new(c)))
            .collect();
        Ok(Connectors {
            metadata,
            known: RwLock::new(known),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Connector>> {
        self.known.read().expect("connectors lock poisoned").get(name).cloned()
    }

    /// Every connector, by name.
    pub fn list(&self) -> Vec<Arc<Connector>> {
        let mut all: Vec<_> = self
            .known
            .read()
            .expect("connectors lock poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        all
    }

    /// Checks that every name is a connector, for a config that references them.
    pub fn check_names(&self, names: &[String]) -> Result<(), String> {
        check_references(names)?;
        let known = self.known.read().expect("connectors lock poisoned");
        match names.iter().find(|name| !known.contains_key(name.as_str())) {
            Some(name) => Err(format!("no connector named `{name}`")),
            None => Ok(()),
        }
    }

    /// The egress rules of the named connectors (a name that is gone contributes nothing: a
    /// reference keeps its connector from being deleted, so that is a store edited by hand).
    pub fn rules(&self, names: &[String]) -> Vec<Rule> {
        names
            .iter()
            .filter_map(|name| self.get(name))
            .flat_map(|c| c.spec.rules())
            .collect()
    }

    /// Stores a new connector. Blocking (the store).
    pub fn create(&self, spec: ConnectorSpec) -> Result<Arc<Connector>, ConnectorError> {
        spec.check().map_err(ConnectorError::Invalid)?;
        let Some(created_at) = self.metadata.insert_connector(&spec)? else {
            return Err(ConnectorError::Exists(spec.name));
        };
        let connector = Arc::new(Connector { spec, created_at });
        self.known
            .write()
            .expect("connectors lock poisoned")
            .insert(connector.spec.name.clone(), connector.clone());
        Ok(connector)
    }

    /// What references a connector. Blocking (the store).
    pub fn uses(&self, name: &str) -> Result<Vec<ConnectorUse>, StorageError> {
        self.metadata.connector_uses(name)
    }

    /// Deletes an unused connector. Blocking (the store).
    pub fn delete(&self, name: &str) -> Result<(), ConnectorError> {
        match self.metadata.delete_connector(name)? {
            Deleted::Deleted => {
                self.known.write().expect("connectors lock poisoned").remove(name);
                Ok(())
            }
            Deleted::NotFound => Err(ConnectorError::NotFound(name.to_owned())),
            Deleted::InUse(uses) => Err(ConnectorError::InUse {
                name: name.to_owned(),
                uses,
            }),
        }
    }
}

/// What deleting a connector did.
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    NotFound,
    InUse(Vec<ConnectorUse>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<(), String> {
        serde_json::from_str::<ConnectorSpec>(json)
            .map_err(|e| e.to_string())?
            .check()
    }

    #[test]
    fn specs_are_checked() {
        assert_eq!(
            spec(
                r#"{"name": "payments-api", "allowed_hosts": ["https://api.example.com"], "allow_private": ["10.0.0.7/32", "fd00::/8"], "udp": false}"#
            ),
            Ok(())
        );
        assert_eq!(
            spec(r#"{"name": "lone", "allow_private": ["10.0.0.7"]}"#).map_err(|_| ()),
            Err(()),
            "a CIDR needs its prefix"
        );
        for (json, why) in [
            (r#"{"name": "Bad Name"}"#, "name"),
            (r#"{"name": "x", "allowed_hosts": ["ftp://x"]}"#, "scheme"),
            (r#"{"name": "x", "allow_private": ["10.0.0.7/8"]}"#, "host bits"),
            (r#"{"name": "x", "allow_private": ["8.8.8.0/24"]}"#, "a public range"),
            (
                r#"{"name": "x", "allow_private": ["10.0.0.0/33"]}"#,
                "a prefix too long",
            ),
            (r#"{"name": "x", "extra": 1}"#, "an unknown field"),
        ] {
            assert!(spec(json).is_err(), "{why}: {json}");
        }
    }

    #[test]
    fn rules_carry_their_private_ranges() {
        let spec: ConnectorSpec = serde_json::from_str(
            r#"{"name": "db", "allowed_hosts": ["http://db.internal:5432", "https://*.corp.example"], "allow_private": ["10.1.0.0/16"]}"#,
        )
        .unwrap();
        let rules = spec.rules();
        assert_eq!(rules.len(), 2);
        assert!(rules[0].allows(false, "db.internal", 5432));
        assert!(rules[0].may_reach("10.1.2.3".parse().unwrap()));
        assert!(!rules[0].may_reach("10.2.0.1".parse().unwrap()));
        assert!(!rules[0].may_reach("127.0.0.1".parse().unwrap()));
        assert!(
            rules[0].may_reach("93.184.216.34".parse().unwrap()),
            "public addresses need no range"
        );
    }
}
