//! Per-invocation limits that live inside a store: the memory limiter and the capped output
//! streams. Each records *which* limit was hit, so the failure reaches the user as "memory limit of
//! 128 MiB exceeded", not as an anonymous trap.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use super::engine::TABLE_ELEMENTS;

/// Host objects (handles, pollables, streams) one instance may hold at once. Each costs host memory
/// and host time, and a guest can ask for many in one call (a `poll_oneoff` with a million timers).
pub const MAX_HOST_OBJECTS: usize = 10_000;
/// Bytes one `random_get` may ask for: the host fills them without yielding.
pub const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// Caps a store's linear memory (all its memories together), its tables' sizes, and how many
/// memories, tables and core instances it may create (its share of the pool, see `engine`).
///
/// The count of bytes in use is kept with checked arithmetic: wasmtime asks before it checks a
/// memory's own maximum, so `desired` may be anything up to `usize::MAX` (a 64-bit memory asked to
/// grow by 2^48 pages), and a growth that fails after it was allowed is given back
/// (`memory_grow_failed`). A wrapped or stale count would let the next growth through.
pub struct MemoryLimiter {
    limit: usize,
    used: usize,
    /// The growth allowed last, until wasmtime reports whether it happened.
    pending: usize,
    exceeded: bool,
    share: PoolShare,
}

/// How much of the pool one store may take: the memories, tables and core instances its
/// permits stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShare {
    pub memories: usize,
    pub tables: usize,
    pub core_instances: usize,
}

impl PoolShare {
    /// What `weight` pool permits stand for (the ratios the pool is sized with, `engine`).
    pub fn of_weight(weight: u32) -> PoolShare {
        let weight = weight as usize;
        PoolShare {
            memories: weight,
            tables: weight * super::engine::TABLES_PER_PERMIT as usize,
            core_instances: weight * super::engine::CORE_INSTANCES_PER_PERMIT as usize,
        }
    }
}

impl MemoryLimiter {
    pub fn new(limit: usize, share: PoolShare) -> MemoryLimiter {
        MemoryLimiter {
            limit,
            used: 0,
            pending: 0,
            exceeded: false,
            share,
        }
    }

    /// True once a growth past the limit was refused (the guest then trapped).
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }

    pub fn limit_mib(&self) -> usize {
        self.limit >> 20
    }

    /// Bytes of linear memory in use, all memories together.
    pub fn used(&self) -> usize {
        self.used
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.pending = 0;
        // Past the memory's own maximum wasmtime refuses the growth itself (memory.grow gives -1):
        // nothing to count.
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let growth = desired.saturating_sub(current);
        let used = self.used.checked_add(growth).filter(|&used| used <= self.limit);
        let Some(used) = used else {
            self.exceeded = true;
            // Trapping (rather than failing `memory.grow` with -1) ends the invocation with a
            // clear reason instead of letting the guest limp on or abort with its own message.
            wasmtime::bail!("memory limit of {} MiB exceeded", self.limit_mib());
        };
        self.used = used;
        self.pending = growth;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // The growth allowed just before did not happen: give its bytes back.
        self.used -= std::mem::take(&mut self.pending);
        Ok(())
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS)
    }

    fn memories(&self) -> usize {
        self.share.memories
    }

    fn tables(&self) -> usize {
        self.share.tables
    }

    fn instances(&self) -> usize {
        self.share.core_instances
    }
}

/// Bytes a guest may hand over per write call.
const WRITE_CHUNK: usize = 64 * 1024;

/// An in-memory stdout/stderr with a hard cap. Writing past the cap traps the guest with a message
/// naming the stream and the cap; the buffer never grows beyond it.
#[derive(Clone)]
pub struct CappedOutput {
    inner: Arc<Shared>,
}

struct Shared {
    stream: &'static str,
    cap: usize,
    buf: Mutex<BytesMut>,
    overflowed: AtomicBool,
}

impl CappedOutput {
    pub fn new(stream: &'static str, cap: usize) -> CappedOutput {
        CappedOutput {
            inner: Arc::new(Shared {
                stream,
                cap,
                buf: Mutex::new(BytesMut::new()),
                overflowed: AtomicBool::new(false),
            }),
        }
    }

    pub fn overflowed(&self) -> bool {
        self.inner.overflowed.load(Ordering::Relaxed)
    }

    /// The bytes written so far. Takes them out when this is the last handle (the usual case once
    /// the store is gone), else copies.
    pub fn take(self) -> Bytes {
        match Arc::try_unwrap(self.inner) {
            Ok(shared) => shared.buf.into_inner().unwrap_or_else(|e| e.into_inner()).freeze(),
            Err(shared) => Bytes::copy_from_slice(&shared.buf.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }

    /// The last `max` bytes written, as text for an error body.
    pub fn tail(&self, max: usize) -> String {
        let buf = self.inner.buf.lock().unwrap_or_else(|e| e.into_inner());
        let start = buf.len().saturating_sub(max);
        String::from_utf8_lossy(&buf[start..]).into_owned()
    }

    pub fn limit_message(&self) -> String {
        format!("{} exceeded its limit of {} bytes", self.inner.stream, self.inner.cap)
    }

    fn overflow(&self) -> StreamError {
        self.inner.overflowed.store(true, Ordering::Relaxed);
        StreamError::Trap(wasmtime::format_err!("{}", self.limit_message()))
    }

    fn append(&self, bytes: &[u8]) -> Result<(), StreamError> {
        let mut buf = self.inner.buf.lock().unwrap_or_else(|e| e.into_inner());
        if bytes.len() > self.inner.cap - buf.len() {
            drop(buf);
            return Err(self.overflow());
        }
        buf.extend_from_slice(bytes);
        Ok(())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes)
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always offer room, and enforce the cap in `write`: a full buffer must not fail the
        // flush handshake that follows a write landing exactly on the cap.
        Ok(WRITE_CHUNK)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(
            self.append(buf)
                .map(|()| buf.len())
                .map_err(|_| std::io::Error::other(self.limit_message())),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_cap_is_hard() {
        let mut out = CappedOutput::new("stdout", 8);
        out.write(Bytes::from_static(b"12345")).unwrap();
        assert!(out.write(Bytes::from_static(b"6789")).is_err());
        assert!(out.overflowed());
        assert_eq!(out.tail(3), "345");
        assert_eq!(out.clone().take(), Bytes::from_static(b"12345"));
        out.write(Bytes::from_static(b"678")).unwrap();
        assert!(out.check_write().is_ok(), "a full buffer still completes its flush");
    }

    fn limiter() -> MemoryLimiter {
        MemoryLimiter::new(1 << 20, PoolShare::of_weight(1))
    }

    #[test]
    fn memory_limit_counts_growth() {
        let mut limiter = limiter();
        assert!(limiter.memory_growing(0, 512 << 10, None).unwrap());
        assert!(limiter.memory_growing(512 << 10, 1 << 20, None).unwrap());
        assert!(limiter.memory_growing(1 << 20, 2 << 20, None).is_err());
        assert!(limiter.exceeded());
    }

    /// The escape of issue 16: a growth request near `usize::MAX` (a 64-bit memory) wrapped the
    /// count, and every memory could then grow to its pool slot's maximum.
    #[test]
    fn a_huge_request_neither_wraps_nor_corrupts_the_count() {
        let mut limiter = limiter();
        assert!(limiter.memory_growing(0, 64 << 10, None).unwrap());
        assert!(limiter.memory_growing(64 << 10, usize::MAX - 4096, None).is_err());
        assert_eq!(limiter.used(), 64 << 10, "the refused growth counted nothing");
        assert!(limiter.memory_growing(0, usize::MAX, None).is_err());
        // A second memory still only gets what is left of the limit.
        assert!(limiter.memory_growing(0, (1 << 20) - (64 << 10), None).unwrap());
        assert!(limiter.memory_growing(0, 64 << 10, None).is_err());
    }

    #[test]
    fn growth_past_a_memorys_maximum_or_failed_later_is_not_counted() {
        let mut limiter = limiter();
        assert!(!limiter.memory_growing(0, 512 << 10, Some(64 << 10)).unwrap());
        assert_eq!(limiter.used(), 0);
        assert!(limiter.memory_growing(0, 512 << 10, None).unwrap());
        limiter
            .memory_grow_failed(wasmtime::Error::msg("no room in the slot"))
            .unwrap();
        assert_eq!(limiter.used(), 0, "a growth that failed is given back");
        assert!(limiter.memory_growing(0, 1 << 20, None).unwrap());
        assert!(!limiter.exceeded());
    }
}
