//! [`Metadata`] on SQLite: one database file in the data directory, WAL, `synchronous=FULL`,
//! migrations counted by `PRAGMA user_version`. The API's reads and the deploy commits share one
//! connection behind a std `Mutex` (every call is short and never awaits while holding it); the
//! async queue's ledger and the invocation-log writer open their own ([`connect`]).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::{Durability, Metadata, Released, StateRecord, StorageError, StoredResult, TokenRow};
use crate::clock::now_rfc3339;
use crate::connectors::{Connector, ConnectorSpec, ConnectorUse, Deleted};
use crate::digest::Digest;
use crate::function::Tier;
use crate::function::{ArtifactKind, FunctionConfig, VersionRecord};
use crate::invocations::{id_ms, Mode, Query as InvocationQuery, Record, Summary as InvocationSummary};
use crate::sandboxes::record::{Sandbox, SandboxToken, State as SandboxState};

/// Schema migrations, applied in order; `PRAGMA user_version` counts how many have run.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE functions (
        name        TEXT PRIMARY KEY,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE versions (
        name        TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
        version     INTEGER NOT NULL,
        digest      TEXT NOT NULL,
        code_digest TEXT NOT NULL,
        kind        TEXT NOT NULL,
        config      TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE INDEX versions_by_digest ON versions(digest);
    CREATE INDEX versions_by_code_digest ON versions(code_digest);
    -- Version numbers are never reused, even after a function is deleted and deployed again,
    -- so a handle `name@N` always means the same code.
    CREATE TABLE version_counters (
        name          TEXT PRIMARY KEY,
        last_version  INTEGER NOT NULL
    );
    CREATE TABLE tokens (
        id          TEXT PRIMARY KEY,
        hash        BLOB NOT NULL,
        scope       TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
"#,
    r#"
    -- Asynchronous invocations: the queue and the record. A row exists only once its submit was
    -- committed; `running` rows found at start-up go back to `queued` (at-least-once).
    CREATE TABLE invocations (
        id              TEXT PRIMARY KEY,
        function        TEXT NOT NULL,
        version         INTEGER NOT NULL,
        state           TEXT NOT NULL,
        input           BLOB NOT NULL,
        idempotency_key TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        max_attempts    INTEGER NOT NULL,
        run_after_ms    INTEGER NOT NULL,
        created_at      TEXT NOT NULL,
        finished_at     TEXT,
        finished_ms     INTEGER,
        duration_us     INTEGER,
        error           TEXT,
        stderr          TEXT,
        result          BLOB
    );
    CREATE UNIQUE INDEX invocations_by_idempotency_key ON invocations(function, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX invocations_queue ON invocations(state, run_after_ms);
    CREATE INDEX invocations_finished ON invocations(finished_ms) WHERE finished_ms IS NOT NULL;
"#,
    r#"
    -- Results too large for their row live in `<data>/results/<digest>`.
    ALTER TABLE invocations ADD COLUMN result_digest TEXT;
    CREATE INDEX invocations_by_result_digest ON invocations(result_digest) WHERE result_digest IS NOT NULL;
"#,
    r#"
    -- Logs of synchronous invocations (asynchronous ones keep theirs in `invocations`), written in
    -- batches off the request path (see `logs.rs`). Ids are UUIDv7, so key order is time order and
    -- the retention sweep deletes a key range.
    CREATE TABLE invocation_logs (
        id          TEXT PRIMARY KEY,
        function    TEXT NOT NULL,
        version     INTEGER NOT NULL,
        outcome     TEXT NOT NULL,
        duration_us INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL,
        stderr      TEXT NOT NULL
    ) WITHOUT ROWID;
"#,
    r#"
    -- Sandboxes: long-lived instances (`crate::sandboxes`). Rows stay after termination (the record
    -- is what `GET /v1/sandboxes/{id}` shows); `state_digest` names the last suspend point's blob.
    CREATE TABLE sandboxes (
        id                 TEXT PRIMARY KEY,
        function           TEXT NOT NULL,
        version            INTEGER NOT NULL,
        tier               TEXT NOT NULL,
        state              TEXT NOT NULL,
        error              TEXT,
        settings           TEXT NOT NULL,
        idempotency_key    TEXT,
        created_at         TEXT NOT NULL,
        last_active_ms     INTEGER NOT NULL,
        running_ms         INTEGER NOT NULL,
        running_since_ms   INTEGER,
        suspended_ms       INTEGER NOT NULL,
        suspended_since_ms INTEGER,
        state_digest       TEXT,
        state_bytes        INTEGER NOT NULL,
        suspended_at       TEXT,
        resumed_from       TEXT
    );
    CREATE UNIQUE INDEX sandboxes_by_idempotency_key ON sandboxes(idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX sandboxes_by_state ON sandboxes(state);
    CREATE INDEX sandboxes_by_state_digest ON sandboxes(state_digest) WHERE state_digest IS NOT NULL;
    CREATE TABLE sandbox_tokens (
        hash        BLOB PRIMARY KEY,
        sandbox     TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        scopes      TEXT NOT NULL,
        expires_ms  INTEGER
    );
"#,
    r#"
    -- Sandbox states are manifests of content-addressed chunks; a chunk's blob is kept while a
    -- registered state lists it, a state while a sandbox points at it (sandboxes::saved).
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
    -- A state's manifest is kept with its row, committed with the sandbox that points at it;
    -- NULL for states saved before (their manifest is a blob).
    ALTER TABLE sandbox_states ADD COLUMN manifest BLOB;
"#,
    r#"
    -- Egress connectors (crate::connectors) and what references them: a version's references go
    -- with the version; a sandbox's count while the sandbox is not terminated or failed.
    CREATE TABLE connectors (
        name        TEXT PRIMARY KEY,
        spec        TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE version_connectors (
        connector   TEXT NOT NULL REFERENCES connectors(name),
        name        TEXT NOT NULL,
        version     INTEGER NOT NULL,
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
    -- The nodes serving this database (crate::cluster), one heartbeat row each.
    CREATE TABLE nodes (
        id           TEXT PRIMARY KEY,
        info         TEXT NOT NULL,
        last_seen_ms INTEGER NOT NULL
    );
"#,
    r#"
    -- The secrets the nodes of a PostgreSQL cluster share (postgres::secrets). A single node
    -- keeps them in its data directory only; the table keeps the two schemas' versions one for one.
    CREATE TABLE secrets (
        name  TEXT PRIMARY KEY,
        bytes BLOB NOT NULL
    );
"#,
];

pub struct Sqlite {
    conn: Mutex<Connection>,
}

/// Runs `write` with commits as durable as `durability` says. In WAL mode `synchronous=NORMAL`
/// commits without syncing the log; the next FULL commit syncs it, these pages included.
fn with_durability<T>(
    conn: &mut Connection,
    durability: Durability,
    write: impl FnOnce(&mut Connection) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    if durability == Durability::Disk {
        return write(conn);
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let written = write(conn);
    conn.pragma_update(None, "synchronous", "FULL")?;
    written
}

/// Opens another connection to the same database (the async queue's writer has its own, so its
/// batched commits never wait behind the API's reads).
pub fn connect(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

impl Sqlite {
    pub fn open(path: &Path) -> Result<Sqlite, StorageError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let applied: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(Sqlite { conn: Mutex::new(conn) })
    }

    pub fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn token_hash(&self, id: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let conn = self.conn();
        Ok(conn
            .query_row("SELECT hash FROM tokens WHERE id = ?1", params![id], |r| r.get(0))
            .optional()?)
    }
}

/// Writes a sandbox's state, clocks and suspend point.
fn write_sandbox(conn: &Connection, sandbox: &Sandbox) -> Result<(), StorageError> {
    conn.prepare_cached(
        "UPDATE sandboxes SET state = ?2, error = ?3, last_active_ms = ?4, running_ms = ?5,
         running_since_ms = ?6, suspended_ms = ?7, suspended_since_ms = ?8, state_digest = ?9,
         state_bytes = ?10, suspended_at = ?11, resumed_from = ?12
         WHERE id = ?1",
    )?
    .execute(params![
        sandbox.id,
        sandbox.state.as_str(),
        sandbox.error,
        sandbox.last_active_ms as i64,
        sandbox.running_ms as i64,
        sandbox.running_since_ms.map(|v| v as i64),
        sandbox.suspended_ms as i64,
        sandbox.suspended_since_ms.map(|v| v as i64),
        sandbox.state_digest.as_ref().map(|d| d.hex().to_owned()),
        sandbox.state_bytes as i64,
        sandbox.suspended_at,
        sandbox.resumed_from,
    ])?;
    Ok(())
}

/// Registers a sandbox state and its chunks, unless it is registered already.
fn insert_state(conn: &Connection, state: &StateRecord<'_>) -> Result<(), StorageError> {
    let added = conn
        .prepare_cached("INSERT OR IGNORE INTO sandbox_states (digest, manifest) VALUES (?1, ?2)")?
        .execute(params![state.digest.hex(), state.manifest])?;
    if added > 0 {
        let mut insert =
            conn.prepare_cached("INSERT OR IGNORE INTO sandbox_state_chunks (state, chunk) VALUES (?1, ?2)")?;
        for chunk in state.chunks {
            insert.execute(params![state.digest.hex(), chunk.hex()])?;
        }
    }
    Ok(())
}

impl Metadata for Sqlite {
    /// Commits a new version unless the latest one already has this digest and config, in which
    /// case that one is returned with `created = false`. One IMMEDIATE transaction, so two
    /// identical deploys racing each other still produce one version.
    fn commit_version(
        &self,
        name: &str,
        digest: &Digest,
        code_digest: &Digest,
        kind: ArtifactKind,
        config: &FunctionConfig,
    ) -> Result<(VersionRecord, bool), StorageError> {
        let config_json = serde_json::to_string(config).expect("config serialises");
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(latest) = latest_in(&tx, name)? {
            if latest.digest == *digest && latest.config == *config {
                return Ok((latest, false));
            }
        }
        let now = now_rfc3339();
        tx.execute(
            "INSERT OR IGNORE INTO functions (name, created_at) VALUES (?1, ?2)",
            params![name, now],
        )?;
        let version: u32 = tx.query_row(
            "INSERT INTO version_counters (name, last_version) VALUES (?1, 1)
             ON CONFLICT(name) DO UPDATE SET last_version = last_version + 1
             RETURNING last_version",
            params![name],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO versions (name, version, digest, code_digest, kind, config, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                name,
                version,
                digest.hex(),
                code_digest.hex(),
                kind.as_str(),
                config_json,
                now
            ],
        )?;
        for connector in &config.connectors {
            reference_connector(
                &tx,
                connector,
                "INSERT INTO version_connectors (connector, name, version) VALUES (?1, ?2, ?3)",
                params![connector, name, version],
            )?;
        }
        tx.commit()?;
        let record = VersionRecord {
            name: name.to_owned(),
            version,
            digest: digest.clone(),
            code_digest: code_digest.clone(),
            kind,
            config: config.clone(),
            created_at: now,
        };
        Ok((record, true))
    }

    fn latest(&self, name: &str) -> Result<Option<VersionRecord>, StorageError> {
        latest_in(&self.conn(), name)
    }

    fn version(&self, name: &str, version: u32) -> Result<Option<VersionRecord>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, version, digest, code_digest, kind, config, created_at FROM versions
             WHERE name = ?1 AND version = ?2",
        )?;
        let row = stmt.query_row(params![name, version], raw_row).optional()?;
        row.map(decode).transpose()
    }

    /// Every version of a function, oldest first; empty when there is no such function.
    fn versions(&self, name: &str) -> Result<Vec<VersionRecord>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, version, digest, code_digest, kind, config, created_at FROM versions
             WHERE name = ?1 ORDER BY version",
        )?;
        let rows = stmt.query_map(params![name], raw_row)?;
        rows.map(|r| decode(r?)).collect()
    }

    /// The latest version of every function, ordered by name.
    fn all_latest(&self) -> Result<Vec<VersionRecord>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT v.name, v.version, v.digest, v.code_digest, v.kind, v.config, v.created_at
             FROM versions v
             WHERE v.version = (SELECT MAX(version) FROM versions WHERE name = v.name)
             ORDER BY v.name",
        )?;
        let rows = stmt.query_map([], raw_row)?;
        rows.map(|r| decode(r?)).collect()
    }

    /// Deletes a function and its versions. Returns `None` if there was no such function, else
    /// the digests its versions used that no other version references any more.
    fn delete_function(&self, name: &str) -> Result<Option<Vec<Digest>>, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let digests: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT digest FROM versions WHERE name = ?1 UNION SELECT code_digest FROM versions WHERE name = ?1",
            )?;
            let rows = stmt.query_map(params![name], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if tx.execute("DELETE FROM functions WHERE name = ?1", params![name])? == 0 {
            return Ok(None);
        }
        let mut orphans = Vec::new();
        for digest in digests {
            let still_used: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM versions WHERE digest = ?1 OR code_digest = ?1)",
                params![digest],
                |r| r.get(0),
            )?;
            if !still_used {
                orphans.push(parse_digest(&digest)?);
            }
        }
        tx.commit()?;
        Ok(Some(orphans))
    }

    /// Every digest some version references (for sweeping unreferenced files at start-up).
    fn referenced_digests(&self) -> Result<HashSet<String>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT digest FROM versions UNION SELECT code_digest FROM versions")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_token_hash(&self, id: &str, hash: &[u8], scope: &str) -> Result<(), StorageError> {
        self.conn().execute(
            "INSERT INTO tokens (id, hash, scope, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET hash = excluded.hash, scope = excluded.scope",
            params![id, hash, scope, now_rfc3339()],
        )?;
        Ok(())
    }

    /// Every token but the admin token, oldest first.
    fn scoped_tokens(&self) -> Result<Vec<TokenRow>, StorageError> {
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
    fn insert_token(&self, id: &str, hash: &[u8], scope: &str) -> Result<String, StorageError> {
        let now = now_rfc3339();
        self.conn().execute(
            "INSERT INTO tokens (id, hash, scope, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, hash, scope, now],
        )?;
        Ok(now)
    }

    /// Deletes a non-admin token; false when there was none with this id.
    fn delete_token(&self, id: &str) -> Result<bool, StorageError> {
        let conn = self.conn();
        let deleted = conn.execute("DELETE FROM tokens WHERE id = ?1 AND id != 'admin'", params![id])?;
        Ok(deleted > 0)
    }

    fn invocation(&self, id: &str) -> Result<Option<Record>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, function, version, state, attempts, created_at, finished_at, duration_us, error, stderr
             FROM invocations WHERE id = ?1",
        )?;
        let record = stmt
            .query_row(params![id], |r| {
                let error: Option<String> = r.get(8)?;
                Ok(Record {
                    id: r.get(0)?,
                    function: r.get(1)?,
                    version: r.get(2)?,
                    state: r.get(3)?,
                    attempts: r.get(4)?,
                    created_at: r.get(5)?,
                    finished_at: r.get(6)?,
                    duration_us: r.get(7)?,
                    error: error.and_then(|e| serde_json::from_str(&e).ok()),
                    stderr: r.get(9)?,
                })
            })
            .optional()?;
        Ok(record)
    }

    fn invocation_result(&self, id: &str) -> Result<Option<StoredResult>, StorageError> {
        let conn = self.conn();
        let row: Option<(Option<Vec<u8>>, Option<String>)> = conn
            .prepare_cached("SELECT result, result_digest FROM invocations WHERE id = ?1 AND state = 'succeeded'")?
            .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            None => None,
            Some((_, Some(digest))) => Some(StoredResult::Blob(parse_digest(&digest)?)),
            Some((inline, None)) => Some(StoredResult::Inline(inline.unwrap_or_default())),
        })
    }

    fn invocation_log(&self, id: &str) -> Result<Option<String>, StorageError> {
        let conn = self.conn();
        let sync: Option<String> = conn
            .prepare_cached("SELECT stderr FROM invocation_logs WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?;
        if sync.is_some() {
            return Ok(sync);
        }
        let asynchronous: Option<Option<String>> = conn
            .prepare_cached("SELECT stderr FROM invocations WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?;
        Ok(asynchronous.map(Option::unwrap_or_default))
    }

    fn heartbeat(&self, node: &crate::cluster::Node) -> Result<(), StorageError> {
        let info = serde_json::to_string(node).expect("a node serialises");
        let forgotten = node
            .last_seen_ms
            .saturating_sub(crate::cluster::FORGOTTEN.as_millis() as u64);
        let conn = self.conn();
        conn.execute(
            "INSERT INTO nodes (id, info, last_seen_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET info = excluded.info, last_seen_ms = excluded.last_seen_ms",
            params![node.id, info, node.last_seen_ms as i64],
        )?;
        conn.execute("DELETE FROM nodes WHERE last_seen_ms < ?1", params![forgotten as i64])?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<crate::cluster::Node>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT info FROM nodes ORDER BY id")?;
        let infos = stmt.query_map([], |r| r.get::<_, String>(0))?;
        infos
            .map(|info| serde_json::from_str(&info?).map_err(|e| StorageError::Corrupt(format!("a node's row: {e}"))))
            .collect()
    }

    fn invocation_function(&self, id: &str) -> Result<Option<String>, StorageError> {
        let conn = self.conn();
        let sync = conn
            .prepare_cached("SELECT function FROM invocation_logs WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?;
        if sync.is_some() {
            return Ok(sync);
        }
        let asynchronous = conn
            .prepare_cached("SELECT function FROM invocations WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?;
        Ok(asynchronous)
    }

    fn invocations(&self, query: &InvocationQuery) -> Result<Vec<InvocationSummary>, StorageError> {
        // Each table is read newest first down its primary key (ids are UUIDv7, so key order is
        // time order) and cut at `limit` before the two are merged: the cost follows `limit`, not
        // the number of rows kept.
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM (
                 SELECT id, function, version, 'async', state, duration_us, attempts, NULL FROM invocations
                 WHERE (?1 IS NULL OR function IN (SELECT value FROM json_each(?1)))
                   AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR id < ?3)
                 ORDER BY id DESC LIMIT ?4)
             UNION ALL
             SELECT * FROM (
                 SELECT id, function, version, 'sync',
                        CASE outcome WHEN 'success' THEN 'succeeded' ELSE 'failed' END AS state,
                        duration_us, NULL, outcome FROM invocation_logs
                 WHERE (?1 IS NULL OR function IN (SELECT value FROM json_each(?1)))
                   AND (?2 IS NULL OR ?2 = CASE outcome WHEN 'success' THEN 'succeeded' ELSE 'failed' END)
                   AND (?3 IS NULL OR id < ?3)
                 ORDER BY id DESC LIMIT ?4)
             ORDER BY 1 DESC LIMIT ?4",
        )?;
        let functions = query
            .functions
            .as_ref()
            .map(|f| serde_json::to_string(f).expect("names serialise"));
        let rows = stmt.query_map(params![functions, query.state, query.before, query.limit as i64], |r| {
            let id: String = r.get(0)?;
            let mode: String = r.get(3)?;
            Ok(InvocationSummary {
                created_ms: id_ms(&id),
                id,
                function: r.get(1)?,
                version: r.get(2)?,
                mode: if mode == "sync" { Mode::Sync } else { Mode::Async },
                state: r.get(4)?,
                duration_us: r.get(5)?,
                attempts: r.get(6)?,
                outcome: r.get(7)?,
                log_kept: true,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<Option<String>, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(key) = &sandbox.idempotency_key {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT id FROM sandboxes WHERE idempotency_key = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()?;
            if existing.is_some() {
                return Ok(existing);
            }
        }
        tx.execute(
            "INSERT INTO sandboxes (id, function, version, tier, state, error, settings, idempotency_key,
                 created_at, last_active_ms, running_ms, running_since_ms, suspended_ms, suspended_since_ms,
                 state_digest, state_bytes, suspended_at, resumed_from)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            params![
                sandbox.id,
                sandbox.function,
                sandbox.version,
                sandbox.tier.as_str(),
                sandbox.state.as_str(),
                sandbox.error,
                serde_json::to_string(&sandbox.settings).expect("settings serialise"),
                sandbox.idempotency_key,
                sandbox.created_at,
                sandbox.last_active_ms as i64,
                sandbox.running_ms as i64,
                sandbox.running_since_ms.map(|v| v as i64),
                sandbox.suspended_ms as i64,
                sandbox.suspended_since_ms.map(|v| v as i64),
                sandbox.state_digest.as_ref().map(|d| d.hex().to_owned()),
                sandbox.state_bytes as i64,
                sandbox.suspended_at,
                sandbox.resumed_from,
            ],
        )?;
        for connector in &sandbox.settings.connectors {
            reference_connector(
                &tx,
                connector,
                "INSERT INTO sandbox_connectors (connector, sandbox) VALUES (?1, ?2)",
                params![connector, sandbox.id],
            )?;
        }
        tx.commit()?;
        Ok(None)
    }

    fn update_sandbox(&self, sandbox: &Sandbox, durability: Durability) -> Result<(), StorageError> {
        with_durability(&mut self.conn(), durability, |conn| write_sandbox(conn, sandbox))
    }

    fn update_sandbox_with_state(&self, sandbox: &Sandbox, state: &StateRecord<'_>) -> Result<(), StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        insert_state(&tx, state)?;
        write_sandbox(&tx, sandbox)?;
        tx.commit()?;
        Ok(())
    }

    fn sandbox(&self, id: &str) -> Result<Option<Sandbox>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"))?;
        let row = stmt.query_row(params![id], sandbox_row).optional()?;
        row.transpose()
    }

    fn sandboxes(&self, function: Option<&str>, state: Option<SandboxState>) -> Result<Vec<Sandbox>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes
             WHERE (?1 IS NULL OR function = ?1) AND (?2 IS NULL OR state = ?2)
             ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map(params![function, state.map(SandboxState::as_str)], sandbox_row)?;
        rows.map(|row| row?).collect()
    }

    fn register_sandbox_state(&self, state: &StateRecord<'_>) -> Result<(), StorageError> {
        // On disk with the write that points a sandbox at it, which comes next.
        with_durability(&mut self.conn(), Durability::Process, |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            insert_state(&tx, state)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn sandbox_state_manifest(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT manifest FROM sandbox_states WHERE digest = ?1")?;
        let row: Option<Option<Vec<u8>>> = stmt.query_row(params![digest.hex()], |r| r.get(0)).optional()?;
        Ok(row.flatten())
    }

    fn release_sandbox_state(&self, digest: &Digest) -> Result<Released, StorageError> {
        // A release a power loss undoes leaves a state nothing points at: released at start-up.
        with_durability(&mut self.conn(), Durability::Process, |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let in_use = tx
                .prepare_cached("SELECT 1 FROM sandboxes WHERE state_digest = ?1 LIMIT 1")?
                .exists(params![digest.hex()])?;
            if in_use {
                return Ok(Released::InUse);
            }
            let chunks: Vec<String> = tx
                .prepare_cached("SELECT chunk FROM sandbox_state_chunks WHERE state = ?1")?
                .query_map(params![digest.hex()], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let removed = tx.execute("DELETE FROM sandbox_states WHERE digest = ?1", params![digest.hex()])?;
            if removed == 0 {
                return Ok(Released::Unregistered);
            }
            let mut orphans = Vec::new();
            {
                let mut used = tx.prepare_cached("SELECT 1 FROM sandbox_state_chunks WHERE chunk = ?1 LIMIT 1")?;
                for chunk in chunks {
                    if !used.exists(params![chunk])? {
                        orphans.extend(Digest::parse(&chunk));
                    }
                }
            }
            tx.commit()?;
            Ok(Released::Released { orphans })
        })
    }

    fn kept_sandbox_blobs(&self) -> Result<(HashSet<Digest>, HashSet<Digest>), StorageError> {
        let conn = self.conn();
        let column = |sql: &str| -> Result<HashSet<Digest>, StorageError> {
            let mut stmt = conn.prepare(sql)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut digests = HashSet::new();
            for row in rows {
                digests.extend(Digest::parse(&row?));
            }
            Ok(digests)
        };
        let states = column(
            "SELECT digest FROM sandbox_states
             UNION SELECT state_digest FROM sandboxes WHERE state_digest IS NOT NULL",
        )?;
        let chunks = column("SELECT DISTINCT chunk FROM sandbox_state_chunks")?;
        Ok((states, chunks))
    }

    fn unreferenced_sandbox_states(&self) -> Result<Vec<Digest>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT digest FROM sandbox_states
             WHERE NOT EXISTS (SELECT 1 FROM sandboxes WHERE sandboxes.state_digest = sandbox_states.digest)",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut digests = Vec::new();
        for row in rows {
            digests.extend(Digest::parse(&row?));
        }
        Ok(digests)
    }

    fn insert_connector(&self, spec: &ConnectorSpec) -> Result<Option<String>, StorageError> {
        let now = now_rfc3339();
        let inserted = self.conn().execute(
            "INSERT OR IGNORE INTO connectors (name, spec, created_at) VALUES (?1, ?2, ?3)",
            params![spec.name, serde_json::to_string(spec).expect("spec serialises"), now],
        )?;
        Ok((inserted == 1).then_some(now))
    }

    fn connectors(&self) -> Result<Vec<Connector>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT spec, created_at FROM connectors ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (spec, created_at) = row?;
            let spec = serde_json::from_str(&spec).map_err(|e| StorageError::Corrupt(format!("connector: {e}")))?;
            Ok(Connector { spec, created_at })
        })
        .collect()
    }

    fn connector_uses(&self, name: &str) -> Result<Vec<ConnectorUse>, StorageError> {
        connector_uses_in(&self.conn(), name)
    }

    fn delete_connector(&self, name: &str) -> Result<Deleted, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let exists = tx
            .query_row("SELECT 1 FROM connectors WHERE name = ?1", params![name], |_| Ok(()))
            .optional()?
            .is_some();
        if !exists {
            return Ok(Deleted::NotFound);
        }
        let uses = connector_uses_in(&tx, name)?;
        if !uses.is_empty() {
            return Ok(Deleted::InUse(uses));
        }
        // References of sandboxes that ended keep nothing.
        tx.execute("DELETE FROM sandbox_connectors WHERE connector = ?1", params![name])?;
        tx.execute("DELETE FROM connectors WHERE name = ?1", params![name])?;
        tx.commit()?;
        Ok(Deleted::Deleted)
    }

    fn insert_sandbox_token(&self, hash: &[u8], token: &SandboxToken) -> Result<(), StorageError> {
        self.conn().execute(
            "INSERT INTO sandbox_tokens (hash, sandbox, scopes, expires_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                hash,
                token.sandbox,
                serde_json::to_string(&token.scopes).expect("scopes serialise"),
                token.expires_ms.map(|v| v as i64)
            ],
        )?;
        Ok(())
    }

    fn sandbox_tokens(&self) -> Result<Vec<(Vec<u8>, SandboxToken)>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT hash, sandbox, scopes, expires_ms FROM sandbox_tokens")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (hash, sandbox, scopes, expires_ms) = row?;
            let scopes = serde_json::from_str(&scopes)
                .map_err(|e| StorageError::Corrupt(format!("scopes of a token of {sandbox}: {e}")))?;
            Ok((
                hash,
                SandboxToken {
                    sandbox,
                    scopes,
                    expires_ms: expires_ms.map(|v| v as u64),
                },
            ))
        })
        .collect()
    }

    fn delete_sandbox_tokens(&self, sandbox: &str) -> Result<(), StorageError> {
        self.conn()
            .execute("DELETE FROM sandbox_tokens WHERE sandbox = ?1", params![sandbox])?;
        Ok(())
    }
}

const SANDBOX_COLUMNS: &str = "id, function, version, tier, state, error, settings, idempotency_key, created_at,
     last_active_ms, running_ms, running_since_ms, suspended_ms, suspended_since_ms, state_digest, state_bytes,
     suspended_at, resumed_from";

fn sandbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Sandbox, StorageError>> {
    let id: String = r.get(0)?;
    let corrupt = |what: &str| StorageError::Corrupt(format!("{what} of sandbox {id}"));
    let tier: String = r.get(3)?;
    let state: String = r.get(4)?;
    let settings: String = r.get(6)?;
    let digest: Option<String> = r.get(14)?;
    let (Some(tier), Some(state)) = (Tier::parse(&tier), SandboxState::parse(&state)) else {
        return Ok(Err(corrupt("tier or state")));
    };
    let Ok(settings) = serde_json::from_str(&settings) else {
        return Ok(Err(corrupt("settings")));
    };
    let state_digest = match digest {
        None => None,
        Some(hex) => match Digest::parse(&hex) {
            Some(digest) => Some(digest),
            None => return Ok(Err(corrupt("state digest"))),
        },
    };
    let ms = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
    let opt_ms =
        |i: usize| -> rusqlite::Result<Option<u64>> { Ok(r.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64)) };
    Ok(Ok(Sandbox {
        function: r.get(1)?,
        version: r.get(2)?,
        tier,
        state,
        error: r.get(5)?,
        settings,
        idempotency_key: r.get(7)?,
        created_at: r.get(8)?,
        last_active_ms: ms(9)?,
        running_ms: ms(10)?,
        running_since_ms: opt_ms(11)?,
        suspended_ms: ms(12)?,
        suspended_since_ms: opt_ms(13)?,
        state_digest,
        state_bytes: ms(15)?,
        suspended_at: r.get(16)?,
        resumed_from: r.get(17)?,
        id,
    }))
}

type RawRow = (String, u32, String, String, String, String, String);

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

fn decode(
    (name, version, digest, code_digest, kind, config, created_at): RawRow,
) -> Result<VersionRecord, StorageError> {
    Ok(VersionRecord {
        digest: parse_digest(&digest)?,
        code_digest: parse_digest(&code_digest)?,
        kind: ArtifactKind::parse(&kind).ok_or_else(|| StorageError::Corrupt(format!("kind {kind:?}")))?,
        config: serde_json::from_str(&config)
            .map_err(|e| StorageError::Corrupt(format!("config of {name}@{version}: {e}")))?,
        name,
        version,
        created_at,
    })
}

fn parse_digest(hex: &str) -> Result<Digest, StorageError> {
    Digest::parse(hex).ok_or_else(|| StorageError::Corrupt(format!("digest {hex:?}")))
}

fn latest_in(conn: &Connection, name: &str) -> Result<Option<VersionRecord>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, version, digest, code_digest, kind, config, created_at FROM versions
         WHERE name = ?1 ORDER BY version DESC LIMIT 1",
    )?;
    let row = stmt.query_row(params![name], raw_row).optional()?;
    row.map(decode).transpose()
}

/// Writes one reference to `connector` with `insert`, or says the connector does not exist.
fn reference_connector(
    tx: &rusqlite::Transaction<'_>,
    connector: &str,
    insert: &str,
    params: impl rusqlite::Params,
) -> Result<(), StorageError> {
    let exists = tx
        .query_row("SELECT 1 FROM connectors WHERE name = ?1", params![connector], |_| {
            Ok(())
        })
        .optional()?
        .is_some();
    if !exists {
        return Err(StorageError::UnknownConnector(connector.to_owned()));
    }
    tx.execute(insert, params)?;
    Ok(())
}

/// The versions and live sandboxes that reference `name`.
fn connector_uses_in(conn: &Connection, name: &str) -> Result<Vec<ConnectorUse>, StorageError> {
    let mut uses = Vec::new();
    let mut stmt = conn
        .prepare_cached("SELECT name, version FROM version_connectors WHERE connector = ?1 ORDER BY name, version")?;
    for row in stmt.query_map(params![name], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))? {
        let (function, version) = row?;
        uses.push(ConnectorUse::Version { function, version });
    }
    let mut stmt = conn.prepare_cached(
        "SELECT s.id FROM sandbox_connectors c JOIN sandboxes s ON s.id = c.sandbox
         WHERE c.connector = ?1 AND s.state NOT IN ('terminated', 'failed') ORDER BY s.id",
    )?;
    for row in stmt.query_map(params![name], |r| r.get::<_, String>(0))? {
        uses.push(ConnectorUse::Sandbox { sandbox: row? });
    }
    Ok(uses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Sqlite) {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("kiln.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn versions_dedupe_and_are_never_reused() {
        let (_dir, store) = store();
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let cfg = FunctionConfig::default();
        let (v1, created) = store.commit_version("f", &a, &a, ArtifactKind::Module, &cfg).unwrap();
        assert!(created);
        assert_eq!(v1.version, 1);
        let (same, created) = store.commit_version("f", &a, &a, ArtifactKind::Module, &cfg).unwrap();
        assert!(!created);
        assert_eq!(same.version, 1);
        let other_cfg = FunctionConfig {
            timeout_ms: 5,
            ..cfg.clone()
        };
        let (v2, _) = store
            .commit_version("f", &a, &a, ArtifactKind::Module, &other_cfg)
            .unwrap();
        assert_eq!(v2.version, 2);
        store.commit_version("g", &b, &b, ArtifactKind::Module, &cfg).unwrap();
        assert_eq!(store.all_latest().unwrap().len(), 2);

        let orphans = store.delete_function("f").unwrap().unwrap();
        assert_eq!(orphans, vec![a.clone()]);
        assert!(store.delete_function("f").unwrap().is_none());
        assert!(store.latest("f").unwrap().is_none());
        let (v3, _) = store.commit_version("f", &a, &a, ArtifactKind::Module, &cfg).unwrap();
        assert_eq!(v3.version, 3, "a re-created function continues its numbering");
    }

    #[test]
    fn reopening_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let store = Sqlite::open(&path).unwrap();
            let cfg = FunctionConfig::default();
            store
                .commit_version("f", &Digest::of(b"x"), &Digest::of(b"y"), ArtifactKind::Component, &cfg)
                .unwrap();
        }
        let store = Sqlite::open(&path).unwrap();
        let latest = store.latest("f").unwrap().unwrap();
        assert_eq!(latest.kind, ArtifactKind::Component);
        assert_eq!(store.version("f", 1).unwrap().unwrap().digest, latest.digest);
        assert_eq!(latest.code_digest, Digest::of(b"y"));
        assert_eq!(store.referenced_digests().unwrap().len(), 2);
    }
}
