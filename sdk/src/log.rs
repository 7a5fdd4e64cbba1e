//! Structured logs: one JSON object per line on stderr, which Kiln keeps as the invocation's log
//! (its tail is in a failure's error body and in an asynchronous invocation's record).
//!
//! ```no_run
//! let words = 42;
//! kiln_sdk::info!("counted words", words = words, language = "en");
//! // stderr: {"level":"info","message":"counted words","words":42,"language":"en"}
//! kiln_sdk::debug!("only with KILN_LOG=debug in the config env");
//! ```
//!
//! Field values are anything [`serde::Serialize`]. Lines below the level named by the config
//! variable `KILN_LOG` (`debug`, `info`, `warn`, `error`; default `info`) are dropped. Kiln keeps
//! the last 64 KiB of stderr per invocation and fails an invocation that writes more than that
//! limit in all, so log what helps, not everything.

use std::io::Write;
use std::sync::OnceLock;

use serde::Serialize;
use serde_json::Value;

/// How much a log line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Detail for debugging; dropped unless `KILN_LOG=debug`.
    Debug,
    /// Normal events.
    Info,
    /// Something unexpected the function got past.
    Warn,
    /// Something failed.
    Error,
}

impl Level {
    /// The level's name in a log line: `debug`, `info`, `warn` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    fn from_name(name: &str) -> Option<Level> {
        [Level::Debug, Level::Info, Level::Warn, Level::Error]
            .into_iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(name.trim()))
    }
}

/// The lowest level written: `KILN_LOG` from the config, `info` when it is unset or unknown.
pub fn threshold() -> Level {
    static THRESHOLD: OnceLock<Level> = OnceLock::new();
    *THRESHOLD.get_or_init(|| {
        std::env::var("KILN_LOG")
            .ok()
            .and_then(|name| Level::from_name(&name))
            .unwrap_or(Level::Info)
    })
}

/// Turns a field value into JSON for [`emit`]; a value that cannot be serialised becomes its
/// error message, so logging never fails.
pub fn field(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| Value::String(format!("<unserialisable: {e}>")))
}

/// Writes one log line: `level`, `message`, then `fields` in order. The macros ([`info!`](crate::info)
/// and friends) call this; call it directly to log fields computed at run time.
pub fn emit(level: Level, message: &str, fields: &[(&str, Value)]) {
    if level < threshold() {
        return;
    }
    println_stderr(&line(level, message, fields));
}

fn line(level: Level, message: &str, fields: &[(&str, Value)]) -> String {
    // Written by hand rather than through a map, so the fields keep the order they were given in.
    let mut text = format!(r#"{{"level":"{}","message":{}"#, level.as_str(), Value::from(message));
    for (key, value) in fields {
        text.push(',');
        text.push_str(&Value::from(*key).to_string());
        text.push(':');
        text.push_str(&value.to_string());
    }
    text.push('}');
    text
}

fn println_stderr(line: &str) {
    // One write per line, so lines from a log and from a panic message never interleave.
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    let _ = std::io::stderr().lock().write_all(&bytes);
}

/// Logs at a [`Level`]: `log!(Level::Info, "message", key = value, ...)`.
#[macro_export]
macro_rules! log {
    ($level:expr, $message:expr $(, $key:ident = $value:expr)* $(,)?) => {
        $crate::log::emit(
            $level,
            ::core::convert::AsRef::<str>::as_ref(&$message),
            &[$((::core::stringify!($key), $crate::log::field(&$value))),*],
        )
    };
}

/// Logs at [`Level::Debug`]: `debug!("message", key = value, ...)`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log!($crate::log::Level::Debug, $($arg)+) };
}

/// Logs at [`Level::Info`]: `info!("message", key = value, ...)`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log!($crate::log::Level::Info, $($arg)+) };
}

/// Logs at [`Level::Warn`]: `warn!("message", key = value, ...)`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log!($crate::log::Level::Warn, $($arg)+) };
}

/// Logs at [`Level::Error`]: `error!("message", key = value, ...)`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log!($crate::log::Level::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object_with_fields_in_order() {
        let text = line(Level::Warn, "slow \"x\"", &[("who", field(&"ada")), ("ms", field(&12))]);
        assert_eq!(text, r#"{"level":"warn","message":"slow \"x\"","who":"ada","ms":12}"#);
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["message"], "slow \"x\"");
    }

    #[test]
    fn levels_parse_by_name() {
        assert_eq!(Level::from_name(" DEBUG "), Some(Level::Debug));
        assert_eq!(Level::from_name("verbose"), None);
        assert!(Level::Debug < Level::Error);
    }
}
