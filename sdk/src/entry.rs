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
    // An empty body is JSON `null`, so `Option<T>` and `()` take a request without one.
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_slice(b"null")
    } else {
        serde_json::from_slice(&body)
    };
    let input = match parsed {
        Ok(input) => input,
        Err(e) => return fail(EXIT_INVALID_INPUT, format_args!("invalid input: {e}")),
    };
    let output = match handler(input) {
        Ok(output) => output,
        Err(e) => return fail(EXIT_FAILED, format_args!("{e}")),
    };
    let json = match serde_json::to_vec(&output) {
        Ok(json) => json,
        Err(e) => return fail(EXIT_INVALID_OUTPUT, format_args!("cannot serialise the output: {e}")),
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(&json).and_then(|()| stdout.flush()) {
        return fail(EXIT_INVALID_OUTPUT, format_args!("cannot write the output: {e}"));
    }
    ExitCode::SUCCESS
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
