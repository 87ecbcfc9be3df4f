//! Retry with exponential backoff and jitter.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::fields::{self, Invalid, LayerSettings, WithSome};
use super::names::{self, Tally};
use super::{Call, Layered, Policy};
use crate::error::{Result, StorageError};
use crate::model::Metadata;

/// Retries calls that failed with a transient error ([`StorageError::is_transient`]),
/// with exponential backoff and full jitter (backon), up to a number of attempts and an
/// elapsed time. Permanent errors (bad input, not found, authentication, a closed
/// backend) return at once.
///
/// A call that could apply twice is retried only where it cannot: appends carry a
/// message id fixed before the first attempt, so a retried append is stored once; upserts,
/// checkpoints, pending writes and task context are keyed. An `update_session` that adds
/// to counters is retried only after an [`StorageError::Unavailable`] (the call was
/// refused before it ran); after a timeout or a dropped connection the increment may
/// have landed, so the error is returned instead of risking a double count. Set
/// [`RetryLayer::with_retry_non_idempotent`] to prefer at-least-once counting.
///
/// Put [`TimeoutLayer`](super::TimeoutLayer) inside retry to give each attempt its own
/// deadline, or outside to bound the whole call including backoff.
///
/// When retries run out, the last error is returned as it was, still transient: a
/// [`FailoverLayer`](super::FailoverLayer) outside then sees a failing primary and
/// serves from its fallback. (A second retry layer outside this one would retry the
/// whole sequence again; use one.)
///
/// # When the caller gives up
///
/// The layer keeps no state per call: a dropped call stops where it stood, in a backoff
/// sleep or in an attempt. An attempt dropped while the store runs it may still apply
/// (outcome unknown); nothing re-runs it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::time::Duration;
/// use aiecs_storage::layer::RetryLayer;
/// use aiecs_storage::{prelude::*, MemoryBackend};
/// use tower::Layer;
///
/// let retry = RetryLayer::new()
///     .with_max_attempts(4)
///     .with_max_elapsed(Duration::from_secs(5));
/// let storage = retry.layer(MemoryBackend::new());
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RetryLayer {
    config: RetryConfig,
    stats: Arc<RetryStats>,
}

#[derive(Debug, Clone)]
struct RetryConfig {
    max_attempts: usize,
    min_delay: Duration,
    max_delay: Duration,
    max_elapsed: Duration,
    retry_non_idempotent: bool,
}

#[derive(Debug)]
struct RetryStats {
    retries: Tally,
    exhausted: Tally,
}

impl Default for RetryStats {
    fn default() -> Self {
        RetryStats {
            retries: Tally::reported(names::RETRIES_TOTAL, &[]),
            exhausted: Tally::local(),
        }
    }
}

/// The policy a [`RetryLayer`] runs in its [`Layered`] wrappers.
#[derive(Debug)]
pub struct RetryPolicy {
    config: RetryConfig,
    stats: Arc<RetryStats>,
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryLayer {
    /// Up to 3 attempts, delays from 10 ms to 1 s, at most 10 s in all.
    pub fn new() -> Self {
        RetryLayer {
            config: RetryConfig {
                max_attempts: 3,
                min_delay: Duration::from_millis(10),
                max_delay: Duration::from_secs(1),
                max_elapsed: Duration::from_secs(10),
                retry_non_idempotent: false,
            },
            stats: Arc::default(),
        }
    }

    /// Sets how many times a call runs at most, the first included (at least 1).
    pub fn with_max_attempts(mut self, attempts: usize) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// Sets the first delay; each next one doubles, up to the max delay.
    pub fn with_min_delay(mut self, delay: Duration) -> Self {
        self.config.min_delay = delay;
        self
    }

    /// Sets the longest delay between two attempts.
    pub fn with_max_delay(mut self, delay: Duration) -> Self {
        self.config.max_delay = delay;
        self
    }

    /// Sets the time after which no new attempt starts.
    pub fn with_max_elapsed(mut self, elapsed: Duration) -> Self {
        self.config.max_elapsed = elapsed;
        self
    }

    /// Also retries counter increments after ambiguous failures (at-least-once counts).
    pub fn with_retry_non_idempotent(mut self, retry: bool) -> Self {
        self.config.retry_non_idempotent = retry;
        self
    }

    /// Retries made so far by every wrapper of this layer.
    pub fn retries(&self) -> u64 {
        self.stats.retries.get()
    }
}

impl<B> tower_layer::Layer<B> for RetryLayer {
    type Service = Layered<B, RetryPolicy>;

    fn layer(&self, inner: B) -> Self::Service {
        Layered::new(
            inner,
            Arc::new(RetryPolicy {
                config: self.config.clone(),
                stats: self.stats.clone(),
            }),
        )
    }
}

impl RetryPolicy {
    fn should_retry(&self, call: &Call<'_>, started: Instant, error: &StorageError) -> bool {
        let allowed =
            call.idempotent || self.config.retry_non_idempotent || !error.may_have_applied();
        error.is_transient() && allowed && started.elapsed() < self.config.max_elapsed
    }
}

impl Policy for RetryPolicy {
    fn name(&self) -> &'static str {
        "retry"
    }

    async fn call<'a, T, F, Fut>(&'a self, call: Call<'a>, run: F) -> Result<T>
    where
        T: Send + 'a,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<T>> + Send + 'a,
    {
        {
            let started = Instant::now();
            let backoff = ExponentialBuilder::new()
                .with_min_delay(self.config.min_delay)
                .with_max_delay(self.config.max_delay)
                .with_max_times(self.config.max_attempts - 1)
                .with_jitter();
            let result = (&run)
                .retry(backoff)
                .sleep(tokio::time::sleep)
                .when(|e: &StorageError| self.should_retry(&call, started, e))
                .notify(|_, _| {
                    self.stats.retries.add(1);
                })
                .await;
            if let Err(e) = &result {
                if e.is_transient() {
                    self.stats.exhausted.add(1);
                }
            }
            result
        }
    }

    fn figures(&self) -> Metadata {
        let mut m = Metadata::new();
        m.insert("max_attempts".into(), json!(self.config.max_attempts));
        m.insert("retries".into(), json!(self.stats.retries.get()));
        m.insert("gave_up".into(), json!(self.stats.exhausted.get()));
        m
    }
}

/// Settings of a `retry` layer ([`RetryLayer`]); unset keys keep its defaults (3
/// attempts, 10 ms to 1 s delays, 10 s in all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// `max_attempts`: runs of a call at most, the first included (1 to 100).
    #[serde(deserialize_with = "fields::int::<1, MAX_ATTEMPTS, _, _>")]
    pub max_attempts: Option<usize>,
    /// `min_delay`: the first backoff delay.
    #[serde(with = "fields::AnyDuration")]
    pub min_delay: Option<Duration>,
    /// `max_delay`: the longest backoff delay.
    #[serde(with = "fields::AnyDuration")]
    pub max_delay: Option<Duration>,
    /// `max_elapsed`: no attempt starts after this.
    #[serde(with = "fields::AnyDuration")]
    pub max_elapsed: Option<Duration>,
    /// `retry_non_idempotent`: also retry counter increments after ambiguous failures.
    pub retry_non_idempotent: Option<bool>,
}

/// Largest `max_attempts` a stack file may set.
const MAX_ATTEMPTS: u64 = 100;

impl LayerSettings for RetrySettings {
    fn check(&self) -> std::result::Result<(), Invalid> {
        fields::within("max_attempts", self.max_attempts, 1, MAX_ATTEMPTS)?;
        if let (Some(min), Some(max)) = (self.min_delay, self.max_delay) {
            if min > max {
                return Err(Invalid::settings(format!(
                    "min_delay ({min:?}) is longer than max_delay ({max:?})"
                )));
            }
        }
        Ok(())
    }
}

impl RetryLayer {
    /// The layer the settings describe; unset keys keep [`RetryLayer::new`]'s values.
    pub(crate) fn from_settings(s: &RetrySettings) -> Self {
        RetryLayer::new()
            .with_some(s.max_attempts, RetryLayer::with_max_attempts)
            .with_some(s.min_delay, RetryLayer::with_min_delay)
            .with_some(s.max_delay, RetryLayer::with_max_delay)
            .with_some(s.max_elapsed, RetryLayer::with_max_elapsed)
            .with_some(
                s.retry_non_idempotent,
                RetryLayer::with_retry_non_idempotent,
            )
    }
}
