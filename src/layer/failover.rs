//! Failover to a second backend, with dual writes, a circuit breaker and hinted handoff.

use std::collections::VecDeque;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::names::{self, LazyGauge, Tally};
use super::Operation;
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
/// - **A deadline of its own** ([`with_primary_timeout`](FailoverLayer::with_primary_timeout),
///   1 s by default) bounds every call to the primary, so a primary that hangs (a frozen
///   server, a network that drops packets) counts as failing and the call is served by
///   the fallback. A timeout layer *outside* failover cancels the call before failover
///   sees any error, so failover could never engage on a hung primary without this
///   deadline; an outer deadline must be longer than this one plus a fallback call.
///   Bulk operations whose time grows with the data (`cleanup_expired_sessions`, the
///   `restore_*` calls, `delete_thread`) run without it.
/// - **Circuit breaker**: after `failure_threshold` consecutive transient primary
///   failures the primary is not called for `cooldown`; then one call probes it and a
///   success closes the breaker.
/// - **Writes while the primary is down are kept, not lost** (hinted handoff): they are
///   stored in the fallback, acknowledged, and queued (bounded by `max_pending`) for
///   replay to the primary. Until the queue is replayed, reads and writes go to the
///   fallback, so nothing acknowledged is invisible. A task of the layer's own replays
///   the queue in order whenever the breaker lets it (after each cooldown), whether or
///   not calls reach the layer (a cache in front may answer every read), and only after
///   the queue empties does the primary serve again. When the queue is full, writes fail with
///   [`StorageError::Unavailable`] instead of being acknowledged and dropped. A write
///   the fallback answers as changing nothing (`update_session` or `end_session` of a
///   session it lacks: `Ok(false)`) is not queued, so the primary never applies what
///   the caller was told did not happen.
///
/// # When the caller gives up
///
/// A caller may drop the call at any `.await` (an outer timeout, `select!`). What that
/// leaves behind:
///
/// - **A dropped probe counts as a failure**: the breaker opens again for a cooldown
///   instead of staying half-open with nobody to close it.
/// - **The replay is never cancelled by a caller**: it runs in the layer's task, so the
///   queue drains however the calls around it end.
/// - **A degraded write records its intent first**: the replay entry is queued before
///   the fallback is called and removed only if the fallback refuses the write for
///   good. A call dropped while the fallback writes (the write may land) keeps its
///   entry, so what the fallback holds also reaches the primary.
/// - **Counter increments are replayed at most once**: an increment whose attempt on
///   the primary may have applied (a timeout, a lost connection, a replay cut short) is
///   replayed without its counters (metadata and status still are), and counted as
///   `unreplayed_increments`. Each replay starts with a health check of the primary, so
///   a primary still down refuses the check, not a replayed increment.
/// - **A call dropped after the primary answered** may leave that write out of the
///   fallback (as a fallback failure would); the primary has it.
///
/// The queue lives in memory: a process that dies while the primary is down keeps those
/// writes in the fallback only. [`close`](crate::StorageBackend::close) tries one last
/// replay and fails (after closing both backends) if writes are left that only the
/// fallback holds. The primary is assumed to keep what it acknowledged (a Redis without
/// persistence that restarts empty loses the writes made before its crash). A replayed
/// write carries the replay's timestamps on the primary.
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
    primary_timeout: Option<Duration>,
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
    /// Held while a replay runs (by the replay task, or by `close`), so only one does.
    replay: tokio::sync::Mutex<()>,
    /// Whether a replay task is alive; it lives while writes wait, retrying whenever
    /// the breaker lets it, so the queue drains even when no call reaches the layer (a
    /// cache in front answering every read).
    replayer: AtomicBool,
    /// Set by `close`: the replay task stops.
    closed: AtomicBool,
    /// Set while a replayed write is on its way to the primary. Still set when a replay
    /// starts, the last one was cut short there and the front write may have applied.
    in_flight: AtomicBool,
    primary_failures: Tally,
    primary_timeouts: Tally,
    unreplayed_increments: Tally,
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
            replay: tokio::sync::Mutex::default(),
            replayer: AtomicBool::default(),
            closed: AtomicBool::default(),
            in_flight: AtomicBool::default(),
            primary_failures: event(&[("event", "primary_failure")]),
            primary_timeouts: event(&[("event", "primary_timeout")]),
            unreplayed_increments: event(&[("event", "unreplayed_increment")]),
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

/// Leave to call the primary, and the duty to tell the breaker how it went. A probe's
/// verdict is owed: dropped without one (the caller gave up), it counts as a failure, so
/// the breaker never stays half-open with nobody left to close it.
struct Verdict<S: Deref<Target = FailoverState>> {
    state: S,
    threshold: u32,
    probe: bool,
}

impl<S: Deref<Target = FailoverState>> Verdict<S> {
    fn success(mut self) {
        self.probe = false;
        self.state.success();
    }

    fn failure(mut self) {
        self.probe = false;
        self.state.failure(self.threshold);
    }
}

impl<S: Deref<Target = FailoverState>> Drop for Verdict<S> {
    fn drop(&mut self) {
        if self.probe {
            self.state.failure(self.threshold);
        }
    }
}

impl FailoverState {
    /// Leave to call the primary, or `None` while the breaker keeps it out.
    fn admit<S>(state: S, config: &FailoverConfig) -> Option<Verdict<S>>
    where
        S: Deref<Target = FailoverState>,
    {
        let probe = state.tripped.load(Ordering::Acquire) && {
            let mut b = state.breaker.lock().unwrap_or_else(|p| p.into_inner());
            match *b {
                Breaker::Closed | Breaker::Counting(_) => false,
                Breaker::Open(since) if since.elapsed() >= config.cooldown => {
                    *b = Breaker::HalfOpen;
                    state.breaker_metric.set(names::BREAKER_STATE, 1.0);
                    true
                }
                Breaker::Open(_) | Breaker::HalfOpen => return None,
            }
        };
        Some(Verdict {
            state,
            threshold: config.failure_threshold,
            probe,
        })
    }

    /// How long until the breaker lets a call through to the primary.
    fn probe_in(&self, cooldown: Duration) -> Duration {
        match *self.breaker.lock().unwrap_or_else(|p| p.into_inner()) {
            Breaker::Closed | Breaker::Counting(_) => Duration::ZERO,
            Breaker::Open(since) => cooldown.saturating_sub(since.elapsed()),
            // Another call is probing: look again after a cooldown.
            Breaker::HalfOpen => cooldown,
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
    /// Fails over to `fallback`: 5 consecutive failures open the breaker for 10 s; a
    /// primary call that takes over 1 s counts as failed; up to 10 000 writes wait for
    /// replay.
    pub fn new(fallback: Arc<dyn StorageBackend>) -> Self {
        FailoverLayer {
            fallback,
            config: FailoverConfig {
                failure_threshold: 5,
                cooldown: Duration::from_secs(10),
                max_pending: 10_000,
                primary_timeout: Some(Duration::from_secs(1)),
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

    /// Sets the deadline of each call to the primary (`None`: no deadline of its own).
    /// A call past it counts as a transient primary failure and is served by the
    /// fallback; a write past it may still land on the primary, so the replay of a
    /// counter increment omits the counters.
    pub fn with_primary_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.primary_timeout = timeout;
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
            primary: Arc::new(primary),
            fallback: self.fallback.clone(),
            config: self.config,
            state: self.state.clone(),
        }
    }
}

/// The wrapper a [`FailoverLayer`] puts around its primary.
pub struct Failover<B> {
    // Shared with the replay task, which outlives the call that starts it.
    primary: Arc<B>,
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
    /// Makes the hint safe to send again after an attempt whose outcome is unknown:
    /// everything but a counter increment is keyed or an upsert, and an increment is
    /// dropped from it (metadata and status stay), so no count is applied twice.
    fn settle_unknown(&mut self, state: &FailoverState) {
        if let Hint::UpdateSession(id, u) = self {
            if u.add_requests > 0 || u.add_errors > 0 || u.add_processing_time != 0.0 {
                u.add_requests = 0;
                u.add_errors = 0;
                u.add_processing_time = 0.0;
                state.unreplayed_increments.add(1);
                tracing::warn!(
                    session_id = %id,
                    "failover: a counter increment may already be on the primary; it is not replayed"
                );
            }
        }
    }

    fn operation(&self) -> Operation {
        match self {
            Hint::CreateSession(_) => Operation::CreateSession,
            Hint::UpdateSession(..) => Operation::UpdateSession,
            Hint::EndSession(..) => Operation::EndSession,
            Hint::BatchCreateSessions(_) => Operation::BatchCreateSessions,
            Hint::AddMessage(..) => Operation::AddConversationMessage,
            Hint::BatchAddMessages(_) => Operation::BatchAddConversationMessages,
            Hint::StoreCheckpoint(_) => Operation::StoreCheckpoint,
            Hint::PutWrites(_) => Operation::PutWrites,
            Hint::BatchPutWrites(_) => Operation::BatchPutWrites,
            Hint::DeleteThread(_) => Operation::DeleteThread,
            Hint::StoreTaskContext(..) => Operation::StoreTaskContext,
            Hint::Cleanup(_) => Operation::CleanupExpiredSessions,
            Hint::RestoreSessions(_) => Operation::RestoreSessions,
            Hint::DeleteSession(_) => Operation::DeleteSession,
            Hint::RestoreMessages(..) => Operation::RestoreMessages,
            Hint::RestoreCheckpoints(_) => Operation::RestoreCheckpoints,
        }
    }

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

/// The primary's deadline for `operation`: none for the bulk operations (a cleanup
/// sweep, a restore, deleting a large thread) whose time grows with the data, since a
/// deadline would only make them fail over and be replayed, again too slow, for ever.
fn primary_limit(config: &FailoverConfig, operation: Operation) -> Option<Duration> {
    match operation {
        Operation::CleanupExpiredSessions
        | Operation::RestoreSessions
        | Operation::RestoreMessages
        | Operation::RestoreCheckpoints
        | Operation::DeleteThread => None,
        _ => config.primary_timeout,
    }
}

/// Runs `call` on the primary under the layer's deadline for it.
async fn bounded<T>(
    state: &FailoverState,
    limit: Option<Duration>,
    operation: Operation,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    let mut call = std::pin::pin!(call);
    let Some(limit) = limit else {
        return call.await;
    };
    // A call that answers at once (an in-process primary) never arms a timer.
    let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
    if let Poll::Ready(result) = first {
        return result;
    }
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => {
            state.primary_timeouts.add(1);
            Err(StorageError::Timeout {
                operation: operation.as_str(),
                after: limit,
            })
        }
    }
}

/// Writes a replay sends with the queue held, before it lets waiting writers in.
const REPLAY_CHUNK: usize = 128;

/// Replays the queue to the primary in order, until it is empty (`Ok`; the layer is no
/// longer degraded) or the primary fails transiently (`Err`; the rest waits).
///
/// The queue is held while a chunk of writes is sent, then let go so that degraded
/// writers waiting for it (the lock is fair) queue theirs: each chunk shrinks the queue
/// by at least its size less the number of writers, so the replay catches up under
/// load, and writers wait at most one chunk. Handing the queue over between every
/// write instead let 32 writers take turns with the replay, which then drained a few
/// hundred writes a second.
///
/// A health check goes first: against a primary still down it fails without sending
/// anything, so a replayed counter increment is only ever sent to a primary that just
/// answered, and a failure then is a real "outcome unknown" (its counters are dropped)
/// rather than a refused connection.
async fn replay(
    primary: &dyn StorageBackend,
    state: &FailoverState,
    config: &FailoverConfig,
) -> Result<()> {
    let check = primary.health_check();
    bounded(state, config.primary_timeout, Operation::HealthCheck, check).await?;
    loop {
        let mut pending = state.pending.lock().await;
        if state.in_flight.swap(false, Ordering::AcqRel) {
            // The last replay was cut short while this write was on its way.
            if let Some(front) = pending.front_mut() {
                front.settle_unknown(state);
            }
        }
        for _ in 0..REPLAY_CHUNK {
            let Some(hint) = pending.front() else {
                state.degraded.store(false, Ordering::SeqCst);
                return Ok(());
            };
            let operation = hint.operation();
            let limit = primary_limit(config, operation);
            // Set while the write may be on the primary and still queued: cut short
            // here, the next replay treats it as possibly applied.
            state.in_flight.store(true, Ordering::Release);
            let result = bounded(state, limit, operation, hint.apply(primary)).await;
            match result {
                Ok(()) => state.replayed.add(1),
                Err(e) if e.is_transient() => {
                    state.in_flight.store(false, Ordering::Release);
                    if e.may_have_applied() {
                        if let Some(front) = pending.front_mut() {
                            front.settle_unknown(state);
                        }
                    }
                    return Err(e);
                }
                Err(e) => {
                    // The primary refuses it for good (it lost the session it belongs
                    // to, say); the fallback keeps it. Skipping beats blocking every
                    // later write.
                    state.dropped.add(1);
                    tracing::warn!(error = %e, "failover: primary refused a replayed write");
                }
            }
            // Only a replay removes from the front, and only one replay runs.
            pending.pop_front();
            state.queued.fetch_sub(1, Ordering::Relaxed);
            state.in_flight.store(false, Ordering::Release);
        }
    }
}

/// Why the replay task's loop ended.
enum ReplayEnd {
    /// Nothing waits, or the layer was closed.
    Done,
    /// No wrapper is left to replay through: the task ends for good.
    Orphaned,
}

/// The replay task's loop: waits for the breaker, replays, and again, until nothing
/// waits, the layer is closed, or no wrapper is left.
async fn replay_while_degraded<B: StorageBackend>(
    primary: &std::sync::Weak<B>,
    state: &std::sync::Weak<FailoverState>,
    config: &FailoverConfig,
) -> ReplayEnd {
    loop {
        let wait = {
            let Some(s) = state.upgrade() else {
                return ReplayEnd::Orphaned;
            };
            if !s.degraded.load(Ordering::SeqCst) || s.closed.load(Ordering::SeqCst) {
                return ReplayEnd::Done;
            }
            s.probe_in(config.cooldown)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
            continue;
        }
        let (Some(primary), Some(s)) = (primary.upgrade(), state.upgrade()) else {
            return ReplayEnd::Orphaned;
        };
        let Some(verdict) = FailoverState::admit(s.clone(), config) else {
            // Another call holds the probe: look again after a while.
            tokio::time::sleep(config.cooldown.max(Duration::from_millis(1))).await;
            continue;
        };
        let _running = s.replay.lock().await;
        if s.closed.load(Ordering::SeqCst) {
            // `close` replayed what it could; what is left is reported there.
            drop(verdict);
            return ReplayEnd::Done;
        }
        match replay(primary.as_ref(), &s, config).await {
            Ok(()) => verdict.success(),
            Err(_) => verdict.failure(),
        }
    }
}

impl<B: StorageBackend + 'static> Failover<B> {
    fn primary(&self) -> &dyn StorageBackend {
        self.primary.as_ref()
    }

    fn fallback(&self) -> &dyn StorageBackend {
        self.fallback.as_ref()
    }

    /// Runs `call` on the primary under the layer's deadline for `operation`.
    async fn on_primary<T>(
        &self,
        operation: Operation,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let limit = primary_limit(&self.config, operation);
        bounded(&self.state, limit, operation, call).await
    }

    fn degraded(&self) -> bool {
        self.state.degraded.load(Ordering::Acquire)
    }

    /// Makes sure a replay task runs while writes wait for the primary. The task is the
    /// layer's, not a caller's: no caller giving up can cut a replay short. It holds the
    /// layer only weakly between tries, so dropping every wrapper ends it.
    fn start_replay(&self) {
        if !self.state.degraded.load(Ordering::SeqCst)
            || self.state.replayer.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let primary = Arc::downgrade(&self.primary);
        let state = Arc::downgrade(&self.state);
        let config = self.config;
        tokio::spawn(async move {
            loop {
                let end = replay_while_degraded(&primary, &state, &config).await;
                let Some(s) = state.upgrade() else { return };
                s.replayer.store(false, Ordering::SeqCst);
                if matches!(end, ReplayEnd::Orphaned) {
                    // The next wrapper's first call starts a task of its own.
                    return;
                }
                // A write queued while this task was ending found it still alive and
                // started none: take over again rather than leave it waiting. SeqCst on
                // both sides, so this task or that writer sees the other.
                let wanted = s.degraded.load(Ordering::SeqCst) && !s.closed.load(Ordering::SeqCst);
                if !wanted || s.replayer.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }

    async fn read<'a, T>(
        &'a self,
        operation: Operation,
        run: impl Fn(&'a dyn StorageBackend) -> Fut<'a, T>,
    ) -> Result<T> {
        self.start_replay();
        if !self.degraded() {
            if let Some(verdict) = FailoverState::admit(&*self.state, &self.config) {
                match self.on_primary(operation, run(self.primary())).await {
                    Ok(v) => {
                        verdict.success();
                        return Ok(v);
                    }
                    Err(e) if e.is_transient() => verdict.failure(),
                    Err(e) => {
                        // The primary answered; a permanent error is the answer.
                        verdict.success();
                        return Err(e);
                    }
                }
            }
        }
        self.state.fallback_reads.add(1);
        run(self.fallback()).await
    }

    /// A write: to the primary and then the fallback while the primary is healthy; to
    /// the fallback and the replay queue otherwise. `keep` says whether a fallback
    /// answer changed anything worth replaying.
    async fn write<'a, T>(
        &'a self,
        operation: Operation,
        hint: impl FnOnce() -> Hint,
        keep: impl FnOnce(&T) -> bool,
        run: impl Fn(&'a dyn StorageBackend) -> Fut<'a, T>,
    ) -> Result<T> {
        self.start_replay();
        // Whether the primary may hold this write although it failed.
        let mut maybe_on_primary = false;
        let mut asked_primary = false;
        let mut pending = loop {
            if !asked_primary && !self.degraded() {
                asked_primary = true;
                if let Some(verdict) = FailoverState::admit(&*self.state, &self.config) {
                    match self.on_primary(operation, run(self.primary())).await {
                        Ok(v) => {
                            verdict.success();
                            if let Err(e) = run(self.fallback()).await {
                                self.state.fallback_write_failures.add(1);
                                tracing::warn!(error = %e, "failover: fallback write failed");
                            }
                            return Ok(v);
                        }
                        Err(e) if e.is_transient() => {
                            maybe_on_primary = e.may_have_applied();
                            verdict.failure();
                        }
                        Err(e) => {
                            verdict.success();
                            return Err(e);
                        }
                    }
                }
            }
            // The queue is held across the fallback write, so writes reach the fallback
            // in the order they are queued and the primary sees them in that order too.
            let pending = self.state.pending.lock().await;
            if asked_primary || self.degraded() {
                break pending;
            }
            // A replay emptied the queue while this call waited for it: the primary
            // serves again (queueing would degrade the layer anew, and under steady load
            // it would never leave the fallback).
        };
        if pending.len() >= self.config.max_pending {
            return Err(StorageError::Unavailable {
                message: format!(
                    "primary is down and {} writes already wait for replay",
                    pending.len()
                ),
            });
        }
        // Intent first: if the caller gives up during the fallback write, which may land,
        // the entry stays and the primary gets the write too.
        let mut entry = hint();
        if maybe_on_primary {
            entry.settle_unknown(&self.state);
        }
        pending.push_back(entry);
        self.state.queued.fetch_add(1, Ordering::Relaxed);
        self.state.degraded.store(true, Ordering::SeqCst);
        self.start_replay();
        let answer = run(self.fallback()).await;
        let keep = match &answer {
            Ok(v) => keep(v),
            // The fallback may hold it: keep the entry, as for a dropped call.
            Err(e) => e.may_have_applied(),
        };
        if !keep {
            pending.pop_back();
            self.state.queued.fetch_sub(1, Ordering::Relaxed);
            if pending.is_empty() {
                self.state.degraded.store(false, Ordering::Release);
            }
        }
        answer
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
            ("primary_timeouts", &s.primary_timeouts),
            ("unreplayed_increments", &s.unreplayed_increments),
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
    fn kind(&self) -> &'static str {
        self.primary.kind()
    }

    fn store_id(&self) -> Option<String> {
        self.primary.store_id()
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
        if left > 0 {
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
        let primary = self.on_primary(Operation::GetMetrics, self.primary.get_metrics());
        match primary.await {
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
            Operation::CleanupExpiredSessions,
            || Hint::Cleanup(max_idle),
            |_| true,
            |b| b.cleanup_expired_sessions(max_idle),
        )
        .await
    }
}
