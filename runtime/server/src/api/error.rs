//! The one place where failures become HTTP answers. Every error of the core arrives as a
//! [`Problem`] (code, message, details — `kiln_core::problem`); here it gets its status, from the
//! code alone, and its JSON body `{"error": {"code", "message", ...details}}`. The constructors
//! below are for what only the edge can find wrong (a token, a path, a body).

use http::StatusCode;
use kiln_core::problem::{ErrorCode, Problem};
use serde_json::json;

/// The status of every error code, as `../shared/API.md`'s table gives it.
pub fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::InvalidCode => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::FunctionFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The JSON body of an error answer.
pub fn body(problem: &Problem) -> Vec<u8> {
    serde_json::to_vec(&json!({ "error": problem.object() })).expect("JSON of strings serialises")
}

pub fn unauthorized() -> Problem {
    Problem::new(ErrorCode::Unauthorized, "missing or invalid bearer token")
}

pub fn forbidden(message: impl Into<String>) -> Problem {
    Problem::new(ErrorCode::Forbidden, message)
}

pub fn not_found(message: impl Into<String>) -> Problem {
    Problem::new(ErrorCode::NotFound, message)
}

pub fn invalid_request(message: impl Into<String>) -> Problem {
    Problem::new(ErrorCode::InvalidRequest, message)
}

pub fn payload_too_large(limit: u64) -> Problem {
    Problem::new(
        ErrorCode::PayloadTooLarge,
        format!("request body is larger than the limit of {limit} bytes"),
    )
}

pub fn unavailable(message: impl Into<String>) -> Problem {
    Problem::new(ErrorCode::Unavailable, message)
}

pub fn shutting_down() -> Problem {
    unavailable("kiln is shutting down")
}

pub fn method_not_allowed() -> Problem {
    Problem::new(ErrorCode::MethodNotAllowed, "this path does not accept that method")
}

pub fn request_timeout(message: impl Into<String>) -> Problem {
    Problem::new(ErrorCode::RequestTimeout, message)
}

/// A function name the API refuses before it touches a path or a query.
pub fn invalid_function_name(name: &str) -> Problem {
    invalid_request(format!(
        "invalid function name {name:?}: names match ^[a-z0-9][a-z0-9_-]{{0,63}}$"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_the_contracts_status() {
        for (code, expected) in [
            (ErrorCode::Unauthorized, 401),
            (ErrorCode::Forbidden, 403),
            (ErrorCode::NotFound, 404),
            (ErrorCode::InvalidRequest, 400),
            (ErrorCode::InvalidCode, 422),
            (ErrorCode::PayloadTooLarge, 413),
            (ErrorCode::TooManyRequests, 429),
            (ErrorCode::FunctionFailed, 502),
            (ErrorCode::Timeout, 504),
            (ErrorCode::Unavailable, 503),
            (ErrorCode::Conflict, 409),
            (ErrorCode::InsufficientStorage, 507),
        ] {
            assert_eq!(status(code).as_u16(), expected, "{code:?}");
        }
        let body: serde_json::Value = serde_json::from_slice(&body(&forbidden("no"))).unwrap();
        assert_eq!(body, json!({"error": {"code": "forbidden", "message": "no"}}));
    }
}
