//! Group commit: appends and pending writes gathered into batch calls.
//!
//! `mod.rs` holds the layer, its options, figures and the wrapper type; `settings` its
//! table in a stack file; `queue` the bounded queue callers put items on and the per-key
//! pending counts reads flush by; `writer` the task that gathers and writes batches;
//! `storage` the trait implementations.

mod queue;
mod settings;
mod storage;
mod writer;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use serde_json::json;

use self::queue::{Pending, Writer, WriterState};
pub use self::settings::BatchSettings;
use super::names::{self, LazyGauge, LazyHistogram, Tally};
use crate::model::Metadata;
use crate::validate;

/// A batching writer (group commit): `add_conversation_message` and `put_writes` calls
/// are gathered until [`with_max_batch`](BatchLayer::with_max_batch) items are waiting
/// or the [`with_linger`](BatchLayer::with_linger) time has passed since the first of
/// them, whichever comes first, and written with **one** call to the inner backend's
/// [`batch_add_conversation_messages`](crate::ConversationStorage::batch_add_conversation_messages)
/// (and one to [`batch_put_writes`](crate::CheckpointStorage::batch_put_writes)).
///
/// # Guarantees
///
/// - **A call returns only after its batch is stored**, with its own result: a missing
///   session is `NotFound` for that caller alone; when the whole batch call fails, every
///   caller in it gets an error of the same kind and message (nothing of that batch is
///   known to be stored). Nothing is acknowledged before it is stored, and the linger
///   timer always flushes.
/// - **Appends carry ids.** A message without an id gets one (UUID v7) before it is
///   queued, so a retried batch (or a retried call) cannot store it twice; pending writes
///   are keyed by `(thread, namespace, checkpoint, task, index)`. Both batch calls are
///   therefore idempotent.
/// - **Read your writes.** `get_conversation_history(session)` first flushes the
///   appends still queued for that session, and `get_writes(thread, ..)` the writes
///   queued for that thread; a per-key count makes this free when nothing is pending.
///   Every other operation passes straight through.
/// - **Order.** The queue is FIFO and a batch keeps its items in queue order, so appends
///   to one session made one after another are stored in that order.
/// - **Bounded.** At most [`with_max_queue`](BatchLayer::with_max_queue) items wait in
///   the queue (plus one batch being written); callers beyond that wait for room
///   (backpressure). Nothing is dropped. The bound counts items, not bytes.
/// - **`close()` drains.** Everything queued before `close()` is stored and its caller
///   answered before the inner backend is closed; later calls fail with
///   [`StorageError::Closed`](crate::error::StorageError::Closed)(crate::error::StorageError::Closed).
///
/// # When the caller gives up
///
/// The batch belongs to the writer task, not to its callers: a caller that drops its
/// call after the item was queued leaves the item to be stored with its batch (its
/// outcome is unknown to it, the others in the batch get their own answers, and the
/// pending counts drop back when the batch is written); a caller that drops before its
/// item is queued leaves nothing. A dropped `flush`, history read or `close` leaves the
/// queue as it was.
///
/// Each wrapper runs one background tokio task, started on first use (so a wrapper may
/// be built outside a runtime) and ended when the wrapper and its clones are dropped or
/// closed. If the task dies, waiting callers get an error instead of hanging and the
/// next call starts a new one. Counters ([`BatchStats`]) are kept in the layer, summed
/// over its wrappers, and reported by `get_metrics` and `health_check` (component
/// `batch`).
///
/// # Order with retry and timeout
///
/// Put the batching layer **outside** [`RetryLayer`](super::RetryLayer) (add it first):
/// `batch -> retry -> backend`. Then a failed batch call is retried by the retry layer
/// as the very same batch, with the same items and ids, once, for all its callers; the
/// ids make the repeat idempotent. With retry outside (`retry -> batch -> backend`) each
/// caller of a failed batch retries on its own and re-queues its item into some later
/// batch: correct too (the id was fixed before the first attempt), but N callers back
/// off separately and the retry budget includes queueing time. The same holds for
/// [`TimeoutLayer`](super::TimeoutLayer): inside, it bounds each batch call; outside, it
/// also counts the time a call waits in the queue (linger and backpressure).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use aiecs_storage::layer::{BatchLayer, RetryLayer};
/// use aiecs_storage::{prelude::*, MemoryBackend, NewMessage};
///
/// let batch = BatchLayer::new()
///     .with_max_batch(64)
///     .with_linger(Duration::from_millis(5))
///     .with_max_queue(1_000);
/// // batch -> retry -> memory: a failed batch is retried whole.
/// let storage = Arc::new(
///     tower::ServiceBuilder::new()
///         .layer(batch.clone())
///         .layer(RetryLayer::new())
///         .service(MemoryBackend::new()),
/// );
/// storage.create_session("s1", "alice", &Default::default()).await?;
///
/// // Ten concurrent appends share one batch call; each returns once it is stored.
/// let mut tasks = Vec::new();
/// for i in 0..10 {
///     let storage = storage.clone();
///     tasks.push(tokio::spawn(async move {
///         storage
///             .add_conversation_message("s1", &NewMessage::new("user", format!("m{i}")))
///             .await
///     }));
/// }
/// for task in tasks {
///     task.await.expect("task")?;
/// }
/// assert_eq!(storage.get_conversation_history("s1", 50).await?.len(), 10);
/// assert!(batch.stats().batches < 10);
///
/// storage.close().await?; // drains the queue, then closes the backend
/// # Ok(()) }
/// ```
///
/// [`StorageError::Closed`]: crate::StorageError::Closed
#[derive(Debug, Clone)]
pub struct BatchLayer {
    config: BatchConfig,
    counters: Arc<Counters>,
}

#[derive(Debug, Clone, Copy)]
struct BatchConfig {
    max_batch: usize,
    linger: Duration,
    max_queue: usize,
}

/// Upper bound of [`BatchLayer::with_max_queue`] (and of `max_queue` in stack files),
/// far below a semaphore's permit limit.
pub(crate) const MAX_QUEUE: usize = 1 << 24;

impl Default for BatchLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchLayer {
    /// Batches of up to 128 items, no linger, and room for 10 000 queued items.
    ///
    /// Without linger a batch is whatever queued while the previous batch was being
    /// written: a lone caller pays one write and no wait, and under load batches grow
    /// with the number of waiting callers. A fixed linger made 32 closed-loop callers
    /// slower than no batching at all (each batch waited 2 ms for items that could not
    /// come, their callers all being in it already).
    pub fn new() -> Self {
        BatchLayer {
            config: BatchConfig {
                max_batch: 128,
                linger: Duration::ZERO,
                max_queue: 10_000,
            },
            counters: Arc::default(),
        }
    }

    /// Sets how many items one batch holds at most (1 to
    /// [`validate::MAX_LIMIT`](crate::validate::MAX_LIMIT), the largest batch a backend
    /// accepts; values outside are clamped). A full batch is written at once.
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.config.max_batch = max_batch.clamp(1, validate::MAX_LIMIT);
        self
    }

    /// Sets how long the first item of a batch waits for others before the batch is
    /// written (default zero: write whatever is already queued without waiting). A
    /// linger helps open-loop writers that arrive faster than one write takes.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.config.linger = linger;
        self
    }

    /// Sets how many items may wait in the queue (at least 1); when it is full, callers
    /// wait for room.
    pub fn with_max_queue(mut self, max_queue: usize) -> Self {
        self.config.max_queue = max_queue.clamp(1, MAX_QUEUE);
        self
    }

    /// The counters of every wrapper made by this layer (and its clones) so far.
    pub fn stats(&self) -> BatchStats {
        self.counters.snapshot()
    }
}

impl<B> tower_layer::Layer<B> for BatchLayer {
    type Service = Batched<B>;

    fn layer(&self, inner: B) -> Self::Service {
        Batched {
            inner: Arc::new(inner),
            config: self.config,
            writer: Arc::new(Writer {
                state: Mutex::new(WriterState::Idle),
                pending: Arc::new(Pending {
                    sessions: DashMap::new(),
                    threads: DashMap::new(),
                    counters: self.counters.clone(),
                }),
            }),
        }
    }
}

/// What a [`BatchLayer`] has done so far, summed over its wrappers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct BatchStats {
    /// Batch calls made to the inner backend (one per kind per flush: a flush holding
    /// both appends and pending writes makes two).
    pub batches: u64,
    /// Items sent in those calls.
    pub items: u64,
    /// Items stored (their per-item result was `Ok`).
    pub items_written: u64,
    /// Items answered with their own error (for example `NotFound`).
    pub item_errors: u64,
    /// Batch calls that failed as a whole; every caller in them got the error.
    pub failed_batches: u64,
    /// The size of the last batch call.
    pub last_batch_size: usize,
    /// The largest batch call so far; never above the configured max batch.
    pub max_batch_size: usize,
    /// Items waiting in the queues now, not yet taken by a writer.
    pub queue_depth: usize,
    /// The highest queue depth seen; never above the configured max queue per wrapper.
    pub max_queue_depth: usize,
    /// Items accepted and not yet answered (queued, gathering or being written).
    pub pending: usize,
    /// Flushes forced by a read of pending data or by [`Batched::flush`].
    pub flushes: u64,
}

impl BatchStats {
    /// Mean items per batch call (0 before the first).
    pub fn average_batch_size(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.items as f64 / self.batches as f64
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    batches: Tally,
    items: Tally,
    items_written: Tally,
    item_errors: Tally,
    failed_batches: Tally,
    last_batch: AtomicUsize,
    largest_batch: AtomicUsize,
    queued: AtomicUsize,
    max_queued: AtomicUsize,
    pending: AtomicUsize,
    flushes: Tally,
    size_metric: LazyHistogram,
    depth_metric: LazyGauge,
}

impl Counters {
    fn snapshot(&self) -> BatchStats {
        BatchStats {
            batches: self.batches.get(),
            items: self.items.get(),
            items_written: self.items_written.get(),
            item_errors: self.item_errors.get(),
            failed_batches: self.failed_batches.get(),
            last_batch_size: self.last_batch.load(Ordering::Relaxed),
            max_batch_size: self.largest_batch.load(Ordering::Relaxed),
            queue_depth: self.queued.load(Ordering::Relaxed),
            max_queue_depth: self.max_queued.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            flushes: self.flushes.get(),
        }
    }

    fn record_batch(&self, size: usize) {
        self.batches.add(1);
        self.items.add(size as u64);
        self.last_batch.store(size, Ordering::Relaxed);
        self.largest_batch.fetch_max(size, Ordering::Relaxed);
        self.size_metric.record(names::BATCH_SIZE, size as f64);
    }
}

/// An inner backend whose appends and pending writes are written in batches; made by
/// [`BatchLayer`]. Clones share the queue and its writer task.
pub struct Batched<B> {
    inner: Arc<B>,
    config: BatchConfig,
    writer: Arc<Writer>,
}

impl<B> Clone for Batched<B> {
    fn clone(&self) -> Self {
        Batched {
            inner: self.inner.clone(),
            config: self.config,
            writer: self.writer.clone(),
        }
    }
}

impl<B> fmt::Debug for Batched<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batched")
            .field("config", &self.config)
            .field("writer", &self.writer.state_name())
            .field("stats", &self.writer.pending.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl<B> Batched<B> {
    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The counters of the layer that made this wrapper.
    pub fn stats(&self) -> BatchStats {
        self.writer.pending.counters.snapshot()
    }

    fn figures(&self) -> Metadata {
        let s = self.stats();
        let mut m = Metadata::new();
        m.insert("writer".into(), json!(self.writer.state_name()));
        m.insert("max_batch".into(), json!(self.config.max_batch));
        m.insert(
            "linger_ms".into(),
            json!(self.config.linger.as_secs_f64() * 1000.0),
        );
        m.insert("max_queue".into(), json!(self.config.max_queue));
        m.insert("queue_depth".into(), json!(s.queue_depth));
        m.insert("max_queue_depth".into(), json!(s.max_queue_depth));
        m.insert("pending".into(), json!(s.pending));
        m.insert("batches".into(), json!(s.batches));
        m.insert("items".into(), json!(s.items));
        m.insert("items_written".into(), json!(s.items_written));
        m.insert("item_errors".into(), json!(s.item_errors));
        m.insert("failed_batches".into(), json!(s.failed_batches));
        m.insert("last_batch_size".into(), json!(s.last_batch_size));
        m.insert("max_batch_size".into(), json!(s.max_batch_size));
        m.insert("average_batch_size".into(), json!(s.average_batch_size()));
        m.insert("flushes".into(), json!(s.flushes));
        m
    }
}
