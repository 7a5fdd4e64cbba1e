//! Durable state, behind two small interfaces so that other engines can stand in for today's:
//!
//! - [`Metadata`]: functions, versions, tokens, and the read side of invocation records and logs.
//!   Today [`sqlite::Sqlite`] (WAL, `synchronous=FULL`). A version row is the commit point of a
//!   deploy: it is written last, in one transaction, after every blob it names is durable.
//! - [`Blobs`]: content-addressed bytes — uploaded artifacts, large async results and suspended
//!   sandboxes' states. [`local::LocalBlobs`], files under the data directory (or a directory
//!   nodes share), or [`s3::S3Blobs`], an S3 bucket with a cache in the data directory.
//!
//! Two writers are components of their own, each on its own connection, because their whole
//! design is group commit: the async queue's ledger (`invocations::ledger`, or
//! `invocations::leases` on PostgreSQL) and the invocation-log writer
//! (`telemetry::invocation_logs`). [`Database`] says which engine they all use: a SQLite file
//! (the default), or PostgreSQL shared by several nodes ([`postgres`]).
//!
//! Calls block on disk; async callers run them on the blocking pool.

pub mod budget;
pub mod local;
pub mod postgres;
pub mod s3;
pub mod seal;
pub mod sqlite;
mod tokens;

use std::collections::HashSet;

pub use local::{Layout, LocalBlobs};
pub use sqlite::Sqlite;
pub use tokens::TokenRow;

use crate::connectors::{Connector, ConnectorSpec, ConnectorUse, Deleted};
use crate::digest::Digest;
use crate::function::{ArtifactKind, FunctionConfig, VersionRecord};
use crate::invocations::{Query as InvocationQuery, Record, Summary as InvocationSummary};
use crate::sandboxes::record::{Sandbox, SandboxToken, State as SandboxState};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// The database was migrated by a newer Kiln; this one would misread it.
    #[error("the database's schema is version {found}, newer than this Kiln knows ({known}): upgrade this node")]
    NewerSchema { found: i64, known: i64 },
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// A version or sandbox names a connector that does not exist.
    #[error("no connector named `{0}`")]
    UnknownConnector(String),
}

impl StorageError {
    /// Whether the database could not be reached — down, restarting, shutting connections, the
    /// network — rather than refusing a statement: a client may try again; not Kiln's bug.
    pub fn is_unreachable(&self) -> bool {
        let StorageError::Postgres(e) = self else {
            return false;
        };
        // SQLSTATE classes 08 (connection exception) and 57 (operator intervention: a shutdown).
        let class = e.code().map(|code| &code.code()[..2]);
        e.is_closed()
            || matches!(class, Some("08" | "57"))
            || std::error::Error::source(e).is_some_and(|cause| cause.is::<std::io::Error>())
    }
}

/// What releasing a sandbox state did.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// A sandbox points at it: kept.
    InUse,
    /// Not registered (a state saved whole, before states had chunks): its blob alone may go.
    Unregistered,
    /// Forgotten; these chunks are in no other state.
    Released { orphans: Vec<Digest> },
}

/// A sandbox state as the store keeps it (`sandboxes::saved`): its digest, its manifest, and the
/// chunks the manifest lists (whose blobs must stay while it does).
pub struct StateRecord<'a> {
    pub digest: &'a Digest,
    pub manifest: &'a [u8],
    pub chunks: &'a [Digest],
}

/// How far a write has reached when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On stable storage (fsync): kept through a power loss.
    Disk,
    /// Committed — atomic, seen by every reader, kept if Kiln crashes — and on stable storage
    /// with the next `Disk` write; a power loss before that may roll it back to the last `Disk`
    /// write. For steps whose loss recovery handles the same way as the step before them.
    Process,
}

/// Functions, versions, tokens and invocation records.
pub trait Metadata: Send + Sync {
    /// Commits a new version unless the latest one already has this digest and config, in which
    /// case that one is returned with `created = false`. Atomic: two identical deploys racing
    /// each other produce one version.
    fn commit_version(
        &self,
        name: &str,
        digest: &Digest,
        code_digest: &Digest,
        kind: ArtifactKind,
        config: &FunctionConfig,
    ) -> Result<(VersionRecord, bool), StorageError>;
    fn latest(&self, name: &str) -> Result<Option<VersionRecord>, StorageError>;
    fn version(&self, name: &str, version: u32) -> Result<Option<VersionRecord>, StorageError>;
    /// Every version of a function, oldest first; empty when there is no such function.
    fn versions(&self, name: &str) -> Result<Vec<VersionRecord>, StorageError>;
    /// The latest version of every function, ordered by name.
    fn all_latest(&self) -> Result<Vec<VersionRecord>, StorageError>;
    /// Deletes a function and its versions. `None` if there was no such function, else the digests
    /// its versions used that no other version references any more.
    fn delete_function(&self, name: &str) -> Result<Option<Vec<Digest>>, StorageError>;
    /// Every digest some version references (for sweeping unreferenced files at start-up).
    fn referenced_digests(&self) -> Result<HashSet<String>, StorageError>;

    /// Sets the hash of a token with a fixed id (the admin token).
    fn put_token_hash(&self, id: &str, hash: &[u8], scope: &str) -> Result<(), StorageError>;
    /// Adds a token; returns its creation time.
    fn insert_token(&self, id: &str, hash: &[u8], scope: &str) -> Result<String, StorageError>;
    /// Deletes a non-admin token; false when there was none with this id.
    fn delete_token(&self, id: &str) -> Result<bool, StorageError>;
    /// Every token but the admin token, oldest first.
    fn scoped_tokens(&self) -> Result<Vec<TokenRow>, StorageError>;

    /// An asynchronous invocation's record.
    fn invocation(&self, id: &str) -> Result<Option<Record>, StorageError>;
    /// Where a succeeded asynchronous invocation's output is.
    fn invocation_result(&self, id: &str) -> Result<Option<StoredResult>, StorageError>;
    /// The kept log (stderr tail) of an invocation: a synchronous one's entry, else an
    /// asynchronous one's record.
    fn invocation_log(&self, id: &str) -> Result<Option<String>, StorageError>;
    /// The function an invocation (sync or async) belongs to, if it is known.
    fn invocation_function(&self, id: &str) -> Result<Option<String>, StorageError>;
    /// Writes this node's heartbeat row, and forgets nodes silent for `cluster::FORGOTTEN`.
    fn heartbeat(&self, node: &crate::cluster::Node) -> Result<(), StorageError>;
    /// Every node with a heartbeat row, by id.
    fn nodes(&self) -> Result<Vec<crate::cluster::Node>, StorageError>;
    /// Invocations with a kept record, newest first: every asynchronous one, and the synchronous
    /// ones with a kept log (failures, and successes that wrote to stderr).
    fn invocations(&self, query: &InvocationQuery) -> Result<Vec<InvocationSummary>, StorageError>;

    /// Adds a sandbox's record; if its idempotency key was used before, adds nothing and returns
    /// the id of the sandbox that used it.
    fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<Option<String>, StorageError>;
    /// Writes a sandbox's state, clocks and suspend point (its settings never change), as far as
    /// `durability` says.
    fn update_sandbox(&self, sandbox: &Sandbox, durability: Durability) -> Result<(), StorageError>;
    fn sandbox(&self, id: &str) -> Result<Option<Sandbox>, StorageError>;
    /// Sandboxes, oldest first, optionally of one function and in one state.
    fn sandboxes(&self, function: Option<&str>, state: Option<SandboxState>) -> Result<Vec<Sandbox>, StorageError>;
    /// Records a state (its manifest) and the chunks it is made of, so that their blobs are kept
    /// while it is; registering a state again changes nothing. On disk with the next `Disk`
    /// write (the one that points a sandbox at it).
    fn register_sandbox_state(&self, state: &StateRecord<'_>) -> Result<(), StorageError>;
    /// Registers `state` and writes `sandbox` (which points at it), in one transaction, on disk
    /// when it returns: a suspend's commit point.
    fn update_sandbox_with_state(&self, sandbox: &Sandbox, state: &StateRecord<'_>) -> Result<(), StorageError>;
    /// The manifest of a registered state, if it was registered with one (states saved before
    /// manifests were kept in the store have theirs in a blob).
    fn sandbox_state_manifest(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StorageError>;
    /// Forgets the state `digest` unless a sandbox points at it, and says which chunks no state
    /// lists any more (their blobs may go).
    fn release_sandbox_state(&self, digest: &Digest) -> Result<Released, StorageError>;
    /// Registered states no sandbox points at: what a crash between a save and its commit left.
    fn unreferenced_sandbox_states(&self) -> Result<Vec<Digest>, StorageError>;
    /// Every state blob something needs (registered, or pointed at by a sandbox: a state saved
    /// whole) and every chunk a registered state lists: what a sweep of the blobs keeps.
    fn kept_sandbox_blobs(&self) -> Result<(HashSet<Digest>, HashSet<Digest>), StorageError>;
    fn insert_sandbox_token(&self, hash: &[u8], token: &SandboxToken) -> Result<(), StorageError>;
    /// Every sandbox token, by the SHA-256 of its secret.
    fn sandbox_tokens(&self) -> Result<Vec<(Vec<u8>, SandboxToken)>, StorageError>;
    fn delete_sandbox_tokens(&self, sandbox: &str) -> Result<(), StorageError>;

    /// Stores a new egress connector: its creation time, or `None` if the name is taken.
    fn insert_connector(&self, spec: &ConnectorSpec) -> Result<Option<String>, StorageError>;
    /// Every connector.
    fn connectors(&self) -> Result<Vec<Connector>, StorageError>;
    /// The function versions and live sandboxes that reference a connector.
    fn connector_uses(&self, name: &str) -> Result<Vec<ConnectorUse>, StorageError>;
    /// Deletes a connector nothing live references, in one transaction with the check.
    fn delete_connector(&self, name: &str) -> Result<Deleted, StorageError>;
}

/// Where metadata, the async queue and the invocation logs live.
#[derive(Clone)]
pub enum Database {
    /// A file, this node's alone (the default: `kiln.db` in the data directory).
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database several nodes share.
    Postgres(std::sync::Arc<postgres::Pool>),
}

/// What a blob is, which is also its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// An uploaded artifact (or an init hook's snapshot of one).
    Artifact,
    /// An asynchronous invocation's output too large for its record.
    Result,
    /// A suspended sandbox's state: the manifest of its chunks (`sandboxes::saved`).
    SandboxState,
    /// A piece of one or more sandbox states. Named by its SHA-256 within its function
    /// (`Digest::scoped`), so a store cannot check it: the reader does (`sandboxes::saved`).
    SandboxChunk,
    /// Compiled code a node published for the other nodes of its cluster with the same engine
    /// and CPU: its seal, then the code (`tier::wasm::compile`). Named by the engine key and the
    /// artifact's digest, not by its content: the reader checks its seal.
    Compiled,
}

impl BlobKind {
    /// Whether the name is the SHA-256 of the content, which a store can check; the reader checks
    /// the others.
    pub fn content_addressed(self) -> bool {
        !matches!(self, BlobKind::SandboxChunk | BlobKind::Compiled)
    }
}

/// Content-addressed bytes.
pub trait Blobs: Send + Sync {
    /// Stores `bytes` under `digest`, durably and whole or not at all; nothing if already there.
    fn put(&self, kind: BlobKind, digest: &Digest, bytes: &[u8]) -> std::io::Result<()>;
    /// Stores several blobs as `put` does, in order: all durable when it returns (a store may
    /// batch what it syncs).
    fn put_all(&self, blobs: &[(BlobKind, &Digest, &[u8])]) -> std::io::Result<()> {
        blobs
            .iter()
            .try_for_each(|(kind, digest, bytes)| self.put(*kind, digest, bytes))
    }
    fn get(&self, kind: BlobKind, digest: &Digest) -> std::io::Result<Vec<u8>>;
    /// The blob as an open file, to stream it rather than hold it whole in memory.
    fn open(&self, kind: BlobKind, digest: &Digest) -> std::io::Result<std::fs::File>;
    fn exists(&self, kind: BlobKind, digest: &Digest) -> bool;
    /// Removes a blob; removing one that is not there is not an error.
    fn remove(&self, kind: BlobKind, digest: &Digest) -> std::io::Result<()>;
    fn list(&self, kind: BlobKind) -> std::io::Result<Vec<Digest>>;
    /// Whether what `get` and `open` return may differ from what was put: a store on another
    /// host. It checks every blob it can against its digest; readers check the rest.
    fn remote(&self) -> bool {
        false
    }
}

/// Where a succeeded asynchronous invocation's output is kept.
#[derive(Debug, PartialEq, Eq)]
pub enum StoredResult {
    Inline(Vec<u8>),
    Blob(Digest),
}

/// The data directory's two stores, as the rest of the core uses them, and the budget new data
/// must fit.
pub struct Storage {
    pub layout: Layout,
    pub metadata: std::sync::Arc<dyn Metadata>,
    pub blobs: std::sync::Arc<dyn Blobs>,
    pub budget: std::sync::Arc<budget::DiskBudget>,
}
