//! Durable state, behind two small interfaces so that other engines can stand in for today's:
//!
//! - [`Metadata`]: functions, versions, tokens, and the read side of invocation records and logs.
//!   Today [`sqlite::Sqlite`] (WAL, `synchronous=FULL`). A version row is the commit point of a
//!   deploy: it is written last, in one transaction, after every blob it names is durable.
//! - [`Blobs`]: content-addressed bytes — uploaded artifacts and large async results. Today
//!   [`local::LocalBlobs`], files under the data directory.
//!
//! Two writers stay SQLite components of their own, each on its own connection, because their
//! whole design is SQLite's group commit: the async queue's ledger (`invocations::ledger`) and
//! the invocation-log writer (`telemetry::invocation_logs`). A server on another database brings
//! its own queue and log writer beside its `Metadata`.
//!
//! Calls block on disk; async callers run them on the blocking pool.

pub mod budget;
pub mod local;
pub mod seal;
pub mod sqlite;
mod tokens;

use std::collections::HashSet;

pub use local::{Layout, LocalBlobs};
pub use sqlite::Sqlite;
pub use tokens::TokenRow;

use crate::digest::Digest;
use crate::function::{ArtifactKind, FunctionConfig, VersionRecord};
use crate::invocations::Record;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
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
}

/// What a blob is, which is also its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// An uploaded artifact (or an init hook's snapshot of one).
    Artifact,
    /// An asynchronous invocation's output too large for its record.
    Result,
}

/// Content-addressed bytes.
pub trait Blobs: Send + Sync {
    /// Stores `bytes` under `digest`, durably and whole or not at all; nothing if already there.
    fn put(&self, kind: BlobKind, digest: &Digest, bytes: &[u8]) -> std::io::Result<()>;
    fn get(&self, kind: BlobKind, digest: &Digest) -> std::io::Result<Vec<u8>>;
    /// The blob as an open file, to stream it rather than hold it whole in memory.
    fn open(&self, kind: BlobKind, digest: &Digest) -> std::io::Result<std::fs::File>;
    fn exists(&self, kind: BlobKind, digest: &Digest) -> bool;
    /// Removes a blob; removing one that is not there is not an error.
    fn remove(&self, kind: BlobKind, digest: &Digest) -> std::io::Result<()>;
    fn list(&self, kind: BlobKind) -> std::io::Result<Vec<Digest>>;
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
