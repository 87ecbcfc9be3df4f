//! Structured logging of every operation with `tracing`.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::field::Empty;
use tracing::Instrument;

use super::fields::{self, LayerSettings, WithSome};
use super::names::Tally;
use super::{Call, Layered, Policy};
use crate::error::Result;
use crate::model::Metadata;
use crate::storage::StorageBackend;

/// Logs every operation with [`tracing`]: one span per call and one event at its end,
/// with the operation, the backend, the session or thread id, the latency and the
/// outcome. Message content, context values, checkpoint data, metadata and credentials
/// are never logged: the layer only sees which operation ran on which id.
///
/// # Levels
///
/// | outcome | level | message |
/// | --- | --- | --- |
/// | the call failed | `ERROR` | `storage operation failed`, with `error.type` and `error.message` |
/// | it took at least the slow threshold (default 100 ms) | `WARN` | `slow storage operation` |
/// | the caller gave up before it answered (the call was dropped) | `WARN` | `storage operation abandoned by its caller`, `outcome = "cancelled"` |
/// | anything else | `DEBUG` | `storage operation` |
///
/// The span (named `storage`) is at `DEBUG` too, so a subscriber that filters at `INFO`
/// creates no span and formats nothing for a call that succeeds quickly: the layer then
/// costs two clock reads and a few level checks. Enable `aiecs_storage=debug` to see
/// every call, or to export the spans (for example with `tracing-opentelemetry`).
///
/// # Fields
///
/// Names follow the OpenTelemetry database conventions where they fit. Both the span and
/// the event carry the identifying fields, so an event stays complete when a subscriber
/// (or a per-layer filter) drops the span; a plain-text subscriber at `DEBUG` therefore
/// prints them twice, once in the span's context. The span also gets `outcome` and
/// `error.type` when the call ends; its latency is the span's own duration.
///
/// | field | value |
/// | --- | --- |
/// | `db.system.name` | the backend label: [`StorageBackend::kind`] of the wrapped backend (`memory`, `sqlite`, ...) unless set with [`LoggingLayer::with_backend_label`] |
/// | `db.operation.name` | the method, e.g. `get_session` ([`Operation::as_str`](super::Operation::as_str)) |
/// | `aiecs.key` | the session id or thread id, when the call concerns one (ids are not secrets) |
/// | `duration_ms` | the latency in milliseconds (a float) |
/// | `outcome` | `ok`, or the error kind (`connection`, `timeout`, `not_found`, ...) |
/// | `error.type` | the error kind (errors only) |
/// | `error.message` | the error's `Display` text (errors only): backends keep credentials out of it |
///
/// # Order
///
/// Outside a [`RetryLayer`](super::RetryLayer) the layer logs each call once, with the
/// latency of all its attempts; inside it, it logs every attempt.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::time::Duration;
/// use aiecs_storage::layer::LoggingLayer;
/// use aiecs_storage::{prelude::*, MemoryBackend};
/// use tower::Layer;
///
/// let logging = LoggingLayer::new().with_slow_threshold(Duration::from_millis(250));
/// let storage = logging.layer(MemoryBackend::new());
/// // With a subscriber installed, this logs a `storage` span and, at DEBUG,
/// // `storage operation db.system.name="memory" db.operation.name="create_session"
/// // aiecs.key="s1" duration_ms=... outcome="ok"`.
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// assert_eq!(logging.errors(), 0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LoggingLayer {
    backend_label: Option<Cow<'static, str>>,
    slow_threshold: Duration,
    stats: Arc<LogStats>,
}

#[derive(Debug, Default)]
struct LogStats {
    errors: Tally,
    slow: Tally,
    cancelled: Tally,
}

/// The policy a [`LoggingLayer`] runs in its [`Layered`] wrappers.
#[derive(Debug)]
pub struct LoggingPolicy {
    backend_label: Cow<'static, str>,
    slow_threshold: Duration,
    stats: Arc<LogStats>,
}

impl Default for LoggingLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl LoggingLayer {
    /// Logs calls slower than 100 ms at `WARN`, and labels them with the wrapped
    /// backend's kind.
    pub fn new() -> Self {
        LoggingLayer {
            backend_label: None,
            slow_threshold: Duration::from_millis(100),
            stats: Arc::default(),
        }
    }

    /// Sets the `db.system.name` of every call, instead of the wrapped backend's
    /// [`kind`](StorageBackend::kind): for example `primary` and `fallback` to tell two
    /// backends of one kind apart.
    pub fn with_backend_label(mut self, label: impl Into<Cow<'static, str>>) -> Self {
        self.backend_label = Some(label.into());
        self
    }

    /// Sets the latency from which a successful call is logged at `WARN`.
    pub fn with_slow_threshold(mut self, threshold: Duration) -> Self {
        self.slow_threshold = threshold;
        self
    }

    /// Failed calls logged so far by every wrapper of this layer.
    pub fn errors(&self) -> u64 {
        self.stats.errors.get()
    }

    /// Slow calls logged so far by every wrapper of this layer.
    pub fn slow_calls(&self) -> u64 {
        self.stats.slow.get()
    }
}

impl<B: StorageBackend> tower_layer::Layer<B> for LoggingLayer {
    type Service = Layered<B, LoggingPolicy>;

    fn layer(&self, inner: B) -> Self::Service {
        let backend_label = self
            .backend_label
            .clone()
            .unwrap_or(Cow::Borrowed(inner.kind()));
        Layered::new(
            inner,
            Arc::new(LoggingPolicy {
                backend_label,
                slow_threshold: self.slow_threshold,
                stats: self.stats.clone(),
            }),
        )
    }
}

impl LoggingPolicy {
    /// The `db.system.name` this policy logs.
    pub fn backend_label(&self) -> &str {
        &self.backend_label
    }
}

impl Policy for LoggingPolicy {
    fn name(&self) -> &'static str {
        "logging"
    }

    async fn call<'a, T, F, Fut>(&'a self, call: Call<'a>, run: F) -> Result<T>
    where
        T: Send + 'a,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<T>> + Send + 'a,
    {
        let system: &str = &self.backend_label;
        let operation = call.operation.as_str();
        // Disabled (and nearly free) unless the subscriber wants DEBUG for this target.
        let span = tracing::debug_span!(
            "storage",
            db.system.name = system,
            db.operation.name = operation,
            aiecs.key = call.key,
            outcome = Empty,
            error.type = Empty,
        );
        let mut in_flight = InFlight {
            policy: self,
            call,
            span: &span,
            started: Instant::now(),
            answered: false,
        };
        let result = run().instrument(span.clone()).await;
        in_flight.answered = true;
        let elapsed = in_flight.started.elapsed();
        // Whole microseconds: `0.092`, not `0.09262799999999999`.
        let duration_ms = elapsed.as_micros() as f64 / 1000.0;
        span.in_scope(|| match &result {
            Err(e) => {
                self.stats.errors.add(1);
                let kind = e.kind().as_str();
                span.record("outcome", kind);
                span.record("error.type", kind);
                tracing::error!(
                    db.system.name = system,
                    db.operation.name = operation,
                    aiecs.key = call.key,
                    duration_ms,
                    outcome = kind,
                    error.type = kind,
                    error.message = %e,
                    "storage operation failed"
                );
            }
            Ok(_) if elapsed >= self.slow_threshold => {
                self.stats.slow.add(1);
                span.record("outcome", "ok");
                tracing::warn!(
                    db.system.name = system,
                    db.operation.name = operation,
                    aiecs.key = call.key,
                    duration_ms,
                    outcome = "ok",
                    slow_threshold_ms = self.slow_threshold.as_secs_f64() * 1000.0,
                    "slow storage operation"
                );
            }
            Ok(_) => {
                span.record("outcome", "ok");
                tracing::debug!(
                    db.system.name = system,
                    db.operation.name = operation,
                    aiecs.key = call.key,
                    duration_ms,
                    outcome = "ok",
                    "storage operation"
                );
            }
        });
        result
    }

    fn figures(&self) -> Metadata {
        let mut m = Metadata::new();
        m.insert("cancelled".into(), json!(self.stats.cancelled.get()));
        m.insert("backend_label".into(), json!(self.backend_label));
        m.insert(
            "slow_threshold_ms".into(),
            json!(self.slow_threshold.as_secs_f64() * 1000.0),
        );
        m.insert("errors".into(), json!(self.stats.errors.get()));
        m.insert("slow_calls".into(), json!(self.stats.slow.get()));
        m
    }
}

/// A call on its way; dropped unanswered (its caller gave up: an outer timeout,
/// `select!`), it logs so, since no other event would say what became of it.
struct InFlight<'a> {
    policy: &'a LoggingPolicy,
    call: Call<'a>,
    span: &'a tracing::Span,
    started: Instant,
    answered: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let p = self.policy;
        p.stats.cancelled.add(1);
        let duration_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
        self.span.record("outcome", "cancelled");
        self.span.in_scope(|| {
            tracing::warn!(
                db.system.name = &*p.backend_label,
                db.operation.name = self.call.operation.as_str(),
                aiecs.key = self.call.key,
                duration_ms,
                outcome = "cancelled",
                "storage operation abandoned by its caller"
            );
        });
    }
}

/// Settings of a `logging` layer ([`LoggingLayer`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingSettings {
    /// `backend_label`: the `db.system.name` of every event (default: the backend's
    /// kind).
    #[serde(deserialize_with = "fields::label")]
    pub backend_label: Option<String>,
    /// `slow_threshold`: successful calls at least this slow are logged at `WARN`
    /// (default 100 ms).
    #[serde(with = "fields::AnyDuration")]
    pub slow_threshold: Option<Duration>,
}

impl LayerSettings for LoggingSettings {}

impl LoggingLayer {
    /// The layer the settings describe; unset keys keep [`LoggingLayer::new`]'s values.
    pub(crate) fn from_settings(s: &LoggingSettings) -> Self {
        LoggingLayer::new()
            .with_some(s.backend_label.clone(), |layer, label| {
                layer.with_backend_label(label)
            })
            .with_some(s.slow_threshold, LoggingLayer::with_slow_threshold)
    }
}
