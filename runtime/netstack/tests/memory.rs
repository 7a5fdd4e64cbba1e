//! Connection churn leaves the heap where it was. Its own binary: the counting allocator sees the whole
//! process, so no other test may run beside it.

#[allow(dead_code)]
#[path = "all/guest.rs"]
mod guest;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use kiln_netstack::{Config, Decision, Event, Stack};
use smoltcp::socket::tcp::State;

use guest::Guest;

/// Bytes allocated and not yet freed.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only the sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `dealloc`, and `new_size` is the caller's valid new size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SITE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 80);
const UPSTREAM: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9));

struct Lab {
    guest: Guest,
    stack: Stack,
    now: Instant,
}

impl Lab {
    fn step(&mut self) {
        self.now += Duration::from_millis(1);
        self.guest.poll(self.now);
        for packet in self.guest.take_sent() {
            self.stack.guest_packet(self.now, &packet);
        }
        self.stack.poll(self.now);
        while let Some(packet) = self.stack.pop_guest_packet() {
            self.guest.deliver(packet);
        }
        self.guest.poll(self.now);
    }

    fn until(&mut self, mut done: impl FnMut(&mut Lab) -> bool) {
        for _ in 0..1000 {
            if done(self) {
                return;
            }
            self.step();
        }
        panic!("condition not reached in 1000 steps");
    }

    /// One connection's whole life, with the test playing the driver: accept, 1 KiB each way, close.
    fn cycle(&mut self) {
        let handle = self.guest.connect(SITE);
        self.step();
        let Some(Event::Connect(conn)) = self.stack.next_event() else {
            panic!("no Connect")
        };
        self.stack.accept(conn.id).unwrap();
        self.until(|lab| lab.guest.tcp(handle).state() == State::Established);
        self.guest.tcp(handle).send_slice(&[1; 1024]).unwrap();
        // The stack's side is established once the guest's ACK has arrived.
        self.until(|lab| {
            let sent = lab
                .stack
                .poll_send(conn.id, &mut Context::from_waker(Waker::noop()), &[2; 1024]);
            sent == Poll::Ready(Ok(1024))
        });
        self.guest.tcp(handle).close();
        let mut received = 0;
        self.until(|lab| {
            let mut buf = [0; 2048];
            match lab
                .stack
                .poll_recv(conn.id, &mut Context::from_waker(Waker::noop()), &mut buf)
            {
                Poll::Ready(Ok(0)) => return received == 1024,
                Poll::Ready(Ok(n)) => received += n,
                other => assert_eq!(other, Poll::Pending),
            }
            false
        });
        self.stack.close(conn.id).unwrap();
        self.until(|lab| lab.stack.connections() == 0 && lab.guest.tcp(handle).recv_queue() == 1024);
        self.guest.sockets.remove(handle);
        assert_eq!(self.stack.next_event(), Some(Event::Closed(conn.id)));
    }
}

#[test]
fn a_thousand_connections_leave_the_heap_where_it_was() {
    let now = Instant::now();
    let stack = Stack::new(Config::default(), |_, _| Decision::Allow(UPSTREAM), now).unwrap();
    let mut lab = Lab {
        guest: Guest::new(now),
        stack,
        now,
    };
    // Warm up: tables and queues reach their working size.
    for _ in 0..50 {
        lab.cycle();
    }
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..1000 {
        lab.cycle();
    }
    let grown = LIVE.load(Ordering::Relaxed) - before;
    // One leaked connection would be 512 KiB of buffers; allow a little for tables rehashing.
    assert!(
        grown < 64 * 1024,
        "the heap grew by {grown} bytes over 1,000 connections"
    );
    assert_eq!(lab.stack.stats().tcp_allowed, 1050);
}
