//! A moka-backed read cache in front of any backend.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::future::Cache;
use moka::notification::RemovalCause;
use serde_json::{json, Value};

use super::names::{self, LazyGauge, Tally};
use crate::error::{Result, StorageError};
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, IdPage, Message, Metadata, MetricsReport,
    NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionPage, SessionQuery,
    SessionUpdate, TaskWrites, WriteInput,
};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
};
use crate::validate;

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
    /// ([`StorageError::may_have_applied`]: a timeout, a lost connection). Such a write
    /// can land after the cache was invalidated, so until the window has passed reads of
    /// that session or thread go to the store and nothing read is cached. Set it longer
    /// than the longest time your store may take to finish a write its caller left
    /// (SQLite's busy timeout, redis-rs' response timeout, PostgreSQL's statement
    /// timeout).
    pub fn with_unknown_outcome_window(self, window: Duration) -> Self {
        self.configured(|c| c.unknown_outcome_window = window)
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
        }
    }
}

/// A backend behind a [`CacheLayer`]: the wrapper the layer creates.
#[derive(Debug)]
pub struct Cached<B> {
    inner: B,
    shared: Arc<Shared>,
}

impl<B: Clone> Clone for Cached<B> {
    fn clone(&self) -> Self {
        Cached {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<B> Cached<B> {
    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

// ---------------------------------------------------------------------------------------
// Keys, entries and generation stamps

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Session(String),
    Context(String),
    Checkpoint {
        thread: String,
        ns: String,
        /// `None`: the latest of the thread and namespace.
        id: Option<String>,
    },
}

impl Key {
    fn checkpoint(thread: &str, ns: &str, id: Option<&str>) -> Key {
        Key::Checkpoint {
            thread: thread.to_owned(),
            ns: ns.to_owned(),
            id: id.map(str::to_owned),
        }
    }

    /// The id whose writes change the entry: the session, or the checkpoint's thread.
    fn owner(&self) -> &str {
        match self {
            Key::Session(id) | Key::Context(id) => id,
            Key::Checkpoint { thread, .. } => thread,
        }
    }
}

#[derive(Debug, Clone)]
enum CachedValue {
    Session(Option<Session>),
    Context(Option<Value>),
    Checkpoint(Option<Checkpoint>),
}

/// The generations an entry was loaded under: the global epoch (bumped by cleanup,
/// initialize and close) and its owner's stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    epoch: u64,
    stripe: u64,
}

impl Stamp {
    /// Whether a value loaded under `self` began its load after every write that had
    /// completed when `start` was read.
    fn covers(self, start: Stamp) -> bool {
        self.epoch >= start.epoch && self.stripe >= start.stripe
    }
}

#[derive(Debug)]
struct Entry {
    stamp: Stamp,
    value: CachedValue,
}

/// A read result the cache can hold.
trait Cacheable: Sized + Send + 'static {
    fn into_cached(self) -> CachedValue;
    fn from_cached(value: &CachedValue) -> Option<Self>;
}

/// Each cacheable read maps to one variant of [`CachedValue`].
macro_rules! cacheable {
    ($($ty:ty => $variant:ident),* $(,)?) => {$(
        impl Cacheable for $ty {
            fn into_cached(self) -> CachedValue {
                CachedValue::$variant(self)
            }
            fn from_cached(value: &CachedValue) -> Option<Self> {
                match value {
                    CachedValue::$variant(v) => Some(v.clone()),
                    _ => None,
                }
            }
        }
    )*};
}

cacheable!(
    Option<Session> => Session,
    Option<Value> => Context,
    Option<Checkpoint> => Checkpoint,
);

fn weigh(key: &Key, entry: &Arc<Entry>) -> u32 {
    let value = match &entry.value {
        CachedValue::Session(v) => v.as_ref().map_or(0, heap::session),
        CachedValue::Context(v) => v.as_ref().map_or(0, heap::value),
        CachedValue::Checkpoint(v) => v.as_ref().map_or(0, heap::checkpoint),
    };
    u32::try_from(value + heap::key(key) + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
}

/// Estimates of the heap memory a cached value holds, so a byte bound bounds memory
/// rather than some encoding of it. Strings and vectors are blocks of their length;
/// maps are B-tree nodes. A block costs what glibc's malloc spends on it: its size plus
/// an 8-byte header, rounded up to 16 bytes, at least 32.
mod heap {
    use std::mem::size_of;

    use serde_json::{Map, Value};

    use super::Key;
    use crate::model::{Checkpoint, Session};

    /// Entries a B-tree node holds at most (std's `B - 1`).
    const NODE_CAPACITY: usize = 11;
    /// Entries per node on average: nodes split in half when full, so they run between
    /// half and completely full.
    const NODE_FILL: usize = 8;

    fn block(size: usize) -> usize {
        if size == 0 {
            0
        } else {
            ((size + 8 + 15) & !15).max(32)
        }
    }

    fn string(s: &str) -> usize {
        block(s.len())
    }

    pub(super) fn value(v: &Value) -> usize {
        match v {
            Value::String(s) => string(s),
            Value::Array(items) => {
                block(items.len() * size_of::<Value>()) + items.iter().map(value).sum::<usize>()
            }
            Value::Object(m) => map(m),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
    }

    pub(super) fn map(m: &Map<String, Value>) -> usize {
        if m.is_empty() {
            return 0;
        }
        let node = block(NODE_CAPACITY * (size_of::<String>() + size_of::<Value>()) + 16);
        m.len().div_ceil(NODE_FILL) * node
            + m.iter().map(|(k, v)| string(k) + value(v)).sum::<usize>()
    }

    pub(super) fn session(s: &Session) -> usize {
        string(&s.session_id) + string(&s.user_id) + string(&s.status) + map(&s.metadata)
    }

    pub(super) fn checkpoint(c: &Checkpoint) -> usize {
        string(&c.thread_id)
            + string(&c.checkpoint_ns)
            + string(&c.checkpoint_id)
            + c.parent_checkpoint_id.as_deref().map_or(0, string)
            + value(&c.data)
            + map(&c.metadata)
    }

    pub(super) fn key(k: &Key) -> usize {
        match k {
            Key::Session(id) | Key::Context(id) => string(id),
            Key::Checkpoint { thread, ns, id } => {
                string(thread) + string(ns) + id.as_deref().map_or(0, string)
            }
        }
    }
}

/// FNV-1a: a stable hash of an owner id onto a stripe.
fn stripe_of(owner: &str) -> usize {
    (crate::fnv::Fnv::hash(owner.as_bytes()) as usize) & (STRIPES - 1)
}

#[derive(Debug)]
struct Counters {
    hits: Tally,
    misses: Tally,
    loads: Tally,
    stale: Tally,
    evictions: Tally,
    entries: LazyGauge,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            hits: Tally::reported(names::CACHE_HITS_TOTAL, &[]),
            misses: Tally::reported(names::CACHE_MISSES_TOTAL, &[]),
            loads: Tally::local(),
            stale: Tally::local(),
            evictions: Tally::reported(names::CACHE_EVICTIONS_TOTAL, &[]),
            entries: LazyGauge::default(),
        }
    }
}

fn bump(counter: &Tally) {
    counter.add(1);
}

/// The state every wrapper of one layer shares.
struct Shared {
    cache: Cache<Key, Arc<Entry>>,
    epoch: AtomicU64,
    stripes: Box<[AtomicU64]>,
    /// Per stripe, until when (in ms after `origin`, 0: not) reads bypass the cache
    /// because a write's outcome is unknown; `unsettled_all` for every stripe.
    unsettled: Box<[AtomicU64]>,
    unsettled_all: AtomicU64,
    origin: Instant,
    counters: Arc<Counters>,
    config: CacheConfig,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheState")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Shared {
    fn new(config: &CacheConfig) -> Self {
        let counters = Arc::new(Counters::default());
        let listener_counters = counters.clone();
        let mut builder = Cache::builder().eviction_listener(
            move |_key: Arc<Key>, _value: Arc<Entry>, cause: RemovalCause| {
                if cause.was_evicted() {
                    bump(&listener_counters.evictions);
                }
            },
        );
        builder = match config.bound {
            Bound::Entries(n) => builder.max_capacity(n),
            Bound::Bytes(n) => builder.max_capacity(n).weigher(weigh),
        };
        if let Some(ttl) = config.time_to_live {
            builder = builder.time_to_live(ttl);
        }
        if let Some(tti) = config.time_to_idle {
            builder = builder.time_to_idle(tti);
        }
        Shared {
            cache: builder.build(),
            epoch: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            unsettled: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            unsettled_all: AtomicU64::new(0),
            origin: Instant::now(),
            counters,
            config: config.clone(),
        }
    }

    fn stamp(&self, stripe: usize) -> Stamp {
        Stamp {
            epoch: self.epoch.load(Ordering::SeqCst),
            stripe: self.stripes[stripe].load(Ordering::SeqCst),
        }
    }

    fn now_ms(&self) -> u64 {
        // At least 1, so that 0 keeps meaning "settled".
        (self.origin.elapsed().as_millis() as u64).max(1)
    }

    /// Makes reads of `stripe` (every stripe with `None`) bypass the cache for the
    /// unknown-outcome window.
    fn unsettle(&self, stripe: Option<usize>) {
        let until = self.now_ms() + self.config.unknown_outcome_window.as_millis() as u64;
        let slot = match stripe {
            Some(s) => &self.unsettled[s],
            None => &self.unsettled_all,
        };
        slot.fetch_max(until, Ordering::SeqCst);
    }

    /// Whether reads of `stripe` must bypass the cache now. One load each on the usual
    /// path; the clock is read only while a window is open, and a window found expired
    /// is closed (unless a newer one replaced it meanwhile).
    fn is_unsettled(&self, stripe: usize) -> bool {
        let open = |slot: &AtomicU64| {
            let until = slot.load(Ordering::SeqCst);
            if until == 0 {
                return false;
            }
            if self.now_ms() < until {
                return true;
            }
            let _ = slot.compare_exchange(until, 0, Ordering::SeqCst, Ordering::SeqCst);
            false
        };
        open(&self.unsettled[stripe]) || open(&self.unsettled_all)
    }

    fn invalidate_everything(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
    }

    fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.get(),
            misses: c.misses.get(),
            loads: c.loads.get(),
            stale: c.stale.get(),
            evictions: c.evictions.get(),
            entries: self.cache.entry_count(),
            weighted_size: self.cache.weighted_size(),
        }
    }

    fn figures(&self) -> Metadata {
        let s = self.stats();
        let mut m = Metadata::new();
        m.insert("hits".into(), json!(s.hits));
        m.insert("misses".into(), json!(s.misses));
        m.insert("hit_rate".into(), json!(s.hit_rate()));
        m.insert("loads".into(), json!(s.loads));
        m.insert("stale".into(), json!(s.stale));
        m.insert("evictions".into(), json!(s.evictions));
        m.insert("entries".into(), json!(s.entries));
        m.insert("weighted_size".into(), json!(s.weighted_size));
        match self.config.bound {
            Bound::Entries(n) => m.insert("max_entries".into(), json!(n)),
            Bound::Bytes(n) => m.insert("max_bytes".into(), json!(n)),
        };
        if let Some(ttl) = self.config.time_to_live {
            m.insert("time_to_live_secs".into(), json!(ttl.as_secs_f64()));
        }
        if let Some(tti) = self.config.time_to_idle {
            m.insert("time_to_idle_secs".into(), json!(tti.as_secs_f64()));
        }
        m
    }

    /// Reads `key` through the cache, loading it with `fetch` on a miss.
    //
    // Why the stamps: invalidating after a write is not enough. A reader can miss, load
    // the old value, and insert it after a writer's invalidation, leaving it cached
    // until it expires. So each entry carries the generations read *before* its load,
    // and each write bumps its owner's generation *after* the inner call returns. An
    // entry whose load began before a write completed has an older stamp, and no reader
    // that starts after that write accepts it. The check is repeated after
    // `try_get_with`, because moka coalesces concurrent misses: a caller that starts
    // after a write may join a load that began before it and be handed the old value.
    // Then it drops the entry and loads again, a bounded number of times, before it
    // reads the inner backend directly.
    async fn read<T, F, Fut>(&self, key: Key, fetch: F) -> Result<T>
    where
        T: Cacheable,
        F: Fn() -> Fut + Send + Sync,
        Fut: Future<Output = Result<T>> + Send,
    {
        let stripe = stripe_of(key.owner());
        // The stamp before the window check: a write that ends after the stamp was read
        // outdates what this read loads; one that ended before it opened its window
        // first (see `Invalidation::bump`), and the check below sees it.
        let start = self.stamp(stripe);
        if self.is_unsettled(stripe) {
            bump(&self.counters.misses);
            bump(&self.counters.loads);
            return fetch().await;
        }
        if let Some(entry) = self.cache.get(&key).await {
            if entry.stamp.covers(start) {
                if let Some(v) = T::from_cached(&entry.value) {
                    bump(&self.counters.hits);
                    return Ok(v);
                }
            }
            bump(&self.counters.stale);
            self.cache.invalidate(&key).await;
        }
        bump(&self.counters.misses);
        self.counters
            .entries
            .set(names::CACHE_ENTRIES, self.cache.entry_count() as f64);
        for _ in 0..ATTEMPTS {
            let stamp = self.stamp(stripe);
            if self.is_unsettled(stripe) {
                break;
            }
            let mut own_error = None;
            let loaded = self
                .cache
                .try_get_with(key.clone(), async {
                    bump(&self.counters.loads);
                    match fetch().await {
                        Ok(v) => Ok(Arc::new(Entry {
                            stamp,
                            value: v.into_cached(),
                        })),
                        Err(e) => {
                            // Callers that joined this load get a copy; this caller
                            // keeps the original with its source.
                            let copy = StorageError::duplicate(&e);
                            own_error = Some(e);
                            Err(copy)
                        }
                    }
                })
                .await;
            match loaded {
                Err(shared) => {
                    return Err(own_error.unwrap_or_else(|| StorageError::duplicate(&shared)))
                }
                Ok(entry) => {
                    if entry.stamp.covers(start) {
                        if let Some(v) = T::from_cached(&entry.value) {
                            return Ok(v);
                        }
                    }
                    bump(&self.counters.stale);
                    self.cache.invalidate(&key).await;
                }
            }
        }
        bump(&self.counters.loads);
        fetch().await
    }

    /// Starts a write that changes the values of `owners`; see [`Invalidation`].
    fn write<'a>(
        &'a self,
        owners: impl IntoIterator<Item = &'a str>,
        keys: Vec<Key>,
    ) -> Invalidation<'a> {
        Invalidation {
            shared: self,
            scope: Scope::Stripes(owners.into_iter().map(stripe_of).collect()),
            keys,
            done: false,
        }
    }

    /// Starts a write that may change any value.
    fn write_all(&self) -> Invalidation<'_> {
        Invalidation {
            shared: self,
            scope: Scope::All,
            keys: Vec::new(),
            done: false,
        }
    }
}

enum Scope {
    Stripes(Vec<usize>),
    All,
}

/// Outdates the entries a write touches once the write is over: on
/// [`Invalidation::finish`] after the inner call returned (success or failure), or on
/// drop if the caller gave up on the call (an outer timeout), since the write may have
/// applied anyway.
struct Invalidation<'a> {
    shared: &'a Shared,
    scope: Scope,
    keys: Vec<Key>,
    done: bool,
}

impl Invalidation<'_> {
    /// Outdates what the write touched; with `unknown`, also makes reads of it bypass
    /// the cache for a while, since the write may still land.
    fn bump(&mut self, unknown: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        match &self.scope {
            Scope::Stripes(stripes) => {
                for s in stripes {
                    if unknown {
                        self.shared.unsettle(Some(*s));
                    }
                    self.shared.stripes[*s].fetch_add(1, Ordering::SeqCst);
                }
            }
            Scope::All => {
                if unknown {
                    self.shared.unsettle(None);
                }
                self.shared.invalidate_everything();
            }
        }
    }

    /// Bumps the generations, then frees the entries known to be outdated (the others
    /// are dropped when next read, or evicted).
    async fn finish<T>(mut self, result: Result<T>) -> Result<T> {
        self.bump(matches!(&result, Err(e) if e.may_have_applied()));
        for key in &self.keys {
            self.shared.cache.invalidate(key).await;
        }
        result
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        // Not finished: the caller gave up on the write, which may land any time.
        self.bump(true);
    }
}

// ---------------------------------------------------------------------------------------
// The contract

#[async_trait]
impl<B: StorageBackend> SessionStorage for Cached<B> {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        let w = self
            .shared
            .write([session_id], vec![Key::Session(session_id.to_owned())]);
        w.finish(
            self.inner
                .create_session(session_id, user_id, metadata)
                .await,
        )
        .await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        self.shared
            .read(Key::Session(session_id.to_owned()), || {
                self.inner.get_session(session_id)
            })
            .await
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        let w = self
            .shared
            .write([session_id], vec![Key::Session(session_id.to_owned())]);
        w.finish(self.inner.update_session(session_id, update).await)
            .await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        let w = self
            .shared
            .write([session_id], vec![Key::Session(session_id.to_owned())]);
        w.finish(self.inner.end_session(session_id, status).await)
            .await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        let w = self.shared.write(
            sessions.iter().map(|s| s.session_id.as_str()),
            sessions
                .iter()
                .map(|s| Key::Session(s.session_id.clone()))
                .collect(),
        );
        w.finish(self.inner.batch_create_sessions(sessions).await)
            .await
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        let keys = vec![
            Key::Session(session_id.to_owned()),
            Key::Context(session_id.to_owned()),
        ];
        let w = self.shared.write([session_id], keys);
        w.finish(self.inner.delete_session(session_id).await).await
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        let w = self.shared.write(
            sessions.iter().map(|s| s.session_id.as_str()),
            sessions
                .iter()
                .map(|s| Key::Session(s.session_id.clone()))
                .collect(),
        );
        w.finish(self.inner.restore_sessions(sessions).await).await
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        // Input the inner backend would refuse (or an empty batch, which only tells
        // whether it is open) goes to it whole, so the answer is its own.
        if session_ids.is_empty() || validate::session_ids(session_ids).is_err() {
            return self.inner.batch_get_sessions(session_ids).await;
        }
        let shared = &self.shared;
        let mut out = Vec::with_capacity(session_ids.len());
        let mut missing = Vec::new();
        for (i, id) in session_ids.iter().enumerate() {
            let key = Key::Session(id.clone());
            let stripe = stripe_of(id);
            let start = shared.stamp(stripe);
            if shared.is_unsettled(stripe) {
                // Read from the store and not cached, as in `Shared::read`.
                bump(&shared.counters.misses);
                out.push(None);
                missing.push((i, None, start));
                continue;
            }
            let hit = match shared.cache.get(&key).await {
                Some(entry) if entry.stamp.covers(start) => {
                    <Option<Session> as Cacheable>::from_cached(&entry.value)
                }
                Some(_) => {
                    bump(&shared.counters.stale);
                    shared.cache.invalidate(&key).await;
                    None
                }
                None => None,
            };
            match hit {
                Some(v) => {
                    bump(&shared.counters.hits);
                    out.push(v);
                }
                None => {
                    bump(&shared.counters.misses);
                    out.push(None);
                    missing.push((i, Some(key), start));
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let ids: Vec<String> = missing
            .iter()
            .map(|(i, ..)| session_ids[*i].clone())
            .collect();
        bump(&shared.counters.loads);
        let loaded = self.inner.batch_get_sessions(&ids).await?;
        // Each value is stamped with the generations read before the load, as in
        // `Shared::read`, so one outdated by a concurrent write is never served later.
        for ((i, key, stamp), value) in missing.into_iter().zip(loaded) {
            let Some(key) = key else {
                out[i] = value;
                continue;
            };
            out[i] = value.clone();
            let entry = Arc::new(Entry {
                stamp,
                value: value.into_cached(),
            });
            shared.cache.insert(key, entry).await;
        }
        Ok(out)
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        self.inner.list_sessions(query).await
    }
}

#[async_trait]
impl<B: StorageBackend> ConversationStorage for Cached<B> {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        let w = self
            .shared
            .write([session_id], vec![Key::Session(session_id.to_owned())]);
        w.finish(
            self.inner
                .add_conversation_message(session_id, message)
                .await,
        )
        .await
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        let mut ids: Vec<&str> = messages.iter().map(|(s, _)| s.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let keys = ids.iter().map(|s| Key::Session((*s).to_owned())).collect();
        let w = self.shared.write(ids, keys);
        w.finish(self.inner.batch_add_conversation_messages(messages).await)
            .await
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.inner.get_conversation_history(session_id, limit).await
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        // Restoring leaves the session record alone; nothing cached changes.
        self.inner.restore_messages(session_id, messages).await
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.inner
            .get_conversation_range(session_id, offset, limit)
            .await
    }
}

#[async_trait]
impl<B: StorageBackend> CheckpointStorage for Cached<B> {
    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        let (thread, ns) = (&checkpoint.thread_id, &checkpoint.checkpoint_ns);
        let keys = vec![
            Key::checkpoint(thread, ns, Some(&checkpoint.checkpoint_id)),
            Key::checkpoint(thread, ns, None),
        ];
        let w = self.shared.write([thread.as_str()], keys);
        w.finish(self.inner.store_checkpoint(checkpoint).await)
            .await
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        let keys = checkpoints
            .iter()
            .flat_map(|c| {
                [
                    Key::checkpoint(&c.thread_id, &c.checkpoint_ns, Some(&c.checkpoint_id)),
                    Key::checkpoint(&c.thread_id, &c.checkpoint_ns, None),
                ]
            })
            .collect();
        let w = self
            .shared
            .write(checkpoints.iter().map(|c| c.thread_id.as_str()), keys);
        w.finish(self.inner.restore_checkpoints(checkpoints).await)
            .await
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        self.shared
            .read(
                Key::checkpoint(thread_id, checkpoint_ns, checkpoint_id),
                || {
                    self.inner
                        .get_checkpoint(thread_id, checkpoint_ns, checkpoint_id)
                },
            )
            .await
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        self.inner
            .list_checkpoints(thread_id, checkpoint_ns, filter)
            .await
    }

    async fn put_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<()> {
        self.inner
            .put_writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)
            .await
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        self.inner.batch_put_writes(items).await
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        self.inner
            .get_writes(thread_id, checkpoint_ns, checkpoint_id)
            .await
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        // Every checkpoint entry of the thread, in any namespace, shares the thread's
        // stripe: bumping it outdates them all without enumerating them.
        let w = self.shared.write([thread_id], Vec::new());
        w.finish(self.inner.delete_thread(thread_id).await).await
    }

    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.inner.list_threads(after, limit).await
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        self.inner.list_checkpoint_namespaces(thread_id).await
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        self.inner
            .list_write_checkpoints(thread_id, checkpoint_ns)
            .await
    }
}

#[async_trait]
impl<B: StorageBackend> TaskContextStorage for Cached<B> {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.inner.list_task_contexts(after, limit).await
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        self.shared
            .read(Key::Context(session_id.to_owned()), || {
                self.inner.get_task_context(session_id)
            })
            .await
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        let w = self
            .shared
            .write([session_id], vec![Key::Context(session_id.to_owned())]);
        w.finish(self.inner.store_task_context(session_id, context).await)
            .await
    }
}

#[async_trait]
impl<B: StorageBackend> StorageBackend for Cached<B> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn store_id(&self) -> Option<String> {
        self.inner.store_id()
    }

    async fn initialize(&self) -> Result<()> {
        // A schema migration may rewrite records.
        let w = self.shared.write_all();
        w.finish(self.inner.initialize().await).await
    }

    async fn close(&self) -> Result<()> {
        let w = self.shared.write_all();
        w.finish(self.inner.close().await).await
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let inner = self.inner.health_check().await?;
        let s = self.shared.stats();
        let mut details = Metadata::new();
        details.insert("entries".into(), json!(s.entries));
        details.insert("weighted_size".into(), json!(s.weighted_size));
        details.insert("hit_rate".into(), json!(s.hit_rate()));
        details.insert("hits".into(), json!(s.hits));
        details.insert("misses".into(), json!(s.misses));
        details.insert("evictions".into(), json!(s.evictions));
        Ok(HealthReport {
            component: "cache".to_owned(),
            status: inner.status,
            latency: started.elapsed(),
            checked_at: now(),
            details,
            components: vec![inner],
        })
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        let inner = self.inner.get_metrics().await?;
        Ok(MetricsReport {
            component: "cache".to_owned(),
            values: self.shared.figures(),
            components: vec![inner],
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        // Any session or context may be gone: outdate everything.
        let w = self.shared.write_all();
        w.finish(self.inner.cleanup_expired_sessions(max_idle).await)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_cover_only_later_generations() {
        let s = |epoch, stripe| Stamp { epoch, stripe };
        assert!(s(1, 5).covers(s(1, 5)));
        assert!(s(2, 6).covers(s(1, 5)));
        assert!(!s(1, 4).covers(s(1, 5)));
        assert!(!s(0, 9).covers(s(1, 5)));
    }

    #[test]
    fn stripes_are_stable_and_in_range() {
        assert_eq!(stripe_of("session-1"), stripe_of("session-1"));
        assert!(stripe_of("") < STRIPES);
        assert!(stripe_of("a long thread id") < STRIPES);
    }
}
