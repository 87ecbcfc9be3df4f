//! Failover to a second backend, with dual writes, a circuit breaker and hinted handoff.
//!
//! `mod.rs` holds the layer, its options and the wrapper type; `settings` its table in
//! a stack file; `breaker` the circuit breaker and its counters; `replay` the queue of
//! writes acknowledged from the fallback and their replay; `journal` that queue kept in
//! a file; `newer` what a replay leaves out because the primary holds newer data;
//! `route` where each call goes; `storage` the trait implementations.

mod breaker;
#[cfg(feature = "sqlite")]
mod journal;
#[cfg(not(feature = "sqlite"))]
#[path = "no_journal.rs"]
mod journal;
mod newer;
mod replay;
mod route;
mod settings;
mod storage;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use self::breaker::FailoverState;
pub use self::settings::FailoverSettings;
use crate::error::Result;
use crate::storage::StorageBackend;

type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Serves from a fallback backend when the primary (the wrapped backend) fails.
///
/// - **Reads** go to the primary and fall back on transient errors.
/// - **Writes** go to both while the primary is healthy: the primary's answer is
///   returned; a fallback failure is counted and logged, never raised.
/// - **A deadline of its own** ([`with_primary_timeout`](FailoverLayer::with_primary_timeout),
///   1 s by default) bounds every call to the primary, so a primary that hangs (a frozen
///   server, a network that drops packets) counts as failing and the call is served by
///   the fallback. A timeout layer *outside* failover cancels the call before failover
///   sees any error, so failover could never engage on a hung primary without this
///   deadline; an outer deadline must be longer than this one plus a fallback call.
///   Bulk operations whose time grows with the data (`cleanup_expired_sessions`, the
///   `restore_*` calls, `delete_thread`) run without it.
/// - **Circuit breaker**: after `failure_threshold` consecutive transient primary
///   failures the primary is not called for `cooldown`; then one call probes it and a
///   success closes the breaker.
/// - **Writes while the primary is down are kept, not lost** (hinted handoff): they are
///   stored in the fallback, acknowledged, and queued (bounded by `max_pending`) for
///   replay to the primary. Until the queue is replayed, reads and writes go to the
///   fallback, so nothing acknowledged is invisible. A task of the layer's own replays
///   the queue in order whenever the breaker lets it (after each cooldown), whether or
///   not calls reach the layer (a cache in front may answer every read), and only after
///   the queue empties does the primary serve again. When the queue is full, writes fail with
///   [`StorageError::Unavailable`](crate::error::StorageError::Unavailable)(crate::error::StorageError::Unavailable) instead of being acknowledged and dropped. A write
///   the fallback answers as changing nothing (`update_session` or `end_session` of a
///   session it lacks: `Ok(false)`) is not queued, so the primary never applies what
///   the caller was told did not happen.
///
/// # When the caller gives up
///
/// A caller may drop the call at any `.await` (an outer timeout, `select!`). What that
/// leaves behind:
///
/// - **A dropped probe counts as a failure**: the breaker opens again for a cooldown
///   instead of staying half-open with nobody to close it.
/// - **The replay is never cancelled by a caller**: it runs in the layer's task, so the
///   queue drains however the calls around it end.
/// - **A degraded write records its intent first**: the replay entry is queued before
///   the fallback is called and removed only if the fallback refuses the write for
///   good. A call dropped while the fallback writes (the write may land) keeps its
///   entry, so what the fallback holds also reaches the primary.
/// - **Counter increments are replayed at most once**: an increment whose attempt on
///   the primary may have applied (a timeout, a lost connection, a replay cut short) is
///   replayed without its counters (metadata and status still are), and counted as
///   `unreplayed_increments`. Each replay starts with a health check of the primary, so
///   a primary still down refuses the check, not a replayed increment.
/// - **A call dropped after the primary answered** may leave that write out of the
///   fallback (as a fallback failure would); the primary has it.
///
/// By default the queue lives in memory: a process that dies while the primary is down
/// keeps those writes in the fallback only, and
/// [`close`](crate::StorageBackend::close) tries one last replay and fails (after
/// closing both backends) if writes are left that only the fallback holds.
///
/// # A durable journal
///
/// With [`with_journal`](FailoverLayer::with_journal) the queue is a SQLite file of the
/// layer's own instead, and `close` leaves what is left in it without failing. Each
/// degraded write is written to the file (`synchronous = FULL`: an fsync per write, made
/// on a thread of the journal's own, never on the async runtime) before the fallback is
/// called, as an *intent*, and marked *acknowledged* before the caller is told; the
/// replay marks an entry *sending* before it sends it and deletes it once the primary
/// answered. The thread takes the file's calls in the order they were made, so the
/// file keeps the order of the layer's queue; a call whose caller gives up still runs to
/// its end there (a caller dropped while its intent is written leaves the intent, whose
/// write is then replayed as one whose outcome the caller never learned). A layer opened over a file that holds entries (the next process
/// after a crash, SIGKILL included) starts degraded and replays them in order. What that
/// guarantees:
///
/// - **Acknowledged writes reach the primary**, in the order they were acknowledged, and
///   each acknowledged counter increment is applied once: messages carry their ids, and
///   everything else but counters is keyed or an upsert.
/// - **Outcomes nobody knows lose their counters, never apply them twice.** An entry
///   found *sending* (its replayer died, or lost its lease, mid-send) and an *intent*
///   another owner left (its process died, or its caller gave up, before the answer) are
///   replayed without their counter increments, counted in `unreplayed_increments`.
///   Such an intent is waited for until it is one lease
///   ([`with_journal_lease`](FailoverLayer::with_journal_lease)) old, since its writer
///   may still be waiting for the fallback.
/// - **One replayer at a time**: processes (and layers) sharing a file take a lease,
///   renewed with each entry, in the transaction that marks the entry *sending*; the
///   others find it taken, count a primary failure and look again after a cooldown.
/// - **Bounded**: by [`with_max_pending`](FailoverLayer::with_max_pending) entries and
///   [`with_journal_max_bytes`](FailoverLayer::with_journal_max_bytes) bytes; past
///   either, writes fail with `Unavailable`, not acknowledged.
/// - **Visible**: `get_metrics` and `health_check` report `journal_depth`,
///   `journal_oldest_age_seconds` and `journal_path`, and a non-empty journal makes the
///   health `degraded` (`aiecs-storage health` and `diagnose` name it). The gauges
///   [`aiecs_storage_failover_journal_depth`](crate::layer::names::FAILOVER_JOURNAL_DEPTH)
///   and
///   [`aiecs_storage_failover_journal_oldest_age_seconds`](crate::layer::names::FAILOVER_JOURNAL_OLDEST_AGE_SECONDS)
///   export the same figures (one journal per process: a second one shares them).
///
/// Not guaranteed yet: a process routes by what it has seen, so one that never saw the
/// outage serves reads from the primary while another process's entries wait. The
/// primary is assumed to keep what it acknowledged (a Redis without persistence that
/// restarts empty loses the writes made before its crash). A replayed write carries the
/// replay's timestamps on the primary.
///
/// # Replay over newer data
///
/// Other processes may write to the primary once it is back, before a replay reaches
/// the same records. Each queued write (journal or memory) carries when it was
/// acknowledged, and just before sending it the replay reads the record's timestamp on
/// the primary: where the contract gives one that says the record was written after
/// the entry, the entry's keyed part is left out and counted in `replay_skipped_newer`
/// (with a warning naming the operation and id). What that covers:
///
/// - **Sessions** (`updated_at`): `create_session`, the metadata and status of
///   `update_session`, `end_session`, `delete_session` and the sessions of
///   `batch_create_sessions` and `restore_sessions` are left out when the session was
///   written after them. The counter increments of an update are still sent: counts add
///   up whatever else was written. `updated_at` moves on every write to a session,
///   messages included, so a newer message also counts as newer data.
/// - **Checkpoints** (`created_at`): a `store_checkpoint` (or restored checkpoint) of an
///   id the primary first stored after the entry is left out; a `delete_thread` is left
///   out when a namespace's newest checkpoint was stored after it (the thread's older
///   checkpoints then stay).
/// - **`cleanup_expired_sessions`** removes what was idle when it was acknowledged, not
///   when it is replayed: sessions written since are kept.
///
/// What it cannot tell, and sends as it is: messages (appended once by id, never
/// overwriting), pending writes and task contexts (the contract gives them no time), a
/// checkpoint id stored again in place after the entry (its `created_at` stays), and a
/// new checkpoint id, which becomes its thread's newest even when another process stored
/// a newer one since. A record another process deleted after the entry is written
/// again. The check and the send are two calls: a write another process makes between
/// them can still be overwritten. The replay's own writes stamp the replay's time, so it
/// remembers, for each record it wrote, the window of its write and the time the data
/// stands for, and a later entry for that record is compared with the latter (with a
/// journal this survives a replayer's restart; a replayer killed between a send and its
/// bookkeeping makes that record look newer, so later entries for it are left out, not
/// overwritten). Timestamps are compared across processes: their clocks are assumed in
/// step, as the backends stamp records with the writing process's clock.
///
/// Put a cache outside failover to keep serving hits however the backends fare; inside,
/// it only caches the primary's reads.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::sync::Arc;
/// use aiecs_storage::layer::FailoverLayer;
/// use aiecs_storage::{prelude::*, MemoryBackend, SqliteBackend};
/// use tower::Layer;
///
/// let fallback = Arc::new(SqliteBackend::in_memory());
/// let storage = FailoverLayer::new(fallback).layer(MemoryBackend::new());
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// # Ok(()) }
/// ```
///
/// [`StorageError::Unavailable`]: crate::StorageError::Unavailable
#[derive(Clone)]
pub struct FailoverLayer {
    fallback: Arc<dyn StorageBackend>,
    config: FailoverConfig,
    state: Arc<FailoverState>,
}

impl std::fmt::Debug for FailoverLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverLayer")
            .field("fallback", &self.fallback.kind())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct FailoverConfig {
    failure_threshold: u32,
    cooldown: Duration,
    max_pending: usize,
    primary_timeout: Option<Duration>,
    journal_max_bytes: u64,
    journal_lease: Duration,
}

impl FailoverLayer {
    /// Fails over to `fallback`: 5 consecutive failures open the breaker for 10 s; a
    /// primary call that takes over 1 s counts as failed; up to 10 000 writes wait for
    /// replay.
    pub fn new(fallback: Arc<dyn StorageBackend>) -> Self {
        FailoverLayer {
            fallback,
            config: FailoverConfig {
                failure_threshold: 5,
                cooldown: Duration::from_secs(10),
                max_pending: 10_000,
                primary_timeout: Some(Duration::from_secs(1)),
                journal_max_bytes: 64 * 1024 * 1024,
                journal_lease: Duration::from_secs(30),
            },
            state: Arc::default(),
        }
    }

    /// Sets how many consecutive transient primary failures open the breaker (at least 1).
    pub fn with_failure_threshold(mut self, failures: u32) -> Self {
        self.config.failure_threshold = failures.max(1);
        self
    }

    /// Sets how long an open breaker keeps the primary out before probing it.
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.cooldown = cooldown;
        self
    }

    /// Sets how many writes may wait for replay before new writes are refused.
    pub fn with_max_pending(mut self, max_pending: usize) -> Self {
        self.config.max_pending = max_pending;
        self
    }

    /// Sets the deadline of each call to the primary (`None`: no deadline of its own).
    /// A call past it counts as a transient primary failure and is served by the
    /// fallback; a write past it may still land on the primary, so the replay of a
    /// counter increment omits the counters.
    pub fn with_primary_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.primary_timeout = timeout;
        self
    }

    /// Keeps the writes waiting for replay in a SQLite file at `path` (created if
    /// missing) instead of memory, so they outlive the process: a layer opened later
    /// over the same file (after a crash, too) starts degraded and replays them. Several
    /// processes may share one file; a lease lets one replay at a time. Replaces any
    /// counters and breaker state the layer had.
    ///
    /// ```
    /// # fn main() -> aiecs_storage::Result<()> {
    /// use std::sync::Arc;
    /// use aiecs_storage::layer::FailoverLayer;
    /// use aiecs_storage::SqliteBackend;
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let layer = FailoverLayer::new(Arc::new(SqliteBackend::in_memory()))
    ///     .with_journal(dir.path().join("failover.journal"))?;
    /// assert_eq!(layer.pending_writes(), 0);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "sqlite")]
    pub fn with_journal(mut self, path: impl AsRef<std::path::Path>) -> Result<Self> {
        let (journal, (depth, _)) = journal::Journal::open(path.as_ref())?;
        let state = FailoverState {
            journal: Some(journal),
            ..FailoverState::default()
        };
        // Writes a process acknowledged before it stopped: served from the fallback
        // until they reach the primary, as if this process had acknowledged them.
        state.queued.store(depth, Ordering::Relaxed);
        state.degraded.store(depth > 0, Ordering::SeqCst);
        self.state = Arc::new(state);
        Ok(self)
    }

    /// Sets how many bytes of entries a journal ([`with_journal`](Self::with_journal))
    /// may hold before new writes are refused with
    /// [`StorageError::Unavailable`](crate::StorageError::Unavailable) (64 MiB by
    /// default). [`with_max_pending`](Self::with_max_pending) bounds its entries.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use aiecs_storage::layer::FailoverLayer;
    /// use aiecs_storage::MemoryBackend;
    ///
    /// let layer = FailoverLayer::new(Arc::new(MemoryBackend::new())).with_journal_max_bytes(1 << 20);
    /// ```
    pub fn with_journal_max_bytes(mut self, bytes: u64) -> Self {
        self.config.journal_max_bytes = bytes;
        self
    }

    /// Sets how long a journal's replay lease lasts unrenewed (30 s by default): a
    /// process that dies while replaying holds up the others this long. It is also how
    /// long another process's unacknowledged entry at the front is waited for, before
    /// it is taken as left by a process that died.
    ///
    /// ```
    /// use std::{sync::Arc, time::Duration};
    /// use aiecs_storage::layer::FailoverLayer;
    /// use aiecs_storage::MemoryBackend;
    ///
    /// let layer = FailoverLayer::new(Arc::new(MemoryBackend::new()))
    ///     .with_journal_lease(Duration::from_secs(5));
    /// ```
    pub fn with_journal_lease(mut self, lease: Duration) -> Self {
        self.config.journal_lease = lease.max(Duration::from_millis(1));
        self
    }

    /// The breaker's state: `closed`, `open` or `half_open`.
    pub fn breaker_state(&self) -> &'static str {
        self.state.breaker_name()
    }

    /// Writes waiting for replay to the primary.
    pub fn pending_writes(&self) -> usize {
        self.state.queued.load(Ordering::Relaxed) as usize
    }

    /// Whether calls are being served by the fallback until the primary catches up.
    pub fn is_degraded(&self) -> bool {
        self.state.degraded.load(Ordering::Acquire)
    }
}

impl<B> tower_layer::Layer<B> for FailoverLayer {
    type Service = Failover<B>;

    fn layer(&self, primary: B) -> Self::Service {
        Failover {
            primary: Arc::new(primary),
            fallback: self.fallback.clone(),
            config: self.config,
            state: self.state.clone(),
        }
    }
}

/// The wrapper a [`FailoverLayer`] puts around its primary.
pub struct Failover<B> {
    // Shared with the replay task, which outlives the call that starts it.
    primary: Arc<B>,
    fallback: Arc<dyn StorageBackend>,
    config: FailoverConfig,
    state: Arc<FailoverState>,
}

impl<B> std::fmt::Debug for Failover<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("fallback", &self.fallback.kind())
            .field("breaker", &self.state.breaker_name())
            .finish_non_exhaustive()
    }
}
