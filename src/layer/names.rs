//! Every metric the crate reports, named once. Names follow Prometheus conventions
//! (`_total` for counters, base units such as `_seconds`); labels are bounded: operation
//! names, a backend label the user chooses, outcomes, error kinds and fixed event names,
//! never ids or content.

/// Counter of operations, labels `operation`, `backend`, `outcome` (`ok`, `error`, or
/// `cancelled`: the caller gave up before the call answered).
pub const OPERATIONS_TOTAL: &str = "aiecs_storage_operations_total";
/// Histogram of operation latency in seconds, labels `operation`, `backend`; buckets
/// [`LATENCY_BUCKETS`].
pub const OPERATION_DURATION_SECONDS: &str = "aiecs_storage_operation_duration_seconds";
/// Counter of failed operations, labels `operation`, `backend`, `kind` (the error kind).
pub const ERRORS_TOTAL: &str = "aiecs_storage_errors_total";
/// Counter of cache hits.
pub const CACHE_HITS_TOTAL: &str = "aiecs_storage_cache_hits_total";
/// Counter of cache misses.
pub const CACHE_MISSES_TOTAL: &str = "aiecs_storage_cache_misses_total";
/// Counter of cache evictions (size or expiry, not invalidation).
pub const CACHE_EVICTIONS_TOTAL: &str = "aiecs_storage_cache_evictions_total";
/// Gauge of cache entries.
pub const CACHE_ENTRIES: &str = "aiecs_storage_cache_entries";
/// Gauge of the cache's change feed: 1 up, 0 down (reads bypass the cache). Absent
/// when the cache follows no feed.
pub const CACHE_FEED_UP: &str = "aiecs_storage_cache_feed_up";
/// Counter of sessions, task contexts and threads the change feed reported written.
pub const CACHE_REMOTE_CHANGES_TOTAL: &str = "aiecs_storage_cache_remote_changes_total";
/// Counter of times the change feed went down or missed changes, each emptying the
/// cache.
pub const CACHE_FEED_LOSSES_TOTAL: &str = "aiecs_storage_cache_feed_losses_total";
/// Counter of retries made (attempts after the first).
pub const RETRIES_TOTAL: &str = "aiecs_storage_retries_total";
/// Counter of failover events, label `event`: `primary_failure`, `primary_timeout`,
/// `fallback_read`, `fallback_write_failure`, `replayed_write`, `dropped_write`,
/// `unreplayed_increment`, `replay_skipped_newer` (a replayed record left out because
/// the primary held a newer version of it).
pub const FAILOVER_EVENTS_TOTAL: &str = "aiecs_storage_failover_events_total";
/// Gauge of the failover breaker: 0 closed, 1 half open, 2 open.
pub const BREAKER_STATE: &str = "aiecs_storage_breaker_state";
/// Gauge of writes waiting in a failover journal
/// ([`FailoverLayer::with_journal`](crate::layer::FailoverLayer::with_journal)) for
/// replay to the primary, other processes' included. Refreshed on each journal write,
/// each replayed entry, each replay attempt (every cooldown while entries wait) and
/// each `get_metrics` or `health_check` of the layer.
pub const FAILOVER_JOURNAL_DEPTH: &str = "aiecs_storage_failover_journal_depth";
/// Gauge of the age in seconds of the oldest write waiting in a failover journal (0
/// when it is empty); refreshed as [`FAILOVER_JOURNAL_DEPTH`] is.
pub const FAILOVER_JOURNAL_OLDEST_AGE_SECONDS: &str =
    "aiecs_storage_failover_journal_oldest_age_seconds";
/// Histogram of items per batch written by the batching layer; buckets
/// [`BATCH_SIZE_BUCKETS`].
pub const BATCH_SIZE: &str = "aiecs_storage_batch_size";
/// Gauge of items waiting in the batching layer's queue.
pub const BATCH_QUEUE_DEPTH: &str = "aiecs_storage_batch_queue_depth";

/// Latency buckets in seconds, from 50 µs to 10 s: storage calls range from an
/// in-memory hit to a slow remote write, and Prometheus renders histograms without
/// explicit buckets as summaries.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Batch-size buckets.
pub const BATCH_SIZE_BUCKETS: [f64; 10] =
    [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 512.0, 2048.0];

/// Registers a description of every metric with the installed recorder (exporters show
/// them as `# HELP`). Called by the Prometheus helper; harmless to call again.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(OPERATIONS_TOTAL, "Storage operations by outcome.");
    describe_histogram!(
        OPERATION_DURATION_SECONDS,
        Unit::Seconds,
        "Latency of storage operations."
    );
    describe_counter!(ERRORS_TOTAL, "Failed storage operations by error kind.");
    describe_counter!(CACHE_HITS_TOTAL, "Reads served by the cache.");
    describe_counter!(CACHE_MISSES_TOTAL, "Reads the cache passed to its backend.");
    describe_counter!(
        CACHE_EVICTIONS_TOTAL,
        "Cache entries evicted for size or age."
    );
    describe_gauge!(CACHE_ENTRIES, "Entries held by the cache.");
    describe_gauge!(
        CACHE_FEED_UP,
        "Whether the cache's change feed is up (1) or down (0, reads bypass the cache)."
    );
    describe_counter!(
        CACHE_REMOTE_CHANGES_TOTAL,
        "Sessions, task contexts and threads the change feed reported written."
    );
    describe_counter!(
        CACHE_FEED_LOSSES_TOTAL,
        "Times the change feed went down or missed changes, each emptying the cache."
    );
    describe_counter!(RETRIES_TOTAL, "Attempts made after a first one failed.");
    describe_counter!(FAILOVER_EVENTS_TOTAL, "Failover events by kind.");
    describe_gauge!(
        BREAKER_STATE,
        "Failover circuit breaker: 0 closed, 1 half open, 2 open."
    );
    describe_gauge!(
        FAILOVER_JOURNAL_DEPTH,
        "Writes in the failover journal waiting for replay to the primary."
    );
    describe_gauge!(
        FAILOVER_JOURNAL_OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest write in the failover journal (0 when empty)."
    );
    describe_histogram!(BATCH_SIZE, "Items per batch written.");
    describe_gauge!(BATCH_QUEUE_DEPTH, "Items waiting in the batching queue.");
}

/// A count kept in the layer (for its own reports) and mirrored to the facade. The
/// facade handle is resolved on first use, against the recorder installed then, so a
/// hot path does not look the metric up on every call.
#[derive(Debug)]
pub(crate) struct Tally {
    count: std::sync::atomic::AtomicU64,
    metric: Option<(&'static str, &'static [(&'static str, &'static str)])>,
    handle: std::sync::OnceLock<metrics::Counter>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally::local()
    }
}

impl Tally {
    /// A count mirrored to the facade counter `name` with fixed `labels`.
    pub(crate) const fn reported(
        name: &'static str,
        labels: &'static [(&'static str, &'static str)],
    ) -> Self {
        Tally {
            count: std::sync::atomic::AtomicU64::new(0),
            metric: Some((name, labels)),
            handle: std::sync::OnceLock::new(),
        }
    }

    /// A count kept in the layer only.
    pub(crate) const fn local() -> Self {
        Tally {
            count: std::sync::atomic::AtomicU64::new(0),
            metric: None,
            handle: std::sync::OnceLock::new(),
        }
    }

    /// Adds `n`.
    pub(crate) fn add(&self, n: u64) {
        self.count
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if let Some((name, labels)) = self.metric {
            self.handle
                .get_or_init(|| {
                    let labels: Vec<metrics::Label> = labels
                        .iter()
                        .map(|&(k, v)| metrics::Label::new(k, v))
                        .collect();
                    metrics::counter!(name, labels)
                })
                .increment(n);
        }
    }

    /// The count so far.
    pub(crate) fn get(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A facade gauge handle resolved on first use.
#[derive(Debug, Default)]
pub(crate) struct LazyGauge(std::sync::OnceLock<metrics::Gauge>);

impl LazyGauge {
    /// Sets gauge `name` to `value`.
    pub(crate) fn set(&self, name: &'static str, value: f64) {
        self.0.get_or_init(|| metrics::gauge!(name)).set(value);
    }
}

/// A facade histogram handle resolved on first use.
#[derive(Debug, Default)]
pub(crate) struct LazyHistogram(std::sync::OnceLock<metrics::Histogram>);

impl LazyHistogram {
    /// Records `value` in histogram `name`.
    pub(crate) fn record(&self, name: &'static str, value: f64) {
        self.0
            .get_or_init(|| metrics::histogram!(name))
            .record(value);
    }
}
