//! Content addresses: the SHA-256 that names every artifact, snapshot and result in Kiln.

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest in lowercase hex, the name of an artifact everywhere in Kiln.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(hex::encode(Sha256::digest(bytes)))
    }

    /// The digest of `bytes` within `scope`: equal bytes in two scopes get different names, so
    /// what one scope stores tells nothing about what another holds.
    pub fn scoped(scope: &str, bytes: &[u8]) -> Digest {
        let mut hasher = Sha256::new();
        hasher.update((scope.len() as u64).to_le_bytes());
        hasher.update(scope.as_bytes());
        hasher.update(bytes);
        Digest(hex::encode(hasher.finalize()))
    }

    /// Accepts only 64 lowercase hex characters, so a digest read back is safe to use in a path.
    pub fn parse(hex: &str) -> Option<Digest> {
        let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| Digest(hex.to_owned()))
    }

    pub fn hex(&self) -> &str {
        &self.0
    }

    /// The form the API shows: `sha256:<hex>`.
    pub fn prefixed(&self) -> String {
        format!("sha256:{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_parse_rejects_paths() {
        let d = Digest::of(b"hello");
        assert_ne!(Digest::scoped("a", b"hello"), d);
        assert_ne!(Digest::scoped("a", b"hello"), Digest::scoped("b", b"hello"));
        assert_ne!(Digest::scoped("ab", b"c"), Digest::scoped("a", b"bc"));
        assert_eq!(Digest::parse(d.hex()), Some(d.clone()));
        assert!(d.prefixed().starts_with("sha256:"));
        assert_eq!(Digest::parse("../etc/passwd"), None);
        assert_eq!(Digest::parse(&"A".repeat(64)), None);
        assert_eq!(Digest::parse(&"a".repeat(63)), None);
    }
}
