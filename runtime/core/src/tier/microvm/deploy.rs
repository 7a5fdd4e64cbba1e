//! Deploying a microvm function: the microvm side of the stages of `crate::deploy`:
//!
//! 1. validate the upload (`invalid_code` on every host: a static executable here, an image —
//!    read, digests checked, unpacked on the blocking pool — at the start of stage 1's boot), then
//!    — where the tier is available — build the initramfs, boot the Linux guest until the agent's READY and snapshot it into a staging
//!    directory, in a jailed helper process (`kiln_vmm::jail`), and seal the snapshot with this
//!    node's key (`snapshots::seal`): all before anything is visible, so a failure leaves nothing
//!    behind;
//! 2. under the commit lock: the upload is stored as the version's artifact, the snapshot is
//!    published (fsync, rename), then the version row commits — the commit point;
//! 3. the loaded version is installed in the registry.
//!
//! The boot holds one of the tier's VM permits; the blocking pool's thread waits for the helper.
//! A load whose snapshot does not verify boots it again the same way ([`MicrovmTier::rebuild`]).

use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_vmm::jail::{Jail, JailError};
use kiln_vmm::VmConfig;

use super::image::{prepare, validate_executable, Prepared};
use super::oci;
use super::snapshots::{self, Staged, Verdict, Verified};
use super::{GuestImage, MicrovmTier};
use crate::deploy::DeployError;
use crate::digest::Digest;
use crate::function::{ArtifactKind, FunctionConfig, VersionRecord, MAX_MEMORY_MB};
use crate::storage::seal::Sealer;
use crate::storage::{BlobKind, Layout};
use crate::tier::Artifact;

/// The smallest guest Kiln boots: the kernel, the unpacked initramfs and the agent need it.
pub const MIN_MEMORY_MB: u64 = 64;
/// How long a boot may take before the deploy gives up. Linux boots in well under a second on
/// hardware virtualization; this bounds a guest that hangs, with room for nested test set-ups
/// (KVM inside an emulated VM boots it in 20–60 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

impl MicrovmTier {
    /// Bad input is `invalid_code` on every host; only a valid executable learns that the host
    /// cannot run it. An image (an archive, by its first bytes) is only recognised here: reading
    /// it is blocking work, done at the start of [`Self::boot`], still before the host's 503.
    pub(super) fn check(&self, upload: &[u8], config: &FunctionConfig) -> Result<Artifact, DeployError> {
        let kind = if !upload.starts_with(b"\x7fELF") && oci::is_archive(upload) {
            ArtifactKind::Image
        } else {
            validate_executable(upload).map_err(DeployError::InvalidCode)?;
            let fields = config.image_fields();
            if !fields.is_empty() {
                return Err(DeployError::InvalidConfig(format!(
                    "{} apply only to image deploys (a root filesystem tar or an OCI image); this \
                     upload is a static executable, which runs as /function",
                    fields.join(", ")
                )));
            }
            if self.runtime().is_none() {
                return Err(DeployError::TierUnavailable(self.unavailable()));
            }
            check_memory(config)?;
            ArtifactKind::Native
        };
        Ok(Artifact {
            kind,
            digest: Digest::of(upload),
            bytes: Bytes::copy_from_slice(upload),
            init_hook: None,
            built_with: None,
        })
    }

    /// Stage 1: boot, snapshot and seal, holding a VM permit.
    pub(super) async fn boot(
        &self,
        name: &str,
        artifact: &Artifact,
        config: &FunctionConfig,
    ) -> Result<Staged, DeployError> {
        let prepared = match artifact.kind {
            ArtifactKind::Image => {
                let (upload, owned) = (artifact.bytes.clone(), config.clone());
                let prepared = tokio::task::spawn_blocking(move || prepare(&upload, &owned))
                    .await
                    .expect("image task panicked")
                    .map_err(DeployError::InvalidCode)?;
                Some(prepared)
            }
            _ => None,
        };
        let Some((jail, image, sealer)) = self.runtime() else {
            return Err(DeployError::TierUnavailable(self.unavailable()));
        };
        check_memory(config)?;
        let permit = self.vms.take(1).await;
        let (layout, upload, name) = (self.layout.clone(), artifact.bytes.clone(), name.to_owned());
        let (memory_mib, env) = (config.memory_mb as u32, config.env.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let boot = Boot {
                layout: &layout,
                jail: &jail,
                image: &image,
                sealer: &sealer,
                name: &name,
            };
            let initramfs = match prepared {
                Some(prepared) => image.image_initramfs(&prepared),
                None => image.initramfs(&upload, &env),
            };
            let digest = image.snapshot_digest(&initramfs, memory_mib);
            if snapshots::dir(&layout, &digest).join(snapshots::SEAL_FILE).exists() {
                // The same image was booted before: loading verifies that snapshot.
                return Ok(Staged::existing(digest));
            }
            boot.staged(digest, &initramfs, memory_mib)
        })
        .await
        .expect("boot task panicked")
    }

    /// Boots a version's snapshot again, from its stored upload and its config, and publishes it
    /// under the version's snapshot digest, sealed: a load whose snapshot did not verify, or was
    /// gone. With the guest image this node has now, even if it changed since the deploy.
    pub(super) async fn rebuild(&self, record: &VersionRecord) -> Result<Verified, DeployError> {
        let Some((jail, image, sealer)) = self.runtime() else {
            return Err(DeployError::TierUnavailable(self.unavailable()));
        };
        let (blobs, artifact) = (self.blobs.clone(), record.digest.clone());
        let upload = tokio::task::spawn_blocking(move || blobs.get(BlobKind::Artifact, &artifact))
            .await
            .expect("artifact read task panicked")?;
        if Digest::of(&upload) != record.digest {
            return Err(DeployError::Io(std::io::Error::other(format!(
                "the stored upload {} does not match its digest",
                record.digest.prefixed()
            ))));
        }
        let permit = self.vms.take(1).await;
        let (layout, expected, name) = (self.layout.clone(), record.code_digest.clone(), record.name.clone());
        let (memory_mib, kind, config) = (record.config.memory_mb as u32, record.kind, record.config.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let boot = Boot {
                layout: &layout,
                jail: &jail,
                image: &image,
                sealer: &sealer,
                name: &name,
            };
            let initramfs = initramfs_of(&image, kind, &upload, &config)?;
            if image.snapshot_digest(&initramfs, memory_mib) != expected {
                // Booted with the image this node has now, under the name the version row knows
                // (so it is the one that stays): a version must stay runnable, and redeploying the
                // same upload and config would change nothing.
                tracing::warn!(
                    function = %name,
                    snapshot = expected.hex(),
                    "the guest image changed since this version was deployed: its snapshot is booted \
                     again with the current one"
                );
            }
            let staged = boot.staged(expected.clone(), &initramfs, memory_mib)?;
            let path = staged.publish(&layout)?;
            // Verified as any load's snapshot is: what is published is what runs.
            match snapshots::verify(&sealer, &path, &expected)? {
                Verdict::Sealed(verified) => Ok(verified),
                other => Err(DeployError::Io(std::io::Error::other(format!(
                    "the snapshot just booted does not verify: {other:?}"
                )))),
            }
        })
        .await
        .expect("rebuild task panicked")
    }
}

/// The guest needs room for its kernel and agent.
fn check_memory(config: &FunctionConfig) -> Result<(), DeployError> {
    if config.memory_mb < MIN_MEMORY_MB {
        return Err(DeployError::InvalidCode(format!(
            "the microvm tier needs memory_mb of at least {MIN_MEMORY_MB}: the guest's kernel and \
             agent run in it"
        )));
    }
    Ok(())
}

/// The initramfs of a stored version, from its upload and config. Blocking.
fn initramfs_of(
    image: &GuestImage,
    kind: ArtifactKind,
    upload: &[u8],
    config: &FunctionConfig,
) -> Result<Vec<u8>, DeployError> {
    if kind != ArtifactKind::Image {
        return Ok(image.initramfs(upload, &config.env));
    }
    let prepared: Prepared = prepare(upload, config).map_err(|e| {
        DeployError::Io(std::io::Error::other(format!(
            "the stored image no longer unpacks: {e}"
        )))
    })?;
    Ok(image.image_initramfs(&prepared))
}

/// What a boot needs. Blocking: runs on the blocking pool.
struct Boot<'a> {
    layout: &'a Layout,
    jail: &'a Jail,
    image: &'a GuestImage,
    sealer: &'a Sealer,
    name: &'a str,
}

impl Boot<'_> {
    /// Boots the image with `initramfs` to READY in a jailed helper, snapshots it into a new
    /// staging directory and seals it as `digest`.
    fn staged(&self, digest: Digest, initramfs: &[u8], memory_mib: u32) -> Result<Staged, DeployError> {
        let staged = Staged::new(self.layout, digest)?;
        let path = staged.path().expect("a new staging directory");
        let config = VmConfig {
            memory_mib,
            max_memory_mib: MAX_MEMORY_MB as u32,
        };
        let started = Instant::now();
        let report = self
            .jail
            .boot_linux_and_snapshot(
                &self.image.vmlinux,
                initramfs,
                &self.image.cmdline,
                config,
                BOOT_TIMEOUT,
                path,
            )
            .map_err(|e| boot_error(e, memory_mib))?;
        let helper = started.elapsed();
        snapshots::seal(self.sealer, path, &staged.digest)?;
        tracing::info!(
            function = self.name,
            boot_ms = report.boot.as_millis() as u64,
            snapshot_ms = report.snapshot.as_millis() as u64,
            // The helper's whole run as the server saw it: start-up, the request, boot, snapshot.
            helper_ms = helper.as_millis() as u64,
            seal_ms = (started.elapsed() - helper).as_millis() as u64,
            "booted, snapshotted and sealed the microVM"
        );
        Ok(staged)
    }
}

/// A failed boot as a deploy tells it: a layout the memory size cannot hold is the upload's
/// problem; anything else is the host's (the message ends with the guest's console, if any).
fn boot_error(e: JailError, memory_mib: u32) -> DeployError {
    match e {
        JailError::Layout(e) => {
            DeployError::InvalidCode(format!("memory_mb {memory_mib} is too small for this function: {e}"))
        }
        // The agent sends a LOG in place of READY when the image's command cannot start or its
        // ready hook fails: the image's fault, told with the console (which has the hook's output).
        JailError::LinuxBoot { message, .. } if message.contains("Log frame before its ready signal") => {
            DeployError::InvalidCode(format!("the image did not become ready: {message}"))
        }
        e @ JailError::LinuxBoot { .. } => DeployError::TierUnavailable(e.to_string()),
        e => DeployError::TierUnavailable(format!("the microVM's Linux guest did not boot: {e}")),
    }
}
