//! The function's configuration: the `env` map of its Kiln config, seen as environment
//! variables, and its name.
//!
//! Kiln gives a function exactly the variables of its config (nothing of the host's), so these
//! are the values set at deploy:
//!
//! ```sh
//! curl -X PUT http://127.0.0.1:7878/v1/functions/greet -H "Authorization: Bearer $TOKEN" \
//!   -F code=@greet.wasm -F 'config={"env": {"GREETING": "Hi", "MAX_WORDS": "100"}}'
//! ```
//!
//! ```no_run
//! let greeting = kiln_sdk::config::var("GREETING").unwrap_or_else(|| "Hello".into());
//! let max_words: usize = kiln_sdk::config::parse("MAX_WORDS")?.unwrap_or(1000);
//! # Ok::<(), kiln_sdk::config::ConfigError>(())
//! ```
//!
//! A changed config is a new version, and an init hook runs again for it, so reading the config
//! in an init hook is fine: the snapshot always matches the config it runs with.

use std::fmt;
use std::str::FromStr;

/// The value of a config variable, or `None` when it is not set (or not valid UTF-8).
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The value of a config variable that must be set.
pub fn require(name: &str) -> Result<String, ConfigError> {
    var(name).ok_or_else(|| ConfigError::Missing { name: name.to_owned() })
}

/// A config variable parsed with [`FromStr`]: `Ok(None)` when it is not set, an error naming the
/// variable when it does not parse.
pub fn parse<T>(name: &str) -> Result<Option<T>, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    match var(name) {
        None => Ok(None),
        Some(value) => value.parse().map(Some).map_err(|e: T::Err| ConfigError::Invalid {
            name: name.to_owned(),
            value,
            reason: e.to_string(),
        }),
    }
}

/// Every config variable, in no particular order.
pub fn vars() -> impl Iterator<Item = (String, String)> {
    std::env::vars()
}

/// The function's name, as deployed (Kiln passes it as `argv[0]`).
pub fn function_name() -> String {
    std::env::args().next().unwrap_or_default()
}

/// Why a config variable could not be used; its text names the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A variable [`require`] needs is not set.
    Missing {
        /// The variable.
        name: String,
    },
    /// A variable did not parse as the type asked of [`parse`].
    Invalid {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// What the parser said.
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Missing { name } => {
                write!(
                    f,
                    "config variable {name} is not set (add it to the function's config env)"
                )
            }
            ConfigError::Invalid { name, value, reason } => {
                write!(f, "config variable {name}={value:?} is invalid: {reason}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(
            require("KILN_SDK_TEST_UNSET").unwrap_err().to_string(),
            "config variable KILN_SDK_TEST_UNSET is not set (add it to the function's config env)"
        );
        std::env::set_var("KILN_SDK_TEST_NUMBER", "twelve");
        let err = parse::<u32>("KILN_SDK_TEST_NUMBER").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("config variable KILN_SDK_TEST_NUMBER=\"twelve\" is invalid"));
        std::env::set_var("KILN_SDK_TEST_NUMBER", "12");
        assert_eq!(parse::<u32>("KILN_SDK_TEST_NUMBER"), Ok(Some(12)));
        assert_eq!(parse::<u32>("KILN_SDK_TEST_UNSET"), Ok(None));
    }
}
