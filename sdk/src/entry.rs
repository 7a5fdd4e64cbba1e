//! What the attribute macros call: the JSON-over-stdio entry point of a function, and the
//! wrappers that run the init and restore hooks. Kept here, as ordinary generic functions, so the
//! macros stay a few lines and the compiler checks the user's signatures against these bounds.

use std::fmt::Display;
use std::io::{Read, Write};
use std::process::ExitCode;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Exit code when the function returned `Err`: its message is on stderr.
pub const EXIT_FAILED: u8 = 1;
/// Exit code when the request body is not the JSON the function takes.
pub const EXIT_INVALID_INPUT: u8 = 2;
/// Exit code when the function's output could not be serialised or written.
pub const EXIT_INVALID_OUTPUT: u8 = 3;

/// Reads stdin as JSON, calls `handler`, writes its output as JSON on stdout. An error goes to
/// stderr as one line of text, and the exit code says which kind it was.
pub fn run_function<T, U, E>(handler: impl FnOnce(T) -> Result<U, E>) -> ExitCode
where
    T: DeserializeOwned,
    U: Serialize,
    E: Display,
{
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        return fail(EXIT_INVALID_INPUT, format_args!("cannot read the request body: {e}"));
    }
    let json = match call(&body, handler) {
        Ok(json) => json,
        Err(Failure { code, message }) => return fail(code, format_args!("{message}")),
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(&json).and_then(|()| stdout.flush()) {
        return fail(EXIT_INVALID_OUTPUT, format_args!("cannot write the output: {e}"));
    }
    ExitCode::SUCCESS
}

/// Why a call failed: the exit code and the line for stderr.
#[derive(Debug, PartialEq)]
struct Failure {
    code: u8,
    message: String,
}

/// The request body through `handler`: the response body, or the failure to report.
fn call<T, U, E>(body: &[u8], handler: impl FnOnce(T) -> Result<U, E>) -> Result<Vec<u8>, Failure>
where
    T: DeserializeOwned,
    U: Serialize,
    E: Display,
{
    let failure = |code, message| Failure { code, message };
    // An empty body is JSON `null`, so `Option<T>` and `()` take a request without one.
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_slice(b"null")
    } else {
        serde_json::from_slice(body)
    };
    let input = parsed.map_err(|e| failure(EXIT_INVALID_INPUT, format!("invalid input: {e}")))?;
    let output = handler(input).map_err(|e| failure(EXIT_FAILED, e.to_string()))?;
    serde_json::to_vec(&output).map_err(|e| failure(EXIT_INVALID_OUTPUT, format!("cannot serialise the output: {e}")))
}

fn fail(code: u8, message: std::fmt::Arguments<'_>) -> ExitCode {
    // One write, so the message is one piece of the stderr tail Kiln reports.
    let line = format!("{message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    ExitCode::from(code)
}

/// What an init hook may return: nothing, or a `Result` whose error fails the deploy.
pub trait InitOutcome {
    /// `Err` with the message to report, when the hook failed.
    fn into_result(self) -> Result<(), String>;
}

impl InitOutcome for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Display> InitOutcome for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// Runs the init hook. A failure is printed on stderr and ends the program with
/// [`EXIT_FAILED`], which makes Kiln refuse the deploy with that text.
pub fn run_init<R: InitOutcome>(hook: impl FnOnce() -> R) {
    if let Err(message) = hook().into_result() {
        let _ = fail(EXIT_FAILED, format_args!("init failed: {message}"));
        std::process::exit(EXIT_FAILED.into());
    }
}

/// Runs the restore hook.
pub fn run_restore(hook: impl FnOnce()) {
    hook();
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn greet(name: Option<String>) -> Result<String, String> {
        match name {
            Some(name) if name.is_empty() => Err("the name is empty".into()),
            Some(name) => Ok(format!("Hello, {name}!")),
            None => Ok("Hello, stranger!".into()),
        }
    }

    #[test]
    fn json_in_json_out() {
        assert_eq!(call(br#""Ada""#, greet).unwrap(), br#""Hello, Ada!""#);
    }

    #[test]
    fn an_empty_body_is_null() {
        assert_eq!(call(b"", greet).unwrap(), br#""Hello, stranger!""#);
        assert_eq!(call(b" \n", greet).unwrap(), br#""Hello, stranger!""#);
        let err = call(b"", |n: u32| Ok::<_, String>(n)).unwrap_err();
        assert_eq!(err.code, EXIT_INVALID_INPUT);
        assert!(err.message.starts_with("invalid input: invalid type: null"), "{err:?}");
    }

    #[test]
    fn errors_carry_their_exit_code_and_text() {
        assert_eq!(
            call(br#""""#, greet),
            Err(Failure {
                code: EXIT_FAILED,
                message: "the name is empty".into()
            })
        );
        let err = call(b"{not json", greet).unwrap_err();
        assert_eq!(err.code, EXIT_INVALID_INPUT);
        assert!(err.message.starts_with("invalid input: "), "{err:?}");
        // JSON object keys must be strings.
        let err = call(b"null", |()| Ok::<_, String>(HashMap::from([((1, 2), 3)]))).unwrap_err();
        assert_eq!(err.code, EXIT_INVALID_OUTPUT);
        assert!(err.message.starts_with("cannot serialise the output: "), "{err:?}");
    }
}
