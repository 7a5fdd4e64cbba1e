//! A sandbox as it is stored and shown: its settings (the creation request), its lifecycle state,
//! and the clocks of its life (running and suspended time, last activity).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::function::Tier;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting,
    Running,
    Suspending,
    Suspended,
    Resuming,
    Terminated,
    Failed,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Starting,
        State::Running,
        State::Suspending,
        State::Suspended,
        State::Resuming,
        State::Terminated,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Suspending => "suspending",
            State::Suspended => "suspended",
            State::Resuming => "resuming",
            State::Terminated => "terminated",
            State::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the sandbox is over: nothing more can happen to it.
    pub fn is_final(self) -> bool {
        matches!(self, State::Terminated | State::Failed)
    }

    /// Whether an instance of it is (or is being made) live, holding memory and a pool slot.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            State::Starting | State::Running | State::Suspending | State::Resuming
        )
    }
}

/// What happens to a sandbox left without ingress traffic for its `idle_timeout_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    #[default]
    Suspend,
    Terminate,
}

/// Who may reach a sandbox's ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Ingress {
    /// The admin token, a token scoped to the function, or one of the sandbox's own tokens.
    #[default]
    Token,
    /// Anyone.
    Public,
    /// No one.
    Off,
}

/// The creation request's settings (every field but `function` optional, defaults filled in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    #[schema(minimum = 1, maximum = 604_800)]
    pub idle_timeout_s: u64,
    pub on_idle: OnIdle,
    #[schema(minimum = 1, maximum = 31_536_000)]
    pub max_lifetime_s: u64,
    pub ingress: Ingress,
    #[schema(minimum = 1, maximum = 65535)]
    pub ingress_port: u16,
    /// Added to the function's environment.
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    /// Egress connectors added to the function's policy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub connectors: Vec<String>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            idle_timeout_s: 300,
            on_idle: OnIdle::Suspend,
            max_lifetime_s: 86_400,
            ingress: Ingress::Token,
            ingress_port: 8080,
            env: BTreeMap::new(),
            metadata: BTreeMap::new(),
            connectors: Vec::new(),
        }
    }
}

/// Upper bounds a creation request may ask for.
pub const MAX_IDLE_TIMEOUT_S: u64 = 7 * 24 * 3600;
pub const MAX_LIFETIME_S: u64 = 365 * 24 * 3600;
// The OpenAPI document states these bounds literally (`Settings`' schema attributes).
const _: () = assert!(MAX_IDLE_TIMEOUT_S == 604_800 && MAX_LIFETIME_S == 31_536_000 && MAX_METADATA_ENTRIES == 64);
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

impl Settings {
    /// Checks the settings; the error text is shown to the user as is.
    pub fn check(&self) -> Result<(), String> {
        if self.idle_timeout_s == 0 || self.idle_timeout_s > MAX_IDLE_TIMEOUT_S {
            return Err(format!("idle_timeout_s must be between 1 and {MAX_IDLE_TIMEOUT_S}"));
        }
        if self.max_lifetime_s == 0 || self.max_lifetime_s > MAX_LIFETIME_S {
            return Err(format!("max_lifetime_s must be between 1 and {MAX_LIFETIME_S}"));
        }
        if self.ingress_port == 0 {
            return Err("ingress_port must be between 1 and 65535".into());
        }
        let metadata_bytes: usize = self.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if self.metadata.len() > MAX_METADATA_ENTRIES || metadata_bytes > MAX_METADATA_BYTES {
            return Err(format!(
                "metadata may hold at most {MAX_METADATA_ENTRIES} entries and {MAX_METADATA_BYTES} bytes"
            ));
        }
        // The function's own checks apply to what the sandbox adds to its environment and
        // policy.
        let env_check = crate::function::FunctionConfig {
            env: self.env.clone(),
            connectors: self.connectors.clone(),
            ..crate::function::FunctionConfig::default()
        };
        env_check.check()
    }
}

/// One sandbox, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub function: String,
    pub version: u32,
    pub tier: Tier,
    pub state: State,
    /// Why it failed (or terminated on its own).
    pub error: Option<String>,
    pub settings: Settings,
    pub idempotency_key: Option<String>,
    pub created_at: String,
    pub last_active_ms: u64,
    /// Running time before the current run, and when the current run began.
    pub running_ms: u64,
    pub running_since_ms: Option<u64>,
    pub suspended_ms: u64,
    pub suspended_since_ms: Option<u64>,
    /// The last suspend point: the state it was written to, its size, and when.
    pub state_digest: Option<Digest>,
    pub state_bytes: u64,
    pub suspended_at: Option<String>,
    /// Set when a crash sent it back to its last suspend point: that point's time.
    pub resumed_from: Option<String>,
}

impl Sandbox {
    /// Running time so far, counting the current run.
    pub fn running_ms_at(&self, now_ms: u64) -> u64 {
        self.running_ms + self.running_since_ms.map_or(0, |since| now_ms.saturating_sub(since))
    }

    pub fn suspended_ms_at(&self, now_ms: u64) -> u64 {
        self.suspended_ms + self.suspended_since_ms.map_or(0, |since| now_ms.saturating_sub(since))
    }

    /// Moves to `state` at `now_ms`, keeping the running and suspended clocks.
    pub fn enter(&mut self, state: State, now_ms: u64) {
        if let Some(since) = self.running_since_ms.take() {
            self.running_ms += now_ms.saturating_sub(since);
        }
        if let Some(since) = self.suspended_since_ms.take() {
            self.suspended_ms += now_ms.saturating_sub(since);
        }
        match state {
            State::Running => self.running_since_ms = Some(now_ms),
            State::Suspended => self.suspended_since_ms = Some(now_ms),
            _ => {}
        }
        self.state = state;
    }
}

/// A sandbox's own token, as stored (only its hash).
#[derive(Debug, Clone)]
pub struct SandboxToken {
    pub sandbox: String,
    pub scopes: Vec<Scope>,
    pub expires_ms: Option<u64>,
}

/// What a sandbox token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Ingress,
    Exec,
    Shell,
    Files,
}

impl Scope {
    /// What the scope lets a token do, as a phrase ("may not …").
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingress => "reach ingress",
            Scope::Exec => "exec",
            Scope::Shell => "open a shell",
            Scope::Files => "read or write files",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_count_running_and_suspended_time_apart() {
        let mut sandbox = Sandbox {
            id: "sbx_x".into(),
            function: "f".into(),
            version: 1,
            tier: Tier::Wasm,
            state: State::Starting,
            error: None,
            settings: Settings::default(),
            idempotency_key: None,
            created_at: String::new(),
            last_active_ms: 0,
            running_ms: 0,
            running_since_ms: None,
            suspended_ms: 0,
            suspended_since_ms: None,
            state_digest: None,
            state_bytes: 0,
            suspended_at: None,
            resumed_from: None,
        };
        sandbox.enter(State::Running, 1_000);
        assert_eq!(sandbox.running_ms_at(4_000), 3_000);
        sandbox.enter(State::Suspending, 4_000);
        sandbox.enter(State::Suspended, 4_500);
        assert_eq!(
            (sandbox.running_ms_at(10_000), sandbox.suspended_ms_at(10_000)),
            (3_000, 5_500)
        );
        sandbox.enter(State::Running, 10_000);
        assert_eq!(
            (sandbox.running_ms_at(11_000), sandbox.suspended_ms_at(11_000)),
            (4_000, 5_500)
        );
        assert!(State::Running.is_live() && !State::Suspended.is_live() && State::Failed.is_final());
        assert_eq!(State::parse("resuming"), Some(State::Resuming));
    }

    #[test]
    fn settings_are_checked() {
        assert!(Settings::default().check().is_ok());
        for bad in [
            Settings {
                idle_timeout_s: 0,
                ..Settings::default()
            },
            Settings {
                max_lifetime_s: MAX_LIFETIME_S + 1,
                ..Settings::default()
            },
            Settings {
                env: [("A=B".to_owned(), "x".to_owned())].into(),
                ..Settings::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        let parsed: Settings = serde_json::from_str(r#"{"on_idle": "terminate", "ingress": "public"}"#).unwrap();
        assert_eq!((parsed.on_idle, parsed.ingress), (OnIdle::Terminate, Ingress::Public));
        assert!(serde_json::from_str::<Settings>(r#"{"bogus": 1}"#).is_err());
    }
}
