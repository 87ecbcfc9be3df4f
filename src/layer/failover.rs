//! Failover to a second backend, with dual writes, a circuit breaker and hinted handoff.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::names::{self, LazyGauge, Tally};
use crate::error::{Result, StorageError};
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, HealthStatus, IdPage, Message, Metadata,
    MetricsReport, NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionPage,
    SessionQuery, SessionUpdate, TaskWrites, WriteInput,
};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
};

type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Serves from a fallback backend when the primary (the wrapped backend) fails.
///
/// - **Reads** go to the primary and fall back on transient errors.
/// - **Writes** go to both while the primary is healthy: the primary's answer is
///   returned; a fallback failure is counted and logged, never raised.
/// - **Circuit breaker**: after `failure_threshold` consecutive transient primary
///   failures the primary is not called for `cooldown`; then one call probes it and a
///   success closes the breaker.
/// - **Writes while the primary is down are kept, not lost** (hinted handoff): they are
///   stored in the fallback, acknowledged, and queued (bounded by `max_pending`) for
///   replay to the primary. Until the queue is replayed, reads and writes go to the
///   fallback, so nothing acknowledged is invisible; the replay runs in order when the
///   breaker lets a probe through, and only after it empties does the primary serve again.
///   When the queue is full, writes fail with [`StorageError::Unavailable`] instead of
///   being acknowledged and dropped.
///
/// The queue lives in memory: a process that dies while the primary is down keeps those
/// writes in the fallback only. The primary is assumed to keep what it acknowledged (a
/// Redis without persistence that restarts empty loses the writes made before its
/// crash). A replayed write carries the replay's timestamps on the primary; a replayed
/// counter increment is applied once, unless the primary applied it before reporting
/// a timeout.
///
/// Put a cache outside failover to keep serving hits however the backends fare; inside,
/// it only caches the primary's reads.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::sync::Arc;
/// use aiecs_storage::layer::FailoverLayer;
/// use aiecs_storage::{prelude::*, MemoryBackend, SqliteBackend};
/// use tower::Layer;
///
/// let fallback = Arc::new(SqliteBackend::in_memory());
/// let storage = FailoverLayer::new(fallback).layer(MemoryBackend::new());
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct FailoverLayer {
    fallback: Arc<dyn StorageBackend>,
    config: FailoverConfig,
    state: Arc<FailoverState>,
}

impl std::fmt::Debug for FailoverLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverLayer")
            .field("fallback", &self.fallback.kind())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct FailoverConfig {
    failure_threshold: u32,
    cooldown: Duration,
    max_pending: usize,
}

struct FailoverState {
    breaker: Mutex<Breaker>,
    /// Mirrors "the breaker is closed with no failures counted", so the healthy path
    /// reads one atomic instead of taking the breaker's lock on every call.
    tripped: AtomicBool,
    /// Writes acknowledged from the fallback, waiting for replay to the primary. An
    /// async lock: degraded writes and the replay hold it across their awaits, so a
    /// write queued during the replay is never reordered before an older one.
    pending: tokio::sync::Mutex<VecDeque<Hint>>,
    /// Set while writes are pending; reads and writes then go to the fallback.
    degraded: AtomicBool,
    primary_failures: Tally,
    fallback_reads: Tally,
    fallback_write_failures: Tally,
    replayed: Tally,
    dropped: Tally,
    queued: AtomicU64,
    breaker_metric: LazyGauge,
}

impl Default for FailoverState {
    fn default() -> Self {
        const fn event(name: &'static [(&'static str, &'static str)]) -> Tally {
            Tally::reported(names::FAILOVER_EVENTS_TOTAL, name)
        }
        FailoverState {
            breaker: Mutex::default(),
            tripped: AtomicBool::default(),
            pending: tokio::sync::Mutex::default(),
            degraded: AtomicBool::default(),
            primary_failures: event(&[("event", "primary_failure")]),
            fallback_reads: event(&[("event", "fallback_read")]),
            fallback_write_failures: event(&[("event", "fallback_write_failure")]),
            replayed: event(&[("event", "replayed_write")]),
            dropped: event(&[("event", "dropped_write")]),
            queued: AtomicU64::default(),
            breaker_metric: LazyGauge::default(),
        }
    }
}

#[derive(Debug, Default)]
enum Breaker {
    #[default]
    Closed,
    Counting(u32),
    Open(Instant),
    HalfOpen,
}

/// What the breaker says about one call.
#[derive(PartialEq)]
enum Permit {
    /// Call the primary.
    Primary,
    /// Call the primary as the half-open probe; its outcome decides the breaker.
    Probe,
    /// Do not call the primary.
    Denied,
}

impl FailoverState {
    fn permit(&self, cooldown: Duration) -> Permit {
        if !self.tripped.load(Ordering::Acquire) {
            return Permit::Primary;
        }
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match *b {
            Breaker::Closed | Breaker::Counting(_) => Permit::Primary,
            Breaker::Open(since) if since.elapsed() >= cooldown => {
                *b = Breaker::HalfOpen;
                self.breaker_metric.set(names::BREAKER_STATE, 1.0);
                Permit::Probe
            }
            Breaker::Open(_) | Breaker::HalfOpen => Permit::Denied,
        }
    }

    fn success(&self) {
        if !self.tripped.load(Ordering::Acquire) {
            return;
        }
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        *b = Breaker::Closed;
        self.tripped.store(false, Ordering::Release);
        self.breaker_metric.set(names::BREAKER_STATE, 0.0);
    }

    fn failure(&self, threshold: u32) {
        self.primary_failures.add(1);
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        *b = match *b {
            Breaker::Closed => Breaker::Counting(1),
            Breaker::Counting(n) if n + 1 < threshold => Breaker::Counting(n + 1),
            _ => Breaker::Open(Instant::now()),
        };
        if threshold <= 1 {
            *b = Breaker::Open(Instant::now());
        }
        self.tripped.store(true, Ordering::Release);
        if matches!(*b, Breaker::Open(_)) {
            self.breaker_metric.set(names::BREAKER_STATE, 2.0);
        }
    }

    fn breaker_name(&self) -> &'static str {
        match *self.breaker.lock().unwrap_or_else(|p| p.into_inner()) {
            Breaker::Closed | Breaker::Counting(_) => "closed",
            Breaker::Open(_) => "open",
            Breaker::HalfOpen => "half_open",
        }
    }
}

impl FailoverLayer {
    /// Fails over to `fallback`: 5 consecutive failures open the breaker for 10 s; up to
    /// 10 000 writes wait for replay.
    pub fn new(fallback: Arc<dyn StorageBackend>) -> Self {
        FailoverLayer {
            fallback,
            config: FailoverConfig {
                failure_threshold: 5,
                cooldown: Duration::from_secs(10),
                max_pending: 10_000,
            },
            state: Arc::default(),
        }
    }

    /// Sets how many consecutive transient primary failures open the breaker (at least 1).
    pub fn with_failure_threshold(mut self, failures: u32) -> Self {
        self.config.failure_threshold = failures.max(1);
        self
    }

    /// Sets how long an open breaker keeps the primary out before probing it.
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.cooldown = cooldown;
        self
    }

    /// Sets how many writes may wait for replay before new writes are refused.
    pub fn with_max_pending(mut self, max_pending: usize) -> Self {
        self.config.max_pending = max_pending;
        self
    }

    /// The breaker's state: `closed`, `open` or `half_open`.
    pub fn breaker_state(&self) -> &'static str {
        self.state.breaker_name()
    }

    /// Writes waiting for replay to the primary.
    pub fn pending_writes(&self) -> usize {
        self.state.queued.load(Ordering::Relaxed) as usize
    }

    /// Whether calls are being served by the fallback until the primary catches up.
    pub fn is_degraded(&self) -> bool {
        self.state.degraded.load(Ordering::Acquire)
    }
}

impl<B> tower_layer::Layer<B> for FailoverLayer {
    type Service = Failover<B>;

    fn layer(&self, primary: B) -> Self::Service {
        Failover {
            primary,
            fallback: self.fallback.clone(),
            config: self.config,
            state: self.state.clone(),
        }
    }
}

/// The wrapper a [`FailoverLayer`] puts around its primary.
pub struct Failover<B> {
    primary: B,
    fallback: Arc<dyn StorageBackend>,
    config: FailoverConfig,
    state: Arc<FailoverState>,
}

impl<B> std::fmt::Debug for Failover<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("fallback", &self.fallback.kind())
            .field("breaker", &self.state.breaker_name())
            .finish_non_exhaustive()
    }
}

/// A write acknowledged from the fallback, kept to replay on the primary.
enum Hint {
    CreateSession(NewSession),
    UpdateSession(String, SessionUpdate),
    EndSession(String, String),
    BatchCreateSessions(Vec<NewSession>),
    AddMessage(String, NewMessage),
    BatchAddMessages(Vec<(String, NewMessage)>),
    StoreCheckpoint(NewCheckpoint),
    PutWrites(TaskWrites),
    BatchPutWrites(Vec<TaskWrites>),
    DeleteThread(String),
    StoreTaskContext(String, Value),
    Cleanup(Duration),
    RestoreSessions(Vec<Session>),
    DeleteSession(String),
    RestoreMessages(String, Vec<Message>),
    RestoreCheckpoints(Vec<Checkpoint>),
}

impl Hint {
    async fn apply(&self, b: &dyn StorageBackend) -> Result<()> {
        match self {
            Hint::CreateSession(s) => b
                .create_session(&s.session_id, &s.user_id, &s.metadata)
                .await
                .map(drop),
            Hint::UpdateSession(id, u) => b.update_session(id, u).await.map(drop),
            Hint::EndSession(id, status) => b.end_session(id, status).await.map(drop),
            Hint::BatchCreateSessions(s) => b.batch_create_sessions(s).await.map(drop),
            Hint::AddMessage(id, m) => b.add_conversation_message(id, m).await.map(drop),
            Hint::BatchAddMessages(m) => b.batch_add_conversation_messages(m).await.map(drop),
            Hint::StoreCheckpoint(c) => b.store_checkpoint(c).await,
            Hint::PutWrites(w) => {
                b.put_writes(
                    &w.thread_id,
                    &w.checkpoint_ns,
                    &w.checkpoint_id,
                    &w.task_id,
                    &w.writes,
                )
                .await
            }
            Hint::BatchPutWrites(w) => b.batch_put_writes(w).await.map(drop),
            Hint::DeleteThread(t) => b.delete_thread(t).await,
            Hint::StoreTaskContext(id, v) => b.store_task_context(id, v).await,
            Hint::Cleanup(d) => b.cleanup_expired_sessions(*d).await.map(drop),
            Hint::RestoreSessions(s) => b.restore_sessions(s).await,
            Hint::DeleteSession(id) => b.delete_session(id).await.map(drop),
            Hint::RestoreMessages(id, m) => b.restore_messages(id, m).await.map(drop),
            Hint::RestoreCheckpoints(c) => b.restore_checkpoints(c).await,
        }
    }
}

impl<B: StorageBackend> Failover<B> {
    fn primary(&self) -> &dyn StorageBackend {
        &self.primary
    }

    fn fallback(&self) -> &dyn StorageBackend {
        self.fallback.as_ref()
    }

    fn degraded(&self) -> bool {
        self.state.degraded.load(Ordering::Acquire)
    }

    /// Replays pending writes to the primary when the breaker allows a probe. Only one
    /// caller replays at a time; the others keep using the fallback meanwhile.
    async fn try_replay(&self) {
        if !self.degraded() {
            return;
        }
        let Ok(mut pending) = self.state.pending.try_lock() else {
            return;
        };
        if self.state.permit(self.config.cooldown) == Permit::Denied {
            return;
        }
        while let Some(hint) = pending.front() {
            match hint.apply(self.primary()).await {
                Ok(()) => {
                    self.state.replayed.add(1);
                }
                Err(e) if e.is_transient() => {
                    self.state.failure(self.config.failure_threshold);
                    return;
                }
                Err(e) => {
                    // The primary refuses it for good (it lost the session it belongs to,
                    // say); the fallback keeps it. Skipping beats blocking every later write.
                    self.state.dropped.add(1);
                    tracing::warn!(error = %e, "failover: primary refused a replayed write");
                }
            }
            pending.pop_front();
            self.state.queued.fetch_sub(1, Ordering::Relaxed);
        }
        self.state.success();
        self.state.degraded.store(false, Ordering::Release);
    }

    async fn read<'a, T>(
        &'a self,
        run: impl Fn(&'a dyn StorageBackend) -> Fut<'a, T>,
    ) -> Result<T> {
        self.try_replay().await;
        if !self.degraded() && self.state.permit(self.config.cooldown) != Permit::Denied {
            match run(self.primary()).await {
                Ok(v) => {
                    self.state.success();
                    return Ok(v);
                }
                Err(e) if e.is_transient() => self.state.failure(self.config.failure_threshold),
                Err(e) => {
                    // The primary answered; a permanent error is the answer.
                    self.state.success();
                    return Err(e);
                }
            }
        }
        self.state.fallback_reads.add(1);
        run(self.fallback()).await
    }

    async fn write<'a, T>(
        &'a self,
        hint: impl FnOnce() -> Hint,
        run: impl Fn(&'a dyn StorageBackend) -> Fut<'a, T>,
    ) -> Result<T> {
        self.try_replay().await;
        // A call that waited for the queue while a replay emptied it goes to the primary:
        // queueing it would degrade the layer again, and under steady load it would never
        // leave the fallback.
        let mut queue = None;
        if self.degraded() {
            let pending = self.state.pending.lock().await;
            if self.degraded() {
                queue = Some(pending);
            }
        }
        if queue.is_none()
            && !self.degraded()
            && self.state.permit(self.config.cooldown) != Permit::Denied
        {
            match run(self.primary()).await {
                Ok(v) => {
                    self.state.success();
                    if let Err(e) = run(self.fallback()).await {
                        self.state.fallback_write_failures.add(1);
                        tracing::warn!(error = %e, "failover: fallback write failed");
                    }
                    return Ok(v);
                }
                Err(e) if e.is_transient() => self.state.failure(self.config.failure_threshold),
                Err(e) => {
                    self.state.success();
                    return Err(e);
                }
            }
        }
        let mut pending = match queue {
            Some(pending) => pending,
            None => self.state.pending.lock().await,
        };
        if pending.len() >= self.config.max_pending {
            return Err(StorageError::Unavailable {
                message: format!(
                    "primary is down and {} writes already wait for replay",
                    pending.len()
                ),
            });
        }
        let answer = run(self.fallback()).await?;
        pending.push_back(hint());
        self.state.queued.fetch_add(1, Ordering::Relaxed);
        self.state.degraded.store(true, Ordering::Release);
        Ok(answer)
    }

    fn figures(&self) -> Metadata {
        let s = &self.state;
        let mut m = Metadata::new();
        m.insert("breaker".into(), json!(s.breaker_name()));
        m.insert("degraded".into(), json!(self.degraded()));
        m.insert(
            "pending_writes".into(),
            json!(s.queued.load(Ordering::Relaxed)),
        );
        for (name, counter) in [
            ("primary_failures", &s.primary_failures),
            ("fallback_reads", &s.fallback_reads),
            ("fallback_write_failures", &s.fallback_write_failures),
            ("replayed_writes", &s.replayed),
            ("dropped_writes", &s.dropped),
        ] {
            m.insert(name.into(), json!(counter.get()));
        }
        m
    }
}

#[async_trait]
impl<B: StorageBackend> SessionStorage for Failover<B> {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        self.write(
            || {
                Hint::CreateSession(
                    NewSession::new(session_id, user_id).with_metadata(metadata.clone()),
                )
            },
            |b| b.create_session(session_id, user_id, metadata),
        )
        .await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        self.read(|b| b.get_session(session_id)).await
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        self.write(
            || Hint::UpdateSession(session_id.to_owned(), update.clone()),
            |b| b.update_session(session_id, update),
        )
        .await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        self.write(
            || Hint::EndSession(session_id.to_owned(), status.to_owned()),
            |b| b.end_session(session_id, status),
        )
        .await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        self.write(
            || Hint::BatchCreateSessions(sessions.to_vec()),
            |b| b.batch_create_sessions(sessions),
        )
        .await
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        self.read(|b| b.batch_get_sessions(session_ids)).await
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        self.write(
            || Hint::DeleteSession(session_id.to_owned()),
            |b| b.delete_session(session_id),
        )
        .await
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        self.write(
            || Hint::RestoreSessions(sessions.to_vec()),
            |b| b.restore_sessions(sessions),
        )
        .await
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        self.read(|b| b.list_sessions(query)).await
    }
}

#[async_trait]
impl<B: StorageBackend> ConversationStorage for Failover<B> {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        // One id for both backends and the replay, so each stores the message once.
        let message = message.with_fixed_id();
        let message = message.as_ref();
        self.write(
            || Hint::AddMessage(session_id.to_owned(), message.clone()),
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
            || Hint::BatchAddMessages(messages.to_vec()),
            |b| b.batch_add_conversation_messages(messages),
        )
        .await
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        self.write(
            || Hint::RestoreMessages(session_id.to_owned(), messages.to_vec()),
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
        self.read(|b| b.get_conversation_range(session_id, offset, limit))
            .await
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.read(|b| b.get_conversation_history(session_id, limit))
            .await
    }
}

#[async_trait]
impl<B: StorageBackend> CheckpointStorage for Failover<B> {
    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        self.write(
            || Hint::StoreCheckpoint(checkpoint.clone()),
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
        self.read(|b| b.get_checkpoint(thread_id, checkpoint_ns, checkpoint_id))
            .await
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        self.read(|b| b.list_checkpoints(thread_id, checkpoint_ns, filter))
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
            || {
                Hint::PutWrites(TaskWrites {
                    thread_id: thread_id.to_owned(),
                    checkpoint_ns: checkpoint_ns.to_owned(),
                    checkpoint_id: checkpoint_id.to_owned(),
                    task_id: task_id.to_owned(),
                    writes: writes.to_vec(),
                })
            },
            |b| b.put_writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes),
        )
        .await
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        self.write(
            || Hint::BatchPutWrites(items.to_vec()),
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
        self.read(|b| b.get_writes(thread_id, checkpoint_ns, checkpoint_id))
            .await
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        self.write(
            || Hint::RestoreCheckpoints(checkpoints.to_vec()),
            |b| b.restore_checkpoints(checkpoints),
        )
        .await
    }

    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.read(|b| b.list_threads(after, limit)).await
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        self.read(|b| b.list_checkpoint_namespaces(thread_id)).await
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        self.write(
            || Hint::DeleteThread(thread_id.to_owned()),
            |b| b.delete_thread(thread_id),
        )
        .await
    }
}

#[async_trait]
impl<B: StorageBackend> TaskContextStorage for Failover<B> {
    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        self.read(|b| b.get_task_context(session_id)).await
    }

    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.read(|b| b.list_task_contexts(after, limit)).await
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        self.write(
            || Hint::StoreTaskContext(session_id.to_owned(), context.clone()),
            |b| b.store_task_context(session_id, context),
        )
        .await
    }
}

#[async_trait]
impl<B: StorageBackend> StorageBackend for Failover<B> {
    fn kind(&self) -> &'static str {
        self.primary.kind()
    }

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
        let primary = self.primary.close().await;
        let fallback = self.fallback.close().await;
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
        let primary = report(self.primary.kind(), self.primary.health_check().await)?;
        let fallback = report(self.fallback.kind(), self.fallback.health_check().await)?;
        let healthy = |r: &HealthReport| r.status == HealthStatus::Healthy;
        let status = match (healthy(&primary), healthy(&fallback)) {
            (true, true) if !self.degraded() => HealthStatus::Healthy,
            (false, false) => HealthStatus::Unhealthy,
            _ => HealthStatus::Degraded,
        };
        Ok(HealthReport {
            component: "failover".to_owned(),
            status,
            latency: started.elapsed(),
            checked_at: now(),
            details: self.figures(),
            components: vec![primary, fallback],
        })
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        let mut components = Vec::with_capacity(2);
        match self.primary.get_metrics().await {
            Ok(m) => components.push(m),
            Err(e) if !e.is_transient() => return Err(e),
            Err(_) => {}
        }
        components.push(self.fallback.get_metrics().await?);
        Ok(MetricsReport {
            component: "failover".to_owned(),
            values: self.figures(),
            components,
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        self.write(
            || Hint::Cleanup(max_idle),
            |b| b.cleanup_expired_sessions(max_idle),
        )
        .await
    }
}
