//! The jailed VM helper for this crate's unit tests. The server runs its own binary as
//! `kiln vmm-jail`; a unit-test binary cannot dispatch in `main` (libtest owns it) and cannot run
//! another crate's binary (cargo builds none for `-p kiln-core`). So this binary dispatches itself,
//! before `main`: a constructor in `.init_array` — where no thread exists yet, as
//! `kiln_vmm::jail::child_main` requires — checks for [`ARG`] and becomes the helper.
//! [`jail`] is a jail whose helpers are this test binary.

use std::time::Duration;

use kiln_vmm::jail::{Jail, JailConfig};

/// The first argument that makes this test binary the helper; libtest never sees it.
const ARG: &str = "kiln-core-unit-tests-vmm-jail";

// Not an `unsafe` block, but a promise all the same: `dispatch` runs before Rust's runtime is set
// up, so it reads its arguments from /proc and does nothing else unless it is the helper.
#[used]
#[link_section = ".init_array"]
static DISPATCH: extern "C" fn() = dispatch;

extern "C" fn dispatch() {
    let cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    if cmdline.split(|&b| b == 0).nth(1) == Some(ARG.as_bytes()) {
        kiln_vmm::jail::child_main();
    }
}

/// A jail whose helpers are this test binary, or why this host cannot run one (no KVM, or
/// namespaces refused: the caller skips). Any other probe failure is a bug.
pub fn jail(prestart: usize) -> Result<Jail, String> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("this host has no /dev/kvm".into());
    }
    let mut config = JailConfig::new("/proc/self/exe", vec![ARG.into()]);
    config.prestart = prestart;
    // Tests on a loaded, shared machine: helpers may start slowly.
    config.start_timeout = Duration::from_secs(30);
    let jail = Jail::new(config);
    match jail.probe() {
        Ok(()) => Ok(jail),
        Err(reason)
            if ["unshare", "uid_map", "gid_map", "setgroups", "cannot use KVM"]
                .iter()
                .any(|w| reason.contains(w)) =>
        {
            Err(format!("this host cannot jail a VM helper: {reason}"))
        }
        Err(reason) => panic!("the jail's probe failed on a host with KVM: {reason}"),
    }
}
