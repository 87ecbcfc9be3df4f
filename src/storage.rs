//! The storage contract: one trait per concern, and [`StorageBackend`] joining them with a
//! lifecycle.
//!
//! Every backend and every layer implements these traits with the same semantics; the
//! conformance suite in `tests/conformance` pins them. All methods are async and
//! object-safe, so a stack is used as `Arc<dyn StorageBackend>`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::model::{
    Checkpoint, CheckpointFilter, HealthReport, IdPage, Message, Metadata, MetricsReport,
    NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionPage, SessionQuery,
    SessionUpdate, TaskWrites, WriteInput,
};

/// Sessions and their usage figures (the spec's `ISessionStorage`).
#[async_trait]
pub trait SessionStorage: Send + Sync {
    /// Creates a session: status `active`, counters 0, `created_at == updated_at == now`.
    ///
    /// On an existing id this is an upsert: `user_id` and `metadata` are replaced and
    /// `updated_at` moves; `created_at`, status and counters stay. Returns the session as
    /// stored.
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session>;

    /// The session, or `None` if there is none with that id.
    async fn get_session(&self, session_id: &str) -> Result<Option<Session>>;

    /// Applies `update` atomically: metadata keys merged (top level), status set if given,
    /// counters added to in the store itself (concurrent updates never lose an
    /// increment), `updated_at` moved. Returns `false` if there is no such session.
    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool>;

    /// Sets the session's status (the spec's default is
    /// [`SessionStatus::COMPLETED`](crate::SessionStatus::COMPLETED)) and moves
    /// `updated_at`. Returns `false` if there is no such session.
    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool>;

    /// Creates or upserts every session, as [`SessionStorage::create_session`] would, and
    /// returns them in input order. Backends override it to use one round trip.
    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        crate::validate::new_sessions(sessions)?;
        let mut out = Vec::with_capacity(sessions.len());
        for s in sessions {
            out.push(
                self.create_session(&s.session_id, &s.user_id, &s.metadata)
                    .await?,
            );
        }
        Ok(out)
    }

    /// The sessions with these ids, in input order, `None` for each missing one.
    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        crate::validate::session_ids(session_ids)?;
        let mut out = Vec::with_capacity(session_ids.len());
        for id in session_ids {
            out.push(self.get_session(id).await?);
        }
        Ok(out)
    }

    /// One page of sessions ordered by id, filtered by user and status, for admin tools
    /// and migration.
    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage>;

    /// Removes the session with its messages and task context. Returns `false` if there
    /// was no such session (a task context stored under the id is removed either way).
    async fn delete_session(&self, session_id: &str) -> Result<bool>;

    /// Writes each session exactly as given (`created_at`, `updated_at`, status,
    /// metadata, counters), creating or overwriting it. For migration and backup
    /// restore; applications use `create_session` and `update_session`.
    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()>;
}

/// Conversation history (the spec's `IConversationStorage`).
#[async_trait]
pub trait ConversationStorage: Send + Sync {
    /// Appends a message to a session's history and returns its id (the caller's, or a
    /// generated UUID v7). Adding an id the session already holds stores nothing and
    /// returns the id: a retried add never duplicates. Adding to a missing session is
    /// [`StorageError::NotFound`]. The session's `updated_at` moves.
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String>;

    /// Appends many messages (possibly to several sessions) in one step, in order. Each
    /// item gets its own result (for example `NotFound` for a missing session) so one bad
    /// item does not fail the others; the outer error means nothing is known to be
    /// stored. Used by the batching layer; backends override it with one transaction or
    /// round trip.
    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        crate::validate::batch("messages", messages.len())?;
        let mut out = Vec::with_capacity(messages.len());
        for (session_id, message) in messages {
            out.push(self.add_conversation_message(session_id, message).await);
        }
        Ok(out)
    }

    /// The most recent `limit` messages of the session (1..=10 000; the spec's default is
    /// 50), oldest first. A missing session has an empty history.
    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>>;

    /// Up to `limit` messages of the session (1..=10 000), oldest first, starting at
    /// position `offset` (0 is the first message ever stored). Messages keep their
    /// positions, so paging with `offset += page.len()` reads a whole history, however
    /// long, for export and migration. A missing session has none.
    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>>;

    /// Appends `messages` with their own ids and timestamps to the session's history,
    /// oldest first, skipping ids the session already holds (so a rerun stores nothing
    /// twice). The session's `updated_at` does not move. [`StorageError::NotFound`] if
    /// the session does not exist. Returns how many were stored. For migration and
    /// backup restore.
    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64>;
}

/// Workflow checkpoints with pending writes (the spec's `ICheckpointStorage` and
/// `ICheckpointerBackend`, with LangGraph's namespaces, parents and filters).
///
/// "Latest" is the checkpoint whose id was first stored last in its thread and namespace:
/// a per-thread sequence decides, never clocks or id order. Storing an existing id again
/// updates its data, metadata and parent but does not make it latest.
#[async_trait]
pub trait CheckpointStorage: Send + Sync {
    /// Stores a checkpoint, or updates one with the same thread, namespace and id.
    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()>;

    /// The checkpoint with `checkpoint_id`, or the latest of the thread and namespace when
    /// `checkpoint_id` is `None`. `None` if there is none.
    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>>;

    /// Checkpoints of a thread and namespace, newest first, filtered by `filter`.
    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>>;

    /// Stores the pending writes of one task against a checkpoint. Write `i` is keyed by
    /// `(thread, namespace, checkpoint, task_id, i)`: putting the same writes again
    /// replaces them in place, so a retried call is idempotent. The checkpoint need not
    /// exist yet.
    async fn put_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<()>;

    /// Stores the pending writes of many tasks in one step, each as
    /// [`CheckpointStorage::put_writes`] would. Each item gets its own result; the outer
    /// error means nothing is known to be stored. Used by the batching layer; backends
    /// override it with one transaction or round trip.
    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        crate::validate::batch("items", items.len())?;
        let mut out = Vec::with_capacity(items.len());
        for w in items {
            out.push(
                self.put_writes(
                    &w.thread_id,
                    &w.checkpoint_ns,
                    &w.checkpoint_id,
                    &w.task_id,
                    &w.writes,
                )
                .await,
            );
        }
        Ok(out)
    }

    /// The pending writes of a checkpoint in the order they were first stored.
    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>>;

    /// Removes every checkpoint and pending write of a thread, in every namespace.
    async fn delete_thread(&self, thread_id: &str) -> Result<()>;

    /// One page of the ids of threads holding checkpoints or pending writes, in
    /// ascending order, after the cursor `after`; `limit` 1..=10 000. For export and
    /// migration.
    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage>;

    /// The namespaces of a thread that hold checkpoints or pending writes, in ascending
    /// order (the default namespace is `""`).
    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>>;

    /// The ids of the checkpoints of a thread and namespace that hold pending writes,
    /// whether or not the checkpoint itself is stored, in ascending order. For export and
    /// migration: writes may come before their checkpoint, and walking the stored
    /// checkpoints would miss them.
    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>>;

    /// Stores each checkpoint exactly as given (`created_at` included), in the order
    /// given: a new id becomes the latest of its thread and namespace, an existing id is
    /// updated in place. For migration and backup restore.
    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()>;
}

/// Task context, one JSON value per session (the spec's `ITaskContextStorage`). The
/// session need not exist; `cleanup_expired_sessions` removes the context of the
/// sessions it removes. [`TaskContextExt`] adds typed helpers.
#[async_trait]
pub trait TaskContextStorage: Send + Sync {
    /// The context stored for the session, if any.
    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>>;

    /// Stores (replaces) the context of the session.
    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()>;

    /// One page of the session ids holding a task context, in ascending order, after the
    /// cursor `after`; `limit` 1..=10 000. For export and migration.
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage>;
}

/// The unified backend (the spec's `IStorageBackend`): every storage concern plus
/// lifecycle, health, metrics and cleanup. Used as `Arc<dyn StorageBackend>`.
///
/// Lifecycle: `initialize()` is idempotent and optional (a backend initializes itself on
/// first use); after `close()` every call fails with [`StorageError::Closed`].
#[async_trait]
pub trait StorageBackend:
    SessionStorage + ConversationStorage + CheckpointStorage + TaskContextStorage
{
    /// The backend kind (`memory`, `sqlite`, ...), for reports and metric labels. Layers
    /// return the kind of the backend they wrap.
    fn kind(&self) -> &'static str;

    /// Where the data lives, without credentials: equal for two handles on one store
    /// (the same SQLite file; the same Redis server or cluster, database and key
    /// prefix; the same PostgreSQL server, database and schema), different for
    /// different stores. A store that lives only in this process (memory, in-memory
    /// SQLite) names its instance. `None` when the backend cannot tell. Layers return
    /// their inner backend's (a failover stack its primary's).
    ///
    /// Binds a migration's state file to its pair of stores, and lets `migrate` refuse
    /// a store copied onto itself.
    fn store_id(&self) -> Option<String> {
        None
    }

    /// The changes committed to the store by any process, for a cache in front of a
    /// store other processes share (see [`feed`](crate::feed)): the session, task
    /// context or thread each write touched, and when the feed is down or missed some.
    /// `None` when the backend has none (the memory backend: one process). Layers return
    /// their inner backend's (a failover stack its primary's). Each call is a new
    /// subscription; the first starts the backend's listener, so call it inside a tokio
    /// runtime.
    fn changes(&self) -> Option<crate::feed::ChangeFeed> {
        None
    }

    /// Opens connections and creates or migrates the schema. Idempotent.
    async fn initialize(&self) -> Result<()>;

    /// Flushes what is pending and releases connections. Idempotent; afterwards every
    /// other call fails with [`StorageError::Closed`].
    async fn close(&self) -> Result<()>;

    /// Checks that the backend answers and reports its state.
    async fn health_check(&self) -> Result<HealthReport>;

    /// Figures about the backend (record counts, sizes, layer counters).
    async fn get_metrics(&self) -> Result<MetricsReport>;

    /// Removes sessions whose `updated_at` is older than `max_idle`, with their messages
    /// and task context. Returns how many sessions were removed.
    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64>;
}

/// Typed helpers over [`TaskContextStorage`] for any serde type.
#[async_trait]
pub trait TaskContextExt: TaskContextStorage {
    /// Stores `context` serialized as JSON.
    async fn store_task_context_as<T: Serialize + Sync>(
        &self,
        session_id: &str,
        context: &T,
    ) -> Result<()> {
        let value = serde_json::to_value(context)
            .map_err(|e| StorageError::serialization("could not encode the task context", e))?;
        self.store_task_context(session_id, &value).await
    }

    /// Reads the context and decodes it as `T`.
    async fn get_task_context_as<T: DeserializeOwned>(
        &self,
        session_id: &str,
    ) -> Result<Option<T>> {
        match self.get_task_context(session_id).await? {
            None => Ok(None),
            Some(v) => serde_json::from_value(v).map(Some).map_err(|e| {
                StorageError::serialization("stored task context has another shape", e)
            }),
        }
    }
}

impl<S: TaskContextStorage + ?Sized> TaskContextExt for S {}

// Proves at compile time that the unified trait stays object-safe and shareable.
const _: fn(Arc<dyn StorageBackend>) -> Arc<dyn StorageBackend> = |b| b;
const _: fn() = || {
    fn shareable<T: Send + Sync + ?Sized>() {}
    shareable::<dyn StorageBackend>();
};

/// Forwards every method of the contract from `$ty` to `self.$($inner)*`. Written once
/// so that `Arc<T>` and `Box<T>` (and any plain wrapper) pass calls through unchanged.
macro_rules! forward_storage {
    (impl[$($gen:tt)*] for $ty:ty => |$s:ident| $inner:expr) => {
        #[async_trait]
        impl<$($gen)*> SessionStorage for $ty {
            async fn create_session(&self, session_id: &str, user_id: &str, metadata: &Metadata) -> Result<Session> {
                let $s = self; $inner.create_session(session_id, user_id, metadata).await
            }
            async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
                let $s = self; $inner.get_session(session_id).await
            }
            async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
                let $s = self; $inner.update_session(session_id, update).await
            }
            async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
                let $s = self; $inner.end_session(session_id, status).await
            }
            async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
                let $s = self; $inner.batch_create_sessions(sessions).await
            }
            async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
                let $s = self; $inner.batch_get_sessions(session_ids).await
            }
            async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
                let $s = self; $inner.list_sessions(query).await
            }
            async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
                let $s = self; $inner.restore_sessions(sessions).await
            }
            async fn delete_session(&self, session_id: &str) -> Result<bool> {
                let $s = self; $inner.delete_session(session_id).await
            }
        }

        #[async_trait]
        impl<$($gen)*> ConversationStorage for $ty {
            async fn add_conversation_message(&self, session_id: &str, message: &NewMessage) -> Result<String> {
                let $s = self; $inner.add_conversation_message(session_id, message).await
            }
            async fn batch_add_conversation_messages(&self, messages: &[(String, NewMessage)]) -> Result<Vec<Result<String>>> {
                let $s = self; $inner.batch_add_conversation_messages(messages).await
            }
            async fn get_conversation_history(&self, session_id: &str, limit: usize) -> Result<Vec<Message>> {
                let $s = self; $inner.get_conversation_history(session_id, limit).await
            }
            async fn get_conversation_range(&self, session_id: &str, offset: u64, limit: usize) -> Result<Vec<Message>> {
                let $s = self; $inner.get_conversation_range(session_id, offset, limit).await
            }
            async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
                let $s = self; $inner.restore_messages(session_id, messages).await
            }
        }

        #[async_trait]
        impl<$($gen)*> CheckpointStorage for $ty {
            async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
                let $s = self; $inner.store_checkpoint(checkpoint).await
            }
            async fn get_checkpoint(&self, thread_id: &str, checkpoint_ns: &str, checkpoint_id: Option<&str>) -> Result<Option<Checkpoint>> {
                let $s = self; $inner.get_checkpoint(thread_id, checkpoint_ns, checkpoint_id).await
            }
            async fn list_checkpoints(&self, thread_id: &str, checkpoint_ns: &str, filter: &CheckpointFilter) -> Result<Vec<Checkpoint>> {
                let $s = self; $inner.list_checkpoints(thread_id, checkpoint_ns, filter).await
            }
            async fn put_writes(&self, thread_id: &str, checkpoint_ns: &str, checkpoint_id: &str, task_id: &str, writes: &[WriteInput]) -> Result<()> {
                let $s = self; $inner.put_writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes).await
            }
            async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
                let $s = self; $inner.batch_put_writes(items).await
            }
            async fn get_writes(&self, thread_id: &str, checkpoint_ns: &str, checkpoint_id: &str) -> Result<Vec<PendingWrite>> {
                let $s = self; $inner.get_writes(thread_id, checkpoint_ns, checkpoint_id).await
            }
            async fn delete_thread(&self, thread_id: &str) -> Result<()> {
                let $s = self; $inner.delete_thread(thread_id).await
            }
            async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
                let $s = self; $inner.list_threads(after, limit).await
            }
            async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
                let $s = self; $inner.list_checkpoint_namespaces(thread_id).await
            }
            async fn list_write_checkpoints(&self, thread_id: &str, checkpoint_ns: &str) -> Result<Vec<String>> {
                let $s = self; $inner.list_write_checkpoints(thread_id, checkpoint_ns).await
            }
            async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
                let $s = self; $inner.restore_checkpoints(checkpoints).await
            }
        }

        #[async_trait]
        impl<$($gen)*> TaskContextStorage for $ty {
            async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
                let $s = self; $inner.get_task_context(session_id).await
            }
            async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
                let $s = self; $inner.store_task_context(session_id, context).await
            }
            async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
                let $s = self; $inner.list_task_contexts(after, limit).await
            }
        }

        #[async_trait]
        impl<$($gen)*> StorageBackend for $ty {
            fn kind(&self) -> &'static str {
                let $s = self; $inner.kind()
            }
            fn store_id(&self) -> Option<String> {
                let $s = self; $inner.store_id()
            }
            fn changes(&self) -> Option<crate::feed::ChangeFeed> {
                let $s = self; $inner.changes()
            }
            async fn initialize(&self) -> Result<()> {
                let $s = self; $inner.initialize().await
            }
            async fn close(&self) -> Result<()> {
                let $s = self; $inner.close().await
            }
            async fn health_check(&self) -> Result<HealthReport> {
                let $s = self; $inner.health_check().await
            }
            async fn get_metrics(&self) -> Result<MetricsReport> {
                let $s = self; $inner.get_metrics().await
            }
            async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
                let $s = self; $inner.cleanup_expired_sessions(max_idle).await
            }
        }
    };
}

forward_storage!(impl[T: StorageBackend + ?Sized] for Arc<T> => |s| (**s));
forward_storage!(impl[T: StorageBackend + ?Sized] for Box<T> => |s| (**s));
