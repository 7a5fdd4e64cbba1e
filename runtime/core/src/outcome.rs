//! What an invocation ends with, whichever tier ran it: a [`Success`] with the guest's output, or
//! an [`InvokeError`] saying whose doing it was — the guest's ([`InvokeError::Failed`],
//! [`InvokeError::Timeout`]) or a capacity answer the caller may retry. The server maps these to
//! statuses through [`crate::problem`]; nothing here knows HTTP or a tier's types.

use bytes::Bytes;

const MIB: usize = 1 << 20;

/// Output caps of one invocation. The body cap matches the sync input cap (Lambda's 6 MB); stderr
/// is a log, kept short so a flood cannot grow the host.
pub const STDOUT_CAP: usize = 6 * MIB;
pub const STDERR_CAP: usize = 64 * 1024;
/// Bytes of stderr an error body (or an invocation record) carries.
pub const STDERR_TAIL: usize = 4096;

/// A successful invocation: the guest exited 0.
#[derive(Debug)]
pub struct Success {
    pub stdout: Bytes,
    /// The last [`STDERR_TAIL`] bytes of the guest's log, kept with the invocation.
    pub stderr_tail: String,
}

/// Why an invocation did not succeed. `Failed` and `Timeout` are the guest's doing; the others are
/// capacity answers the caller may retry, or a request for the wrong kind of function.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("function `{0}` is already running its maximum of {1} concurrent invocations")]
    FunctionBusy(String, u32),
    #[error("the server is running its maximum of {0} concurrent instances")]
    PoolBusy(u32),
    #[error("the function ran past its timeout of {0} ms")]
    Timeout(u64),
    #[error("{}", .0.message)]
    Failed(Failure),
    #[error("function `{0}` is an HTTP-trigger function: call it at /fn/{0}/")]
    HttpTrigger(String),
    #[error("function `{0}` is not an HTTP-trigger function: invoke it at /v1/functions/{0}/invoke")]
    NotHttpTrigger(String),
}

impl InvokeError {
    /// A failure Kiln explains itself (no trap, exit code or guest output to add).
    pub fn failed(message: String) -> InvokeError {
        InvokeError::Failed(Failure {
            message,
            trap: None,
            exit_code: None,
            stderr_tail: String::new(),
        })
    }

    /// Not run at all: the function's or the server's capacity was taken.
    pub fn is_busy(&self) -> bool {
        matches!(self, InvokeError::FunctionBusy(..) | InvokeError::PoolBusy(_))
    }
}

/// What the caller learns of a failed guest.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub trap: Option<String>,
    pub exit_code: Option<i32>,
    pub stderr_tail: String,
}
