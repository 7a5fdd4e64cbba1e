//! Lambda's error shape, the one place the Lambda API's failures become HTTP: a status, the
//! `x-amzn-ErrorType` header the SDKs read the exception's name from, and `{"Type", "message"}`.
//! Kiln's own [`Problem`]s map onto Lambda's exceptions by their code.

use http::{Response, StatusCode};
use kiln_core::problem::{ErrorCode, Problem};
use serde_json::json;

use super::sigv4::Refused;
use crate::api::body::{self, Body};

#[derive(Debug)]
pub struct LambdaError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl LambdaError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> LambdaError {
        LambdaError {
            status,
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> LambdaError {
        LambdaError::new(StatusCode::BAD_REQUEST, "InvalidParameterValueException", message)
    }

    pub fn not_found(message: impl Into<String>) -> LambdaError {
        LambdaError::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
    }

    pub fn conflict(message: impl Into<String>) -> LambdaError {
        LambdaError::new(StatusCode::CONFLICT, "ResourceConflictException", message)
    }

    pub fn access_denied(message: impl Into<String>) -> LambdaError {
        LambdaError::new(StatusCode::FORBIDDEN, "AccessDeniedException", message)
    }

    pub fn signature(refused: Refused) -> LambdaError {
        let kind = match refused {
            Refused::UnknownKey => "UnrecognizedClientException",
            _ => "InvalidSignatureException",
        };
        LambdaError::new(StatusCode::FORBIDDEN, kind, refused.to_string())
    }

    pub fn internal(error: impl std::fmt::Display) -> LambdaError {
        tracing::error!(%error, "lambda api: internal error");
        LambdaError::new(StatusCode::INTERNAL_SERVER_ERROR, "ServiceException", "internal error")
    }

    pub fn response(&self) -> Response<Body> {
        let mut response = body::json(self.status, &json!({ "Type": "User", "message": self.message }));
        response
            .headers_mut()
            .insert("x-amzn-errortype", http::HeaderValue::from_static(self.kind));
        response
    }
}

impl From<Problem> for LambdaError {
    fn from(problem: Problem) -> LambdaError {
        let (status, kind) = match problem.code {
            ErrorCode::Unauthorized => (StatusCode::FORBIDDEN, "UnrecognizedClientException"),
            ErrorCode::Forbidden => (StatusCode::FORBIDDEN, "AccessDeniedException"),
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            ErrorCode::InvalidRequest | ErrorCode::InvalidCode | ErrorCode::MethodNotAllowed => {
                (StatusCode::BAD_REQUEST, "InvalidParameterValueException")
            }
            ErrorCode::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLargeException"),
            ErrorCode::TooManyRequests => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsException"),
            ErrorCode::Conflict => (StatusCode::CONFLICT, "ResourceConflictException"),
            ErrorCode::InsufficientStorage => (StatusCode::BAD_REQUEST, "CodeStorageExceededException"),
            ErrorCode::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "RequestTimeoutException"),
            ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "ServiceException"),
            // A function's own failure is answered as Lambda does (`invoke.rs`), not as an error.
            ErrorCode::FunctionFailed | ErrorCode::Timeout | ErrorCode::Internal => {
                (StatusCode::INTERNAL_SERVER_ERROR, "ServiceException")
            }
        };
        LambdaError::new(status, kind, problem.message)
    }
}
