//! Prometheus export of the crate's metrics (feature `prometheus`).
//!
//! Installs metrics-exporter-prometheus as the global `metrics` recorder with the
//! crate's histogram buckets (so latencies render as histograms, not summaries) and the
//! metric descriptions, then either serves `/metrics` over HTTP or hands back a handle
//! whose `render()` gives the exposition text for an endpoint of your own.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use aiecs_storage::layer::MetricsLayer;
//! use aiecs_storage::{prelude::*, MemoryBackend};
//! use tower::Layer;
//!
//! // Loopback unless you pass another address.
//! aiecs_storage::prometheus::serve(aiecs_storage::prometheus::DEFAULT_LISTEN)?;
//! let storage = MetricsLayer::new().layer(MemoryBackend::new());
//! storage.get_session("s1").await?;
//! // curl http://127.0.0.1:9464/metrics
//! # Ok(()) }
//! ```

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

pub use metrics_exporter_prometheus::{BuildError, PrometheusHandle};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::layer::names;

/// `127.0.0.1:9464`: loopback, Prometheus's conventional exporter port range.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));

fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::OPERATION_DURATION_SECONDS.to_owned()),
            &names::LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(names::BATCH_SIZE.to_owned()),
            &names::BATCH_SIZE_BUCKETS,
        )
}

/// Installs the recorder and serves `GET /metrics` on `listen` from the current tokio
/// runtime. Returns a handle that renders the same text. Call it once, before the first
/// storage call, from inside a runtime.
pub fn serve(listen: SocketAddr) -> Result<PrometheusHandle, BuildError> {
    let (recorder, exporter) = builder()?.with_http_listener(listen).build()?;
    let handle = recorder.handle();
    tokio::spawn(exporter);
    metrics::set_global_recorder(recorder)?;
    names::describe();
    Ok(handle)
}

/// Installs the recorder without a listener; render the exposition text with
/// [`PrometheusHandle::render`] from an endpoint of your own. Call `run_upkeep` on the
/// handle now and then (every few seconds) to bound histogram memory.
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    let handle = builder()?.install_recorder()?;
    names::describe();
    Ok(handle)
}
