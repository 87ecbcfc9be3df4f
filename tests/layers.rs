//! Layer semantics driven through a fault-injecting backend.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::{Operation, RetryLayer, TimeoutLayer};
use aiecs_storage::{
    prelude::*, ErrorKind, MemoryBackend, Metadata, NewMessage, SessionUpdate, StorageError,
};
use common::fault::{Faults, Target};
use tower::Layer;

fn fast_retry() -> RetryLayer {
    RetryLayer::new()
        .with_max_attempts(4)
        .with_min_delay(Duration::from_millis(1))
        .with_max_delay(Duration::from_millis(5))
}

#[tokio::test]
async fn retry_recovers_from_transient_errors_and_counts_attempts() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let retry = fast_retry();
    let storage = retry.layer(inner);
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    faults.fail_next(Target::Op(Operation::GetSession), 3, ErrorKind::Connection);
    assert!(storage.get_session("s").await.unwrap().is_some());
    assert_eq!(faults.injected(), 3);
    assert_eq!(retry.retries(), 3);
    assert_eq!(faults.calls(Operation::GetSession), 1);
}

#[tokio::test]
async fn retry_gives_up_after_max_attempts() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let storage = fast_retry().layer(inner);
    faults.fail_next(Target::All, 10, ErrorKind::Timeout);
    let err = storage.get_session("s").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(faults.injected(), 4, "4 attempts, no more");
}

#[tokio::test]
async fn retry_never_repeats_permanent_errors() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let retry = fast_retry();
    let storage = retry.layer(inner);
    for kind in [
        ErrorKind::InvalidInput,
        ErrorKind::NotFound,
        ErrorKind::Serialization,
    ] {
        faults.fail_next(Target::All, 1, kind);
        assert_eq!(storage.get_session("s").await.unwrap_err().kind(), kind);
    }
    // Bad input straight from the backend is not retried either.
    let err = storage.get_session("").await.unwrap_err();
    assert!(matches!(
        err,
        StorageError::InvalidInput {
            field: "session_id",
            ..
        }
    ));
    assert_eq!(retry.retries(), 0);
}

#[tokio::test]
async fn retried_appends_are_stored_once() {
    // The fault fires after the inner call ran would be the worst case; here the first
    // attempt fails before reaching the backend, and the id assigned before it must be
    // the one stored, so a retry after a lost reply would dedupe.
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let storage = fast_retry().layer(inner);
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    faults.fail_next(
        Target::Op(Operation::AddConversationMessage),
        2,
        ErrorKind::Connection,
    );
    let id = storage
        .add_conversation_message("s", &NewMessage::new("user", "hi"))
        .await
        .unwrap();
    let history = storage.get_conversation_history("s", 10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].message_id, id);
}

#[tokio::test]
async fn counter_increments_are_not_retried_after_ambiguous_failures() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let storage = fast_retry().layer(inner);
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    let inc = SessionUpdate::new().increment_requests();
    faults.fail_next(Target::Op(Operation::UpdateSession), 1, ErrorKind::Timeout);
    assert_eq!(
        storage.update_session("s", &inc).await.unwrap_err().kind(),
        ErrorKind::Timeout
    );
    // Refused before running: safe to retry.
    faults.fail_next(
        Target::Op(Operation::UpdateSession),
        1,
        ErrorKind::Unavailable,
    );
    assert!(storage.update_session("s", &inc).await.unwrap());
    let s = storage.get_session("s").await.unwrap().unwrap();
    assert_eq!(s.metrics.request_count, 1);
    // A status change without counters is idempotent and is retried.
    faults.fail_next(Target::Op(Operation::UpdateSession), 1, ErrorKind::Timeout);
    assert!(storage
        .update_session("s", &SessionUpdate::new().status("busy"))
        .await
        .unwrap());
}

#[tokio::test]
async fn retry_non_idempotent_retries_an_ambiguous_increment() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let retry = fast_retry().with_retry_non_idempotent(true);
    let storage = retry.layer(inner);
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    faults.fail_next(Target::Op(Operation::UpdateSession), 1, ErrorKind::Timeout);
    let inc = SessionUpdate::new().increment_requests();
    assert!(storage.update_session("s", &inc).await.unwrap());
    assert_eq!(faults.injected(), 1);
    assert_eq!(
        retry.retries(),
        1,
        "at-least-once: the increment was sent again"
    );
}

#[tokio::test]
async fn retry_starts_no_attempt_after_max_elapsed() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    // Attempts to spare, but no time: the first failure is the answer.
    let retry = fast_retry().with_max_elapsed(Duration::ZERO);
    let storage = retry.layer(inner);
    faults.set_down(true);
    assert_eq!(
        storage.get_session("s").await.unwrap_err().kind(),
        ErrorKind::Connection
    );
    assert_eq!(faults.injected(), 1);
    assert_eq!(retry.retries(), 0);
    // (Whether the bound is `<` or `<=` cannot be observed: an elapsed time exactly
    // equal to the bound is never measured.)
}

#[tokio::test]
async fn retry_makes_exactly_max_attempts() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let retry = fast_retry().with_max_attempts(3);
    let storage = retry.layer(inner);
    faults.set_down(true);
    storage.get_session("s").await.unwrap_err();
    assert_eq!(faults.injected(), 3);
    assert_eq!(retry.retries(), 2);
}

#[tokio::test]
async fn timeout_returns_within_its_deadline() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let timeout = TimeoutLayer::new(Duration::from_millis(50));
    let storage = timeout.layer(inner);
    faults.set_latency(Duration::from_secs(30));
    let started = tokio::time::Instant::now();
    let err = storage.get_session("s").await.unwrap_err();
    assert!(matches!(
        err,
        StorageError::Timeout {
            operation: "get_session",
            ..
        }
    ));
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(timeout.timeouts(), 1);
}

#[tokio::test]
async fn retry_outside_timeout_retries_each_timed_out_attempt() {
    let (inner, faults) = Faults::wrap(Arc::new(MemoryBackend::new()) as Arc<dyn StorageBackend>);
    let retry = fast_retry();
    let storage = tower::ServiceBuilder::new()
        .layer(retry.clone())
        .layer(TimeoutLayer::new(Duration::from_millis(20)))
        .service(inner);
    faults.set_latency(Duration::from_secs(30));
    assert_eq!(
        storage.get_session("s").await.unwrap_err().kind(),
        ErrorKind::Timeout
    );
    assert_eq!(retry.retries(), 3);
}
