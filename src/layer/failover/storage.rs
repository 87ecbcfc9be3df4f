//! The storage traits over [`Failover`]: each call routed, writes dual-written or queued.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::replay::{replay, Hint};
use super::Failover;
use crate::error::{Result, StorageError};
use crate::layer::Operation;
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, HealthStatus, IdPage, Message, Metadata,
    MetricsReport, NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionPage,
    SessionQuery, SessionUpdate, TaskWrites, WriteInput,
};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
};

#[async_trait]
impl<B: StorageBackend + 'static> SessionStorage for Failover<B> {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        self.write(
            Operation::CreateSession,
            || {
                Hint::CreateSession(
                    NewSession::new(session_id, user_id).with_metadata(metadata.clone()),
                )
            },
            |_| true,
            |b| b.create_session(session_id, user_id, metadata),
        )
        .await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        self.read(Operation::GetSession, |b| b.get_session(session_id))
            .await
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        self.write(
            Operation::UpdateSession,
            || Hint::UpdateSession(session_id.to_owned(), update.clone()),
            |changed: &bool| *changed,
            |b| b.update_session(session_id, update),
        )
        .await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        self.write(
            Operation::EndSession,
            || Hint::EndSession(session_id.to_owned(), status.to_owned()),
            |changed: &bool| *changed,
            |b| b.end_session(session_id, status),
        )
        .await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        self.write(
            Operation::BatchCreateSessions,
            || Hint::BatchCreateSessions(sessions.to_vec()),
            |_| true,
            |b| b.batch_create_sessions(sessions),
        )
        .await
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        self.read(Operation::BatchGetSessions, |b| {
            b.batch_get_sessions(session_ids)
        })
        .await
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        self.write(
            Operation::DeleteSession,
            || Hint::DeleteSession(session_id.to_owned()),
            |_| true,
            |b| b.delete_session(session_id),
        )
        .await
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        self.write(
            Operation::RestoreSessions,
            || Hint::RestoreSessions(sessions.to_vec()),
            |_| true,
            |b| b.restore_sessions(sessions),
        )
        .await
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        self.read(Operation::ListSessions, |b| b.list_sessions(query))
            .await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> ConversationStorage for Failover<B> {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        // One id for both backends and the replay, so each stores the message once.
        let message = message.with_fixed_id();
        let message = message.as_ref();
        self.write(
            Operation::AddConversationMessage,
            || Hint::AddMessage(session_id.to_owned(), message.clone()),
            |_| true,
            |b| b.add_conversation_message(session_id, message),
        )
        .await
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        let messages: Vec<(String, NewMessage)> = messages
            .iter()
            .map(|(s, m)| (s.clone(), m.with_fixed_id().into_owned()))
            .collect();
        let messages = messages.as_slice();
        self.write(
            Operation::BatchAddConversationMessages,
            || Hint::BatchAddMessages(messages.to_vec()),
            |_| true,
            |b| b.batch_add_conversation_messages(messages),
        )
        .await
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        self.write(
            Operation::RestoreMessages,
            || Hint::RestoreMessages(session_id.to_owned(), messages.to_vec()),
            |_| true,
            |b| b.restore_messages(session_id, messages),
        )
        .await
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.read(Operation::GetConversationRange, |b| {
            b.get_conversation_range(session_id, offset, limit)
        })
        .await
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.read(Operation::GetConversationHistory, |b| {
            b.get_conversation_history(session_id, limit)
        })
        .await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> CheckpointStorage for Failover<B> {
    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        self.write(
            Operation::StoreCheckpoint,
            || Hint::StoreCheckpoint(checkpoint.clone()),
            |_| true,
            |b| b.store_checkpoint(checkpoint),
        )
        .await
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        self.read(Operation::GetCheckpoint, |b| {
            b.get_checkpoint(thread_id, checkpoint_ns, checkpoint_id)
        })
        .await
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        self.read(Operation::ListCheckpoints, |b| {
            b.list_checkpoints(thread_id, checkpoint_ns, filter)
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
        self.write(
            Operation::PutWrites,
            || {
                Hint::PutWrites(TaskWrites {
                    thread_id: thread_id.to_owned(),
                    checkpoint_ns: checkpoint_ns.to_owned(),
                    checkpoint_id: checkpoint_id.to_owned(),
                    task_id: task_id.to_owned(),
                    writes: writes.to_vec(),
                })
            },
            |_| true,
            |b| b.put_writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes),
        )
        .await
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        self.write(
            Operation::BatchPutWrites,
            || Hint::BatchPutWrites(items.to_vec()),
            |_| true,
            |b| b.batch_put_writes(items),
        )
        .await
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        self.read(Operation::GetWrites, |b| {
            b.get_writes(thread_id, checkpoint_ns, checkpoint_id)
        })
        .await
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        self.write(
            Operation::RestoreCheckpoints,
            || Hint::RestoreCheckpoints(checkpoints.to_vec()),
            |_| true,
            |b| b.restore_checkpoints(checkpoints),
        )
        .await
    }

    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.read(Operation::ListThreads, |b| b.list_threads(after, limit))
            .await
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        self.read(Operation::ListCheckpointNamespaces, |b| {
            b.list_checkpoint_namespaces(thread_id)
        })
        .await
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        self.read(Operation::ListWriteCheckpoints, |b| {
            b.list_write_checkpoints(thread_id, checkpoint_ns)
        })
        .await
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        self.write(
            Operation::DeleteThread,
            || Hint::DeleteThread(thread_id.to_owned()),
            |_| true,
            |b| b.delete_thread(thread_id),
        )
        .await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> TaskContextStorage for Failover<B> {
    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        self.read(Operation::GetTaskContext, |b| {
            b.get_task_context(session_id)
        })
        .await
    }

    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.read(Operation::ListTaskContexts, |b| {
            b.list_task_contexts(after, limit)
        })
        .await
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        self.write(
            Operation::StoreTaskContext,
            || Hint::StoreTaskContext(session_id.to_owned(), context.clone()),
            |_| true,
            |b| b.store_task_context(session_id, context),
        )
        .await
    }
}

#[async_trait]
impl<B: StorageBackend + 'static> StorageBackend for Failover<B> {
    async fn initialize(&self) -> Result<()> {
        // A primary that is down at start is what failover is for; the fallback must work.
        if let Err(e) = self.primary.initialize().await {
            if !e.is_transient() {
                return Err(e);
            }
            self.state.failure(self.config.failure_threshold);
        }
        self.fallback.initialize().await
    }

    async fn close(&self) -> Result<()> {
        // Writes acknowledged during an outage are not thrown away with the queue: one
        // last replay (after any running one), whatever the breaker says.
        let left = {
            let _running = self.state.replay.lock().await;
            if self.degraded() {
                if let Err(e) = replay(self.primary(), &self.state, &self.config).await {
                    tracing::warn!(error = %e, "failover: the replay at close failed");
                }
            }
            self.state.closed.store(true, Ordering::Release);
            self.state.queued.load(Ordering::Relaxed)
        };
        let primary = self.primary.close().await;
        let fallback = self.fallback.close().await;
        if left > 0 && self.state.journal.is_some() {
            // Nothing is lost: the next layer over the journal replays them.
            tracing::warn!(
                writes = left,
                "failover: closed with writes the primary never got; the journal keeps them"
            );
        } else if left > 0 {
            tracing::error!(
                writes = left,
                "failover: closed with writes the primary never got; the fallback holds them"
            );
            return Err(StorageError::Backend {
                message: format!(
                    "closed with {left} writes acknowledged while the primary was down and \
                     not replayed to it: they are stored in the fallback only"
                ),
                transient: false,
                source: None,
            });
        }
        primary.and(fallback)
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let report = |component: &str, r: Result<HealthReport>| match r {
            Ok(r) => Ok(r),
            Err(StorageError::Closed) => Err(StorageError::Closed),
            Err(e) => {
                let mut details = Metadata::new();
                details.insert("error".into(), json!(e.to_string()));
                Ok(HealthReport {
                    component: component.to_owned(),
                    status: HealthStatus::Unhealthy,
                    latency: Duration::ZERO,
                    checked_at: now(),
                    details,
                    components: Vec::new(),
                })
            }
        };
        // A hung primary must not hang the health check: it is reported unhealthy.
        let primary_check = self.on_primary(Operation::HealthCheck, self.primary.health_check());
        let primary = report(self.primary.kind(), primary_check.await)?;
        let fallback = report(self.fallback.kind(), self.fallback.health_check().await)?;
        let healthy = |r: &HealthReport| r.status == HealthStatus::Healthy;
        // Another process sharing the journal may have left entries this one never saw.
        let journaled = match &self.state.journal {
            Some(j) => match j.depth().await {
                Ok(depth) => {
                    self.state.journal_seen(depth);
                    depth.0 > 0
                }
                Err(_) => true,
            },
            None => false,
        };
        let status = match (healthy(&primary), healthy(&fallback)) {
            (true, true) if !self.degraded() && !journaled => HealthStatus::Healthy,
            (false, false) => HealthStatus::Unhealthy,
            _ => HealthStatus::Degraded,
        };
        Ok(HealthReport {
            component: "failover".to_owned(),
            status,
            latency: started.elapsed(),
            checked_at: now(),
            details: self.figures().await,
            components: vec![primary, fallback],
        })
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        let mut components = Vec::with_capacity(2);
        let primary = self.on_primary(Operation::GetMetrics, self.primary.get_metrics());
        match primary.await {
            Ok(m) => components.push(m),
            Err(e) if !e.is_transient() => return Err(e),
            Err(_) => {}
        }
        components.push(self.fallback.get_metrics().await?);
        Ok(MetricsReport {
            component: "failover".to_owned(),
            values: self.figures().await,
            components,
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        self.write(
            Operation::CleanupExpiredSessions,
            || Hint::Cleanup(max_idle),
            |_| true,
            |b| b.cleanup_expired_sessions(max_idle),
        )
        .await
    }

    // Pure pass-through to the primary: a failover stack is named for it.
    fn kind(&self) -> &'static str {
        self.primary.kind()
    }

    fn store_id(&self) -> Option<String> {
        self.primary.store_id()
    }

    fn changes(&self) -> Option<crate::feed::ChangeFeed> {
        self.primary.changes()
    }
}
