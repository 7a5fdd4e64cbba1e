//! Per-helper cgroup v2 limits, where the host delegates the `memory` and `cpu` controllers.
//!
//! Each helper gets its own cgroup, a child of a *parent* cgroup Kiln may create children in:
//! `memory.max` (guest RAM plus the helper's overhead; `memory.swap.max` 0), `cpu.max` (one CPU:
//! a helper runs one vCPU) and `pids.max` (the supervisor and the worker) where those controllers
//! are enabled. The helper joins its cgroup itself, first thing, before it opens KVM or forks
//! (the host passes the path in `KILN_JAIL_CGROUP`), so everything it does is charged there; the
//! host removes the cgroup once it has reaped the helper.
//!
//! The parent is either given ([`CgroupSetting::Under`]: a delegated directory, e.g. systemd's
//! `Delegate=yes`), or found ([`CgroupSetting::Auto`]): the cgroup v2 mount and the parent of the
//! server's own cgroup, usable when the controllers reach the server's cgroup (cgroup v2 forbids
//! processes in a cgroup that distributes controllers to children, so helpers are the server's
//! siblings, not its children). Where neither works — cgroup v1 or hybrid hosts (this development
//! host: `/sys/fs/cgroup/unified` has no controllers), no write access — [`Cgroups::open`] says
//! why, the server logs it once, and helpers run without cgroup limits: the guest's RAM is still
//! bounded by its memory size, and its time by the invocation's timeout.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes a helper may use beyond its guest's RAM: its own code and heap, the request, the
/// reply, the snapshot's state.
pub const OVERHEAD_BYTES: u64 = 128 << 20;
/// `cpu.max` of a helper: one CPU (quota and period in µs).
const CPU_MAX: &str = "100000 100000";
/// Processes in a helper's cgroup: its supervisor and its worker.
const PIDS_MAX: &str = "2";

/// Where helpers' cgroups go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CgroupSetting {
    /// No cgroups.
    Off,
    /// Find a usable parent (see the module doc); without one, go on without cgroups.
    #[default]
    Auto,
    /// Create helpers' cgroups under this cgroup v2 directory.
    Under(PathBuf),
}

/// A parent cgroup checked usable.
#[derive(Debug)]
pub struct Cgroups {
    parent: PathBuf,
    pids: bool,
    next: AtomicU64,
}

/// Failure to use cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup limits are off")]
    Off,
    #[error("no cgroup v2 hierarchy is mounted (cgroup v1 only)")]
    NoV2,
    #[error(
        "the cgroup v2 hierarchy has no {missing} controller for {path} (a cgroup v1 or hybrid host, or not delegated)"
    )]
    MissingController { missing: &'static str, path: PathBuf },
    #[error("cannot use {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup v2 mount point in a `/proc/self/mountinfo` text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        let fstype = rest.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| fields.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The process's cgroup v2 path (the `0::` line) in a `/proc/self/cgroup` text.
pub fn own_cgroup(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|line| line.strip_prefix("0::"))
}

fn controllers(path: &Path) -> Result<String, CgroupError> {
    let file = path.join("cgroup.controllers");
    fs::read_to_string(&file).map_err(io_err(&file))
}

/// Whether a controller list (`cgroup.controllers`, `cgroup.subtree_control`) names `name`.
fn has(controllers: &str, name: &str) -> bool {
    // The kernel lists bare names; a `+` (as written) is accepted too.
    controllers
        .split_whitespace()
        .any(|c| c.trim_start_matches('+') == name)
}

impl Cgroups {
    /// Finds and checks the parent cgroup `setting` names; the error says why helpers will run
    /// without cgroup limits.
    pub fn open(setting: &CgroupSetting) -> Result<Self, CgroupError> {
        let parent = match setting {
            CgroupSetting::Off => return Err(CgroupError::Off),
            CgroupSetting::Under(path) => {
                // Helpers are children: the parent must hand them the controllers.
                let available = controllers(path)?;
                for name in ["memory", "cpu"] {
                    if !has(&available, name) {
                        return Err(CgroupError::MissingController {
                            missing: name,
                            path: path.clone(),
                        });
                    }
                }
                let control = path.join("cgroup.subtree_control");
                let wanted: Vec<String> = ["memory", "cpu", "pids"]
                    .iter()
                    .filter(|c| has(&available, c))
                    .map(|c| format!("+{c}"))
                    .collect();
                fs::write(&control, wanted.join(" ")).map_err(io_err(&control))?;
                path.clone()
            }
            CgroupSetting::Auto => {
                let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(io_err(Path::new("/proc")))?;
                let mount = cgroup2_mount(&mountinfo).ok_or(CgroupError::NoV2)?;
                let proc_cgroup = fs::read_to_string("/proc/self/cgroup").map_err(io_err(Path::new("/proc")))?;
                let own = own_cgroup(&proc_cgroup).ok_or(CgroupError::NoV2)?;
                let own = own.trim_matches('/');
                // Helpers are the server's siblings: children of its cgroup's parent (or of the
                // root, if the server is there: the root may hold processes and children alike).
                let parent = match Path::new(own).parent() {
                    Some(p) if !own.is_empty() => mount.join(p),
                    _ => mount,
                };
                // The parent hands these controllers to its children.
                let control = parent.join("cgroup.subtree_control");
                let enabled = fs::read_to_string(&control).map_err(io_err(&control))?;
                for name in ["memory", "cpu"] {
                    if !has(&enabled, name) {
                        return Err(CgroupError::MissingController {
                            missing: name,
                            path: parent,
                        });
                    }
                }
                parent
            }
        };
        let pids = fs::read_to_string(parent.join("cgroup.subtree_control")).is_ok_and(|c| has(&c, "pids"));
        let cgroups = Self {
            parent,
            pids,
            next: AtomicU64::new(0),
        };
        // Prove it: create and remove one.
        let probe = cgroups.create()?;
        probe.set_memory_max(OVERHEAD_BYTES)?;
        drop(probe);
        Ok(cgroups)
    }

    /// The parent helpers' cgroups are created in.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// A new, empty cgroup for one helper, with its CPU and process limits.
    pub fn create(&self) -> Result<HelperCgroup, CgroupError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.parent.join(format!("kiln-vm-{}-{n}", std::process::id()));
        fs::create_dir(&path).map_err(io_err(&path))?;
        let cgroup = HelperCgroup { path };
        cgroup.write("cpu.max", CPU_MAX)?;
        if self.pids {
            cgroup.write("pids.max", PIDS_MAX)?;
        }
        Ok(cgroup)
    }
}

/// One helper's cgroup; removed when dropped (after the helper is reaped).
#[derive(Debug)]
pub struct HelperCgroup {
    path: PathBuf,
}

impl HelperCgroup {
    /// The directory; the helper writes itself into its `cgroup.procs`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        fs::write(&path, value).map_err(io_err(&path))
    }

    /// Sets the memory limit (and no swap), before the helper is given its guest.
    pub fn set_memory_max(&self, bytes: u64) -> Result<(), CgroupError> {
        self.write("memory.max", &bytes.to_string())?;
        // Absent when the kernel has no swap accounting.
        if self.path.join("memory.swap.max").exists() {
            self.write("memory.swap.max", "0")?;
        }
        Ok(())
    }
}

impl Drop for HelperCgroup {
    fn drop(&mut self) {
        // Empty once its processes are reaped; a failure leaves an empty cgroup behind.
        if let Err(e) = fs::remove_dir(&self.path) {
            tracing::warn!(cgroup = %self.path.display(), "cannot remove a VM helper's cgroup: {e}");
        }
    }
}

/// Joins the cgroup at `path` (the helper, first thing): writes 0 (this process) into its
/// `cgroup.procs`.
pub fn join(path: &Path) -> io::Result<()> {
    fs::write(path.join("cgroup.procs"), "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_and_proc_cgroup_are_parsed() {
        let mountinfo = "\
24 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
35 30 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
36 30 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        assert_eq!(cgroup2_mount(mountinfo), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount("24 1 254:0 / / rw - ext4 /dev/vda rw\n"), None);
        let proc_cgroup = "4:memory:/process_api/6e8b\n1:cpu:/\n0::/system.slice/kiln.service\n";
        assert_eq!(own_cgroup(proc_cgroup), Some("/system.slice/kiln.service"));
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn a_directory_without_the_controllers_is_refused_with_the_reason() {
        assert!(matches!(Cgroups::open(&CgroupSetting::Off), Err(CgroupError::Off)));
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "cpuset io pids\n").unwrap();
        let err = Cgroups::open(&CgroupSetting::Under(dir.path().into())).unwrap_err();
        assert!(
            matches!(err, CgroupError::MissingController { missing: "memory", .. }),
            "{err}"
        );
        let err = Cgroups::open(&CgroupSetting::Under(dir.path().join("absent"))).unwrap_err();
        assert!(matches!(err, CgroupError::Io { .. }), "{err}");
    }

    #[test]
    fn a_delegated_parent_hands_each_helper_its_limits() {
        // A stand-in for a delegated cgroup v2 directory: the same files, in a plain directory
        // (this host has no cgroup v2 controllers to delegate). The kernel's files would also
        // vanish with `rmdir`; plain ones do not, so the test cleans up itself.
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        let cgroups = Cgroups::open(&CgroupSetting::Under(dir.path().into())).unwrap();
        assert_eq!(cgroups.parent(), dir.path());
        let control = fs::read_to_string(dir.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(control, "+memory +cpu +pids");
        let helper = cgroups.create().unwrap();
        assert!(helper.path().starts_with(dir.path()));
        helper.set_memory_max(64 << 20).unwrap();
        let read = |file: &str| fs::read_to_string(helper.path().join(file)).unwrap();
        assert_eq!(read("cpu.max"), CPU_MAX);
        assert_eq!(read("pids.max"), PIDS_MAX);
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        join(helper.path()).unwrap();
        assert_eq!(read("cgroup.procs"), "0");
        let path = helper.path().to_path_buf();
        fs::remove_dir_all(&path).unwrap();
        drop(helper);
    }
}
