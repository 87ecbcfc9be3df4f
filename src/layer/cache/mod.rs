//! A moka-backed read cache in front of any backend.
//!
//! `mod.rs` holds the layer, its options and the wrapper type; `settings` its table in
//! a stack file; `entry` the cache's keys, values, generation stamps and weights;
//! `shared` the state every wrapper of a layer shares and how writes outdate entries;
//! `storage` the trait implementations.

mod coherence;
mod entry;
mod settings;
mod shared;
mod storage;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use self::settings::CacheSettings;
use self::shared::Shared;

/// Number of generation stripes. A power of two; owners hash onto them.
const STRIPES: usize = 4096;
/// How many times a read retries after being handed a stale entry before it reads the
/// inner backend directly.
const ATTEMPTS: usize = 3;
/// Heap bytes an entry costs beyond its key and value: the `Arc<Entry>` block and moka's
/// bookkeeping (its entry, key and info `Arc`s, hash-table bucket, and the access- and
/// write-order queue nodes). Measured with a counting allocator: about 620 bytes;
/// tests/cache_memory.rs fails if the estimate drifts by more than 10%.
const ENTRY_OVERHEAD: usize = 640;

/// Caches reads of sessions, task context and checkpoints in a [moka] cache shared by
/// every wrapper the layer creates; everything else passes straight through.
///
/// Cached reads: `get_session` (and `batch_get_sessions`, which serves the ids it holds
/// and fetches the rest in one inner call), `get_task_context`, and `get_checkpoint` by
/// id and for the latest checkpoint (`checkpoint_id = None`). Missing records (`None`)
/// are cached too. Concurrent misses of one key make one inner call.
///
/// Every write made through the layer that can change a cached value invalidates it,
/// whether it succeeded or failed (a failed write may have partly applied): session
/// writes and message appends (they move `updated_at`) invalidate the session,
/// `store_task_context` the context, `store_checkpoint` the checkpoint and the latest
/// of its thread and namespace, `delete_thread` every checkpoint of the thread, and
/// `cleanup_expired_sessions`, `initialize` and `close` everything. A read never
/// returns a value older than the last write that completed through the layer before
/// the read began.
///
/// # When the caller gives up
///
/// A write whose caller drops it (an outer timeout, `select!`) or that fails with an
/// error after which the store may still apply it (a timeout inside the cache, a lost
/// connection) has an unknown outcome: the store may apply it after the cache was
/// invalidated, and a value read in between would then be served until it expires. So
/// such a write invalidates its session or thread *and* makes reads of it bypass the
/// cache, neither served nor filled, for
/// [`with_unknown_outcome_window`](CacheLayer::with_unknown_outcome_window) (30 s).
/// A dropped read leaves nothing behind: a load it started is stamped before it began
/// and is never served after a write that completed meanwhile. Writes made around the layer (another process, another stack on the
/// same database) are seen once the entry expires: set
/// [`CacheLayer::with_time_to_live`] to the staleness you accept.
///
/// Bounded by entry count ([`CacheLayer::with_max_entries`], 10 000 by default) or by
/// an estimate of the bytes held ([`CacheLayer::with_max_bytes`]), with a time to live
/// (5 minutes by default) and optionally a time to idle. Hits, misses, evictions and
/// size appear in `get_metrics`, in `health_check` details and in
/// [`CacheLayer::stats`].
///
/// # Order
///
/// Put the cache outermost so that hits skip retry, timeout and metrics. Outside a
/// failover layer it serves hits even while the primary is down, and it is invalidated
/// by writes whichever backend took them; inside, each backend path caches separately
/// and a switch to the fallback starts cold. Outside the batching writer, a write's
/// invalidation happens once its batch is stored, so reads never see the cache undo it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::time::Duration;
/// use aiecs_storage::layer::{CacheLayer, RetryLayer};
/// use aiecs_storage::{prelude::*, MemoryBackend, SessionUpdate};
/// use tower::ServiceBuilder;
///
/// let cache = CacheLayer::new()
///     .with_max_entries(50_000)
///     .with_time_to_live(Duration::from_secs(60));
/// let storage = ServiceBuilder::new()
///     .layer(cache.clone())
///     .layer(RetryLayer::new())
///     .service(MemoryBackend::new());
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// storage.get_session("s1").await?; // miss: read from the backend
/// storage.get_session("s1").await?; // hit
/// storage.update_session("s1", &SessionUpdate::new().increment_requests()).await?;
/// let s = storage.get_session("s1").await?.unwrap(); // invalidated by the update
/// assert_eq!(s.metrics.request_count, 1);
/// assert_eq!(cache.stats().hits, 1);
/// # Ok(()) }
/// ```
///
/// [moka]: https://docs.rs/moka
#[derive(Debug, Clone)]
pub struct CacheLayer {
    config: CacheConfig,
    // Built on first use from the final configuration; every `with_*` call starts a
    // new, unshared cache, so clones configured differently never share entries.
    shared: Arc<OnceLock<Arc<Shared>>>,
}

#[derive(Debug, Clone, Copy)]
enum Bound {
    Entries(u64),
    Bytes(u64),
}

#[derive(Debug, Clone)]
struct CacheConfig {
    bound: Bound,
    time_to_live: Option<Duration>,
    time_to_idle: Option<Duration>,
    unknown_outcome_window: Duration,
    coherent: bool,
}

/// A snapshot of a cache's figures, from [`CacheLayer::stats`].
///
/// `entries` and `weighted_size` are moka's estimates; they are exact after
/// [`CacheLayer::run_pending_tasks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that found no usable entry (absent, expired, or outdated by a write).
    pub misses: u64,
    /// Calls the cache made to the inner backend to fill misses (concurrent misses of
    /// one key share one).
    pub loads: u64,
    /// Entries found outdated by a write and dropped.
    pub stale: u64,
    /// Entries evicted for size or expired (explicit invalidations are not counted).
    pub evictions: u64,
    /// Entries held.
    pub entries: u64,
    /// With [`CacheLayer::with_max_bytes`], the estimated bytes held; otherwise equal
    /// to `entries`.
    pub weighted_size: u64,
}

impl CacheStats {
    /// `hits / (hits + misses)`, or 0 before any read.
    pub fn hit_rate(&self) -> f64 {
        let reads = self.hits + self.misses;
        if reads == 0 {
            0.0
        } else {
            self.hits as f64 / reads as f64
        }
    }
}

impl Default for CacheLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CacheLayer {
    /// Up to 10 000 entries, each kept at most 5 minutes.
    pub fn new() -> Self {
        CacheLayer {
            config: CacheConfig {
                bound: Bound::Entries(10_000),
                time_to_live: Some(Duration::from_secs(300)),
                time_to_idle: None,
                unknown_outcome_window: Duration::from_secs(30),
                coherent: true,
            },
            shared: Arc::default(),
        }
    }

    fn configured(mut self, change: impl FnOnce(&mut CacheConfig)) -> Self {
        change(&mut self.config);
        self.shared = Arc::default();
        self
    }

    /// Bounds the cache to `entries` entries (replaces a byte bound).
    pub fn with_max_entries(self, entries: u64) -> Self {
        self.configured(|c| c.bound = Bound::Entries(entries))
    }

    /// Bounds the heap memory the cache holds to about `bytes` bytes (replaces an entry
    /// bound). An entry weighs an estimate of the heap its key and value occupy plus
    /// moka's bookkeeping; measured with a counting allocator, a cache full of sessions
    /// of a few hundred bytes to 4 KiB holds within 10% of the bound.
    pub fn with_max_bytes(self, bytes: u64) -> Self {
        self.configured(|c| c.bound = Bound::Bytes(bytes))
    }

    /// Drops entries this long after they were loaded.
    pub fn with_time_to_live(self, ttl: Duration) -> Self {
        self.configured(|c| c.time_to_live = Some(ttl))
    }

    /// Drops entries not read for this long.
    pub fn with_time_to_idle(self, tti: Duration) -> Self {
        self.configured(|c| c.time_to_idle = Some(tti))
    }

    /// Sets how long reads bypass the cache for a session or thread after a write to it
    /// ended with its outcome unknown (30 s by default): the caller gave up on the call,
    /// or it failed with an error after which the store may still apply it
    /// ([`StorageError::may_have_applied`](crate::error::StorageError::may_have_applied)(crate::error::StorageError::may_have_applied): a timeout, a lost connection). Such a write
    /// can land after the cache was invalidated, so until the window has passed reads of
    /// that session or thread go to the store and nothing read is cached. Set it longer
    /// than the longest time your store may take to finish a write its caller left
    /// (SQLite's busy timeout, redis-rs' response timeout, PostgreSQL's statement
    /// timeout).
    ///
    /// [`StorageError::may_have_applied`]: crate::StorageError::may_have_applied
    pub fn with_unknown_outcome_window(self, window: Duration) -> Self {
        self.configured(|c| c.unknown_outcome_window = window)
    }

    /// Whether the cache follows the backend's change feed (default true), so that what
    /// other processes write to a shared store is dropped from this cache as it commits
    /// (see [`StorageBackend::changes`](crate::StorageBackend::changes)). While the feed
    /// is down, reads bypass the cache: a replica may be slower then, never stale. Over
    /// a backend without a feed (memory) this changes nothing.
    pub fn with_coherence(self, coherent: bool) -> Self {
        self.configured(|c| c.coherent = coherent)
    }

    /// The figures of the cache shared by every wrapper of this layer.
    pub fn stats(&self) -> CacheStats {
        self.state().stats()
    }

    /// Runs moka's pending maintenance (evictions, expirations, size accounting) now
    /// rather than on later calls. Useful before reading [`CacheLayer::stats`].
    pub async fn run_pending_tasks(&self) {
        self.state().cache.run_pending_tasks().await;
    }

    /// Drops every entry, for example after the data was changed around the layer.
    pub fn invalidate_all(&self) {
        self.state().invalidate_everything();
    }

    fn state(&self) -> &Arc<Shared> {
        self.shared
            .get_or_init(|| Arc::new(Shared::new(&self.config)))
    }
}

impl<B> tower_layer::Layer<B> for CacheLayer {
    type Service = Cached<B>;

    fn layer(&self, inner: B) -> Self::Service {
        Cached {
            inner,
            shared: self.state().clone(),
            following: Arc::default(),
        }
    }
}

/// A backend behind a [`CacheLayer`]: the wrapper the layer creates.
#[derive(Debug)]
pub struct Cached<B> {
    inner: B,
    shared: Arc<Shared>,
    /// Set once this wrapper subscribed to its backend's change feed (clones share it):
    /// when, or `None` for a backend without a feed.
    following: Arc<OnceLock<Option<std::time::Instant>>>,
}

impl<B: Clone> Clone for Cached<B> {
    fn clone(&self) -> Self {
        Cached {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            following: self.following.clone(),
        }
    }
}

impl<B> Cached<B> {
    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}
