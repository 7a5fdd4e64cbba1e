//! The in-memory map from function names to what runs them. Every function in the store has an
//! entry here (filled at start-up, kept in step by deploy and delete); each version's compiled code
//! is loaded and linked once, on first use or at deploy, and then shared by every invocation.
//!
//! Entries are immutable and replaced whole on deploy, so the invoke path takes no lock beyond one
//! shard read of the map.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::OnceCell;

use crate::function::VersionRecord;
use crate::permits::Limit;
use crate::tier::microvm::MicrovmFunction;
use crate::tier::wasm::WasmFunction;

/// What runs a loaded version, per tier.
pub enum Entry {
    Wasm(WasmFunction),
    /// A native executable's microVM snapshot.
    Microvm(Arc<MicrovmFunction>),
}

/// One version, loaded: everything an invocation needs, computed once.
pub struct LoadedFunction {
    pub record: VersionRecord,
    pub entry: Entry,
}

impl LoadedFunction {
    pub fn new(record: VersionRecord, entry: Entry) -> LoadedFunction {
        LoadedFunction { record, entry }
    }

    /// Whether this is an HTTP-trigger function (`wasi:http/proxy`).
    pub fn is_http(&self) -> bool {
        matches!(&self.entry, Entry::Wasm(f) if f.is_http())
    }
}

/// A function's concurrency limit (from its latest version's config) and the permits that
/// enforce it, shared by all its versions.
pub type Concurrency = Limit;

/// A function's versions known to this process.
#[derive(Clone)]
struct FunctionEntry {
    latest: u32,
    versions: HashMap<u32, Arc<Slot>>,
    concurrency: Arc<Concurrency>,
}

/// A version and, once loaded, its code.
pub struct Slot {
    pub record: VersionRecord,
    pub loaded: OnceCell<Arc<LoadedFunction>>,
}

#[derive(Default)]
pub struct Registry {
    functions: DashMap<String, Arc<FunctionEntry>>,
}

pub enum Lookup {
    Found(Arc<Slot>, Arc<Concurrency>),
    /// The function exists but this version is not in memory; the store may have it.
    NotLoaded(Arc<Concurrency>),
    NoFunction,
}

impl Registry {
    pub fn lookup(&self, name: &str, version: Option<u32>) -> Lookup {
        let Some(entry) = self.functions.get(name).map(|e| e.clone()) else {
            return Lookup::NoFunction;
        };
        match entry.versions.get(&version.unwrap_or(entry.latest)) {
            Some(slot) => Lookup::Found(slot.clone(), entry.concurrency.clone()),
            None => Lookup::NotLoaded(entry.concurrency.clone()),
        }
    }

    /// Makes `record` its function's latest version (creating the function if new), optionally
    /// already loaded. Deploy and start-up call it.
    pub fn install(&self, record: VersionRecord, loaded: Option<Arc<LoadedFunction>>) -> Arc<Slot> {
        let limit = record.config.max_concurrency;
        let version = record.version;
        let slot = Arc::new(Slot {
            record,
            loaded: OnceCell::new_with(loaded),
        });
        // `entry` holds the shard's write lock: concurrent updates of one function serialise here.
        let mut current = self.functions.entry(slot.record.name.clone()).or_insert_with(|| {
            Arc::new(FunctionEntry {
                latest: version,
                versions: HashMap::new(),
                concurrency: Arc::new(Concurrency::new(limit)),
            })
        });
        let mut entry = FunctionEntry::clone(&current);
        if entry.concurrency.limit() != limit {
            // A new limit applies to invocations that start from now on.
            entry.concurrency = Arc::new(Concurrency::new(limit));
        }
        entry.latest = version;
        entry.versions.insert(version, slot.clone());
        *current = Arc::new(entry);
        slot
    }

    /// Adds an older version loaded on demand. Does nothing if the function was deleted meanwhile
    /// (the slot still serves the invocation that asked for it).
    pub fn add_version(&self, record: VersionRecord) -> Arc<Slot> {
        let version = record.version;
        let slot = Arc::new(Slot {
            record,
            loaded: OnceCell::new(),
        });
        if let Some(mut current) = self.functions.get_mut(&slot.record.name) {
            if let Some(existing) = current.versions.get(&version) {
                return existing.clone();
            }
            let mut entry = FunctionEntry::clone(&current);
            entry.versions.insert(version, slot.clone());
            *current = Arc::new(entry);
        }
        slot
    }

    pub fn remove(&self, name: &str) {
        self.functions.remove(name);
    }

    /// Forgets every function (another node may have changed any of them).
    pub fn clear(&self) {
        self.functions.clear();
    }

    pub fn len(&self) -> usize {
        self.functions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::function::{ArtifactKind, FunctionConfig};

    fn record(name: &str, version: u32, max_concurrency: u32) -> VersionRecord {
        VersionRecord {
            name: name.into(),
            version,
            digest: Digest::of(format!("{name}@{version}").as_bytes()),
            code_digest: Digest::of(format!("{name}@{version}").as_bytes()),
            kind: ArtifactKind::Module,
            config: FunctionConfig {
                max_concurrency,
                ..FunctionConfig::default()
            },
            created_at: String::new(),
        }
    }

    fn found(lookup: Lookup) -> (Arc<Slot>, Arc<Concurrency>) {
        match lookup {
            Lookup::Found(slot, concurrency) => (slot, concurrency),
            Lookup::NotLoaded(_) => panic!("not loaded"),
            Lookup::NoFunction => panic!("no function"),
        }
    }

    #[test]
    fn install_makes_the_latest_and_keeps_older_versions_it_was_given() {
        let registry = Registry::default();
        assert!(matches!(registry.lookup("f", None), Lookup::NoFunction));
        registry.install(record("f", 1, 4), None);
        let (v1, limit) = found(registry.lookup("f", None));
        assert_eq!((v1.record.version, limit.limit()), (1, 4));
        assert!(v1.loaded.get().is_none(), "installed without code: loaded on first use");

        registry.install(record("f", 2, 4), None);
        let (latest, same_limit) = found(registry.lookup("f", None));
        assert_eq!(latest.record.version, 2);
        assert!(Arc::ptr_eq(&limit, &same_limit), "an unchanged limit keeps its permits");
        assert_eq!(found(registry.lookup("f", Some(1))).0.record.version, 1);
        assert!(matches!(registry.lookup("f", Some(7)), Lookup::NotLoaded(_)));

        // An older version loaded on demand joins the entry once.
        let seven = registry.add_version(record("f", 7, 4));
        assert!(Arc::ptr_eq(&seven, &registry.add_version(record("f", 7, 4))));
        assert_eq!(found(registry.lookup("f", Some(7))).0.record.version, 7);
        assert_eq!(
            found(registry.lookup("f", None)).0.record.version,
            2,
            "latest unchanged"
        );

        // A new limit applies from now on, with fresh permits.
        registry.install(record("f", 3, 9), None);
        let (_, new_limit) = found(registry.lookup("f", None));
        assert_eq!(new_limit.limit(), 9);
        assert!(!Arc::ptr_eq(&limit, &new_limit));

        registry.install(record("g", 1, 1), None);
        assert_eq!(registry.len(), 2);
        registry.remove("f");
        assert!(matches!(registry.lookup("f", None), Lookup::NoFunction));
        assert!(matches!(registry.lookup("f", Some(1)), Lookup::NoFunction));
        // A version loaded for an invocation racing the delete does not bring the function back.
        registry.add_version(record("f", 1, 4));
        assert!(matches!(registry.lookup("f", None), Lookup::NoFunction));
        assert_eq!(registry.len(), 1);
    }
}
