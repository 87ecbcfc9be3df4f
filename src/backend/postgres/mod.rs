//! The PostgreSQL backend: tokio-postgres over a deadpool connection pool.
//!
//! `mod.rs` holds the backend type, its settings and lifecycle; `connect` URL parsing,
//! TLS and error description; `schema` the tables and migrations; `sql` every
//! statement's text; `conn` a pooled connection with those statements; `rows` row
//! decoding; one file per storage trait beside them.

mod checkpoints;
mod conn;
mod connect;
mod conversation;
mod feed;
mod lifecycle;
mod rows;
mod schema;
mod sessions;
mod sql;
mod task_context;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::OnceCell;

use self::conn::Conn;
use self::connect::{ConnectOptions, PoolLimits, SslMode};
use self::sql::Queries;
use crate::error::{Result, StorageError};

/// The schema used when [`PostgresBackend::with_schema`] is not called.
pub const DEFAULT_SCHEMA: &str = "aiecs";
/// Connections opened at `initialize()` and kept (the spec's `pool_size`).
pub const DEFAULT_POOL_SIZE: usize = 10;
/// Extra connections opened under load, beyond `pool_size` (the spec's `max_overflow`).
pub const DEFAULT_MAX_OVERFLOW: usize = 20;
/// How long a call waits for a free connection before it fails as unavailable.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a backend prunes its schema's change log, at most.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// How often a backend vacuums its schema's change log, at most.
const VACUUM_EVERY: Duration = Duration::from_secs(10);

/// Stores everything in a PostgreSQL database, in its own schema (`aiecs` unless
/// [`with_schema`](PostgresBackend::with_schema) says otherwise), created and migrated on
/// `initialize()` (or on first use).
///
/// Connections come from a deadpool pool: `pool_size` of them are opened at
/// `initialize()` and kept; under load up to `max_overflow` more are opened (the pool's
/// maximum is their sum). Every statement is parameterized and prepared once per
/// connection. Every operation is one statement, so it is atomic on its own: counters
/// are added and metadata merged in SQL (`request_count = request_count + $n`, saturating;
/// `metadata = metadata || $m`), and batches use `unnest` arrays.
///
/// The URL is `postgres://user:password@host:port/dbname` (or `postgresql://`) with
/// optional `sslmode` (`disable`, `prefer` (the default) or `require`),
/// `application_name`, `connect_timeout` (seconds), `host`, `schema` and `change_feed`
/// (`on`, the default, or `off`) parameters. `require` uses
/// TLS (rustls) and verifies the server certificate against the webpki roots and the host
/// name; `disable` and `prefer` connect in plain text. The password is never shown:
/// `Debug`, errors and health reports use the URL with the password replaced by `***`.
///
/// [`changes`](crate::StorageBackend::changes) is this store's change feed, for caches in
/// several processes writing one schema (on unless
/// [`with_change_feed(false)`](PostgresBackend::with_change_feed) or `?change_feed=off`
/// says otherwise). Every write statement logs the session, task context or thread it
/// touched to an unlogged `changes` table, in the statement itself, so the log row
/// commits with the write or not at all; the first subscription starts one follower per
/// backend that polls the log every 10 ms on a connection of its own, outside the pool
/// (same URL, same TLS). It compares transaction snapshots rather than keys, so each
/// write is reported once, by the first poll after it commits (never before), from any
/// process, this one included: a change reaches another process's cache within about
/// 10 ms. The feed is reported down while the follower's connection is lost (a poll
/// unanswered for 5 s counts as lost), reconnecting with backoff (50 ms doubling to 2 s),
/// and as having missed changes if the follower fell more than 10 s behind the log's
/// pruning; the follower stops with the backend or its last subscription. Each backend
/// prunes the log about once a second while it is used. Logging costs concurrent writers
/// a few per cent of their throughput (see the README's figures), and the follower a
/// small statement every 10 ms. Only writes made through this library version (or a
/// later one) are logged: SQL written by hand, or a process of an older version still
/// running, is not reported.
///
/// Timestamps are `timestamptz` (microseconds, as [`now`](crate::model::now) produces);
/// JSON is `jsonb`, which keeps values but not the key order of objects (metadata is a
/// map, so nothing observable changes) nor the spelling of numbers: a float written as
/// `1e16` comes back as the integer `10000000000000000`. JSONB prints numbers as plain
/// decimals (`f64::MAX` as 309 digits); serde_json reads every such decimal back to the
/// same `f64` only with its `float_roundtrip` feature, without which a few very large or
/// very precise floats decode one unit off or fail as [`StorageError::Serialization`].
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::{prelude::*, PostgresBackend};
/// let storage = PostgresBackend::new("postgres://app:secret@db.internal:5432/agents?sslmode=require")?
///     .with_schema("agents")?
///     .with_pool_size(5)
///     .with_max_overflow(10);
/// storage.initialize().await?;
/// storage.create_session("s1", "alice", &Default::default()).await?;
///
/// // The password never shows.
/// assert!(!format!("{storage:?}").contains("secret"));
/// # Ok(()) }
/// ```
pub struct PostgresBackend {
    options: ConnectOptions,
    schema: String,
    pool_size: usize,
    max_overflow: usize,
    acquire_timeout: Duration,
    state: OnceCell<State>,
    closed: AtomicBool,
    feed: feed::Feed,
    /// Whether `initialize()` makes the schema log its writes and
    /// [`changes`](crate::StorageBackend::changes) offers a feed; see
    /// [`PostgresBackend::with_change_feed`].
    feed_enabled: bool,
    /// When this backend prunes and vacuums the change log; shared with the task that
    /// does it.
    upkeep: Arc<Upkeep>,
}

/// The change log's upkeep by one backend (see [`PostgresBackend::prune_soon`]).
#[derive(Debug)]
struct Upkeep {
    /// When this backend next prunes the log, in milliseconds since `born`.
    next_prune: AtomicU64,
    /// When this backend next vacuums the log, in milliseconds since `born`.
    next_vacuum: AtomicU64,
    /// Rows this backend pruned since it last vacuumed the log.
    unvacuumed: AtomicU64,
    born: Instant,
}

impl Upkeep {
    fn new() -> Self {
        Upkeep {
            next_prune: AtomicU64::new(0),
            next_vacuum: AtomicU64::new(0),
            unvacuumed: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Counts the rows a prune deleted at `now`; the rows to vacuum if this backend's
    /// turn to vacuum has come, which it then takes. The turn is taken only when there is
    /// something to vacuum: a prune that deleted nothing (another process prunes, or
    /// nothing is old enough yet) must not use up the turn of the next one that does.
    fn pruned(&self, deleted: u64, now: u64) -> Option<u64> {
        let unvacuumed = self.unvacuumed.fetch_add(deleted, Ordering::Relaxed) + deleted;
        if unvacuumed == 0 || !claim(&self.next_vacuum, now, VACUUM_EVERY) {
            return None;
        }
        Some(self.unvacuumed.swap(0, Ordering::Relaxed))
    }

    /// A vacuum of `rows` pruned rows failed: the next turn vacuums them.
    fn vacuum_failed(&self, rows: u64) {
        self.unvacuumed.fetch_add(rows, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("url", &self.options.redacted)
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("max_overflow", &self.max_overflow)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("initialized", &self.state.initialized())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// What `initialize()` sets up once: the pool, the statements for the schema, and the
/// schema version found.
struct State {
    pool: Pool,
    sql: Queries,
    schema_version: i32,
}

impl PostgresBackend {
    /// A backend for the database at `url` (see the type's docs for the URL form), in
    /// schema `aiecs`, with 10 + 20 connections. Nothing is opened until `initialize()`
    /// or the first call. A URL that does not parse is
    /// [`StorageError::InvalidInput`] for `url`, with the password never shown.
    pub fn new(url: &str) -> Result<Self> {
        let options = connect::parse_url(url)?;
        let schema = options.schema.clone();
        let feed_enabled = options.change_feed.unwrap_or(true);
        let backend = PostgresBackend {
            options,
            schema: DEFAULT_SCHEMA.to_owned(),
            pool_size: DEFAULT_POOL_SIZE,
            max_overflow: DEFAULT_MAX_OVERFLOW,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            state: OnceCell::new(),
            closed: AtomicBool::new(false),
            feed: feed::Feed::default(),
            feed_enabled,
            upkeep: Arc::new(Upkeep::new()),
        };
        match schema {
            Some(schema) => backend.with_schema(schema),
            None => Ok(backend),
        }
    }

    /// Whether this backend offers a change feed
    /// ([`StorageBackend::changes`](crate::StorageBackend::changes)), so a cache in each
    /// process writing the schema stays coherent, and turns the schema's feed on at
    /// `initialize()` (default on; the URL's `?change_feed=off` turns it off too).
    ///
    /// The schema's feed, once on, stays on: every backend of this library writing the
    /// schema then logs its writes, whatever its own setting, so a process with the feed
    /// off is still followed by the others (each write checks the schema's flag in its
    /// own statement; turning the feed on waits for the writes in flight, so none is
    /// missed). Off, a backend offers no feed and does not turn the schema's on. To stop
    /// logging, turn it off in every process and empty the schema's `change_feed` table.
    pub fn with_change_feed(mut self, on: bool) -> Self {
        self.feed_enabled = on;
        self
    }

    /// Sets the schema that holds the tables (default `aiecs`), created at `initialize()`
    /// if missing. It must be a plain SQL identifier: `[a-z_][a-z0-9_]*`, at most 63
    /// bytes; anything else is [`StorageError::InvalidInput`] for `schema`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Result<Self> {
        let schema = schema.into();
        schema::validate_schema(&schema)?;
        self.schema = schema;
        Ok(self)
    }

    /// Sets how many connections are opened at `initialize()` and kept open (the spec's
    /// `pool_size`, default 10).
    pub fn with_pool_size(mut self, pool_size: usize) -> Self {
        self.pool_size = pool_size;
        self
    }

    /// Sets how many connections may be opened beyond `pool_size` under load (the spec's
    /// `max_overflow`, default 20). The pool holds at most `pool_size + max_overflow`
    /// connections (at least one).
    pub fn with_max_overflow(mut self, max_overflow: usize) -> Self {
        self.max_overflow = max_overflow;
        self
    }

    /// Sets how long a call waits for a free connection when all are busy before it
    /// fails with [`StorageError::Unavailable`] (default 30 s).
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The connection URL with the password replaced by `***`.
    pub fn redacted_url(&self) -> &str {
        &self.options.redacted
    }

    fn max_size(&self) -> usize {
        self.pool_size.saturating_add(self.max_overflow).max(1)
    }

    fn limits(&self) -> PoolLimits {
        PoolLimits {
            max_size: self.max_size(),
            acquire_timeout: self.acquire_timeout,
            connect_timeout: self
                .options
                .config
                .get_connect_timeout()
                .copied()
                .unwrap_or(connect::DEFAULT_CONNECT_TIMEOUT),
        }
    }

    async fn state(&self) -> Result<&State> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        self.state.get_or_try_init(|| self.open()).await
    }

    async fn conn(&self) -> Result<Conn<'_>> {
        // Opening the backend (the pool, the schema migration) comes before the caller's
        // statement is sent: what may pass later is `Unavailable` for the caller, whatever
        // became of the migration's own statements.
        let state = self.state().await.map_err(|e| match e {
            StorageError::Unavailable { .. } => e,
            e if e.is_transient() => StorageError::Unavailable {
                message: format!("cannot open {}: {e}", self.options.redacted),
            },
            e => e,
        })?;
        self.prune_soon(state);
        let client = state
            .pool
            .get()
            .await
            .map_err(|e| connect::pool_error(e, &self.options.redacted, self.limits()))?;
        Ok(Conn {
            client,
            sql: &state.sql,
            target: &self.options.redacted,
        })
    }

    /// Prunes the change log on a task of its own, at most once per [`PRUNE_EVERY`], and
    /// vacuums it at most once per [`VACUUM_EVERY`] once this backend pruned rows since
    /// its last vacuum (a server may run without autovacuum, and the log's deleted rows
    /// would then stay on disk, growing the table and its index for good): called on
    /// every use of the backend, so a schema is pruned while anyone uses it, and a
    /// backend nobody calls costs nothing. Of several processes, the one whose prune
    /// did the work vacuums. A failed prune or vacuum is retried next time.
    fn prune_soon(&self, state: &State) {
        let upkeep = &self.upkeep;
        if !claim(&upkeep.next_prune, upkeep.now(), PRUNE_EVERY) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let upkeep = Arc::clone(upkeep);
        let pool = state.pool.clone();
        let prune = state.sql.prune_changes.clone();
        let vacuum_sql = state.sql.vacuum_changes.clone();
        let target = self.options.redacted.clone();
        runtime.spawn(async move {
            let pruned = async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let keep = feed::KEEP.as_secs_f64();
                let row = client
                    .query_one(&prune, &[&keep])
                    .await
                    .map_err(|e| connect::describe(&e))?;
                let deleted: i64 = row.try_get(0).map_err(|e| e.to_string())?;
                if let Some(rows) = upkeep.pruned(deleted.max(0) as u64, upkeep.now()) {
                    if let Err(e) = client.batch_execute(&vacuum_sql).await {
                        upkeep.vacuum_failed(rows);
                        return Err(connect::describe(&e));
                    }
                }
                Ok::<_, String>(())
            };
            if let Err(e) = pruned.await {
                tracing::debug!(target = %target, error = %e, "postgres change log: prune failed");
            }
        });
    }

    fn build_pool(&self) -> Result<Pool> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let config = self.options.config.clone();
        let manager = match self.options.ssl_mode {
            SslMode::Require => {
                Manager::from_config(config, connect::rustls_connector(), manager_config)
            }
            SslMode::Disable | SslMode::Prefer => {
                Manager::from_config(config, tokio_postgres::NoTls, manager_config)
            }
        };
        let limits = self.limits();
        Pool::builder(manager)
            .max_size(limits.max_size)
            .wait_timeout(Some(self.acquire_timeout))
            .create_timeout(Some(limits.connect_timeout))
            .recycle_timeout(Some(limits.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StorageError::Backend {
                message: format!("could not build the connection pool: {e}"),
                transient: false,
                source: None,
            })
    }

    async fn open(&self) -> Result<State> {
        let pool = self.build_pool()?;
        let target = &self.options.redacted;
        let pool_error = |e| connect::pool_error(e, target, self.limits());

        let mut client = pool.get().await.map_err(pool_error)?;
        let migrated = {
            let tx = client
                .transaction()
                .await
                .map_err(|e| connect::pg_error(e, target))?;
            match schema::migrate(&tx, &self.schema, self.feed_enabled).await {
                Ok(m) => {
                    tx.commit()
                        .await
                        .map_err(|e| connect::pg_error(e, target))?;
                    m
                }
                Err(schema::MigrateError::Pg(e)) => return Err(connect::pg_error(e, target)),
                Err(schema::MigrateError::Storage(e)) => return Err(e),
            }
        };
        drop(client);

        // Open `pool_size` connections now, concurrently, and return them to the pool.
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..self.pool_size.min(self.max_size()) {
            let pool = pool.clone();
            opening.spawn(async move { pool.get().await });
        }
        let mut held = Vec::with_capacity(self.pool_size);
        while let Some(joined) = opening.join_next().await {
            match joined {
                Ok(Ok(client)) => held.push(client),
                Ok(Err(e)) => return Err(pool_error(e)),
                Err(e) => {
                    return Err(StorageError::Backend {
                        message: format!("opening a connection panicked: {e}"),
                        transient: false,
                        source: None,
                    })
                }
            }
        }
        drop(held);

        Ok(State {
            pool,
            sql: Queries::new(&self.schema, migrated.logged),
            schema_version: migrated.to,
        })
    }
}

/// Moves `next` (milliseconds since the backend was made) `every` past `now` if it is
/// due, once among concurrent callers: whether this caller did.
fn claim(next: &AtomicU64, now: u64, every: Duration) -> bool {
    let due = next.load(Ordering::Relaxed);
    now >= due
        && next
            .compare_exchange(
                due,
                now + every.as_millis() as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::sql::SESSION_COLUMNS;
    use super::*;

    #[test]
    fn a_prune_that_deleted_nothing_leaves_the_vacuum_turn_to_the_next() {
        let upkeep = Upkeep::new();
        let every = VACUUM_EVERY.as_millis() as u64;
        // Nothing old enough yet: no vacuum, and the turn stays.
        assert_eq!(upkeep.pruned(0, 0), None);
        assert_eq!(upkeep.pruned(5, 1_000), Some(5));
        // Not this backend's turn for another `every`.
        assert_eq!(upkeep.pruned(3, 2_000), None);
        // The turn comes while this prune deletes nothing: the rows pruned before still
        // need the vacuum.
        assert_eq!(upkeep.pruned(0, 1_000 + every), Some(3));
        assert_eq!(upkeep.pruned(0, 1_000 + 3 * every), None);
        // A failed vacuum leaves its rows to the next turn.
        assert_eq!(upkeep.pruned(4, 1_000 + 4 * every), Some(4));
        upkeep.vacuum_failed(4);
        assert_eq!(upkeep.pruned(0, 1_000 + 5 * every), Some(4));
    }

    #[test]
    fn debug_hides_the_password() {
        let b = PostgresBackend::new("postgres://app:s3cr3t-hunter2@db:5432/x").unwrap();
        let shown = format!("{b:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("postgres://app:***@db:5432/x"), "{shown}");
        assert_eq!(b.redacted_url(), "postgres://app:***@db:5432/x");
    }

    #[test]
    fn schema_is_validated() {
        let b = PostgresBackend::new("postgres://db/x").unwrap();
        match b.with_schema("Bad-Name") {
            Err(StorageError::InvalidInput { field, .. }) => assert_eq!(field, "schema"),
            other => panic!("{other:?}"),
        }
        let b = PostgresBackend::new("postgres://db/x")
            .unwrap()
            .with_schema("tenant_1")
            .unwrap();
        assert_eq!(b.schema(), "tenant_1");
    }

    #[test]
    fn pool_is_pool_size_plus_overflow() {
        let b = PostgresBackend::new("postgres://db/x").unwrap();
        assert_eq!(b.max_size(), 30);
        let b = b.with_pool_size(3).with_max_overflow(2);
        assert_eq!(b.max_size(), 5);
        let b = b.with_pool_size(0).with_max_overflow(0);
        assert_eq!(b.max_size(), 1);
    }

    #[test]
    fn the_change_feed_is_on_unless_turned_off() {
        let on = PostgresBackend::new("postgres://db/x").unwrap();
        assert!(on.feed_enabled);
        assert!(!on.with_change_feed(false).feed_enabled);
        let off = PostgresBackend::new("postgres://db/x?change_feed=off").unwrap();
        assert!(!off.feed_enabled);
        assert!(off.with_change_feed(true).feed_enabled);
    }

    #[test]
    fn every_write_logs_its_change() {
        // A schema whose feed was off at open: each statement checks the flag itself.
        let checked = Queries::new("aiecs", false);
        // A schema that logged at open: the statements log without looking.
        let known = Queries::new("aiecs", true);
        let logs = "INSERT INTO \"aiecs\".changes (kind, id)";
        for (q, conditional) in [(&checked, true), (&known, false)] {
            every_write(q, |name, sql| {
                assert!(sql.contains(logs), "{name} does not log: {sql}");
                assert_eq!(sql.contains("change_feed"), conditional, "{name}: {sql}");
            });
        }
    }

    fn every_write(q: &Queries, check: impl Fn(&str, &str)) {
        for (name, sql) in [
            ("create_session", &q.create_session),
            ("batch_create_sessions", &q.batch_create_sessions),
            ("update_session", &q.update_session),
            ("end_session", &q.end_session),
            ("add_message", &q.add_message),
            ("batch_add_messages", &q.batch_add_messages),
            ("restore_sessions", &q.restore_sessions),
            ("delete_session", &q.delete_session),
            ("restore_messages", &q.restore_messages),
            ("restore_checkpoints", &q.restore_checkpoints),
            ("store_checkpoint", &q.store_checkpoint),
            ("put_writes", &q.put_writes),
            ("batch_put_writes", &q.batch_put_writes),
            ("delete_thread", &q.delete_thread),
            ("store_task_context", &q.store_task_context),
            ("cleanup", &q.cleanup),
        ] {
            check(name, sql);
        }
    }

    #[test]
    fn list_sessions_uses_only_the_filters_given() {
        let q = Queries::new("aiecs", true);
        assert_eq!(
            q.list_sessions(false, false, false),
            format!(
                "SELECT {SESSION_COLUMNS} FROM \"aiecs\".sessions WHERE true \
                 ORDER BY session_id LIMIT $1"
            )
        );
        assert!(q.list_sessions(true, false, true).ends_with(
            "WHERE true AND session_id > $1 AND status = $2 ORDER BY session_id LIMIT $3"
        ));
    }
}
