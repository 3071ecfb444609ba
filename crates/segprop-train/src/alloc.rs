//! A counting global allocator for peak host-memory measurements.
//!
//! Binaries that want memory numbers install it with
//! `#[global_allocator] static ALLOC: CountingAllocator = CountingAllocator;`. The engine reads
//! [`current_bytes`] / [`peak_bytes`] and reports `None` when it is not installed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The high-water mark of a whole run: stages reset [`PEAK`], not this.
static RUN_PEAK: AtomicUsize = AtomicUsize::new(0);
/// The high-water mark of a stage ([`reset_stage_peak`]); a step's phases reset [`PEAK`], not this.
static STAGE_PEAK: AtomicUsize = AtomicUsize::new(0);
/// Live bytes held aside from training: the SnapCheck cache's entries in memory ([`set_aside`]).
static ASIDE: AtomicUsize = AtomicUsize::new(0);
/// The stage's high-water mark of live bytes less those held aside: the training's own peak.
static STAGE_TRAINING_PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Wraps the system allocator and counts live bytes and their high-water mark.
pub struct CountingAllocator;

#[allow(unsafe_code)]
// SAFETY: every call forwards to `System` with the caller's layout unchanged; the counters are
// plain atomics updated after successful allocations.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout, which the caller guarantees is valid.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            record_alloc(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            record_alloc(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with this layout (all paths above forward).
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr`/`layout` come from this allocator, which forwards to `System`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            record_alloc(new_size);
        }
        new
    }
}

/// Largest request glibc serves from its heap rather than a fresh `mmap`: 32 MiB, glibc's own
/// ceiling for its adaptive threshold.
const HEAP_REQUEST_LIMIT: usize = 32 << 20;

/// Free heap memory glibc keeps for reuse instead of returning it to the system: 1 GiB.
const KEPT_FREE_HEAP: usize = 1 << 30;

/// Keeps the memory a training step frees for the next step, instead of handing it back to the
/// system and faulting it in again (zeroed by the kernel, page by page) one step later.
///
/// A step allocates and frees the same activations every time. With glibc's defaults, buffers
/// over its adaptive `mmap` threshold come and go as fresh mappings, and freed heap above a
/// small threshold is trimmed away: the reference step spent about 2.5x the system time and
/// ran 4-5% slower (docs/benchmarks.md, "Third pass"). Here requests up to
/// [`HEAP_REQUEST_LIMIT`] come from the heap and up to [`KEPT_FREE_HEAP`] of freed heap stays
/// mapped. The resident size between steps is then the step's peak, which is what the peak
/// columns report anyway; the live-byte counters of this module are unaffected.
///
/// Training binaries call it first thing in `main`. Elsewhere than glibc it does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `mallopt` only sets allocator parameters; glibc takes its own lock, and both
    // values are in the ranges glibc accepts (it returns 0 and changes nothing otherwise).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_REQUEST_LIMIT as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEPT_FREE_HEAP as libc::c_int);
    }
}

fn record_alloc(size: usize) {
    INSTALLED.store(true, Ordering::Relaxed);
    let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
    RUN_PEAK.fetch_max(now, Ordering::Relaxed);
    STAGE_PEAK.fetch_max(now, Ordering::Relaxed);
    STAGE_TRAINING_PEAK.fetch_max(
        now.saturating_sub(ASIDE.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
}

/// Counts `bytes` already allocated as held aside from training (an entry the SnapCheck cache
/// keeps in memory) until [`take_back`]: they stay in every peak but the training peak.
pub fn set_aside(bytes: usize) {
    ASIDE.fetch_add(bytes, Ordering::Relaxed);
}

/// Ends [`set_aside`] for `bytes` (the entry was dropped or spilled).
pub fn take_back(bytes: usize) {
    // Saturating: a cache made before the allocator was counting may give back more than it set.
    let _ = ASIDE.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
        Some(held.saturating_sub(bytes))
    });
}

/// Starts a stage's measurement window: its peak and its training peak become the current live
/// bytes (less those held aside, for the latter). Also starts a new [`peak_bytes`] window.
pub fn reset_stage_peak() {
    let now = CURRENT.load(Ordering::Relaxed);
    STAGE_PEAK.store(now, Ordering::Relaxed);
    STAGE_TRAINING_PEAK.store(
        now.saturating_sub(ASIDE.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
    reset_peak();
}

/// Highest live heap bytes since the last [`reset_stage_peak`], everything counted.
pub fn stage_peak_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| STAGE_PEAK.load(Ordering::Relaxed))
}

/// Highest live heap bytes since the last [`reset_stage_peak`] less the bytes held aside at
/// that moment (the SnapCheck cache): the memory training itself needed.
pub fn stage_training_peak_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| STAGE_TRAINING_PEAK.load(Ordering::Relaxed))
}

/// Live heap bytes, when the counting allocator is installed.
pub fn current_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| CURRENT.load(Ordering::Relaxed))
}

/// Highest live heap bytes since the last [`reset_peak`].
pub fn peak_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| PEAK.load(Ordering::Relaxed))
}

/// Starts a new measurement window: the peak becomes the current live bytes.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Starts a whole-run measurement window (the stages' own windows do not reset it).
pub fn reset_run_peak() {
    RUN_PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Highest live heap bytes since the last [`reset_run_peak`].
pub fn run_peak_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| RUN_PEAK.load(Ordering::Relaxed))
}

static FIRST_PHASE_PEAK: AtomicUsize = AtomicUsize::new(0);

/// Ends the first phase of a measured window (the engine calls it between a step's backward
/// passes and its optimizer update): the peak so far is kept for [`first_phase_peak`] and a new
/// window starts.
pub fn end_first_phase() {
    FIRST_PHASE_PEAK.store(PEAK.load(Ordering::Relaxed), Ordering::Relaxed);
    reset_peak();
}

/// The peak of the window [`end_first_phase`] closed last.
pub fn first_phase_peak() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| FIRST_PHASE_PEAK.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_step_memory_stays_in_the_heap_for_the_next_step() {
        super::keep_freed_memory();
        let size = 16 << 20;
        let buffer = vec![1u8; size];
        std::hint::black_box(&buffer);
        drop(buffer);
        // With glibc's defaults a 16 MiB buffer is its own mapping, unmapped when freed.
        #[allow(unsafe_code)]
        // SAFETY: `mallinfo2` only reads the allocator's statistics.
        let free_in_heap = unsafe { libc::mallinfo2() }.fordblks;
        assert!(
            free_in_heap >= size,
            "{free_in_heap} bytes free in the heap after freeing {size}"
        );
    }
}
