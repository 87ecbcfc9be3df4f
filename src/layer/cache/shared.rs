//! The state every wrapper of one layer shares, its counters, and the invalidation
//! that outdates entries a write touches.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use moka::future::Cache;
use moka::notification::RemovalCause;
use serde_json::json;

use super::entry::{stripe_of, weigh, Cacheable, Entry, Key, Stamp};
use super::{Bound, CacheConfig, CacheStats, ATTEMPTS, STRIPES};
use crate::error::{Result, StorageError};
use crate::layer::names::{self, LazyGauge, Tally};
use crate::model::Metadata;

#[derive(Debug)]
pub(super) struct Counters {
    pub(super) hits: Tally,
    pub(super) misses: Tally,
    pub(super) loads: Tally,
    pub(super) stale: Tally,
    pub(super) evictions: Tally,
    /// Sessions, task contexts and threads the change feed reported written.
    pub(super) remote_changes: Tally,
    /// Times the feed went down or missed changes, each emptying the cache.
    pub(super) feed_losses: Tally,
    pub(super) entries: LazyGauge,
    pub(super) feed_up: LazyGauge,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            hits: Tally::reported(names::CACHE_HITS_TOTAL, &[]),
            misses: Tally::reported(names::CACHE_MISSES_TOTAL, &[]),
            loads: Tally::local(),
            stale: Tally::local(),
            evictions: Tally::reported(names::CACHE_EVICTIONS_TOTAL, &[]),
            remote_changes: Tally::reported(names::CACHE_REMOTE_CHANGES_TOTAL, &[]),
            feed_losses: Tally::reported(names::CACHE_FEED_LOSSES_TOTAL, &[]),
            entries: LazyGauge::default(),
            feed_up: LazyGauge::default(),
        }
    }
}

/// The state every wrapper of one layer shares.
pub(super) struct Shared {
    pub(super) cache: Cache<Key, Arc<Entry>>,
    pub(super) epoch: AtomicU64,
    pub(super) stripes: Box<[AtomicU64]>,
    /// Per stripe, until when (in ms after `origin`, 0: not) reads bypass the cache
    /// because a write's outcome is unknown; `unsettled_all` for every stripe.
    pub(super) unsettled: Box<[AtomicU64]>,
    pub(super) unsettled_all: AtomicU64,
    pub(super) origin: Instant,
    /// The change feed's state: [`FEED_NONE`], [`FEED_DOWN`] or [`FEED_UP`].
    pub(super) feed: AtomicU8,
    /// Whether the feed has been up since it was followed.
    pub(super) feed_was_up: AtomicBool,
    pub(super) counters: Arc<Counters>,
    pub(super) config: CacheConfig,
}

/// No feed followed (none configured, none offered, or not yet subscribed).
pub(super) const FEED_NONE: u8 = 0;
/// A feed is followed and down: reads bypass the cache.
pub(super) const FEED_DOWN: u8 = 1;
/// A feed is followed and up.
pub(super) const FEED_UP: u8 = 2;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheState")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Shared {
    pub(super) fn new(config: &CacheConfig) -> Self {
        let counters = Arc::new(Counters::default());
        let listener_counters = counters.clone();
        let mut builder = Cache::builder().eviction_listener(
            move |_key: Arc<Key>, _value: Arc<Entry>, cause: RemovalCause| {
                if cause.was_evicted() {
                    listener_counters.evictions.add(1);
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
            feed: AtomicU8::new(FEED_NONE),
            feed_was_up: AtomicBool::new(false),
            counters,
            config: config.clone(),
        }
    }

    pub(super) fn stamp(&self, stripe: usize) -> Stamp {
        Stamp {
            epoch: self.epoch.load(Ordering::SeqCst),
            stripe: self.stripes[stripe].load(Ordering::SeqCst),
        }
    }

    pub(super) fn now_ms(&self) -> u64 {
        // At least 1, so that 0 keeps meaning "settled".
        (self.origin.elapsed().as_millis() as u64).max(1)
    }

    /// Makes reads of `stripe` (every stripe with `None`) bypass the cache for the
    /// unknown-outcome window.
    pub(super) fn unsettle(&self, stripe: Option<usize>) {
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
    pub(super) fn is_unsettled(&self, stripe: usize) -> bool {
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

    /// The change feed's state as reports show it: `up`, `down` or `none`.
    pub(super) fn feed_name(&self) -> &'static str {
        match self.feed.load(Ordering::SeqCst) {
            FEED_UP => "up",
            FEED_DOWN => "down",
            _ => "none",
        }
    }

    /// Whether the followed change feed is down, so nothing cached can be trusted.
    pub(super) fn feed_is_down(&self) -> bool {
        self.feed.load(Ordering::SeqCst) == FEED_DOWN
    }

    /// Outdates what a write of another process touched, as a local write does once
    /// it returns (see [`Invalidation`]).
    pub(super) fn changed_elsewhere(&self, owner: &str) {
        self.stripes[stripe_of(owner)].fetch_add(1, Ordering::SeqCst);
        self.counters.remote_changes.add(1);
    }

    pub(super) fn invalidate_everything(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
    }

    pub(super) fn stats(&self) -> CacheStats {
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

    pub(super) fn figures(&self) -> Metadata {
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
        m.insert("feed".into(), json!(self.feed_name()));
        m.insert(
            "remote_changes".into(),
            json!(self.counters.remote_changes.get()),
        );
        m.insert("feed_losses".into(), json!(self.counters.feed_losses.get()));
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
    pub(super) async fn read<T, F, Fut>(&self, key: Key, fetch: F) -> Result<T>
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
        if self.is_unsettled(stripe) || self.feed_is_down() {
            self.counters.misses.add(1);
            self.counters.loads.add(1);
            return fetch().await;
        }
        if let Some(entry) = self.cache.get(&key).await {
            if entry.stamp.covers(start) {
                if let Some(v) = T::from_cached(&entry.value) {
                    self.counters.hits.add(1);
                    return Ok(v);
                }
            }
            self.counters.stale.add(1);
            self.cache.invalidate(&key).await;
        }
        self.counters.misses.add(1);
        self.counters
            .entries
            .set(names::CACHE_ENTRIES, self.cache.entry_count() as f64);
        for _ in 0..ATTEMPTS {
            let stamp = self.stamp(stripe);
            if self.is_unsettled(stripe) || self.feed_is_down() {
                break;
            }
            let mut own_error = None;
            let loaded = self
                .cache
                .try_get_with(key.clone(), async {
                    self.counters.loads.add(1);
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
                    self.counters.stale.add(1);
                    self.cache.invalidate(&key).await;
                }
            }
        }
        self.counters.loads.add(1);
        fetch().await
    }

    /// Starts a write that changes the values of `owners`; see [`Invalidation`].
    pub(super) fn write<'a>(
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
    pub(super) fn write_all(&self) -> Invalidation<'_> {
        Invalidation {
            shared: self,
            scope: Scope::All,
            keys: Vec::new(),
            done: false,
        }
    }
}

pub(super) enum Scope {
    Stripes(Vec<usize>),
    All,
}

/// Outdates the entries a write touches once the write is over: on
/// [`Invalidation::finish`] after the inner call returned (success or failure), or on
/// drop if the caller gave up on the call (an outer timeout), since the write may have
/// applied anyway.
pub(super) struct Invalidation<'a> {
    pub(super) shared: &'a Shared,
    pub(super) scope: Scope,
    pub(super) keys: Vec<Key>,
    pub(super) done: bool,
}

impl Invalidation<'_> {
    /// Outdates what the write touched; with `unknown`, also makes reads of it bypass
    /// the cache for a while, since the write may still land.
    pub(super) fn bump(&mut self, unknown: bool) {
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
    pub(super) async fn finish<T>(mut self, result: Result<T>) -> Result<T> {
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
