//! Seals: keyed MACs over what Kiln wrote to its data directory and will later execute — compiled
//! code, microVM snapshots. Whoever can write the data directory (a restored backup, a shared
//! volume) could otherwise swap one function's native code for another's, or for their own; a
//! file whose seal does not verify is never loaded. The key is this node's own, created on first
//! start (`<data>/seal.key`, 0600), so a file sealed elsewhere does not verify here either; the
//! nodes of a cluster share theirs (`storage::postgres::secrets`), to check the compiled code they
//! publish for each other.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Clone)]
pub struct Sealer {
    key: [u8; 32],
}

impl Sealer {
    /// Loads the key at `path`, creating it if there is none.
    pub fn open(path: &Path) -> std::io::Result<Sealer> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let key = <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| std::io::Error::other(format!("{} is not a 32-byte key", path.display())))?;
                Ok(Sealer { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
                file.write_all(&key)?;
                file.sync_all()?;
                Ok(Sealer { key })
            }
            Err(e) => Err(e),
        }
    }

    /// The key itself, for a keyed derivation of another kind (`auth`'s AWS secrets).
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// The seal of `parts`, each length-prefixed so that no two sequences of parts collide.
    pub fn seal(&self, parts: &[&[u8]]) -> String {
        hex::encode(self.mac(parts).finalize().into_bytes())
    }

    /// Whether `seal` is the seal of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], seal: &str) -> bool {
        let Ok(expected) = hex::decode(seal.trim()) else {
            return false;
        };
        self.mac(parts).verify_slice(&expected).is_ok()
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_verify_only_the_same_parts_under_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seal.key");
        let sealer = Sealer::open(&path).unwrap();
        let seal = sealer.seal(&[b"code", b"digest"]);
        assert!(sealer.verify(&[b"code", b"digest"], &seal));
        assert!(!sealer.verify(&[b"code", b"other"], &seal));
        assert!(
            !sealer.verify(&[b"cod", b"edigest"], &seal),
            "parts are length-prefixed"
        );
        assert!(!sealer.verify(&[b"code", b"digest"], "not hex"));
        assert!(
            Sealer::open(&path).unwrap().verify(&[b"code", b"digest"], &seal),
            "the key persists"
        );
        let elsewhere = Sealer::open(&tempfile::tempdir().unwrap().path().join("seal.key")).unwrap();
        assert!(!elsewhere.verify(&[b"code", b"digest"], &seal), "another node's key");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
