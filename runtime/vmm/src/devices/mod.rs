//! Emulated devices. Kiln's guests need exactly one: the host↔guest [`channel`], a port-I/O byte
//! stream carrying length-prefixed frames. No interrupt controller wiring, no virtio queues: the
//! guest drives every transfer with `in`/`out`, which keeps the device small enough to audit and
//! its state small enough to snapshot in a few bytes.

pub mod channel;
