//! The PostgreSQL schema: the same versions as SQLite's (`sqlite::MIGRATIONS`), one for one, in
//! PostgreSQL's types. Only the async queue differs: its rows carry a lease (`lease_owner`,
//! `lease_until_ms`), since several nodes claim from it.
//!
//! `kiln_schema` holds the version. One node applies what is missing while holding an advisory
//! lock, so nodes starting together never race on DDL; a node that finds a version newer than it
//! knows refuses to start rather than write rows an older code does not understand.

use postgres::Client;

use crate::storage::StorageError;

/// The advisory lock migrations run under (`KILN` and 1, PostgreSQL's two-key form).
const MIGRATION_LOCK: (i32, i32) = (0x4b49_4c4e, 1);

pub const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE functions (
        name        TEXT PRIMARY KEY,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE versions (
        name        TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
        version     BIGINT NOT NULL,
        digest      TEXT NOT NULL,
        code_digest TEXT NOT NULL,
        kind        TEXT NOT NULL,
        config      TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE INDEX versions_by_digest ON versions(digest);
    CREATE INDEX versions_by_code_digest ON versions(code_digest);
    CREATE TABLE version_counters (
        name          TEXT PRIMARY KEY,
        last_version  BIGINT NOT NULL
    );
    CREATE TABLE tokens (
        id          TEXT PRIMARY KEY,
        hash        BYTEA NOT NULL,
        scope       TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
"#,
    r#"
    -- The queue and the record of asynchronous invocations. A `running` row belongs to the node
    -- named by `lease_owner` until `lease_until_ms`; past it any node may claim it again.
    CREATE TABLE invocations (
        id              TEXT PRIMARY KEY,
        function        TEXT NOT NULL,
        version         BIGINT NOT NULL,
        state           TEXT NOT NULL,
        input           BYTEA NOT NULL,
        idempotency_key TEXT,
        attempts        BIGINT NOT NULL DEFAULT 0,
        max_attempts    BIGINT NOT NULL,
        run_after_ms    BIGINT NOT NULL,
        created_at      TEXT NOT NULL,
        finished_at     TEXT,
        finished_ms     BIGINT,
        duration_us     BIGINT,
        error           TEXT,
        stderr          TEXT,
        result          BYTEA,
        lease_owner     TEXT,
        lease_until_ms  BIGINT
    );
    CREATE UNIQUE INDEX invocations_by_idempotency_key ON invocations(function, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX invocations_queue ON invocations(state, run_after_ms);
    CREATE INDEX invocations_leases ON invocations(lease_until_ms) WHERE state = 'running';
    CREATE INDEX invocations_finished ON invocations(finished_ms) WHERE finished_ms IS NOT NULL;
"#,
    r#"
    ALTER TABLE invocations ADD COLUMN result_digest TEXT;
    CREATE INDEX invocations_by_result_digest ON invocations(result_digest) WHERE result_digest IS NOT NULL;
"#,
    r#"
    CREATE TABLE invocation_logs (
        id          TEXT PRIMARY KEY,
        function    TEXT NOT NULL,
        version     BIGINT NOT NULL,
        outcome     TEXT NOT NULL,
        duration_us BIGINT NOT NULL,
        created_ms  BIGINT NOT NULL,
        stderr      TEXT NOT NULL
    );
"#,
    r#"
    CREATE TABLE sandboxes (
        id                 TEXT PRIMARY KEY,
        function           TEXT NOT NULL,
        version            BIGINT NOT NULL,
        tier               TEXT NOT NULL,
        state              TEXT NOT NULL,
        error              TEXT,
        settings           TEXT NOT NULL,
        idempotency_key    TEXT,
        created_at         TEXT NOT NULL,
        last_active_ms     BIGINT NOT NULL,
        running_ms         BIGINT NOT NULL,
        running_since_ms   BIGINT,
        suspended_ms       BIGINT NOT NULL,
        suspended_since_ms BIGINT,
        state_digest       TEXT,
        state_bytes        BIGINT NOT NULL,
        suspended_at       TEXT,
        resumed_from       TEXT
    );
    CREATE UNIQUE INDEX sandboxes_by_idempotency_key ON sandboxes(idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX sandboxes_by_state ON sandboxes(state);
    CREATE INDEX sandboxes_by_state_digest ON sandboxes(state_digest) WHERE state_digest IS NOT NULL;
    CREATE TABLE sandbox_tokens (
        hash        BYTEA PRIMARY KEY,
        sandbox     TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        scopes      TEXT NOT NULL,
        expires_ms  BIGINT
    );
"#,
    r#"
    CREATE TABLE sandbox_states (
        digest      TEXT PRIMARY KEY
    );
    CREATE TABLE sandbox_state_chunks (
        state       TEXT NOT NULL REFERENCES sandbox_states(digest) ON DELETE CASCADE,
        chunk       TEXT NOT NULL,
        PRIMARY KEY (state, chunk)
    );
    CREATE INDEX sandbox_state_chunks_by_chunk ON sandbox_state_chunks(chunk);
"#,
    r#"
    ALTER TABLE sandbox_states ADD COLUMN manifest BYTEA;
"#,
    r#"
    CREATE TABLE connectors (
        name        TEXT PRIMARY KEY,
        spec        TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE version_connectors (
        connector   TEXT NOT NULL REFERENCES connectors(name),
        name        TEXT NOT NULL,
        version     BIGINT NOT NULL,
        PRIMARY KEY (connector, name, version),
        FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
    );
    CREATE TABLE sandbox_connectors (
        connector   TEXT NOT NULL REFERENCES connectors(name),
        sandbox     TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        PRIMARY KEY (connector, sandbox)
    );
"#,
    r#"
    CREATE TABLE nodes (
        id           TEXT PRIMARY KEY,
        info         TEXT NOT NULL,
        last_seen_ms BIGINT NOT NULL
    );
"#,
    r#"
    CREATE TABLE secrets (
        name  TEXT PRIMARY KEY,
        bytes BYTEA NOT NULL
    );
"#,
];

/// Brings the schema up to [`MIGRATIONS`], under the migration lock.
pub fn migrate(client: &mut Client) -> Result<(), StorageError> {
    migrate_to(client, MIGRATIONS)
}

pub(crate) fn migrate_to(client: &mut Client, migrations: &[&str]) -> Result<(), StorageError> {
    let (k1, k2) = MIGRATION_LOCK;
    client.execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])?;
    let result = apply(client, migrations);
    // Session locks outlive transactions: release it whatever happened.
    let unlocked = client.execute("SELECT pg_advisory_unlock($1, $2)", &[&k1, &k2]);
    result?;
    unlocked?;
    Ok(())
}

fn apply(client: &mut Client, migrations: &[&str]) -> Result<(), StorageError> {
    client.batch_execute("CREATE TABLE IF NOT EXISTS kiln_schema (version BIGINT NOT NULL)")?;
    let found: Option<i64> = client
        .query_opt("SELECT version FROM kiln_schema", &[])?
        .map(|row| row.get(0));
    let applied = found.unwrap_or(0);
    let known = migrations.len() as i64;
    if applied > known {
        return Err(StorageError::NewerSchema { found: applied, known });
    }
    for (i, sql) in migrations.iter().enumerate().skip(applied as usize) {
        let mut tx = client.transaction()?;
        tx.batch_execute(sql)?;
        tx.execute("DELETE FROM kiln_schema", &[])?;
        tx.execute("INSERT INTO kiln_schema (version) VALUES ($1)", &[&(i as i64 + 1)])?;
        tx.commit()?;
    }
    if applied < known {
        tracing::info!(from = applied, to = known, "database schema migrated");
    }
    Ok(())
}
