//! Kiln's side of the microVM tier: native Linux executables (`"tier": "microvm"`) booted once in
//! a Linux guest at deploy, snapshotted, and restored copy-on-write for each invocation, behind the
//! same API as Wasm functions.
//!
//! The VMM is the `kiln-vmm` crate (KVM, the Linux boot, snapshots, the framed host↔guest
//! channel). This module owns what Kiln adds around it:
//! - [`capability`]: whether this host can run the tier at all, decided once at start-up;
//! - [`image`]: the upload's validation (a static x86_64 ELF, or an image) and the guest image
//!   (kernel, agent, the per-function initramfs);
//! - [`oci`] and [`rootfs`]: image uploads (root filesystem tars, OCI image layouts, `docker save`
//!   archives) read, checked and unpacked in memory into the root filesystem of the initramfs;
//! - [`snapshots`]: where snapshots live in the data directory, staged and published like
//!   artifacts, loaded, swept;
//! - [`deploy`]: validate, build the image, boot to READY, snapshot (the tier's side of
//!   `crate::deploy`);
//! - [`invoke`]: restore, RESEED, REQUEST, read LOG/RESPONSE, tear down, shape the outcome as a
//!   Wasm invocation's.
//!
//! Deploy and invoke reach it through [`crate::tier::Tier`], like the Wasm tier.
//!
//! **No VM runs in this process.** Every boot and every restore runs in a jailed helper process
//! of its own ([`kiln_vmm::jail`]: `kiln vmm-jail`, new user/mount/PID/network/IPC/UTS
//! namespaces, its root the snapshot's directory, no capabilities, `no_new_privs`, a seccomp
//! allow-list, a cgroup v2 limit where the host delegates one); the server never opens
//! `/dev/kvm`, so a guest that escapes KVM lands in a process that can do almost nothing, not in
//! the one holding the database, tokens and signing keys. The calling thread waits for its
//! helper on the blocking pool (`spawn_blocking`), never on a tokio worker.
//!
//! **Snapshots are sealed** ([`snapshots`]): a keyed MAC over the snapshot's digest, its `state`
//! and the SHA-256 of its `memory`, checked when a version is loaded; one that does not verify is
//! set aside and booted again from the stored upload, never executed.

mod capability;
mod deploy;
mod image;
mod invoke;
mod network;
mod oci;
mod rootfs;
pub mod sandbox;
mod snapshots;
#[cfg(test)]
mod test_helper;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kiln_vmm::jail::{Jail, JailConfig};
use kiln_vmm::Quirks;

pub use capability::Capability;
pub use image::{validate_executable, GuestImage};
pub use invoke::MicrovmFunction;
pub use snapshots::sweep;

use super::{Artifact, Tier};
use crate::config::CoreConfig;
use crate::deploy::DeployError;
use crate::digest::Digest;
use crate::function::{FunctionConfig, VersionRecord};
use crate::functions::LoadError;
use crate::outcome::{InvokeError, Success};
use crate::permits::{Limit, Permits};
use crate::registry::{Concurrency, Entry, LoadedFunction};
use crate::storage::seal::Sealer;
use crate::storage::{Blobs, Layout, LocalBlobs};

/// The argument that makes Kiln's binary the jailed VM helper (`runtime/kiln/src/main.rs`).
pub const HELPER_ARG: &str = "vmm-jail";

/// The tier's state, built once at start-up and shared by every deploy and invocation.
pub struct MicrovmTier {
    capability: Capability,
    /// Starts the jailed helper processes every VM runs in, when the tier is available.
    jail: Option<Arc<Jail>>,
    /// The guest image, when the tier is available.
    image: Option<Arc<GuestImage>>,
    /// One per running microVM (deploy boots and invocations alike).
    vms: Limit,
    /// Where snapshots live.
    layout: Layout,
    /// Where uploads are, to boot a snapshot again that did not verify.
    blobs: Arc<dyn Blobs>,
    /// Seals snapshots with this node's key; `None` when the tier is unavailable.
    sealer: Option<Sealer>,
    /// One lock per snapshot being loaded: two versions sharing a snapshot verify (and, if need
    /// be, rebuild) it once, not concurrently.
    loading: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// A helper the next invocation must use (tests: its pid, its jailed hook).
    #[cfg(test)]
    next_helper: Mutex<Option<kiln_vmm::jail::Helper>>,
}

impl MicrovmTier {
    /// Probes the host, loads the guest image and checks the jail where the tier could run.
    /// Blocking (reads and decompresses the kernel, starts a helper): call it at start-up.
    pub fn open(config: &CoreConfig, layout: &Layout) -> Self {
        let has_kvm = Path::new("/dev/kvm").exists();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        // Each step only where the ones before it say the tier could run: elsewhere the reason
        // is the host (or the image), and no helper is ever started — embedders and test
        // binaries that cannot be a helper never spawn themselves.
        let could_run = has_kvm && capability::has_hardware_virtualization(&cpuinfo);
        let image =
            could_run.then(|| GuestImage::load(config.microvm_kernel.as_deref(), config.microvm_agent.as_deref()));
        let jail = matches!(image, Some(Ok(_))).then(|| open_jail(config));
        let capability = Capability::decide(&capability::HostFacts {
            has_kvm,
            cpuinfo: &cpuinfo,
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
            image_error: match &image {
                Some(Err(e)) => Some(e.clone()),
                _ => None,
            },
            jail_error: match &jail {
                Some(Err(e)) => Some(e.clone()),
                _ => None,
            },
        });
        let (image, jail) = match (image, jail) {
            (Some(Ok(image)), Some(Ok(jail))) if capability.is_available() => (Some(Arc::new(image)), Some(jail)),
            _ => (None, None),
        };
        Self::with_parts(capability, jail, image, config.microvm_max_vms, layout.clone())
    }

    pub(crate) fn with_parts(
        capability: Capability,
        jail: Option<Arc<Jail>>,
        image: Option<Arc<GuestImage>>,
        max_vms: u32,
        layout: Layout,
    ) -> Self {
        // No snapshot is run unsealed: without the node's key the tier is unavailable.
        let (capability, sealer) = match capability {
            Capability::Available => match Sealer::open(&layout.seal_key()) {
                Ok(sealer) => (Capability::Available, Some(sealer)),
                Err(e) => (
                    Capability::Unavailable(format!(
                        "the microvm tier cannot seal its snapshots: seal key {}: {e}",
                        layout.seal_key().display()
                    )),
                    None,
                ),
            },
            unavailable => (unavailable, None),
        };
        Self {
            capability,
            jail,
            image,
            vms: Limit::new(max_vms),
            // The local disk, where `Kiln::open` keeps artifacts too (`Storage::blobs`).
            blobs: Arc::new(LocalBlobs::new(layout.clone())),
            layout,
            sealer,
            loading: Mutex::new(HashMap::new()),
            #[cfg(test)]
            next_helper: Mutex::new(None),
        }
    }

    pub fn is_available(&self) -> bool {
        self.capability.is_available()
    }

    /// Why the tier cannot run here, if it cannot.
    pub fn reason(&self) -> Option<&str> {
        self.capability.reason()
    }

    /// The jail, the guest image and the sealer, when the tier is available.
    fn runtime(&self) -> Option<(Arc<Jail>, Arc<GuestImage>, Sealer)> {
        match (&self.jail, &self.image, &self.sealer, self.is_available()) {
            (Some(jail), Some(image), Some(sealer), true) => Some((jail.clone(), image.clone(), sealer.clone())),
            _ => None,
        }
    }

    /// The reason as an owned message, for errors.
    fn unavailable(&self) -> String {
        self.reason()
            .unwrap_or("the microvm tier is not available on this host")
            .to_owned()
    }

    /// Removes a snapshot no version references any more (after a delete).
    pub fn forget(&self, digest: &Digest) {
        snapshots::remove_snapshot(&self.layout, digest);
    }

    /// The lock of the snapshot `digest` while a version using it loads.
    fn loading_lock(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut loading = self.loading.lock().expect("loading lock poisoned");
        // Locks nobody holds or waits for any more go, so the map stays as small as the loads
        // in flight.
        loading.retain(|_, lock| Arc::strong_count(lock) > 1);
        loading.entry(digest.clone()).or_default().clone()
    }
}

/// The jail every VM of this process runs in, if a helper can be jailed here and create a VM:
/// the capability check (`probe`), done in a helper so that this process never opens `/dev/kvm`.
fn open_jail(config: &CoreConfig) -> Result<Arc<Jail>, String> {
    let mut jail_config = JailConfig::new(helper_exe(), vec![HELPER_ARG.into()]);
    // KILN_MICROVM_QUIRKS=available-tss: this KVM runs nested under QEMU's TCG (test set-ups;
    // see `kiln_vmm::Quirks`). Never needed, nor right, on hardware.
    jail_config.quirks = Quirks {
        available_tss_on_restore: std::env::var("KILN_MICROVM_QUIRKS").is_ok_and(|q| q.contains("available-tss")),
    };
    // More spares than VMs may run at once would only wait.
    jail_config.prestart = config.microvm_prestart.min(config.microvm_max_vms as usize);
    let jail = Jail::new(jail_config);
    // Dropped (its pre-started helpers with it) if its helpers cannot work here.
    jail.probe()?;
    Ok(Arc::new(jail))
}

/// The helper executable: this very binary. `/proc/self/exe` rather than the path it was started
/// from, so that a binary replaced on disk (an upgrade under a running server) still starts
/// helpers that speak this process's protocol, and a deleted one still starts them at all.
fn helper_exe() -> std::path::PathBuf {
    std::path::PathBuf::from("/proc/self/exe")
}

impl Tier for MicrovmTier {
    type Staged = snapshots::Staged;

    fn inspect(&self, upload: &[u8], config: &FunctionConfig) -> Result<Artifact, DeployError> {
        self.check(upload, config)
    }

    async fn stage(
        &self,
        name: &str,
        artifact: &Artifact,
        config: &FunctionConfig,
    ) -> Result<Self::Staged, DeployError> {
        self.boot(name, artifact, config).await
    }

    fn publish(&self, staged: Self::Staged) -> Result<Digest, DeployError> {
        let digest = staged.digest.clone();
        staged.publish(&self.layout)?;
        Ok(digest)
    }

    async fn load(&self, record: &VersionRecord) -> Result<Entry, LoadError> {
        let function = snapshots::load(self, record).await?;
        Ok(Entry::Microvm(function))
    }

    fn admit(&self, f: &LoadedFunction, concurrency: &Concurrency) -> Result<Permits, InvokeError> {
        Permits::take(&f.record.name, concurrency, &self.vms, 1)
    }

    async fn run(
        &self,
        permits: Permits,
        f: &LoadedFunction,
        _invocation: &str,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        let Entry::Microvm(function) = &f.entry else {
            unreachable!("Tiers sends only microvm functions to the microvm tier")
        };
        self.run_vm(permits, function, &f.record.config, input).await
    }
}
