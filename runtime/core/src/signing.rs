//! Signed result URLs: `/v1/results/<id>?expires=<unix s>&kid=<key id>&sig=<hex>`, where `sig` is
//! HMAC-SHA256 over the method, the path, the invocation id, the expiry and the key id. Fetching
//! one needs no token; any change to the path or query, or a time past `expires`, is refused.
//!
//! Keys live in `<data>/keys/<kid>.key` (32 random bytes, mode 0600). The newest key signs; every
//! key present verifies. [`Signer::rotate`] (`kiln keys rotate`) makes a new key and retires every
//! other: URLs signed before it are refused from then on — what to do when a URL, or the token
//! that fetched it, must stop working.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::clock::Clock;

/// Lifetime of a URL unless the caller asks for another.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(15 * 60);
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct Signer {
    dir: PathBuf,
    keys: RwLock<Keys>,
    clock: Arc<dyn Clock>,
}

/// The keys that verify, and the one that signs.
struct Keys {
    all: HashMap<String, [u8; 32]>,
    current: String,
}

/// Why a URL was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the URL is not a valid signed result URL")]
    Malformed,
    #[error("the URL has expired")]
    Expired,
    #[error("the URL's signature does not match")]
    BadSignature,
}

/// Writes a new random key into `dir`; returns its id and bytes.
fn new_key(dir: &Path) -> std::io::Result<(String, [u8; 32])> {
    let kid = hex::encode(rand::random::<[u8; 4]>());
    let key: [u8; 32] = rand::random();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(format!("{kid}.key")))?;
    file.write_all(&key)?;
    file.sync_all()?;
    Ok((kid, key))
}

/// The keys in `dir`, the newest signing; `None` if there is none.
fn load(dir: &Path) -> std::io::Result<Option<Keys>> {
    let mut all = HashMap::new();
    let mut newest: Option<(SystemTime, String)> = None;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(kid) = name.to_str().and_then(|n| n.strip_suffix(".key")) else {
            continue;
        };
        let bytes = std::fs::read(entry.path())?;
        let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) else {
            tracing::warn!(file = %entry.path().display(), "ignoring a signing key that is not 32 bytes");
            continue;
        };
        let modified = entry.metadata()?.modified()?;
        if newest.as_ref().is_none_or(|(t, k)| (modified, kid) > (*t, k.as_str())) {
            newest = Some((modified, kid.to_owned()));
        }
        all.insert(kid.to_owned(), key);
    }
    Ok(newest.map(|(_, current)| Keys { all, current }))
}

impl Signer {
    /// Loads the keys in `dir`, creating the first one if there is none.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> std::io::Result<Signer> {
        std::fs::create_dir_all(dir)?;
        let keys = match load(dir)? {
            Some(keys) => keys,
            None => {
                let (kid, key) = new_key(dir)?;
                Keys {
                    all: HashMap::from([(kid.clone(), key)]),
                    current: kid,
                }
            }
        };
        Ok(Signer {
            dir: dir.to_path_buf(),
            keys: RwLock::new(keys),
            clock,
        })
    }

    /// Reads the keys again (another node of the cluster rotated them). Blocking.
    pub fn reload(&self) -> std::io::Result<()> {
        if let Some(keys) = load(&self.dir)? {
            *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        }
        Ok(())
    }

    /// Makes a new signing key and retires every other, on disk and here: URLs signed before are
    /// refused from now on. Returns the new key's id and how many were retired. Blocking.
    pub fn rotate(&self) -> std::io::Result<(String, usize)> {
        let (kid, key) = new_key(&self.dir)?;
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let mut retired = 0;
        for old in keys.all.keys() {
            std::fs::remove_file(self.dir.join(format!("{old}.key")))?;
            retired += 1;
        }
        crate::storage::local::sync_dir(&self.dir)?;
        *keys = Keys {
            all: HashMap::from([(kid.clone(), key)]),
            current: kid.clone(),
        };
        Ok((kid, retired))
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn mac(keys: &Keys, kid: &str, id: &str, expires: u64) -> Option<Hmac<Sha256>> {
        let key = keys.all.get(kid)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(format!("GET\n/v1/results/{id}\n{id}\n{expires}\n{kid}").as_bytes());
        Some(mac)
    }

    /// A URL for the result of invocation `id`, valid for `lifetime` (capped at `MAX_LIFETIME`).
    pub fn url(&self, id: &str, lifetime: Duration) -> String {
        let expires = self.clock.now_secs() + lifetime.min(MAX_LIFETIME).as_secs();
        // One read of the keys for both: a rotation in between cannot leave `current` unknown.
        let keys = self.keys();
        let sig = Signer::mac(&keys, &keys.current, id, expires)
            .expect("the current key exists")
            .finalize()
            .into_bytes();
        format!(
            "/v1/results/{id}?expires={expires}&kid={}&sig={}",
            keys.current,
            hex::encode(sig)
        )
    }

    /// Checks the id from the path and the raw query of a result URL. The query must be exactly
    /// what `url` produced: the three parameters, in order, nothing else.
    pub fn verify(&self, id: &str, query: Option<&str>) -> Result<(), Refused> {
        let mut parts = query.ok_or(Refused::Malformed)?.split('&');
        let mut param = |name: &str| {
            parts
                .next()
                .and_then(|p| p.strip_prefix(name))
                .and_then(|p| p.strip_prefix('='))
                .ok_or(Refused::Malformed)
        };
        let expires_text = param("expires")?;
        let kid = param("kid")?;
        let sig_hex = param("sig")?;
        if parts.next().is_some() {
            return Err(Refused::Malformed);
        }
        let expires: u64 = expires_text.parse().map_err(|_| Refused::Malformed)?;
        // Canonical decimal only, so the signed text and the URL cannot differ (`+5`, `05`).
        if expires.to_string() != expires_text {
            return Err(Refused::Malformed);
        }
        let sig = hex::decode(sig_hex).map_err(|_| Refused::Malformed)?;
        if hex::encode(&sig) != sig_hex {
            return Err(Refused::Malformed);
        }
        let mac = Signer::mac(&self.keys(), kid, id, expires).ok_or(Refused::BadSignature)?;
        // `verify_slice` compares in constant time.
        mac.verify_slice(&sig).map_err(|_| Refused::BadSignature)?;
        if self.clock.now_secs() > expires {
            return Err(Refused::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, SystemClock};

    fn open(dir: &Path) -> Signer {
        Signer::open(dir, Arc::new(SystemClock)).unwrap()
    }

    fn split(url: &str) -> (String, Option<String>) {
        let (path, query) = url.split_once('?').unwrap();
        (
            path.strip_prefix("/v1/results/").unwrap_or(path).to_owned(),
            Some(query.to_owned()),
        )
    }

    #[test]
    fn round_trip_and_every_single_byte_mutation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let signer = open(dir.path());
        let url = signer.url("0193c8a4-0000-7000-8000-000000000001", DEFAULT_LIFETIME);
        let (id, query) = split(&url);
        assert_eq!(signer.verify(&id, query.as_deref()), Ok(()));
        let prefix = "/v1/results/".len();
        for position in prefix..url.len() {
            for replacement in [b'0', b'f', b'x', b'&', b'=', b'%'] {
                let mut bytes = url.clone().into_bytes();
                if bytes[position] == replacement {
                    continue;
                }
                bytes[position] = replacement;
                let mutated = String::from_utf8(bytes).unwrap();
                let Some((path, query)) = mutated.split_once('?') else {
                    continue;
                };
                let id = &path[prefix..];
                assert!(
                    signer.verify(id, Some(query)).is_err(),
                    "accepted a mutation at {position}: {mutated}"
                );
            }
        }
        // A key from another data directory does not verify.
        let other = open(tempfile::tempdir().unwrap().path());
        assert!(other.verify(&id, query.as_deref()).is_err());
        // Reopening keeps the key, so URLs survive restarts.
        let again = open(dir.path());
        assert_eq!(again.verify(&id, query.as_deref()), Ok(()));
    }

    #[test]
    fn rotation_retires_every_older_key_and_its_urls() {
        let dir = tempfile::tempdir().unwrap();
        let signer = open(dir.path());
        let (id, query) = split(&signer.url("abc", DEFAULT_LIFETIME));
        let (kid, retired) = signer.rotate().unwrap();
        assert_eq!(retired, 1);
        assert_eq!(signer.verify(&id, query.as_deref()), Err(Refused::BadSignature));
        let (id2, query2) = split(&signer.url("abc", DEFAULT_LIFETIME));
        assert!(query2.as_deref().unwrap().contains(&format!("kid={kid}")));
        assert_eq!(signer.verify(&id2, query2.as_deref()), Ok(()));
        // On disk too: a restart knows only the new key.
        let again = open(dir.path());
        assert_eq!(again.verify(&id, query.as_deref()), Err(Refused::BadSignature));
        assert_eq!(again.verify(&id2, query2.as_deref()), Ok(()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn urls_expire_on_the_clock_and_lifetimes_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::at(1_800_000_000_000);
        let signer = Signer::open(dir.path(), clock.clone()).unwrap();
        let url = signer.url("abc", Duration::from_secs(60));
        let (id, query) = split(&url);
        assert_eq!(signer.verify(&id, query.as_deref()), Ok(()));
        clock.advance(Duration::from_secs(60));
        assert_eq!(
            signer.verify(&id, query.as_deref()),
            Ok(()),
            "valid through its last second"
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(signer.verify(&id, query.as_deref()), Err(Refused::Expired));

        let url = signer.url("abc", Duration::from_secs(30 * 24 * 3600));
        let expires: u64 = url
            .split("expires=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(expires, clock.now_secs() + MAX_LIFETIME.as_secs());
    }
}
