//! Allocator settings for processes that use mimalloc as their global allocator (the `wick`
//! binary and the benches do).
//!
//! Training allocates the same large buffers every step (activations, gradients). mimalloc
//! returns freed memory to the OS after 10 ms by default; the next step then page-faults it back
//! in, and the kernel zeroes every page (2 MiB at a time with transparent huge pages). On the
//! ResNet step that zeroing was 17% of the profile. Keeping freed memory mapped removes it; the
//! process keeps its peak footprint, which a training run reaches every step anyway.

use std::os::raw::{c_int, c_long};

extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
}

// Indices in `mi_option_t` of the mimalloc (v3) that `libmimalloc-sys` 0.1.49 builds.
const MI_OPTION_ARENA_EAGER_COMMIT: c_int = 4;
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// Keeps freed memory mapped (`purge_delay = -1`, `arena_eager_commit = 1`). Call it first in
/// `main` of a program whose global allocator is `mimalloc::MiMalloc`. An explicit
/// `MIMALLOC_PURGE_DELAY` in the environment wins.
pub fn keep_freed_memory() {
    // Links mimalloc (and its `mi_option_set`) even into programs that use another allocator;
    // there the call only sets an option that nothing reads.
    let _ = mimalloc::MiMalloc;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` only stores an integer in mimalloc's option table, which is
    // valid for any index below `_mi_option_last` (both are).
    unsafe {
        mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
    }
}

/// This machine's physical memory in bytes (`sysconf`), or `None` where it cannot tell.
pub fn total_memory_bytes() -> Option<u64> {
    // SAFETY: `sysconf` only reads system constants.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
}
