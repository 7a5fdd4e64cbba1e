//! The on-disk form of an [`InstanceState`], version 2. Everything little-endian:
//!
//! ```text
//! magic        8 bytes  "KILNWSS\0"
//! version      u32      2 (1 is still read: its checksum is of every byte before it)
//! fingerprint  32 bytes the instrumented component's (Layout::fingerprint)
//! counts       u32 × 3  memories, globals, tables
//! memories     per memory: byte_len u64 (a multiple of 64 KiB, at most 4 GiB), run count u32,
//!              then per run: offset u64, len u64 (both multiples of 4 KiB, len > 0, in order,
//!              not overlapping, inside byte_len)
//! globals      per global: kind u8 (0 i32, 1 i64, 2 f32, 3 f64, 4 v128), bits 16 bytes (u128;
//!              bits above the kind's width are zero)
//! tables       per table: its size in elements, u32
//! data         every run's bytes, in the order of the runs above
//! checksum     u64: xxHash64 (seed 0) of the bytes before the data, then of the xxHash64 of
//!              each 64 KiB of the data (SUMMED; the last piece may be shorter), as u64s
//! ```
//!
//! The checksum is of the pieces' hashes, not of the data itself, because those hashes are what
//! a suspend compares with the previous save's to find the pieces that changed (`sandboxes::saved`):
//! a capture hashes its data once, not twice.
//!
//! A run is a stretch of non-zero 4 KiB pages; the pages between runs are zero and take no space,
//! so a 4 MiB memory that is mostly zeros costs a few KiB. The encoded bytes *are* the state: a
//! capture writes them directly from guest memory, and a restore reads the runs' bytes out of them,
//! so nothing is copied twice.
//!
//! The checksum catches a torn or bit-flipped file; it is not a MAC. A state file's contents are
//! the guest's own memory (a tampered file can only change what that guest's memory holds, never
//! reach outside its sandbox); keeping other people from editing them is the data directory's job.

use std::ops::Range;

use super::{GlobalKind, StateError};

const MAGIC: &[u8; 8] = b"KILNWSS\0";
pub(super) const VERSION: u32 = 2;
/// Zero-page granularity: the host's page size, so skipped pages are pages never faulted in.
pub const PAGE: usize = 4096;
/// A Wasm page; memory sizes are multiples of it.
pub const WASM_PAGE: u64 = 65536;
/// The pieces of a captured state's data that [`InstanceState::data_sums`] sums (what
/// `sandboxes::saved` cuts states into).
pub const SUMMED: usize = 64 * 1024;
/// The largest 32-bit memory.
pub const MAX_MEMORY_BYTES: u64 = 1 << 32;
const FIXED_HEADER: usize = 8 + 4 + 32 + 12;
const CHECKSUM: usize = 8;
const RUN_ENTRY: usize = 16;
const MEMORY_ENTRY: usize = 12;
const GLOBAL_ENTRY: usize = 17;
const TABLE_ENTRY: usize = 4;

/// The captured state of one component instance: every instrumented memory, mutable global and
/// table, in the order of its [`Layout`](super::Layout). Holds its encoded bytes; cheap to write
/// out ([`encode`](InstanceState::encode)) and to read back ([`decode`](InstanceState::decode)).
pub struct InstanceState {
    bytes: Vec<u8>,
    fingerprint: [u8; 32],
    memories: Vec<MemoryImage>,
    globals: Vec<GlobalValue>,
    tables: Vec<u32>,
    /// A capture's xxHash64 of each [`SUMMED`] bytes of [`data_range`](InstanceState::data_range)
    /// (the last piece may be shorter); empty for a decoded state.
    sums: Vec<u64>,
}

/// One memory's contents: its size, and where its non-zero pages are in the encoded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MemoryImage {
    pub byte_len: u64,
    pub runs: Vec<Run>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    /// Where the run starts in guest memory.
    pub offset: u64,
    /// Its bytes, as a range of the encoded state.
    pub data: Range<usize>,
}

/// A mutable global's value, as raw bits (floats bit for bit, NaN payloads included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalValue {
    pub kind: GlobalKind,
    pub bits: u128,
}

impl GlobalKind {
    fn tag(self) -> u8 {
        match self {
            GlobalKind::I32 => 0,
            GlobalKind::I64 => 1,
            GlobalKind::F32 => 2,
            GlobalKind::F64 => 3,
            GlobalKind::V128 => 4,
        }
    }

    fn from_tag(tag: u8) -> Option<GlobalKind> {
        Some(match tag {
            0 => GlobalKind::I32,
            1 => GlobalKind::I64,
            2 => GlobalKind::F32,
            3 => GlobalKind::F64,
            4 => GlobalKind::V128,
            _ => return None,
        })
    }

    /// Bits a value of this kind may use.
    fn width(self) -> u32 {
        match self {
            GlobalKind::I32 | GlobalKind::F32 => 32,
            GlobalKind::I64 | GlobalKind::F64 => 64,
            GlobalKind::V128 => 128,
        }
    }
}

impl InstanceState {
    /// The encoded state, to be written to disk: a copy of [`as_bytes`](InstanceState::as_bytes).
    pub fn encode(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// The encoded state, borrowed: it was encoded at capture, so this is free.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The encoded state, by value, without a copy.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Where the memories' bytes are in [`as_bytes`](InstanceState::as_bytes): before them is
    /// the directory (sizes, runs, globals, tables), after them the checksum.
    pub fn data_range(&self) -> Range<usize> {
        let end = self.bytes.len() - CHECKSUM;
        end - self.stored_bytes() as usize..end
    }

    /// [`checksum`] of each [`SUMMED`] bytes of the data, the last piece maybe shorter, as the
    /// capture found them; empty if it was decoded, not captured.
    pub fn data_sums(&self) -> &[u64] {
        &self.sums
    }

    /// The fingerprint of the instrumented component it was captured from.
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    /// The memories' sizes together, zero pages included: what the instance will take of its
    /// `memory_mb` once restored.
    pub fn memory_bytes(&self) -> u64 {
        self.memories.iter().map(|m| m.byte_len).sum()
    }

    /// Bytes of memory actually stored (the non-zero pages).
    pub fn stored_bytes(&self) -> u64 {
        self.memories
            .iter()
            .flat_map(|m| &m.runs)
            .map(|run| run.data.len() as u64)
            .sum()
    }

    pub(super) fn memories(&self) -> &[MemoryImage] {
        &self.memories
    }

    pub(super) fn globals(&self) -> &[GlobalValue] {
        &self.globals
    }

    pub(super) fn tables(&self) -> &[u32] {
        &self.tables
    }

    /// The bytes of a run.
    pub(super) fn run_bytes(&self, run: &Run) -> &[u8] {
        &self.bytes[run.data.clone()]
    }

    /// Reads an encoded state, checking everything: magic, version, checksum, and that the
    /// directory is consistent with itself and with the data (sizes, alignment, order, bounds,
    /// exact length). The state keeps a copy of `bytes` once they are found sound.
    pub fn decode(bytes: &[u8]) -> Result<InstanceState, StateError> {
        let parts = Parts::parse(bytes)?;
        Ok(parts.with_bytes(bytes.to_vec()))
    }

    /// [`decode`](InstanceState::decode), keeping `bytes` themselves (no copy of a large state).
    pub fn decode_vec(bytes: Vec<u8>) -> Result<InstanceState, StateError> {
        let parts = Parts::parse(&bytes)?;
        Ok(parts.with_bytes(bytes))
    }
}

/// A decoded state's directory, before it takes its bytes.
struct Parts {
    fingerprint: [u8; 32],
    memories: Vec<MemoryImage>,
    globals: Vec<GlobalValue>,
    tables: Vec<u32>,
}

impl Parts {
    fn with_bytes(self, bytes: Vec<u8>) -> InstanceState {
        InstanceState {
            bytes,
            fingerprint: self.fingerprint,
            memories: self.memories,
            globals: self.globals,
            tables: self.tables,
            sums: Vec::new(),
        }
    }

    fn parse(bytes: &[u8]) -> Result<Parts, StateError> {
        let corrupt = |what: String| StateError::Corrupt(what);
        if bytes.len() < FIXED_HEADER + CHECKSUM {
            return Err(corrupt(format!(
                "truncated: {} bytes, less than the {} of an empty state",
                bytes.len(),
                FIXED_HEADER + CHECKSUM
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(corrupt("not a Kiln Wasm instance state (bad magic)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != 1 && version != VERSION {
            return Err(corrupt(format!(
                "format version {version}, and this Kiln reads versions 1 and {VERSION}"
            )));
        }
        let body_len = bytes.len() - CHECKSUM;
        let stored = u64::from_le_bytes(bytes[body_len..].try_into().expect("8 bytes"));
        let verify = |computed: u64| {
            if stored == computed {
                Ok(())
            } else {
                Err(corrupt(format!(
                    "checksum mismatch (stored {stored:016x}, computed {computed:016x}): the file is torn or damaged"
                )))
            }
        };
        if version == 1 {
            verify(checksum(&bytes[..body_len]))?;
        }

        let mut r = Reader {
            bytes: &bytes[..body_len],
            at: 12,
        };
        let fingerprint: [u8; 32] = r.take(32, "fingerprint")?.try_into().expect("32 bytes");
        let memory_count = r.u32("memory count")? as usize;
        let global_count = r.u32("global count")? as usize;
        let table_count = r.u32("table count")? as usize;

        // Capacities are bounded by what the input could hold, never by a count it claims.
        let mut memories = Vec::with_capacity(memory_count.min(r.left() / MEMORY_ENTRY));
        // Run lengths in order; their data ranges are assigned once the data's start is known.
        let mut lengths = Vec::new();
        for m in 0..memory_count {
            let byte_len = r.u64("memory size")?;
            if byte_len % WASM_PAGE != 0 || byte_len > MAX_MEMORY_BYTES {
                return Err(corrupt(format!(
                    "memory {m}: size {byte_len} is not a whole number of 64 KiB pages up to 4 GiB"
                )));
            }
            let run_count = r.u32("run count")? as usize;
            let mut runs = Vec::with_capacity(run_count.min(r.left() / RUN_ENTRY));
            let mut end = 0u64;
            for i in 0..run_count {
                let offset = r.u64("run offset")?;
                let len = r.u64("run length")?;
                let page = PAGE as u64;
                let run_end = offset.checked_add(len);
                if offset % page != 0 || len % page != 0 || len == 0 {
                    return Err(corrupt(format!(
                        "memory {m}, run {i}: offset {offset} and length {len} must be non-empty multiples of {PAGE}"
                    )));
                }
                if offset < end || run_end.is_none_or(|e| e > byte_len) {
                    return Err(corrupt(format!(
                        "memory {m}, run {i}: [{offset}, +{len}) overlaps the previous run or ends past the memory's {byte_len} bytes"
                    )));
                }
                end = offset + len;
                lengths.push(len);
                runs.push(Run { offset, data: 0..0 });
            }
            memories.push(MemoryImage { byte_len, runs });
        }
        let mut globals = Vec::with_capacity(global_count.min(r.left() / GLOBAL_ENTRY));
        for g in 0..global_count {
            let tag = r.take(1, "global kind")?[0];
            let kind = GlobalKind::from_tag(tag).ok_or_else(|| corrupt(format!("global {g}: unknown kind {tag}")))?;
            let bits = u128::from_le_bytes(r.take(16, "global value")?.try_into().expect("16 bytes"));
            if kind.width() < 128 && bits >> kind.width() != 0 {
                return Err(corrupt(format!(
                    "global {g}: a {kind:?} value wider than {} bits",
                    kind.width()
                )));
            }
            globals.push(GlobalValue { kind, bits });
        }
        let mut tables = Vec::with_capacity(table_count.min(r.left() / TABLE_ENTRY));
        for _ in 0..table_count {
            tables.push(r.u32("table size")?);
        }
        if version == VERSION {
            // Of the directory just read (bounds-checked, not yet trusted) and the data after it.
            verify(summed_checksum(&bytes[..r.at], &bytes[r.at..body_len]))?;
        }

        // The data is exactly the runs' bytes, in order.
        let total = lengths
            .iter()
            .try_fold(0u64, |sum, &len| sum.checked_add(len))
            .filter(|&total| total == r.left() as u64)
            .ok_or_else(|| {
                corrupt(format!(
                    "the runs need {} bytes of data and {} are there",
                    lengths.iter().fold(0u64, |s, &l| s.saturating_add(l)),
                    r.left()
                ))
            })?;
        debug_assert_eq!(total as usize, r.left());
        let mut at = r.at;
        let mut len = lengths.into_iter();
        for run in memories.iter_mut().flat_map(|m| m.runs.iter_mut()) {
            let n = len.next().expect("one length per run") as usize;
            run.data = at..at + n;
            at += n;
        }
        Ok(Parts {
            fingerprint,
            memories,
            globals,
            tables,
        })
    }
}

impl std::fmt::Debug for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceState")
            .field("encoded_bytes", &self.bytes.len())
            .field("memories", &self.memories)
            .field("globals", &self.globals)
            .field("tables", &self.tables)
            .finish()
    }
}

/// A bounds-checked cursor over the directory.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StateError> {
        if self.left() < n {
            return Err(StateError::Corrupt(format!(
                "truncated: the {what} at byte {} needs {n} bytes and {} are left",
                self.at,
                self.left()
            )));
        }
        let bytes = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
}

/// One memory as the capture sees it: `body` is the memory but its last 8 bytes, `tail` those
/// 8 bytes (they are read apart: the accessor that lends the body uses them as its return area).
pub(super) struct MemoryView<'a> {
    pub body: &'a [u8],
    pub tail: [u8; 8],
}

impl MemoryView<'_> {
    fn byte_len(&self) -> usize {
        if self.body.is_empty() {
            0
        } else {
            self.body.len() + 8
        }
    }

    /// The bytes of pages `pages` (the last page patched with the tail).
    fn copy_pages(&self, pages: Range<usize>, last: &[u8; PAGE], out: &mut Vec<u8>) {
        let total = self.byte_len() / PAGE;
        if pages.end < total {
            out.extend_from_slice(&self.body[pages.start * PAGE..pages.end * PAGE]);
        } else {
            out.extend_from_slice(&self.body[pages.start * PAGE..(total - 1) * PAGE]);
            out.extend_from_slice(last);
        }
    }
}

/// Encodes a state from live memories: one pass to find the non-zero runs, one to copy them into a
/// buffer allocated once at its final size.
pub(super) fn encode(
    fingerprint: &[u8; 32],
    memories: &[MemoryView<'_>],
    globals: &[GlobalValue],
    tables: &[u32],
) -> InstanceState {
    let mut images = Vec::with_capacity(memories.len());
    let mut lasts = Vec::with_capacity(memories.len());
    let mut page_runs = Vec::with_capacity(memories.len());
    let mut data_len = 0usize;
    let mut directory_len = FIXED_HEADER;
    for memory in memories {
        let byte_len = memory.byte_len();
        debug_assert_eq!(byte_len % PAGE, 0);
        let pages = byte_len / PAGE;
        let mut last = [0u8; PAGE];
        if pages > 0 {
            last[..PAGE - 8].copy_from_slice(&memory.body[(pages - 1) * PAGE..]);
            last[PAGE - 8..].copy_from_slice(&memory.tail);
        }
        let page = |p: usize| -> &[u8] {
            if p + 1 == pages {
                &last
            } else {
                &memory.body[p * PAGE..(p + 1) * PAGE]
            }
        };
        let runs = nonzero_runs(pages, |p| !is_zero(page(p)));
        data_len += runs.iter().map(|r| r.len() * PAGE).sum::<usize>();
        directory_len += MEMORY_ENTRY + runs.len() * RUN_ENTRY;
        page_runs.push(runs);
        lasts.push(last);
        images.push(byte_len as u64);
    }
    directory_len += globals.len() * GLOBAL_ENTRY + tables.len() * TABLE_ENTRY;

    let mut out = super::huge::buffer(directory_len + data_len + CHECKSUM);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(fingerprint);
    for count in [memories.len(), globals.len(), tables.len()] {
        out.extend_from_slice(&(count as u32).to_le_bytes());
    }
    for (byte_len, runs) in images.iter().zip(&page_runs) {
        out.extend_from_slice(&byte_len.to_le_bytes());
        out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        for run in runs {
            out.extend_from_slice(&((run.start * PAGE) as u64).to_le_bytes());
            out.extend_from_slice(&((run.len() * PAGE) as u64).to_le_bytes());
        }
    }
    for global in globals {
        out.push(global.kind.tag());
        out.extend_from_slice(&global.bits.to_le_bytes());
    }
    for size in tables {
        out.extend_from_slice(&size.to_le_bytes());
    }
    debug_assert_eq!(out.len(), directory_len);

    // The pages are copied a piece at a time, and each piece of the data is summed as soon as it
    // is whole, while it is still in the cache.
    let mut sum = Checksum::new();
    sum.update(&out);
    let mut summed = Summed {
        data_start: out.len(),
        sums: Vec::with_capacity(data_len.div_ceil(SUMMED)),
        sum,
    };
    let mut memories_out = Vec::with_capacity(memories.len());
    for (((memory, runs), last), byte_len) in memories.iter().zip(&page_runs).zip(&lasts).zip(&images) {
        let mut image = MemoryImage {
            byte_len: *byte_len,
            runs: Vec::with_capacity(runs.len()),
        };
        for run in runs {
            let start = out.len();
            for at in run.clone().step_by(SUMMED / PAGE) {
                memory.copy_pages(at..(at + SUMMED / PAGE).min(run.end), last, &mut out);
                summed.whole(&out);
            }
            image.runs.push(Run {
                offset: (run.start * PAGE) as u64,
                data: start..out.len(),
            });
        }
        memories_out.push(image);
    }
    let (sum, sums) = summed.finish(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    InstanceState {
        bytes: out,
        fingerprint: *fingerprint,
        memories: memories_out,
        globals: globals.to_vec(),
        tables: tables.to_vec(),
        sums,
    }
}

/// The checksum of an encoding state, and the [`SUMMED`]-byte pieces of its data summed so far.
struct Summed {
    data_start: usize,
    sums: Vec<u64>,
    sum: Checksum,
}

impl Summed {
    /// Sums the pieces of `out`'s data that are whole.
    fn whole(&mut self, out: &[u8]) {
        loop {
            let at = self.data_start + self.sums.len() * SUMMED;
            if out.len() < at + SUMMED {
                return;
            }
            self.piece(&out[at..at + SUMMED]);
        }
    }

    fn piece(&mut self, bytes: &[u8]) {
        let piece = checksum(bytes);
        self.sums.push(piece);
        self.sum.update(&piece.to_le_bytes());
    }

    /// The checksum of all of `out`, and the sums of its data's pieces.
    fn finish(mut self, out: &[u8]) -> (u64, Vec<u64>) {
        self.whole(out);
        let at = self.data_start + self.sums.len() * SUMMED;
        if at < out.len() {
            self.piece(&out[at..]);
        }
        (self.sum.finish(), self.sums)
    }
}

/// Maximal runs of pages for which `nonzero` holds.
fn nonzero_runs(pages: usize, nonzero: impl Fn(usize) -> bool) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for p in 0..pages {
        if !nonzero(p) {
            continue;
        }
        match runs.last_mut() {
            Some(run) if run.end == p => run.end = p + 1,
            _ => runs.push(p..p + 1),
        }
    }
    runs
}

/// Whether a page is all zeros; ORs 8 bytes at a time (the compiler vectorises it).
fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(64);
    let mut any = 0u64;
    for chunk in &mut chunks {
        for word in chunk.chunks_exact(8) {
            any |= u64::from_le_bytes(word.try_into().expect("8 bytes"));
        }
        // One test per 64 bytes keeps the loop vectorised and still stops early on data.
        if any != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// The ranges of `[0, len)` not covered by `runs` (sorted, not overlapping).
pub(super) fn gaps(runs: &[Run], len: u64) -> Vec<Range<u64>> {
    let mut gaps = Vec::new();
    let mut at = 0u64;
    for run in runs {
        if run.offset > at {
            gaps.push(at..run.offset);
        }
        at = run.offset + run.data.len() as u64;
    }
    if at < len {
        gaps.push(at..len);
    }
    gaps
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// xxHash64 with seed 0: fast (several GB/s) and well distributed, for catching damage. Public so
/// that a fuzzer can give mutated inputs a valid checksum and reach the decoder's other checks.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut sum = Checksum::new();
    sum.update(bytes);
    sum.finish()
}

/// A version 2 state's checksum (module doc) of its `directory` and its `data`.
fn summed_checksum(directory: &[u8], data: &[u8]) -> u64 {
    let mut sum = Checksum::new();
    sum.update(directory);
    for piece in data.chunks(SUMMED) {
        sum.update(&checksum(piece).to_le_bytes());
    }
    sum.finish()
}

/// [`checksum`] of bytes that come in pieces: the same value as of the pieces put together.
#[derive(Clone)]
pub struct Checksum {
    lanes: [u64; 4],
    /// A stripe begun by one piece and not yet ended by the next.
    pending: [u8; 32],
    pending_len: usize,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

impl Checksum {
    pub fn new() -> Checksum {
        Checksum {
            lanes: [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)],
            pending: [0; 32],
            pending_len: 0,
            len: 0,
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if self.pending_len > 0 {
            let take = (32 - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < 32 {
                return;
            }
            let stripe = self.pending;
            stripes(&mut self.lanes, &stripe);
            self.pending_len = 0;
        }
        let whole = bytes.len() / 32 * 32;
        stripes(&mut self.lanes, &bytes[..whole]);
        let rest = &bytes[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    pub fn finish(&self) -> u64 {
        fn merge(acc: u64, v: u64) -> u64 {
            (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
        }
        let v = self.lanes;
        let mut h = if self.len >= 32 {
            let mut h = v[0]
                .rotate_left(1)
                .wrapping_add(v[1].rotate_left(7))
                .wrapping_add(v[2].rotate_left(12))
                .wrapping_add(v[3].rotate_left(18));
            for lane in v {
                h = merge(h, lane);
            }
            h
        } else {
            P5
        };
        h = h.wrapping_add(self.len);
        let rest = &self.pending[..self.pending_len];
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            h = (h ^ round(0, word(w)))
                .rotate_left(27)
                .wrapping_mul(P1)
                .wrapping_add(P4);
        }
        let mut rest = words.remainder();
        if rest.len() >= 4 {
            let w = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as u64;
            h = (h ^ w.wrapping_mul(P1))
                .rotate_left(23)
                .wrapping_mul(P2)
                .wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h = (h ^ (b as u64).wrapping_mul(P5)).rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
}

/// Folds whole 32-byte stripes into the four lanes.
fn stripes(lanes: &mut [u64; 4], bytes: &[u8]) {
    for stripe in bytes.chunks_exact(32) {
        for (lane, acc) in lanes.iter_mut().enumerate() {
            *acc = round(*acc, word(&stripe[lane * 8..lane * 8 + 8]));
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // lists of byte ranges, some of one
mod tests {
    use super::*;

    #[test]
    fn checksum_is_xxh64() {
        // Reference values from the `xxhash` Python package (xxh64, seed 0).
        assert_eq!(checksum(b""), 0xef46_db37_51d8_e999);
        assert_eq!(checksum(b"a"), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(checksum(b"abc"), 0x44bc_2cf5_ad77_0999);
        assert_eq!(checksum(b"0123456789abcdef0123456789abcdef0"), 0xe876_84f0_8d6d_0816);
        let mut long: Vec<u8> = (0..=255u8).cycle().take(256 * 5).collect();
        long.extend_from_slice(b"kiln");
        assert_eq!(checksum(&long), 0xbd2b_7762_4212_1f99);
    }

    #[test]
    fn a_checksum_in_pieces_is_the_checksum_of_the_whole() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        for cuts in [
            &[0usize][..],
            &[1, 2, 3],
            &[31, 32, 33],
            &[5, 100, 101, 999],
            &[64, 128],
        ] {
            let mut sum = Checksum::new();
            let mut at = 0;
            for &cut in cuts {
                sum.update(&bytes[at..cut]);
                at = cut;
            }
            sum.update(&bytes[at..]);
            assert_eq!(sum.finish(), checksum(&bytes), "{cuts:?}");
        }
        assert_eq!(Checksum::new().finish(), checksum(b""));
    }

    #[test]
    fn a_capture_sums_its_data_in_pieces() {
        // 40 pages of data (a piece of 16 and one of 8 left over), with zero pages between runs.
        let memory = memory(48, |p| if p % 6 == 5 { 0 } else { p as u8 + 1 });
        let state = encode(&[1; 32], &[view(&memory)], &[], &[]);
        let bytes = state.as_bytes();
        let data = state.data_range();
        assert_eq!(data.len(), 40 * PAGE);
        assert_eq!(data.end, bytes.len() - CHECKSUM);
        let expected: Vec<u64> = bytes[data.clone()].chunks(SUMMED).map(checksum).collect();
        assert_eq!(state.data_sums(), expected);
        let stored = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap());
        assert_eq!(stored, summed_checksum(&bytes[..data.start], &bytes[data.clone()]));
        assert!(InstanceState::decode(bytes).unwrap().data_sums().is_empty());
    }

    /// A memory of `pages` 4 KiB pages, with `fill` deciding each page's byte.
    fn memory(pages: usize, fill: impl Fn(usize) -> u8) -> Vec<u8> {
        (0..pages * PAGE).map(|i| fill(i / PAGE)).collect()
    }

    fn view(memory: &[u8]) -> MemoryView<'_> {
        MemoryView {
            body: &memory[..memory.len() - 8],
            tail: memory[memory.len() - 8..].try_into().unwrap(),
        }
    }

    fn sample() -> (Vec<u8>, Vec<u8>) {
        // 2 Wasm pages: non-zero pages 0, 1, 5, 31 (the last, whose tail the view holds apart).
        let a = memory(32, |p| if matches!(p, 0 | 1 | 5 | 31) { p as u8 + 1 } else { 0 });
        // One Wasm page of zeros but for its last 8 bytes.
        let mut b = vec![0u8; 16 * PAGE];
        b[16 * PAGE - 1] = 0xAA;
        (a, b)
    }

    fn sample_state(a: &[u8], b: &[u8]) -> InstanceState {
        let globals = [
            GlobalValue {
                kind: GlobalKind::I32,
                bits: 0xFFFF_FFFF,
            },
            GlobalValue {
                kind: GlobalKind::F64,
                bits: 0x7FF8_0000_0000_0001,
            },
            GlobalValue {
                kind: GlobalKind::V128,
                bits: u128::MAX - 7,
            },
        ];
        encode(
            &[7; 32],
            &[
                view(a),
                view(b),
                MemoryView {
                    body: &[],
                    tail: [0; 8],
                },
            ],
            &globals,
            &[14, 107],
        )
    }

    #[test]
    fn round_trip_skips_zero_pages() {
        let (a, b) = sample();
        let state = sample_state(&a, &b);
        let runs: Vec<(u64, usize)> = state.memories[0]
            .runs
            .iter()
            .map(|r| (r.offset, r.data.len()))
            .collect();
        assert_eq!(runs, [(0, 2 * PAGE), (5 * PAGE as u64, PAGE), (31 * PAGE as u64, PAGE)]);
        assert_eq!(
            state.memories[1].runs.len(),
            1,
            "a page non-zero only in its tail is kept"
        );
        assert_eq!(state.stored_bytes(), 5 * PAGE as u64);
        assert_eq!(state.memory_bytes(), (32 + 16) * PAGE as u64);

        let decoded = InstanceState::decode(&state.encode()).unwrap();
        assert_eq!(decoded.memories, state.memories);
        assert_eq!(decoded.globals, state.globals);
        assert_eq!(decoded.tables, [14, 107]);
        assert_eq!(decoded.fingerprint, [7; 32]);
        // The pages come back byte for byte, zeros between runs.
        for (image, original) in decoded.memories.iter().zip([&a, &b]) {
            let mut rebuilt = vec![0u8; image.byte_len as usize];
            for run in &image.runs {
                let at = run.offset as usize;
                rebuilt[at..at + run.data.len()].copy_from_slice(decoded.run_bytes(run));
            }
            assert_eq!(&rebuilt, original);
        }
        assert_eq!(
            decoded.memories[2],
            MemoryImage {
                byte_len: 0,
                runs: vec![]
            }
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let (a, b) = sample();
        let bytes = sample_state(&a, &b).into_bytes();
        for len in 0..bytes.len() {
            let error = InstanceState::decode(&bytes[..len]).unwrap_err();
            assert!(matches!(error, StateError::Corrupt(_)), "{len}: {error}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(InstanceState::decode(&longer).is_err(), "a trailing byte is refused");
    }

    #[test]
    fn every_flipped_bit_in_the_header_and_directory_is_refused() {
        let (a, b) = sample();
        let bytes = sample_state(&a, &b).into_bytes();
        // The whole directory and the first data bytes, bit by bit; then a sample of the data.
        let positions = (0..400).chain((400..bytes.len()).step_by(997)).chain([bytes.len() - 1]);
        for at in positions {
            for bit in [0, 3, 7] {
                let mut bad = bytes.clone();
                bad[at] ^= 1 << bit;
                let error = InstanceState::decode(&bad).unwrap_err();
                assert!(matches!(error, StateError::Corrupt(_)), "byte {at}: {error}");
            }
        }
    }

    /// Encodes a directory by hand (with a valid checksum) to reach the structural checks.
    fn forged(memories: &[(u64, &[(u64, u64)])], data: usize, globals: &[(u8, u128)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        // Version 1 (its checksum is of every byte): what older Kilns wrote still reads.
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&[0; 32]);
        for n in [memories.len(), globals.len(), 0] {
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        for (len, runs) in memories {
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
            for (offset, len) in *runs {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
        for (kind, bits) in globals {
            out.push(*kind);
            out.extend_from_slice(&bits.to_le_bytes());
        }
        out.resize(out.len() + data, 1);
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    #[test]
    fn inconsistent_directories_are_refused_even_with_a_valid_checksum() {
        let p = PAGE as u64;
        let w = WASM_PAGE;
        let ok = forged(&[(w, &[(0, p), (2 * p, p)])], 2 * PAGE, &[(1, 5)]);
        InstanceState::decode(&ok).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("size not in Wasm pages", forged(&[(w + p, &[])], 0, &[])),
            ("size past 4 GiB", forged(&[(MAX_MEMORY_BYTES + w, &[])], 0, &[])),
            ("unaligned run", forged(&[(w, &[(1, p)])], PAGE, &[])),
            ("empty run", forged(&[(w, &[(0, 0)])], 0, &[])),
            ("overlapping runs", forged(&[(w, &[(0, 2 * p), (p, p)])], 3 * PAGE, &[])),
            (
                "runs out of order",
                forged(&[(w, &[(2 * p, p), (0, p)])], 2 * PAGE, &[]),
            ),
            ("run past the memory", forged(&[(w, &[(w - p, 2 * p)])], 2 * PAGE, &[])),
            (
                "run length overflowing",
                forged(&[(w, &[(p, u64::MAX - p + 1)])], 0, &[]),
            ),
            ("too little data", forged(&[(w, &[(0, p)])], PAGE - 1, &[])),
            ("too much data", forged(&[(w, &[(0, p)])], PAGE + 1, &[])),
            ("unknown global kind", forged(&[], 0, &[(9, 0)])),
            ("i32 wider than 32 bits", forged(&[], 0, &[(0, 1 << 32)])),
            ("f64 wider than 64 bits", forged(&[], 0, &[(3, 1 << 64)])),
            ("a count far past the input", {
                let mut bytes = forged(&[], 0, &[]);
                bytes[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
                let body = bytes.len() - 8;
                let sum = checksum(&bytes[..body]);
                bytes[body..].copy_from_slice(&sum.to_le_bytes());
                bytes
            }),
        ];
        for (what, bytes) in cases {
            let error = InstanceState::decode(&bytes).unwrap_err();
            assert!(matches!(error, StateError::Corrupt(_)), "{what}: {error}");
        }
        let mut other_version = forged(&[], 0, &[]);
        other_version[8] = 3;
        let error = InstanceState::decode(&other_version).unwrap_err().to_string();
        assert!(error.contains("version 3"), "{error}");
    }

    #[test]
    fn zero_pages_are_found_anywhere_in_a_page() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero(&page));
        for at in [0, 63, 64, 2047, PAGE - 1] {
            page[at] = 1;
            assert!(!is_zero(&page), "{at}");
            page[at] = 0;
        }
        assert_eq!(nonzero_runs(6, |p| p != 2 && p != 3), [0..2, 4..6]);
        let runs = [
            Run {
                offset: 4096,
                data: 0..4096,
            },
            Run {
                offset: 3 * 4096,
                data: 0..4096,
            },
        ];
        assert_eq!(gaps(&runs, 5 * 4096), [0..4096, 2 * 4096..3 * 4096, 4 * 4096..5 * 4096]);
        assert_eq!(gaps(&[], 4096), [0..4096]);
    }
}
