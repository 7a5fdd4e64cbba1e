//! Kiln's side of the microVM tier: native Linux executables (`"tier": "microvm"`) booted once in
//! a Linux guest at deploy, snapshotted, and restored copy-on-write for each invocation, behind the
//! same API as Wasm functions.
//!
//! The VMM is the `kiln-vmm` crate (KVM, the Linux boot, snapshots, the framed host↔guest
//! channel). This module owns what Kiln adds around it:
//! - [`capability`]: whether this host can run the tier at all, decided once at start-up;
//! - [`image`]: the upload's validation (a static x86_64 ELF) and the guest image (kernel, agent,
//!   the per-function initramfs);
//! - [`snapshots`]: where snapshots live in the data directory, staged and published like
//!   artifacts, loaded, swept;
//! - [`deploy`]: validate, build the image, boot to READY, snapshot (the tier's side of
//!   `crate::deploy`);
//! - [`invoke`]: restore, RESEED, REQUEST, read LOG/RESPONSE, tear down, shape the outcome as a
//!   Wasm invocation's.
//!
//! Deploy and invoke reach it through [`crate::tier::Tier`], like the Wasm tier.
//!
//! Every KVM call runs on the blocking pool (`spawn_blocking`): a vCPU blocks its thread for as
//! long as the guest runs, which must never be a tokio worker.

mod capability;
mod deploy;
mod image;
mod invoke;
mod snapshots;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use kiln_vmm::{Hypervisor, Quirks};

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
use crate::storage::Layout;

/// The tier's state, built once at start-up and shared by every deploy and invocation.
pub struct MicrovmTier {
    capability: Capability,
    /// `/dev/kvm`, when it opens.
    hypervisor: Option<Arc<Hypervisor>>,
    /// The guest image, when the tier is available.
    image: Option<Arc<GuestImage>>,
    /// One per running microVM (deploy boots and invocations alike).
    vms: Limit,
    /// Where snapshots live.
    layout: Layout,
}

impl MicrovmTier {
    /// Probes the host and loads the guest image where it could run. Blocking (reads and
    /// decompresses the kernel): call it at start-up.
    pub fn open(config: &CoreConfig, layout: &Layout) -> Self {
        let has_kvm = Path::new("/dev/kvm").exists();
        let hypervisor = has_kvm.then(Hypervisor::open);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kvm_usable = matches!(hypervisor, Some(Ok(_)));
        // The image is read only where the tier could run: elsewhere the reason is the host.
        let image = (kvm_usable && capability::has_hardware_virtualization(&cpuinfo))
            .then(|| GuestImage::load(config.microvm_kernel.as_deref(), config.microvm_agent.as_deref()));
        let capability = Capability::decide(&capability::HostFacts {
            has_kvm,
            kvm_error: match &hypervisor {
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            },
            cpuinfo: &cpuinfo,
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
            image_error: match &image {
                Some(Err(e)) => Some(e.clone()),
                _ => None,
            },
        });
        let image = match image {
            Some(Ok(image)) if capability.is_available() => Some(Arc::new(image)),
            _ => None,
        };
        // KILN_MICROVM_QUIRKS=available-tss: this KVM runs nested under QEMU's TCG (test set-ups;
        // see `kiln_vmm::Quirks`). Never needed, nor right, on hardware.
        let quirks = Quirks {
            available_tss_on_restore: std::env::var("KILN_MICROVM_QUIRKS").is_ok_and(|q| q.contains("available-tss")),
        };
        Self::with_parts(
            capability,
            hypervisor
                .and_then(Result::ok)
                .map(|hv| Arc::new(hv.with_quirks(quirks))),
            image,
            config.microvm_max_vms,
            layout.clone(),
        )
    }

    pub(crate) fn with_parts(
        capability: Capability,
        hypervisor: Option<Arc<Hypervisor>>,
        image: Option<Arc<GuestImage>>,
        max_vms: u32,
        layout: Layout,
    ) -> Self {
        Self {
            capability,
            hypervisor,
            image,
            vms: Limit::new(max_vms),
            layout,
        }
    }

    pub fn is_available(&self) -> bool {
        self.capability.is_available()
    }

    /// Why the tier cannot run here, if it cannot.
    pub fn reason(&self) -> Option<&str> {
        self.capability.reason()
    }

    /// KVM and the guest image, when the tier is available.
    fn runtime(&self) -> Option<(Arc<Hypervisor>, Arc<GuestImage>)> {
        match (&self.hypervisor, &self.image, self.is_available()) {
            (Some(hv), Some(image), true) => Some((hv.clone(), image.clone())),
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

    async fn run(&self, permits: Permits, f: &LoadedFunction, input: Bytes) -> Result<Success, InvokeError> {
        let Entry::Microvm(function) = &f.entry else {
            unreachable!("Tiers sends only microvm functions to the microvm tier")
        };
        self.run_vm(permits, function, &f.record.config, input).await
    }
}
