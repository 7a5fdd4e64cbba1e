//! The virtual machine's KVM state, one module per object KVM hands out: the VM (`vm`), its
//! vCPU (`vcpu`) and the guest memory backing it (`memory`).

pub mod memory;
pub mod vcpu;
pub mod vm;
