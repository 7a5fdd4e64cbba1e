//! Stored API tokens: an id, the SHA-256 of the secret (never the secret), and a scope.

use rusqlite::params;

use super::{now_rfc3339, Store, StoreError};

/// One stored token, as `Auth` loads it.
pub struct TokenRow {
    pub id: String,
    pub hash: Vec<u8>,
    /// `admin`, or the JSON of an invoke-only scope.
    pub scope: String,
    pub created_at: String,
}

impl Store {
    /// Every token but the admin token, oldest first.
    pub fn scoped_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id, hash, scope, created_at FROM tokens WHERE id != 'admin' ORDER BY created_at, id")?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenRow {
                id: r.get(0)?,
                hash: r.get(1)?,
                scope: r.get(2)?,
                created_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds a token; returns its creation time.
    pub fn insert_token(&self, id: &str, hash: &[u8], scope: &str) -> Result<String, StoreError> {
        let now = now_rfc3339();
        self.conn().execute(
            "INSERT INTO tokens (id, hash, scope, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, hash, scope, now],
        )?;
        Ok(now)
    }

    /// Deletes a non-admin token; false when there was none with this id.
    pub fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let deleted = conn.execute("DELETE FROM tokens WHERE id = ?1 AND id != 'admin'", params![id])?;
        Ok(deleted > 0)
    }
}
