//! The storage traits over [`Batched`]: appends and pending writes queued, reads of
//! what is pending flushed first, everything else passed through.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::oneshot;

use super::queue::{Item, Key, Waiter, WriterState};
use super::writer::writer_stopped;
use super::Batched;
use crate::error::Result;
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, HealthStatus, IdPage, Message, Metadata,
    MetricsReport, NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionPage,
    SessionQuery, SessionUpdate, TaskWrites, WriteInput,
};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
};
use crate::validate;

#[async_trait]
impl<B: StorageBackend + 'static> SessionStorage for Batched<B> {
    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        // Queued appends to the session are stored (and so removed) first.
        self.flush_if(self.writer.pending.sessions.contains_key(session_id))
            .await?;
        self.inner.delete_session(session_id).await
    }

    // Pure pass-through: session records are never queued.
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

    // Pure pass-through: a batch is not queued again.
    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        // Already a batch: straight through.
        self.inner.batch_add_conversation_messages(messages).await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> CheckpointStorage for Batched<B> {
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

    // Pure pass-through: only single pending writes are queued, never checkpoints or batches.
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

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        // Already a batch: straight through.
        self.inner.batch_put_writes(items).await
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        self.inner.restore_checkpoints(checkpoints).await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> TaskContextStorage for Batched<B> {
    // Pure pass-through: task contexts are never queued.
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
    /// Stops taking calls ([`StorageError::Closed`](crate::error::StorageError::Closed) from now on), waits until every item
    /// queued before is stored and answered, then closes the inner backend.
    ///
    /// [`StorageError::Closed`]: crate::StorageError::Closed
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

    // Pure pass-through: nothing queued depends on these.
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn store_id(&self) -> Option<String> {
        self.inner.store_id()
    }

    fn changes(&self) -> Option<crate::feed::ChangeFeed> {
        self.inner.changes()
    }

    async fn initialize(&self) -> Result<()> {
        self.inner.initialize().await
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        self.inner.cleanup_expired_sessions(max_idle).await
    }
}
