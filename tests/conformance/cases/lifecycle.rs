//! Lifecycle: initialize, close, health, metrics and cleanup of idle sessions.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::{
    CheckpointFilter, HealthStatus, NewCheckpoint, NewMessage, NewSession, Result, SessionQuery,
    SessionUpdate, StorageBackend, StorageError, WriteInput,
};
use serde_json::json;

use super::{leaf, md};

#[track_caller]
fn assert_closed<T: Debug>(r: Result<T>, call: &str) {
    assert!(
        matches!(r, Err(StorageError::Closed)),
        "{call} after close: expected Err(Closed), got {r:?}"
    );
}

pub async fn initialize_twice_is_ok(b: Arc<dyn StorageBackend>) {
    // The target already initialized once; data written between calls survives.
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    b.add_conversation_message("s1", &NewMessage::new("user", "hi"))
        .await
        .unwrap();
    b.initialize().await.unwrap();
    b.initialize().await.unwrap();
    assert!(b.get_session("s1").await.unwrap().is_some());
    assert_eq!(b.get_conversation_history("s1", 10).await.unwrap().len(), 1);
}

pub async fn calls_after_close_fail_with_closed(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    b.store_checkpoint(&NewCheckpoint::new("t1", "c1", json!(1)))
        .await
        .unwrap();
    b.close().await.unwrap();

    let empty = md(json!({}));
    let msg = NewMessage::new("user", "hi");
    // Non-empty batches, so a loop over the items cannot skip the check.
    let ids = vec!["s1".to_string()];
    assert_closed(b.get_session("s1").await, "get_session");
    assert_closed(b.create_session("s2", "u1", &empty).await, "create_session");
    assert_closed(
        b.update_session("s1", &SessionUpdate::new().increment_requests())
            .await,
        "update_session",
    );
    assert_closed(b.end_session("s1", "completed").await, "end_session");
    assert_closed(
        b.batch_create_sessions(&[NewSession::new("s3", "u1")])
            .await,
        "batch_create_sessions",
    );
    assert_closed(b.batch_get_sessions(&ids).await, "batch_get_sessions");
    assert_closed(b.list_sessions(&SessionQuery::new()).await, "list_sessions");
    assert_closed(
        b.add_conversation_message("s1", &msg).await,
        "add_conversation_message",
    );
    assert_closed(
        b.batch_add_conversation_messages(&[("s1".to_string(), msg.clone())])
            .await,
        "batch_add_conversation_messages",
    );
    assert_closed(
        b.get_conversation_history("s1", 10).await,
        "get_conversation_history",
    );
    assert_closed(
        b.store_checkpoint(&NewCheckpoint::new("t1", "c2", json!(2)))
            .await,
        "store_checkpoint",
    );
    assert_closed(b.get_checkpoint("t1", "", None).await, "get_checkpoint");
    assert_closed(
        b.list_checkpoints("t1", "", &CheckpointFilter::new()).await,
        "list_checkpoints",
    );
    assert_closed(
        b.put_writes("t1", "", "c1", "task", &[WriteInput::new("ch", json!(1))])
            .await,
        "put_writes",
    );
    assert_closed(b.get_writes("t1", "", "c1").await, "get_writes");
    assert_closed(b.delete_thread("t1").await, "delete_thread");
    assert_closed(b.get_task_context("s1").await, "get_task_context");
    assert_closed(
        b.store_task_context("s1", &json!({})).await,
        "store_task_context",
    );
    assert_closed(b.health_check().await, "health_check");
    assert_closed(b.get_metrics().await, "get_metrics");
    assert_closed(
        b.cleanup_expired_sessions(Duration::from_secs(1)).await,
        "cleanup_expired_sessions",
    );
    assert_closed(b.initialize().await, "initialize");
    // Empty batches too: a backend must not answer them from an empty loop.
    assert_closed(b.batch_get_sessions(&[]).await, "empty batch_get_sessions");
    assert_closed(
        b.batch_create_sessions(&[]).await,
        "empty batch_create_sessions",
    );
    assert_closed(
        b.batch_add_conversation_messages(&[]).await,
        "empty batch_add_conversation_messages",
    );
    assert_closed(b.batch_put_writes(&[]).await, "empty batch_put_writes");
}

pub async fn close_twice_is_ok(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    b.close().await.unwrap();
    b.close().await.unwrap();
    assert_closed(b.get_session("s1").await, "get_session");
}

/// Every backend names its store, the same way on every call and after use, and never
/// with a password (the harness' URLs carry none, so a `@` would be one's place).
pub async fn store_id_names_the_store_steadily(b: Arc<dyn StorageBackend>) {
    let id = b
        .store_id()
        .expect("every backend of this crate names its store");
    assert!(id.starts_with(b.kind().split('_').next().unwrap()), "{id}");
    assert!(!id.contains('@'), "{id}");
    b.create_session("store-id", "u", &Default::default())
        .await
        .unwrap();
    assert_eq!(b.store_id().as_deref(), Some(id.as_str()));
}

pub async fn health_check_reports_healthy(b: Arc<dyn StorageBackend>) {
    let report = b.health_check().await.unwrap();
    assert_eq!(report.status, HealthStatus::Healthy);
    let backend = leaf(&report, |r| r.components.first());
    assert_eq!(backend.component, b.kind());
    assert_eq!(backend.status, HealthStatus::Healthy);
    assert!(!b.kind().is_empty());
    // Serializable for the CLI and health endpoints.
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["component"], report.component.as_str());
}

fn count(report: &aiecs_storage::MetricsReport, key: &str) -> u64 {
    let report = leaf(report, |r| r.components.first());
    report
        .values
        .get(key)
        .unwrap_or_else(|| panic!("metrics lack {key:?}: {:?}", report.values))
        .as_u64()
        .unwrap_or_else(|| panic!("metric {key:?} is not a count: {:?}", report.values[key]))
}

pub async fn metrics_count_records(b: Arc<dyn StorageBackend>) {
    let report = b.get_metrics().await.unwrap();
    assert_eq!(leaf(&report, |r| r.components.first()).component, b.kind());
    for key in [
        "sessions",
        "messages",
        "checkpoints",
        "pending_writes",
        "task_contexts",
    ] {
        assert_eq!(count(&report, key), 0, "{key} of an empty store");
    }

    for id in ["s1", "s2", "s3"] {
        b.create_session(id, "u1", &md(json!({}))).await.unwrap();
    }
    // An upsert is not a new session.
    b.create_session("s1", "u2", &md(json!({}))).await.unwrap();
    let report = b.get_metrics().await.unwrap();
    assert_eq!(count(&report, "sessions"), 3);

    for (s, id) in [
        ("s1", "m1"),
        ("s1", "m2"),
        ("s2", "m1"),
        ("s3", "m9"),
        ("s1", "m1"),
    ] {
        b.add_conversation_message(s, &NewMessage::new("user", "x").with_id(id))
            .await
            .unwrap();
    }
    for id in ["c1", "c2", "c1"] {
        b.store_checkpoint(&NewCheckpoint::new("t1", id, json!(1)))
            .await
            .unwrap();
    }
    b.store_checkpoint(&NewCheckpoint::new("t1", "c1", json!(1)).with_namespace("ns"))
        .await
        .unwrap();
    let two = [
        WriteInput::new("a", json!(1)),
        WriteInput::new("b", json!(2)),
    ];
    b.put_writes("t1", "", "c1", "task1", &two).await.unwrap();
    b.put_writes("t1", "", "c1", "task1", &two).await.unwrap();
    b.put_writes("t1", "", "c2", "task1", &two[..1])
        .await
        .unwrap();
    b.store_task_context("s1", &json!(1)).await.unwrap();
    b.store_task_context("s1", &json!(2)).await.unwrap();
    b.store_task_context("x", &json!(3)).await.unwrap();

    let report = b.get_metrics().await.unwrap();
    assert_eq!(leaf(&report, |r| r.components.first()).component, b.kind());
    assert_eq!(count(&report, "sessions"), 3);
    assert_eq!(count(&report, "messages"), 4);
    assert_eq!(count(&report, "checkpoints"), 3);
    assert_eq!(count(&report, "pending_writes"), 3);
    assert_eq!(count(&report, "task_contexts"), 2);
    serde_json::to_value(&report).unwrap();
}

pub async fn cleanup_removes_only_idle_sessions(b: Arc<dyn StorageBackend>) {
    for id in ["a", "b"] {
        b.create_session(id, "u1", &md(json!({}))).await.unwrap();
        b.add_conversation_message(id, &NewMessage::new("user", format!("{id} says hi")))
            .await
            .unwrap();
        b.store_task_context(id, &json!({"ctx": id})).await.unwrap();
    }
    // Nothing is idle for an hour yet.
    assert_eq!(
        b.cleanup_expired_sessions(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );

    tokio::time::sleep(Duration::from_millis(2500)).await;
    b.create_session("c", "u1", &md(json!({}))).await.unwrap();
    b.add_conversation_message("c", &NewMessage::new("user", "c says hi"))
        .await
        .unwrap();
    b.store_task_context("c", &json!({"ctx": "c"}))
        .await
        .unwrap();

    let removed = b
        .cleanup_expired_sessions(Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(removed, 2);
    for id in ["a", "b"] {
        assert_eq!(b.get_session(id).await.unwrap(), None, "session {id}");
        assert!(
            b.get_conversation_history(id, 10).await.unwrap().is_empty(),
            "messages of {id}"
        );
        assert_eq!(
            b.get_task_context(id).await.unwrap(),
            None,
            "context of {id}"
        );
    }
    assert!(b.get_session("c").await.unwrap().is_some());
    let h = b.get_conversation_history("c", 10).await.unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].content, "c says hi");
    assert_eq!(
        b.get_task_context("c").await.unwrap(),
        Some(json!({"ctx": "c"}))
    );

    // A re-created session starts with an empty history, not the removed one's.
    b.create_session("a", "u1", &md(json!({}))).await.unwrap();
    assert!(b
        .get_conversation_history("a", 10)
        .await
        .unwrap()
        .is_empty());
}
