//! Bearer-token authentication. Only SHA-256 hashes of tokens are stored; a presented token is
//! hashed and compared in constant time. The admin token is created on first start and written to
//! `<data>/admin.token` (mode 0600), unless `KILN_ADMIN_TOKEN` provides it.
//!
//! Scoped tokens (`POST /v1/tokens`) may only invoke the functions they name. They are kept in
//! memory by hash, so checking one is a hash and a map lookup; revoking one takes effect on the
//! next request. The lookup is not constant-time, and need not be: what it could leak is the
//! SHA-256 of a valid token, from which the token cannot be recovered.
//!
//! AWS access keys (`POST /v1/tokens` with `"kind": "aws"`) authenticate the Lambda API by
//! Signature Version 4, which needs the secret itself to check a signature. The secret is not
//! stored either: it is an HMAC of the access key id under this server's `aws.key` (created on
//! first start, 0600), so the database alone does not give it away, and deleting the row revokes
//! the key. The key's scope is a token's: admin, or invoking named functions.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use std::collections::BTreeSet;
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::Clock;
use crate::storage::{Metadata, StorageError};

const ADMIN_ID: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("admin token file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("admin token file {0} is empty")]
    Empty(String),
    #[error(transparent)]
    Store(#[from] StorageError),
}

pub struct Auth {
    admin_hash: [u8; 32],
    scoped: DashMap<[u8; 32], Arc<ScopedToken>>,
    /// AWS access keys by access key id.
    aws: DashMap<String, Arc<ScopedToken>>,
    /// The key AWS secrets are derived from.
    aws_root: [u8; 32],
    /// What decides whether a token has expired.
    clock: Arc<dyn Clock>,
}

/// An invoke-only token: what it may invoke, until when, and its public id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScopedToken {
    #[serde(skip)]
    pub id: String,
    /// Functions it may invoke (sync and async).
    pub functions: BTreeSet<String>,
    /// Unix seconds after which it is refused; `None`: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// An AWS access key (SigV4) rather than a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// An AWS access key with the admin's rights (bearer tokens other than the admin's never are).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

impl ScopedToken {
    /// Who a request carrying it is from.
    pub fn principal(self: &Arc<Self>) -> Principal {
        if self.admin {
            Principal::Admin
        } else {
            Principal::Invoke(self.clone())
        }
    }
}

/// The longest life a scoped token may be given.
pub const MAX_TOKEN_TTL_SECS: u64 = 365 * 24 * 3600;

/// Who a request is from.
#[derive(Debug, Clone)]
pub enum Principal {
    Admin,
    Invoke(Arc<ScopedToken>),
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::Admin)
    }

    pub fn may_invoke(&self, function: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Invoke(token) => token.functions.contains(function),
        }
    }
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Store(#[from] StorageError),
    #[error("stored token {0} has a scope this version does not understand")]
    Corrupt(String),
}

/// Where the admin token came from, for the start-up message.
pub enum AdminTokenSource {
    Environment,
    ExistingFile,
    CreatedFile,
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token: `kiln_` and 256 bits in hex.
pub fn generate_token() -> String {
    format!("kiln_{}", hex::encode(rand::random::<[u8; 32]>()))
}

impl Auth {
    pub fn init(
        store: &dyn Metadata,
        token_file: &Path,
        from_env: Option<&str>,
        aws_key_file: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<(Auth, AdminTokenSource), AuthSetupError> {
        let aws_root = crate::storage::seal::Sealer::open(aws_key_file)
            .map_err(|source| AuthSetupError::Io {
                path: aws_key_file.display().to_string(),
                source,
            })?
            .key();
        let io_err = |source| AuthSetupError::Io {
            path: token_file.display().to_string(),
            source,
        };
        let (token, source) = match from_env {
            Some(token) => (token.to_owned(), AdminTokenSource::Environment),
            None => match std::fs::read_to_string(token_file) {
                Ok(text) => {
                    let token = text.trim().to_owned();
                    if token.is_empty() {
                        return Err(AuthSetupError::Empty(token_file.display().to_string()));
                    }
                    (token, AdminTokenSource::ExistingFile)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let token = generate_token();
                    let mut file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(token_file)
                        .map_err(io_err)?;
                    file.write_all(format!("{token}\n").as_bytes()).map_err(io_err)?;
                    file.sync_all().map_err(io_err)?;
                    (token, AdminTokenSource::CreatedFile)
                }
                Err(e) => return Err(io_err(e)),
            },
        };
        let admin_hash = hash(&token);
        store.put_token_hash(ADMIN_ID, &admin_hash, "admin")?;
        let Loaded { scoped, aws } = load_scoped(store)?;
        Ok((
            Auth {
                admin_hash,
                scoped,
                aws,
                aws_root,
                clock,
            },
            source,
        ))
    }

    /// Reads the scoped tokens again (another node sharing the database created or revoked one).
    /// Blocking.
    pub fn reload_scoped(&self, store: &dyn Metadata) -> Result<(), StorageError> {
        let fresh = load_scoped(store)?;
        self.scoped.retain(|hash, _| fresh.scoped.contains_key(hash));
        for (hash, token) in fresh.scoped {
            self.scoped.insert(hash, token);
        }
        self.aws.retain(|key_id, _| fresh.aws.contains_key(key_id));
        for (key_id, token) in fresh.aws {
            self.aws.insert(key_id, token);
        }
        Ok(())
    }

    /// Checks an `Authorization` header value for the admin token.
    pub fn check(&self, authorization: Option<&[u8]>) -> bool {
        matches!(self.authenticate(authorization), Some(Principal::Admin))
    }

    /// Who an `Authorization` header value speaks for; `None` for a missing or unknown token.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Option<Principal> {
        let token = authorization.and_then(bearer_token)?;
        let presented = hash(token);
        if bool::from(presented.ct_eq(&self.admin_hash)) {
            return Some(Principal::Admin);
        }
        let scoped = self.scoped.get(&presented)?.clone();
        // An expired token is as good as an unknown one: `unauthorized`.
        if scoped.expires_at.is_some_and(|at| self.clock.now_secs() >= at) {
            return None;
        }
        Some(Principal::Invoke(scoped))
    }

    /// Creates an invoke-only token for `functions`, valid for `ttl` if given. Returns its id,
    /// the secret (shown once, never stored) and its creation time. Blocking (SQLite).
    pub fn create_scoped(
        &self,
        store: &dyn Metadata,
        functions: BTreeSet<String>,
        ttl: Option<std::time::Duration>,
    ) -> Result<(ScopedToken, String, String), TokenError> {
        let secret = generate_token();
        let token = ScopedToken {
            id: format!("tok_{}", hex::encode(rand::random::<[u8; 8]>())),
            functions,
            expires_at: ttl.map(|ttl| self.clock.now_secs() + ttl.as_secs()),
            access_key_id: None,
            admin: false,
        };
        let scope = serde_json::to_string(&token).expect("scope serialises");
        let token_hash = hash(&secret);
        let created_at = store.insert_token(&token.id, &token_hash, &scope)?;
        self.scoped.insert(token_hash, Arc::new(token.clone()));
        Ok((token, secret, created_at))
    }

    /// Creates an AWS access key: admin when `functions` is empty, else invoke-only for them.
    /// Returns the key (its `access_key_id` set), the secret (derived, shown once) and its
    /// creation time. Blocking (SQLite).
    pub fn create_aws_key(
        &self,
        store: &dyn Metadata,
        functions: BTreeSet<String>,
        ttl: Option<std::time::Duration>,
    ) -> Result<(ScopedToken, String, String), TokenError> {
        // `AKIA` and 16 base32 characters, as AWS's own ids look (clients check the shape).
        const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let key_id: String = "AKIA"
            .chars()
            .chain(
                rand::random::<[u8; 16]>()
                    .iter()
                    .map(|b| BASE32[(b % 32) as usize] as char),
            )
            .collect();
        let token = ScopedToken {
            id: format!("tok_{}", hex::encode(rand::random::<[u8; 8]>())),
            admin: functions.is_empty(),
            functions,
            expires_at: ttl.map(|ttl| self.clock.now_secs() + ttl.as_secs()),
            access_key_id: Some(key_id.clone()),
        };
        let secret = self.aws_secret(&key_id);
        let scope = serde_json::to_string(&token).expect("scope serialises");
        let created_at = store.insert_token(&token.id, &hash(&secret), &scope)?;
        self.aws.insert(key_id, Arc::new(token.clone()));
        Ok((token, secret, created_at))
    }

    /// The secret of an access key id: 40 characters, as AWS's.
    fn aws_secret(&self, key_id: &str) -> String {
        use base64::Engine as _;
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.aws_root).expect("any key length");
        mac.update(b"kiln aws secret\0");
        mac.update(key_id.as_bytes());
        let digest = mac.finalize().into_bytes();
        base64::engine::general_purpose::STANDARD.encode(&digest[..30])
    }

    /// An AWS access key's secret and who it speaks for; `None` when unknown or expired.
    pub fn aws_key(&self, key_id: &str) -> Option<(String, Principal)> {
        let token = self.aws.get(key_id)?.clone();
        if token.expires_at.is_some_and(|at| self.clock.now_secs() >= at) {
            return None;
        }
        Some((self.aws_secret(key_id), token.principal()))
    }

    /// Revokes a scoped token or AWS key; false when there is none with this id. Blocking.
    pub fn revoke(&self, store: &dyn Metadata, id: &str) -> Result<bool, TokenError> {
        let deleted = store.delete_token(id)?;
        self.scoped.retain(|_, token| token.id != id);
        self.aws.retain(|_, token| token.id != id);
        Ok(deleted)
    }

    /// Every scoped token with its creation time (no secrets: they are not kept). Blocking.
    pub fn list_scoped(&self, store: &dyn Metadata) -> Result<Vec<(ScopedToken, String)>, TokenError> {
        store
            .scoped_tokens()?
            .into_iter()
            .map(|row| {
                let mut token: ScopedToken =
                    serde_json::from_str(&row.scope).map_err(|_| TokenError::Corrupt(row.id.clone()))?;
                token.id = row.id;
                Ok((token, row.created_at))
            })
            .collect()
    }
}

/// The scoped tokens in `store`, by the hash of their secret.
/// The stored tokens: bearer tokens by the hash of their secret, AWS keys by their id.
struct Loaded {
    scoped: DashMap<[u8; 32], Arc<ScopedToken>>,
    aws: DashMap<String, Arc<ScopedToken>>,
}

fn load_scoped(store: &dyn Metadata) -> Result<Loaded, StorageError> {
    let (scoped, aws) = (DashMap::new(), DashMap::new());
    for row in store.scoped_tokens()? {
        let Ok(hash) = <[u8; 32]>::try_from(row.hash.as_slice()) else {
            tracing::warn!(id = %row.id, "ignoring a stored token with a malformed hash");
            continue;
        };
        match serde_json::from_str::<ScopedToken>(&row.scope) {
            Ok(mut token) => {
                token.id = row.id;
                match token.access_key_id.clone() {
                    Some(key_id) => aws.insert(key_id, Arc::new(token)),
                    None => scoped.insert(hash, Arc::new(token)),
                };
            }
            Err(_) => tracing::warn!(id = %row.id, "ignoring a stored token with an unknown scope"),
        }
    }
    Ok(Loaded { scoped, aws })
}

fn bearer_token(header: &[u8]) -> Option<&str> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sqlite = crate::storage::Sqlite::open(&dir.path().join("db")).unwrap();
        let store: &dyn Metadata = &sqlite;
        let file = dir.path().join("admin.token");
        let clock = crate::clock::ManualClock::at(1_800_000_000_000);
        let aws_key = dir.path().join("aws.key");
        let init = |env: Option<&str>| Auth::init(store, &file, env, &aws_key, clock.clone());
        let (auth, source) = init(None).unwrap();
        assert!(matches!(source, AdminTokenSource::CreatedFile));
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let token = std::fs::read_to_string(&file).unwrap().trim().to_owned();
        assert!(auth.check(Some(format!("Bearer {token}").as_bytes())));
        assert!(auth.check(Some(format!("bearer {token}").as_bytes())));
        assert!(!auth.check(Some(format!("Bearer {token}x").as_bytes())));
        assert!(!auth.check(Some(token.as_bytes())));
        assert!(!auth.check(None));
        // The database holds the hash, never the token.
        let stored = sqlite.token_hash("admin").unwrap().unwrap();
        assert_eq!(stored, hash(&token).to_vec());
        assert!(!String::from_utf8_lossy(&stored).contains(&token));

        let (again, source) = init(None).unwrap();
        assert!(matches!(source, AdminTokenSource::ExistingFile));
        assert!(again.check(Some(format!("Bearer {token}").as_bytes())));
        // A scoped token is known after a restart and gone once revoked.
        let functions: BTreeSet<String> = ["f".to_owned()].into();
        let (scoped, secret, _) = again.create_scoped(store, functions.clone(), None).unwrap();
        let header = format!("Bearer {secret}");
        let (reopened, _) = init(None).unwrap();
        let principal = reopened.authenticate(Some(header.as_bytes())).unwrap();
        assert!(!principal.is_admin() && principal.may_invoke("f") && !principal.may_invoke("g"));
        assert!(
            !reopened.check(Some(header.as_bytes())),
            "a scoped token is not the admin token"
        );
        assert!(!String::from_utf8_lossy(&store.scoped_tokens().unwrap()[0].hash).contains(&secret));
        assert!(reopened.revoke(store, &scoped.id).unwrap());
        assert!(reopened.authenticate(Some(header.as_bytes())).is_none());
        assert!(!reopened.revoke(store, &scoped.id).unwrap());
        assert!(
            !reopened.revoke(store, "admin").unwrap(),
            "the admin token cannot be revoked"
        );

        // A token with a life is refused once it is over, after a restart too.
        let (short, short_secret, _) = reopened
            .create_scoped(store, functions, Some(std::time::Duration::from_secs(60)))
            .unwrap();
        assert_eq!(short.expires_at, Some(1_800_000_060));
        let short_header = format!("Bearer {short_secret}");
        assert!(reopened.authenticate(Some(short_header.as_bytes())).is_some());
        clock.advance(std::time::Duration::from_secs(59));
        assert!(init(None)
            .unwrap()
            .0
            .authenticate(Some(short_header.as_bytes()))
            .is_some());
        clock.advance(std::time::Duration::from_secs(1));
        assert!(
            reopened.authenticate(Some(short_header.as_bytes())).is_none(),
            "expired"
        );

        let (env, _) = init(Some("secret")).unwrap();
        assert!(env.check(Some(b"Bearer secret")));
        assert!(!env.check(Some(format!("Bearer {token}").as_bytes())));
    }

    #[test]
    fn aws_keys_derive_their_secret_and_are_not_bearer_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = crate::storage::Sqlite::open(&dir.path().join("db")).unwrap();
        let store: &dyn Metadata = &sqlite;
        let clock = crate::clock::ManualClock::at(1_800_000_000_000);
        let (file, aws_key) = (dir.path().join("admin.token"), dir.path().join("aws.key"));
        let init = || Auth::init(store, &file, None, &aws_key, clock.clone()).unwrap().0;
        let auth = init();
        let (admin, admin_secret, _) = auth.create_aws_key(store, BTreeSet::new(), None).unwrap();
        let admin_id = admin.access_key_id.clone().unwrap();
        assert!(admin_id.starts_with("AKIA") && admin_id.len() == 20, "{admin_id}");
        assert_eq!(admin_secret.len(), 40);
        let functions: BTreeSet<String> = ["f".to_owned()].into();
        let (scoped, scoped_secret, _) = auth.create_aws_key(store, functions, None).unwrap();
        let scoped_id = scoped.access_key_id.clone().unwrap();
        assert_ne!(admin_secret, scoped_secret);

        // After a restart the same secrets come back, and the scopes with them.
        let again = init();
        let (secret, principal) = again.aws_key(&admin_id).unwrap();
        assert_eq!(secret, admin_secret);
        assert!(principal.is_admin());
        let (secret, principal) = again.aws_key(&scoped_id).unwrap();
        assert_eq!(secret, scoped_secret);
        assert!(!principal.is_admin() && principal.may_invoke("f") && !principal.may_invoke("g"));
        // The secret is no bearer token, and the database does not hold it.
        assert!(again
            .authenticate(Some(format!("Bearer {admin_secret}").as_bytes()))
            .is_none());
        let rows = store.scoped_tokens().unwrap();
        assert!(rows.iter().all(|r| !r.scope.contains(&admin_secret)));
        // Another server's key derives other secrets.
        std::fs::remove_file(&aws_key).unwrap();
        assert_ne!(init().aws_key(&admin_id).unwrap().0, admin_secret);
        // Revoked: unknown.
        assert!(again.revoke(store, &scoped.id).unwrap());
        assert!(again.aws_key(&scoped_id).is_none());
        assert!(init().aws_key(&scoped_id).is_none());
    }
}
