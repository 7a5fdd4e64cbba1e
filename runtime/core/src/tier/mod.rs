//! The isolation tiers behind one interface. Deploy and invoke are written once, over [`Tier`]:
//!
//! ```text
//! deploy:  inspect (validate) ─ unchanged? ─ stage (compile, or boot + snapshot) ─┐
//!          commit lock: artifact blob ─ publish (make staged files durable) ─ version row ─ load ─ registry
//! invoke:  admit (function + tier permits) ─ read the input ─ run under the deadline ─ classify
//! ```
//!
//! - [`wasm`]: WebAssembly modules and components — engine and pooling allocator, AOT compile
//!   cache, Wizer pre-initialisation, one instance per invocation, the HTTP trigger and egress.
//! - [`microvm`]: static Linux executables in KVM microVMs, booted and snapshotted at deploy,
//!   restored copy-on-write per invocation.
//!
//! A function's tier is chosen once, by its config at deploy (`Tiers::deploy`) and by its loaded
//! entry at invoke (`Tiers::invoke`): the two `match`es in this file are the only places that know
//! there are two tiers.

pub mod microvm;
pub mod wasm;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::deploy::DeployError;
use crate::digest::Digest;
use crate::function::{ArtifactKind, FunctionConfig, VersionRecord};
use crate::functions::LoadError;
use crate::outcome::{InvokeError, Success};
use crate::permits::Permits;
use crate::registry::{Concurrency, Entry, LoadedFunction};

/// An upload that passed its tier's checks, in the form that is stored.
pub struct Artifact {
    pub kind: ArtifactKind,
    /// What is stored as the version's artifact (Wasm text is converted to binary first).
    pub bytes: Bytes,
    pub digest: Digest,
    /// The init hook a Wasm module exports, run once at deploy and snapshotted.
    pub init_hook: Option<&'static str>,
    /// A function from source: the SHA-256 of the language runtime it is built with (part of
    /// what makes a deploy "the same" as the latest version: a new runtime builds anew).
    pub built_with: Option<String>,
}

/// What a tier does for deploy and invoke.
pub trait Tier: Send + Sync {
    /// What stage 1 leaves ready to publish: compiled code, a booted snapshot.
    type Staged: Send + 'static;

    /// Checks an upload: `DeployError::InvalidCode` for anything the tier could never run,
    /// and only then `TierUnavailable` when this host cannot. Blocking, cheap.
    fn inspect(&self, upload: &[u8], config: &FunctionConfig) -> Result<Artifact, DeployError>;

    /// Stage 1: builds what runs, visible to nobody — a failure or a crash leaves nothing behind.
    fn stage(
        &self,
        name: &str,
        artifact: &Artifact,
        config: &FunctionConfig,
    ) -> impl Future<Output = Result<Self::Staged, DeployError>> + Send;

    /// Stage 2, under the commit lock and before the version row commits: makes the staged files
    /// durable under their final names and returns the digest of the code that runs. Blocking.
    fn publish(&self, staged: Self::Staged) -> Result<Digest, DeployError>;

    /// Makes a committed version runnable (loads compiled code, maps a snapshot).
    fn load(&self, record: &VersionRecord) -> impl Future<Output = Result<Entry, LoadError>> + Send;

    /// Admission: takes the function's and the tier's permits for one invocation of `f`, or
    /// refuses it — before its input is read, so a refused request costs no buffering.
    fn admit(&self, f: &LoadedFunction, concurrency: &Concurrency) -> Result<Permits, InvokeError>;

    /// Runs one admitted invocation: the guest with `input` under the function's deadline, its
    /// outcome classified. The permits are given back when the guest is gone. `invocation` is the
    /// id Kiln reports for it, which the guest's identity tokens name.
    fn run(
        &self,
        permits: Permits,
        f: &LoadedFunction,
        invocation: &str,
        input: Bytes,
    ) -> impl Future<Output = Result<Success, InvokeError>> + Send;
}

/// Both tiers, built once at start-up.
pub struct Tiers {
    pub wasm: Arc<wasm::WasmTier>,
    pub microvm: Arc<microvm::MicrovmTier>,
}

impl Tiers {
    /// Admits one invocation on the tier that loaded `f`.
    pub fn admit(&self, f: &LoadedFunction, concurrency: &Concurrency) -> Result<Permits, InvokeError> {
        match &f.entry {
            Entry::Wasm(_) => self.wasm.admit(f, concurrency),
            Entry::Microvm(_) => self.microvm.admit(f, concurrency),
        }
    }

    /// Runs one admitted invocation on the tier that loaded `f`.
    pub async fn run(
        &self,
        permits: Permits,
        f: &LoadedFunction,
        invocation: &str,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        match &f.entry {
            Entry::Wasm(_) => self.wasm.run(permits, f, invocation, input).await,
            Entry::Microvm(_) => self.microvm.run(permits, f, invocation, input).await,
        }
    }

    /// Loads a committed version on its tier.
    pub async fn load(&self, record: &VersionRecord) -> Result<Entry, LoadError> {
        match record.kind {
            ArtifactKind::Native | ArtifactKind::Image => self.microvm.load(record).await,
            ArtifactKind::Module | ArtifactKind::Component => self.wasm.load(record).await,
        }
    }

    /// Removes what the tiers keep of code no version references any more (compiled code,
    /// snapshots).
    pub fn forget(&self, digest: &Digest) {
        self.wasm.forget(digest);
        self.microvm.forget(digest);
    }
}
