//! The one vocabulary of errors Kiln's users see: a machine code from `../shared/API.md`'s table, a
//! message for a person, and the extra fields some codes carry (`trap`, `exit_code`, `stderr` of a
//! failed function). Every error of the core becomes a [`Problem`] here, in one place; the server
//! adds the HTTP status (its `api::error`), and asynchronous invocations keep the same object in
//! their record, so a failure reads the same whichever way it is fetched.

use serde_json::{Map, Value};

use crate::auth::TokenError;
use crate::connectors::ConnectorError;
use crate::deploy::DeployError;
use crate::functions::LoadError;
use crate::invocations::SubmitError;
use crate::outcome::InvokeError;
use crate::sandboxes::SandboxError;
use crate::storage::StorageError;

/// The `code` of an error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    NotFound,
    InvalidRequest,
    InvalidCode,
    PayloadTooLarge,
    TooManyRequests,
    FunctionFailed,
    Timeout,
    Unavailable,
    Conflict,
    InsufficientStorage,
    MethodNotAllowed,
    RequestTimeout,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidCode => "invalid_code",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::FunctionFailed => "function_failed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Conflict => "conflict",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An error as the user is told it.
#[derive(Debug, Clone)]
pub struct Problem {
    pub code: ErrorCode,
    pub message: String,
    /// Extra fields of the error object (`trap`, `exit_code`, `stderr` for failed functions).
    pub details: Map<String, Value>,
}

impl Problem {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Problem {
        Problem {
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    /// A failure inside Kiln: logged with its cause; the user is told only that it happened.
    pub fn internal(cause: impl std::fmt::Display) -> Problem {
        tracing::error!(error = %cause, "internal error");
        Problem::new(ErrorCode::Internal, "internal error; see the server log")
    }

    /// The error object: `{"code", "message", ...details}`.
    pub fn object(&self) -> Value {
        let mut error = Map::with_capacity(2 + self.details.len());
        error.insert("code".into(), self.code.as_str().into());
        error.insert("message".into(), self.message.clone().into());
        error.extend(self.details.clone());
        Value::Object(error)
    }
}

/// The database's errors: unreachable is `503 unavailable` (the same request may work in a moment);
/// anything else is Kiln's own failure.
impl From<StorageError> for Problem {
    fn from(e: StorageError) -> Problem {
        if e.is_unreachable() {
            return StorageError::unreachable_problem(&e);
        }
        Problem::internal(e)
    }
}

impl StorageError {
    /// `503 unavailable`: the database could not be reached (`cause` is logged, not shown).
    fn unreachable_problem(cause: &dyn std::fmt::Display) -> Problem {
        tracing::warn!(error = %cause, "the database cannot be reached");
        Problem::new(
            ErrorCode::Unavailable,
            "the database cannot be reached; try again (the server log has the cause)",
        )
    }
}

impl From<TokenError> for Problem {
    fn from(e: TokenError) -> Problem {
        match e {
            TokenError::Store(e) => e.into(),
            e @ TokenError::Corrupt(_) => Problem::internal(e),
        }
    }
}

impl From<DeployError> for Problem {
    fn from(e: DeployError) -> Problem {
        match e {
            DeployError::InvalidCode(msg) => Problem::new(ErrorCode::InvalidCode, msg),
            DeployError::InvalidConfig(msg) => Problem::new(ErrorCode::InvalidRequest, msg),
            DeployError::Store(e @ StorageError::UnknownConnector(_)) => {
                Problem::new(ErrorCode::InvalidRequest, e.to_string())
            }
            DeployError::TierUnavailable(msg) => Problem::new(ErrorCode::Unavailable, msg),
            e @ DeployError::BlobStore(_) => Problem::new(ErrorCode::Unavailable, e.to_string()),
            e @ DeployError::NotFound(_) => Problem::new(ErrorCode::NotFound, e.to_string()),
            e @ DeployError::InsufficientStorage(_) => Problem::new(ErrorCode::InsufficientStorage, e.to_string()),
            DeployError::Store(e) => e.into(),
            e @ (DeployError::Io(_) | DeployError::Cache(_)) => Problem::internal(e),
        }
    }
}

impl From<LoadError> for Problem {
    fn from(e: LoadError) -> Problem {
        match e {
            e @ (LoadError::NoFunction(_) | LoadError::NoVersion(..)) => {
                Problem::new(ErrorCode::NotFound, e.to_string())
            }
            LoadError::Store(e) => e.into(),
            e @ (LoadError::Compile(_) | LoadError::Link(_)) => Problem::internal(e),
            LoadError::Unavailable(reason) => Problem::new(ErrorCode::Unavailable, reason),
        }
    }
}

impl From<InvokeError> for Problem {
    fn from(e: InvokeError) -> Problem {
        match e {
            e @ (InvokeError::FunctionBusy(..) | InvokeError::PoolBusy(_)) => {
                Problem::new(ErrorCode::TooManyRequests, e.to_string())
            }
            e @ InvokeError::Timeout(_) => Problem::new(ErrorCode::Timeout, e.to_string()),
            e @ (InvokeError::HttpTrigger(_) | InvokeError::NotHttpTrigger(_)) => {
                Problem::new(ErrorCode::InvalidRequest, e.to_string())
            }
            InvokeError::Failed(failure) => {
                let mut problem = Problem::new(ErrorCode::FunctionFailed, failure.message);
                if let Some(trap) = failure.trap {
                    problem.details.insert("trap".into(), trap.into());
                }
                if let Some(code) = failure.exit_code {
                    problem.details.insert("exit_code".into(), code.into());
                }
                problem.details.insert("stderr".into(), failure.stderr_tail.into());
                problem
            }
        }
    }
}

impl From<SubmitError> for Problem {
    fn from(e: SubmitError) -> Problem {
        match e {
            e @ SubmitError::QueueFull(_) => Problem::new(ErrorCode::TooManyRequests, e.to_string()),
            SubmitError::Closed => Problem::new(ErrorCode::Unavailable, "kiln is shutting down"),
            e @ SubmitError::InsufficientStorage(_) => Problem::new(ErrorCode::InsufficientStorage, e.to_string()),
            SubmitError::Store(e) => e.into(),
            e @ SubmitError::Commit(_) => Problem::internal(e),
            SubmitError::Unreachable(cause) => StorageError::unreachable_problem(&cause),
        }
    }
}

impl From<SandboxError> for Problem {
    fn from(e: SandboxError) -> Problem {
        match e {
            e @ SandboxError::NotFound(_) => Problem::new(ErrorCode::NotFound, e.to_string()),
            SandboxError::Invalid(message) => Problem::new(ErrorCode::InvalidRequest, message),
            SandboxError::Storage(e @ StorageError::UnknownConnector(_)) => {
                Problem::new(ErrorCode::InvalidRequest, e.to_string())
            }
            SandboxError::Conflict(message) => Problem::new(ErrorCode::Conflict, message),
            e @ SandboxError::Unauthorized => Problem::new(ErrorCode::Unauthorized, e.to_string()),
            SandboxError::Forbidden(message) => Problem::new(ErrorCode::Forbidden, message),
            e @ SandboxError::TooMany(_) => Problem::new(ErrorCode::TooManyRequests, e.to_string()),
            SandboxError::Unavailable(message) => Problem::new(ErrorCode::Unavailable, message),
            SandboxError::Load(e) => e.into(),
            SandboxError::Invoke(e) => e.into(),
            e @ SandboxError::InsufficientStorage(_) => Problem::new(ErrorCode::InsufficientStorage, e.to_string()),
            SandboxError::Storage(e) => e.into(),
            e @ SandboxError::State(_) => Problem::internal(e),
        }
    }
}

impl From<ConnectorError> for Problem {
    fn from(e: ConnectorError) -> Problem {
        match e {
            ConnectorError::Invalid(message) => Problem::new(ErrorCode::InvalidRequest, message),
            e @ ConnectorError::NotFound(_) => Problem::new(ErrorCode::NotFound, e.to_string()),
            e @ ConnectorError::Exists(_) => Problem::new(ErrorCode::Conflict, e.to_string()),
            ConnectorError::InUse { ref uses, .. } => {
                let used_by = serde_json::to_value(uses).expect("uses serialise");
                let mut problem = Problem::new(ErrorCode::Conflict, e.to_string());
                problem.details.insert("used_by".into(), used_by);
                problem
            }
            ConnectorError::Store(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Failure;

    #[test]
    fn outcomes_map_to_the_contracts_codes_and_fields() {
        let failed = Problem::from(InvokeError::Failed(Failure {
            message: "the function exited with code 3".into(),
            trap: None,
            exit_code: Some(3),
            stderr_tail: "bad input\n".into(),
        }));
        assert_eq!(
            failed.object(),
            serde_json::json!({"code": "function_failed", "message": "the function exited with code 3",
                "exit_code": 3, "stderr": "bad input\n"})
        );
        let cases = [
            (Problem::from(InvokeError::Timeout(5)), "timeout"),
            (
                Problem::from(InvokeError::FunctionBusy("f".into(), 1)),
                "too_many_requests",
            ),
            (Problem::from(InvokeError::PoolBusy(9)), "too_many_requests"),
            (Problem::from(InvokeError::HttpTrigger("f".into())), "invalid_request"),
            (Problem::from(LoadError::NoVersion("f".into(), 2)), "not_found"),
            (Problem::from(LoadError::Unavailable("no kvm".into())), "unavailable"),
            (Problem::from(DeployError::InvalidCode("bad".into())), "invalid_code"),
            (Problem::from(SubmitError::QueueFull(3)), "too_many_requests"),
            (Problem::from(SubmitError::Closed), "unavailable"),
        ];
        for (problem, code) in cases {
            assert_eq!(problem.code.as_str(), code, "{problem:?}");
            assert_eq!(problem.object()["code"], code);
        }
        let internal = Problem::from(DeployError::Cache("disk on fire".into()));
        assert_eq!(internal.code, ErrorCode::Internal);
        assert!(
            !internal.message.contains("disk on fire"),
            "causes stay in the server log"
        );
    }
}
