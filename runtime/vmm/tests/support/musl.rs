//! Static musl builds for the tests that boot a Linux guest: the guest agent and the test function
//! (`kiln-upper`), and for the nested test the `linux` example. Shared (by `#[path]`) by
//! kiln-vmm's tests and Kiln's, so all build them one way, into one target directory.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// `cargo build --release --target x86_64-unknown-linux-musl` of each selection in `packages`
/// (cargo arguments such as `["-p", "kiln-guest-agent"]`), run in `workspace` into `target_dir`.
/// Returns the directory holding the executables, or why nothing could be built.
pub fn build(workspace: &Path, target_dir: &Path, packages: &[&[&str]]) -> Result<PathBuf, String> {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output();
    if !installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(TARGET)) {
        return Err(format!("the {TARGET} target is not installed"));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for what in packages {
        let status = Command::new(&cargo)
            .current_dir(workspace)
            .args(["build", "--release", "--target", TARGET])
            .args(*what)
            .arg("--target-dir")
            .arg(target_dir)
            .env_remove("RUSTFLAGS")
            .status()
            .map_err(|e| format!("running cargo: {e}"))?;
        assert!(status.success(), "building {what:?} for {TARGET} failed");
    }
    Ok(target_dir.join(TARGET).join("release"))
}
