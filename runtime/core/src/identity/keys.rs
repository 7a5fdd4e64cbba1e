//! The Ed25519 keys that sign identity tokens, on disk and in memory.
//!
//! Each key is a PKCS#8 v2 document in `<data>/identity/<created>-<kid>.pk8` (mode 0600, in a
//! directory of mode 0700), where `<created>` is when it was made (Unix seconds) and `<kid>` its
//! RFC 7638 JWK thumbprint, so the name alone orders the keys and a file whose key does not
//! match its name is noticed.
//!
//! ```text
//!   key A ──signs──────────┐ rotation at t          t + MAX_TOKEN_LIFETIME + SKEW
//!                          ├─ published ──────────────────┤ deleted
//!   key B                  └──signs────────────────────────── ...
//! ```
//!
//! The newest key signs. A key that a newer one replaced at `t` signed its last token at `t`,
//! which expires by `t + MAX_TOKEN_LIFETIME`; it stays in the JWKS until then (plus `SKEW`, for
//! verifiers' clocks and caches) and is deleted after. A rotation therefore never makes a token
//! that is still valid fail to verify.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use sha2::{Digest as _, Sha256};

use super::MAX_TOKEN_LIFETIME;
use crate::clock::Clock;

/// How long a replaced key is still published past the last token it can have signed: room for
/// verifiers whose clocks run behind, or who cached the JWKS.
pub const SKEW: Duration = Duration::from_secs(5 * 60);
/// The signing key's age at which the background task replaces it.
pub const ROTATE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// One signing key.
pub struct SigningKey {
    pub kid: String,
    /// Unix seconds when it was made: also when the key before it stopped signing.
    pub created: u64,
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// The public key, raw (32 bytes).
    pub fn public(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// The JWK of its public key (RFC 8037).
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(self.public()),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }
}

/// The RFC 7638 thumbprint of an Ed25519 public key: SHA-256 of its JWK's required members in
/// lexicographic order, base64url.
pub fn thumbprint(public: &[u8]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Why the keys could not be opened or rotated.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("identity keys in {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("identity key {path} is not an Ed25519 PKCS#8 document")]
    Malformed { path: String },
    #[error("could not generate an identity key")]
    Generate,
}

/// The keys, oldest first; the last one signs.
pub struct KeyStore {
    dir: PathBuf,
    keys: RwLock<Vec<Arc<SigningKey>>>,
    clock: Arc<dyn Clock>,
}

impl KeyStore {
    /// Loads the keys in `dir` (creating it, mode 0700), makes the first key if there is none,
    /// and deletes those no unexpired token can need. Blocking.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<KeyStore, KeyStoreError> {
        let io = |source| KeyStoreError::Io {
            path: dir.display().to_string(),
            source,
        };
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        // An existing directory keeps the mode it was made with: make sure of it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let keys = load(dir)?;
        let store = KeyStore {
            dir: dir.to_path_buf(),
            keys: RwLock::new(keys),
            clock,
        };
        if store.read().is_empty() {
            store.rotate()?;
        } else {
            store.prune()?;
        }
        Ok(store)
    }

    /// Reads the keys again (another node of the cluster rotated them). Blocking.
    pub fn reload(&self) -> Result<(), KeyStoreError> {
        let keys = load(&self.dir)?;
        if !keys.is_empty() {
            *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<SigningKey>>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The key that signs now.
    pub fn current(&self) -> Arc<SigningKey> {
        self.read().last().expect("there is always a key").clone()
    }

    /// Every key a valid token may name: the current one and those it replaced less than
    /// `MAX_TOKEN_LIFETIME + SKEW` ago, newest first.
    pub fn published(&self) -> Vec<Arc<SigningKey>> {
        let now = self.clock.now_secs();
        let keys = self.read();
        let mut published: Vec<_> = keys
            .iter()
            .zip(keys.iter().skip(1).map(|next| Some(next.created)).chain([None]))
            .filter(|(_, replaced)| replaced.is_none_or(|at| now <= retire_at(at)))
            .map(|(key, _)| key.clone())
            .collect();
        published.reverse();
        published
    }

    /// Makes a new key, which signs from now on, and deletes those no unexpired token can need.
    /// Returns the new key's id. Blocking.
    pub fn rotate(&self) -> Result<String, KeyStoreError> {
        let io = |source| KeyStoreError::Io {
            path: self.dir.display().to_string(),
            source,
        };
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyStoreError::Generate)?;
        let pair = Ed25519KeyPair::from_pkcs8(document.as_ref()).map_err(|_| KeyStoreError::Generate)?;
        let kid = thumbprint(pair.public_key().as_ref());
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        // Always newer than the key it replaces (by a second, if two rotations share one), so the
        // order of the names is the order of the rotations.
        let created = keys
            .last()
            .map_or(0, |last| last.created + 1)
            .max(self.clock.now_secs());
        let path = self.dir.join(file_name(created, &kid));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        file.write_all(document.as_ref()).map_err(io)?;
        file.sync_all().map_err(io)?;
        crate::storage::local::sync_dir(&self.dir).map_err(io)?;
        keys.push(Arc::new(SigningKey {
            kid: kid.clone(),
            created,
            pair,
        }));
        drop(keys);
        self.prune()?;
        Ok(kid)
    }

    /// Rotates if the signing key is older than `ROTATE_AFTER`; returns the new key's id if it
    /// did, and deletes keys no unexpired token can need either way. Blocking.
    pub fn rotate_if_due(&self) -> Result<Option<String>, KeyStoreError> {
        let age = self.clock.now_secs().saturating_sub(self.current().created);
        if age >= ROTATE_AFTER.as_secs() {
            return self.rotate().map(Some);
        }
        self.prune()?;
        Ok(None)
    }

    /// Deletes the keys that are no longer published, from memory and disk.
    fn prune(&self) -> Result<(), KeyStoreError> {
        let published = self.published();
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let (kept, gone): (Vec<_>, Vec<_>) = keys
            .drain(..)
            .partition(|key| published.iter().any(|p| p.kid == key.kid));
        *keys = kept;
        for key in gone {
            let path = self.dir.join(file_name(key.created, &key.kid));
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(kid = %key.kid, "identity key retired: no unexpired token can name it"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(KeyStoreError::Io {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// The keys in `dir`, oldest first.
fn load(dir: &Path) -> Result<Vec<Arc<SigningKey>>, KeyStoreError> {
    let io = |source| KeyStoreError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut keys = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Some((created, kid)) = parse_name(&path) else {
            continue;
        };
        let bytes = std::fs::read(&path).map_err(io)?;
        let malformed = || KeyStoreError::Malformed {
            path: path.display().to_string(),
        };
        let pair = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| malformed())?;
        if thumbprint(pair.public_key().as_ref()) != kid {
            return Err(malformed());
        }
        keys.insert((created, kid.clone()), Arc::new(SigningKey { kid, created, pair }));
    }
    Ok(keys.into_values().collect())
}

/// When a key replaced at `replaced` (Unix seconds) stops being published.
fn retire_at(replaced: u64) -> u64 {
    replaced + MAX_TOKEN_LIFETIME.as_secs() + SKEW.as_secs()
}

fn file_name(created: u64, kid: &str) -> String {
    format!("{created:012}-{kid}.pk8")
}

/// `<created>-<kid>.pk8` → its parts; other files are not keys.
fn parse_name(path: &Path) -> Option<(u64, String)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".pk8")?;
    let (created, kid) = name.split_once('-')?;
    let created = created.parse().ok()?;
    let valid = kid.len() == 43 && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| (created, kid.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const START: u64 = 1_800_000_000_000;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_first_key_is_made_private_and_survives_a_restart() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("identity");
        let clock = ManualClock::at(START);
        let store = KeyStore::open(&dir, clock.clone()).unwrap();
        let kid = store.current().kid.clone();
        assert_eq!(kid, thumbprint(store.current().public()));
        assert_eq!(kid.len(), 43, "a SHA-256 in base64url: {kid}");
        assert_eq!(mode(&dir), 0o700);
        let files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(mode(&files[0]), 0o600);
        assert!(files[0].to_str().unwrap().ends_with(&format!("-{kid}.pk8")));

        let message = b"header.claims";
        let signature = store.current().sign(message);
        drop(store);
        let again = KeyStore::open(&dir, clock).unwrap();
        assert_eq!(again.current().kid, kid, "the same key after a restart");
        let current = again.current();
        let public = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, current.public());
        assert!(public.verify(message, &signature).is_ok());
        assert_eq!(again.published().len(), 1);
    }

    #[test]
    fn a_replaced_key_is_published_until_its_last_token_expired() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("identity");
        let clock = ManualClock::at(START);
        let store = KeyStore::open(&dir, clock.clone()).unwrap();
        let old = store.current().kid.clone();
        clock.advance(Duration::from_secs(10));
        let new = store.rotate().unwrap();
        assert_ne!(new, old);
        assert_eq!(store.current().kid, new, "the newest key signs");
        let kids = |store: &KeyStore| store.published().iter().map(|k| k.kid.clone()).collect::<Vec<_>>();
        assert_eq!(kids(&store), [new.clone(), old.clone()], "newest first");

        // Still there through the last second a token it signed can be valid (plus the skew),
        // across a restart too.
        clock.advance(MAX_TOKEN_LIFETIME + SKEW);
        let store = KeyStore::open(&dir, clock.clone()).unwrap();
        assert_eq!(kids(&store), [new.clone(), old.clone()]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);

        // Then it goes, from the JWKS and from the disk.
        clock.advance(Duration::from_secs(1));
        assert_eq!(kids(&store), vec![new.clone()]);
        assert_eq!(store.rotate_if_due().unwrap(), None, "the current key is not due yet");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert_eq!(kids(&KeyStore::open(&dir, clock).unwrap()), vec![new]);
    }

    #[test]
    fn the_signing_key_is_replaced_once_due() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("identity");
        let clock = ManualClock::at(START);
        let store = KeyStore::open(&dir, clock.clone()).unwrap();
        let first = store.current().kid.clone();
        clock.advance(ROTATE_AFTER - Duration::from_secs(1));
        assert_eq!(store.rotate_if_due().unwrap(), None);
        clock.advance(Duration::from_secs(1));
        let second = store.rotate_if_due().unwrap().expect("due after ROTATE_AFTER");
        assert_eq!(store.current().kid, second);
        assert_eq!(store.published().len(), 2, "{first} is still published");
    }

    #[test]
    fn a_key_whose_name_does_not_match_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("identity");
        let store = KeyStore::open(&dir, ManualClock::at(START)).unwrap();
        let kid = store.current().kid.clone();
        drop(store);
        let path = dir.join(file_name(START / 1000, &kid));
        let other = dir.join(file_name(START / 1000, &"A".repeat(43)));
        std::fs::rename(&path, &other).unwrap();
        let refused = KeyStore::open(&dir, ManualClock::at(START)).err().unwrap();
        assert!(matches!(refused, KeyStoreError::Malformed { .. }), "{refused}");
    }
}
