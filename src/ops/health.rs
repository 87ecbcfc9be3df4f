//! Health checks of a backend or a whole stack (the spec's `StorageHealthChecker`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};
use crate::model::{now, HealthReport, HealthStatus};
use crate::ops::diagnose::{journal_finding, side_name};
use crate::storage::StorageBackend;

/// Checks that a backend (or a stack of layers around one) works, and says how well.
///
/// [`check`](HealthChecker::check) runs two checks, one after the other, each bounded by
/// a timeout (default 10 s):
///
/// - `connection`: the backend's [`health_check`](StorageBackend::health_check). Its
///   status is the status the backend reports for itself (a failover pair whose primary
///   is down reports `degraded`); an error or a timeout makes it `unhealthy`.
/// - `performance`: a timed [`get_metrics`](StorageBackend::get_metrics) read; an error
///   or a timeout makes it `unhealthy`.
///
/// A check slower than the degraded latency (default 1 s) is at least `degraded`.
///
/// The overall status is the worst of the two checks, and at least `degraded` when any
/// component nested in the backend's report (a layer, either backend of a failover pair)
/// is not healthy. A failover journal holding writes not yet replayed to the primary is
/// an issue of its own (its depth, oldest age and path), and makes the failover layer
/// report itself degraded. So: any check failing gives `unhealthy`; a slow check or an unhealthy
/// inner component gives `degraded`; everything else is `healthy`.
///
/// The result is logged with `tracing`: `WARN` when unhealthy or degraded (with the
/// issues found), `DEBUG` when healthy.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use aiecs_storage::{HealthChecker, HealthStatus, MemoryBackend};
///
/// let checker = HealthChecker::new(Arc::new(MemoryBackend::new()))
///     .with_degraded_latency(Duration::from_millis(500));
/// let report = checker.check().await;
/// assert_eq!(report.status, HealthStatus::Healthy);
/// assert_eq!(report.checks.connection.status, HealthStatus::Healthy);
/// // {"status":"healthy","backend":"memory","checked_at":"2026-...Z","latency_ms":0.01,
/// //  "checks":{"connection":{"status":"healthy","latency_ms":...},"performance":{...}},
/// //  "issues":[],"report":{"component":"memory",...}}
/// println!("{}", serde_json::to_string_pretty(&report).unwrap());
/// # }
/// ```
#[derive(Clone)]
pub struct HealthChecker {
    backend: Arc<dyn StorageBackend>,
    degraded_latency: Duration,
    timeout: Duration,
}

impl std::fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecker")
            .field("backend", &self.backend.kind())
            .field("degraded_latency", &self.degraded_latency)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What [`HealthChecker::check`] found. Serializes as
/// `{status, backend, checked_at, latency_ms, checks{connection, performance}, issues,
/// report}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthCheckReport {
    /// Overall status: the worst check, and at least degraded when a nested component is
    /// not healthy.
    pub status: HealthStatus,
    /// The backend's [`kind`](StorageBackend::kind) (`memory`, `sqlite`, ...).
    pub backend: String,
    /// When the check started (RFC 3339, UTC).
    pub checked_at: DateTime<Utc>,
    /// How long the whole check took, serialized as milliseconds.
    #[serde(rename = "latency_ms", with = "crate::model::duration_ms")]
    pub latency: Duration,
    /// The individual checks.
    pub checks: HealthChecks,
    /// Why the status is not healthy, one line each (empty when healthy).
    pub issues: Vec<String>,
    /// The backend's own health report: for a stack, the outermost layer, with each
    /// wrapped layer and backend nested in `components`. Absent when `health_check`
    /// failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<HealthReport>,
}

/// The checks a [`HealthCheckReport`] is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthChecks {
    /// The backend's `health_check`: can it be reached, and how does it rate itself.
    pub connection: CheckResult,
    /// A timed `get_metrics` read.
    pub performance: CheckResult,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// `healthy`, `degraded` (slow, or the backend rates itself degraded) or `unhealthy`
    /// (failed).
    pub status: HealthStatus,
    /// How long the check took, serialized as milliseconds.
    #[serde(rename = "latency_ms", with = "crate::model::duration_ms")]
    pub latency: Duration,
    /// The error, when the check failed. Backends keep credentials out of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HealthCheckReport {
    /// Whether the overall status is healthy.
    pub fn is_healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }

    /// The first component named `component` in the nested report, searched depth
    /// first from the outermost (for example `failover`, `cache` or `sqlite`).
    pub fn component(&self, component: &str) -> Option<&HealthReport> {
        fn find<'r>(r: &'r HealthReport, name: &str) -> Option<&'r HealthReport> {
            if r.component == name {
                return Some(r);
            }
            r.components.iter().find_map(|c| find(c, name))
        }
        self.report.as_ref().and_then(|r| find(r, component))
    }
}

impl HealthChecker {
    /// A checker of `backend`: checks slower than 1 s are degraded, and each check gives
    /// up after 10 s.
    pub fn new(backend: Arc<dyn StorageBackend>) -> Self {
        HealthChecker {
            backend,
            degraded_latency: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }

    /// Sets the latency above which a check that succeeded makes the result degraded.
    pub fn with_degraded_latency(mut self, latency: Duration) -> Self {
        self.degraded_latency = latency;
        self
    }

    /// Sets how long each check may take before it counts as failed, so a hung server
    /// cannot hang the health check.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the checks and rates the backend. Never fails: a failing backend gives an
    /// `unhealthy` report with the error.
    pub async fn check(&self) -> HealthCheckReport {
        let checked_at = now();
        let started = Instant::now();
        let mut issues = Vec::new();

        let (connection, report) = match self
            .timed("health_check", self.backend.health_check())
            .await
        {
            (Ok(report), latency) => {
                let mut status = report.status;
                nested_issues(&report, &mut vec![report.component.clone()], &mut issues);
                if latency > self.degraded_latency {
                    status = worst(status, HealthStatus::Degraded);
                    issues.push(self.slow_issue("health_check", latency));
                }
                let check = CheckResult {
                    status,
                    latency,
                    error: None,
                };
                (check, Some(report))
            }
            (Err(e), latency) => {
                issues.push(format!("health_check failed: {e}"));
                (failed(latency, &e), None)
            }
        };

        let performance = match self.timed("get_metrics", self.backend.get_metrics()).await {
            (Ok(_), latency) if latency > self.degraded_latency => {
                issues.push(self.slow_issue("get_metrics", latency));
                CheckResult {
                    status: HealthStatus::Degraded,
                    latency,
                    error: None,
                }
            }
            (Ok(_), latency) => CheckResult {
                status: HealthStatus::Healthy,
                latency,
                error: None,
            },
            (Err(e), latency) => {
                issues.push(format!("get_metrics failed: {e}"));
                failed(latency, &e)
            }
        };

        let mut status = worst(connection.status, performance.status);
        if let Some(report) = &report {
            if worst_nested(report) != HealthStatus::Healthy {
                status = worst(status, HealthStatus::Degraded);
            }
        }

        let result = HealthCheckReport {
            status,
            backend: self.backend.kind().to_owned(),
            checked_at,
            latency: started.elapsed(),
            checks: HealthChecks {
                connection,
                performance,
            },
            issues,
            report,
        };
        log(&result);
        result
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> (Result<T>, Duration) {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Timeout {
                operation,
                after: self.timeout,
            }),
        };
        (result, started.elapsed())
    }

    fn slow_issue(&self, operation: &str, latency: Duration) -> String {
        format!(
            "{operation} took {:.1} ms, more than {:.1} ms",
            latency.as_secs_f64() * 1000.0,
            self.degraded_latency.as_secs_f64() * 1000.0
        )
    }
}

fn failed(latency: Duration, error: &StorageError) -> CheckResult {
    CheckResult {
        status: HealthStatus::Unhealthy,
        latency,
        error: Some(error.to_string()),
    }
}

fn rank(status: HealthStatus) -> u8 {
    match status {
        HealthStatus::Healthy => 0,
        HealthStatus::Degraded => 1,
        HealthStatus::Unhealthy => 2,
    }
}

fn worst(a: HealthStatus, b: HealthStatus) -> HealthStatus {
    if rank(a) >= rank(b) {
        a
    } else {
        b
    }
}

fn status_str(status: HealthStatus) -> &'static str {
    match status {
        HealthStatus::Healthy => "healthy",
        HealthStatus::Degraded => "degraded",
        HealthStatus::Unhealthy => "unhealthy",
    }
}

/// The worst status among the components nested in `report` (not `report` itself).
fn worst_nested(report: &HealthReport) -> HealthStatus {
    report
        .components
        .iter()
        .map(|c| worst(c.status, worst_nested(c)))
        .fold(HealthStatus::Healthy, worst)
}

/// Adds an issue for each component of `report` (itself included) that is not healthy
/// and whose state none of its own components explains: the deepest cause, named by its
/// path from the outermost layer. The two components of a `failover` report (primary
/// first, then fallback) are named `primary <kind>` and `fallback <kind>`. A failover
/// journal holding writes adds an issue of its own.
fn nested_issues(report: &HealthReport, path: &mut Vec<String>, issues: &mut Vec<String>) {
    let explained = report
        .components
        .iter()
        .any(|c| rank(c.status) >= rank(report.status));
    // A failover journal holding writes is worth saying whatever else explains the
    // status, and says more than "failover is degraded" when nothing else does.
    let journal = match report.component.as_str() {
        "failover" => journal_finding(&report.details, &path.join(" > ")),
        _ => None,
    };
    if let Some(j) = &journal {
        issues.push(format!("{}: {}", j.component, j.message));
    }
    if report.status != HealthStatus::Healthy && !explained && journal.is_none() {
        let mut issue = format!("{} is {}", path.join(" > "), status_str(report.status));
        if let Some(error) = report.details.get("error").and_then(|e| e.as_str()) {
            issue.push_str(": ");
            issue.push_str(error);
        }
        issues.push(issue);
    }
    let failover = report.component == "failover" && report.components.len() == 2;
    for (i, child) in report.components.iter().enumerate() {
        path.push(side_name(failover, i, &child.component));
        nested_issues(child, path, issues);
        path.pop();
    }
}

fn log(report: &HealthCheckReport) {
    let status = status_str(report.status);
    let latency_ms = report.latency.as_secs_f64() * 1000.0;
    match report.status {
        HealthStatus::Healthy => tracing::debug!(
            db.system.name = report.backend.as_str(),
            status,
            latency_ms,
            "storage health check: healthy"
        ),
        HealthStatus::Degraded | HealthStatus::Unhealthy => tracing::warn!(
            db.system.name = report.backend.as_str(),
            status,
            latency_ms,
            issues = %report.issues.join("; "),
            "storage health check: {status}"
        ),
    }
}
