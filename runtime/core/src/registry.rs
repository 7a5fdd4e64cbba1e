//! The in-memory map from function names to what runs them. Every function in the store has an
//! entry here (filled at start-up, kept in step by deploy and delete); each version's compiled code
//! is loaded and linked once, on first use or at deploy, and then shared by every invocation.
//!
//! Entries are immutable and replaced whole on deploy, so the invoke path takes no lock beyond one
//! shard read of the map.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use http::HeaderValue;
use tokio::sync::{OnceCell, Semaphore};
use wasmtime::component::Linker as ComponentLinker;
use wasmtime::{Engine, ExternType, InstancePre, Linker, ModuleExport};
use wasmtime_wasi::p2::bindings::CommandPre;

use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::compile::Compiled;
use crate::egress::Egress;
use crate::invoke::{ComponentState, ModuleState};
use crate::store::VersionRecord;
use crate::validate::RESTORE_HOOK;

/// Linked, ready-to-instantiate code.
pub enum Entry {
    /// `start` and `restore` (the restore hook, called before `_start`) are looked up once here
    /// rather than by name on every invocation.
    Module {
        pre: InstancePre<ModuleState>,
        start: ModuleExport,
        restore: Option<ModuleExport>,
    },
    Component(CommandPre<ComponentState>),
    /// A `wasi:http/proxy` component, served at `/fn/{name}/...`.
    Http(ProxyPre<ComponentState>),
    /// A native executable's microVM snapshot (the microvm tier).
    Microvm(Arc<crate::microvm::MicrovmFunction>),
}

/// One version, loaded: everything an invocation needs, computed once.
pub struct LoadedFunction {
    pub record: VersionRecord,
    pub entry: Entry,
    pub args: [String; 1],
    pub env: Vec<(String, String)>,
    pub version_header: HeaderValue,
    pub egress: Egress,
}

/// The linkers every function is linked against: WASI preview 1 for modules, WASI 0.2 for
/// components. Built once; nothing else is ever linked in (deny by default).
pub struct Linkers {
    module: Linker<ModuleState>,
    component: ComponentLinker<ComponentState>,
}

impl Linkers {
    pub fn new(engine: &Engine) -> wasmtime::Result<Linkers> {
        let mut module = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module, |s: &mut ModuleState| &mut s.wasi)?;
        let mut component = ComponentLinker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component)?;
        // Components may make outbound requests; `egress` decides where they may go.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component)?;
        Ok(Linkers { module, component })
    }

    pub fn module(&self) -> &Linker<ModuleState> {
        &self.module
    }

    /// Resolves a compiled artifact's imports. Fails (with the missing import's name) when the code
    /// needs something Kiln does not provide.
    pub fn link(&self, compiled: &Compiled) -> Result<Entry, String> {
        match compiled {
            Compiled::Module(module) => {
                let restore = match module.get_export(RESTORE_HOOK) {
                    None => None,
                    Some(ExternType::Func(ty)) if ty.params().len() == 0 && ty.results().len() == 0 => {
                        module.get_export_index(RESTORE_HOOK)
                    }
                    Some(_) => {
                        return Err(format!(
                            "`{RESTORE_HOOK}` must be a function with no parameters and no results"
                        ))
                    }
                };
                let start = match (module.get_export("_start"), module.get_export_index("_start")) {
                    (Some(ExternType::Func(ty)), Some(start)) if ty.params().len() == 0 && ty.results().len() == 0 => {
                        start
                    }
                    _ => {
                        return Err(
                            "the module must export `_start` as a function with no parameters and no results".into(),
                        )
                    }
                };
                let pre = self.module.instantiate_pre(module).map_err(|e| format!("{e:#}"))?;
                Ok(Entry::Module { pre, start, restore })
            }
            Compiled::Component(component) => {
                let pre = self
                    .component
                    .instantiate_pre(component)
                    .map_err(|e| format!("{e:#}"))?;
                // A component exporting the incoming handler is an HTTP trigger, even when (built
                // with Rust's std) it also exports `wasi:cli/run`.
                if let Ok(proxy) = ProxyPre::new(pre.clone()) {
                    return Ok(Entry::Http(proxy));
                }
                CommandPre::new(pre).map(Entry::Component).map_err(|e| format!("{e:#}"))
            }
        }
    }
}

/// A function's versions known to this process.
#[derive(Clone)]
struct FunctionEntry {
    latest: u32,
    versions: HashMap<u32, Arc<Slot>>,
    concurrency: Arc<Concurrency>,
}

/// A function's concurrency limit (from its latest version's config) and the permits that enforce
/// it, shared by all its versions.
pub struct Concurrency {
    pub permits: Semaphore,
    pub limit: u32,
}

impl Concurrency {
    fn new(limit: u32) -> Arc<Concurrency> {
        Arc::new(Concurrency {
            permits: Semaphore::new(limit as usize),
            limit,
        })
    }
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
                concurrency: Concurrency::new(limit),
            })
        });
        let mut entry = FunctionEntry::clone(&current);
        if entry.concurrency.limit != limit {
            // A new limit applies to invocations that start from now on.
            entry.concurrency = Concurrency::new(limit);
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

    pub fn len(&self) -> usize {
        self.functions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }
}

impl LoadedFunction {
    pub fn new(record: VersionRecord, entry: Entry) -> LoadedFunction {
        LoadedFunction {
            args: [record.name.clone()],
            env: record.config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            version_header: HeaderValue::from(record.version),
            // The config was validated at deploy; a stored entry that no longer parses allows nothing.
            egress: Egress::new(&record.config.allowed_hosts).unwrap_or_default(),
            entry,
            record,
        }
    }
}
