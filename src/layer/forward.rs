//! The one forwarding wrapper of pass-through layers.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;

use super::{Call, Operation, Policy};
use crate::error::Result;
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, IdPage, Message, Metadata, MetricsReport,
    NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionPage, SessionQuery,
    SessionUpdate, TaskWrites, WriteInput,
};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
};

/// An inner backend with a [`Policy`] run around each of its operations. Retry,
/// timeout, metrics and logging layers all produce this type.
///
/// Appends without a message id get one here, before the policy runs, so every attempt
/// of a retried append carries the same id and the backend stores it once.
#[derive(Debug)]
pub struct Layered<B, P> {
    inner: B,
    policy: Arc<P>,
}

impl<B: Clone, P> Clone for Layered<B, P> {
    fn clone(&self) -> Self {
        Layered {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<B, P> Layered<B, P> {
    /// Wraps `inner` with `policy`.
    pub fn new(inner: B, policy: Arc<P>) -> Self {
        Layered { inner, policy }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }
}

#[async_trait]
impl<B: StorageBackend, P: Policy> SessionStorage for Layered<B, P> {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        let call = Call::new(Operation::CreateSession, Some(session_id));
        self.policy
            .call(call, || {
                self.inner.create_session(session_id, user_id, metadata)
            })
            .await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        let call = Call::new(Operation::GetSession, Some(session_id));
        self.policy
            .call(call, || self.inner.get_session(session_id))
            .await
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        let counts =
            update.add_requests > 0 || update.add_errors > 0 || update.add_processing_time != 0.0;
        let call = Call {
            idempotent: !counts,
            ..Call::new(Operation::UpdateSession, Some(session_id))
        };
        self.policy
            .call(call, || self.inner.update_session(session_id, update))
            .await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        let call = Call::new(Operation::EndSession, Some(session_id));
        self.policy
            .call(call, || self.inner.end_session(session_id, status))
            .await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        let call = Call::new(Operation::BatchCreateSessions, None);
        self.policy
            .call(call, || self.inner.batch_create_sessions(sessions))
            .await
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        let call = Call::new(Operation::BatchGetSessions, None);
        self.policy
            .call(call, || self.inner.batch_get_sessions(session_ids))
            .await
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        let call = Call::new(Operation::DeleteSession, Some(session_id));
        self.policy
            .call(call, || self.inner.delete_session(session_id))
            .await
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        let call = Call::new(Operation::RestoreSessions, None);
        self.policy
            .call(call, || self.inner.restore_sessions(sessions))
            .await
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        let call = Call::new(Operation::ListSessions, None);
        self.policy
            .call(call, || self.inner.list_sessions(query))
            .await
    }
}

#[async_trait]
impl<B: StorageBackend, P: Policy> ConversationStorage for Layered<B, P> {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        let message = message.with_fixed_id();
        let message = message.as_ref();
        let call = Call::new(Operation::AddConversationMessage, Some(session_id));
        self.policy
            .call(call, || {
                self.inner.add_conversation_message(session_id, message)
            })
            .await
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        let messages: Cow<'_, [(String, NewMessage)]> =
            if messages.iter().all(|(_, m)| m.message_id.is_some()) {
                Cow::Borrowed(messages)
            } else {
                Cow::Owned(
                    messages
                        .iter()
                        .map(|(s, m)| (s.clone(), m.with_fixed_id().into_owned()))
                        .collect(),
                )
            };
        let messages = messages.as_ref();
        let call = Call::new(Operation::BatchAddConversationMessages, None);
        self.policy
            .call(call, || {
                self.inner.batch_add_conversation_messages(messages)
            })
            .await
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        let call = Call::new(Operation::RestoreMessages, Some(session_id));
        self.policy
            .call(call, || self.inner.restore_messages(session_id, messages))
            .await
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let call = Call::new(Operation::GetConversationRange, Some(session_id));
        self.policy
            .call(call, || {
                self.inner.get_conversation_range(session_id, offset, limit)
            })
            .await
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let call = Call::new(Operation::GetConversationHistory, Some(session_id));
        self.policy
            .call(call, || {
                self.inner.get_conversation_history(session_id, limit)
            })
            .await
    }
}

#[async_trait]
impl<B: StorageBackend, P: Policy> CheckpointStorage for Layered<B, P> {
    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        let call = Call::new(Operation::RestoreCheckpoints, None);
        self.policy
            .call(call, || self.inner.restore_checkpoints(checkpoints))
            .await
    }

    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        let call = Call::new(Operation::ListThreads, None);
        self.policy
            .call(call, || self.inner.list_threads(after, limit))
            .await
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        let call = Call::new(Operation::ListCheckpointNamespaces, Some(thread_id));
        self.policy
            .call(call, || self.inner.list_checkpoint_namespaces(thread_id))
            .await
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        let call = Call::new(Operation::ListWriteCheckpoints, Some(thread_id));
        self.policy
            .call(call, || {
                self.inner.list_write_checkpoints(thread_id, checkpoint_ns)
            })
            .await
    }

    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        let call = Call::new(Operation::StoreCheckpoint, Some(&checkpoint.thread_id));
        self.policy
            .call(call, || self.inner.store_checkpoint(checkpoint))
            .await
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        let call = Call::new(Operation::GetCheckpoint, Some(thread_id));
        self.policy
            .call(call, || {
                self.inner
                    .get_checkpoint(thread_id, checkpoint_ns, checkpoint_id)
            })
            .await
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        let call = Call::new(Operation::ListCheckpoints, Some(thread_id));
        self.policy
            .call(call, || {
                self.inner
                    .list_checkpoints(thread_id, checkpoint_ns, filter)
            })
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
        let call = Call::new(Operation::PutWrites, Some(thread_id));
        self.policy
            .call(call, || {
                self.inner
                    .put_writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)
            })
            .await
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        let call = Call::new(Operation::BatchPutWrites, None);
        self.policy
            .call(call, || self.inner.batch_put_writes(items))
            .await
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        let call = Call::new(Operation::GetWrites, Some(thread_id));
        self.policy
            .call(call, || {
                self.inner
                    .get_writes(thread_id, checkpoint_ns, checkpoint_id)
            })
            .await
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        let call = Call::new(Operation::DeleteThread, Some(thread_id));
        self.policy
            .call(call, || self.inner.delete_thread(thread_id))
            .await
    }
}

#[async_trait]
impl<B: StorageBackend, P: Policy> TaskContextStorage for Layered<B, P> {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        let call = Call::new(Operation::ListTaskContexts, None);
        self.policy
            .call(call, || self.inner.list_task_contexts(after, limit))
            .await
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        let call = Call::new(Operation::GetTaskContext, Some(session_id));
        self.policy
            .call(call, || self.inner.get_task_context(session_id))
            .await
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        let call = Call::new(Operation::StoreTaskContext, Some(session_id));
        self.policy
            .call(call, || self.inner.store_task_context(session_id, context))
            .await
    }
}

#[async_trait]
impl<B: StorageBackend, P: Policy> StorageBackend for Layered<B, P> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn store_id(&self) -> Option<String> {
        self.inner.store_id()
    }

    fn changes(&self) -> Option<crate::feed::ChangeFeed> {
        self.policy.changes().or_else(|| self.inner.changes())
    }

    async fn initialize(&self) -> Result<()> {
        let call = Call::new(Operation::Initialize, None);
        self.policy.call(call, || self.inner.initialize()).await
    }

    async fn close(&self) -> Result<()> {
        let call = Call::new(Operation::Close, None);
        self.policy.call(call, || self.inner.close()).await
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let call = Call::new(Operation::HealthCheck, None);
        let inner = self.policy.call(call, || self.inner.health_check()).await?;
        Ok(HealthReport {
            component: self.policy.name().to_owned(),
            status: inner.status,
            latency: started.elapsed(),
            checked_at: now(),
            details: self.policy.figures(),
            components: vec![inner],
        })
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        let call = Call::new(Operation::GetMetrics, None);
        let inner = self.policy.call(call, || self.inner.get_metrics()).await?;
        Ok(MetricsReport {
            component: self.policy.name().to_owned(),
            values: self.policy.figures(),
            components: vec![inner],
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        let call = Call::new(Operation::CleanupExpiredSessions, None);
        self.policy
            .call(call, || self.inner.cleanup_expired_sessions(max_idle))
            .await
    }
}
