//! An in-process backend on sharded concurrent maps.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use serde_json::{json, Value};

use crate::error::{Result, StorageError};
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, IdPage, Message, Metadata, MetricsReport,
    NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionMetrics, SessionPage,
    SessionQuery, SessionStatus, SessionUpdate, TaskWrites, WriteInput,
};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
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

#[async_trait]
impl SessionStorage for MemoryBackend {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        self.check_open()?;
        validate::create_session(session_id, user_id, metadata)?;
        Ok(self.upsert(session_id, user_id, metadata))
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        Ok(self.sessions.get(session_id).map(|e| e.session.clone()))
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        self.check_open()?;
        validate::session_update(session_id, update)?;
        let Some(mut entry) = self.sessions.get_mut(session_id) else {
            return Ok(false);
        };
        let s = &mut entry.session;
        s.metadata
            .extend(update.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(status) = &update.status {
            s.status = status.clone();
        }
        // Counters saturate (see `SessionUpdate`), as on every backend.
        let (m, max) = (&mut s.metrics, i64::MAX as u64);
        m.request_count = m.request_count.saturating_add(update.add_requests).min(max);
        m.total_processing_time =
            (m.total_processing_time + update.add_processing_time).min(f64::MAX);
        m.error_count = m.error_count.saturating_add(update.add_errors).min(max);
        s.updated_at = now();
        Ok(true)
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        validate::status(status)?;
        let Some(mut entry) = self.sessions.get_mut(session_id) else {
            return Ok(false);
        };
        entry.session.status = status.to_owned();
        entry.session.updated_at = now();
        Ok(true)
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        self.check_open()?;
        validate::new_sessions(sessions)?;
        Ok(sessions
            .iter()
            .map(|s| self.upsert(&s.session_id, &s.user_id, &s.metadata))
            .collect())
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        self.check_open()?;
        validate::session_ids(session_ids)?;
        Ok(session_ids
            .iter()
            .map(|id| self.sessions.get(id).map(|e| e.session.clone()))
            .collect())
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        // The context goes while the session's entry is locked (present or not), so a
        // re-create of the session and a new context can never land between the two.
        let entry = self.sessions.entry(session_id.to_owned());
        self.task_contexts.remove(session_id);
        Ok(match entry {
            dashmap::Entry::Occupied(e) => {
                e.remove();
                true
            }
            dashmap::Entry::Vacant(_) => false,
        })
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        self.check_open()?;
        validate::restored_sessions(sessions)?;
        for s in sessions {
            self.sessions
                .entry(s.session_id.clone())
                .and_modify(|e| e.session = s.clone())
                .or_insert_with(|| SessionEntry {
                    session: s.clone(),
                    messages: Vec::new(),
                    message_ids: HashSet::new(),
                });
        }
        Ok(())
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        self.check_open()?;
        validate::session_query(query)?;
        let mut matching: Vec<Session> = self
            .sessions
            .iter()
            .filter(|e| query.after.as_deref().is_none_or(|a| e.key().as_str() > a))
            .filter(|e| query.matches(&e.session))
            .map(|e| e.session.clone())
            .collect();
        matching.sort_unstable_by(|a, b| a.session_id.cmp(&b.session_id));
        let more = matching.len() > query.limit;
        matching.truncate(query.limit);
        let next_cursor = more
            .then(|| matching.last().map(|s| s.session_id.clone()))
            .flatten();
        Ok(SessionPage {
            sessions: matching,
            next_cursor,
        })
    }
}

#[async_trait]
impl ConversationStorage for MemoryBackend {
    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        self.check_open()?;
        validate::restored_messages(session_id, messages)?;
        let mut entry = self
            .sessions
            .get_mut(session_id)
            .ok_or_else(|| StorageError::not_found("session", session_id))?;
        let mut stored = 0;
        for m in messages {
            if entry.message_ids.insert(m.message_id.clone()) {
                entry.messages.push(m.clone());
                stored += 1;
            }
        }
        Ok(stored)
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        Ok(self
            .sessions
            .get(session_id)
            .map(|e| {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(e.messages.len());
                let end = start.saturating_add(limit).min(e.messages.len());
                e.messages[start..end].to_vec()
            })
            .unwrap_or_default())
    }

    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        self.check_open()?;
        self.append(session_id, message)
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        self.check_open()?;
        validate::batch("messages", messages.len())?;
        Ok(messages
            .iter()
            .map(|(session_id, message)| self.append(session_id, message))
            .collect())
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        Ok(self
            .sessions
            .get(session_id)
            .map(|e| {
                let start = e.messages.len().saturating_sub(limit);
                e.messages[start..].to_vec()
            })
            .unwrap_or_default())
    }
}

#[async_trait]
impl CheckpointStorage for MemoryBackend {
    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.check_open()?;
        validate::page(after, limit)?;
        let mut ids: Vec<String> = self
            .threads
            .iter()
            .filter(|t| after.is_none_or(|a| t.key().as_str() > a))
            .map(|t| t.key().clone())
            .collect();
        ids.sort_unstable();
        Ok(IdPage::from_sorted(ids, limit))
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        self.check_open()?;
        validate::restored_checkpoints(checkpoints)?;
        for c in checkpoints {
            let mut thread = self.threads.entry(c.thread_id.clone()).or_default();
            let ns = thread.entry(c.checkpoint_ns.clone()).or_default();
            match ns.positions.get(&c.checkpoint_id) {
                Some(&pos) => ns.checkpoints[pos] = c.clone(),
                None => {
                    ns.positions
                        .insert(c.checkpoint_id.clone(), ns.checkpoints.len());
                    ns.checkpoints.push(c.clone());
                }
            }
        }
        Ok(())
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        self.check_open()?;
        validate::id("thread_id", thread_id)?;
        let mut namespaces: Vec<String> = self
            .threads
            .get(thread_id)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        namespaces.sort_unstable();
        Ok(namespaces)
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        self.check_open()?;
        validate::thread(thread_id, checkpoint_ns)?;
        let mut ids: Vec<String> = self
            .threads
            .get(thread_id)
            .and_then(|t| {
                t.get(checkpoint_ns).map(|ns| {
                    ns.writes
                        .iter()
                        .filter(|(_, w)| !w.list.is_empty())
                        .map(|(id, _)| id.clone())
                        .collect()
                })
            })
            .unwrap_or_default();
        ids.sort_unstable();
        Ok(ids)
    }

    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        self.check_open()?;
        validate::new_checkpoint(checkpoint)?;
        let mut thread = self
            .threads
            .entry(checkpoint.thread_id.clone())
            .or_default();
        let ns = thread.entry(checkpoint.checkpoint_ns.clone()).or_default();
        match ns.positions.get(&checkpoint.checkpoint_id) {
            Some(&pos) => {
                let stored = &mut ns.checkpoints[pos];
                stored.parent_checkpoint_id = checkpoint.parent_checkpoint_id.clone();
                stored.data = checkpoint.data.clone();
                stored.metadata = checkpoint.metadata.clone();
            }
            None => {
                ns.positions
                    .insert(checkpoint.checkpoint_id.clone(), ns.checkpoints.len());
                ns.checkpoints.push(Checkpoint {
                    thread_id: checkpoint.thread_id.clone(),
                    checkpoint_ns: checkpoint.checkpoint_ns.clone(),
                    checkpoint_id: checkpoint.checkpoint_id.clone(),
                    parent_checkpoint_id: checkpoint.parent_checkpoint_id.clone(),
                    data: checkpoint.data.clone(),
                    metadata: checkpoint.metadata.clone(),
                    created_at: now(),
                });
            }
        }
        Ok(())
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        self.check_open()?;
        validate::checkpoint_ref(thread_id, checkpoint_ns, checkpoint_id)?;
        let Some(thread) = self.threads.get(thread_id) else {
            return Ok(None);
        };
        let Some(ns) = thread.get(checkpoint_ns) else {
            return Ok(None);
        };
        Ok(match checkpoint_id {
            Some(id) => ns.positions.get(id).map(|&p| ns.checkpoints[p].clone()),
            None => ns.checkpoints.last().cloned(),
        })
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        self.check_open()?;
        validate::checkpoint_filter(thread_id, checkpoint_ns, filter)?;
        let Some(thread) = self.threads.get(thread_id) else {
            return Ok(Vec::new());
        };
        let Some(ns) = thread.get(checkpoint_ns) else {
            return Ok(Vec::new());
        };
        let end = match &filter.before {
            Some(before) => match ns.positions.get(before) {
                Some(&p) => p,
                None => return Ok(Vec::new()),
            },
            None => ns.checkpoints.len(),
        };
        Ok(ns.checkpoints[..end]
            .iter()
            .rev()
            .filter(|c| filter.matches(&c.metadata))
            .take(filter.limit)
            .cloned()
            .collect())
    }

    async fn put_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<()> {
        self.check_open()?;
        self.store_writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        self.check_open()?;
        validate::batch("items", items.len())?;
        Ok(items
            .iter()
            .map(|w| {
                self.store_writes(
                    &w.thread_id,
                    &w.checkpoint_ns,
                    &w.checkpoint_id,
                    &w.task_id,
                    &w.writes,
                )
            })
            .collect())
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        self.check_open()?;
        validate::checkpoint_ref(thread_id, checkpoint_ns, Some(checkpoint_id))?;
        Ok(self
            .threads
            .get(thread_id)
            .and_then(|t| {
                t.get(checkpoint_ns)
                    .and_then(|ns| ns.writes.get(checkpoint_id))
                    .map(|w| w.list.clone())
            })
            .unwrap_or_default())
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        self.check_open()?;
        validate::id("thread_id", thread_id)?;
        self.threads.remove(thread_id);
        Ok(())
    }
}

#[async_trait]
impl TaskContextStorage for MemoryBackend {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.check_open()?;
        validate::page(after, limit)?;
        let mut ids: Vec<String> = self
            .task_contexts
            .iter()
            .filter(|c| after.is_none_or(|a| c.key().as_str() > a))
            .map(|c| c.key().clone())
            .collect();
        ids.sort_unstable();
        Ok(IdPage::from_sorted(ids, limit))
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        Ok(self.task_contexts.get(session_id).map(|v| v.clone()))
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        self.check_open()?;
        validate::task_context(session_id, context)?;
        self.task_contexts
            .insert(session_id.to_owned(), context.clone());
        Ok(())
    }
}

#[async_trait]
impl StorageBackend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn store_id(&self) -> Option<String> {
        Some(format!("memory:{}", self.instance))
    }

    async fn initialize(&self) -> Result<()> {
        self.check_open()
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    async fn health_check(&self) -> Result<HealthReport> {
        self.check_open()?;
        let started = Instant::now();
        let mut details = Metadata::new();
        details.insert("sessions".into(), json!(self.sessions.len()));
        details.insert("threads".into(), json!(self.threads.len()));
        Ok(HealthReport::healthy(
            self.kind(),
            started.elapsed(),
            details,
        ))
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        self.check_open()?;
        Ok(MetricsReport {
            component: self.kind().to_owned(),
            values: self.counts(),
            components: Vec::new(),
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        self.check_open()?;
        let cutoff = validate::idle_cutoff(max_idle)?;
        // Candidates first, then each removed with its context under the session's
        // entry lock and only if still idle: a session re-created (and given a new
        // context) while cleanup runs keeps both. Lock order is sessions, then contexts,
        // as in delete_session; nothing takes them the other way round.
        let candidates: Vec<String> = self
            .sessions
            .iter()
            .filter(|e| e.session.updated_at < cutoff)
            .map(|e| e.key().clone())
            .collect();
        let mut removed = 0;
        for id in candidates {
            let gone = self.sessions.remove_if(&id, |id, entry| {
                let idle = entry.session.updated_at < cutoff;
                if idle {
                    self.task_contexts.remove(id);
                }
                idle
            });
            removed += u64::from(gone.is_some());
        }
        Ok(removed)
    }
}
