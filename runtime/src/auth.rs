//! Bearer-token authentication. Only SHA-256 hashes of tokens are stored; a presented token is
//! hashed and compared in constant time. The admin token is created on first start and written to
//! `<data>/admin.token` (mode 0600), unless `KILN_ADMIN_TOKEN` provides it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::store::{Store, StoreError};

const ADMIN_ID: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("admin token file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("admin token file {0} is empty")]
    Empty(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Auth {
    admin_hash: [u8; 32],
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
        store: &Store,
        token_file: &Path,
        from_env: Option<&str>,
    ) -> Result<(Auth, AdminTokenSource), AuthSetupError> {
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
        Ok((Auth { admin_hash }, source))
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = authorization.and_then(bearer_token) else {
            return false;
        };
        hash(token).ct_eq(&self.admin_hash).into()
    }
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
        let store = Store::open(&dir.path().join("db")).unwrap();
        let file = dir.path().join("admin.token");
        let (auth, source) = Auth::init(&store, &file, None).unwrap();
        assert!(matches!(source, AdminTokenSource::CreatedFile));
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let token = std::fs::read_to_string(&file).unwrap().trim().to_owned();
        assert!(auth.check(Some(format!("Bearer {token}").as_bytes())));
        assert!(auth.check(Some(format!("bearer {token}").as_bytes())));
        assert!(!auth.check(Some(format!("Bearer {token}x").as_bytes())));
        assert!(!auth.check(Some(token.as_bytes())));
        assert!(!auth.check(None));
        // The database holds the hash, never the token.
        let stored = store.token_hash("admin").unwrap().unwrap();
        assert_eq!(stored, hash(&token).to_vec());
        assert!(!String::from_utf8_lossy(&stored).contains(&token));

        let (again, source) = Auth::init(&store, &file, None).unwrap();
        assert!(matches!(source, AdminTokenSource::ExistingFile));
        assert!(again.check(Some(format!("Bearer {token}").as_bytes())));
        let (env, _) = Auth::init(&store, &file, Some("secret")).unwrap();
        assert!(env.check(Some(b"Bearer secret")));
        assert!(!env.check(Some(format!("Bearer {token}").as_bytes())));
    }
}
