//! Operation metrics on the `metrics` facade, and an in-process performance report.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram, SharedString};
use serde::{Deserialize, Serialize};

use super::fields::{self, LayerSettings, WithSome};
use super::{names, Call, Layered, Operation, Policy};
use crate::error::{ErrorKind, Result};
use crate::model::Metadata;
use crate::storage::StorageBackend;

/// Records every operation: `aiecs_storage_operations_total{operation, backend,
/// outcome}`, `aiecs_storage_operation_duration_seconds{operation, backend}` and
/// `aiecs_storage_errors_total{operation, backend, kind}` on the
/// [`metrics`](https://docs.rs/metrics) facade (names in [`names`](super::names)), plus
/// an in-process report per operation (count, errors, error rate, average, min, max,
/// p50, p95, p99 latency) returned inside `get_metrics()` and by
/// [`MetricsLayer::performance_report`] — the spec's `get_performance_report`.
///
/// A call whose caller gives up before it answers (an outer timeout, `select!`) is
/// recorded when it is dropped, with outcome `cancelled` and the time it had run, so a
/// hung backend behind an outer deadline still shows in the figures instead of
/// vanishing from them; the in-process report counts it in `cancelled_count`.
///
/// Labels carry no ids: `backend` is a name you choose with
/// [`MetricsLayer::with_backend_label`], defaulting to the inner backend's kind.
///
/// Metric handles are resolved on a wrapper's first call of each operation, against the
/// recorder installed at that moment: install the exporter (for example
/// [`crate::prometheus::serve`] with feature `prometheus`) before the first call.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::layer::MetricsLayer;
/// use aiecs_storage::{prelude::*, MemoryBackend};
/// use tower::Layer;
///
/// let metrics = MetricsLayer::new().with_backend_label("sessions-db");
/// let storage = metrics.layer(MemoryBackend::new());
/// storage.get_session("s1").await?;
/// let report = metrics.performance_report();
/// assert_eq!(report.operations["get_session"].total_operations, 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MetricsLayer {
    label: Option<Cow<'static, str>>,
    stats: Arc<Stats>,
}

/// The policy a [`MetricsLayer`] runs in its [`Layered`] wrappers.
#[derive(Debug)]
pub struct MetricsPolicy {
    backend: SharedString,
    handles: Box<[OnceLock<Handles>]>,
    stats: Arc<Stats>,
}

#[derive(Debug)]
struct Handles {
    ok: Counter,
    error: Counter,
    /// Made on the first cancelled call: most operations never see one.
    cancelled: OnceLock<Counter>,
    duration: Histogram,
    errors: [OnceLock<Counter>; ErrorKind::ALL.len()],
}

impl MetricsLayer {
    /// A metrics layer labelled with the inner backend's kind.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the `backend` label (bounded: a name such as `primary`, never an id).
    pub fn with_backend_label(mut self, label: impl Into<Cow<'static, str>>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Per-operation figures of every wrapper of this layer so far.
    pub fn performance_report(&self) -> PerformanceReport {
        self.stats.report()
    }
}

impl<B: StorageBackend> tower_layer::Layer<B> for MetricsLayer {
    type Service = Layered<B, MetricsPolicy>;

    fn layer(&self, inner: B) -> Self::Service {
        let backend: SharedString = match &self.label {
            Some(Cow::Borrowed(s)) => (*s).into(),
            Some(Cow::Owned(s)) => s.clone().into(),
            None => inner.kind().into(),
        };
        let policy = MetricsPolicy {
            backend,
            handles: (0..Operation::COUNT).map(|_| OnceLock::new()).collect(),
            stats: self.stats.clone(),
        };
        Layered::new(inner, Arc::new(policy))
    }
}

impl MetricsPolicy {
    fn handles(&self, op: Operation) -> &Handles {
        self.handles[op.index()].get_or_init(|| {
            let (operation, backend) = (op.as_str(), self.backend.clone());
            Handles {
                ok: metrics::counter!(names::OPERATIONS_TOTAL, "operation" => operation, "backend" => backend.clone(), "outcome" => "ok"),
                error: metrics::counter!(names::OPERATIONS_TOTAL, "operation" => operation, "backend" => backend.clone(), "outcome" => "error"),
                duration: metrics::histogram!(names::OPERATION_DURATION_SECONDS, "operation" => operation, "backend" => backend),
                errors: Default::default(),
                cancelled: OnceLock::new(),
            }
        })
    }

    /// Records a call its caller dropped before it answered.
    fn record_cancelled(&self, op: Operation, elapsed: Duration) {
        let h = self.handles(op);
        h.duration.record(elapsed.as_secs_f64());
        h.cancelled
            .get_or_init(|| {
                metrics::counter!(names::OPERATIONS_TOTAL, "operation" => op.as_str(), "backend" => self.backend.clone(), "outcome" => "cancelled")
            })
            .increment(1);
        self.stats.record(op, elapsed, false);
        self.stats.cancelled(op);
    }

    fn record(&self, op: Operation, elapsed: Duration, error: Option<ErrorKind>) {
        let h = self.handles(op);
        h.duration.record(elapsed.as_secs_f64());
        match error {
            None => h.ok.increment(1),
            Some(kind) => {
                h.error.increment(1);
                h.errors[kind as usize]
                    .get_or_init(|| {
                        metrics::counter!(names::ERRORS_TOTAL, "operation" => op.as_str(), "backend" => self.backend.clone(), "kind" => kind.as_str())
                    })
                    .increment(1);
            }
        }
        self.stats.record(op, elapsed, error.is_some());
    }
}

impl Policy for MetricsPolicy {
    fn name(&self) -> &'static str {
        "metrics"
    }

    async fn call<'a, T, F, Fut>(&'a self, call: Call<'a>, run: F) -> Result<T>
    where
        T: Send + 'a,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<T>> + Send + 'a,
    {
        let mut in_flight = InFlight {
            policy: self,
            operation: call.operation,
            started: Instant::now(),
            answered: false,
        };
        let result = run().await;
        in_flight.answered = true;
        self.record(
            call.operation,
            in_flight.started.elapsed(),
            result.as_ref().err().map(|e| e.kind()),
        );
        result
    }

    fn figures(&self) -> Metadata {
        let mut m = Metadata::new();
        m.insert("backend".into(), self.backend.to_string().into());
        if let Ok(serde_json::Value::Object(ops)) = serde_json::to_value(self.stats.report()) {
            m.extend(ops);
        }
        m
    }
}

/// A call on its way; dropped unanswered (the caller gave up), it is recorded as
/// cancelled.
struct InFlight<'a> {
    policy: &'a MetricsPolicy,
    operation: Operation,
    started: Instant,
    answered: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.policy
                .record_cancelled(self.operation, self.started.elapsed());
        }
    }
}

/// The in-process report of a [`MetricsLayer`]: one entry per operation seen, keyed by
/// operation name. Latencies are in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PerformanceReport {
    /// Figures by operation name.
    pub operations: BTreeMap<String, OperationReport>,
}

/// The figures of one operation in a [`PerformanceReport`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OperationReport {
    /// Calls made.
    pub total_operations: u64,
    /// Calls that failed.
    pub error_count: u64,
    /// Calls whose caller gave up before they answered (counted in
    /// `total_operations`, not in `error_count`).
    #[serde(default)]
    pub cancelled_count: u64,
    /// `error_count / total_operations`.
    pub error_rate: f64,
    /// Mean latency.
    pub avg_latency_ms: f64,
    /// Fastest call.
    pub min_latency_ms: f64,
    /// Slowest call.
    pub max_latency_ms: f64,
    /// Median latency (within 7% of the true value).
    pub p50_latency_ms: f64,
    /// 95th percentile latency (within 7%).
    pub p95_latency_ms: f64,
    /// 99th percentile latency (within 7%).
    pub p99_latency_ms: f64,
}

/// Latencies in nanoseconds go into log-linear buckets: 8 per power of two, so a
/// percentile read back is within 1/16 of the true value, in a fixed table of atomics
/// (no lock, no allocation per call).
const SUB_BITS: u32 = 3;
const SUBS: usize = 1 << SUB_BITS;
const BUCKETS: usize = 62 * SUBS;

fn bucket_of(ns: u64) -> usize {
    if ns < SUBS as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    let sub = (ns >> (exp - SUB_BITS)) as usize & (SUBS - 1);
    ((exp - SUB_BITS + 1) as usize * SUBS + sub).min(BUCKETS - 1)
}

/// The middle of bucket `i`, in nanoseconds.
fn bucket_value(i: usize) -> f64 {
    if i < SUBS {
        return i as f64;
    }
    let exp = (i / SUBS) as u32 + SUB_BITS - 1;
    let width = 1u64 << (exp - SUB_BITS);
    let low = ((SUBS + i % SUBS) as u64) << (exp - SUB_BITS);
    low as f64 + width as f64 / 2.0
}

#[derive(Debug)]
struct Stats {
    ops: [OnceLock<Box<OpStats>>; Operation::COUNT],
}

// Written out: `Default` is derived for arrays of at most 32 elements.
impl Default for Stats {
    fn default() -> Self {
        Stats {
            ops: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

#[derive(Debug)]
struct OpStats {
    errors: AtomicU64,
    cancelled: AtomicU64,
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            errors: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn percentile(&self, counts: &[u64], total: u64, q: f64) -> f64 {
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_value(i);
            }
        }
        self.max_ns.load(Ordering::Relaxed) as f64
    }
}

impl Stats {
    fn record(&self, op: Operation, elapsed: Duration, failed: bool) {
        let s = self.ops[op.index()].get_or_init(|| Box::new(OpStats::new()));
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        if failed {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        s.sum_ns.fetch_add(ns, Ordering::Relaxed);
        // fetch_min and fetch_max are locked compare-exchange loops even when nothing
        // changes; a plain load first keeps the usual call to two locked adds (the count
        // is the buckets' sum).
        if ns < s.min_ns.load(Ordering::Relaxed) {
            s.min_ns.fetch_min(ns, Ordering::Relaxed);
        }
        if ns > s.max_ns.load(Ordering::Relaxed) {
            s.max_ns.fetch_max(ns, Ordering::Relaxed);
        }
        s.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
    }

    fn cancelled(&self, op: Operation) {
        if let Some(s) = self.ops[op.index()].get() {
            s.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn report(&self) -> PerformanceReport {
        const MS: f64 = 1e6;
        let mut operations = BTreeMap::new();
        for (i, slot) in self.ops.iter().enumerate() {
            let Some(s) = slot.get() else { continue };
            let counts: Vec<u64> = s
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let errors = s.errors.load(Ordering::Relaxed);
            let op = Operation::ALL[i];
            operations.insert(
                op.as_str().to_owned(),
                OperationReport {
                    total_operations: total,
                    error_count: errors,
                    cancelled_count: s.cancelled.load(Ordering::Relaxed),
                    error_rate: errors as f64 / total as f64,
                    avg_latency_ms: s.sum_ns.load(Ordering::Relaxed) as f64 / total as f64 / MS,
                    min_latency_ms: s.min_ns.load(Ordering::Relaxed) as f64 / MS,
                    max_latency_ms: s.max_ns.load(Ordering::Relaxed) as f64 / MS,
                    p50_latency_ms: s.percentile(&counts, total, 0.50) / MS,
                    p95_latency_ms: s.percentile(&counts, total, 0.95) / MS,
                    p99_latency_ms: s.percentile(&counts, total, 0.99) / MS,
                },
            );
        }
        PerformanceReport { operations }
    }
}

/// Settings of a `metrics` layer ([`MetricsLayer`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// `backend_label`: the `backend` label of every metric (default: the backend's
    /// kind). A bounded name such as `primary`, never an id.
    #[serde(deserialize_with = "fields::label")]
    pub backend_label: Option<String>,
}

impl LayerSettings for MetricsSettings {}

impl MetricsLayer {
    /// The layer the settings describe.
    pub(crate) fn from_settings(s: &MetricsSettings) -> Self {
        MetricsLayer::new().with_some(s.backend_label.clone(), |layer, label| {
            layer.with_backend_label(label)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for ns in (1..2_000_000u64).step_by(997) {
            let b = bucket_of(ns);
            assert!(b >= last);
            last = b;
            let v = bucket_value(b);
            assert!(
                (v - ns as f64).abs() <= ns as f64 / 16.0 + 1.0,
                "{ns} -> {v}"
            );
        }
        assert!(bucket_of(u64::MAX) < BUCKETS);
    }

    #[test]
    fn percentiles_follow_the_distribution() {
        let stats = Stats::default();
        for ms in 1..=100u64 {
            stats.record(Operation::GetSession, Duration::from_millis(ms), ms > 90);
        }
        let r = &stats.report().operations["get_session"];
        assert_eq!(r.total_operations, 100);
        assert_eq!(r.error_count, 10);
        assert!((r.error_rate - 0.1).abs() < 1e-9);
        assert!((r.p50_latency_ms - 50.0).abs() <= 50.0 / 16.0 + 0.01);
        assert!((r.p99_latency_ms - 99.0).abs() <= 99.0 / 16.0 + 0.01);
        assert_eq!(r.min_latency_ms, 1.0);
        assert_eq!(r.max_latency_ms, 100.0);
        assert!((r.avg_latency_ms - 50.5).abs() < 1e-9);
    }
}
