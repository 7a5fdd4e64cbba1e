//! Snapshots in the data directory: `<data>/microvm/<digest>/{memory,state,seal}` (the first two
//! in `kiln_vmm::persist`'s format), named by [`super::GuestImage::snapshot_digest`], which the
//! version row records as its code digest — so the row that references a snapshot is what keeps it.
//!
//! A deploy boots into a staging directory `<data>/tmp/microvm-<random>/` and [`seal`]s it there:
//! `memory` and `state` are fsynced, then `seal` — a keyed MAC (`storage::seal`, this node's key)
//! over the digest, the `state` file's bytes and [`memory_digest`] (a SHA-256 of `memory`'s
//! non-zero pages) — is written last. Under the commit lock the directory is fsynced and renamed
//! to its final name *before* the version row commits: a crash leaves either a staging directory
//! or an unreferenced snapshot, never a row
//! naming a missing or half-written one. Start-up [`sweep`]s both kinds of leftovers.
//!
//! Loading a version [`verify`]s its snapshot once (the helpers then read it through a read-only
//! bind mount): one that does not verify — copied from another function or node, edited, half
//! written — or is gone is logged, set aside as `<digest>.rejected`, and booted again from the
//! stored upload (`MicrovmTier::rebuild`); it is never executed. As for compiled Wasm code, the
//! data directory is trusted not to change under a running server: the seal guards against what
//! was put there before the load.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kiln_vmm::persist::{MEMORY_FILE, STATE_FILE};
use sha2::{Digest as _, Sha256};

use super::invoke::MicrovmFunction;
use super::MicrovmTier;
use crate::digest::Digest;
use crate::function::VersionRecord;
use crate::functions::LoadError;
use crate::storage::local::sync_dir;
use crate::storage::seal::Sealer;
use crate::storage::Layout;

const STAGING_PREFIX: &str = "microvm-";
/// The seal of a snapshot directory, beside its `memory` and `state`.
pub const SEAL_FILE: &str = "seal";
/// The suffix of a snapshot directory set aside because it did not verify.
const REJECTED_SUFFIX: &str = ".rejected";

fn root(layout: &Layout) -> PathBuf {
    layout.snapshots()
}

/// Where the snapshot named `digest` lives on this node: beside the digest, this node's CPU key
/// ([`cpu_key`]), so a snapshot is only ever restored on the kind of CPU it was taken on.
pub fn dir(layout: &Layout, digest: &Digest) -> PathBuf {
    root(layout).join(format!("{}-{}", digest.hex(), cpu_key()))
}

/// The environment variable whose value is mixed into the CPU key: operators set it to make
/// every node boot its snapshots again (after a hypervisor or microcode change, say), and the
/// tests use it to stand for another CPU.
pub const CPU_KEY_SALT_ENV: &str = "KILN_MICROVM_CPU_KEY_SALT";

/// This node's CPU as snapshots depend on it: the CPU's model name and the features code may
/// use (a guest restored on a CPU lacking one it started with would fault), and the operator's
/// salt; 12 hex digits of their SHA-256. A VM's state — CPUID, XSAVE layout, MSRs — is only
/// sound on the CPU it was taken on, as Wasm code is only sound on the CPU it was compiled for.
pub fn cpu_key() -> &'static str {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, name)| name.trim().to_owned())
            })
            .unwrap_or_default();
        let salt = std::env::var(CPU_KEY_SALT_ENV).unwrap_or_default();
        let text = format!("{model}\n{}\n{salt}", crate::tier::wasm::compile::cpu_features());
        Digest::of(text.as_bytes()).hex()[..12].to_owned()
    })
}

/// Snapshot directories of `digest` taken on other CPUs than this node's.
fn taken_elsewhere(layout: &Layout, digest: &Digest) -> Vec<String> {
    let prefix = format!("{}-", digest.hex());
    let Ok(entries) = fs::read_dir(root(layout)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.strip_prefix(&prefix)?.to_owned();
            (key != cpu_key() && !key.ends_with(REJECTED_SUFFIX)).then_some(key)
        })
        .collect()
}

/// Where a snapshot directory goes when it does not verify.
fn rejected(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(REJECTED_SUFFIX);
    PathBuf::from(name)
}

/// What the seal of a snapshot covers: its name, its vCPU/device state, its guest memory (as
/// [`memory_digest`]).
fn sealed_parts<'a>(digest: &'a Digest, state: &'a [u8], memory_sha256: &'a [u8]) -> [&'a [u8]; 5] {
    [
        b"kiln microvm snapshot v2",
        digest.hex().as_bytes(),
        // A snapshot moved into another CPU's place does not verify.
        cpu_key().as_bytes(),
        state,
        memory_sha256,
    ]
}

/// What a verified (or just sealed) snapshot's memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub memory_len: u64,
    /// [`memory_digest`] of the memory file.
    pub memory_sha256: [u8; 32],
}

/// Guest pages, the unit of [`memory_digest`].
const PAGE: u64 = 4096;

/// The digest of a snapshot's memory file: SHA-256 over its length, then the index and bytes of
/// each page that is not all zeros. It commits to the content exactly as a plain SHA-256 would
/// (the zero pages are implied by the length and the indices), but costs only the guest's touched
/// pages: the file is sparse (`kiln_vmm::persist` leaves zero pages as holes), holes are skipped
/// with `SEEK_DATA`/`SEEK_HOLE` unread, and a copy that filled them in has the same digest.
/// Blocking.
pub fn memory_digest(path: &Path) -> io::Result<Verified> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = Sha256::new();
    hasher.update(b"kiln microvm memory v1");
    hasher.update(len.to_le_bytes());
    let seek = |offset: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor `file` owns; it moves only that descriptor's offset,
        // which nothing else uses (reads below are positioned).
        match unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) } {
            -1 => match io::Error::last_os_error() {
                // No data past `offset`.
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            },
            at => Ok(Some(at as u64)),
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    // The first byte not hashed yet; always page-aligned.
    let mut next = 0u64;
    while next < len {
        // The next extent with data; a filesystem without SEEK_DATA has data everywhere.
        let (data, hole) = match seek(next, libc::SEEK_DATA) {
            Ok(None) => break,
            Ok(Some(data)) => (data, seek(data, libc::SEEK_HOLE)?.unwrap_or(len)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (next, len),
            Err(e) => return Err(e),
        };
        // Whole pages, from the one holding `data` to the one holding the extent's last byte.
        let start = (data / PAGE * PAGE).max(next);
        let end = hole.div_ceil(PAGE).saturating_mul(PAGE).min(len);
        let mut at = start;
        while at < end {
            let chunk = &mut buf[..(end - at).min(1 << 20) as usize];
            file.read_exact_at(chunk, at)?;
            for (i, page) in chunk.chunks(PAGE as usize).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    hasher.update((at / PAGE + i as u64).to_le_bytes());
                    hasher.update(page);
                }
            }
            at += chunk.len() as u64;
        }
        // `data` is at or after `next`, so `end` is past it: every page is read once.
        next = end;
    }
    Ok(Verified {
        memory_len: len,
        memory_sha256: hasher.finalize().into(),
    })
}

/// Seals the snapshot a boot wrote into `dir` as `digest`: makes `memory` and `state` durable,
/// then writes the seal over them, last, durably. Blocking (reads all of `memory`).
pub fn seal(sealer: &Sealer, dir: &Path, digest: &Digest) -> io::Result<()> {
    for name in [MEMORY_FILE, STATE_FILE] {
        File::open(dir.join(name))?.sync_all()?;
    }
    let state = fs::read(dir.join(STATE_FILE))?;
    let memory = memory_digest(&dir.join(MEMORY_FILE))?;
    let seal = sealer.seal(&sealed_parts(digest, &state, &memory.memory_sha256));
    let path = dir.join(SEAL_FILE);
    fs::write(&path, seal)?;
    File::open(&path)?.sync_all()
}

/// What [`verify`] found.
#[derive(Debug)]
pub enum Verdict {
    /// The seal verifies: the snapshot is what this node booted for `digest`.
    Sealed(Verified),
    /// There is no snapshot directory.
    Missing,
    /// It did not verify (the reason), and was moved to `set_aside`.
    Rejected { reason: String, set_aside: PathBuf },
}

/// Checks the snapshot in `dir` against its seal for `digest`; one that does not verify is moved
/// out of the way (`<dir>.rejected`, replacing an older one), so that nothing can run it.
/// Blocking (reads all of `memory`).
pub fn verify(sealer: &Sealer, dir: &Path, digest: &Digest) -> io::Result<Verdict> {
    if !dir.exists() {
        return Ok(Verdict::Missing);
    }
    let reason = match check(sealer, dir, digest) {
        Ok(verified) => return Ok(Verdict::Sealed(verified)),
        Err(reason) => reason,
    };
    let set_aside = rejected(dir);
    if set_aside.exists() {
        fs::remove_dir_all(&set_aside)?;
    }
    fs::rename(dir, &set_aside)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(Verdict::Rejected { reason, set_aside })
}

/// Why the snapshot in `dir` does not verify, if it does not.
fn check(sealer: &Sealer, dir: &Path, digest: &Digest) -> Result<Verified, String> {
    let read = |name: &str| fs::read(dir.join(name)).map_err(|e| format!("cannot read its {name}: {e}"));
    let seal = read(SEAL_FILE)?;
    let seal = String::from_utf8(seal).map_err(|_| "its seal is not text".to_owned())?;
    let state = read(STATE_FILE)?;
    let memory = memory_digest(&dir.join(MEMORY_FILE)).map_err(|e| format!("cannot read its {MEMORY_FILE}: {e}"))?;
    match sealer.verify(&sealed_parts(digest, &state, &memory.memory_sha256), &seal) {
        true => Ok(memory),
        false => Err("its seal does not match its files".into()),
    }
}

/// A snapshot being written by a deploy (or a rebuild): removed when dropped unless published.
pub struct Staged {
    pub digest: Digest,
    /// `None` when the snapshot already exists under its name (nothing was booted).
    path: Option<PathBuf>,
}

impl Staged {
    /// A fresh staging directory for the snapshot `digest`.
    pub fn new(layout: &Layout, digest: Digest) -> io::Result<Self> {
        let path = layout
            .tmp()
            .join(format!("{STAGING_PREFIX}{:016x}", rand::random::<u64>()));
        fs::create_dir(&path)?;
        Ok(Self {
            digest,
            path: Some(path),
        })
    }

    /// The snapshot `digest` is already published: this deploy reuses it.
    pub fn existing(digest: Digest) -> Self {
        Self { digest, path: None }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Makes the staged (sealed) files durable and moves them to their final name. Call it under
    /// the commit lock, before the version row is committed. A sealed snapshot published
    /// meanwhile under the same name is kept (the same image booted; loading verifies it).
    pub fn publish(mut self, layout: &Layout) -> io::Result<PathBuf> {
        let final_path = dir(layout, &self.digest);
        let published = |path: &Path| path.join(SEAL_FILE).exists();
        let Some(path) = self.path.take() else {
            return match published(&final_path) {
                true => Ok(final_path),
                false => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("snapshot {} vanished before its commit", final_path.display()),
                )),
            };
        };
        let result = (|| {
            // The seal is written last by `seal`: a staged directory without one is unfinished.
            for name in [MEMORY_FILE, STATE_FILE, SEAL_FILE] {
                File::open(path.join(name))?.sync_all()?;
            }
            sync_dir(&path)?;
            if published(&final_path) {
                return Ok(());
            }
            fs::create_dir_all(root(layout))?;
            if final_path.exists() {
                // Unsealed (an older Kiln's, or a leftover): never run, kept aside for a look.
                let set_aside = rejected(&final_path);
                let _ = fs::remove_dir_all(&set_aside);
                fs::rename(&final_path, &set_aside)?;
            }
            match fs::rename(&path, &final_path) {
                // Another deploy or load published it first.
                Err(_) if published(&final_path) => return Ok(()),
                other => other?,
            }
            sync_dir(&root(layout))
        })();
        let _ = fs::remove_dir_all(&path);
        result.map(|()| final_path)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Loads the snapshot a microvm version runs from: verifies its seal, and boots it again from the
/// stored upload if it does not verify or is gone. Blocking work runs on the blocking pool.
pub async fn load(tier: &MicrovmTier, record: &VersionRecord) -> Result<Arc<MicrovmFunction>, LoadError> {
    let (Some(sealer), true) = (tier.sealer.clone(), tier.is_available()) else {
        return Err(LoadError::Unavailable(tier.unavailable()));
    };
    let digest = record.code_digest.clone();
    let lock = tier.loading_lock(&digest);
    let _loading = lock.lock().await;
    let path = dir(&tier.layout, &digest);
    let verdict = {
        let (path, digest) = (path.clone(), digest.clone());
        let started = Instant::now();
        let verdict = tokio::task::spawn_blocking(move || verify(&sealer, &path, &digest))
            .await
            .expect("snapshot verification task panicked");
        tracing::info!(
            function = %record.name,
            version = record.version,
            verify_ms = started.elapsed().as_millis() as u64,
            "verified the microVM snapshot's seal"
        );
        verdict
    };
    let link_error = |what: String| {
        LoadError::Link(format!(
            "the microVM snapshot of {}@{}: {what}",
            record.name, record.version
        ))
    };
    match verdict.map_err(|e| link_error(e.to_string()))? {
        Verdict::Sealed(verified) => return Ok(Arc::new(MicrovmFunction::new(path, verified))),
        Verdict::Missing => {
            let elsewhere = taken_elsewhere(&tier.layout, &digest);
            if elsewhere.is_empty() {
                tracing::warn!(
                    function = %record.name,
                    version = record.version,
                    snapshot = digest.hex(),
                    "the microVM snapshot is missing; booting it again from the stored upload"
                )
            } else {
                tracing::warn!(
                    function = %record.name,
                    version = record.version,
                    snapshot = digest.hex(),
                    cpu_key = cpu_key(),
                    taken_on = elsewhere.join(","),
                    "the microVM snapshot was taken on another CPU; this node boots it again from the stored upload"
                )
            }
        }
        Verdict::Rejected { reason, set_aside } => tracing::warn!(
            function = %record.name,
            version = record.version,
            snapshot = digest.hex(),
            set_aside = %set_aside.display(),
            %reason,
            "the microVM snapshot does not verify: set aside, never executed; booting it again from the stored upload"
        ),
    }
    let verified = tier
        .rebuild(record)
        .await
        .map_err(|e| link_error(format!("cannot boot it again: {e}")))?;
    Ok(Arc::new(MicrovmFunction::new(path, verified)))
}

/// Removes a snapshot no version references any more (after a delete): this node's, any
/// set-aside copy, and those taken on other CPUs.
pub fn remove_snapshot(layout: &Layout, digest: &Digest) {
    let path = dir(layout, digest);
    let _ = fs::remove_dir_all(&path);
    let _ = fs::remove_dir_all(rejected(&path));
    let prefix = format!("{}-", digest.hex());
    for entry in fs::read_dir(root(layout)).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes what a crash may have left: staging directories, and snapshots (or set-aside ones)
/// whose digest no version references. Runs at start-up, before anything is served.
pub fn sweep(layout: &Layout, referenced: &HashSet<String>) {
    if let Ok(entries) = fs::read_dir(layout.tmp()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(STAGING_PREFIX) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let Ok(entries) = fs::read_dir(root(layout)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let name_without = name.strip_suffix(REJECTED_SUFFIX).unwrap_or(&name);
        // `<digest>-<cpu key>`: every CPU's snapshot of a referenced digest stays.
        let digest = name_without.split_once('-').map_or(name_without, |(digest, _)| digest);
        if Digest::parse(digest).is_some() && !referenced.contains(digest) {
            tracing::info!(digest = %name, "removing a microVM snapshot no version references");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_snapshot_files(dir: &Path) {
        fs::write(dir.join(MEMORY_FILE), b"m").unwrap();
        fs::write(dir.join(STATE_FILE), b"s").unwrap();
    }

    fn layout() -> (tempfile::TempDir, Layout) {
        let data = tempfile::tempdir().unwrap();
        let layout = Layout::new(data.path().to_path_buf());
        layout.prepare().unwrap();
        (data, layout)
    }

    /// A published snapshot of fake files (a `memory` of `memory_len` bytes, mostly a hole, as
    /// guest RAM is), sealed as a deploy seals it.
    fn published(layout: &Layout, sealer: &Sealer, digest: &Digest, memory_len: u64) -> PathBuf {
        let staged = Staged::new(layout, digest.clone()).unwrap();
        let path = staged.path().unwrap();
        let memory = File::create(path.join(MEMORY_FILE)).unwrap();
        memory.set_len(memory_len).unwrap();
        use std::os::unix::fs::FileExt;
        memory.write_all_at(b"guest page", 4096).unwrap();
        fs::write(path.join(STATE_FILE), b"vcpu and device state").unwrap();
        seal(sealer, path, digest).unwrap();
        staged.publish(layout).unwrap()
    }

    fn assert_set_aside(verdict: Verdict, dir: &Path, why: &str) {
        let Verdict::Rejected { reason, set_aside } = verdict else {
            panic!("{why}: {verdict:?}");
        };
        assert_eq!(set_aside, rejected(dir), "{why}");
        assert!(
            set_aside.join(STATE_FILE).exists() && !dir.exists(),
            "{why}: not set aside"
        );
        assert!(!reason.is_empty());
    }

    #[test]
    fn staged_snapshots_publish_once_sealed_and_leftovers_are_swept() {
        let (_data, layout) = layout();
        let sealer = Sealer::open(&layout.seal_key()).unwrap();
        let digest = Digest::of(b"snapshot");

        // Dropped before publishing: nothing remains.
        let staged = Staged::new(&layout, digest.clone()).unwrap();
        let staging = staged.path().unwrap().to_path_buf();
        write_snapshot_files(&staging);
        drop(staged);
        assert!(!staging.exists());

        // Unsealed files are never published.
        let staged = Staged::new(&layout, digest.clone()).unwrap();
        write_snapshot_files(staged.path().unwrap());
        assert!(staged.publish(&layout).is_err());
        assert!(!dir(&layout, &digest).exists());

        let staged = Staged::new(&layout, digest.clone()).unwrap();
        write_snapshot_files(staged.path().unwrap());
        seal(&sealer, staged.path().unwrap(), &digest).unwrap();
        let published = staged.publish(&layout).unwrap();
        assert_eq!(published, dir(&layout, &digest));
        assert_eq!(fs::read(published.join(STATE_FILE)).unwrap(), b"s");
        // A second deploy of the same content keeps the first snapshot.
        let again = Staged::new(&layout, digest.clone()).unwrap();
        fs::write(again.path().unwrap().join(MEMORY_FILE), b"other").unwrap();
        fs::write(again.path().unwrap().join(STATE_FILE), b"other").unwrap();
        seal(&sealer, again.path().unwrap(), &digest).unwrap();
        assert_eq!(again.publish(&layout).unwrap(), published);
        assert_eq!(fs::read(published.join(STATE_FILE)).unwrap(), b"s");
        assert!(Staged::existing(digest.clone()).publish(&layout).is_ok());
        assert!(Staged::existing(Digest::of(b"gone")).publish(&layout).is_err());
        assert_eq!(fs::read_dir(layout.tmp()).unwrap().count(), 0, "no staging left");

        // An unsealed directory under the final name (an older Kiln's) is set aside, not reused.
        let old = Digest::of(b"old");
        fs::create_dir_all(dir(&layout, &old)).unwrap();
        write_snapshot_files(&dir(&layout, &old));
        let staged = Staged::new(&layout, old.clone()).unwrap();
        fs::write(staged.path().unwrap().join(MEMORY_FILE), b"new").unwrap();
        fs::write(staged.path().unwrap().join(STATE_FILE), b"new").unwrap();
        seal(&sealer, staged.path().unwrap(), &old).unwrap();
        staged.publish(&layout).unwrap();
        assert_eq!(fs::read(dir(&layout, &old).join(STATE_FILE)).unwrap(), b"new");
        assert_eq!(fs::read(rejected(&dir(&layout, &old)).join(STATE_FILE)).unwrap(), b"s");

        // A crash's leftovers: a staging directory, an unreferenced snapshot, set-aside copies.
        let orphan = Digest::of(b"orphan");
        fs::create_dir_all(dir(&layout, &orphan)).unwrap();
        fs::create_dir_all(rejected(&dir(&layout, &orphan))).unwrap();
        fs::create_dir_all(rejected(&dir(&layout, &digest))).unwrap();
        let leftover = Staged::new(&layout, orphan.clone()).unwrap();
        let leftover_path = leftover.path().unwrap().to_path_buf();
        std::mem::forget(leftover);
        sweep(&layout, &HashSet::from([digest.hex().to_owned()]));
        assert!(!leftover_path.exists());
        assert!(!dir(&layout, &orphan).exists() && !rejected(&dir(&layout, &orphan)).exists());
        assert!(!dir(&layout, &old).exists(), "unreferenced");
        assert!(published.exists(), "a referenced snapshot stays");
        assert!(
            rejected(&published).exists(),
            "and what was set aside of it, for a look"
        );
        remove_snapshot(&layout, &digest);
        assert!(!published.exists() && !rejected(&published).exists());
    }

    /// Issue 16's integrity check of snapshots, on fake files: what a deploy sealed verifies;
    /// anything else is set aside (never handed to a helper) and reported, for the load to boot
    /// the function again.
    #[test]
    fn snapshots_that_do_not_match_their_seal_are_set_aside() {
        let (_data, layout) = layout();
        let sealer = Sealer::open(&layout.seal_key()).unwrap();
        let (a, b) = (Digest::of(b"function a"), Digest::of(b"function b"));
        let memory_len = 64 << 20;

        // What was sealed verifies, and the load learns the memory's size and hash.
        let path = published(&layout, &sealer, &a, memory_len);
        let Verdict::Sealed(verified) = verify(&sealer, &path, &a).unwrap() else {
            panic!("a sealed snapshot does not verify");
        };
        assert_eq!(verified, memory_digest(&path.join(MEMORY_FILE)).unwrap());
        assert_eq!(verified.memory_len, memory_len);
        assert!(path.exists());

        // One byte of guest memory changed.
        use std::os::unix::fs::FileExt;
        let memory = fs::OpenOptions::new().write(true).open(path.join(MEMORY_FILE)).unwrap();
        memory.write_all_at(b"G", 4096).unwrap();
        drop(memory);
        assert_set_aside(verify(&sealer, &path, &a).unwrap(), &path, "memory changed");
        // Nothing is left to load under the name; the next check finds it missing.
        assert!(matches!(verify(&sealer, &path, &a).unwrap(), Verdict::Missing));

        // The state changed (an older set-aside copy is replaced).
        let path = published(&layout, &sealer, &a, 4096);
        fs::write(path.join(STATE_FILE), b"vcpu and device statE").unwrap();
        assert_set_aside(verify(&sealer, &path, &a).unwrap(), &path, "state changed");

        // Another function's snapshot, seal and all, copied under this one's name.
        let other = published(&layout, &sealer, &b, 4096);
        let path = dir(&layout, &a);
        fs::rename(&other, &path).unwrap();
        assert_set_aside(verify(&sealer, &path, &a).unwrap(), &path, "another snapshot's seal");

        // No seal, a seal that is not one, another node's seal.
        for (why, seal_file) in [
            ("no seal", None),
            ("not a seal", Some(b"\xff\xfe".to_vec())),
            ("garbage", Some(b"0123".to_vec())),
        ] {
            let path = published(&layout, &sealer, &a, 4096);
            match seal_file {
                None => fs::remove_file(path.join(SEAL_FILE)).unwrap(),
                Some(bytes) => fs::write(path.join(SEAL_FILE), bytes).unwrap(),
            }
            assert_set_aside(verify(&sealer, &path, &a).unwrap(), &path, why);
        }
        let elsewhere = tempfile::tempdir().unwrap();
        let other_node = Sealer::open(&elsewhere.path().join("seal.key")).unwrap();
        let path = published(&layout, &other_node, &a, 4096);
        assert_set_aside(verify(&sealer, &path, &a).unwrap(), &path, "another node's key");
        // A file missing.
        let path = published(&layout, &sealer, &a, 4096);
        fs::remove_file(path.join(MEMORY_FILE)).unwrap();
        assert_set_aside(verify(&sealer, &path, &a).unwrap(), &path, "no memory file");
    }

    /// Through the tier: a load verifies the snapshot, and one that does not verify (or is gone)
    /// is set aside and never handed out — the load boots the function again from its upload, or,
    /// where it cannot (here: the tier has no guest image, as on every host without hardware
    /// virtualization), fails; no version ever runs it.
    #[tokio::test]
    async fn a_load_never_hands_out_a_snapshot_that_does_not_verify() {
        use crate::function::{ArtifactKind, FunctionConfig};
        use crate::tier::microvm::Capability;

        let (_data, layout) = layout();
        let tier = MicrovmTier::with_parts(Capability::Available, None, None, 1, layout.clone());
        let sealer = tier.sealer.clone().expect("an available tier seals");
        let digest = Digest::of(b"snapshot");
        let path = published(&layout, &sealer, &digest, 8192);
        let record = VersionRecord {
            name: "native".into(),
            version: 3,
            digest: Digest::of(b"upload"),
            code_digest: digest.clone(),
            kind: ArtifactKind::Native,
            config: FunctionConfig::default(),
            created_at: String::new(),
        };
        let function = load(&tier, &record).await.unwrap();
        assert_eq!(function.dir(), path);
        assert_eq!(function.verified().memory_len, 8192);

        fs::write(path.join(STATE_FILE), b"someone else's vCPU").unwrap();
        let err = load(&tier, &record).await.err().expect("a tampered snapshot loaded");
        let message = err.to_string();
        assert!(
            message.contains("native@3") && message.contains("cannot boot it again"),
            "{message}"
        );
        assert!(!path.exists() && rejected(&path).join(STATE_FILE).exists());
        // Gone now: the next load tries to boot it again too, and runs nothing meanwhile.
        assert!(load(&tier, &record).await.is_err());
        assert!(!path.exists());
    }

    /// The memory digest is the content's, whatever the file's holes: a dense copy digests the
    /// same, any changed byte (a zero page written, a written page zeroed) does not.
    #[test]
    fn the_memory_digest_is_the_contents_whatever_the_holes() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let len: u64 = 40 * PAGE + 100;
        // Pages 1, 7 (two extents' worth), 20 and a partial last page, the rest holes.
        let written: [(u64, &[u8]); 4] = [
            (PAGE + 5, b"one"),
            (7 * PAGE, &[0xab; 4096]),
            (20 * PAGE + 4095, b"x"),
            (40 * PAGE + 99, b"z"),
        ];
        let sparse = dir.path().join("sparse");
        let file = File::create(&sparse).unwrap();
        file.set_len(len).unwrap();
        for (at, bytes) in written {
            file.write_all_at(bytes, at).unwrap();
        }
        let content = fs::read(&sparse).unwrap();
        let digest = memory_digest(&sparse).unwrap();
        assert_eq!(digest.memory_len, len);

        // The same bytes with no holes at all.
        let dense = dir.path().join("dense");
        fs::write(&dense, &content).unwrap();
        assert_eq!(memory_digest(&dense).unwrap(), digest);
        // The whole file as data, as where SEEK_DATA has nothing to skip: an explicit zero page
        // is the same as a hole.
        let zeros_written = dir.path().join("zeros");
        let file = File::create(&zeros_written).unwrap();
        file.set_len(len).unwrap();
        file.write_all_at(&content[..(2 * PAGE) as usize], 0).unwrap();
        file.write_all_at(&content[(2 * PAGE) as usize..], 2 * PAGE).unwrap();
        assert_eq!(memory_digest(&zeros_written).unwrap(), digest);

        // Any byte changed, in a written page or a hole, or the length: another digest.
        for (at, byte) in [(PAGE + 5, b'O'), (3 * PAGE, 1), (20 * PAGE + 4095, 0), (len - 1, 0)] {
            let mut changed = content.clone();
            changed[at as usize] = byte;
            let path = dir.path().join("changed");
            fs::write(&path, &changed).unwrap();
            assert_ne!(memory_digest(&path).unwrap(), digest, "byte {at} changed");
        }
        let longer = dir.path().join("longer");
        fs::write(&longer, [content.as_slice(), &[0]].concat()).unwrap();
        assert_ne!(memory_digest(&longer).unwrap().memory_sha256, digest.memory_sha256);
        // A page moved (same bytes, another index).
        let moved = dir.path().join("moved");
        let file = File::create(&moved).unwrap();
        file.set_len(len).unwrap();
        file.write_all_at(&content[(7 * PAGE) as usize..(8 * PAGE) as usize], 8 * PAGE)
            .unwrap();
        for (at, bytes) in written.iter().filter(|(at, _)| *at != 7 * PAGE) {
            file.write_all_at(bytes, *at).unwrap();
        }
        assert_ne!(memory_digest(&moved).unwrap(), digest);
    }
}
