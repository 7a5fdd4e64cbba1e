//! Reads a name from stdin (the request body) and prints a greeting on stdout (the response).
//! `GREETING` from the function's config env replaces "Hello". An empty body is an error: the
//! message goes to stderr and the exit code is 2, which Kiln reports as `function_failed`.

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut name = String::new();
    if std::io::stdin().read_to_string(&mut name).is_err() || name.trim().is_empty() {
        eprintln!("greet: send a name in the request body");
        return ExitCode::from(2);
    }
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".to_owned());
    let program = std::env::args().next().unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{greeting}, {}! (from {program})", name.trim());
    ExitCode::SUCCESS
}
