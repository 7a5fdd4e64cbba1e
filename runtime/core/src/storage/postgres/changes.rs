//! What one node tells the others it changed, so they drop what they cached: PostgreSQL's
//! `NOTIFY`, sent in the transaction of the change (delivered only if it commits), received by
//! one `LISTEN` connection per node.
//!
//! Staleness: a change reaches the other nodes' caches within the notification's delivery (a few
//! milliseconds on a healthy connection). While a node's listening connection is down it cannot
//! know what it missed: it drops everything once it is back (and tries again every second).

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use super::{blocking, Pool};
use crate::storage::StorageError;

pub const CHANNEL: &str = "kiln_changes";

/// A change another node made.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// A function was deployed or deleted.
    Function(String),
    /// A token was created or revoked.
    Tokens,
    /// A signing key was rotated (`secrets`).
    Secrets,
    /// Anything may have changed (the listening connection was lost and is back).
    Everything,
}

/// The payload of a change made by node `node`.
pub fn payload(node: &str, change: &Change) -> String {
    match change {
        Change::Function(name) => format!("{node} function {name}"),
        Change::Tokens => format!("{node} tokens"),
        Change::Secrets => format!("{node} secrets"),
        Change::Everything => format!("{node} everything"),
    }
}

/// Tells the other nodes about `change` when the current transaction commits.
pub fn notify(client: &mut impl postgres::GenericClient, node: &str, change: &Change) -> Result<(), StorageError> {
    client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload(node, change)])?;
    Ok(())
}

fn parse(payload: &str, me: &str) -> Option<Change> {
    let (node, rest) = payload.split_once(' ')?;
    if node == me {
        return None;
    }
    match rest.split_once(' ') {
        Some(("function", name)) => Some(Change::Function(name.to_owned())),
        _ if rest == "tokens" => Some(Change::Tokens),
        _ if rest == "secrets" => Some(Change::Secrets),
        _ => Some(Change::Everything),
    }
}

/// Starts the thread that listens for other nodes' changes (not `me`'s own) and hands each to
/// `apply`. It lives as long as the process.
pub fn listen(pool: std::sync::Arc<Pool>, me: String, apply: impl Fn(Change) + Send + 'static) {
    std::thread::Builder::new()
        .name("kiln-changes".into())
        .spawn(move || {
            let mut first = true;
            loop {
                match subscribe(&pool) {
                    Ok(mut client) => {
                        if !first {
                            apply(Change::Everything);
                        }
                        if let Err(e) = receive(&mut client, &me, &apply) {
                            tracing::warn!(error = %e, "listening for other nodes' changes failed; reconnecting");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot listen for other nodes' changes; retrying"),
                }
                first = false;
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .expect("spawning the change listener");
}

fn subscribe(pool: &Pool) -> Result<Client, StorageError> {
    let mut client = pool.connect()?;
    blocking(|| client.batch_execute(&format!("LISTEN {CHANNEL}")))?;
    Ok(client)
}

fn receive(client: &mut Client, me: &str, apply: &impl Fn(Change)) -> Result<(), postgres::Error> {
    loop {
        // `blocking_iter` ends only with an error (the connection is gone).
        let mut notifications = client.notifications();
        let mut iter = notifications.blocking_iter();
        match iter.next()? {
            Some(notification) => {
                if let Some(change) = parse(notification.payload(), me) {
                    apply(change);
                }
            }
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nodes_own_changes_are_ignored_and_others_parsed() {
        let function = payload("a", &Change::Function("f-1".into()));
        assert_eq!(parse(&function, "a"), None);
        assert_eq!(parse(&function, "b"), Some(Change::Function("f-1".into())));
        assert_eq!(parse(&payload("a", &Change::Tokens), "b"), Some(Change::Tokens));
        assert_eq!(parse("a something-new", "b"), Some(Change::Everything));
    }
}
