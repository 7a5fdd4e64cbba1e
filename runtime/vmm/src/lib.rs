//! Kiln's microVM monitor: KVM virtual machines that boot once, are snapshotted, and are restored
//! copy-on-write for each invocation, on the rust-vmm crates.
//!
//! Layout, one module per concept:
//! - [`vstate`]: what KVM hands out — the VM ([`vstate::vm`]), its vCPU and run loop
//!   ([`vstate::vcpu`]), guest memory ([`vstate::memory`]).
//! - [`devices`]: the host↔guest channel and its framed protocol.
//! - [`builder`]: create a VM, load an image, boot it to its ready signal, send requests.
//! - [`initramfs`]: the deterministic cpio image holding the guest agent and the function.
//! - [`kernel`]: the Linux guest kernel, from Debian's bzImage to a loaded ELF `vmlinux`.
//! - [`linux`]: booting that kernel and an initramfs (64-bit boot protocol, zero page, e820).
//! - [`invocation`]: one request to a restored guest agent: RESEED, REQUEST, then LOG/RESPONSE.
//! - [`persist`]: snapshot a ready VM to files and restore it, many times, from them.
//! - [`jail`]: the same operations in a jailed helper process per VM (namespaces, pivot_root,
//!   no capabilities, seccomp, cgroup), so the server holds no KVM descriptor.
//! - [`test_guest`]: tiny 64-bit guests assembled in Rust, for tests and benchmarks.
//!
//! The API is blocking: a vCPU runs on the thread that calls [`builder::MicroVm::request`] (or
//! boot, or restore), never inside an async task — or, through [`jail`], in a helper process while
//! the calling thread waits for it. Kiln calls it from `spawn_blocking`.

pub mod builder;
pub mod devices;
pub mod initramfs;
pub mod invocation;
pub mod jail;
pub mod kernel;
pub mod linux;
pub mod persist;
pub mod test_guest;
pub mod vstate;

pub use builder::{BootError, ConfigError, MicroVm, RequestError, VmConfig, MAX_MEMORY_MIB};
pub use devices::channel::{Frame, FrameKind};
pub use invocation::{InvokeError, Reply};
pub use linux::LinuxBootError;
pub use persist::{CreateSnapshotError, LoadSnapshotError, RestoreError, Snapshot};
pub use vstate::vcpu::{RunError, SessionHost, SessionStop};
pub use vstate::vm::{Hypervisor, Quirks, VmError};
