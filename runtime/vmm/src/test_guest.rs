//! The tiny 64-bit guests Kiln's VMM is tested and measured with, assembled here from a handful
//! of hand-encoded x86-64 instructions (no assembler needed at build time).
//!
//! Each guest starts in long mode at [`crate::builder::IMAGE_ADDRESS`], sends READY over the
//! channel (the snapshot point), then serves REQUEST frames as the guest agent would:
//! - [`echo`]: answers each request with a RESPONSE of the request count (a little-endian u32
//!   kept in guest memory at [`COUNTER_ADDRESS`]) followed by the input upper-cased; the input is
//!   copied to [`BUFFER_ADDRESS`] on the way. The counter makes copy-on-write visible: every
//!   restore from a snapshot taken at READY answers its first request with count 1.
//! - [`bulk`]: echoes each request unchanged, moving it with string I/O (`rep insb` into
//!   [`BULK_ADDRESS`], `rep outsb` back). Hardware KVM hands the VMM up to a page per exit;
//!   PVM emulates string I/O one byte per exit (measured: ~10 µs per byte, 1 MiB in 10.7 s).
//! - [`agent`]: speaks the guest agent's side of an invocation (see `crate::invocation`): keeps
//!   each RESEED payload at [`SEED_ADDRESS`] without answering, and answers each REQUEST with a LOG
//!   frame ([`AGENT_LOG`]) and then a RESPONSE of exit code (requests served before this one: 0 for
//!   the first request after a restore), the last seed and the input.
//! - [`session`]: a session's guest (a sandbox's VM): polls the status port, reads every byte the
//!   host queued with `rep insb` and sends them straight back with `rep outsb` — so each frame
//!   the host sends comes back as the same frame — and counts the batches at [`COUNTER_ADDRESS`].
//! - [`spin`]: reads the request header, then loops forever (a timeout test).
//! - [`touch`]: reads the request header, then writes one byte at a given guest-physical address
//!   (past the end of RAM: the memory-limit test).

use std::collections::HashMap;

use crate::devices::channel::{FrameKind, CHANNEL_PORT, STATUS_PORT};

/// Where the echo guest keeps its request counter.
pub const COUNTER_ADDRESS: u32 = 0x1f_0000;
/// Where the echo guest copies each request's input.
pub const BUFFER_ADDRESS: u32 = 0x18_0000;

/// Where the bulk guest stores each request (requests up to memory size − 2 MiB).
pub const BULK_ADDRESS: u32 = 0x20_0000;

/// Where the agent guest keeps the last RESEED payload.
pub const SEED_ADDRESS: u32 = 0x1f_1000;
/// The LOG frame the agent guest sends before each response.
pub const AGENT_LOG: &[u8; 4] = b"log\n";

/// A minimal x86-64 emitter with labels for rel32 jumps.
#[derive(Default)]
struct Asm {
    code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }
    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.code.len());
        self
    }
    fn rel32(&mut self, opcode: &[u8], target: &'static str) -> &mut Self {
        self.bytes(opcode);
        self.fixups.push((self.code.len(), target));
        self.bytes(&[0; 4])
    }
    fn jmp(&mut self, target: &'static str) -> &mut Self {
        self.rel32(&[0xe9], target)
    }
    fn jz(&mut self, target: &'static str) -> &mut Self {
        self.rel32(&[0x0f, 0x84], target)
    }
    fn jne(&mut self, target: &'static str) -> &mut Self {
        self.rel32(&[0x0f, 0x85], target)
    }
    fn jb(&mut self, target: &'static str) -> &mut Self {
        self.rel32(&[0x0f, 0x82], target)
    }
    fn ja(&mut self, target: &'static str) -> &mut Self {
        self.rel32(&[0x0f, 0x87], target)
    }
    /// `mov dx, CHANNEL_PORT`
    fn port(&mut self) -> &mut Self {
        let [lo, hi] = CHANNEL_PORT.to_le_bytes();
        self.bytes(&[0x66, 0xba, lo, hi])
    }
    /// `mov al, imm8`
    fn mov_al(&mut self, imm: u8) -> &mut Self {
        self.bytes(&[0xb0, imm])
    }
    /// `mov edi, imm32` (zero-extends into rdi)
    fn mov_edi(&mut self, imm: u32) -> &mut Self {
        self.bytes(&[0xbf]).bytes(&imm.to_le_bytes())
    }
    /// `mov rbx, imm64`
    fn mov_rbx(&mut self, imm: u64) -> &mut Self {
        self.bytes(&[0x48, 0xbb]).bytes(&imm.to_le_bytes())
    }
    /// Sends a frame header: `out dx, eax` of the length in eax, then `out dx, al` of the kind.
    fn send_header_from_eax(&mut self, kind: FrameKind) -> &mut Self {
        self.bytes(&[0xef]).mov_al(kind as u8).bytes(&[0xee])
    }
    /// Sends the READY frame.
    fn ready(&mut self) -> &mut Self {
        self.port().bytes(&[0x31, 0xc0]).send_header_from_eax(FrameKind::Ready)
    }
    /// Reads a frame header: length into esi, kind into al (ignored by these guests).
    fn read_header(&mut self) -> &mut Self {
        self.bytes(&[0xed, 0x89, 0xc6, 0xec])
    }
    fn finish(mut self) -> Vec<u8> {
        for (at, target) in std::mem::take(&mut self.fixups) {
            let to = self.labels[target] as i64;
            let rel = (to - (at as i64 + 4)) as i32;
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.code
    }
}

/// The echo guest (see the module doc).
pub fn echo() -> Vec<u8> {
    let mut a = Asm::default();
    a.ready().label("request").read_header();
    // inc dword [COUNTER_ADDRESS]
    a.bytes(&[0xff, 0x04, 0x25]).bytes(&COUNTER_ADDRESS.to_le_bytes());
    // Copy the payload to the buffer, upper-casing a..z.
    a.mov_edi(BUFFER_ADDRESS).bytes(&[0x89, 0xf1]); // mov ecx, esi
    a.label("read").bytes(&[0x85, 0xc9]).jz("reply"); // test ecx, ecx
    a.bytes(&[0xec]); // in al, dx
    a.bytes(&[0x3c, b'a']).jb("store").bytes(&[0x3c, b'z']).ja("store");
    a.bytes(&[0x2c, 0x20]); // sub al, 0x20
    a.label("store").bytes(&[0x88, 0x07, 0x48, 0xff, 0xc7, 0xff, 0xc9]); // mov [rdi], al; inc rdi; dec ecx
    a.jmp("read");
    // RESPONSE header with length input + 4, then the counter, then the buffer.
    a.label("reply").bytes(&[0x89, 0xf0, 0x83, 0xc0, 0x04]); // mov eax, esi; add eax, 4
    a.send_header_from_eax(FrameKind::Response);
    a.bytes(&[0x8b, 0x04, 0x25])
        .bytes(&COUNTER_ADDRESS.to_le_bytes())
        .bytes(&[0xef]); // mov eax, [counter]; out dx, eax
    a.mov_edi(BUFFER_ADDRESS).bytes(&[0x89, 0xf1]); // mov ecx, esi
    a.label("write").bytes(&[0x85, 0xc9]).jz("request");
    a.bytes(&[0x8a, 0x07, 0xee, 0x48, 0xff, 0xc7, 0xff, 0xc9]); // mov al, [rdi]; out dx, al; inc rdi; dec ecx
    a.jmp("write");
    a.finish()
}

/// The bulk echo guest (see the module doc).
pub fn bulk() -> Vec<u8> {
    let mut a = Asm::default();
    a.ready().label("request").read_header();
    a.bytes(&[0x89, 0xf3]); // mov ebx, esi (the length)
    a.mov_edi(BULK_ADDRESS).bytes(&[0x89, 0xd9, 0xf3, 0x6c]); // mov ecx, ebx; rep insb
    a.bytes(&[0x89, 0xd8]).send_header_from_eax(FrameKind::Response); // mov eax, ebx
    a.bytes(&[0xbe]).bytes(&BULK_ADDRESS.to_le_bytes()); // mov esi, BULK_ADDRESS
    a.bytes(&[0x89, 0xd9, 0xf3, 0x6e]); // mov ecx, ebx; rep outsb
    a.jmp("request");
    a.finish()
}

/// The agent-protocol guest (see the module doc).
pub fn agent() -> Vec<u8> {
    let seed_len = crate::invocation::SEED_LEN as u8;
    let mut a = Asm::default();
    a.ready().label("frame").read_header();
    a.bytes(&[0x3c, FrameKind::Reseed as u8]).jne("request"); // cmp al, RESEED
    a.mov_edi(SEED_ADDRESS).bytes(&[0x89, 0xf1, 0xf3, 0x6c]); // mov ecx, esi; rep insb
    a.jmp("frame");
    a.label("request").bytes(&[0x89, 0xf3]); // mov ebx, esi (the input's length)
    a.mov_edi(BUFFER_ADDRESS).bytes(&[0x89, 0xd9, 0xf3, 0x6c]); // mov ecx, ebx; rep insb
    a.bytes(&[0xb8]).bytes(&4u32.to_le_bytes()); // mov eax, 4
    a.send_header_from_eax(FrameKind::Log);
    a.bytes(&[0xb8]).bytes(AGENT_LOG).bytes(&[0xef]); // mov eax, "log\n"; out dx, eax
    a.bytes(&[0x89, 0xd8, 0x83, 0xc0, 4 + seed_len]); // mov eax, ebx; add eax, 4 + seed
    a.send_header_from_eax(FrameKind::Response);
    a.bytes(&[0xff, 0x04, 0x25]).bytes(&COUNTER_ADDRESS.to_le_bytes()); // inc dword [counter]
    a.bytes(&[0x8b, 0x04, 0x25]).bytes(&COUNTER_ADDRESS.to_le_bytes()); // mov eax, [counter]
    a.bytes(&[0xff, 0xc8, 0xef]); // dec eax; out dx, eax (the exit code)
    a.bytes(&[0xbe]).bytes(&SEED_ADDRESS.to_le_bytes()); // mov esi, SEED_ADDRESS
    a.bytes(&[0xb9, seed_len, 0, 0, 0, 0xf3, 0x6e]); // mov ecx, seed; rep outsb
    a.bytes(&[0xbe]).bytes(&BUFFER_ADDRESS.to_le_bytes()); // mov esi, BUFFER_ADDRESS
    a.bytes(&[0x89, 0xd9, 0xf3, 0x6e]); // mov ecx, ebx; rep outsb
    a.jmp("frame");
    a.finish()
}

/// The session guest (see the module doc).
pub fn session() -> Vec<u8> {
    let [lo, hi] = STATUS_PORT.to_le_bytes();
    let mut a = Asm::default();
    a.ready().label("poll");
    a.bytes(&[0x66, 0xba, lo, hi, 0xed]); // mov dx, STATUS_PORT; in eax, dx
    a.bytes(&[0x85, 0xc0]).jz("poll"); // test eax, eax
    a.bytes(&[0x89, 0xc3]).port(); // mov ebx, eax (the bytes queued); mov dx, CHANNEL_PORT
    a.mov_edi(BULK_ADDRESS).bytes(&[0x89, 0xd9, 0xf3, 0x6c]); // mov ecx, ebx; rep insb
    a.bytes(&[0xbe]).bytes(&BULK_ADDRESS.to_le_bytes()); // mov esi, BULK_ADDRESS
    a.bytes(&[0x89, 0xd9, 0xf3, 0x6e]); // mov ecx, ebx; rep outsb
    a.bytes(&[0xff, 0x04, 0x25]).bytes(&COUNTER_ADDRESS.to_le_bytes()); // inc dword [counter]
    a.jmp("poll");
    a.finish()
}

/// The spinning guest (see the module doc).
pub fn spin() -> Vec<u8> {
    let mut a = Asm::default();
    a.ready().read_header().label("spin").jmp("spin");
    a.finish()
}

/// The guest that writes a byte at guest-physical `address` after reading a request header.
pub fn touch(address: u64) -> Vec<u8> {
    let mut a = Asm::default();
    a.ready().read_header().mov_rbx(address).bytes(&[0x88, 0x03]); // mov [rbx], al
    a.label("end").jmp("end");
    a.finish()
}
