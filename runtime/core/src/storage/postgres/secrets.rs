//! The secrets every node of a cluster must hold the same, kept in the database (`secrets`) and
//! mirrored into each node's data directory, where the code that uses them reads them exactly as
//! on a single node: the result-URL signing keys (`keys/`), the identity signing keys
//! (`identity/`), the root AWS secrets derive from (`aws.key`), the admin token (`admin.token`)
//! and the key that seals compiled code and snapshots (`seal.key`). Without them shared, a result
//! URL signed by one node, an identity token's key, an AWS key or the admin token would work on
//! one node only, and no node could check the compiled code another published.
//!
//! A node joins at start-up under an advisory lock, before anything reads those files: it takes
//! the cluster's copy of each (replacing its own), and publishes what the cluster had none of (the
//! first node's, or what it makes). A rotation runs under the same lock on the node that rotates:
//! it takes the cluster's copy first, rotates, publishes the directory, and tells the other nodes
//! (`changes::Change::Secrets`), which take it and reload.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres::{Client, GenericClient};

use super::changes::{notify, Change};
use super::{blocking, Pool};
use crate::storage::StorageError;

/// The lock joins and rotations take (`KILN` and 2; the migrations' is 1).
const SECRETS_LOCK: (i32, i32) = (0x4b49_4c4e, 2);

/// A directory of secrets (its files), relative to the data directory.
pub const RESULT_KEYS: &str = "keys/";
pub const IDENTITY_KEYS: &str = "identity/";
const AWS_ROOT: &str = "aws.key";
const ADMIN_TOKEN: &str = "admin.token";
const SEAL_KEY: &str = "seal.key";
/// Every shared entry: a directory (ending in `/`) or a file.
const SHARED: [&str; 5] = [RESULT_KEYS, IDENTITY_KEYS, AWS_ROOT, ADMIN_TOKEN, SEAL_KEY];

/// Why a node cannot join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "{0} is not this cluster's admin token: every node of a database answers the same one. \
         Use the cluster's (it is in another node's admin.token), or delete this node's file to have it \
         written with the cluster's"
    )]
    AdminTokenDiffers(String),
}

/// This node's view of the cluster's secrets.
#[derive(Clone)]
pub struct Secrets {
    pool: Arc<Pool>,
    root: PathBuf,
    node: String,
}

/// A join in progress: the lock is held until [`Joining::finish`].
pub struct Joining {
    secrets: Secrets,
    client: Client,
    /// The entries the cluster had nothing of: this node publishes its own.
    missing: Vec<&'static str>,
    admin_from_env: Option<String>,
}

impl Secrets {
    pub fn new(pool: Arc<Pool>, root: &Path, node: &str) -> Secrets {
        Secrets {
            pool,
            root: root.to_path_buf(),
            node: node.to_owned(),
        }
    }

    /// Takes the cluster's secrets into the data directory, under the lock, which stays held
    /// while the node opens what reads them; [`Joining::finish`] publishes what the cluster
    /// lacked and lets the next node in. Blocking.
    pub fn join(&self, admin_from_env: Option<&str>) -> Result<Joining, JoinError> {
        let mut client = self.pool.connect()?;
        blocking(|| lock(&mut client))?;
        let mut missing = Vec::new();
        let taken = blocking(|| -> Result<(), JoinError> {
            for entry in SHARED {
                let rows = rows(&mut client, entry)?;
                if rows.is_empty() {
                    missing.push(entry);
                    continue;
                }
                if entry == ADMIN_TOKEN {
                    self.check_admin_token(&rows[0].1, admin_from_env)?;
                }
                self.write_local(entry, &rows)?;
            }
            Ok(())
        });
        if let Err(e) = taken {
            let _ = blocking(|| unlock(&mut client));
            return Err(e);
        }
        Ok(Joining {
            secrets: self.clone(),
            client,
            missing,
            admin_from_env: admin_from_env.map(str::to_owned),
        })
    }

    /// The cluster's admin token must be the one this node was given, if it was given one.
    fn check_admin_token(&self, cluster: &[u8], from_env: Option<&str>) -> Result<(), JoinError> {
        let cluster = String::from_utf8_lossy(cluster);
        if from_env.is_some_and(|token| token != cluster.trim()) {
            return Err(JoinError::AdminTokenDiffers("KILN_ADMIN_TOKEN".into()));
        }
        let file = self.root.join(ADMIN_TOKEN);
        match std::fs::read_to_string(&file) {
            Ok(local) if local.trim() != cluster.trim() => {
                Err(JoinError::AdminTokenDiffers(format!("the token in {}", file.display())))
            }
            _ => Ok(()),
        }
    }

    /// Runs `rotate` on the secrets of `entry` (a directory) with the lock held: first takes the
    /// cluster's copy and calls `reload`, so that `rotate` starts from what every node has; then
    /// publishes the result and tells the other nodes. Blocking.
    pub fn rotate<T, E: From<JoinError>>(
        &self,
        entry: &'static str,
        reload: impl FnOnce() -> Result<(), E>,
        rotate: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let mut client = self.pool.connect().map_err(JoinError::from)?;
        blocking(|| lock(&mut client)).map_err(JoinError::from)?;
        let result = (|| {
            self.pull_with(&mut client, entry)?;
            reload()?;
            let rotated = rotate()?;
            blocking(|| self.publish(&mut client, entry)).map_err(E::from)?;
            Ok(rotated)
        })();
        let _ = blocking(|| unlock(&mut client));
        result
    }

    /// Takes the cluster's copy of `entry` (another node rotated it). Blocking.
    pub fn pull(&self, entry: &'static str) -> Result<(), JoinError> {
        let mut client = self.pool.connect()?;
        self.pull_with(&mut client, entry)
    }

    fn pull_with(&self, client: &mut Client, entry: &'static str) -> Result<(), JoinError> {
        blocking(|| {
            let rows = rows(client, entry)?;
            if rows.is_empty() {
                return Ok(());
            }
            self.write_local(entry, &rows)
        })
    }

    /// Replaces the cluster's copy of `entry` with this node's, and tells the other nodes.
    fn publish(&self, client: &mut Client, entry: &'static str) -> Result<(), JoinError> {
        let local = self.read_local(entry)?;
        let mut tx = client.transaction().map_err(StorageError::from)?;
        tx.execute(
            "DELETE FROM secrets WHERE name = $1 OR ($2 AND starts_with(name, $1))",
            &[&entry, &entry.ends_with('/')],
        )
        .map_err(StorageError::from)?;
        insert(&mut tx, &local)?;
        notify(&mut tx, &self.node, &Change::Secrets)?;
        tx.commit().map_err(StorageError::from)?;
        Ok(())
    }

    /// The files of `entry` in this data directory: (name relative to it, bytes).
    fn read_local(&self, entry: &str) -> Result<Vec<(String, Vec<u8>)>, JoinError> {
        let path = self.root.join(entry);
        let io = |source| JoinError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut files = Vec::new();
        if entry.ends_with('/') {
            let listing = match std::fs::read_dir(&path) {
                Ok(listing) => listing,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
                Err(e) => return Err(io(e)),
            };
            for file in listing {
                let file = file.map_err(io)?;
                let Some(name) = file.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if file.file_type().map_err(io)?.is_file() && !name.ends_with(".tmp") {
                    files.push((format!("{entry}{name}"), std::fs::read(file.path()).map_err(io)?));
                }
            }
        } else {
            match std::fs::read(&path) {
                Ok(bytes) => files.push((entry.to_owned(), bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(files)
    }

    /// Makes this data directory's `entry` exactly `rows`: each file written whole (a temporary
    /// file renamed over it, mode 0600), and a directory's files the cluster does not have removed.
    fn write_local(&self, entry: &str, rows: &[(String, Vec<u8>)]) -> Result<(), JoinError> {
        let dir = if entry.ends_with('/') {
            self.root.join(entry)
        } else {
            self.root.clone()
        };
        let io = |source| JoinError::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io)?;
        let mut changed = false;
        for (name, bytes) in rows {
            let path = self.root.join(name);
            if std::fs::read(&path).is_ok_and(|local| &local == bytes) {
                continue;
            }
            let tmp = path.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            changed = true;
        }
        if entry.ends_with('/') {
            for (name, _) in self.read_local(entry)? {
                if !rows.iter().any(|(kept, _)| *kept == name) {
                    std::fs::remove_file(self.root.join(&name)).map_err(io)?;
                    changed = true;
                }
            }
        }
        if changed {
            crate::storage::local::sync_dir(&dir).map_err(io)?;
            tracing::info!(secrets = entry, "took the cluster's copy");
        }
        Ok(())
    }
}

impl Joining {
    /// Publishes the entries the cluster had nothing of (this node's, made or found while it
    /// opened) and releases the lock. Blocking.
    pub fn finish(mut self) -> Result<(), JoinError> {
        let secrets = self.secrets.clone();
        let result = blocking(|| -> Result<(), JoinError> {
            let mut tx = self.client.transaction().map_err(StorageError::from)?;
            for entry in &self.missing {
                let mut local = secrets.read_local(entry)?;
                if *entry == ADMIN_TOKEN {
                    // The token this node answers: the environment's wins over its file.
                    if let Some(token) = &self.admin_from_env {
                        local = vec![(ADMIN_TOKEN.to_owned(), format!("{token}\n").into_bytes())];
                    }
                }
                insert(&mut tx, &local)?;
                tracing::info!(secrets = entry, "published this node's to the cluster");
            }
            tx.commit().map_err(StorageError::from)?;
            Ok(())
        });
        let unlocked = blocking(|| unlock(&mut self.client));
        result?;
        unlocked?;
        Ok(())
    }
}

fn lock(client: &mut Client) -> Result<(), StorageError> {
    let (k1, k2) = SECRETS_LOCK;
    client.execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])?;
    Ok(())
}

fn unlock(client: &mut Client) -> Result<(), StorageError> {
    let (k1, k2) = SECRETS_LOCK;
    client.execute("SELECT pg_advisory_unlock($1, $2)", &[&k1, &k2])?;
    Ok(())
}

/// The cluster's rows of `entry`.
fn rows(client: &mut impl GenericClient, entry: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
    let rows = client.query(
        "SELECT name, bytes FROM secrets WHERE name = $1 OR ($2 AND starts_with(name, $1)) ORDER BY name",
        &[&entry, &entry.ends_with('/')],
    )?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

fn insert(client: &mut impl GenericClient, files: &[(String, Vec<u8>)]) -> Result<(), StorageError> {
    for (name, bytes) in files {
        client.execute(
            "INSERT INTO secrets (name, bytes) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[name, bytes],
        )?;
    }
    Ok(())
}
