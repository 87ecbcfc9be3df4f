//! The circuit breaker, its verdict guard and the layer's counters.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::journal::{Depth, Journal};
use super::newer::Marks;
use super::replay::Queued;
use super::FailoverConfig;
use crate::layer::names::{self, LazyGauge, Tally};

pub(super) struct FailoverState {
    pub(super) breaker: Mutex<Breaker>,
    /// Mirrors "the breaker is closed with no failures counted", so the healthy path
    /// reads one atomic instead of taking the breaker's lock on every call.
    pub(super) tripped: AtomicBool,
    /// Writes acknowledged from the fallback, waiting for replay to the primary. An
    /// async lock: degraded writes and the replay hold it across their awaits, so a
    /// write queued during the replay is never reordered before an older one.
    pub(super) pending: tokio::sync::Mutex<VecDeque<Queued>>,
    /// The in-memory queue's replay marks (a journal keeps its own): see
    /// [`newer`](super::newer). Emptied with the queue.
    pub(super) marks: Mutex<Marks>,
    /// Set while writes are pending; reads and writes then go to the fallback.
    pub(super) degraded: AtomicBool,
    /// Held while a replay runs (by the replay task, or by `close`), so only one does.
    pub(super) replay: tokio::sync::Mutex<()>,
    /// Whether a replay task is alive; it lives while writes wait, retrying whenever
    /// the breaker lets it, so the queue drains even when no call reaches the layer (a
    /// cache in front answering every read).
    pub(super) replayer: AtomicBool,
    /// Set by `close`: the replay task stops.
    pub(super) closed: AtomicBool,
    /// Set while a replayed write is on its way to the primary. Still set when a replay
    /// starts, the last one was cut short there and the front write may have applied.
    pub(super) in_flight: AtomicBool,
    pub(super) primary_failures: Tally,
    pub(super) primary_timeouts: Tally,
    pub(super) unreplayed_increments: Tally,
    pub(super) fallback_reads: Tally,
    pub(super) fallback_write_failures: Tally,
    pub(super) replayed: Tally,
    pub(super) dropped: Tally,
    /// Records a replay left out because the primary held a newer version of them.
    pub(super) skipped_newer: Tally,
    pub(super) queued: AtomicU64,
    /// Where writes wait instead of `pending`, when the layer has a journal. `pending`'s
    /// lock still orders this process's writers and replay.
    pub(super) journal: Option<Journal>,
    pub(super) breaker_metric: LazyGauge,
    pub(super) journal_depth_metric: LazyGauge,
    pub(super) journal_age_metric: LazyGauge,
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
            marks: Mutex::default(),
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
            skipped_newer: event(&[("event", "replay_skipped_newer")]),
            queued: AtomicU64::default(),
            journal: None,
            breaker_metric: LazyGauge::default(),
            journal_depth_metric: LazyGauge::default(),
            journal_age_metric: LazyGauge::default(),
        }
    }
}

#[derive(Debug, Default)]
pub(super) enum Breaker {
    #[default]
    Closed,
    Counting(u32),
    Open(Instant),
    HalfOpen,
}

/// Leave to call the primary, and the duty to tell the breaker how it went. A probe's
/// verdict is owed: dropped without one (the caller gave up), it counts as a failure, so
/// the breaker never stays half-open with nobody left to close it.
pub(super) struct Verdict<S: Deref<Target = FailoverState>> {
    pub(super) state: S,
    pub(super) threshold: u32,
    pub(super) probe: bool,
}

impl<S: Deref<Target = FailoverState>> Verdict<S> {
    pub(super) fn success(mut self) {
        self.probe = false;
        self.state.success();
    }

    pub(super) fn failure(mut self) {
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
    /// Takes in what the journal holds, as just read from it: the writes waiting, and
    /// the gauges that export them.
    pub(super) fn journal_seen(&self, (depth, oldest): Depth) {
        self.queued.store(depth, Ordering::Relaxed);
        self.journal_depth_metric
            .set(names::FAILOVER_JOURNAL_DEPTH, depth as f64);
        let age = oldest.map_or(0.0, |d| d.as_secs_f64());
        self.journal_age_metric
            .set(names::FAILOVER_JOURNAL_OLDEST_AGE_SECONDS, age);
    }

    /// Leave to call the primary, or `None` while the breaker keeps it out.
    pub(super) fn admit<S>(state: S, config: &FailoverConfig) -> Option<Verdict<S>>
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
    pub(super) fn probe_in(&self, cooldown: Duration) -> Duration {
        match *self.breaker.lock().unwrap_or_else(|p| p.into_inner()) {
            Breaker::Closed | Breaker::Counting(_) => Duration::ZERO,
            Breaker::Open(since) => cooldown.saturating_sub(since.elapsed()),
            // Another call is probing: look again after a cooldown.
            Breaker::HalfOpen => cooldown,
        }
    }

    pub(super) fn success(&self) {
        if !self.tripped.load(Ordering::Acquire) {
            return;
        }
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        *b = Breaker::Closed;
        self.tripped.store(false, Ordering::Release);
        self.breaker_metric.set(names::BREAKER_STATE, 0.0);
    }

    pub(super) fn failure(&self, threshold: u32) {
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

    pub(super) fn breaker_name(&self) -> &'static str {
        match *self.breaker.lock().unwrap_or_else(|p| p.into_inner()) {
            Breaker::Closed | Breaker::Counting(_) => "closed",
            Breaker::Open(_) => "open",
            Breaker::HalfOpen => "half_open",
        }
    }
}
