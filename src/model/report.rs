//! What health checks and metrics calls report.

use std::time::Duration;

use super::{now, Metadata};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Overall state reported by a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Working normally.
    Healthy,
    /// Working, but with reduced capacity or a failing fallback.
    Degraded,
    /// Not working.
    Unhealthy,
}

/// What [`StorageBackend::health_check`](crate::StorageBackend::health_check) returns: the
/// component's own state and the reports of the components it wraps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The component: a backend kind (`sqlite`) or a layer name (`cache`).
    pub component: String,
    /// Overall state.
    pub status: HealthStatus,
    /// How long the check took, serialized as milliseconds.
    #[serde(rename = "latency_ms", with = "crate::model::duration_ms")]
    pub latency: Duration,
    /// When the check ran.
    pub checked_at: DateTime<Utc>,
    /// Component-specific figures (file path, schema version, sizes, ...). Never secrets.
    pub details: Metadata,
    /// Reports of wrapped components, outermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<HealthReport>,
}

impl HealthReport {
    /// A healthy report of `component`, checked now, with no wrapped components.
    pub fn healthy(component: impl Into<String>, latency: Duration, details: Metadata) -> Self {
        HealthReport {
            component: component.into(),
            status: HealthStatus::Healthy,
            latency,
            checked_at: now(),
            details,
            components: Vec::new(),
        }
    }
}

/// What [`StorageBackend::get_metrics`](crate::StorageBackend::get_metrics) returns: the
/// component's figures and those of the components it wraps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReport {
    /// The component: a backend kind or a layer name.
    pub component: String,
    /// The figures, by name.
    pub values: Metadata,
    /// Reports of wrapped components.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<MetricsReport>,
}
