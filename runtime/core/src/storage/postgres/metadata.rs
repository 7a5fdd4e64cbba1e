//! The [`Metadata`] queries in PostgreSQL's dialect, with SQLite's semantics. Where SQLite
//! serialises writers (`BEGIN IMMEDIATE`), PostgreSQL's transactions run side by side, so the
//! read-then-write ones take a lock first: an advisory lock per function for `commit_version`,
//! row locks on the connector for references and deletes.

use std::collections::HashSet;
use std::sync::Arc;

use postgres::types::ToSql;
use postgres::{GenericClient, Row, Transaction};

use super::changes::{notify, Change};
use super::Pool;
use crate::clock::now_rfc3339;
use crate::connectors::{Connector, ConnectorSpec, ConnectorUse, Deleted};
use crate::digest::Digest;
use crate::function::{ArtifactKind, FunctionConfig, Tier, VersionRecord};
use crate::invocations::Record;
use crate::sandboxes::record::{Sandbox, SandboxToken, State as SandboxState};
use crate::storage::{Durability, Metadata, Released, StateRecord, StorageError, StoredResult, TokenRow};

pub struct Postgres {
    pool: Arc<Pool>,
    /// This node's name in the changes it announces (`changes`), so that it ignores its own.
    node: String,
}

impl Postgres {
    pub fn new(pool: Arc<Pool>) -> Postgres {
        Postgres {
            pool,
            node: uuid::Uuid::now_v7().to_string(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

const VERSION_COLUMNS: &str = "name, version, digest, code_digest, kind, config, created_at";

const SANDBOX_COLUMNS: &str = "id, function, version, tier, state, error, settings, idempotency_key, created_at,
     last_active_ms, running_ms, running_since_ms, suspended_ms, suspended_since_ms, state_digest, state_bytes,
     suspended_at, resumed_from";

fn corrupt(what: impl Into<String>) -> StorageError {
    StorageError::Corrupt(what.into())
}

fn parse_digest(hex: &str) -> Result<Digest, StorageError> {
    Digest::parse(hex).ok_or_else(|| corrupt(format!("digest {hex:?}")))
}

fn to_u32(value: i64, what: &str) -> Result<u32, StorageError> {
    u32::try_from(value).map_err(|_| corrupt(format!("{what} {value}")))
}

fn version_row(row: &Row) -> Result<VersionRecord, StorageError> {
    let name: String = row.get(0);
    let version = to_u32(row.get(1), "version")?;
    let kind: String = row.get(4);
    let config: String = row.get(5);
    Ok(VersionRecord {
        digest: parse_digest(row.get(2))?,
        code_digest: parse_digest(row.get(3))?,
        kind: ArtifactKind::parse(&kind).ok_or_else(|| corrupt(format!("kind {kind:?}")))?,
        config: serde_json::from_str(&config).map_err(|e| corrupt(format!("config of {name}@{version}: {e}")))?,
        created_at: row.get(6),
        name,
        version,
    })
}

fn sandbox_row(row: &Row) -> Result<Sandbox, StorageError> {
    let id: String = row.get(0);
    let bad = |what: &str| corrupt(format!("{what} of sandbox {id}"));
    let tier: String = row.get(3);
    let state: String = row.get(4);
    let (Some(tier), Some(state)) = (Tier::parse(&tier), SandboxState::parse(&state)) else {
        return Err(bad("tier or state"));
    };
    let settings: String = row.get(6);
    let settings = serde_json::from_str(&settings).map_err(|_| bad("settings"))?;
    let state_digest = match row.get::<_, Option<String>>(14) {
        None => None,
        Some(hex) => Some(Digest::parse(&hex).ok_or_else(|| bad("state digest"))?),
    };
    let ms = |i: usize| row.get::<_, i64>(i).max(0) as u64;
    let opt_ms = |i: usize| row.get::<_, Option<i64>>(i).map(|v| v.max(0) as u64);
    Ok(Sandbox {
        function: row.get(1),
        version: to_u32(row.get(2), "version")?,
        tier,
        state,
        error: row.get(5),
        settings,
        idempotency_key: row.get(7),
        created_at: row.get(8),
        last_active_ms: ms(9),
        running_ms: ms(10),
        running_since_ms: opt_ms(11),
        suspended_ms: ms(12),
        suspended_since_ms: opt_ms(13),
        state_digest,
        state_bytes: ms(15),
        suspended_at: row.get(16),
        resumed_from: row.get(17),
        id,
    })
}

fn latest_in(client: &mut impl GenericClient, name: &str) -> Result<Option<VersionRecord>, StorageError> {
    let row = client.query_opt(
        &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE name = $1 ORDER BY version DESC LIMIT 1"),
        &[&name],
    )?;
    row.as_ref().map(version_row).transpose()
}

/// Makes `tx` commit without waiting for the WAL flush when `durability` allows: PostgreSQL's
/// counterpart of SQLite's `synchronous=NORMAL` (atomic and consistent; a crash of the database
/// server may lose the last such commits).
fn set_durability(tx: &mut Transaction<'_>, durability: Durability) -> Result<(), StorageError> {
    if durability == Durability::Process {
        tx.batch_execute("SET LOCAL synchronous_commit = off")?;
    }
    Ok(())
}

/// Writes one reference to `connector`, or says it does not exist. `FOR SHARE` keeps a
/// concurrent delete of the connector out until this transaction ends.
fn reference_connector(
    tx: &mut Transaction<'_>,
    connector: &str,
    insert: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<(), StorageError> {
    let exists = tx
        .query_opt("SELECT 1 FROM connectors WHERE name = $1 FOR SHARE", &[&connector])?
        .is_some();
    if !exists {
        return Err(StorageError::UnknownConnector(connector.to_owned()));
    }
    tx.execute(insert, params)?;
    Ok(())
}

fn connector_uses_in(client: &mut impl GenericClient, name: &str) -> Result<Vec<ConnectorUse>, StorageError> {
    let mut uses = Vec::new();
    for row in client.query(
        "SELECT name, version FROM version_connectors WHERE connector = $1 ORDER BY name, version",
        &[&name],
    )? {
        uses.push(ConnectorUse::Version {
            function: row.get(0),
            version: to_u32(row.get(1), "version")?,
        });
    }
    for row in client.query(
        "SELECT s.id FROM sandbox_connectors c JOIN sandboxes s ON s.id = c.sandbox
         WHERE c.connector = $1 AND s.state NOT IN ('terminated', 'failed') ORDER BY s.id",
        &[&name],
    )? {
        uses.push(ConnectorUse::Sandbox { sandbox: row.get(0) });
    }
    Ok(uses)
}

fn write_sandbox(client: &mut impl GenericClient, sandbox: &Sandbox) -> Result<(), StorageError> {
    client.execute(
        "UPDATE sandboxes SET state = $2, error = $3, last_active_ms = $4, running_ms = $5,
         running_since_ms = $6, suspended_ms = $7, suspended_since_ms = $8, state_digest = $9,
         state_bytes = $10, suspended_at = $11, resumed_from = $12
         WHERE id = $1",
        &[
            &sandbox.id,
            &sandbox.state.as_str(),
            &sandbox.error,
            &(sandbox.last_active_ms as i64),
            &(sandbox.running_ms as i64),
            &sandbox.running_since_ms.map(|v| v as i64),
            &(sandbox.suspended_ms as i64),
            &sandbox.suspended_since_ms.map(|v| v as i64),
            &sandbox.state_digest.as_ref().map(|d| d.hex().to_owned()),
            &(sandbox.state_bytes as i64),
            &sandbox.suspended_at,
            &sandbox.resumed_from,
        ],
    )?;
    Ok(())
}

fn insert_state(client: &mut impl GenericClient, state: &StateRecord<'_>) -> Result<(), StorageError> {
    let added = client.execute(
        "INSERT INTO sandbox_states (digest, manifest) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&state.digest.hex(), &state.manifest],
    )?;
    if added > 0 {
        let insert =
            client.prepare("INSERT INTO sandbox_state_chunks (state, chunk) VALUES ($1, $2) ON CONFLICT DO NOTHING")?;
        for chunk in state.chunks {
            client.execute(&insert, &[&state.digest.hex(), &chunk.hex()])?;
        }
    }
    Ok(())
}

fn digests(rows: Vec<Row>) -> HashSet<Digest> {
    rows.iter().filter_map(|row| Digest::parse(row.get(0))).collect()
}

impl Metadata for Postgres {
    fn commit_version(
        &self,
        name: &str,
        digest: &Digest,
        code_digest: &Digest,
        kind: ArtifactKind,
        config: &FunctionConfig,
    ) -> Result<(VersionRecord, bool), StorageError> {
        let config_json = serde_json::to_string(config).expect("config serialises");
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            // Two deploys of one function take turns, so identical ones produce one version.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('function:' || $1::text, 0))",
                &[&name],
            )?;
            if let Some(latest) = latest_in(&mut tx, name)? {
                if latest.digest == *digest && latest.config == *config {
                    return Ok((latest, false));
                }
            }
            let now = now_rfc3339();
            tx.execute(
                "INSERT INTO functions (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&name, &now],
            )?;
            let version: i64 = tx
                .query_one(
                    "INSERT INTO version_counters (name, last_version) VALUES ($1, 1)
                     ON CONFLICT (name) DO UPDATE SET last_version = version_counters.last_version + 1
                     RETURNING last_version",
                    &[&name],
                )?
                .get(0);
            tx.execute(
                "INSERT INTO versions (name, version, digest, code_digest, kind, config, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &name,
                    &version,
                    &digest.hex(),
                    &code_digest.hex(),
                    &kind.as_str(),
                    &config_json,
                    &now,
                ],
            )?;
            for connector in &config.connectors {
                reference_connector(
                    &mut tx,
                    connector,
                    "INSERT INTO version_connectors (connector, name, version) VALUES ($1, $2, $3)",
                    &[connector, &name, &version],
                )?;
            }
            notify(&mut tx, &self.node, &Change::Function(name.to_owned()))?;
            tx.commit()?;
            let record = VersionRecord {
                name: name.to_owned(),
                version: to_u32(version, "version")?,
                digest: digest.clone(),
                code_digest: code_digest.clone(),
                kind,
                config: config.clone(),
                created_at: now,
            };
            Ok((record, true))
        })
    }

    fn latest(&self, name: &str) -> Result<Option<VersionRecord>, StorageError> {
        self.pool.with(|client| latest_in(client, name))
    }

    fn version(&self, name: &str, version: u32) -> Result<Option<VersionRecord>, StorageError> {
        self.pool.with(|client| {
            let row = client.query_opt(
                &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE name = $1 AND version = $2"),
                &[&name, &i64::from(version)],
            )?;
            row.as_ref().map(version_row).transpose()
        })
    }

    fn versions(&self, name: &str) -> Result<Vec<VersionRecord>, StorageError> {
        self.pool.with(|client| {
            client
                .query(
                    &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE name = $1 ORDER BY version"),
                    &[&name],
                )?
                .iter()
                .map(version_row)
                .collect()
        })
    }

    fn all_latest(&self) -> Result<Vec<VersionRecord>, StorageError> {
        self.pool.with(|client| {
            client
                .query(
                    "SELECT DISTINCT ON (name) name, version, digest, code_digest, kind, config, created_at
                     FROM versions ORDER BY name, version DESC",
                    &[],
                )?
                .iter()
                .map(version_row)
                .collect()
        })
    }

    fn delete_function(&self, name: &str) -> Result<Option<Vec<Digest>>, StorageError> {
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('function:' || $1::text, 0))", &[&name])?;
            let used: Vec<String> = tx
                .query(
                    "SELECT digest FROM versions WHERE name = $1 UNION SELECT code_digest FROM versions WHERE name = $1",
                    &[&name],
                )?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if tx.execute("DELETE FROM functions WHERE name = $1", &[&name])? == 0 {
                return Ok(None);
            }
            let mut orphans = Vec::new();
            for digest in used {
                let still_used: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM versions WHERE digest = $1 OR code_digest = $1)",
                        &[&digest],
                    )?
                    .get(0);
                if !still_used {
                    orphans.push(parse_digest(&digest)?);
                }
            }
            notify(&mut tx, &self.node, &Change::Function(name.to_owned()))?;
            tx.commit()?;
            Ok(Some(orphans))
        })
    }

    fn referenced_digests(&self) -> Result<HashSet<String>, StorageError> {
        self.pool.with(|client| {
            Ok(client
                .query(
                    "SELECT digest FROM versions UNION SELECT code_digest FROM versions",
                    &[],
                )?
                .iter()
                .map(|row| row.get(0))
                .collect())
        })
    }

    fn put_token_hash(&self, id: &str, hash: &[u8], scope: &str) -> Result<(), StorageError> {
        self.pool.with(|client| {
            client.execute(
                "INSERT INTO tokens (id, hash, scope, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, scope = excluded.scope",
                &[&id, &hash, &scope, &now_rfc3339()],
            )?;
            Ok(())
        })
    }

    fn insert_token(&self, id: &str, hash: &[u8], scope: &str) -> Result<String, StorageError> {
        let now = now_rfc3339();
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            tx.execute(
                "INSERT INTO tokens (id, hash, scope, created_at) VALUES ($1, $2, $3, $4)",
                &[&id, &hash, &scope, &now],
            )?;
            notify(&mut tx, &self.node, &Change::Tokens)?;
            tx.commit()?;
            Ok(())
        })?;
        Ok(now)
    }

    fn delete_token(&self, id: &str) -> Result<bool, StorageError> {
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            let deleted = tx.execute("DELETE FROM tokens WHERE id = $1 AND id != 'admin'", &[&id])? > 0;
            // Other nodes drop a revoked token from what they cached, as they learn of new ones.
            if deleted {
                notify(&mut tx, &self.node, &Change::Tokens)?;
            }
            tx.commit()?;
            Ok(deleted)
        })
    }

    fn scoped_tokens(&self) -> Result<Vec<TokenRow>, StorageError> {
        self.pool.with(|client| {
            Ok(client
                .query(
                    "SELECT id, hash, scope, created_at FROM tokens WHERE id != 'admin' ORDER BY created_at, id",
                    &[],
                )?
                .iter()
                .map(|row| TokenRow {
                    id: row.get(0),
                    hash: row.get(1),
                    scope: row.get(2),
                    created_at: row.get(3),
                })
                .collect())
        })
    }

    fn invocation(&self, id: &str) -> Result<Option<Record>, StorageError> {
        self.pool.with(|client| {
            let Some(row) = client.query_opt(
                "SELECT id, function, version, state, attempts, created_at, finished_at, duration_us, error, stderr
                 FROM invocations WHERE id = $1",
                &[&id],
            )?
            else {
                return Ok(None);
            };
            let error: Option<String> = row.get(8);
            Ok(Some(Record {
                id: row.get(0),
                function: row.get(1),
                version: to_u32(row.get(2), "version")?,
                state: row.get(3),
                attempts: to_u32(row.get(4), "attempts")?,
                created_at: row.get(5),
                finished_at: row.get(6),
                duration_us: row.get(7),
                error: error.and_then(|e| serde_json::from_str(&e).ok()),
                stderr: row.get(9),
            }))
        })
    }

    fn invocation_result(&self, id: &str) -> Result<Option<StoredResult>, StorageError> {
        self.pool.with(|client| {
            let row = client.query_opt(
                "SELECT result, result_digest FROM invocations WHERE id = $1 AND state = 'succeeded'",
                &[&id],
            )?;
            Ok(match row {
                None => None,
                Some(row) => match row.get::<_, Option<String>>(1) {
                    Some(digest) => Some(StoredResult::Blob(parse_digest(&digest)?)),
                    None => Some(StoredResult::Inline(
                        row.get::<_, Option<Vec<u8>>>(0).unwrap_or_default(),
                    )),
                },
            })
        })
    }

    fn invocation_log(&self, id: &str) -> Result<Option<String>, StorageError> {
        self.pool.with(|client| {
            if let Some(row) = client.query_opt("SELECT stderr FROM invocation_logs WHERE id = $1", &[&id])? {
                return Ok(Some(row.get(0)));
            }
            Ok(client
                .query_opt("SELECT stderr FROM invocations WHERE id = $1", &[&id])?
                .map(|row| row.get::<_, Option<String>>(0).unwrap_or_default()))
        })
    }

    fn invocations(&self, query: &crate::invocations::Query) -> Result<Vec<crate::invocations::Summary>, StorageError> {
        use crate::invocations::{id_ms, Mode, Summary};
        // As on SQLite: each table newest first down its key (UUIDv7 ids sort by time; compared
        // byte-wise, whatever the database's collation), cut at `limit`, then merged.
        let limit = query.limit as i64;
        self.pool.with(|client| {
            let rows = client.query(
                r#"SELECT * FROM (
                     (SELECT id, function, version, 'async' AS mode, state, duration_us, attempts,
                             NULL::TEXT AS outcome
                      FROM invocations
                      WHERE ($1::TEXT[] IS NULL OR function = ANY($1)) AND ($2::TEXT IS NULL OR state = $2)
                        AND ($3::TEXT IS NULL OR id COLLATE "C" < $3)
                      ORDER BY id COLLATE "C" DESC LIMIT $4)
                     UNION ALL
                     (SELECT id, function, version, 'sync',
                             CASE outcome WHEN 'success' THEN 'succeeded' ELSE 'failed' END,
                             duration_us, NULL::BIGINT, outcome
                      FROM invocation_logs
                      WHERE ($1::TEXT[] IS NULL OR function = ANY($1))
                        AND ($2::TEXT IS NULL OR $2 = CASE outcome WHEN 'success' THEN 'succeeded' ELSE 'failed' END)
                        AND ($3::TEXT IS NULL OR id COLLATE "C" < $3)
                      ORDER BY id COLLATE "C" DESC LIMIT $4)
                   ) AS merged
                   ORDER BY id COLLATE "C" DESC LIMIT $4"#,
                &[&query.functions, &query.state, &query.before, &limit],
            )?;
            Ok(rows
                .iter()
                .map(|row| {
                    let id: String = row.get(0);
                    let mode: String = row.get(3);
                    let attempts: Option<i64> = row.get(6);
                    Summary {
                        created_ms: id_ms(&id),
                        function: row.get(1),
                        version: row.get::<_, i64>(2) as u32,
                        mode: if mode == "sync" { Mode::Sync } else { Mode::Async },
                        state: row.get(4),
                        duration_us: row.get(5),
                        attempts: attempts.map(|a| a as u32),
                        outcome: row.get(7),
                        log_kept: true,
                        id,
                    }
                })
                .collect())
        })
    }

    fn heartbeat(&self, node: &crate::cluster::Node) -> Result<(), StorageError> {
        let info = serde_json::to_string(node).expect("a node serialises");
        let seen = node.last_seen_ms as i64;
        let forgotten = seen - crate::cluster::FORGOTTEN.as_millis() as i64;
        self.pool.with(|client| {
            client.execute(
                "INSERT INTO nodes (id, info, last_seen_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET info = excluded.info, last_seen_ms = excluded.last_seen_ms",
                &[&node.id, &info, &seen],
            )?;
            client.execute("DELETE FROM nodes WHERE last_seen_ms < $1", &[&forgotten])?;
            Ok(())
        })
    }

    fn nodes(&self) -> Result<Vec<crate::cluster::Node>, StorageError> {
        let infos: Vec<String> = self.pool.with(|client| {
            Ok(client
                .query("SELECT info FROM nodes ORDER BY id", &[])?
                .iter()
                .map(|row| row.get(0))
                .collect())
        })?;
        infos
            .iter()
            .map(|info| serde_json::from_str(info).map_err(|e| StorageError::Corrupt(format!("a node's row: {e}"))))
            .collect()
    }

    fn invocation_function(&self, id: &str) -> Result<Option<String>, StorageError> {
        self.pool.with(|client| {
            if let Some(row) = client.query_opt("SELECT function FROM invocation_logs WHERE id = $1", &[&id])? {
                return Ok(Some(row.get(0)));
            }
            Ok(client
                .query_opt("SELECT function FROM invocations WHERE id = $1", &[&id])?
                .map(|row| row.get(0)))
        })
    }

    fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<Option<String>, StorageError> {
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            let inserted = tx.execute(
                "INSERT INTO sandboxes (id, function, version, tier, state, error, settings, idempotency_key,
                     created_at, last_active_ms, running_ms, running_since_ms, suspended_ms, suspended_since_ms,
                     state_digest, state_bytes, suspended_at, resumed_from)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
                 ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
                &[
                    &sandbox.id,
                    &sandbox.function,
                    &i64::from(sandbox.version),
                    &sandbox.tier.as_str(),
                    &sandbox.state.as_str(),
                    &sandbox.error,
                    &serde_json::to_string(&sandbox.settings).expect("settings serialise"),
                    &sandbox.idempotency_key,
                    &sandbox.created_at,
                    &(sandbox.last_active_ms as i64),
                    &(sandbox.running_ms as i64),
                    &sandbox.running_since_ms.map(|v| v as i64),
                    &(sandbox.suspended_ms as i64),
                    &sandbox.suspended_since_ms.map(|v| v as i64),
                    &sandbox.state_digest.as_ref().map(|d| d.hex().to_owned()),
                    &(sandbox.state_bytes as i64),
                    &sandbox.suspended_at,
                    &sandbox.resumed_from,
                ],
            )?;
            if inserted == 0 {
                // The key was used (the only conflict this insert ignores): that sandbox's id.
                let existing = tx.query_opt(
                    "SELECT id FROM sandboxes WHERE idempotency_key = $1",
                    &[&sandbox.idempotency_key],
                )?;
                return Ok(existing.map(|row| row.get(0)));
            }
            for connector in &sandbox.settings.connectors {
                reference_connector(
                    &mut tx,
                    connector,
                    "INSERT INTO sandbox_connectors (connector, sandbox) VALUES ($1, $2)",
                    &[connector, &sandbox.id],
                )?;
            }
            tx.commit()?;
            Ok(None)
        })
    }

    fn update_sandbox(&self, sandbox: &Sandbox, durability: Durability) -> Result<(), StorageError> {
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            set_durability(&mut tx, durability)?;
            write_sandbox(&mut tx, sandbox)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn update_sandbox_with_state(&self, sandbox: &Sandbox, state: &StateRecord<'_>) -> Result<(), StorageError> {
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            insert_state(&mut tx, state)?;
            write_sandbox(&mut tx, sandbox)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn sandbox(&self, id: &str) -> Result<Option<Sandbox>, StorageError> {
        self.pool.with(|client| {
            let row = client.query_opt(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1"),
                &[&id],
            )?;
            row.as_ref().map(sandbox_row).transpose()
        })
    }

    fn sandboxes(&self, function: Option<&str>, state: Option<SandboxState>) -> Result<Vec<Sandbox>, StorageError> {
        let state = state.map(SandboxState::as_str);
        self.pool.with(|client| {
            client
                .query(
                    &format!(
                        "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                         WHERE ($1::text IS NULL OR function = $1) AND ($2::text IS NULL OR state = $2)
                         ORDER BY created_at, id"
                    ),
                    &[&function, &state],
                )?
                .iter()
                .map(sandbox_row)
                .collect()
        })
    }

    fn register_sandbox_state(&self, state: &StateRecord<'_>) -> Result<(), StorageError> {
        // Durable with the write that points a sandbox at it, which comes next.
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            set_durability(&mut tx, Durability::Process)?;
            insert_state(&mut tx, state)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn sandbox_state_manifest(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StorageError> {
        self.pool.with(|client| {
            Ok(client
                .query_opt(
                    "SELECT manifest FROM sandbox_states WHERE digest = $1",
                    &[&digest.hex()],
                )?
                .and_then(|row| row.get(0)))
        })
    }

    fn release_sandbox_state(&self, digest: &Digest) -> Result<Released, StorageError> {
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            set_durability(&mut tx, Durability::Process)?;
            let hex = digest.hex();
            // Locks the state's row, so a sandbox cannot start pointing at it meanwhile.
            let registered = tx
                .query_opt("SELECT 1 FROM sandbox_states WHERE digest = $1 FOR UPDATE", &[&hex])?
                .is_some();
            let in_use = tx
                .query_opt("SELECT 1 FROM sandboxes WHERE state_digest = $1 LIMIT 1", &[&hex])?
                .is_some();
            if in_use {
                return Ok(Released::InUse);
            }
            if !registered {
                return Ok(Released::Unregistered);
            }
            let chunks: Vec<String> = tx
                .query("SELECT chunk FROM sandbox_state_chunks WHERE state = $1", &[&hex])?
                .iter()
                .map(|row| row.get(0))
                .collect();
            tx.execute("DELETE FROM sandbox_states WHERE digest = $1", &[&hex])?;
            let mut orphans = Vec::new();
            for chunk in chunks {
                let used = tx
                    .query_opt("SELECT 1 FROM sandbox_state_chunks WHERE chunk = $1 LIMIT 1", &[&chunk])?
                    .is_some();
                if !used {
                    orphans.extend(Digest::parse(&chunk));
                }
            }
            tx.commit()?;
            Ok(Released::Released { orphans })
        })
    }

    fn unreferenced_sandbox_states(&self) -> Result<Vec<Digest>, StorageError> {
        self.pool.with(|client| {
            Ok(client
                .query(
                    "SELECT digest FROM sandbox_states
                     WHERE NOT EXISTS (SELECT 1 FROM sandboxes WHERE sandboxes.state_digest = sandbox_states.digest)",
                    &[],
                )?
                .iter()
                .filter_map(|row| Digest::parse(row.get(0)))
                .collect())
        })
    }

    fn kept_sandbox_blobs(&self) -> Result<(HashSet<Digest>, HashSet<Digest>), StorageError> {
        self.pool.with(|client| {
            let states = digests(client.query(
                "SELECT digest FROM sandbox_states
                 UNION SELECT state_digest FROM sandboxes WHERE state_digest IS NOT NULL",
                &[],
            )?);
            let chunks = digests(client.query("SELECT DISTINCT chunk FROM sandbox_state_chunks", &[])?);
            Ok((states, chunks))
        })
    }

    fn insert_sandbox_token(&self, hash: &[u8], token: &SandboxToken) -> Result<(), StorageError> {
        self.pool.with(|client| {
            client.execute(
                "INSERT INTO sandbox_tokens (hash, sandbox, scopes, expires_ms) VALUES ($1, $2, $3, $4)",
                &[
                    &hash,
                    &token.sandbox,
                    &serde_json::to_string(&token.scopes).expect("scopes serialise"),
                    &token.expires_ms.map(|v| v as i64),
                ],
            )?;
            Ok(())
        })
    }

    fn sandbox_tokens(&self) -> Result<Vec<(Vec<u8>, SandboxToken)>, StorageError> {
        self.pool.with(|client| {
            client
                .query("SELECT hash, sandbox, scopes, expires_ms FROM sandbox_tokens", &[])?
                .iter()
                .map(|row| {
                    let sandbox: String = row.get(1);
                    let scopes: String = row.get(2);
                    let scopes = serde_json::from_str(&scopes)
                        .map_err(|e| corrupt(format!("scopes of a token of {sandbox}: {e}")))?;
                    Ok((
                        row.get(0),
                        SandboxToken {
                            sandbox,
                            scopes,
                            expires_ms: row.get::<_, Option<i64>>(3).map(|v| v as u64),
                        },
                    ))
                })
                .collect()
        })
    }

    fn delete_sandbox_tokens(&self, sandbox: &str) -> Result<(), StorageError> {
        self.pool.with(|client| {
            client.execute("DELETE FROM sandbox_tokens WHERE sandbox = $1", &[&sandbox])?;
            Ok(())
        })
    }

    fn insert_connector(&self, spec: &ConnectorSpec) -> Result<Option<String>, StorageError> {
        let now = now_rfc3339();
        let json = serde_json::to_string(spec).expect("spec serialises");
        let inserted = self.pool.with(|client| {
            Ok(client.execute(
                "INSERT INTO connectors (name, spec, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&spec.name, &json, &now],
            )?)
        })?;
        Ok((inserted == 1).then_some(now))
    }

    fn connectors(&self) -> Result<Vec<Connector>, StorageError> {
        self.pool.with(|client| {
            client
                .query("SELECT spec, created_at FROM connectors ORDER BY name", &[])?
                .iter()
                .map(|row| {
                    let spec: String = row.get(0);
                    let spec = serde_json::from_str(&spec).map_err(|e| corrupt(format!("connector: {e}")))?;
                    Ok(Connector {
                        spec,
                        created_at: row.get(1),
                    })
                })
                .collect()
        })
    }

    fn connector_uses(&self, name: &str) -> Result<Vec<ConnectorUse>, StorageError> {
        self.pool.with(|client| connector_uses_in(client, name))
    }

    fn delete_connector(&self, name: &str) -> Result<Deleted, StorageError> {
        self.pool.with(|client| {
            let mut tx = client.transaction()?;
            // The row lock waits for references being written (`FOR SHARE`) and keeps new ones out.
            let exists = tx
                .query_opt("SELECT 1 FROM connectors WHERE name = $1 FOR UPDATE", &[&name])?
                .is_some();
            if !exists {
                return Ok(Deleted::NotFound);
            }
            let uses = connector_uses_in(&mut tx, name)?;
            if !uses.is_empty() {
                return Ok(Deleted::InUse(uses));
            }
            tx.execute("DELETE FROM sandbox_connectors WHERE connector = $1", &[&name])?;
            tx.execute("DELETE FROM connectors WHERE name = $1", &[&name])?;
            tx.commit()?;
            Ok(Deleted::Deleted)
        })
    }
}
