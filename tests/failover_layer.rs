//! FailoverLayer semantics, driven through fault-injecting wrappers around both sides.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::{FailoverLayer, Operation};
use aiecs_storage::{
    prelude::*, ErrorKind, HealthStatus, MemoryBackend, Metadata, NewMessage, SessionUpdate,
};
use common::fault::{Faults, Target};
use tower::Layer;

struct Pair {
    storage: aiecs_storage::layer::Failover<
        aiecs_storage::layer::Layered<Arc<MemoryBackend>, common::fault::FaultPolicy>,
    >,
    layer: FailoverLayer,
    primary: Arc<MemoryBackend>,
    primary_faults: Faults,
    fallback: Arc<MemoryBackend>,
    fallback_faults: Faults,
}

fn pair(threshold: u32, cooldown: Duration) -> Pair {
    let primary = Arc::new(MemoryBackend::new());
    let fallback = Arc::new(MemoryBackend::new());
    let (p, primary_faults) = Faults::wrap(primary.clone());
    let (f, fallback_faults) = Faults::wrap(fallback.clone());
    let layer = FailoverLayer::new(Arc::new(f))
        .with_failure_threshold(threshold)
        .with_cooldown(cooldown);
    Pair {
        storage: layer.layer(p),
        layer,
        primary,
        primary_faults,
        fallback,
        fallback_faults,
    }
}

#[tokio::test]
async fn writes_go_to_both_and_reads_fall_back_on_transient_errors() {
    let p = pair(5, Duration::from_secs(60));
    p.storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    assert!(p.primary.get_session("s").await.unwrap().is_some());
    assert!(p.fallback.get_session("s").await.unwrap().is_some());

    p.primary_faults
        .fail_next(Target::Reads, 1, ErrorKind::Connection);
    assert!(p.storage.get_session("s").await.unwrap().is_some());
    assert_eq!(p.fallback_faults.calls(Operation::GetSession), 1);

    // A permanent error is the primary's answer, not a reason to fall back.
    p.primary_faults
        .fail_next(Target::Reads, 1, ErrorKind::Serialization);
    assert_eq!(
        p.storage.get_session("s").await.unwrap_err().kind(),
        ErrorKind::Serialization
    );
    assert_eq!(p.fallback_faults.calls(Operation::GetSession), 1);
}

#[tokio::test]
async fn a_failing_fallback_write_is_counted_not_raised() {
    let p = pair(5, Duration::from_secs(60));
    p.fallback_faults
        .fail_next(Target::Writes, 1, ErrorKind::Connection);
    p.storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    assert!(p.primary.get_session("s").await.unwrap().is_some());
    let report = p.storage.get_metrics().await.unwrap();
    assert_eq!(report.component, "failover");
    assert_eq!(report.values["fallback_write_failures"], 1);
}

#[tokio::test]
async fn the_breaker_opens_skips_the_primary_then_probes_and_closes() {
    let p = pair(3, Duration::from_millis(200));
    p.storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    p.primary_faults.set_down(true);
    for _ in 0..3 {
        assert!(p.storage.get_session("s").await.unwrap().is_some());
    }
    assert_eq!(p.layer.breaker_state(), "open");
    let injected = p.primary_faults.injected();
    for _ in 0..20 {
        assert!(p.storage.get_session("s").await.unwrap().is_some());
    }
    assert_eq!(
        p.primary_faults.injected(),
        injected,
        "an open breaker must not call the primary"
    );
    let health = p.storage.health_check().await.unwrap();
    assert_eq!(health.status, HealthStatus::Degraded);
    assert_eq!(health.details["breaker"], "open");

    p.primary_faults.set_down(false);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let before = p.primary_faults.calls(Operation::GetSession);
    assert!(p.storage.get_session("s").await.unwrap().is_some());
    assert_eq!(p.primary_faults.calls(Operation::GetSession), before + 1);
    assert_eq!(p.layer.breaker_state(), "closed");
}

#[tokio::test]
async fn writes_while_the_primary_is_down_are_kept_and_replayed_in_order() {
    let p = pair(2, Duration::from_millis(100));
    p.storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    p.primary_faults.set_down(true);

    // Acknowledged from the fallback, visible at once through the layer.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            p.storage
                .add_conversation_message("s", &NewMessage::new("user", format!("m{i}")))
                .await
                .unwrap(),
        );
        p.storage
            .update_session("s", &SessionUpdate::new().increment_requests())
            .await
            .unwrap();
    }
    assert!(p.layer.is_degraded());
    assert_eq!(p.layer.pending_writes(), 10);
    let seen = p.storage.get_conversation_history("s", 50).await.unwrap();
    assert_eq!(seen.len(), 5);
    assert!(p
        .primary
        .get_conversation_history("s", 50)
        .await
        .unwrap()
        .is_empty());

    p.primary_faults.set_down(false);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The next call starts the replay (in a task of its own, served by the fallback
    // meanwhile); once the queue is empty the primary serves again.
    for _ in 0..500 {
        let s = p.storage.get_session("s").await.unwrap().unwrap();
        assert_eq!(s.metrics.request_count, 5);
        if !p.layer.is_degraded() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!p.layer.is_degraded());
    assert_eq!(p.layer.pending_writes(), 0);
    let on_primary = p.primary.get_conversation_history("s", 50).await.unwrap();
    let primary_ids: Vec<_> = on_primary.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(
        primary_ids, ids,
        "replayed once each, in order, with the same ids"
    );
    assert_eq!(
        p.primary
            .get_session("s")
            .await
            .unwrap()
            .unwrap()
            .metrics
            .request_count,
        5
    );
    let fallback_ids: Vec<_> = p
        .fallback
        .get_conversation_history("s", 50)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(fallback_ids, ids);
}

#[tokio::test]
async fn a_full_replay_queue_refuses_writes_instead_of_losing_them() {
    let primary = Arc::new(MemoryBackend::new());
    let (p, faults) = Faults::wrap(primary);
    let layer = FailoverLayer::new(Arc::new(MemoryBackend::new()))
        .with_failure_threshold(1)
        .with_cooldown(Duration::from_secs(60))
        .with_max_pending(3);
    let storage = layer.layer(p);
    faults.set_down(true);
    for i in 0..3 {
        storage
            .create_session(&format!("s{i}"), "u", &Metadata::new())
            .await
            .unwrap();
    }
    let err = storage
        .create_session("s3", "u", &Metadata::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(storage.get_session("s3").await.unwrap().is_none());
    assert_eq!(layer.pending_writes(), 3);
}

#[tokio::test]
async fn a_primary_down_at_start_still_initializes() {
    let (p, faults) = Faults::wrap(Arc::new(MemoryBackend::new()));
    faults.set_down(true);
    let storage = FailoverLayer::new(Arc::new(MemoryBackend::new())).layer(p);
    storage.initialize().await.unwrap();
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    assert!(storage.get_session("s").await.unwrap().is_some());
}
