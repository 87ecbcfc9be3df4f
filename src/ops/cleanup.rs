//! Removing idle sessions: one run ([`run_cleanup`]), or runs on an interval in a
//! background task ([`CleanupTask`]) that stops with the storage.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::error::{Result, StorageError};
use crate::storage::StorageBackend;

/// Removes the sessions idle longer than `max_idle`, with their messages and task
/// context, once ([`StorageBackend::cleanup_expired_sessions`]), and logs the outcome
/// with `tracing`: `INFO` with the count when sessions were removed, `DEBUG` when none
/// were, `WARN` on an error. Returns how many sessions were removed.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::time::Duration;
/// use aiecs_storage::ops::cleanup::run_cleanup;
/// use aiecs_storage::{prelude::*, MemoryBackend};
///
/// let storage = MemoryBackend::new();
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// // Nothing is idle for a day yet.
/// assert_eq!(run_cleanup(&storage, Duration::from_secs(24 * 3600)).await?, 0);
/// # Ok(()) }
/// ```
pub async fn run_cleanup(storage: &dyn StorageBackend, max_idle: Duration) -> Result<u64> {
    let started = Instant::now();
    let result = storage.cleanup_expired_sessions(max_idle).await;
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let max_idle_s = max_idle.as_secs_f64();
    match &result {
        Ok(0) => tracing::debug!(
            db.system.name = storage.kind(),
            removed = 0u64,
            max_idle_s,
            duration_ms,
            "storage cleanup: no expired sessions"
        ),
        Ok(removed) => tracing::info!(
            db.system.name = storage.kind(),
            removed = *removed,
            max_idle_s,
            duration_ms,
            "storage cleanup removed {removed} expired sessions"
        ),
        Err(e) => tracing::warn!(
            db.system.name = storage.kind(),
            max_idle_s,
            duration_ms,
            error.type = e.kind().as_str(),
            error.message = %e,
            "storage cleanup failed"
        ),
    }
    result
}

/// What a [`CleanupTask`] has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CleanupStats {
    /// Cleanup runs that finished (successful or not).
    pub runs: u64,
    /// Sessions removed, over all runs.
    pub removed: u64,
    /// Runs that failed.
    pub failures: u64,
    /// The error of the last failed run, if any.
    pub last_error: Option<String>,
    /// Whether the task ended because the storage was closed.
    pub storage_closed: bool,
}

#[derive(Default)]
struct Shared {
    runs: AtomicU64,
    removed: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    storage_closed: AtomicBool,
}

impl Shared {
    fn snapshot(&self) -> CleanupStats {
        CleanupStats {
            runs: self.runs.load(Ordering::Relaxed),
            removed: self.removed.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            storage_closed: self.storage_closed.load(Ordering::Relaxed),
        }
    }
}

/// A background task that runs [`run_cleanup`] on an interval.
///
/// The first run starts at once, the next ones `every` apart (a run that takes longer
/// than `every` delays the next one rather than causing a burst). Each run's count and
/// errors are logged as [`run_cleanup`] does; a failed run does not end the task, the
/// next one tries again.
///
/// The task ends when:
///
/// - [`CleanupTask::stop`] is called (it waits for the task to end, interrupting a run
///   in progress, and returns the figures),
/// - the handle is dropped (the task ends at its next step, without being waited for),
/// - the storage is closed: a run answered with [`StorageError::Closed`] ends it.
///
/// The task holds a reference to the storage until it ends.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use aiecs_storage::ops::cleanup::CleanupTask;
/// use aiecs_storage::{prelude::*, MemoryBackend};
///
/// let storage: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new());
/// // Every 10 minutes, remove sessions idle for more than a day.
/// let cleanup = CleanupTask::spawn(
///     storage.clone(),
///     Duration::from_secs(600),
///     Duration::from_secs(24 * 3600),
/// );
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// let stats = cleanup.stop().await;
/// assert_eq!(stats.failures, 0);
/// # Ok(()) }
/// ```
pub struct CleanupTask {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CleanupTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CleanupTask")
            .field("finished", &self.handle.is_finished())
            .field("stats", &self.shared.snapshot())
            .finish()
    }
}

impl CleanupTask {
    /// Starts the task: a cleanup of sessions idle longer than `max_idle` now, then
    /// every `every` (at least 1 ms; a shorter value is raised to it).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(
        storage: Arc<dyn StorageBackend>,
        every: Duration,
        max_idle: Duration,
    ) -> CleanupTask {
        let every = every.max(Duration::from_millis(1));
        let (stop, stopped) = oneshot::channel();
        let shared = Arc::new(Shared::default());
        let handle = tokio::spawn(run(storage, every, max_idle, stopped, shared.clone()));
        CleanupTask {
            stop,
            handle,
            shared,
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> CleanupStats {
        self.shared.snapshot()
    }

    /// Whether the task has ended (stopped, or the storage was closed).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops the task, interrupting a run in progress, waits until it has ended, and
    /// returns the figures.
    pub async fn stop(self) -> CleanupStats {
        let CleanupTask {
            stop,
            handle,
            shared,
        } = self;
        let _ = stop.send(());
        if let Err(e) = handle.await {
            if e.is_panic() {
                tracing::error!("storage cleanup task panicked: {e}");
            }
        }
        shared.snapshot()
    }
}

async fn run(
    storage: Arc<dyn StorageBackend>,
    every: Duration,
    max_idle: Duration,
    mut stopped: oneshot::Receiver<()>,
    shared: Arc<Shared>,
) {
    let backend = storage.kind();
    tracing::debug!(
        db.system.name = backend,
        every_s = every.as_secs_f64(),
        max_idle_s = max_idle.as_secs_f64(),
        "storage cleanup task started"
    );
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let reason = loop {
        // A send and a dropped handle both complete the receiver.
        tokio::select! {
            biased;
            _ = &mut stopped => break "stopped",
            _ = ticks.tick() => {}
        }
        let result = tokio::select! {
            biased;
            _ = &mut stopped => break "stopped",
            result = run_cleanup(storage.as_ref(), max_idle) => result,
        };
        shared.runs.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(removed) => {
                shared.removed.fetch_add(removed, Ordering::Relaxed);
            }
            Err(StorageError::Closed) => {
                shared.storage_closed.store(true, Ordering::Relaxed);
                break "the storage was closed";
            }
            Err(e) => {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
    };
    tracing::info!(
        db.system.name = backend,
        runs = shared.runs.load(Ordering::Relaxed),
        removed = shared.removed.load(Ordering::Relaxed),
        "storage cleanup task ended: {reason}"
    );
}
