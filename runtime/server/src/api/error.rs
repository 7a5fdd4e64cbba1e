//! The one place where failures become HTTP answers: status code plus the JSON body of the API
//! contract, `{"error": {"code", "message", ...details}}`.

use http::StatusCode;
use serde_json::{json, Map, Value};

use crate::app::LoadError;
use crate::deploy::DeployError;
use crate::invoke::InvokeError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra fields of the error object (`trap`, `exit_code`, `stderr` for failed functions).
    pub details: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn payload_too_large(limit: u64) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this path does not accept that method",
        )
    }
    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %message, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    /// The error object: `{"code", "message", ...details}`.
    pub fn object(&self) -> Value {
        let mut error = Map::with_capacity(2 + self.details.len());
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.clone().into());
        error.extend(self.details.clone());
        Value::Object(error)
    }

    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({ "error": self.object() })).expect("JSON of strings serialises")
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> ApiError {
        match e {
            DeployError::InvalidCode(msg) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_code", msg),
            DeployError::TierUnavailable(msg) => ApiError::unavailable(msg),
            e @ DeployError::NotFound(_) => ApiError::not_found(e.to_string()),
            e @ (DeployError::Store(_) | DeployError::Io(_) | DeployError::Cache(_)) => ApiError::internal(e),
        }
    }
}

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> ApiError {
        match e {
            e @ (LoadError::NoFunction(_) | LoadError::NoVersion(..)) => ApiError::not_found(e.to_string()),
            e @ (LoadError::Store(_) | LoadError::Compile(_) | LoadError::Link(_)) => ApiError::internal(e),
            LoadError::Unavailable(reason) => ApiError::unavailable(reason),
        }
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> ApiError {
        match e {
            e @ (InvokeError::FunctionBusy(..) | InvokeError::PoolBusy(_)) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", e.to_string())
            }
            e @ InvokeError::Timeout(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", e.to_string()),
            e @ (InvokeError::HttpTrigger(_) | InvokeError::NotHttpTrigger(_)) => {
                ApiError::invalid_request(e.to_string())
            }
            InvokeError::Failed(failure) => {
                let mut error = ApiError::new(StatusCode::BAD_GATEWAY, "function_failed", failure.message);
                if let Some(trap) = failure.trap {
                    error.details.insert("trap".into(), trap.into());
                }
                if let Some(code) = failure.exit_code {
                    error.details.insert("exit_code".into(), code.into());
                }
                error.details.insert("stderr".into(), failure.stderr_tail.into());
                error
            }
        }
    }
}
