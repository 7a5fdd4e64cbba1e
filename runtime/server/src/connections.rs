//! The connection table: which connections hold the server's slots, when each must be closed, and
//! which one gives up its slot when a new connection needs it.
//!
//! A connection is *idle* while it has no request in progress: from accept until its first request
//! head is complete (a socket that never speaks, a slowloris, an HTTP/2 preface with no HEADERS
//! after it) and between requests (HTTP/1.1 keep-alive, HTTP/2 with no open stream). It is *busy*
//! from a complete request head until its response body has been handed to hyper, per stream on
//! HTTP/2 ([`Requests::begin`], [`Tracked`]).
//!
//! Caps alone do not stop starvation: attackers and real clients share addresses (NAT, proxies),
//! and a table full of silent sockets held every real client in the kernel's accept queue until
//! deadlines freed slots. So a newcomer that finds the table full takes the slot of the idle
//! connection that has waited longest, which is closed. Its client had no request in progress, so
//! nothing is lost: HTTP clients already expect an idle keep-alive connection to close. A busy
//! connection is never evicted; when every slot is busy, the newcomer waits.
//!
//! ```text
//!          admit                  begin (head complete)            response body done
//! accept ────────▶ Idle(ticket) ──────────────────────▶ Busy(n) ─────────────────────▶ Idle(new ticket)
//!                     │  a newcomer needs the slot: lowest ticket first
//!                     ▼
//!                  evicted: out of the table at once, its task told to drop the socket
//! ```
//!
//! Two scopes, each with its cap: the whole table (`max_connections`) and one client address
//! (`max_per_ip`). A newcomer over its address's cap takes the slot of that address's oldest idle
//! connection, or is refused when all of them are busy (waiting would stall every other address
//! behind it); one over the global cap takes the globally oldest idle slot, or waits for one.
//!
//! Deadlines ([`Slot::check`]): an idle connection that has not completed a request head is closed
//! `header_timeout` after accept, whatever protocol it speaks or has yet to choose; one that has
//! served requests is closed `idle_timeout` after its last one ended. Tickets order idleness, so the
//! oldest idle connection is the first entry of a `BTreeMap`: admission costs O(log n), no scan.
//!
//! One `std` mutex guards the table: every operation is a few map updates, never held across an
//! await, and taken twice per request (begin, end).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Frame, SizeHint};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// The table's caps and deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_ip: usize,
    /// From accept to the first complete request head.
    pub header_timeout: Duration,
    /// From the end of a connection's last request to its next request head.
    pub idle_timeout: Duration,
}

/// What happened to connections, for the listener's periodic summary.
#[derive(Debug, Default)]
pub struct Counters {
    pub evicted: AtomicU64,
    pub refused: AtomicU64,
    pub header_deadline: AtomicU64,
    pub idle_deadline: AtomicU64,
}

/// All open connections, shared by the accept loop and every connection's task.
pub struct Connections {
    limits: Limits,
    table: Mutex<Table>,
    /// Woken when a slot is freed or becomes idle, so that an admission waiting for room looks
    /// again, and when the table empties (shutdown waits for that).
    changed: Notify,
    pub counters: Counters,
}

impl Connections {
    pub fn new(limits: Limits) -> Arc<Connections> {
        let limits = Limits {
            max_connections: limits.max_connections.max(1),
            max_per_ip: limits.max_per_ip.clamp(1, limits.max_connections.max(1)),
            ..limits
        };
        Arc::new(Connections {
            limits,
            table: Mutex::new(Table::default()),
            changed: Notify::new(),
            counters: Counters::default(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A slot for a connection from `ip`, evicting an idle connection if that is what it takes,
    /// waiting while every slot is busy; `None` when `ip` is at its cap with none of its
    /// connections idle. The receiver fires if this connection is evicted in turn.
    pub async fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<(Slot, oneshot::Receiver<()>)> {
        loop {
            // Registered before looking, so that a slot freed in between is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Bound first: a guard in the match's scrutinee would live across the await.
            let admitted = self.lock().admit(ip, Instant::now(), &self.limits);
            match admitted {
                Admit::Admitted { id, evicted, victim } => {
                    if victim {
                        self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                    }
                    let slot = Slot {
                        connections: self.clone(),
                        id,
                    };
                    return Some((slot, evicted));
                }
                Admit::Refused => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Admit::Full => changed.await,
            }
        }
    }

    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            changed.await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves maps that are still consistent enough to serve
        // (at worst a slot counted twice); better than taking the whole listener down.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection's place in the table, held by its task; dropping it frees the slot.
pub struct Slot {
    connections: Arc<Connections>,
    id: u64,
}

impl Slot {
    /// What the service of this connection uses to mark its requests.
    pub fn requests(&self) -> Requests {
        Requests {
            connections: self.connections.clone(),
            id: self.id,
        }
    }

    pub fn limits(&self) -> Limits {
        self.connections.limits
    }

    /// Whether a deadline has passed, and if not, when to look again.
    pub fn check(&self) -> Check {
        self.connections
            .lock()
            .check(self.id, Instant::now(), &self.connections.limits)
    }

    /// Counts a connection closed for missing `deadline`.
    pub fn count_deadline(&self, deadline: Deadline) {
        let counter = match deadline {
            Deadline::Header => &self.connections.counters.header_deadline,
            Deadline::Idle => &self.connections.counters.idle_deadline,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.lock().remove(self.id);
        self.connections.changed.notify_waiters();
    }
}

/// Marks requests on one connection as in progress.
#[derive(Clone)]
pub struct Requests {
    connections: Arc<Connections>,
    id: u64,
}

impl Requests {
    /// A request head is complete: the connection is busy until the guard drops. `None` if the
    /// connection was evicted a moment ago (before its task could act on it).
    pub fn begin(&self) -> Option<RequestGuard> {
        self.connections.lock().begin(self.id).then(|| RequestGuard {
            connections: self.connections.clone(),
            id: self.id,
        })
    }
}

/// One request in progress; dropping it (the response body is done, or the request was
/// abandoned) makes the connection idle again when it was the last.
pub struct RequestGuard {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.connections.lock().end(self.id, Instant::now()) {
            self.connections.changed.notify_waiters();
        }
    }
}

/// A response body that keeps its request in progress until its last frame has been taken.
pub struct Tracked<B> {
    body: B,
    guard: Option<RequestGuard>,
}

impl<B> Tracked<B> {
    /// `guard`: `None` for a request served outside the table (see `listener::drive`).
    pub fn new(body: B, guard: Option<RequestGuard>) -> Tracked<B> {
        Tracked { body, guard }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.guard = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What [`Slot::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// A request is in progress: no deadline runs (the request's own limits apply).
    Busy,
    /// Idle, with this deadline still ahead.
    Until(Instant),
    /// Idle past this deadline: close.
    Missed(Deadline),
    /// No longer in the table (evicted).
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// No complete request head within `header_timeout` of accept.
    Header,
    /// No new request within `idle_timeout` of the last one.
    Idle,
}

enum Admit {
    Admitted {
        id: u64,
        evicted: oneshot::Receiver<()>,
        /// Whether an idle connection was evicted to make room.
        victim: bool,
    },
    Refused,
    Full,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    next_ticket: u64,
    open: HashMap<u64, Conn>,
    /// Idle connections, oldest first: ticket → id.
    idle: BTreeMap<u64, u64>,
    addresses: HashMap<IpAddr, Address>,
}

/// One client address: its open connections, and its idle ones oldest first.
#[derive(Default)]
struct Address {
    open: usize,
    idle: BTreeMap<u64, u64>,
}

struct Conn {
    ip: IpAddr,
    state: State,
    evict: oneshot::Sender<()>,
}

enum State {
    Idle {
        ticket: u64,
        since: Instant,
        /// Whether it has completed a request head before (which deadline applies).
        spoke: bool,
    },
    Busy {
        requests: usize,
    },
}

impl Table {
    fn admit(&mut self, ip: IpAddr, now: Instant, limits: &Limits) -> Admit {
        let mut victim = false;
        let at_address_cap = self.addresses.get(&ip).is_some_and(|a| a.open >= limits.max_per_ip);
        if at_address_cap {
            let oldest = self.addresses.get(&ip).and_then(|a| a.idle.values().next().copied());
            match oldest {
                Some(id) => {
                    self.evict(id);
                    victim = true;
                }
                None => return Admit::Refused,
            }
        }
        if self.open.len() >= limits.max_connections {
            match self.idle.values().next().copied() {
                Some(id) => {
                    self.evict(id);
                    victim = true;
                }
                None => return Admit::Full,
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let (evict, evicted) = oneshot::channel();
        let ticket = self.idle_ticket(id, ip);
        let state = State::Idle {
            ticket,
            since: now,
            spoke: false,
        };
        self.open.insert(id, Conn { ip, state, evict });
        self.addresses.entry(ip).or_default().open += 1;
        Admit::Admitted { id, evicted, victim }
    }

    /// Takes a new ticket and files `id` as idle under it.
    fn idle_ticket(&mut self, id: u64, ip: IpAddr) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.idle.insert(ticket, id);
        self.addresses.entry(ip).or_default().idle.insert(ticket, id);
        ticket
    }

    fn unfile_idle(&mut self, ticket: u64, ip: IpAddr) {
        self.idle.remove(&ticket);
        if let Some(address) = self.addresses.get_mut(&ip) {
            address.idle.remove(&ticket);
        }
    }

    fn evict(&mut self, id: u64) {
        if let Some(conn) = self.remove(id) {
            let _ = conn.evict.send(());
        }
    }

    fn remove(&mut self, id: u64) -> Option<Conn> {
        let conn = self.open.remove(&id)?;
        if let State::Idle { ticket, .. } = conn.state {
            self.unfile_idle(ticket, conn.ip);
        }
        if let Some(address) = self.addresses.get_mut(&conn.ip) {
            address.open -= 1;
            if address.open == 0 {
                self.addresses.remove(&conn.ip);
            }
        }
        Some(conn)
    }

    /// A request head is complete; false if the connection is gone.
    fn begin(&mut self, id: u64) -> bool {
        let Some(conn) = self.open.get_mut(&id) else {
            return false;
        };
        let was_idle = match conn.state {
            State::Busy { ref mut requests } => {
                *requests += 1;
                None
            }
            State::Idle { ticket, .. } => {
                conn.state = State::Busy { requests: 1 };
                Some((ticket, conn.ip))
            }
        };
        if let Some((ticket, ip)) = was_idle {
            self.unfile_idle(ticket, ip);
        }
        true
    }

    /// A request is done; true if that made the connection idle.
    fn end(&mut self, id: u64, now: Instant) -> bool {
        let Some(conn) = self.open.get_mut(&id) else {
            return false;
        };
        match conn.state {
            State::Busy { ref mut requests } if *requests > 1 => {
                *requests -= 1;
                false
            }
            State::Busy { .. } => {
                let ip = conn.ip;
                let ticket = self.idle_ticket(id, ip);
                if let Some(conn) = self.open.get_mut(&id) {
                    conn.state = State::Idle {
                        ticket,
                        since: now,
                        spoke: true,
                    };
                }
                true
            }
            State::Idle { .. } => false,
        }
    }

    fn check(&self, id: u64, now: Instant, limits: &Limits) -> Check {
        match self.open.get(&id).map(|c| &c.state) {
            None => Check::Gone,
            Some(State::Busy { .. }) => Check::Busy,
            Some(State::Idle { since, spoke, .. }) => {
                let (deadline, after) = if *spoke {
                    (Deadline::Idle, limits.idle_timeout)
                } else {
                    (Deadline::Header, limits.header_timeout)
                };
                let at = *since + after;
                if now >= at {
                    Check::Missed(deadline)
                } else {
                    Check::Until(at)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn limits(max_connections: usize, max_per_ip: usize) -> Limits {
        Limits {
            max_connections,
            max_per_ip,
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
        }
    }

    /// Admits from `ip`: the new id and whether someone was evicted, or the refusal.
    fn admit(table: &mut Table, ip: IpAddr, limits: &Limits) -> Result<(u64, bool), &'static str> {
        match table.admit(ip, Instant::now(), limits) {
            Admit::Admitted { id, victim, .. } => Ok((id, victim)),
            Admit::Refused => Err("refused"),
            Admit::Full => Err("full"),
        }
    }

    #[test]
    fn a_full_table_gives_the_oldest_idle_slot_and_never_a_busy_one() {
        let limits = limits(3, 3);
        let mut t = Table::default();
        let (a, _) = admit(&mut t, A, &limits).unwrap();
        let (b, _) = admit(&mut t, A, &limits).unwrap();
        let (c, _) = admit(&mut t, B, &limits).unwrap();
        assert!(t.begin(a), "a is serving a request");
        // Full: the oldest idle one (b, not the busy a) makes room.
        assert_eq!(admit(&mut t, B, &limits), Ok((3, true)));
        assert!(!t.open.contains_key(&b) && t.open.contains_key(&a) && t.open.contains_key(&c));
        // A request head arriving on an evicted connection finds it gone.
        assert!(!t.begin(b));
        // Everyone busy: the newcomer waits.
        assert!(t.begin(c) && t.begin(3));
        assert_eq!(admit(&mut t, B, &limits), Err("full"));
        // a finishes: idle again, and now the one to go.
        assert!(t.end(a, Instant::now()));
        assert_eq!(admit(&mut t, A, &limits), Ok((4, true)));
        assert!(!t.open.contains_key(&a));
        assert_eq!(t.open.len(), 3);
    }

    #[test]
    fn idleness_is_ordered_by_when_it_began() {
        let limits = limits(2, 2);
        let mut t = Table::default();
        let (a, _) = admit(&mut t, A, &limits).unwrap();
        let (b, _) = admit(&mut t, A, &limits).unwrap();
        // a serves a request after b arrived: a's idleness is now the newer one.
        assert!(t.begin(a));
        assert!(t.end(a, Instant::now()));
        admit(&mut t, A, &limits).unwrap();
        assert!(t.open.contains_key(&a) && !t.open.contains_key(&b));
    }

    #[test]
    fn an_address_at_its_cap_evicts_its_own_or_is_refused() {
        let limits = limits(10, 2);
        let mut t = Table::default();
        let (b1, _) = admit(&mut t, B, &limits).unwrap();
        let (a1, _) = admit(&mut t, A, &limits).unwrap();
        let (a2, _) = admit(&mut t, A, &limits).unwrap();
        // A's third takes A's oldest idle slot, not B's older one.
        let (a3, evicted) = admit(&mut t, A, &limits).unwrap();
        assert!(evicted);
        assert!(!t.open.contains_key(&a1) && t.open.contains_key(&b1));
        // Both of A's busy: refused, while B still gets in.
        assert!(t.begin(a2) && t.begin(a3));
        assert_eq!(admit(&mut t, A, &limits), Err("refused"));
        assert_eq!(admit(&mut t, B, &limits).map(|(_, v)| v), Ok(false));
        assert_eq!(t.addresses[&A].open, 2);
    }

    #[test]
    fn h2_streams_keep_a_connection_busy_until_the_last_ends() {
        let limits = limits(1, 1);
        let mut t = Table::default();
        let (a, _) = admit(&mut t, A, &limits).unwrap();
        assert!(t.begin(a) && t.begin(a));
        assert!(!t.end(a, Instant::now()), "one stream still open");
        assert_eq!(admit(&mut t, B, &limits), Err("full"));
        assert!(t.end(a, Instant::now()));
        assert_eq!(admit(&mut t, B, &limits).map(|(_, v)| v), Ok(true));
    }

    #[test]
    fn deadlines_header_from_accept_idle_after_a_request() {
        let limits = limits(4, 4);
        let mut t = Table::default();
        let start = Instant::now();
        let Admit::Admitted { id, .. } = t.admit(A, start, &limits) else {
            panic!("not admitted")
        };
        assert_eq!(t.check(id, start, &limits), Check::Until(start + limits.header_timeout));
        assert_eq!(
            t.check(id, start + limits.header_timeout, &limits),
            Check::Missed(Deadline::Header)
        );
        assert!(t.begin(id));
        assert_eq!(t.check(id, start + Duration::from_secs(3600), &limits), Check::Busy);
        let done = start + Duration::from_secs(5);
        assert!(t.end(id, done));
        assert_eq!(t.check(id, done, &limits), Check::Until(done + limits.idle_timeout));
        assert_eq!(
            t.check(id, done + limits.idle_timeout, &limits),
            Check::Missed(Deadline::Idle)
        );
        t.remove(id);
        assert_eq!(t.check(id, done, &limits), Check::Gone);
        assert!(t.idle.is_empty() && t.addresses.is_empty(), "nothing left behind");
    }

    #[tokio::test]
    async fn an_admission_waits_for_a_busy_slot_to_free() {
        let connections = Connections::new(limits(1, 1));
        let (slot, _evicted) = connections.admit(A).await.unwrap();
        let guard = slot.requests().begin().unwrap();
        let waiting = tokio::spawn({
            let connections = connections.clone();
            async move { connections.admit(B).await.map(|(slot, _)| slot.id) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(guard);
        // Idle now, so the waiting admission evicts it.
        assert_eq!(waiting.await.unwrap(), Some(1));
        assert_eq!(slot.check(), Check::Gone);
        assert_eq!(connections.counters.evicted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_evicted_connection_is_told() {
        let connections = Connections::new(limits(1, 1));
        let (_slot, evicted) = connections.admit(A).await.unwrap();
        let (_newer, _) = connections.admit(B).await.unwrap();
        assert!(evicted.await.is_ok());
        assert_eq!(connections.open(), 1);
    }
}
