//! Workload identity: a token, signed by Kiln, that says which sandbox or invocation of which
//! function version is asking, for services that want to know who calls them (`../shared/API.md`,
//! "Identity"). A guest asks for one at `http://kiln.internal/identity?aud=<audience>` (the Wasm
//! tier answers it in-process: `tier::wasm::internal`); a service verifies it against the public
//! keys at `GET /.well-known/jwks.json`, with any JWT library.
//!
//! The token is a JWT (compact JWS, RFC 7515/7519) signed with Ed25519 (`alg: EdDSA`, RFC 8037):
//!
//! ```text
//! header  {"alg":"EdDSA","typ":"JWT","kid":"<RFC 7638 thumbprint of the key>"}
//! claims  {"iss":"<public URL>","sub":"sandbox:<id>" | "invocation:<id>","aud":"<audience>",
//!          "iat":<s>,"exp":<s>,"function":"<name>","version":<n>,"digest":"sha256:<hex>"}
//! ```
//!
//! Tokens live at most [`MAX_TOKEN_LIFETIME`] and are not stored: there is nothing to revoke but
//! the key ([`keys`] on rotation). Written here rather than with a JWT crate: the encoding is a
//! few lines, and verification — the part a library gets wrong — is the verifier's.

pub mod endpoint;
pub mod keys;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use self::keys::{KeyStore, KeyStoreError};
use crate::clock::Clock;
use crate::function::VersionRecord;

/// The longest a token is valid for.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// A token's lifetime unless the guest asks for another.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// The longest audience, in bytes.
pub const MAX_AUDIENCE_BYTES: usize = 256;

/// What a token is about: the `sub` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// One invocation (sync, async, or an HTTP-trigger request), by the id Kiln reports for it.
    Invocation(String),
    /// A sandbox, by its id: every request it serves, and none of its forks'.
    Sandbox(String),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Invocation(id) => write!(f, "invocation:{id}"),
            Subject::Sandbox(id) => write!(f, "sandbox:{id}"),
        }
    }
}

/// Who a guest is: what its tokens claim beside the audience and the times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub subject: Subject,
    pub function: String,
    pub version: u32,
    /// `sha256:<hex>` of the version's upload, as its deploy answered.
    pub digest: String,
}

impl Workload {
    pub fn of(subject: Subject, record: &VersionRecord) -> Workload {
        Workload {
            subject,
            function: record.name.clone(),
            version: record.version,
            digest: record.digest.prefixed(),
        }
    }
}

/// Why a token was not issued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("aud is required: the audience the token is for (e.g. ?aud=https://api.example.com)")]
    NoAudience,
    #[error("aud must be 1 to {MAX_AUDIENCE_BYTES} bytes of printable text")]
    BadAudience,
    #[error("ttl must be a whole number of seconds from 1 to {}", MAX_TOKEN_LIFETIME.as_secs())]
    BadLifetime,
    #[error("unknown query parameter {0:?}: /identity takes aud and ttl")]
    UnknownParameter(String),
}

/// A signed token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The compact JWS.
    pub token: String,
    /// Unix seconds.
    pub expires: u64,
}

impl Token {
    /// `expires` as the API shows times (RFC 3339, UTC).
    pub fn expires_at(&self) -> String {
        time::OffsetDateTime::from_unix_timestamp(self.expires as i64)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default()
    }
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    typ: &'static str,
    kid: &'a str,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: String,
    aud: &'a str,
    iat: u64,
    exp: u64,
    function: &'a str,
    version: u32,
    digest: &'a str,
}

/// Issues tokens and publishes the keys that verify them. One per server.
pub struct Issuer {
    /// The `iss` claim: the server's public URL, without a trailing slash.
    issuer: String,
    keys: KeyStore,
    clock: Arc<dyn Clock>,
}

impl Issuer {
    /// `issuer` is the server's public URL; the keys are in `dir`. Blocking.
    pub fn open(issuer: &str, dir: &std::path::Path, clock: Arc<dyn Clock>) -> Result<Issuer, KeyStoreError> {
        Ok(Issuer {
            issuer: issuer.trim_end_matches('/').to_owned(),
            keys: KeyStore::open(dir, clock.clone())?,
            clock,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// A token for `workload`, for `audience`, valid for `lifetime` (1 s to
    /// [`MAX_TOKEN_LIFETIME`]). The audience is checked here, so every way in shares one rule.
    pub fn issue(&self, workload: &Workload, audience: &str, lifetime: Duration) -> Result<Token, IssueError> {
        check_audience(audience)?;
        if lifetime.is_zero() || lifetime > MAX_TOKEN_LIFETIME || lifetime.subsec_nanos() != 0 {
            return Err(IssueError::BadLifetime);
        }
        let key = self.keys.current();
        let iat = self.clock.now_secs();
        let exp = iat + lifetime.as_secs();
        let header = Header {
            alg: "EdDSA",
            typ: "JWT",
            kid: &key.kid,
        };
        let claims = Claims {
            iss: &self.issuer,
            sub: workload.subject.to_string(),
            aud: audience,
            iat,
            exp,
            function: &workload.function,
            version: workload.version,
            digest: &workload.digest,
        };
        let json =
            |value: Result<Vec<u8>, serde_json::Error>| URL_SAFE_NO_PAD.encode(value.expect("plain structs serialise"));
        let signing_input = format!(
            "{}.{}",
            json(serde_json::to_vec(&header)),
            json(serde_json::to_vec(&claims))
        );
        let signature = URL_SAFE_NO_PAD.encode(key.sign(signing_input.as_bytes()));
        Ok(Token {
            token: format!("{signing_input}.{signature}"),
            expires: exp,
        })
    }

    /// The JWKS document: every key a valid token may name.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self.keys.published().iter().map(|key| key.jwk()).collect();
        serde_json::json!({ "keys": keys })
    }

    /// The OpenID Connect discovery document, for verifiers that start from the issuer's URL.
    pub fn discovery(&self) -> serde_json::Value {
        serde_json::json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{}/.well-known/jwks.json", self.issuer),
            "id_token_signing_alg_values_supported": ["EdDSA"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "claims_supported": ["iss", "sub", "aud", "iat", "exp", "function", "version", "digest"],
        })
    }
}

/// An audience is printable text (a URL, a name), not empty and at most [`MAX_AUDIENCE_BYTES`].
pub fn check_audience(audience: &str) -> Result<(), IssueError> {
    if audience.is_empty() {
        return Err(IssueError::NoAudience);
    }
    if audience.len() > MAX_AUDIENCE_BYTES || audience.chars().any(char::is_control) {
        return Err(IssueError::BadAudience);
    }
    Ok(())
}

/// A guest's identity: who it is, and the issuer that vouches for it. What an instance holds.
#[derive(Clone)]
pub struct Identity {
    issuer: Arc<Issuer>,
    workload: Arc<Workload>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Identity").field(&self.workload).finish()
    }
}

impl Identity {
    pub fn new(issuer: Arc<Issuer>, workload: Workload) -> Identity {
        Identity {
            issuer,
            workload: Arc::new(workload),
        }
    }

    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    pub fn token(&self, audience: &str, lifetime: Duration) -> Result<Token, IssueError> {
        self.issuer.issue(&self.workload, audience, lifetime)
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::{UnparsedPublicKey, ED25519};

    use super::*;
    use crate::clock::ManualClock;

    fn workload() -> Workload {
        Workload {
            subject: Subject::Sandbox("sbx_01".to_owned()),
            function: "web".to_owned(),
            version: 3,
            digest: format!("sha256:{}", "ab".repeat(32)),
        }
    }

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn a_token_carries_the_claims_and_verifies_with_the_published_key() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::at(1_800_000_000_000);
        let issuer = Issuer::open("https://kiln.example/", dir.path(), clock).unwrap();
        let token = issuer
            .issue(&workload(), "https://api.example", Duration::from_secs(600))
            .unwrap();
        assert_eq!(token.expires, 1_800_000_600);
        assert_eq!(token.expires_at(), "2027-01-15T08:10:00Z");
        let parts: Vec<&str> = token.token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode(parts[0]);
        let kid = issuer.keys().current().kid.clone();
        assert_eq!(header, serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}));
        assert_eq!(
            decode(parts[1]),
            serde_json::json!({
                "iss": "https://kiln.example", "sub": "sandbox:sbx_01", "aud": "https://api.example",
                "iat": 1_800_000_000u64, "exp": 1_800_000_600u64, "function": "web", "version": 3,
                "digest": format!("sha256:{}", "ab".repeat(32)),
            })
        );
        let jwks = issuer.jwks();
        let jwk = &jwks["keys"][0];
        assert_eq!(jwk["kid"], kid);
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        assert!(UnparsedPublicKey::new(&ED25519, &x)
            .verify(signed.as_bytes(), &signature)
            .is_ok());
        assert_eq!(
            issuer.discovery()["jwks_uri"],
            "https://kiln.example/.well-known/jwks.json"
        );
    }

    #[test]
    fn audiences_and_lifetimes_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = Issuer::open("http://127.0.0.1:7878", dir.path(), ManualClock::at(0)).unwrap();
        let issue = |aud: &str, secs: u64| issuer.issue(&workload(), aud, Duration::from_secs(secs)).map(drop);
        assert_eq!(issue("", 60), Err(IssueError::NoAudience));
        assert_eq!(
            issue(&"a".repeat(MAX_AUDIENCE_BYTES + 1), 60),
            Err(IssueError::BadAudience)
        );
        assert_eq!(issue("a\nb", 60), Err(IssueError::BadAudience));
        assert_eq!(issue(&"a".repeat(MAX_AUDIENCE_BYTES), 60), Ok(()));
        assert_eq!(issue("svc", 0), Err(IssueError::BadLifetime));
        assert_eq!(issue("svc", 3601), Err(IssueError::BadLifetime));
        assert_eq!(issue("svc", 3600), Ok(()));
    }
}
