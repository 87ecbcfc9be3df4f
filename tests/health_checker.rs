//! HealthChecker: the spec's StorageHealthChecker over backends, faults and stacks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::{FailoverLayer, LoggingLayer};
use aiecs_storage::ops::health::HealthCheckReport;
use aiecs_storage::{prelude::*, HealthChecker, HealthStatus, MemoryBackend};
use common::fault::Faults;
use tower::Layer;
use tracing::level_filters::LevelFilter;

/// Everything a test subscriber writes, kept in memory.
use common::capture::{anchor_interest, capture};

#[tokio::test]
async fn memory_backend_is_healthy() {
    let (cap, _guard) = capture(LevelFilter::INFO);
    let report = HealthChecker::new(Arc::new(MemoryBackend::new()))
        .check()
        .await;
    assert_eq!(report.status, HealthStatus::Healthy, "{report:#?}");
    assert!(report.is_healthy());
    assert_eq!(report.backend, "memory");
    assert_eq!(report.checks.connection.status, HealthStatus::Healthy);
    assert_eq!(report.checks.performance.status, HealthStatus::Healthy);
    assert!(report.checks.connection.error.is_none());
    assert!(report.issues.is_empty(), "{:?}", report.issues);
    assert_eq!(report.report.as_ref().unwrap().component, "memory");
    assert_eq!(cap.text(), "", "a healthy check logs nothing at INFO");
}

#[tokio::test]
async fn a_backend_that_fails_every_call_is_unhealthy_and_logged_at_warn() {
    let (cap, _guard) = capture(LevelFilter::INFO);
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    faults.set_down(true);
    let report = HealthChecker::new(Arc::new(inner)).check().await;

    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:#?}");
    let connection = &report.checks.connection;
    assert_eq!(connection.status, HealthStatus::Unhealthy);
    assert!(connection
        .error
        .as_deref()
        .unwrap()
        .contains("injected: connection refused"));
    assert_eq!(report.checks.performance.status, HealthStatus::Unhealthy);
    assert!(report.checks.performance.error.is_some());
    assert!(report.report.is_none());
    assert_eq!(report.issues.len(), 2, "{:?}", report.issues);

    let warns = cap.lines_at("WARN");
    assert_eq!(warns.len(), 1, "{}", cap.text());
    assert!(
        warns[0].contains("storage health check: unhealthy"),
        "{}",
        warns[0]
    );
    assert!(warns[0].contains("status=\"unhealthy\""), "{}", warns[0]);
    assert!(warns[0].contains("health_check failed"), "{}", warns[0]);
}

#[tokio::test]
async fn failover_with_its_primary_down_is_degraded() {
    let (cap, _guard) = capture(LevelFilter::INFO);
    let (primary, faults) = Faults::wrap(MemoryBackend::new());
    let failover = FailoverLayer::new(Arc::new(MemoryBackend::new())).with_failure_threshold(1);
    let storage = LoggingLayer::new().layer(failover.layer(primary));
    faults.set_down(true);
    // One failed call opens the breaker; the fallback serves it.
    storage
        .create_session("s1", "u", &Default::default())
        .await
        .unwrap();
    assert_eq!(failover.breaker_state(), "open");

    let report = HealthChecker::new(Arc::new(storage)).check().await;
    assert_eq!(report.status, HealthStatus::Degraded, "{report:#?}");
    assert_eq!(report.checks.connection.status, HealthStatus::Degraded);
    assert_eq!(report.checks.performance.status, HealthStatus::Healthy);

    // The nested report shows the logging layer, then failover with both backends.
    let top = report.report.as_ref().unwrap();
    assert_eq!(top.component, "logging");
    let failover_report = report.component("failover").expect("failover component");
    assert_eq!(failover_report.status, HealthStatus::Degraded);
    assert_eq!(failover_report.components.len(), 2, "primary and fallback");
    let (primary, fallback) = (
        &failover_report.components[0],
        &failover_report.components[1],
    );
    assert_eq!(primary.status, HealthStatus::Unhealthy);
    assert_eq!(fallback.status, HealthStatus::Healthy);
    assert_eq!(fallback.component, "memory");
    // The issue names the deepest cause by its path.
    assert_eq!(report.issues.len(), 1, "{:?}", report.issues);
    assert!(
        report.issues[0].starts_with("logging > failover > primary memory is unhealthy"),
        "{:?}",
        report.issues
    );
    let warns = cap.lines_at("WARN");
    assert!(
        warns
            .iter()
            .any(|l| l.contains("storage health check: degraded")),
        "{}",
        cap.text()
    );
}

#[tokio::test]
async fn a_slow_check_is_degraded() {
    anchor_interest();
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    faults.set_latency(Duration::from_millis(20));
    let report = HealthChecker::new(Arc::new(inner))
        .with_degraded_latency(Duration::from_millis(5))
        .check()
        .await;
    assert_eq!(report.status, HealthStatus::Degraded, "{report:#?}");
    assert_eq!(report.checks.connection.status, HealthStatus::Degraded);
    assert_eq!(report.checks.performance.status, HealthStatus::Degraded);
    assert!(report.checks.connection.latency >= Duration::from_millis(20));
    assert!(report.checks.connection.error.is_none());
    assert!(
        report.issues.iter().any(|i| i.contains("more than 5.0 ms")),
        "{:?}",
        report.issues
    );
}

#[tokio::test]
async fn a_hung_backend_times_out_as_unhealthy() {
    anchor_interest();
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    faults.set_latency(Duration::from_secs(60));
    let checker = HealthChecker::new(Arc::new(inner)).with_timeout(Duration::from_millis(20));
    // The check is Send, so it can run on a spawned task (a periodic probe).
    let report = tokio::spawn(async move { checker.check().await })
        .await
        .unwrap();
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:#?}");
    let error = report.checks.connection.error.as_deref().unwrap();
    assert!(error.contains("timed out"), "{error}");
}

#[tokio::test]
async fn the_report_serializes_to_json_with_the_expected_fields() {
    anchor_interest();
    let report = HealthChecker::new(Arc::new(LoggingLayer::new().layer(MemoryBackend::new())))
        .check()
        .await;
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["backend"], "memory");
    let checked_at = v["checked_at"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(checked_at).is_ok() && checked_at.ends_with('Z'),
        "{checked_at}"
    );
    assert!(v["latency_ms"].is_f64());
    for check in ["connection", "performance"] {
        assert_eq!(v["checks"][check]["status"], "healthy");
        assert!(v["checks"][check]["latency_ms"].is_f64());
        assert!(
            v["checks"][check].get("error").is_none(),
            "no error key when ok"
        );
    }
    assert_eq!(v["issues"], serde_json::json!([]));
    assert_eq!(v["report"]["component"], "logging");
    assert_eq!(v["report"]["components"][0]["component"], "memory");

    // A failed check carries its error text.
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    faults.set_down(true);
    let failed = HealthChecker::new(Arc::new(inner)).check().await;
    let v = serde_json::to_value(&failed).unwrap();
    assert_eq!(v["status"], "unhealthy");
    assert!(v["checks"]["connection"]["error"]
        .as_str()
        .unwrap()
        .contains("connection error"));
    assert!(v.get("report").is_none());

    // And it reads back.
    let back: HealthCheckReport = serde_json::from_value(v).unwrap();
    assert_eq!(back.status, HealthStatus::Unhealthy);
    assert_eq!(back.checked_at, failed.checked_at);
}
