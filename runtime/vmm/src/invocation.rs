//! One invocation of a restored guest, as Kiln runs it: the host queues RESEED (fresh entropy, so
//! guests restored from one snapshot do not share random state) and REQUEST (the input) together,
//! then runs the guest until it answers RESPONSE; LOG frames before it are the function's stderr.
//!
//! A RESPONSE payload is the function's exit code (little-endian `i32`) followed by its stdout,
//! as the guest agent sends it. The whole exchange has one deadline: the vCPU is kicked when it
//! passes, whatever the guest is doing.

use std::time::{Duration, Instant};

use crate::builder::{MicroVm, RequestError};
use crate::devices::channel::{Frame, FrameKind};
use crate::vstate::vcpu::RunError;

/// Bytes of entropy a RESEED frame carries.
pub const SEED_LEN: usize = 32;

/// What a guest answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    /// The LOG frames' payloads (stderr), at most the caller's cap; `log_truncated` says if more
    /// was dropped.
    pub log: Vec<u8>,
    pub log_truncated: bool,
}

/// Failure of one invocation.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("the guest answered with a {0:?} frame instead of a response")]
    UnexpectedFrame(FrameKind),
    #[error("the guest's response is {0} bytes, too short to hold an exit code")]
    ShortResponse(usize),
}

impl InvokeError {
    /// The run error behind this failure, if the vCPU stopped (timeout, memory limit, ...).
    pub fn run_error(&self) -> Option<&RunError> {
        match self {
            InvokeError::Request(RequestError::Run(e)) => Some(e),
            _ => None,
        }
    }
}

impl MicroVm {
    /// Sends `seed` as RESEED and `input` as REQUEST, and runs the guest until its RESPONSE, at
    /// most `timeout` in all; keeps at most `log_cap` bytes of LOG frames.
    pub fn invoke(
        &mut self,
        seed: &[u8; SEED_LEN],
        input: &[u8],
        timeout: Duration,
        log_cap: usize,
    ) -> Result<Reply, InvokeError> {
        let deadline = Instant::now() + timeout;
        self.send(&Frame::new(FrameKind::Reseed, seed.to_vec()))?;
        self.send(&Frame::new(FrameKind::Request, input))?;
        let mut log = Vec::new();
        let mut log_truncated = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = match self.run_until_frame(left) {
                Ok(frame) => frame,
                // The deadline is the invocation's, not this slice's: report it whole.
                Err(RunError::Timeout(_)) => return Err(RequestError::Run(RunError::Timeout(timeout)).into()),
                Err(e) => return Err(RequestError::Run(e).into()),
            };
            match frame.kind {
                FrameKind::Log => {
                    let room = log_cap - log.len();
                    log_truncated |= frame.payload.len() > room;
                    log.extend_from_slice(&frame.payload[..frame.payload.len().min(room)]);
                }
                FrameKind::Response => {
                    let Some((code, stdout)) = frame.payload.split_first_chunk::<4>() else {
                        return Err(InvokeError::ShortResponse(frame.payload.len()));
                    };
                    return Ok(Reply {
                        exit_code: i32::from_le_bytes(*code),
                        stdout: stdout.to_vec(),
                        log,
                        log_truncated,
                    });
                }
                kind => return Err(InvokeError::UnexpectedFrame(kind)),
            }
        }
    }
}
