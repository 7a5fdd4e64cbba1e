//! The VMM channel: a guest→host byte stream fed to the frame decoder (`Channel::write`) in chunks
//! of the input's first byte (1 to 8, as port I/O widths), checked against an independent model of
//! the framing; the device state saved and restored after every chunk; the decoded frames sent
//! back host→guest and read in the same chunks; and `Channel::restore` of the raw input.
#![no_main]

use std::collections::VecDeque;

use kiln_vmm::devices::channel::{Channel, ChannelError, Frame, FrameKind, HEADER_LEN, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(restored) = Channel::restore(data) {
        assert_eq!(Channel::restore(&restored.save()).as_ref(), Some(&restored));
    }
    let Some((&width, stream)) = data.split_first() else {
        return;
    };
    let width = usize::from(width % 8) + 1;
    let mut channel = Channel::new();
    let mut model = Model::default();
    let mut frames = Vec::new();
    for chunk in stream.chunks(width) {
        let expected = model.write(chunk);
        let got = channel.write(chunk);
        match (&expected, &got) {
            (Err(e), Err(g)) => {
                assert_eq!(e, g);
                return; // A guest that breaks the protocol is stopped.
            }
            (Ok(()), Ok(complete)) => assert_eq!(*complete, !model.frames.is_empty()),
            _ => panic!("decoder {got:?}, model {expected:?}"),
        }
        let restored = Channel::restore(&channel.save()).expect("a saved channel restores");
        assert_eq!(restored, channel, "save/restore changed the channel");
        channel = restored;
        if chunk[0] & 1 == 0 {
            while let Some(frame) = channel.take_frame() {
                assert_eq!(Some(&frame), model.frames.front());
                model.frames.pop_front();
                frames.push(frame);
            }
        }
    }

    // Host → guest: what was sent is read back, byte for byte, at the same width.
    let mut channel = Channel::new();
    let mut wire = Vec::new();
    for frame in &frames {
        channel.send(frame).unwrap();
        wire.extend(frame.encode());
    }
    assert_eq!(channel.queued(), wire.len());
    let restored = Channel::restore(&channel.save()).unwrap();
    assert_eq!(restored, channel);
    for chunk in wire.chunks(width) {
        let mut read = vec![0; chunk.len()];
        channel.read(&mut read).unwrap();
        assert_eq!(read, chunk);
    }
    assert_eq!(
        channel.read(&mut [0]),
        Err(ChannelError::Underflow { wanted: 1, queued: 0 })
    );
});

/// The framing of `devices::channel`, written from its documentation: u32 length (at most
/// `MAX_PAYLOAD`, refused as soon as the header is in), kind byte (1 to 5, checked once the
/// payload is in), payload.
#[derive(Default)]
struct Model {
    pending: Vec<u8>,
    frames: VecDeque<Frame>,
}

impl Model {
    fn write(&mut self, bytes: &[u8]) -> Result<(), ChannelError> {
        for &byte in bytes {
            self.pending.push(byte);
            if self.pending.len() < HEADER_LEN {
                continue;
            }
            let len = u32::from_le_bytes(self.pending[..4].try_into().unwrap());
            if len > MAX_PAYLOAD {
                return Err(ChannelError::Oversized { len });
            }
            if self.pending.len() == HEADER_LEN + len as usize {
                let kind = match self.pending[4] {
                    1 => FrameKind::Ready,
                    2 => FrameKind::Request,
                    3 => FrameKind::Response,
                    4 => FrameKind::Reseed,
                    5 => FrameKind::Log,
                    other => return Err(ChannelError::UnknownKind(other)),
                };
                self.frames.push_back(Frame::new(kind, &self.pending[HEADER_LEN..]));
                self.pending.clear();
            }
        }
        Ok(())
    }
}
