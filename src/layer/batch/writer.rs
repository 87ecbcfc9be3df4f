//! The writer task: gathers a batch, writes it in one call per kind, answers each item.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::queue::{Envelope, Item, Pending, Waiter};
use super::{BatchConfig, Counters};
use crate::error::{Result, StorageError};
use crate::model::{NewMessage, TaskWrites};
use crate::storage::StorageBackend;

/// The error a caller gets when the writer task went away without answering.
pub(super) fn writer_stopped() -> StorageError {
    StorageError::Backend {
        message: "the batch writer stopped before answering; the call may or may not have \
                  been stored (retrying is safe: items are keyed)"
            .into(),
        transient: true,
        source: None,
    }
}

/// One gathered batch: items in queue order, split by kind.
pub(super) struct Batch {
    pub(super) messages: Vec<(String, NewMessage)>,
    pub(super) message_waiters: Vec<Waiter<String>>,
    pub(super) writes: Vec<TaskWrites>,
    pub(super) write_waiters: Vec<Waiter<()>>,
}

impl Batch {
    pub(super) fn new() -> Self {
        Batch {
            messages: Vec::new(),
            message_waiters: Vec::new(),
            writes: Vec::new(),
            write_waiters: Vec::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.messages.len() + self.writes.len()
    }

    /// Adds the entry; a flush request is returned instead, to be answered after the
    /// batch is written.
    pub(super) fn take(&mut self, envelope: Envelope) -> Option<oneshot::Sender<()>> {
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
    pub(super) async fn write<B: StorageBackend + ?Sized>(
        &mut self,
        inner: &B,
        counters: &Counters,
    ) {
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
pub(super) fn answer<T>(
    result: Result<Vec<Result<T>>>,
    mut waiters: Vec<Waiter<T>>,
    counters: &Counters,
) {
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
                counter.add(1);
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
    counters.failed_batches.add(1);
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
pub(super) async fn run<B: StorageBackend + ?Sized>(
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
pub(super) const MAX_YIELDS: usize = 2;

/// Fills the batch after its first item: until it is full, a flush request comes (which
/// is returned), the queue closes, or (with a linger) the linger time has passed.
///
/// Without a linger the writer takes what is queued, then yields to the runtime and
/// takes more for as long as yielding brings new items. Callers answered by the
/// previous batch are woken at that moment and need a few microseconds to queue their
/// next item; a writer that did not yield would race ahead of them and write batches of
/// one or two. A lone caller costs two empty yields.
pub(super) async fn gather(
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
