//! Deploying a microvm function: the microvm side of the stages of `crate::deploy`:
//!
//! 1. validate the upload (`invalid_code` on every host), then — where the tier is available — build the
//!    initramfs, boot the Linux guest until the agent's READY, and snapshot it into a staging
//!    directory: all before anything is visible, so a failure leaves nothing behind;
//! 2. under the commit lock: the upload is stored as the version's artifact, the snapshot is
//!    published (fsync, rename), then the version row commits — the commit point;
//! 3. the loaded version is installed in the registry.
//!
//! The boot holds one of the tier's VM permits and runs on the blocking pool.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_vmm::linux::LinuxBootError;
use kiln_vmm::{MicroVm, Snapshot, VmConfig};

use super::image::validate_executable;
use super::snapshots::{self, Staged};
use super::{GuestImage, MicrovmTier};
use crate::deploy::DeployError;
use crate::digest::Digest;
use crate::function::{ArtifactKind, FunctionConfig, MAX_MEMORY_MB};
use crate::storage::Layout;
use crate::tier::Artifact;

/// The smallest guest Kiln boots: the kernel, the unpacked initramfs and the agent need it.
pub const MIN_MEMORY_MB: u64 = 64;
/// How long a boot may take before the deploy gives up. Linux boots in well under a second on
/// hardware virtualization; this bounds a guest that hangs, with room for nested test set-ups
/// (KVM inside an emulated VM boots it in 20–60 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

impl MicrovmTier {
    /// Bad input is `invalid_code` on every host; only a valid executable learns that the host cannot run it.
    pub(super) fn check(&self, upload: &[u8], config: &FunctionConfig) -> Result<Artifact, DeployError> {
        validate_executable(upload).map_err(DeployError::InvalidCode)?;
        if self.runtime().is_none() {
            return Err(DeployError::TierUnavailable(self.unavailable()));
        }
        if config.memory_mb < MIN_MEMORY_MB {
            return Err(DeployError::InvalidCode(format!(
                "the microvm tier needs memory_mb of at least {MIN_MEMORY_MB}: the guest's kernel and \
                 agent run in it"
            )));
        }
        Ok(Artifact {
            kind: ArtifactKind::Native,
            digest: Digest::of(upload),
            bytes: Bytes::copy_from_slice(upload),
            init_hook: None,
        })
    }

    /// Stage 1: boot and snapshot, on the blocking pool, holding a VM permit.
    pub(super) async fn boot(
        &self,
        name: &str,
        artifact: &Artifact,
        config: &FunctionConfig,
    ) -> Result<Staged, DeployError> {
        let Some((hypervisor, image)) = self.runtime() else {
            return Err(DeployError::TierUnavailable(self.unavailable()));
        };
        let permit = self.vms.take(1).await;
        let (layout, upload, name) = (self.layout.clone(), artifact.bytes.clone(), name.to_owned());
        let (memory_mib, env) = (config.memory_mb as u32, config.env.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            boot_and_snapshot(&layout, &hypervisor, &image, &name, &upload, &env, memory_mib)
        })
        .await
        .expect("boot task panicked")
    }
}

/// Builds the function's initramfs, boots it to READY and snapshots it into a staging directory;
/// reuses the published snapshot when one of the same content exists. Blocking.
fn boot_and_snapshot(
    layout: &Layout,
    hypervisor: &kiln_vmm::Hypervisor,
    image: &GuestImage,
    name: &str,
    upload: &[u8],
    env: &std::collections::BTreeMap<String, String>,
    memory_mib: u32,
) -> Result<Staged, DeployError> {
    let initramfs = image.initramfs(upload, env);
    let digest = image.snapshot_digest(&initramfs, memory_mib);
    if snapshots::dir(layout, &digest).join("state").exists() {
        return Ok(Staged::existing(digest));
    }
    let staged = Staged::new(layout, digest)?;
    let config = VmConfig {
        memory_mib,
        max_memory_mib: MAX_MEMORY_MB as u32,
    };
    let started = Instant::now();
    let mut vm = MicroVm::boot_linux(
        hypervisor,
        config,
        &image.vmlinux,
        &initramfs,
        &image.cmdline,
        BOOT_TIMEOUT,
    )
    .map_err(|e| match e {
        LinuxBootError::Layout(e) => {
            DeployError::InvalidCode(format!("memory_mb {memory_mib} is too small for this function: {e}"))
        }
        e => DeployError::TierUnavailable(format!("the microVM's Linux guest did not boot: {e}")),
    })?;
    let booted = started.elapsed();
    let path = staged.path().expect("a new staging directory");
    Snapshot::create(hypervisor, &mut vm, path).map_err(|e| DeployError::Io(std::io::Error::other(e.to_string())))?;
    tracing::info!(
        function = name,
        boot_ms = booted.as_millis() as u64,
        snapshot_ms = (started.elapsed() - booted).as_millis() as u64,
        "booted and snapshotted the microVM"
    );
    Ok(staged)
}
