//! The host↔guest channel: a port-I/O byte stream carrying length-prefixed frames.
//!
//! # Transport
//! One I/O port, [`CHANNEL_PORT`] (0x510). A guest `out` to it appends the written bytes to the
//! guest→host stream; an `in` from it takes the next bytes of the host→guest stream. The access
//! width is the number of bytes moved: `out dx, eax` moves four bytes in one VM exit, `out dx, al`
//! one. String I/O (`rep outsb`/`rep insb`) moves `count × width` bytes per exit. A Linux guest
//! agent (PID 1, root) reaches the port from user space with `ioperm(0x510, 1, 1)` and the same
//! instructions, so the tiny test guest and the agent speak over the same device; no serial
//! console framing, no virtio driver in the guest kernel is needed.
//!
//! Reading past the end of what the host has queued is a protocol error ([`ChannelError::Underflow`]),
//! not a blocking read: the host always queues a whole frame before it lets the guest run, and the
//! guest reads exactly the length that frame announces.
//!
//! # Framing
//! Every message, in both directions, is one frame:
//!
//! ```text
//!  offset  size  field
//!  0       4     payload length N, little-endian u32 (at most MAX_PAYLOAD)
//!  4       1     kind (FrameKind)
//!  5       N     payload
//! ```
//!
//! Kinds: `1 READY` (guest→host, empty: the guest finished booting and waits for a request; the
//! host snapshots here), `2 REQUEST` (host→guest: the invocation's input), `3 RESPONSE`
//! (guest→host: the agent sends a little-endian i32 exit code followed by the program's stdout; the
//! test guest sends what it computed), `4 RESEED` (host→guest, 32 bytes of fresh entropy sent after
//! every restore so restored guests do not share their RNG state), `5 LOG` (guest→host: stderr).
//!
//! # Sessions (sandboxes)
//! A sandbox's VM keeps running and carries many TCP streams at once. The host sends `6 SESSION`
//! (the host's wall clock, unix ns u64 LE) after each restore: the agent sets its clock, forgets
//! every stream of a previous life and from then on serves streams — `7 OPEN` (host→guest:
//! stream u32, port u16: connect to `127.0.0.1:port`), `8 DATA` (either way: stream u32, bytes),
//! `9 CLOSE` (either way: stream u32, how u8 — 0 the sender will send no more, 1 reset — and an
//! optional reason), `10 WINDOW` (either way: stream u32, credit u32 — the receiver took that many
//! bytes; a sender keeps at most [`STREAM_WINDOW`] bytes unacknowledged; the guest's first WINDOW
//! on a stream says its connection is up). The guest learns that frames wait for it by reading
//! [`STATUS_PORT`] (a 4-byte `in`: bytes queued for it), so it never reads an empty queue.
//!
//! OPEN's target (after the stream id) is a tag byte and its parameters: `0` a TCP port (u16);
//! `1` a process — exec or a shell (timeout ms u32, pty u8, cols u16, rows u16, the working
//! directory NUL-terminated, argc u16, each argument NUL-terminated, then `KEY=VALUE` entries each
//! NUL-terminated); `2` a file to write (mode u32, path NUL-terminated; the stream's DATA is its
//! content, CLOSE 0 commits it); `3` a file to read (path NUL-terminated; its content comes as
//! DATA, then CLOSE 0). For a process, DATA to the guest is its stdin (or the pty's input) and
//! DATA from it its stdout; `12 STDERR` (guest→host: stream u32, bytes) is its stderr, counted
//! in the same window; `13 RESIZE` (host→guest: stream u32, cols u16, rows u16) resizes its pty;
//! `11 EXIT` (guest→host: stream u32, status i32, timed out u8, then a message) ends a process or
//! file stream after its output: the exit code, or for a file 0 or the errno of the failure.
//! `14 HOOK` runs a lifecycle hook of the image (`/kiln/hooks/<name>`): host→guest a hook u8
//! (2 suspend, 3 terminate); guest→host the hook u8, status i32 (0 also when the image has no such
//! hook) and its output — the guest also answers each SESSION with HOOK 1 (restore).
//! `15 PACKET` (either way: one IPv4 packet of the guest's network interface, `kiln0`) carries
//! the guest's network to the host's user-space stack and back.

use std::collections::VecDeque;

/// The channel's data port.
pub const CHANNEL_PORT: u16 = 0x510;
/// The channel's status port: a guest `in` reads how many bytes are queued for it (u32 LE).
pub const STATUS_PORT: u16 = 0x511;
/// The channel's bulk doorbell (sessions): a guest `out dx, eax` here with `eax` = a length
/// appends that many bytes at the guest-virtual address in `rsi` (through the guest's current
/// page tables, which must map them) to the guest→host stream — a whole frame in one exit. String
/// I/O (`rep outsb`) exits once per byte wherever KVM emulates it, as it does nested (measured:
/// about 8 KiB/s guest→host under nested emulation); this path costs one exit per frame.
pub const BULK_PORT: u16 = 0x515;
/// Bytes a stream's sender may have in flight before the receiver's WINDOW frames credit them.
pub const STREAM_WINDOW: u32 = 256 << 10;

/// Bytes of a frame header: the length and the kind.
pub const HEADER_LEN: usize = 5;

/// The largest payload either side may announce (16 MiB): a guest announcing more is broken or
/// hostile, and is stopped before the host buffers it.
pub const MAX_PAYLOAD: u32 = 16 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Ready = 1,
    Request = 2,
    Response = 3,
    Reseed = 4,
    Log = 5,
    Session = 6,
    Open = 7,
    Data = 8,
    Close = 9,
    Window = 10,
    Exit = 11,
    Stderr = 12,
    Resize = 13,
    Hook = 14,
    Packet = 15,
}

impl FrameKind {
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Ready,
            2 => Self::Request,
            3 => Self::Response,
            4 => Self::Reseed,
            5 => Self::Log,
            6 => Self::Session,
            7 => Self::Open,
            8 => Self::Data,
            9 => Self::Close,
            10 => Self::Window,
            11 => Self::Exit,
            12 => Self::Stderr,
            13 => Self::Resize,
            14 => Self::Hook,
            15 => Self::Packet,
            _ => return None,
        })
    }
}

/// One message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameKind, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            kind,
            payload: payload.into(),
        }
    }

    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.payload);
        out
    }
}

/// A guest that breaks the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    #[error("the guest read {wanted} byte(s) from the channel but only {queued} were queued")]
    Underflow { wanted: usize, queued: usize },
    #[error("the guest announced a {len}-byte frame; the limit is {MAX_PAYLOAD} bytes")]
    Oversized { len: u32 },
    #[error("the guest sent a frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("the host's frame of {len} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    InputTooLarge { len: usize },
}

/// Reassembles the guest→host stream into frames.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Bytes of payload still missing before the frame is complete, once its header is in.
    fn missing(&self) -> Option<usize> {
        let header = self.buf.first_chunk::<HEADER_LEN>()?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            return None;
        }
        Some((HEADER_LEN + len as usize).saturating_sub(self.buf.len()))
    }

    /// Feeds one byte; returns a frame when this byte completes one.
    fn push(&mut self, byte: u8) -> Result<Option<Frame>, ChannelError> {
        self.buf.push(byte);
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            return Err(ChannelError::Oversized { len });
        }
        if self.buf.len() < HEADER_LEN + len as usize {
            return Ok(None);
        }
        let kind = FrameKind::from_byte(self.buf[4]).ok_or(ChannelError::UnknownKind(self.buf[4]))?;
        let payload = self.buf.split_off(HEADER_LEN);
        self.buf.clear();
        Ok(Some(Frame { kind, payload }))
    }
}

/// The channel device: the host→guest queue and the guest→host decoder.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Channel {
    input: VecDeque<u8>,
    decoder: FrameDecoder,
    frames: VecDeque<Frame>,
}

impl Channel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a frame for the guest to read.
    pub fn send(&mut self, frame: &Frame) -> Result<(), ChannelError> {
        if frame.payload.len() > MAX_PAYLOAD as usize {
            return Err(ChannelError::InputTooLarge {
                len: frame.payload.len(),
            });
        }
        self.input.extend(frame.encode());
        Ok(())
    }

    /// Bytes queued for the guest and not read yet.
    pub fn queued(&self) -> usize {
        self.input.len()
    }

    /// A guest `in`: fills `data` from the queue.
    pub fn read(&mut self, data: &mut [u8]) -> Result<(), ChannelError> {
        if data.len() > self.input.len() {
            return Err(ChannelError::Underflow {
                wanted: data.len(),
                queued: self.input.len(),
            });
        }
        let wanted = data.len();
        for (slot, byte) in data.iter_mut().zip(self.input.drain(..wanted)) {
            *slot = byte;
        }
        Ok(())
    }

    /// A guest `out`: feeds the decoder. Returns true when at least one frame is complete.
    pub fn write(&mut self, mut data: &[u8]) -> Result<bool, ChannelError> {
        while !data.is_empty() {
            // A frame's payload is copied in bulk (a page per exit with `rep outsb`), its header
            // byte by byte.
            let taken = match self.decoder.missing() {
                Some(missing) if missing > 0 => {
                    let n = missing.min(data.len());
                    self.decoder.buf.extend_from_slice(&data[..n - 1]);
                    n - 1
                }
                _ => 0,
            };
            if let Some(frame) = self.decoder.push(data[taken])? {
                self.frames.push_back(frame);
            }
            data = &data[taken + 1..];
        }
        Ok(!self.frames.is_empty())
    }

    /// The oldest complete frame from the guest.
    pub fn take_frame(&mut self) -> Option<Frame> {
        self.frames.pop_front()
    }

    /// The device state a snapshot records: the unread input and a partial output frame.
    /// Complete frames not yet taken are part of the partial output, re-encoded, so nothing is lost.
    pub fn save(&self) -> Vec<u8> {
        let mut pending = Vec::new();
        for frame in &self.frames {
            pending.extend(frame.encode());
        }
        pending.extend_from_slice(&self.decoder.buf);
        let input: Vec<u8> = self.input.iter().copied().collect();
        let mut out = Vec::with_capacity(8 + input.len() + pending.len());
        out.extend_from_slice(&(input.len() as u32).to_le_bytes());
        out.extend_from_slice(&input);
        out.extend_from_slice(&(pending.len() as u32).to_le_bytes());
        out.extend_from_slice(&pending);
        out
    }

    /// The inverse of [`Channel::save`]; `None` when the bytes are not a saved channel.
    pub fn restore(bytes: &[u8]) -> Option<Self> {
        let (input, rest) = take_prefixed(bytes)?;
        let (pending, rest) = take_prefixed(rest)?;
        if !rest.is_empty() {
            return None;
        }
        let mut channel = Channel {
            input: input.iter().copied().collect(),
            ..Channel::default()
        };
        channel.write(pending).ok()?;
        Some(channel)
    }
}

fn take_prefixed(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let body = bytes.get(4..4 + len)?;
    Some((body, &bytes[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_stream_at_any_access_width() {
        let frame = Frame::new(FrameKind::Response, b"hello, guest".to_vec());
        let wire = frame.encode();
        assert_eq!(&wire[..5], &[12, 0, 0, 0, 3]);
        for width in [1, 2, 4, 7] {
            let mut channel = Channel::new();
            let mut done = false;
            for chunk in wire.chunks(width) {
                assert!(!done, "a frame completed before its last byte");
                done = channel.write(chunk).unwrap();
            }
            assert!(done);
            assert_eq!(channel.take_frame(), Some(frame.clone()));
            assert_eq!(channel.take_frame(), None);
        }
    }

    #[test]
    fn large_frames_back_to_back_decode_in_order_whatever_the_chunking() {
        let first = Frame::new(FrameKind::Data, (0..70_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let second = Frame::new(FrameKind::Window, vec![1, 0, 0, 0, 0, 4, 0, 0]);
        let mut wire = first.encode();
        wire.extend(second.encode());
        for width in [3, 4096, wire.len()] {
            let mut channel = Channel::new();
            for chunk in wire.chunks(width) {
                channel.write(chunk).unwrap();
            }
            assert_eq!(channel.take_frame(), Some(first.clone()), "width {width}");
            assert_eq!(channel.take_frame(), Some(second.clone()), "width {width}");
            assert_eq!(channel.take_frame(), None);
        }
    }

    #[test]
    fn reading_past_the_queue_is_an_underflow() {
        let mut channel = Channel::new();
        channel.send(&Frame::new(FrameKind::Request, vec![7])).unwrap();
        let mut header = [0u8; 4];
        channel.read(&mut header).unwrap();
        assert_eq!(u32::from_le_bytes(header), 1);
        let mut rest = [0u8; 4];
        assert_eq!(
            channel.read(&mut rest),
            Err(ChannelError::Underflow { wanted: 4, queued: 2 })
        );
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused() {
        let mut channel = Channel::new();
        assert_eq!(
            channel
                .write(&(MAX_PAYLOAD + 1).to_le_bytes())
                .and_then(|_| channel.write(&[3])),
            Err(ChannelError::Oversized { len: MAX_PAYLOAD + 1 })
        );
        let mut channel = Channel::new();
        assert_eq!(channel.write(&[0, 0, 0, 0, 99]), Err(ChannelError::UnknownKind(99)));
    }

    #[test]
    fn saved_state_keeps_unread_input_and_partial_output() {
        let mut channel = Channel::new();
        channel.send(&Frame::new(FrameKind::Request, b"abc".to_vec())).unwrap();
        channel.read(&mut [0u8; 2]).unwrap();
        channel.write(&[2, 0, 0]).unwrap();
        let restored = Channel::restore(&channel.save()).unwrap();
        assert_eq!(restored, channel);
        assert_eq!(Channel::restore(&[1, 0]), None);
    }
}
