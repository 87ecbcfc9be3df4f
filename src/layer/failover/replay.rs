//! Writes acknowledged from the fallback, queued and replayed on the primary in order.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::breaker::FailoverState;
use super::journal::{Journal, Next};
use super::newer::{marks_under, now_us, plan, Micros, Payload, Plan};
use super::route::{bounded, primary_limit};
use super::FailoverConfig;
use crate::error::{Result, StorageError};
use crate::layer::Operation;
use crate::model::{
    Checkpoint, Message, NewCheckpoint, NewMessage, NewSession, Session, SessionUpdate, TaskWrites,
};
use crate::storage::StorageBackend;

/// A write acknowledged from the fallback, kept to replay on the primary. Serialized
/// into a journal, when the layer has one.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) enum Hint {
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
    pub(super) fn settle_unknown(&mut self, state: &FailoverState) {
        if self.drop_increments() {
            self.count_unreplayed(state);
        }
    }

    /// Drops the counter increments from the hint; whether it had any.
    pub(super) fn drop_increments(&mut self) -> bool {
        let Hint::UpdateSession(_, u) = self else {
            return false;
        };
        let had = u.add_requests > 0 || u.add_errors > 0 || u.add_processing_time != 0.0;
        u.add_requests = 0;
        u.add_errors = 0;
        u.add_processing_time = 0.0;
        had
    }

    /// Counts and logs the increments [`drop_increments`](Self::drop_increments) dropped.
    pub(super) fn count_unreplayed(&self, state: &FailoverState) {
        state.unreplayed_increments.add(1);
        if let Hint::UpdateSession(id, _) = self {
            tracing::warn!(
                session_id = %id,
                "failover: a counter increment may already be on the primary; it is not replayed"
            );
        }
    }

    pub(super) fn operation(&self) -> Operation {
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

    pub(super) async fn apply(&self, b: &dyn StorageBackend) -> Result<()> {
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

/// A write waiting in the in-memory queue.
pub(super) struct Queued {
    pub(super) hint: Hint,
    /// When it was acknowledged (until then, when it was queued).
    pub(super) acked: Micros,
}

/// Sends what `plan` says of `hint`; whether anything was sent.
async fn send(
    primary: &dyn StorageBackend,
    state: &FailoverState,
    config: &FailoverConfig,
    hint: &Hint,
    plan: &Plan,
) -> Result<bool> {
    let hint = match &plan.send {
        Payload::Whole => hint,
        Payload::Part(part) => part,
        Payload::Nothing => return Ok(false),
    };
    let operation = hint.operation();
    let limit = primary_limit(config, operation);
    bounded(state, limit, operation, hint.apply(primary))
        .await
        .map(|()| true)
}

/// Writes a replay sends with the queue held, before it lets waiting writers in.
pub(super) const REPLAY_CHUNK: usize = 128;

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
pub(super) async fn replay(
    primary: &dyn StorageBackend,
    state: &FailoverState,
    config: &FailoverConfig,
) -> Result<()> {
    if let Some(journal) = &state.journal {
        // Each attempt, so the gauges follow the oldest entry's age while the primary
        // stays down, and other processes' entries.
        state.journal_seen(journal.depth().await?);
    }
    let check = primary.health_check();
    bounded(state, config.primary_timeout, Operation::HealthCheck, check).await?;
    if let Some(journal) = &state.journal {
        return replay_journal(primary, state, config, journal).await;
    }
    loop {
        let mut pending = state.pending.lock().await;
        if state.in_flight.swap(false, Ordering::AcqRel) {
            // The last replay was cut short while this write was on its way.
            if let Some(front) = pending.front_mut() {
                front.hint.settle_unknown(state);
            }
        }
        for _ in 0..REPLAY_CHUNK {
            let Some(front) = pending.front() else {
                lock(&state.marks).clear();
                state.degraded.store(false, Ordering::SeqCst);
                return Ok(());
            };
            let marks = marks_under(&lock(&state.marks), &front.hint.mark_prefixes());
            let plan = plan(primary, state, config, &front.hint, front.acked, &marks).await?;
            // Set while the write may be on the primary and still queued: cut short
            // here, the next replay treats it as possibly applied.
            state.in_flight.store(true, Ordering::Release);
            let from = now_us();
            let result = send(primary, state, config, &front.hint, &plan).await;
            let to = now_us();
            match result {
                Ok(sent) => {
                    if sent {
                        state.replayed.add(1);
                    }
                    state.skipped_newer.add(plan.skipped);
                    lock(&state.marks).extend(plan.marks(from, to));
                }
                Err(e) if e.is_transient() => {
                    state.in_flight.store(false, Ordering::Release);
                    if e.may_have_applied() {
                        if let Some(front) = pending.front_mut() {
                            front.hint.settle_unknown(state);
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

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`replay`] from a journal: the same chunks under the same lock, with the journal's
/// lease and entry states in place of the in-memory queue and `in_flight`.
async fn replay_journal(
    primary: &dyn StorageBackend,
    state: &FailoverState,
    config: &FailoverConfig,
    journal: &Journal,
) -> Result<()> {
    loop {
        let _pending = state.pending.lock().await;
        for _ in 0..REPLAY_CHUNK {
            let (seq, mut hint, acked, marks) = match journal.next(config.journal_lease).await? {
                Next::Entry {
                    seq,
                    hint,
                    unknown,
                    acked,
                    marks,
                } => {
                    if unknown {
                        hint.count_unreplayed(state);
                    }
                    (seq, hint, acked, marks)
                }
                Next::Empty => {
                    state.journal_seen((0, None));
                    state.degraded.store(false, Ordering::SeqCst);
                    return Ok(());
                }
                // Transient: the breaker waits a cooldown and the task tries again.
                Next::Busy(why) => {
                    return Err(StorageError::Unavailable {
                        message: why.to_owned(),
                    })
                }
            };
            let plan = match plan(primary, state, config, &hint, acked, &marks).await {
                Ok(plan) => plan,
                Err(e) => {
                    // Nothing was sent: the entry waits as it was.
                    journal.put_back(seq, &hint).await?;
                    return Err(e);
                }
            };
            let from = now_us();
            let result = send(primary, state, config, &hint, &plan).await;
            let to = now_us();
            let marks = match result {
                Ok(sent) => {
                    if sent {
                        state.replayed.add(1);
                    }
                    state.skipped_newer.add(plan.skipped);
                    plan.marks(from, to)
                }
                Err(e) if e.is_transient() => {
                    if e.may_have_applied() {
                        hint.settle_unknown(state);
                    }
                    journal.put_back(seq, &hint).await?;
                    return Err(e);
                }
                Err(e) => {
                    state.dropped.add(1);
                    tracing::warn!(error = %e, "failover: primary refused a replayed write");
                    Vec::new()
                }
            };
            let depth = journal.complete(seq, marks).await?;
            state.journal_seen(depth);
        }
    }
}

/// Why the replay task's loop ended.
pub(super) enum ReplayEnd {
    /// Nothing waits, or the layer was closed.
    Done,
    /// No wrapper is left to replay through: the task ends for good.
    Orphaned,
}

/// The replay task's loop: waits for the breaker, replays, and again, until nothing
/// waits, the layer is closed, or no wrapper is left.
pub(super) async fn replay_while_degraded<B: StorageBackend>(
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
