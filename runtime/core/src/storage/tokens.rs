//! Stored API tokens: an id, the SHA-256 of the secret (never the secret), and a scope.

/// One stored token, as `Auth` loads it.
pub struct TokenRow {
    pub id: String,
    pub hash: Vec<u8>,
    /// `admin`, or the JSON of an invoke-only scope.
    pub scope: String,
    pub created_at: String,
}
