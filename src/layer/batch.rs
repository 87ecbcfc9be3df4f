//! Group commit: appends and pending writes gathered into batch calls.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::names::{self, LazyGauge, LazyHistogram};
use crate::error::{Result, StorageError};
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, HealthStatus, IdPage, Message, Metadata,
    MetricsReport, NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionPage,
    SessionQuery, SessionUpdate, TaskWrites, WriteInput,
};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
};
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
///   [`StorageError::Closed`].
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
    batches: AtomicU64,
    items: AtomicU64,
    items_written: AtomicU64,
    item_errors: AtomicU64,
    failed_batches: AtomicU64,
    last_batch: AtomicUsize,
    largest_batch: AtomicUsize,
    queued: AtomicUsize,
    max_queued: AtomicUsize,
    pending: AtomicUsize,
    flushes: AtomicU64,
    size_metric: LazyHistogram,
    depth_metric: LazyGauge,
}

impl Counters {
    fn snapshot(&self) -> BatchStats {
        BatchStats {
            batches: self.batches.load(Ordering::Relaxed),
            items: self.items.load(Ordering::Relaxed),
            items_written: self.items_written.load(Ordering::Relaxed),
            item_errors: self.item_errors.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            last_batch_size: self.last_batch.load(Ordering::Relaxed),
            max_batch_size: self.largest_batch.load(Ordering::Relaxed),
            queue_depth: self.queued.load(Ordering::Relaxed),
            max_queue_depth: self.max_queued.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
        }
    }

    fn record_batch(&self, size: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(size as u64, Ordering::Relaxed);
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

/// The queue of one wrapper (shared by its clones). It holds the only long-lived sender;
/// the writer task holds the receiver and `Pending`, never the sender, so dropping the
/// wrappers ends the task once the queue is drained.
struct Writer {
    state: Mutex<WriterState>,
    pending: Arc<Pending>,
}

enum WriterState {
    /// No task yet: started on first use.
    Idle,
    /// A task is receiving. `done` reports its end (its sender is dropped).
    Running {
        tx: QueueTx,
        done: watch::Receiver<()>,
    },
    /// `close()` was called; `done` is the drained task, if one ran.
    Closed { done: Option<watch::Receiver<()>> },
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn state_name(&self) -> &'static str {
        match &*self.lock() {
            WriterState::Idle => "idle",
            WriterState::Running { tx, .. } if tx.is_closed() => "stopped",
            WriterState::Running { .. } => "running",
            WriterState::Closed { .. } => "closed",
        }
    }
}

/// Per-key counts of accepted, unanswered items, so reads flush only when needed.
struct Pending {
    sessions: DashMap<String, usize>,
    threads: DashMap<String, usize>,
    counters: Arc<Counters>,
}

enum Key {
    Session(String),
    Thread(String),
}

impl Pending {
    fn map<'a>(&'a self, key: &'a Key) -> (&'a DashMap<String, usize>, &'a str) {
        match key {
            Key::Session(id) => (&self.sessions, id),
            Key::Thread(id) => (&self.threads, id),
        }
    }

    /// Counts an item as pending until the ticket is dropped.
    fn ticket(self: &Arc<Self>, key: Key) -> Ticket {
        let (map, id) = self.map(&key);
        *map.entry(id.to_owned()).or_insert(0) += 1;
        self.counters.pending.fetch_add(1, Ordering::Relaxed);
        Ticket {
            pending: self.clone(),
            key,
        }
    }
}

/// Marks one item as pending for its session or thread. Dropped once the item is
/// stored (before its caller is answered), or when the item is lost, so counts never
/// leak.
struct Ticket {
    pending: Arc<Pending>,
    key: Key,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let (map, id) = self.pending.map(&self.key);
        if let Some(mut count) = map.get_mut(id) {
            *count = count.saturating_sub(1);
        }
        map.remove_if(id, |_, count| *count == 0);
        self.pending
            .counters
            .pending
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The writer's queue: an unbounded channel whose room is a semaphore of `max_queue`
/// permits. The channel's own bound would free a slot inside `recv`, before the writer
/// could count the entry out, so a sender on the other thread could count its entry in
/// first and the depth would read one over the bound. A permit travels in the envelope
/// and is released only after the entry is counted out.
#[derive(Clone)]
struct QueueTx {
    tx: mpsc::UnboundedSender<Envelope>,
    room: Arc<Semaphore>,
}

impl QueueTx {
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Counts an entry as queued until the writer takes it out of the channel.
struct QueueSlot(Arc<Counters>);

impl QueueSlot {
    fn new(counters: &Arc<Counters>) -> Self {
        let depth = counters.queued.fetch_add(1, Ordering::Relaxed) + 1;
        counters.max_queued.fetch_max(depth, Ordering::Relaxed);
        counters
            .depth_metric
            .set(names::BATCH_QUEUE_DEPTH, depth as f64);
        QueueSlot(counters.clone())
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        let depth = self.0.queued.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0
            .depth_metric
            .set(names::BATCH_QUEUE_DEPTH, depth as f64);
    }
}

struct Envelope {
    item: Item,
    // Fields drop in order: the entry is counted out before its room is given back.
    _slot: QueueSlot,
    _room: OwnedSemaphorePermit,
}

enum Item {
    Message {
        session_id: String,
        message: NewMessage,
        waiter: Waiter<String>,
    },
    Writes {
        writes: TaskWrites,
        waiter: Waiter<()>,
    },
    /// Answered once everything queued before it is stored.
    Flush { reply: oneshot::Sender<()> },
}

/// A caller waiting for its item. Fields drop in order: a lost item's ticket is
/// released before its caller learns of the loss.
struct Waiter<T> {
    ticket: Ticket,
    reply: oneshot::Sender<Result<T>>,
}

impl<T> Waiter<T> {
    fn answer(self, result: Result<T>) {
        // No longer pending before the caller can act on the answer.
        drop(self.ticket);
        let _ = self.reply.send(result);
    }
}

/// The error a caller gets when the writer task went away without answering.
fn writer_stopped() -> StorageError {
    StorageError::Backend {
        message: "the batch writer stopped before answering; the call may or may not have \
                  been stored (retrying is safe: items are keyed)"
            .into(),
        transient: true,
        source: None,
    }
}

/// One gathered batch: items in queue order, split by kind.
struct Batch {
    messages: Vec<(String, NewMessage)>,
    message_waiters: Vec<Waiter<String>>,
    writes: Vec<TaskWrites>,
    write_waiters: Vec<Waiter<()>>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            messages: Vec::new(),
            message_waiters: Vec::new(),
            writes: Vec::new(),
            write_waiters: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.messages.len() + self.writes.len()
    }

    /// Adds the entry; a flush request is returned instead, to be answered after the
    /// batch is written.
    fn take(&mut self, envelope: Envelope) -> Option<oneshot::Sender<()>> {
        match envelope.item {
            Item::Message {
                session_id,
                message,
                waiter,
            } => {
                self.messages.push((session_id, message));
                self.message_waiters.push(waiter);
                None
            }
            Item::Writes { writes, waiter } => {
                self.writes.push(writes);
                self.write_waiters.push(waiter);
                None
            }
            Item::Flush { reply } => Some(reply),
        }
    }

    /// Writes the batch with one call per kind and answers every caller.
    async fn write<B: StorageBackend + ?Sized>(&mut self, inner: &B, counters: &Counters) {
        if !self.messages.is_empty() {
            let result = inner.batch_add_conversation_messages(&self.messages).await;
            self.messages.clear();
            answer(result, std::mem::take(&mut self.message_waiters), counters);
        }
        if !self.writes.is_empty() {
            let result = inner.batch_put_writes(&self.writes).await;
            self.writes.clear();
            answer(result, std::mem::take(&mut self.write_waiters), counters);
        }
    }
}

/// Gives each caller its per-item result, or a copy of the batch's error.
fn answer<T>(result: Result<Vec<Result<T>>>, mut waiters: Vec<Waiter<T>>, counters: &Counters) {
    let size = waiters.len();
    counters.record_batch(size);
    let error = match result {
        Ok(results) if results.len() == size => {
            for (waiter, result) in waiters.into_iter().zip(results) {
                let counter = if result.is_ok() {
                    &counters.items_written
                } else {
                    &counters.item_errors
                };
                counter.fetch_add(1, Ordering::Relaxed);
                waiter.answer(result);
            }
            return;
        }
        Ok(results) => StorageError::Backend {
            message: format!(
                "the inner backend answered {} results for a batch of {size} items",
                results.len()
            ),
            transient: false,
            source: None,
        },
        Err(e) => e,
    };
    counters.failed_batches.fetch_add(1, Ordering::Relaxed);
    let last = waiters.pop();
    for waiter in waiters {
        waiter.answer(Err(StorageError::duplicate(&error)));
    }
    if let Some(waiter) = last {
        waiter.answer(Err(error));
    }
}

/// The writer task: gathers a batch (first item, then up to `max_batch` items or until
/// the linger deadline or a flush request), writes it, answers, repeats. Ends when every
/// sender is gone and the queue is empty; `_done` dropping tells `close()`.
async fn run<B: StorageBackend + ?Sized>(
    inner: Arc<B>,
    mut rx: mpsc::UnboundedReceiver<Envelope>,
    pending: Arc<Pending>,
    config: BatchConfig,
    _done: watch::Sender<()>,
) {
    let counters = &pending.counters;
    let mut batch = Batch::new();
    while let Some(first) = rx.recv().await {
        let mut flush = batch.take(first);
        if flush.is_none() {
            flush = gather(&mut rx, &mut batch, config).await;
        }
        batch.write(&*inner, counters).await;
        if let Some(reply) = flush {
            let _ = reply.send(());
        }
    }
}

/// How many times in a row the writer yields to let callers queue more items. One
/// already filled batches of 32 closed-loop callers over SQLite (70 000 appends/s
/// against 20 000 with a zero linger timer); the second covers callers woken on the
/// other worker thread.
const MAX_YIELDS: usize = 2;

/// Fills the batch after its first item: until it is full, a flush request comes (which
/// is returned), the queue closes, or (with a linger) the linger time has passed.
///
/// Without a linger the writer takes what is queued, then yields to the runtime and
/// takes more for as long as yielding brings new items. Callers answered by the
/// previous batch are woken at that moment and need a few microseconds to queue their
/// next item; a writer that did not yield would race ahead of them and write batches of
/// one or two. A lone caller costs two empty yields.
async fn gather(
    rx: &mut mpsc::UnboundedReceiver<Envelope>,
    batch: &mut Batch,
    config: BatchConfig,
) -> Option<oneshot::Sender<()>> {
    if !config.linger.is_zero() {
        let linger = tokio::time::sleep(config.linger);
        tokio::pin!(linger);
        while batch.len() < config.max_batch {
            tokio::select! {
                biased;
                next = rx.recv() => match next {
                    Some(envelope) => {
                        if let Some(reply) = batch.take(envelope) {
                            return Some(reply);
                        }
                    }
                    // Closed and drained: write what is gathered now.
                    None => return None,
                },
                () = &mut linger => return None,
            }
        }
        return None;
    }
    let mut yields = 0;
    while batch.len() < config.max_batch {
        match rx.try_recv() {
            Ok(envelope) => {
                if let Some(reply) = batch.take(envelope) {
                    return Some(reply);
                }
                yields = 0;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {
                if yields == MAX_YIELDS {
                    return None;
                }
                yields += 1;
                tokio::task::yield_now().await;
            }
        }
    }
    None
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

impl<B: StorageBackend + 'static> Batched<B> {
    /// Writes everything queued so far and returns once it is stored (each caller gets
    /// its own answer). Returns at once when nothing was ever queued or after `close()`.
    pub async fn flush(&self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        match self.sender() {
            Ok(tx) => self.send(tx, |_| Item::Flush { reply }).await?,
            Err(StorageError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        }
        self.writer
            .pending
            .counters
            .flushes
            .fetch_add(1, Ordering::Relaxed);
        done.await.map_err(|_| writer_stopped())
    }

    /// A sender to the writer task, starting the task if none runs (or the last one
    /// died). `Closed` after `close()`.
    fn sender(&self) -> Result<QueueTx> {
        let mut state = self.writer.lock();
        match &*state {
            WriterState::Running { tx, .. } if !tx.is_closed() => return Ok(tx.clone()),
            WriterState::Closed { .. } => return Err(StorageError::Closed),
            WriterState::Running { .. } | WriterState::Idle => {}
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| StorageError::Backend {
            message: "the batching layer must be used inside a tokio runtime".into(),
            transient: false,
            source: Some(Box::new(e)),
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let tx = QueueTx {
            tx,
            room: Arc::new(Semaphore::new(self.config.max_queue)),
        };
        let (done_tx, done_rx) = watch::channel(());
        runtime.spawn(run(
            self.inner.clone(),
            rx,
            self.writer.pending.clone(),
            self.config,
            done_tx,
        ));
        *state = WriterState::Running {
            tx: tx.clone(),
            done: done_rx,
        };
        Ok(tx)
    }

    /// Waits for room in the queue, then queues the item `make` builds (its ticket is
    /// taken only now, right before it becomes visible to the writer).
    async fn send(&self, tx: QueueTx, make: impl FnOnce(&Arc<Pending>) -> Item) -> Result<()> {
        let room = tx
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| writer_stopped())?;
        if tx.is_closed() {
            return Err(writer_stopped());
        }
        let item = make(&self.writer.pending);
        tx.tx
            .send(Envelope {
                item,
                _slot: QueueSlot::new(&self.writer.pending.counters),
                _room: room,
            })
            .map_err(|_| writer_stopped())
    }

    async fn flush_if(&self, pending: bool) -> Result<()> {
        if pending {
            self.flush().await
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> SessionStorage for Batched<B> {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        self.inner
            .create_session(session_id, user_id, metadata)
            .await
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        // Queued appends to the session are stored (and so removed) first.
        self.flush_if(self.writer.pending.sessions.contains_key(session_id))
            .await?;
        self.inner.delete_session(session_id).await
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        self.inner.restore_sessions(sessions).await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        self.inner.get_session(session_id).await
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        self.inner.update_session(session_id, update).await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        self.inner.end_session(session_id, status).await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        self.inner.batch_create_sessions(sessions).await
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        self.inner.batch_get_sessions(session_ids).await
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        self.inner.list_sessions(query).await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> ConversationStorage for Batched<B> {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        let tx = self.sender()?;
        // Bad input is answered at once and never joins (or fails) a batch.
        validate::new_message(session_id, message)?;
        let message = match message.message_id {
            Some(_) => message.clone(),
            None => message.clone().with_id(message.id_or_generate()),
        };
        let (reply, answer) = oneshot::channel();
        self.send(tx, |pending| Item::Message {
            session_id: session_id.to_owned(),
            message,
            waiter: Waiter {
                reply,
                ticket: pending.ticket(Key::Session(session_id.to_owned())),
            },
        })
        .await?;
        answer.await.unwrap_or_else(|_| Err(writer_stopped()))
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        // Already a batch: straight through.
        self.inner.batch_add_conversation_messages(messages).await
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.flush_if(self.writer.pending.sessions.contains_key(session_id))
            .await?;
        self.inner.get_conversation_history(session_id, limit).await
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        // Queued appends to the session go first, so positions follow call order.
        self.flush_if(self.writer.pending.sessions.contains_key(session_id))
            .await?;
        self.inner.restore_messages(session_id, messages).await
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.flush_if(self.writer.pending.sessions.contains_key(session_id))
            .await?;
        self.inner
            .get_conversation_range(session_id, offset, limit)
            .await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> CheckpointStorage for Batched<B> {
    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        self.inner.store_checkpoint(checkpoint).await
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        self.inner
            .get_checkpoint(thread_id, checkpoint_ns, checkpoint_id)
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
        let tx = self.sender()?;
        validate::writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)?;
        let (reply, answer) = oneshot::channel();
        let item = TaskWrites {
            thread_id: thread_id.to_owned(),
            checkpoint_ns: checkpoint_ns.to_owned(),
            checkpoint_id: checkpoint_id.to_owned(),
            task_id: task_id.to_owned(),
            writes: writes.to_vec(),
        };
        self.send(tx, |pending| Item::Writes {
            writes: item,
            waiter: Waiter {
                reply,
                ticket: pending.ticket(Key::Thread(thread_id.to_owned())),
            },
        })
        .await?;
        answer.await.unwrap_or_else(|_| Err(writer_stopped()))
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        // Already a batch: straight through.
        self.inner.batch_put_writes(items).await
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        self.flush_if(self.writer.pending.threads.contains_key(thread_id))
            .await?;
        self.inner
            .get_writes(thread_id, checkpoint_ns, checkpoint_id)
            .await
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        // Queued writes of the thread are stored (and so deleted) first; otherwise they
        // would land after the delete and bring the thread back.
        self.flush_if(self.writer.pending.threads.contains_key(thread_id))
            .await?;
        self.inner.delete_thread(thread_id).await
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        self.inner.restore_checkpoints(checkpoints).await
    }

    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        // A thread whose first writes are still queued must be listed too.
        self.flush_if(!self.writer.pending.threads.is_empty())
            .await?;
        self.inner.list_threads(after, limit).await
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        self.flush_if(self.writer.pending.threads.contains_key(thread_id))
            .await?;
        self.inner.list_checkpoint_namespaces(thread_id).await
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        // Queued writes of the thread must be listed too.
        self.flush_if(self.writer.pending.threads.contains_key(thread_id))
            .await?;
        self.inner
            .list_write_checkpoints(thread_id, checkpoint_ns)
            .await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> TaskContextStorage for Batched<B> {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.inner.list_task_contexts(after, limit).await
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        self.inner.get_task_context(session_id).await
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        self.inner.store_task_context(session_id, context).await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> StorageBackend for Batched<B> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn store_id(&self) -> Option<String> {
        self.inner.store_id()
    }

    async fn initialize(&self) -> Result<()> {
        self.inner.initialize().await
    }

    /// Stops taking calls ([`StorageError::Closed`] from now on), waits until every item
    /// queued before is stored and answered, then closes the inner backend.
    async fn close(&self) -> Result<()> {
        let done = {
            let mut state = self.writer.lock();
            match std::mem::replace(&mut *state, WriterState::Closed { done: None }) {
                // Dropping the sender lets the task drain the queue and end.
                WriterState::Running { tx, done } => {
                    drop(tx);
                    *state = WriterState::Closed {
                        done: Some(done.clone()),
                    };
                    Some(done)
                }
                WriterState::Closed { done } => {
                    *state = WriterState::Closed { done: done.clone() };
                    done
                }
                WriterState::Idle => None,
            }
        };
        if let Some(mut done) = done {
            // Err once the task's `done` sender is dropped: the queue is drained.
            let _ = done.changed().await;
        }
        self.inner.close().await
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let inner = self.inner.health_check().await?;
        let status = match (inner.status, self.writer.state_name()) {
            // The task died; the next call starts another, but calls in it failed.
            (HealthStatus::Healthy, "stopped") => HealthStatus::Degraded,
            (status, _) => status,
        };
        Ok(HealthReport {
            component: "batch".to_owned(),
            status,
            latency: started.elapsed(),
            checked_at: now(),
            details: self.figures(),
            components: vec![inner],
        })
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        let inner = self.inner.get_metrics().await?;
        Ok(MetricsReport {
            component: "batch".to_owned(),
            values: self.figures(),
            components: vec![inner],
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        self.inner.cleanup_expired_sessions(max_idle).await
    }
}
