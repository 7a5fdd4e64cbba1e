//! What the jail tests share: the helper binary, a jail (or the reason this host cannot run one),
//! and snapshots of the test guests.

use std::path::Path;
use std::time::Duration;

use kiln_vmm::jail::{Jail, JailConfig};
use kiln_vmm::{Hypervisor, MicroVm, Snapshot, VmConfig};

/// The helper: `kiln-vmm-jail` calls `kiln_vmm::jail::child_main`, as `kiln vmm-jail` does.
pub const HELPER: &str = env!("CARGO_BIN_EXE_kiln-vmm-jail");

pub const BOOT: Duration = Duration::from_secs(10);

pub fn config() -> JailConfig {
    JailConfig::new(HELPER, vec![])
}

/// A jail whose helpers can create VMs here, or `None` after recording why this host cannot run
/// `test` (no KVM, or namespaces refused). Any other probe failure fails the test.
pub fn jail(test: &str, config: JailConfig) -> Option<(Hypervisor, Jail)> {
    if !Path::new("/dev/kvm").exists() {
        kiln_testkit::skip(test, "this host has no /dev/kvm");
        return None;
    }
    let hypervisor = match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => {
            kiln_testkit::skip(test, &format!("this host's KVM is not usable: {e}"));
            return None;
        }
    };
    let jail = Jail::new(config);
    match jail.probe() {
        Ok(()) => Some((hypervisor, jail)),
        Err(reason)
            if ["unshare", "uid_map", "gid_map", "setgroups"]
                .iter()
                .any(|w| reason.contains(w)) =>
        {
            kiln_testkit::skip(test, &format!("this host refuses the jail's namespaces: {reason}"));
            None
        }
        Err(reason) => panic!("the jail's probe failed on a host with KVM: {reason}"),
    }
}

/// Boots `image` in process and snapshots it into `dir`.
pub fn snapshot(hv: &Hypervisor, image: &[u8], memory_mib: u32, dir: &Path) -> Snapshot {
    let mut vm = MicroVm::boot_flat64(hv, VmConfig::new(memory_mib), image, BOOT).unwrap();
    Snapshot::create(hv, &mut vm, dir).unwrap()
}
