//! Transparent huge pages for the few large buffers a suspend or a resume fills in one go: the
//! captured state, the state read back from disk, and the guest memory it is restored into.
//!
//! Each is fresh memory written once from start to end, so each 4 KiB page costs a page fault:
//! on the hosts Kiln was measured on, 3–5 µs each, 3–5.7 ms for 4 MiB — more than everything
//! else a 4 MiB suspend or resume does. `MADV_HUGEPAGE` on the buffer before it is written lets
//! the kernel fault it in 2 MiB at a time (0.5 ms for the same 4 MiB). Only whole 2 MiB windows
//! inside the range are advised, so nothing outside it is touched, and a buffer smaller than
//! that (the usual sandbox state) is left alone. It is a hint: a kernel whose transparent huge
//! pages are `never` ignores it, and one that has no huge page free falls back to small pages.

/// A transparent huge page on x86-64 and aarch64 (4 KiB base pages).
pub const HUGE: usize = 2 << 20;

/// Asks the kernel to back the whole 2 MiB windows of `[start, start + len)` with huge pages.
/// Call it before the range is first written; it never changes the range's contents.
pub fn advise(start: *const u8, len: usize) {
    let from = (start as usize).next_multiple_of(HUGE);
    let to = (start as usize).saturating_add(len) / HUGE * HUGE;
    if to <= from {
        return;
    }
    // SAFETY: madvise(MADV_HUGEPAGE) changes no memory and no mapping's validity: it only sets
    // the kernel's page-size policy for the (page-aligned) range, which lies inside memory the
    // caller owns. An error (a kernel without THP) leaves everything as it was.
    unsafe {
        libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE);
    }
}

/// An empty vector with room for `capacity` bytes, advised as above.
pub fn buffer(capacity: usize) -> Vec<u8> {
    let buffer = Vec::with_capacity(capacity);
    advise(buffer.as_ptr(), buffer.capacity());
    buffer
}
