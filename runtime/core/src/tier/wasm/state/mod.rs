//! The state of a live component instance, saved and put back: what a Wasm **sandbox** (one
//! long-lived instance of a `wasi:http/proxy` function, issue 17) needs to suspend to disk and
//! resume later with what it kept in memory.
//!
//! wasmtime's API gives no access to a component's core instances, so the component is
//! *instrumented* first: [`instrument`] adds an exported instance, [`ACCESS_INSTANCE`], whose
//! functions read and write every memory, mutable global and table size of every core instance
//! (see `instrument.rs` for how). The instrumented component is an ordinary component: it
//! validates, Kiln's linker accepts it (`link::Linkers::link` gives `Code::Http` for a proxy) and
//! it serves requests exactly as the original does.
//!
//! # Use
//!
//! ```text
//! create   let Instrumented { component, layout } = instrument(&original)?;   // once per version
//!          compile `component` (this is the code sandboxes run), keep `layout` beside it
//!          instantiate: pre.instance_pre().instantiate_async(&mut store) -> Instance,
//!          then Proxy::new(&mut store, &instance) for the handler
//! suspend  (no request in flight, the guest's handles all dropped)
//!          let state = capture(&mut store, &instance, &layout).await?;
//!          write state.encode() to disk; drop the store (frees the instance and its pool slot)
//! resume   let state = InstanceState::decode(&std::fs::read(path)?)?;
//!          a fresh store (instance::Guest::store) and instance, then, before any request:
//!          restore(&mut store, &instance, &layout, &state).await?;
//! ```
//!
//! # Rules
//!
//! - [`capture`] refuses, naming what is held, while the store's resource table holds anything
//!   (a stream, a pollable, a request or response): a snapshot must not refer to host objects.
//!   In a `wasi:http` instance the table is empty once the handler has returned and the guest
//!   has dropped its handles. It also refuses a table whose size changed since instantiation.
//!   `capture` does not change the instance: it may go on serving (fork = capture + N restores).
//! - [`restore`] must get a *fresh* instance of the same instrumented component: instantiated,
//!   nothing else called. It does not clear pages the state has as zeros where a fresh instance
//!   has zeros too; an instance that ran first could keep stale bytes there. It refuses a state
//!   of another component ([`Layout::fingerprint`], checked against the state and against the
//!   instance itself) and a state that does not fit the store's memory limit. On an error the
//!   instance is half-written: drop it.
//! - Both run guest code (the accessors: no loops, a few µs each), so the store's epoch deadline
//!   must not have passed; a long-lived sandbox store should be re-armed before calling them.
//! - The store must have the instance's limits (`instance::Guest::store`): the restored memory
//!   grows under the store's limiter and counts against `memory_mb` like any growth.
//! - [`instrument`] is deterministic: the same component gives the same bytes and layout, so a
//!   layout can be recomputed from the component rather than stored. Instrumenting a ~100 KB
//!   component takes well under a millisecond plus two validations.
//!
//! # What is captured, and what is not
//!
//! Every memory (whole, zero pages skipped), every mutable global (bit-exact, floats and `v128`
//! included) and every table's size, of every core instance of a module defined at the top level
//! of the component. Not captured, hence refused where it could matter: components defining
//! resource types (their handles live in the runtime's tables; refused by [`instrument`]); core
//! modules in nested components, start functions, imported or aliased modules (refused by
//! [`instrument`]); tables that grew (refused by [`capture`]). Not detected: a `table.set` that
//! replaced a function reference in place — no toolchain Kiln supports emits one after
//! instantiation, and the accessors cannot compare function references.
//!
//! The instrumented component has one more core instance than the original (the accessor
//! module's, with no memory or table of its own): its `Footprint` may weigh one permit more.
//!
//! # Costs (4 MiB of non-zero state, release build; see benches/src/bin/sandbox_state.rs)
//!
//! `capture` is one pass over each memory to find non-zero pages and one copy of them into the
//! encoded buffer, each 64 KiB hashed while it is in the cache (the checksum is of those hashes,
//! which `sandboxes::saved` reuses to find what changed): about a millisecond per 4 MiB.
//! `restore` checks the checksum when decoding, then copies the runs into the fresh instance's
//! memory, which faults each page in: that page-fault cost dominates, and is the host's, so the
//! buffers and the memory are advised huge pages first ([`huge`]). Zero pages cost neither time
//! nor disk.
//! Each accessor call costs a few µs (a fiber switch); a restore makes `2 × runs` of them.

mod access;
mod format;
pub mod huge;
mod instrument;
#[cfg(test)]
mod tests;

use std::ops::Range;

pub use self::access::{capture, restore};
pub use self::format::{checksum, Checksum, GlobalValue, InstanceState, SUMMED};
pub use self::instrument::{instrument, Instrumented, ACCESS_INSTANCE};

/// Why state could not be instrumented, captured, restored or read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not a valid component (`instrument`).
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component or its current state holds something that cannot be saved.
    #[error("cannot snapshot this instance: {0}")]
    Unsupported(String),
    /// Host resources are held (`capture`): wait until the instance is quiescent.
    #[error("the instance is not quiescent: {0}")]
    NotQuiescent(String),
    /// The state, the layout and the instance do not belong together (`restore`).
    #[error("state mismatch: {0}")]
    Mismatch(String),
    /// The encoded state is damaged or not a state at all (`InstanceState::decode`).
    #[error("corrupt instance state: {0}")]
    Corrupt(String),
    /// An accessor call failed: a trap, the memory limit, the deadline.
    #[error("{0}")]
    Guest(String),
}

/// Where an instrumented component's state is: what [`capture`] reads and [`restore`] writes, in
/// this order. Built by [`instrument`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    fingerprint: [u8; 32],
    memories: Vec<MemorySlot>,
    globals: Vec<GlobalSlot>,
    tables: Vec<TableSlot>,
}

impl Layout {
    /// SHA-256 of the original component and of the instrumentation scheme. A state restores only
    /// into instances of a component with the same fingerprint.
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    /// What the accessors report to prove which component they are in.
    fn short_fingerprint(&self) -> u64 {
        u64::from_le_bytes(self.fingerprint[..8].try_into().expect("8 bytes"))
    }

    pub fn memories(&self) -> &[MemorySlot] {
        &self.memories
    }

    pub fn globals(&self) -> &[GlobalSlot] {
        &self.globals
    }

    pub fn tables(&self) -> &[TableSlot] {
        &self.tables
    }
}

/// A memory: which core instance (its index in the component) and module define it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySlot {
    pub core_instance: u32,
    pub module: u32,
    /// Its index in the module's memory index space.
    pub index: u32,
    pub initial_pages: u64,
    /// Where a fresh instance's memory may be non-zero.
    pub fresh: FreshImage,
}

/// Which bytes of a memory a freshly instantiated component may have made non-zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreshImage {
    /// Only these (4 KiB-aligned) byte ranges: those of the module's active data segments.
    Pages(Vec<Range<u64>>),
    /// Anything up to the memory's size at instantiation (a start function runs, a segment's
    /// offset is not a constant, or another module's segments write this memory).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalSlot {
    pub core_instance: u32,
    pub module: u32,
    pub index: u32,
    pub kind: GlobalKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalKind {
    I32,
    I64,
    F32,
    F64,
    V128,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSlot {
    pub core_instance: u32,
    pub module: u32,
    pub index: u32,
    /// Its size in a fresh instance: a capture refuses any other.
    pub initial: u64,
}
