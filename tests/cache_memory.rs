//! A cache bounded at N bytes holds about N bytes of heap, measured by a counting
//! allocator, under a workload of random sessions of random sizes.
//!
//! This binary has its own global allocator, so it is a test file of its own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use aiecs_storage::layer::CacheLayer;
use aiecs_storage::{prelude::*, MemoryBackend, Metadata};
use serde_json::json;

/// Counts live heap bytes as glibc's malloc spends them: each block takes its size plus
/// an 8-byte header, rounded up to 16, at least 32. So the figure is close to what the
/// blocks cost in resident memory, not just what was asked for.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

fn chunk(size: usize) -> isize {
    (((size + 8 + 15) & !15).max(32)) as isize
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(chunk(new_size) - chunk(layout.size()), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A small deterministic generator (xorshift), so a failure can be reproduced.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Fills a cache bounded at `bound` bytes by reading random sessions (metadata of 0 to
/// `max_extra` bytes) and returns the heap it holds once moka has applied evictions.
async fn cache_heap(bound: u64, sessions: usize, max_extra: u64) -> (isize, u64) {
    let backend = MemoryBackend::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ bound ^ max_extra);
    for i in 0..sessions {
        let mut metadata = Metadata::new();
        let extra = rng.below(max_extra + 1) as usize;
        metadata.insert("agent".into(), json!("planner"));
        metadata.insert("notes".into(), json!("n".repeat(extra)));
        metadata.insert("turn".into(), json!(i));
        backend
            .create_session(&format!("session-{i:06}"), "user-1", &metadata)
            .await
            .expect("create");
    }
    let layer = CacheLayer::new().with_max_bytes(bound);
    let storage = Arc::new(tower_layer::Layer::layer(&layer, backend));
    // Warm up everything that is allocated once (runtime, moka's structures), then
    // measure from an empty cache.
    storage.get_session("session-000000").await.expect("read");
    layer.invalidate_all();
    layer.run_pending_tasks().await;
    let before = live();
    for _ in 0..sessions * 4 {
        let id = format!("session-{:06}", rng.below(sessions as u64));
        let session = storage.get_session(&id).await.expect("read");
        assert!(session.is_some(), "{id} must exist");
    }
    layer.run_pending_tasks().await;
    let held = live() - before;
    let stats = layer.stats();
    println!(
        "bound={bound} bytes, heap held by the cache={held} bytes ({:.1}% of the bound), \
         entries={}, weighted_size={}, sessions={sessions}, metadata up to {max_extra} bytes",
        held as f64 * 100.0 / bound as f64,
        stats.entries,
        stats.weighted_size,
    );
    assert!(stats.evictions > 0, "the workload must overflow the cache");
    (held, stats.entries)
}

fn check(bound: u64, held: isize, entries: u64) {
    assert!(
        held as f64 <= bound as f64 * 1.1,
        "a cache bounded at {bound} bytes holds {held} bytes of heap ({entries} entries)"
    );
    assert!(
        held as f64 >= bound as f64 * 0.9,
        "a cache bounded at {bound} bytes holds only {held} bytes ({entries} entries): \
         the weight overestimates what an entry costs"
    );
}

// One test: the allocator counts the whole process, so nothing may run beside it.
#[tokio::test(flavor = "current_thread")]
async fn a_byte_bounded_cache_holds_within_ten_percent_of_its_bound() {
    // Small sessions (bookkeeping dominates) and sessions of up to 4 KiB (values do).
    for (bound, sessions, max_extra) in [(4 << 20, 40_000, 64), (8 << 20, 20_000, 4_000)] {
        let (held, entries) = cache_heap(bound, sessions, max_extra).await;
        check(bound, held, entries);
    }
}
