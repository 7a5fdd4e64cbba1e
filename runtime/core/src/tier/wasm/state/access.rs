//! Capture and restore: the host's side of the accessors that [`instrument`](super::instrument)
//! adds. Every read and write goes through the canonical ABI, so wasmtime bounds-checks each one
//! against the guest's memory; nothing here touches guest memory through a raw pointer.

use std::any::Any;
use std::collections::BTreeMap;
use std::ops::Range;

use wasmtime::component::{ComponentExportIndex, ComponentNamedList, Instance, Lift, Lower, TypedFunc, WasmList};
use wasmtime::Store;
use wasmtime_wasi::WasiView;

use super::format::{self, GlobalValue, InstanceState, MemoryView, WASM_PAGE};
use super::{huge, FreshImage, GlobalKind, Layout, StateError, ACCESS_INSTANCE};

/// The most bytes one accessor call moves or clears: list lengths and the accessors' offsets are
/// 32-bit, and a 4 GiB memory is one more than `u32::MAX`.
const CHUNK: u64 = 1 << 30;

/// Reads the state of `instance`, which must be of the instrumented component `layout` describes.
/// See the module documentation of `state` for when to call it and what it costs.
///
/// Refuses (and changes nothing) when the store's resource table holds anything — an open stream,
/// a pollable, a request: the state would refer to host objects a restored instance would not
/// have — and when a table's size differs from a fresh instance's.
pub async fn capture<T: WasiView + Send>(
    store: &mut Store<T>,
    instance: &Instance,
    layout: &Layout,
) -> Result<InstanceState, StateError> {
    quiescent(store.data_mut())?;
    let access = Access::new(store, instance, layout).await?;

    // Tables first: a refusal should come before megabytes are copied.
    let mut tables = Vec::with_capacity(layout.tables.len());
    for (n, slot) in layout.tables.iter().enumerate() {
        let (size,) = access.call::<(), (u32,)>(store, &format!("t{n}-size"), ()).await?;
        if u64::from(size) != slot.initial {
            return Err(StateError::Unsupported(format!(
                "table {} of core instance {} has {size} elements and a fresh instance has {}: a grown table \
                 holds function references that cannot be saved",
                slot.index, slot.core_instance, slot.initial
            )));
        }
        tables.push(size);
    }

    let mut globals = Vec::with_capacity(layout.globals.len());
    for (n, slot) in layout.globals.iter().enumerate() {
        let bits = match slot.kind {
            GlobalKind::I32 | GlobalKind::F32 => {
                u128::from(access.call::<(), (i32,)>(store, &format!("g{n}-get"), ()).await?.0 as u32)
            }
            GlobalKind::I64 | GlobalKind::F64 => {
                u128::from(access.call::<(), (i64,)>(store, &format!("g{n}-get"), ()).await?.0 as u64)
            }
            GlobalKind::V128 => {
                let (lo,) = access.call::<(), (i64,)>(store, &format!("g{n}-get-lo"), ()).await?;
                let (hi,) = access.call::<(), (i64,)>(store, &format!("g{n}-get-hi"), ()).await?;
                u128::from(lo as u64) | u128::from(hi as u64) << 64
            }
        };
        globals.push(GlobalValue { kind: slot.kind, bits });
    }

    // Each memory is lent as a `list<u8>` view (no copy); the copy is the encoding itself.
    let mut lent: Vec<Option<(WasmList<u8>, [u8; 8])>> = Vec::with_capacity(layout.memories.len());
    for n in 0..layout.memories.len() {
        let pages = access.size(store, n).await?;
        if pages == 0 {
            lent.push(None);
            continue;
        }
        let (tail,) = access.call::<(), (i64,)>(store, &format!("m{n}-tail"), ()).await?;
        let (list,) = access
            .call::<(), (WasmList<u8>,)>(store, &format!("m{n}-read"), ())
            .await?;
        if list.len() as u64 != pages * WASM_PAGE - 8 {
            return Err(StateError::Guest(format!(
                "memory {n} lent {} bytes for {pages} pages",
                list.len()
            )));
        }
        lent.push(Some((list, tail.to_le_bytes())));
    }
    let views: Vec<MemoryView<'_>> = lent
        .iter()
        .map(|lent| match lent {
            None => MemoryView {
                body: &[],
                tail: [0; 8],
            },
            Some((list, tail)) => MemoryView {
                body: list.as_le_slice(&*store),
                tail: *tail,
            },
        })
        .collect();
    Ok(format::encode(&layout.fingerprint, &views, &globals, &tables))
}

/// Puts `state` into `instance`, a *fresh* instance (instantiated, nothing called yet) of the
/// instrumented component `layout` describes, captured from an instance of that same component.
/// Refuses a state of another component, and one that does not fit this instance's limits (its
/// memories grow under the store's limiter like any growth of the guest's).
///
/// On an error the instance may be half restored: drop it.
pub async fn restore<T: Send>(
    store: &mut Store<T>,
    instance: &Instance,
    layout: &Layout,
    state: &InstanceState,
) -> Result<(), StateError> {
    if state.fingerprint() != &layout.fingerprint {
        return Err(StateError::Mismatch(
            "the state was captured from another component (or another version of its instrumentation)".into(),
        ));
    }
    let shape_matches = state.memories().len() == layout.memories.len()
        && state.tables().len() == layout.tables.len()
        && state.globals().len() == layout.globals.len()
        && state
            .globals()
            .iter()
            .zip(&layout.globals)
            .all(|(g, slot)| g.kind == slot.kind);
    if !shape_matches {
        return Err(StateError::Mismatch(
            "the state's memories, globals or tables do not match the component's".into(),
        ));
    }
    let access = Access::new(store, instance, layout).await?;

    for (n, &size) in state.tables().iter().enumerate() {
        let (fresh,) = access.call::<(), (u32,)>(store, &format!("t{n}-size"), ()).await?;
        if fresh != size {
            return Err(StateError::Mismatch(format!(
                "table {n} has {fresh} elements in this instance and {size} in the state"
            )));
        }
    }

    for (n, (image, slot)) in state.memories().iter().zip(&layout.memories).enumerate() {
        let fresh_pages = access.size(store, n).await?;
        let pages = image.byte_len / WASM_PAGE;
        if pages < fresh_pages {
            return Err(StateError::Mismatch(format!(
                "memory {n} has {pages} pages in the state and already {fresh_pages} in this instance"
            )));
        }
        if pages > fresh_pages {
            let delta = (pages - fresh_pages) as i32;
            let (old,) = access
                .call::<(u32,), (i32,)>(store, &format!("m{n}-grow"), (delta as u32,))
                .await?;
            if old as u32 as u64 != fresh_pages {
                return Err(StateError::Guest(format!(
                    "memory {n} could not grow from {fresh_pages} to {pages} pages (its maximum?)"
                )));
            }
        }

        // Pages the state has as zeros need clearing only where a fresh instance may have data;
        // grown pages are zero by the language's rules.
        let fresh_len = fresh_pages * WASM_PAGE;
        let whole = 0..fresh_len;
        let may_be_dirty = match &slot.fresh {
            FreshImage::Pages(ranges) => ranges.as_slice(),
            FreshImage::Unknown => std::slice::from_ref(&whole),
        };
        for range in intersect(&format::gaps(&image.runs, image.byte_len), may_be_dirty, fresh_len) {
            for chunk in chunks(range) {
                let len = (chunk.end - chunk.start) as u32;
                access
                    .call::<(u32, u32), ()>(store, &format!("m{n}-zero"), (chunk.start as u32, len))
                    .await?;
            }
        }
        // The runs go into fresh pages: let the long ones fault in huge pages (see `huge`). The
        // read lends the memory without changing it; only its address is kept.
        if image.runs.iter().any(|run| run.data.len() >= huge::HUGE) {
            let (list,) = access
                .call::<(), (WasmList<u8>,)>(store, &format!("m{n}-read"), ())
                .await?;
            let base = list.as_le_slice(&*store).as_ptr();
            for run in &image.runs {
                huge::advise(base.wrapping_add(run.offset as usize), run.data.len());
            }
        }
        let write = format!("m{n}-write");
        for run in &image.runs {
            let bytes = state.run_bytes(run);
            for chunk in chunks(run.offset..run.offset + bytes.len() as u64) {
                access.call::<(u32,), ()>(store, "seek", (chunk.start as u32,)).await?;
                let from = (chunk.start - run.offset) as usize;
                let data = &bytes[from..from + (chunk.end - chunk.start) as usize];
                // The accessor's `realloc` answers the offset just set: wasmtime copies the list
                // straight to that place in the guest's memory (bounds-checked).
                access.call::<(&[u8],), ()>(store, &write, (data,)).await?;
            }
        }
    }

    for (n, global) in state.globals().iter().enumerate() {
        let set = format!("g{n}-set");
        match global.kind {
            GlobalKind::I32 | GlobalKind::F32 => {
                access
                    .call::<(i32,), ()>(store, &set, (global.bits as u32 as i32,))
                    .await?;
            }
            GlobalKind::I64 | GlobalKind::F64 => {
                access
                    .call::<(i64,), ()>(store, &set, (global.bits as u64 as i64,))
                    .await?;
            }
            GlobalKind::V128 => {
                let (lo, hi) = (global.bits as u64 as i64, (global.bits >> 64) as u64 as i64);
                access.call::<(i64, i64), ()>(store, &set, (lo, hi)).await?;
            }
        }
    }
    Ok(())
}

/// The accessor instance of one component instance.
struct Access<'a> {
    instance: &'a Instance,
    parent: ComponentExportIndex,
}

impl<'a> Access<'a> {
    /// Finds the accessors and checks they were built for `layout`'s component.
    async fn new<T: Send>(
        store: &mut Store<T>,
        instance: &'a Instance,
        layout: &Layout,
    ) -> Result<Access<'a>, StateError> {
        let parent = instance
            .get_export_index(&mut *store, None, ACCESS_INSTANCE)
            .ok_or_else(|| {
                StateError::Mismatch(format!(
                    "the instance has no `{ACCESS_INSTANCE}` export: it is not of an instrumented component"
                ))
            })?;
        let access = Access { instance, parent };
        let (fingerprint,) = access.call::<(), (i64,)>(store, "fingerprint", ()).await?;
        if fingerprint as u64 != layout.short_fingerprint() {
            return Err(StateError::Mismatch(
                "the instance is of another component than the layout describes".into(),
            ));
        }
        Ok(access)
    }

    async fn call<P, R>(&self, store: &mut Store<impl Send>, name: &str, params: P) -> Result<R, StateError>
    where
        P: ComponentNamedList + Lower + Send + Sync,
        R: ComponentNamedList + Lift + Send + Sync + 'static,
    {
        let func: TypedFunc<P, R> = self
            .instance
            .get_export_index(&mut *store, Some(&self.parent), name)
            .and_then(|index| self.instance.get_typed_func(&mut *store, index).ok())
            .ok_or_else(|| StateError::Mismatch(format!("the accessor `{name}` is missing or of another type")))?;
        func.call_async(&mut *store, params)
            .await
            .map_err(|e| StateError::Guest(format!("the accessor `{name}` failed: {e:#}")))
    }

    /// Memory `n`'s size in Wasm pages (`memory.grow` by 0 answers it).
    async fn size(&self, store: &mut Store<impl Send>, n: usize) -> Result<u64, StateError> {
        let (pages,) = self.call::<(u32,), (i32,)>(store, &format!("m{n}-grow"), (0,)).await?;
        Ok(u64::from(pages as u32))
    }
}

/// Refuses a store whose resource table holds anything, naming what it holds.
fn quiescent<T: WasiView>(data: &mut T) -> Result<(), StateError> {
    let table = data.ctx().table;
    if table.is_empty() {
        return Ok(());
    }
    let mut held: BTreeMap<&str, usize> = BTreeMap::new();
    for entry in table.iter_mut() {
        *held.entry(resource_name(entry)).or_default() += 1;
    }
    let total: usize = held.values().sum();
    let list: Vec<String> = held.iter().map(|(name, n)| format!("{n} × {name}")).collect();
    Err(StateError::NotQuiescent(format!(
        "the instance holds {total} host resource{}: {}; a snapshot cannot refer to host objects (let \
         the requests finish and the guest drop what it keeps)",
        if total == 1 { "" } else { "s" },
        list.join(", ")
    )))
}

/// The WIT name of a resource table entry, for the types a Kiln guest can hold.
fn resource_name(entry: &(dyn Any + Send)) -> &'static str {
    use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, IoError};
    use wasmtime_wasi_http::p2::body::{HostFutureTrailers, HostIncomingBody, HostOutgoingBody};
    use wasmtime_wasi_http::p2::types::{
        HostFutureIncomingResponse, HostIncomingRequest, HostIncomingResponse, HostOutgoingRequest,
        HostOutgoingResponse, HostResponseOutparam,
    };
    use wasmtime_wasi_http::{FieldMap, RequestOptions};
    macro_rules! names {
        ($($ty:ty => $name:literal),* $(,)?) => {
            $(if entry.is::<$ty>() { return $name; })*
        };
    }
    names! {
        DynPollable => "wasi:io/poll.pollable",
        DynInputStream => "wasi:io/streams.input-stream",
        DynOutputStream => "wasi:io/streams.output-stream",
        IoError => "wasi:io/error.error",
        HostIncomingRequest => "wasi:http/types.incoming-request",
        HostResponseOutparam => "wasi:http/types.response-outparam",
        HostOutgoingResponse => "wasi:http/types.outgoing-response",
        HostOutgoingRequest => "wasi:http/types.outgoing-request",
        HostIncomingResponse => "wasi:http/types.incoming-response",
        HostFutureIncomingResponse => "wasi:http/types.future-incoming-response",
        HostIncomingBody => "wasi:http/types.incoming-body",
        HostOutgoingBody => "wasi:http/types.outgoing-body",
        HostFutureTrailers => "wasi:http/types.future-trailers",
        FieldMap => "wasi:http/types.fields",
        RequestOptions => "wasi:http/types.request-options",
    }
    "other host resource"
}

/// The parts of sorted `gaps` that lie in sorted `dirty`, below `limit`.
fn intersect(gaps: &[Range<u64>], dirty: &[Range<u64>], limit: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < gaps.len() && j < dirty.len() {
        let start = gaps[i].start.max(dirty[j].start);
        let end = gaps[i].end.min(dirty[j].end).min(limit);
        if start < end {
            out.push(start..end);
        }
        if gaps[i].end < dirty[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `range` in pieces of at most [`CHUNK`] bytes.
fn chunks(range: Range<u64>) -> impl Iterator<Item = Range<u64>> {
    (range.start..range.end)
        .step_by(CHUNK as usize)
        .map(move |start| start..(start + CHUNK).min(range.end))
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // lists of byte ranges, some of one
mod tests {
    use super::*;

    #[test]
    fn intersections_and_chunks() {
        assert_eq!(
            intersect(&[0..10, 20..30, 40..50], &[5..25, 45..100], 48),
            [5..10, 20..25, 45..48]
        );
        assert_eq!(intersect(&[0..10], &[], 100), []);
        let pieces: Vec<_> = chunks(0..(1 << 32)).collect();
        assert_eq!(pieces.len(), 4);
        assert_eq!(pieces[3], 3 * CHUNK..4 * CHUNK);
        assert_eq!(chunks(5..5).count(), 0);
    }
}
