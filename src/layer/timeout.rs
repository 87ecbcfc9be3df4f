//! A deadline per operation.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::fields::{self, Invalid, LayerSettings};
use super::names::Tally;
use super::{Call, Layered, Policy};
use crate::error::{Result, StorageError};
use crate::model::Metadata;

/// Fails a call with [`StorageError::Timeout`] (transient) when the inner backend has not
/// answered within the deadline, so a hung server cannot hang the caller.
///
/// Every write of every backend is atomic (one statement, transaction or Lua script), so
/// a timed-out write is never half applied: it either landed whole or not at all, and a
/// later read sees one or the other. Treat a timed-out write as "outcome unknown".
///
/// Inside [`RetryLayer`](super::RetryLayer) the deadline bounds each attempt; outside it
/// bounds the whole call, backoff included.
///
/// # When the deadline passes
///
/// The inner call is dropped, exactly as if its caller had given up: the layers below
/// see a caller giving up, and the store may still apply the write.
/// [`StorageError::may_have_applied`] is true for the `Timeout` it returns, so a cache
/// above stops serving what the write touches for a while and a retry above does not
/// repeat a counter increment. Outside a [`FailoverLayer`](super::FailoverLayer), make
/// the deadline longer than failover's own deadline for the primary plus a fallback
/// call, or failover never gets to answer from the fallback.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::time::Duration;
/// use aiecs_storage::layer::TimeoutLayer;
/// use aiecs_storage::{prelude::*, MemoryBackend};
/// use tower::Layer;
///
/// let storage = TimeoutLayer::new(Duration::from_millis(500)).layer(MemoryBackend::new());
/// assert!(storage.get_session("s1").await?.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TimeoutLayer {
    timeout: Duration,
    timeouts: Arc<Tally>,
}

/// The policy a [`TimeoutLayer`] runs in its [`Layered`] wrappers.
#[derive(Debug)]
pub struct TimeoutPolicy {
    timeout: Duration,
    timeouts: Arc<Tally>,
}

impl TimeoutLayer {
    /// A layer that gives every operation `timeout`.
    pub fn new(timeout: Duration) -> Self {
        TimeoutLayer {
            timeout,
            timeouts: Arc::default(),
        }
    }

    /// Calls that timed out so far through every wrapper of this layer.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.get()
    }
}

impl<B> tower_layer::Layer<B> for TimeoutLayer {
    type Service = Layered<B, TimeoutPolicy>;

    fn layer(&self, inner: B) -> Self::Service {
        Layered::new(
            inner,
            Arc::new(TimeoutPolicy {
                timeout: self.timeout,
                timeouts: self.timeouts.clone(),
            }),
        )
    }
}

impl Policy for TimeoutPolicy {
    fn name(&self) -> &'static str {
        "timeout"
    }

    async fn call<'a, T, F, Fut>(&'a self, call: Call<'a>, run: F) -> Result<T>
    where
        T: Send + 'a,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<T>> + Send + 'a,
    {
        {
            match tokio::time::timeout(self.timeout, run()).await {
                Ok(result) => result,
                Err(_) => {
                    self.timeouts.add(1);
                    Err(StorageError::Timeout {
                        operation: call.operation.as_str(),
                        after: self.timeout,
                    })
                }
            }
        }
    }

    fn figures(&self) -> Metadata {
        let mut m = Metadata::new();
        m.insert(
            "timeout_ms".into(),
            json!(self.timeout.as_secs_f64() * 1000.0),
        );
        m.insert("timeouts".into(), json!(self.timeouts.get()));
        m
    }
}

/// Settings of a `timeout` layer ([`TimeoutLayer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutSettings {
    /// `timeout` (required): the deadline of each operation (more than 0).
    #[serde(with = "fields::PositiveDuration")]
    pub timeout: Duration,
}

impl LayerSettings for TimeoutSettings {
    fn hint(key: &str) -> &'static str {
        match key {
            "timeout" => "a duration such as \"500ms\" or \"2s\"",
            _ => "",
        }
    }

    fn check(&self) -> std::result::Result<(), Invalid> {
        fields::positive("timeout", Some(self.timeout))
    }
}

impl TimeoutLayer {
    /// The layer the settings describe.
    pub(crate) fn from_settings(s: &TimeoutSettings) -> Self {
        TimeoutLayer::new(s.timeout)
    }
}
