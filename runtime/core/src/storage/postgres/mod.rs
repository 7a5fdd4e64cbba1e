//! [`Metadata`](super::Metadata) on PostgreSQL, for several Kiln nodes sharing one database.
//!
//! The blocking `postgres` client fits the blocking `Metadata` trait; a small pool of connections
//! ([`Pool`]) lets the API's reads run side by side, where SQLite's single connection serialises
//! them. The async queue's ledger and the invocation-log writer open connections of their own
//! ([`Pool::connect`]), as they do on SQLite.
//!
//! Schema: [`schema::MIGRATIONS`], the same versions as SQLite's, applied at start-up by whichever
//! node takes the advisory lock first; a node refuses to start against a schema newer than it knows.

pub mod changes;
mod metadata;
pub mod schema;
pub mod secrets;

use std::sync::{Arc, Condvar, Mutex};

pub use metadata::Postgres;
use postgres::{Client, NoTls};

use super::StorageError;

/// Connections the API's metadata calls share. A handful is plenty: each call is one short query
/// or transaction, and every node adds its own to the server's `max_connections`.
const POOL_SIZE: usize = 4;

/// A few connections to one database, handed out one call at a time.
pub struct Pool {
    url: String,
    idle: Mutex<Vec<Client>>,
    /// Connections out of `idle` (in use, or being opened).
    out: Mutex<usize>,
    returned: Condvar,
}

impl Pool {
    /// Connects, applies the migrations this build knows, and refuses a newer schema.
    pub fn open(url: &str) -> Result<Arc<Pool>, StorageError> {
        let pool = Pool {
            url: url.to_owned(),
            idle: Mutex::new(Vec::new()),
            out: Mutex::new(0),
            returned: Condvar::new(),
        };
        let mut client = pool.connect()?;
        blocking(|| schema::migrate(&mut client))?;
        pool.idle.lock().unwrap_or_else(|e| e.into_inner()).push(client);
        Ok(Arc::new(pool))
    }

    /// A new connection of its own, outside the pool (for the ledger and the log writer).
    pub fn connect(&self) -> Result<Client, StorageError> {
        Ok(blocking(|| Client::connect(&self.url, NoTls))?)
    }

    /// Runs `call` on a pooled connection. A connection that broke is dropped and replaced at the
    /// next call, so a database restart costs the calls in flight, not the node.
    pub fn with<T: Send>(
        &self,
        call: impl FnOnce(&mut Client) -> Result<T, StorageError> + Send,
    ) -> Result<T, StorageError> {
        // Waiting for a free connection blocks too: inside `blocking` with the call.
        blocking(|| {
            let mut client = self.take()?;
            let result = call(&mut client);
            self.give_back(client);
            result
        })
    }

    fn take(&self) -> Result<Client, StorageError> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(client) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                *out += 1;
                return Ok(client);
            }
            if *out < POOL_SIZE {
                *out += 1;
                drop(out);
                return Client::connect(&self.url, NoTls)
                    .map_err(StorageError::from)
                    .inspect_err(|_| {
                        *self.out.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                        self.returned.notify_one();
                    });
            }
            out = self.returned.wait(out).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn give_back(&self, client: Client) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        *out -= 1;
        if !client.is_closed() {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(client);
        }
        self.returned.notify_one();
    }
}

/// Runs blocking client code from any thread. The `postgres` client drives its own runtime and
/// must not be entered from a tokio worker: there it runs under `block_in_place` (or on a scoped
/// thread on a current-thread runtime, which only tests use).
pub fn blocking<T: Send>(call: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Err(_) => call(),
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::CurrentThread => {
            std::thread::scope(|scope| scope.spawn(call).join().expect("database call panicked"))
        }
        Ok(_) => tokio::task::block_in_place(call),
    }
}

/// Whether a database setting names PostgreSQL rather than a SQLite file.
pub fn is_url(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::{ArtifactKind, FunctionConfig};
    use crate::storage::Metadata;
    use kiln_testkit::postgres::Postgres as Server;

    fn server(test: &str) -> Option<&'static Server> {
        Server::shared()
            .map_err(|reason| kiln_testkit::skip(test, &reason))
            .ok()
    }

    #[test]
    fn versions_dedupe_race_free_and_are_never_reused() {
        let Some(server) = server("versions_dedupe_race_free_and_are_never_reused") else {
            return;
        };
        let store = Arc::new(Postgres::new(Pool::open(&server.create_database().unwrap()).unwrap()));
        let (a, cfg) = (crate::digest::Digest::of(b"a"), FunctionConfig::default());
        // Identical deploys racing each other: one version.
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let (store, a, cfg) = (store.clone(), a.clone(), cfg.clone());
                std::thread::spawn(move || store.commit_version("f", &a, &a, ArtifactKind::Module, &cfg).unwrap())
            })
            .collect();
        let created: Vec<bool> = racers.into_iter().map(|r| r.join().unwrap().1).collect();
        assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
        assert_eq!(store.versions("f").unwrap().len(), 1);

        let other = FunctionConfig {
            timeout_ms: 5,
            ..cfg.clone()
        };
        let (v2, created) = store.commit_version("f", &a, &a, ArtifactKind::Module, &other).unwrap();
        assert!(created);
        assert_eq!((v2.version, v2.config.timeout_ms), (2, 5));
        assert_eq!(store.all_latest().unwrap().len(), 1);
        assert_eq!(store.delete_function("f").unwrap().unwrap(), vec![a.clone()]);
        assert!(store.delete_function("f").unwrap().is_none());
        let (v3, _) = store.commit_version("f", &a, &a, ArtifactKind::Module, &cfg).unwrap();
        assert_eq!(v3.version, 3, "a re-created function continues its numbering");
    }

    #[test]
    fn a_newer_schema_is_refused_and_concurrent_starts_migrate_once() {
        let Some(server) = server("a_newer_schema_is_refused_and_concurrent_starts_migrate_once") else {
            return;
        };
        let url = server.create_database().unwrap();
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || Pool::open(&url).map(|_| ()))
            })
            .collect();
        for start in starts {
            start.join().unwrap().unwrap();
        }
        let name = url.rsplit('/').next().unwrap();
        let known = schema::MIGRATIONS.len();
        assert_eq!(
            server.sql(name, "SELECT version FROM kiln_schema").unwrap(),
            known.to_string()
        );
        // A build that knows one migration less meets this database.
        let mut client = Client::connect(&url, NoTls).unwrap();
        let refused = schema::migrate_to(&mut client, &schema::MIGRATIONS[..known - 1]).unwrap_err();
        assert!(
            matches!(refused, StorageError::NewerSchema { found, known: k } if found == known as i64 && k == known as i64 - 1),
            "{refused}"
        );
        // The lock was released: a start after the refusal goes through.
        Pool::open(&url).unwrap();
    }
}
