//! Cleanup of idle sessions: one run, and a background task that runs on an interval
//! and ends on `stop()`, on drop, and when the storage is closed.
//!
//! Timing: tiny intervals (50 ms) and idle limits (100 ms), with generous polling
//! loops; nothing asserts how fast the task is, only that it gets there.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::Operation;
use aiecs_storage::ops::cleanup::{run_cleanup, CleanupTask};
use aiecs_storage::prelude::*;
use aiecs_storage::{ErrorKind, MemoryBackend, Metadata};
use tracing::level_filters::LevelFilter;

mod common;

use common::capture::capture;
use common::fault::{Faults, Target};

const EVERY: Duration = Duration::from_millis(50);
const MAX_IDLE: Duration = Duration::from_millis(100);

/// Polls `condition` every 10 ms for up to 10 s; panics with `what` if it never holds.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..1000 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

async fn exists(storage: &dyn StorageBackend, id: &str) -> bool {
    storage.get_session(id).await.unwrap().is_some()
}

#[tokio::test]
async fn one_run_removes_idle_sessions_with_their_data() {
    let storage = MemoryBackend::new();
    for id in ["old1", "old2"] {
        storage
            .create_session(id, "u", &Metadata::new())
            .await
            .unwrap();
        storage
            .store_task_context(id, &serde_json::json!({"k": 1}))
            .await
            .unwrap();
    }
    tokio::time::sleep(MAX_IDLE * 2).await;
    storage
        .create_session("fresh", "u", &Metadata::new())
        .await
        .unwrap();
    assert_eq!(run_cleanup(&storage, MAX_IDLE).await.unwrap(), 2);
    assert!(!exists(&storage, "old1").await);
    assert!(storage.get_task_context("old2").await.unwrap().is_none());
    assert!(exists(&storage, "fresh").await);
    assert_eq!(run_cleanup(&storage, MAX_IDLE).await.unwrap(), 0);
}

#[tokio::test]
async fn one_run_reports_errors() {
    let storage = MemoryBackend::new();
    storage.close().await.unwrap();
    let err = run_cleanup(&storage, MAX_IDLE).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn the_task_removes_idle_sessions_within_a_few_intervals() {
    let backends: Vec<Arc<dyn StorageBackend>> = vec![
        Arc::new(MemoryBackend::new()),
        #[cfg(feature = "sqlite")]
        Arc::new(aiecs_storage::SqliteBackend::in_memory()),
    ];
    for storage in backends {
        let task = CleanupTask::spawn(storage.clone(), EVERY, MAX_IDLE);
        storage
            .create_session("idle", "u", &Metadata::new())
            .await
            .unwrap();
        storage
            .create_session("busy", "u", &Metadata::new())
            .await
            .unwrap();
        eventually("the idle session is removed", || async {
            // Keep one session busy: it must survive every run.
            storage
                .update_session("busy", &Default::default())
                .await
                .unwrap();
            !exists(storage.as_ref(), "idle").await
        })
        .await;
        assert!(exists(storage.as_ref(), "busy").await);
        assert!(!task.is_finished());
        let stats = task.stop().await;
        assert!(stats.runs >= 1, "{stats:?}");
        assert!(stats.removed >= 1, "{stats:?}");
        assert_eq!(stats.failures, 0, "{stats:?}");
        assert!(!stats.storage_closed);
    }
}

#[tokio::test]
async fn the_task_ends_when_the_storage_is_closed() {
    let storage: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new());
    let task = CleanupTask::spawn(storage.clone(), EVERY, MAX_IDLE);
    eventually("a first run", || async { task.stats().runs >= 1 }).await;
    storage.close().await.unwrap();
    eventually("the task ends after close()", || async {
        task.is_finished()
    })
    .await;
    let stats = task.stats();
    assert!(stats.storage_closed, "{stats:?}");
    assert_eq!(
        stats.failures, 0,
        "a closed storage is an end, not a failure"
    );
    // The task let go of the storage.
    assert_eq!(Arc::strong_count(&storage), 1);
    // stop() on an ended task returns at once.
    assert!(task.stop().await.storage_closed);
}

#[tokio::test]
async fn stop_ends_the_task_and_no_run_follows() {
    let (faulty, faults) = Faults::wrap(MemoryBackend::new());
    let storage: Arc<dyn StorageBackend> = Arc::new(faulty);
    let task = CleanupTask::spawn(storage.clone(), EVERY, MAX_IDLE);
    eventually("two runs", || async { task.stats().runs >= 2 }).await;
    let stats = task.stop().await;
    let calls = faults.calls(Operation::CleanupExpiredSessions);
    assert_eq!(calls, stats.runs, "{stats:?}");
    assert_eq!(
        Arc::strong_count(&storage),
        1,
        "the task let go of the storage"
    );

    storage
        .create_session("after-stop", "u", &Metadata::new())
        .await
        .unwrap();
    tokio::time::sleep(MAX_IDLE + EVERY * 4).await;
    assert_eq!(faults.calls(Operation::CleanupExpiredSessions), calls);
    assert!(exists(storage.as_ref(), "after-stop").await);
}

#[tokio::test]
async fn stop_interrupts_a_hung_run() {
    let (faulty, faults) = Faults::wrap(MemoryBackend::new());
    faults.set_latency(Duration::from_secs(60));
    let task = CleanupTask::spawn(Arc::new(faulty), EVERY, MAX_IDLE);
    tokio::time::sleep(EVERY).await;
    let stats = tokio::time::timeout(Duration::from_secs(5), task.stop())
        .await
        .expect("stop() returns while a run hangs");
    assert_eq!(stats.runs, 0);
}

#[tokio::test]
async fn dropping_the_handle_ends_the_task() {
    let (faulty, faults) = Faults::wrap(MemoryBackend::new());
    let storage: Arc<dyn StorageBackend> = Arc::new(faulty);
    let task = CleanupTask::spawn(storage.clone(), EVERY, MAX_IDLE);
    eventually("a first run", || async {
        faults.calls(Operation::CleanupExpiredSessions) >= 1
    })
    .await;
    drop(task);
    eventually("the task lets go of the storage", || async {
        Arc::strong_count(&storage) == 1
    })
    .await;
    let calls = faults.calls(Operation::CleanupExpiredSessions);
    tokio::time::sleep(EVERY * 4).await;
    assert_eq!(faults.calls(Operation::CleanupExpiredSessions), calls);
}

#[tokio::test]
async fn failed_runs_are_counted_and_the_task_goes_on() {
    let (faulty, faults) = Faults::wrap(MemoryBackend::new());
    faults.fail_next(
        Target::Op(Operation::CleanupExpiredSessions),
        2,
        ErrorKind::Connection,
    );
    let storage: Arc<dyn StorageBackend> = Arc::new(faulty);
    let task = CleanupTask::spawn(storage.clone(), EVERY, MAX_IDLE);
    storage
        .create_session("idle", "u", &Metadata::new())
        .await
        .unwrap();
    eventually("the idle session is removed after the failures", || async {
        !exists(storage.as_ref(), "idle").await
    })
    .await;
    let stats = task.stop().await;
    assert_eq!(stats.failures, 2, "{stats:?}");
    assert!(
        stats
            .last_error
            .as_deref()
            .unwrap()
            .contains("connection refused"),
        "{stats:?}"
    );
    assert!(stats.removed >= 1, "{stats:?}");
}

#[tokio::test]
async fn each_run_is_logged_with_its_count_and_errors() {
    let (log, _guard) = capture(LevelFilter::DEBUG);
    let (faulty, faults) = Faults::wrap(MemoryBackend::new());
    faults.fail_next(
        Target::Op(Operation::CleanupExpiredSessions),
        1,
        ErrorKind::Timeout,
    );
    let storage: Arc<dyn StorageBackend> = Arc::new(faulty);
    storage
        .create_session("idle", "u", &Metadata::new())
        .await
        .unwrap();
    let task = CleanupTask::spawn(storage.clone(), EVERY, MAX_IDLE);
    eventually("the idle session is removed", || async {
        !exists(storage.as_ref(), "idle").await
    })
    .await;
    task.stop().await;
    let warn = log.lines_at("WARN");
    assert!(
        warn.iter()
            .any(|l| l.contains("storage cleanup failed") && l.contains("error.type=\"timeout\"")),
        "{warn:?}"
    );
    let info = log.lines_at("INFO");
    assert!(
        info.iter()
            .any(|l| l.contains("storage cleanup removed 1 expired sessions")
                && l.contains("removed=1")),
        "{info:?}"
    );
    assert!(
        info.iter()
            .any(|l| l.contains("storage cleanup task ended: stopped")),
        "{info:?}"
    );
}

#[tokio::test]
async fn a_zero_interval_is_raised_not_a_panic() {
    let storage: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new());
    let task = CleanupTask::spawn(storage, Duration::ZERO, MAX_IDLE);
    eventually("runs happen", || async { task.stats().runs >= 3 }).await;
    task.stop().await;
}
