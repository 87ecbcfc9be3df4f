//! The queue between callers and the writer task: its bound, the items and their
//! answers, and the per-key counts of items not yet stored.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::writer::{run, writer_stopped};
use super::{Batched, Counters};
use crate::error::{Result, StorageError};
use crate::layer::names::{self};
use crate::model::{NewMessage, TaskWrites};
use crate::storage::StorageBackend;

/// The queue of one wrapper (shared by its clones). It holds the only long-lived sender;
/// the writer task holds the receiver and `Pending`, never the sender, so dropping the
/// wrappers ends the task once the queue is drained.
pub(super) struct Writer {
    pub(super) state: Mutex<WriterState>,
    pub(super) pending: Arc<Pending>,
}

pub(super) enum WriterState {
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
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn state_name(&self) -> &'static str {
        match &*self.lock() {
            WriterState::Idle => "idle",
            WriterState::Running { tx, .. } if tx.is_closed() => "stopped",
            WriterState::Running { .. } => "running",
            WriterState::Closed { .. } => "closed",
        }
    }
}

/// Per-key counts of accepted, unanswered items, so reads flush only when needed.
pub(super) struct Pending {
    pub(super) sessions: DashMap<String, usize>,
    pub(super) threads: DashMap<String, usize>,
    pub(super) counters: Arc<Counters>,
}

pub(super) enum Key {
    Session(String),
    Thread(String),
}

impl Pending {
    pub(super) fn map<'a>(&'a self, key: &'a Key) -> (&'a DashMap<String, usize>, &'a str) {
        match key {
            Key::Session(id) => (&self.sessions, id),
            Key::Thread(id) => (&self.threads, id),
        }
    }

    /// Counts an item as pending until the ticket is dropped.
    pub(super) fn ticket(self: &Arc<Self>, key: Key) -> Ticket {
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
pub(super) struct Ticket {
    pub(super) pending: Arc<Pending>,
    pub(super) key: Key,
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
pub(super) struct QueueTx {
    pub(super) tx: mpsc::UnboundedSender<Envelope>,
    pub(super) room: Arc<Semaphore>,
}

impl QueueTx {
    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Counts an entry as queued until the writer takes it out of the channel.
pub(super) struct QueueSlot(Arc<Counters>);

impl QueueSlot {
    pub(super) fn new(counters: &Arc<Counters>) -> Self {
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

pub(super) struct Envelope {
    pub(super) item: Item,
    // Fields drop in order: the entry is counted out before its room is given back.
    pub(super) _slot: QueueSlot,
    pub(super) _room: OwnedSemaphorePermit,
}

pub(super) enum Item {
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
pub(super) struct Waiter<T> {
    pub(super) ticket: Ticket,
    pub(super) reply: oneshot::Sender<Result<T>>,
}

impl<T> Waiter<T> {
    pub(super) fn answer(self, result: Result<T>) {
        // No longer pending before the caller can act on the answer.
        drop(self.ticket);
        let _ = self.reply.send(result);
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
        self.writer.pending.counters.flushes.add(1);
        done.await.map_err(|_| writer_stopped())
    }

    /// A sender to the writer task, starting the task if none runs (or the last one
    /// died). `Closed` after `close()`.
    pub(super) fn sender(&self) -> Result<QueueTx> {
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
    pub(super) async fn send(
        &self,
        tx: QueueTx,
        make: impl FnOnce(&Arc<Pending>) -> Item,
    ) -> Result<()> {
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

    pub(super) async fn flush_if(&self, pending: bool) -> Result<()> {
        if pending {
            self.flush().await
        } else {
            Ok(())
        }
    }
}
