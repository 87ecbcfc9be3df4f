//! An in-process backend on sharded concurrent maps.
//!
//! `mod.rs` holds the backend type, its maps and shared helpers; one file per storage
//! trait beside it.

mod checkpoints;
mod conversation;
mod lifecycle;
mod sessions;
mod task_context;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;
use serde_json::{json, Value};

use crate::error::{Result, StorageError};
use crate::model::{
    now, Checkpoint, Message, Metadata, NewMessage, PendingWrite, Session, SessionMetrics,
    SessionStatus, WriteInput,
};
use crate::validate;

/// Keeps everything in process memory, in sharded maps: calls on different sessions or
/// threads take different locks, so there is no global lock on the hot path. A session
/// and its messages live in one entry, which makes "append only if the session exists"
/// and cleanup atomic.
///
/// Data is lost when the backend is dropped. Good for tests, prototypes and as the
/// fallback of a failover stack.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::{MemoryBackend, SessionStorage, SessionUpdate};
/// let storage = MemoryBackend::new();
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// storage.update_session("s1", &SessionUpdate::new().increment_requests()).await?;
/// let session = storage.get_session("s1").await?.unwrap();
/// assert_eq!(session.metrics.request_count, 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MemoryBackend {
    /// Names this store in [`StorageBackend::store_id`]: it lives in this instance only.
    instance: uuid::Uuid,
    sessions: DashMap<String, SessionEntry>,
    threads: DashMap<String, HashMap<String, Namespace>>,
    task_contexts: DashMap<String, Value>,
    closed: AtomicBool,
}

#[derive(Debug)]
struct SessionEntry {
    session: Session,
    messages: Vec<Message>,
    message_ids: HashSet<String>,
}

/// One namespace of a thread: checkpoints in first-store order, so the last is latest.
#[derive(Debug, Default)]
struct Namespace {
    checkpoints: Vec<Checkpoint>,
    positions: HashMap<String, usize>,
    writes: HashMap<String, Writes>,
}

#[derive(Debug, Default)]
struct Writes {
    list: Vec<PendingWrite>,
    positions: HashMap<(String, u32), usize>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend {
            instance: uuid::Uuid::now_v7(),
            sessions: DashMap::new(),
            threads: DashMap::new(),
            task_contexts: DashMap::new(),
            closed: AtomicBool::new(false),
        }
    }
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    /// Creates the session or, if it exists, replaces its user and metadata.
    fn upsert(&self, session_id: &str, user_id: &str, metadata: &Metadata) -> Session {
        let t = now();
        let mut entry = self
            .sessions
            .entry(session_id.to_owned())
            .or_insert_with(|| SessionEntry {
                session: Session {
                    session_id: session_id.to_owned(),
                    user_id: String::new(),
                    created_at: t,
                    updated_at: t,
                    status: SessionStatus::ACTIVE.to_owned(),
                    metadata: Metadata::new(),
                    metrics: SessionMetrics::default(),
                },
                messages: Vec::new(),
                message_ids: HashSet::new(),
            });
        let s = &mut entry.session;
        s.user_id = user_id.to_owned();
        s.metadata = metadata.clone();
        s.updated_at = t;
        s.clone()
    }

    fn append(&self, session_id: &str, message: &NewMessage) -> Result<String> {
        validate::new_message(session_id, message)?;
        let mut entry = self
            .sessions
            .get_mut(session_id)
            .ok_or_else(|| StorageError::not_found("session", session_id))?;
        let message_id = message.id_or_generate();
        if entry.message_ids.contains(&message_id) {
            return Ok(message_id);
        }
        let timestamp = now();
        entry.message_ids.insert(message_id.clone());
        entry.messages.push(Message {
            message_id: message_id.clone(),
            role: message.role.clone(),
            content: message.content.clone(),
            timestamp,
            metadata: message.metadata.clone(),
        });
        entry.session.updated_at = timestamp;
        Ok(message_id)
    }

    fn store_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<()> {
        validate::writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)?;
        // Storing no writes must not make the thread or namespace appear in
        // `list_threads` / `list_checkpoint_namespaces` (they list what holds data).
        if writes.is_empty() {
            return Ok(());
        }
        let mut thread = self.threads.entry(thread_id.to_owned()).or_default();
        let stored = thread
            .entry(checkpoint_ns.to_owned())
            .or_default()
            .writes
            .entry(checkpoint_id.to_owned())
            .or_default();
        for (idx, write) in (0u32..).zip(writes) {
            let pending = PendingWrite {
                task_id: task_id.to_owned(),
                idx,
                channel: write.channel.clone(),
                value: write.value.clone(),
            };
            match stored.positions.get(&(task_id.to_owned(), idx)) {
                Some(&pos) => stored.list[pos] = pending,
                None => {
                    stored
                        .positions
                        .insert((task_id.to_owned(), idx), stored.list.len());
                    stored.list.push(pending);
                }
            }
        }
        Ok(())
    }

    fn counts(&self) -> Metadata {
        let messages: usize = self.sessions.iter().map(|e| e.messages.len()).sum();
        let (mut checkpoints, mut writes) = (0usize, 0usize);
        for thread in self.threads.iter() {
            for ns in thread.values() {
                checkpoints += ns.checkpoints.len();
                writes += ns.writes.values().map(|w| w.list.len()).sum::<usize>();
            }
        }
        let mut values = Metadata::new();
        values.insert("sessions".into(), json!(self.sessions.len()));
        values.insert("messages".into(), json!(messages));
        values.insert("checkpoints".into(), json!(checkpoints));
        values.insert("pending_writes".into(), json!(writes));
        values.insert("task_contexts".into(), json!(self.task_contexts.len()));
        values
    }
}
