//! Where each call goes: the primary under its deadline, the fallback, or both.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use serde_json::json;

use super::breaker::FailoverState;
use super::newer::now_us;
use super::replay::{replay_while_degraded, Hint, Queued, ReplayEnd};
use super::{Failover, FailoverConfig, Fut};
use crate::error::{Result, StorageError};
use crate::layer::Operation;
use crate::model::Metadata;
use crate::redact::redact_url;
use crate::storage::StorageBackend;

/// The primary's deadline for `operation`: none for the bulk operations (a cleanup
/// sweep, a restore, deleting a large thread) whose time grows with the data, since a
/// deadline would only make them fail over and be replayed, again too slow, for ever.
pub(super) fn primary_limit(config: &FailoverConfig, operation: Operation) -> Option<Duration> {
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
pub(super) async fn bounded<T>(
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

impl<B: StorageBackend + 'static> Failover<B> {
    pub(super) fn primary(&self) -> &dyn StorageBackend {
        self.primary.as_ref()
    }

    pub(super) fn fallback(&self) -> &dyn StorageBackend {
        self.fallback.as_ref()
    }

    /// Runs `call` on the primary under the layer's deadline for `operation`.
    pub(super) async fn on_primary<T>(
        &self,
        operation: Operation,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let limit = primary_limit(&self.config, operation);
        bounded(&self.state, limit, operation, call).await
    }

    pub(super) fn degraded(&self) -> bool {
        self.state.degraded.load(Ordering::Acquire)
    }

    /// Makes sure a replay task runs while writes wait for the primary. The task is the
    /// layer's, not a caller's: no caller giving up can cut a replay short. It holds the
    /// layer only weakly between tries, so dropping every wrapper ends it.
    pub(super) fn start_replay(&self) {
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

    pub(super) async fn read<'a, T>(
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
    pub(super) async fn write<'a, T>(
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
        let journal = self.state.journal.as_ref();
        if journal.is_none() && pending.len() >= self.config.max_pending {
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
        let seq = match journal {
            Some(j) => {
                // Degraded before the intent is written: a caller who gives up while the
                // journal's thread writes it leaves an entry there all the same, which a
                // degraded layer's replay finds (and clears the flag if there is none).
                self.state.degraded.store(true, Ordering::SeqCst);
                self.start_replay();
                let max_bytes = self.config.journal_max_bytes;
                let (seq, depth) = j.push(&entry, self.config.max_pending, max_bytes).await?;
                self.state.journal_seen(depth);
                Some(seq)
            }
            None => {
                pending.push_back(Queued {
                    hint: entry,
                    acked: now_us(),
                });
                self.state.queued.fetch_add(1, Ordering::Relaxed);
                self.state.degraded.store(true, Ordering::SeqCst);
                self.start_replay();
                None
            }
        };
        let answer = run(self.fallback()).await;
        let keep = match &answer {
            Ok(v) => keep(v),
            // The fallback may hold it: keep the entry, as for a dropped call.
            Err(e) => e.may_have_applied(),
        };
        match (journal, seq) {
            (Some(j), Some(seq)) => {
                if !keep {
                    // Left in the file, the intent is replayed without counters: harmless
                    // for a write the fallback refused, so the caller keeps its answer.
                    match j.remove(seq).await {
                        Ok(depth) => {
                            self.state.journal_seen(depth);
                            if depth.0 == 0 {
                                self.state.degraded.store(false, Ordering::Release);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "failover: journal entry not removed"),
                    }
                } else if answer.is_ok() {
                    // Before the caller is told: an entry left an intent is replayed
                    // without its counters, and this increment is now owed.
                    j.ack(seq).await?;
                }
            }
            _ if !keep => {
                pending.pop_back();
                self.state.queued.fetch_sub(1, Ordering::Relaxed);
                if pending.is_empty() {
                    self.state.degraded.store(false, Ordering::Release);
                }
            }
            _ => {
                // Still this call's entry: the queue has been held since it was queued.
                if let Some(back) = pending.back_mut().filter(|_| answer.is_ok()) {
                    back.acked = now_us();
                }
            }
        }
        answer
    }

    pub(super) async fn figures(&self) -> Metadata {
        let s = &self.state;
        let mut m = Metadata::new();
        m.insert("breaker".into(), json!(s.breaker_name()));
        m.insert("degraded".into(), json!(self.degraded()));
        let journal = match &s.journal {
            Some(j) => Some((j, j.depth().await)),
            None => None,
        };
        if let Some((_, Ok(depth))) = &journal {
            s.journal_seen(*depth);
        }
        m.insert(
            "pending_writes".into(),
            json!(s.queued.load(Ordering::Relaxed)),
        );
        if let Some((j, depth)) = journal {
            m.insert(
                "journal_path".into(),
                json!(redact_url(&j.path().display().to_string())),
            );
            match depth {
                Ok((depth, oldest)) => {
                    m.insert("journal_depth".into(), json!(depth));
                    m.insert(
                        "journal_oldest_age_seconds".into(),
                        json!(oldest.map_or(0.0, |d| d.as_secs_f64())),
                    );
                }
                Err(e) => {
                    m.insert("journal_error".into(), json!(e.to_string()));
                }
            }
        }
        for (name, counter) in [
            ("primary_failures", &s.primary_failures),
            ("primary_timeouts", &s.primary_timeouts),
            ("unreplayed_increments", &s.unreplayed_increments),
            ("fallback_reads", &s.fallback_reads),
            ("fallback_write_failures", &s.fallback_write_failures),
            ("replayed_writes", &s.replayed),
            ("dropped_writes", &s.dropped),
            ("replay_skipped_newer", &s.skipped_newer),
        ] {
            m.insert(name.into(), json!(counter.get()));
        }
        m
    }
}
