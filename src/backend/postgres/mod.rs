//! The PostgreSQL backend: tokio-postgres over a deadpool connection pool.

mod connect;
mod schema;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde_json::{json, Value};
use tokio::sync::OnceCell;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::Row;

use crate::error::{Result, StorageError};
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, IdPage, Message, Metadata, MetricsReport,
    NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionMetrics, SessionPage,
    SessionQuery, SessionUpdate, TaskWrites, WriteInput,
};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
};
use crate::validate;

use self::connect::{ConnectOptions, PoolLimits, SslMode};

/// The schema used when [`PostgresBackend::with_schema`] is not called.
pub const DEFAULT_SCHEMA: &str = "aiecs";
/// Connections opened at `initialize()` and kept (the spec's `pool_size`).
pub const DEFAULT_POOL_SIZE: usize = 10;
/// Extra connections opened under load, beyond `pool_size` (the spec's `max_overflow`).
pub const DEFAULT_MAX_OVERFLOW: usize = 20;
/// How long a call waits for a free connection before it fails as unavailable.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

const SESSION_COLUMNS: &str = "session_id, user_id, created_at, updated_at, status, metadata, \
     request_count, total_processing_time, error_count";
/// The SET items that move a session's `updated_at` to `at` (`row` names the updated
/// row): `indexed_at` (the cleanup index's column) follows only once it trails by the
/// granularity, or if `at` is earlier, so most touches change no indexed column and
/// update the row in place (HOT).
fn touch(row: &str, at: &str) -> String {
    let g = super::IDLE_INDEX_GRANULARITY_SECS;
    format!(
        "updated_at = {at}, indexed_at = CASE WHEN {row}.indexed_at <= {at} \
         AND {row}.indexed_at > {at} - interval '{g} seconds' \
         THEN {row}.indexed_at ELSE {at} END"
    )
}

const CHECKPOINT_COLUMNS: &str =
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, data, metadata, created_at";

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
/// `application_name`, `connect_timeout` (seconds) and `host` parameters. `require` uses
/// TLS (rustls) and verifies the server certificate against the webpki roots and the host
/// name; `disable` and `prefer` connect in plain text. The password is never shown:
/// `Debug`, errors and health reports use the URL with the password replaced by `***`.
///
/// Timestamps are `timestamptz` (microseconds, as [`now`] produces);
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

/// Every fixed statement, with the schema name spliced in once. `prepare_cached` keys
/// prepared statements by this text, per connection.
struct Queries {
    schema: String,
    create_session: String,
    batch_create_sessions: String,
    get_session: String,
    batch_get_sessions: String,
    update_session: String,
    end_session: String,
    add_message: String,
    batch_add_messages: String,
    history: String,
    history_range: String,
    restore_sessions: String,
    session_exists: String,
    delete_session: String,
    restore_messages: String,
    restore_checkpoints: String,
    list_threads: String,
    list_namespaces: String,
    list_write_checkpoints: String,
    list_task_contexts: String,
    store_checkpoint: String,
    get_checkpoint: String,
    latest_checkpoint: String,
    list_checkpoints: String,
    list_checkpoints_filtered: String,
    put_writes: String,
    batch_put_writes: String,
    get_writes: String,
    delete_thread: String,
    get_task_context: String,
    store_task_context: String,
    counts: String,
    cleanup: String,
}

impl Queries {
    fn new(schema_name: &str) -> Self {
        let s = schema::quoted(schema_name);
        let upsert_session = format!(
            "ON CONFLICT (session_id) DO UPDATE SET user_id = EXCLUDED.user_id, \
             metadata = EXCLUDED.metadata, {} \
             RETURNING {SESSION_COLUMNS}",
            touch("sessions", "EXCLUDED.updated_at")
        );
        // `seq < $3` continues a filtered listing; `$4` is `before` (none: NULL), and an
        // id the thread and namespace do not hold compares with NULL and yields nothing.
        let list = format!(
            "SELECT seq, {CHECKPOINT_COLUMNS} FROM {s}.checkpoints c \
             WHERE c.thread_id = $1 AND c.checkpoint_ns = $2 AND c.seq < $3 \
             AND ($4::text IS NULL OR c.seq < (SELECT b.seq FROM {s}.checkpoints b \
             WHERE b.thread_id = $1 AND b.checkpoint_ns = $2 AND b.checkpoint_id = $4))"
        );
        Queries {
            schema: s.clone(),
            create_session: format!(
                "INSERT INTO {s}.sessions \
                 (session_id, user_id, created_at, updated_at, indexed_at, status, metadata) \
                 VALUES ($1, $2, $3, $3, $3, 'active', $4) {upsert_session}"
            ),
            batch_create_sessions: format!(
                "INSERT INTO {s}.sessions \
                 (session_id, user_id, created_at, updated_at, indexed_at, status, metadata) \
                 SELECT i.session_id, i.user_id, $3, $3, $3, 'active', i.metadata \
                 FROM unnest($1::text[], $2::text[], $4::jsonb[]) \
                 AS i (session_id, user_id, metadata) {upsert_session}"
            ),
            get_session: format!(
                "SELECT {SESSION_COLUMNS} FROM {s}.sessions WHERE session_id = $1"
            ),
            batch_get_sessions: format!(
                "SELECT {SESSION_COLUMNS} FROM {s}.sessions WHERE session_id = ANY($1::text[])"
            ),
            // Counters saturate (see `SessionUpdate`): bigint and float8 overflow are
            // errors here, so the sum runs only when it fits (CASE evaluates only the taken
            // branch). Validation keeps each add within i64, so `MAX - $n` cannot overflow.
            // The float test neither overflows nor underflows (PG rejects both) and is
            // exact: with x the greater and y the lesser term, x + y rounds to infinity
            // exactly when `(x - f64::MAX) + y >= 2^970` (half an ulp of f64::MAX), which
            // is computed without rounding whenever x is close enough to f64::MAX to matter.
            update_session: format!(
                "UPDATE {s}.sessions SET request_count = CASE \
                 WHEN request_count > 9223372036854775807 - $2 THEN 9223372036854775807 \
                 ELSE request_count + $2 END, \
                 total_processing_time = CASE \
                 WHEN GREATEST(total_processing_time, $3) - '1.7976931348623157e308'::float8 \
                 + LEAST(total_processing_time, $3) >= '9.9792015476736e291'::float8 \
                 THEN '1.7976931348623157e308'::float8 \
                 ELSE total_processing_time + $3 END, \
                 error_count = CASE \
                 WHEN error_count > 9223372036854775807 - $4 THEN 9223372036854775807 \
                 ELSE error_count + $4 END, \
                 status = COALESCE($5::text, status), \
                 metadata = metadata || $6::jsonb, {} \
                 WHERE session_id = $1",
                touch("sessions", "$7")
            ),
            end_session: format!(
                "UPDATE {s}.sessions SET status = $2, {} WHERE session_id = $1",
                touch("sessions", "$3")
            ),
            // One statement: the session's updated_at moves and the message is inserted
            // only if the session exists; the count tells a missing session apart.
            add_message: format!(
                "WITH touched AS (UPDATE {s}.sessions SET {} \
                 WHERE session_id = $1 RETURNING session_id), \
                 inserted AS (INSERT INTO {s}.messages \
                 (session_id, message_id, role, content, timestamp, metadata) \
                 SELECT session_id, $2::text, $3::text, $4::text, $6, $5::jsonb FROM touched \
                 ON CONFLICT (session_id, message_id) DO NOTHING) \
                 SELECT count(*) FROM touched",
                touch("sessions", "$6")
            ),
            // Sessions are locked in id order, so concurrent batches touching the same
            // sessions queue instead of deadlocking; messages are inserted in input order
            // (so their seq follows it), only for sessions that exist.
            batch_add_messages: format!(
                "WITH input AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], \
                 $4::text[], $5::jsonb[]) WITH ORDINALITY \
                 AS i (session_id, message_id, role, content, metadata, ord)), \
                 locked AS MATERIALIZED (SELECT session_id FROM {s}.sessions \
                 WHERE session_id = ANY($1::text[]) ORDER BY session_id FOR NO KEY UPDATE), \
                 touched AS (UPDATE {s}.sessions t SET {} FROM locked l \
                 WHERE t.session_id = l.session_id RETURNING t.session_id), \
                 inserted AS (INSERT INTO {s}.messages \
                 (session_id, message_id, role, content, timestamp, metadata) \
                 SELECT i.session_id, i.message_id, i.role, i.content, $6, i.metadata \
                 FROM input i WHERE i.session_id IN (SELECT session_id FROM touched) \
                 ORDER BY i.ord \
                 ON CONFLICT (session_id, message_id) DO NOTHING) \
                 SELECT session_id FROM touched",
                touch("t", "$6")
            ),
            history: format!(
                "SELECT message_id, role, content, timestamp, metadata FROM \
                 (SELECT seq, message_id, role, content, timestamp, metadata \
                 FROM {s}.messages WHERE session_id = $1 ORDER BY seq DESC LIMIT $2) m \
                 ORDER BY seq"
            ),
            restore_sessions: format!(
                "INSERT INTO {s}.sessions (session_id, user_id, created_at, updated_at, status, \
                 metadata, request_count, total_processing_time, error_count, indexed_at) \
                 SELECT *, r.updated_at FROM unnest($1::text[], $2::text[], \
                 $3::timestamptz[], $4::timestamptz[], $5::text[], $6::jsonb[], $7::bigint[], \
                 $8::float8[], $9::bigint[]) AS r (session_id, user_id, created_at, updated_at, \
                 status, metadata, request_count, total_processing_time, error_count) \
                 ON CONFLICT (session_id) DO UPDATE SET user_id = EXCLUDED.user_id, \
                 created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, \
                 indexed_at = EXCLUDED.updated_at, \
                 status = EXCLUDED.status, metadata = EXCLUDED.metadata, \
                 request_count = EXCLUDED.request_count, \
                 total_processing_time = EXCLUDED.total_processing_time, \
                 error_count = EXCLUDED.error_count"
            ),
            // One statement: the context and the session (messages cascade) go together;
            // the count is the session's.
            delete_session: format!(
                "WITH c AS (DELETE FROM {s}.task_contexts WHERE session_id = $1) \
                 DELETE FROM {s}.sessions WHERE session_id = $1"
            ),
            session_exists: format!("SELECT 1 FROM {s}.sessions WHERE session_id = $1"),
            restore_messages: format!(
                "INSERT INTO {s}.messages (session_id, message_id, role, content, timestamp, \
                 metadata) \
                 SELECT $1::text, m.message_id, m.role, m.content, m.ts, m.metadata \
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[], \
                 $6::jsonb[]) WITH ORDINALITY AS m (message_id, role, content, ts, metadata, n) \
                 ORDER BY m.n \
                 ON CONFLICT (session_id, message_id) DO NOTHING"
            ),
            restore_checkpoints: format!(
                "INSERT INTO {s}.checkpoints (thread_id, checkpoint_ns, checkpoint_id, \
                 parent_checkpoint_id, data, metadata, created_at) \
                 SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.parent, c.data, \
                 c.metadata, c.created_at FROM unnest($1::text[], $2::text[], $3::text[], \
                 $4::text[], $5::jsonb[], $6::jsonb[], $7::timestamptz[]) WITH ORDINALITY \
                 AS c (thread_id, checkpoint_ns, checkpoint_id, parent, data, metadata, \
                 created_at, n) ORDER BY c.n \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET \
                 parent_checkpoint_id = EXCLUDED.parent_checkpoint_id, data = EXCLUDED.data, \
                 metadata = EXCLUDED.metadata, created_at = EXCLUDED.created_at"
            ),
            history_range: format!(
                "SELECT message_id, role, content, timestamp, metadata FROM {s}.messages \
                 WHERE session_id = $1 ORDER BY seq LIMIT $2 OFFSET $3"
            ),
            list_threads: format!(
                "SELECT thread_id FROM (SELECT thread_id FROM {s}.checkpoints \
                 UNION SELECT thread_id FROM {s}.checkpoint_writes) t \
                 WHERE thread_id > $1 ORDER BY thread_id LIMIT $2"
            ),
            list_namespaces: format!(
                "SELECT checkpoint_ns FROM {s}.checkpoints WHERE thread_id = $1 \
                 UNION SELECT checkpoint_ns FROM {s}.checkpoint_writes WHERE thread_id = $1 \
                 ORDER BY 1"
            ),
            list_write_checkpoints: format!(
                "SELECT DISTINCT checkpoint_id FROM {s}.checkpoint_writes \
                 WHERE thread_id = $1 AND checkpoint_ns = $2 ORDER BY 1"
            ),
            list_task_contexts: format!(
                "SELECT session_id FROM {s}.task_contexts WHERE session_id > $1 \
                 ORDER BY session_id LIMIT $2"
            ),
            store_checkpoint: format!(
                "INSERT INTO {s}.checkpoints (thread_id, checkpoint_ns, checkpoint_id, \
                 parent_checkpoint_id, data, metadata, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET \
                 parent_checkpoint_id = EXCLUDED.parent_checkpoint_id, \
                 data = EXCLUDED.data, metadata = EXCLUDED.metadata"
            ),
            get_checkpoint: format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM {s}.checkpoints \
                 WHERE thread_id = $1 AND checkpoint_ns = $2 AND checkpoint_id = $3"
            ),
            latest_checkpoint: format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM {s}.checkpoints \
                 WHERE thread_id = $1 AND checkpoint_ns = $2 ORDER BY seq DESC LIMIT 1"
            ),
            list_checkpoints: format!("{list} ORDER BY c.seq DESC LIMIT $5"),
            // Each filter key's value must equal the stored one as jsonb; the exact
            // (serde_json) comparison is then made on the rows returned.
            list_checkpoints_filtered: format!(
                "{list} AND NOT EXISTS (SELECT 1 FROM jsonb_each($6::jsonb) f \
                 WHERE c.metadata -> f.key IS DISTINCT FROM f.value) \
                 ORDER BY c.seq DESC LIMIT $5"
            ),
            // Rows are inserted in index order, so new writes get seq in that order; a
            // replay updates in place and keeps the first seq.
            put_writes: format!(
                "INSERT INTO {s}.checkpoint_writes \
                 (thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, value) \
                 SELECT $1::text, $2::text, $3::text, $4::text, w.idx, w.channel, w.value \
                 FROM unnest($5::integer[], $6::text[], $7::jsonb[]) AS w (idx, channel, value) \
                 ORDER BY w.idx \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) \
                 DO UPDATE SET channel = EXCLUDED.channel, value = EXCLUDED.value"
            ),
            batch_put_writes: format!(
                "INSERT INTO {s}.checkpoint_writes \
                 (thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, value) \
                 SELECT w.thread_id, w.checkpoint_ns, w.checkpoint_id, w.task_id, w.idx, \
                 w.channel, w.value FROM unnest($1::text[], $2::text[], $3::text[], \
                 $4::text[], $5::integer[], $6::text[], $7::jsonb[]) WITH ORDINALITY \
                 AS w (thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, value, n) \
                 ORDER BY w.n \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) \
                 DO UPDATE SET channel = EXCLUDED.channel, value = EXCLUDED.value"
            ),
            get_writes: format!(
                "SELECT task_id, idx, channel, value FROM {s}.checkpoint_writes \
                 WHERE thread_id = $1 AND checkpoint_ns = $2 AND checkpoint_id = $3 \
                 ORDER BY seq"
            ),
            delete_thread: format!(
                "WITH writes AS (DELETE FROM {s}.checkpoint_writes WHERE thread_id = $1) \
                 DELETE FROM {s}.checkpoints WHERE thread_id = $1"
            ),
            get_task_context: format!(
                "SELECT context FROM {s}.task_contexts WHERE session_id = $1"
            ),
            store_task_context: format!(
                "INSERT INTO {s}.task_contexts (session_id, context, updated_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (session_id) DO UPDATE SET \
                 context = EXCLUDED.context, updated_at = EXCLUDED.updated_at"
            ),
            counts: format!(
                "SELECT (SELECT count(*) FROM {s}.sessions), \
                 (SELECT count(*) FROM {s}.messages), \
                 (SELECT count(*) FROM {s}.checkpoints), \
                 (SELECT count(*) FROM {s}.checkpoint_writes), \
                 (SELECT count(*) FROM {s}.task_contexts)"
            ),
            // One statement, so one transaction: the idle sessions and their task
            // context go together; messages follow through ON DELETE CASCADE.
            // `indexed_at <= updated_at`, so the index range holds every idle session.
            cleanup: format!(
                "WITH expired AS (DELETE FROM {s}.sessions \
                 WHERE indexed_at < $1 AND updated_at < $1 \
                 RETURNING session_id), \
                 contexts AS (DELETE FROM {s}.task_contexts \
                 WHERE session_id IN (SELECT session_id FROM expired)) \
                 SELECT count(*) FROM expired"
            ),
        }
    }

    /// `list_sessions` with only the filters in use, so the cursor and the user filter
    /// are index ranges: `session_id > $n` on the primary key, or `(user_id,
    /// session_id)` when a user is given.
    fn list_sessions(&self, after: bool, user: bool, status: bool) -> String {
        let mut sql = format!(
            "SELECT {SESSION_COLUMNS} FROM {}.sessions WHERE true",
            self.schema
        );
        let mut n = 0;
        for (used, condition) in [
            (after, "session_id >"),
            (user, "user_id ="),
            (status, "status ="),
        ] {
            if used {
                n += 1;
                sql.push_str(&format!(" AND {condition} ${n}"));
            }
        }
        sql.push_str(&format!(" ORDER BY session_id LIMIT ${}", n + 1));
        sql
    }
}

/// A pooled connection with the statements of the backend.
struct Conn<'a> {
    client: Object,
    sql: &'a Queries,
    target: &'a str,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl Conn<'_> {
    fn err(&self, e: tokio_postgres::Error) -> StorageError {
        connect::pg_error(e, self.target)
    }

    async fn query(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>> {
        let stmt = self
            .client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.err(e))?;
        self.client
            .query(&stmt, params)
            .await
            .map_err(|e| self.err(e))
    }

    async fn query_opt(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>> {
        let stmt = self
            .client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.err(e))?;
        self.client
            .query_opt(&stmt, params)
            .await
            .map_err(|e| self.err(e))
    }

    async fn query_one(&self, sql: &str, params: &Params<'_>) -> Result<Row> {
        self.query_opt(sql, params)
            .await?
            .ok_or_else(|| StorageError::Backend {
                message: "postgres statement returned no row".into(),
                transient: false,
                source: None,
            })
    }

    async fn execute(&self, sql: &str, params: &Params<'_>) -> Result<u64> {
        let stmt = self
            .client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.err(e))?;
        self.client
            .execute(&stmt, params)
            .await
            .map_err(|e| self.err(e))
    }
}

/// Reads column `idx`; a value of an unexpected type or JSON that does not decode is a
/// [`StorageError::Serialization`].
fn get<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, idx: usize) -> Result<T> {
    row.try_get(idx).map_err(|e| {
        let column = row.columns().get(idx).map_or("?", |c| c.name()).to_owned();
        StorageError::serialization(format!("stored column `{column}` does not decode"), e)
    })
}

fn json_map(row: &Row, idx: usize) -> Result<Metadata> {
    get::<Json<Metadata>>(row, idx).map(|j| j.0)
}

fn count(value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| StorageError::Serialization {
        message: format!("stored counter {value} is negative"),
        source: None,
    })
}

fn session_from_row(row: &Row) -> Result<Session> {
    Ok(Session {
        session_id: get(row, 0)?,
        user_id: get(row, 1)?,
        created_at: get(row, 2)?,
        updated_at: get(row, 3)?,
        status: get(row, 4)?,
        metadata: json_map(row, 5)?,
        metrics: SessionMetrics {
            request_count: count(get(row, 6)?)?,
            total_processing_time: get(row, 7)?,
            error_count: count(get(row, 8)?)?,
        },
    })
}

/// A checkpoint from the columns of [`CHECKPOINT_COLUMNS`] starting at `at`.
fn message_from_row(row: &Row) -> Result<Message> {
    Ok(Message {
        message_id: get(row, 0)?,
        role: get(row, 1)?,
        content: get(row, 2)?,
        timestamp: get(row, 3)?,
        metadata: json_map(row, 4)?,
    })
}

fn ids_from_rows(rows: &[Row]) -> Result<Vec<String>> {
    rows.iter().map(|r| get(r, 0)).collect()
}

fn checkpoint_from_row(row: &Row, at: usize, metadata: Metadata) -> Result<Checkpoint> {
    Ok(Checkpoint {
        thread_id: get(row, at)?,
        checkpoint_ns: get(row, at + 1)?,
        checkpoint_id: get(row, at + 2)?,
        parent_checkpoint_id: get(row, at + 3)?,
        data: get(row, at + 4)?,
        metadata,
        created_at: get(row, at + 6)?,
    })
}

fn checkpoint_at(row: &Row, at: usize) -> Result<Checkpoint> {
    checkpoint_from_row(row, at, json_map(row, at + 5)?)
}

impl PostgresBackend {
    /// A backend for the database at `url` (see the type's docs for the URL form), in
    /// schema `aiecs`, with 10 + 20 connections. Nothing is opened until `initialize()`
    /// or the first call. A URL that does not parse is
    /// [`StorageError::InvalidInput`] for `url`, with the password never shown.
    pub fn new(url: &str) -> Result<Self> {
        let options = connect::parse_url(url)?;
        let schema = options.schema.clone();
        let backend = PostgresBackend {
            options,
            schema: DEFAULT_SCHEMA.to_owned(),
            pool_size: DEFAULT_POOL_SIZE,
            max_overflow: DEFAULT_MAX_OVERFLOW,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            state: OnceCell::new(),
            closed: AtomicBool::new(false),
        };
        match schema {
            Some(schema) => backend.with_schema(schema),
            None => Ok(backend),
        }
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
            match schema::migrate(&tx, &self.schema).await {
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
            sql: Queries::new(&self.schema),
            schema_version: migrated.to,
        })
    }
}

#[async_trait]
impl SessionStorage for PostgresBackend {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        validate::create_session(session_id, user_id, metadata)?;
        let c = self.conn().await?;
        let row = c
            .query_one(
                &c.sql.create_session,
                &[&session_id, &user_id, &now(), &Json(metadata)],
            )
            .await?;
        session_from_row(&row)
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        validate::id("session_id", session_id)?;
        let c = self.conn().await?;
        c.query_opt(&c.sql.get_session, &[&session_id])
            .await?
            .as_ref()
            .map(session_from_row)
            .transpose()
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        validate::session_update(session_id, update)?;
        let c = self.conn().await?;
        // Validation keeps both counters within i64.
        let (requests, errors) = (update.add_requests as i64, update.add_errors as i64);
        let changed = c
            .execute(
                &c.sql.update_session,
                &[
                    &session_id,
                    &requests,
                    &update.add_processing_time,
                    &errors,
                    &update.status,
                    &Json(&update.metadata),
                    &now(),
                ],
            )
            .await?;
        Ok(changed > 0)
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        validate::status(status)?;
        let c = self.conn().await?;
        let changed = c
            .execute(&c.sql.end_session, &[&session_id, &status, &now()])
            .await?;
        Ok(changed > 0)
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        validate::new_sessions(sessions)?;
        if sessions.is_empty() {
            self.state().await?;
            return Ok(Vec::new());
        }
        // One row per id (its last occurrence): one INSERT cannot upsert a row twice.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(sessions.len());
        for (i, s) in sessions.iter().enumerate() {
            last.insert(&s.session_id, i);
        }
        let rows: Vec<&NewSession> = sessions
            .iter()
            .enumerate()
            .filter(|(i, s)| last[s.session_id.as_str()] == *i)
            .map(|(_, s)| s)
            .collect();
        let ids: Vec<&str> = rows.iter().map(|s| s.session_id.as_str()).collect();
        let users: Vec<&str> = rows.iter().map(|s| s.user_id.as_str()).collect();
        let metadata: Vec<Json<&Metadata>> = rows.iter().map(|s| Json(&s.metadata)).collect();
        let c = self.conn().await?;
        let stored = c
            .query(
                &c.sql.batch_create_sessions,
                &[&ids, &users, &now(), &metadata],
            )
            .await?;
        let mut by_id = HashMap::with_capacity(stored.len());
        for row in &stored {
            let s = session_from_row(row)?;
            by_id.insert(s.session_id.clone(), s);
        }
        // An id given twice: each item returns the session as its own upsert left it,
        // as if the items had been stored one after another (same timestamp).
        sessions
            .iter()
            .map(|item| {
                let mut s =
                    by_id
                        .get(&item.session_id)
                        .cloned()
                        .ok_or_else(|| StorageError::Backend {
                            message: "postgres batch upsert returned too few rows".into(),
                            transient: false,
                            source: None,
                        })?;
                s.user_id.clone_from(&item.user_id);
                s.metadata.clone_from(&item.metadata);
                Ok(s)
            })
            .collect()
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        validate::session_ids(session_ids)?;
        if session_ids.is_empty() {
            self.state().await?;
            return Ok(Vec::new());
        }
        let c = self.conn().await?;
        let rows = c.query(&c.sql.batch_get_sessions, &[&session_ids]).await?;
        let mut by_id = HashMap::with_capacity(rows.len());
        for row in &rows {
            let s = session_from_row(row)?;
            by_id.insert(s.session_id.clone(), s);
        }
        Ok(session_ids
            .iter()
            .map(|id| by_id.get(id).cloned())
            .collect())
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        let c = self.conn().await?;
        let removed = c.execute(&c.sql.delete_session, &[&session_id]).await?;
        Ok(removed > 0)
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        validate::restored_sessions(sessions)?;
        // One INSERT cannot upsert a row twice: keep the last copy of a repeated id.
        let mut last: std::collections::HashMap<&str, usize> = Default::default();
        for (i, s) in sessions.iter().enumerate() {
            last.insert(&s.session_id, i);
        }
        let rows: Vec<&Session> = sessions
            .iter()
            .enumerate()
            .filter(|(i, s)| last[s.session_id.as_str()] == *i)
            .map(|(_, s)| s)
            .collect();
        let c = self.conn().await?;
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = rows.iter().map(|s| s.session_id.as_str()).collect();
        let users: Vec<&str> = rows.iter().map(|s| s.user_id.as_str()).collect();
        let created: Vec<_> = rows.iter().map(|s| s.created_at).collect();
        let updated: Vec<_> = rows.iter().map(|s| s.updated_at).collect();
        let statuses: Vec<&str> = rows.iter().map(|s| s.status.as_str()).collect();
        let metadata: Vec<Value> = rows
            .iter()
            .map(|s| Value::Object(s.metadata.clone()))
            .collect();
        let requests: Vec<i64> = rows
            .iter()
            .map(|s| s.metrics.request_count as i64)
            .collect();
        let times: Vec<f64> = rows
            .iter()
            .map(|s| s.metrics.total_processing_time)
            .collect();
        let errors: Vec<i64> = rows.iter().map(|s| s.metrics.error_count as i64).collect();
        c.execute(
            &c.sql.restore_sessions,
            &[
                &ids, &users, &created, &updated, &statuses, &metadata, &requests, &times, &errors,
            ],
        )
        .await?;
        Ok(())
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        validate::session_query(query)?;
        let c = self.conn().await?;
        let sql = c.sql.list_sessions(
            query.after.is_some(),
            query.user_id.is_some(),
            query.status.is_some(),
        );
        let limit = query.limit as i64 + 1;
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(4);
        for value in [&query.after, &query.user_id, &query.status]
            .into_iter()
            .flatten()
        {
            params.push(value);
        }
        params.push(&limit);
        let rows = c.query(&sql, &params).await?;
        let mut sessions = rows
            .iter()
            .map(session_from_row)
            .collect::<Result<Vec<_>>>()?;
        let more = sessions.len() > query.limit;
        sessions.truncate(query.limit);
        let next_cursor = more
            .then(|| sessions.last().map(|s| s.session_id.clone()))
            .flatten();
        Ok(SessionPage {
            sessions,
            next_cursor,
        })
    }
}

#[async_trait]
impl ConversationStorage for PostgresBackend {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        validate::new_message(session_id, message)?;
        let message_id = message.id_or_generate();
        let c = self.conn().await?;
        let row = c
            .query_one(
                &c.sql.add_message,
                &[
                    &session_id,
                    &message_id,
                    &message.role,
                    &message.content,
                    &Json(&message.metadata),
                    &now(),
                ],
            )
            .await?;
        if get::<i64>(&row, 0)? == 0 {
            return Err(StorageError::not_found("session", session_id));
        }
        Ok(message_id)
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        validate::batch("messages", messages.len())?;
        // Bad items are answered here and left out; the rest go in one statement.
        let mut out: Vec<Result<String>> = Vec::with_capacity(messages.len());
        let mut valid = Vec::with_capacity(messages.len());
        for (i, (session_id, message)) in messages.iter().enumerate() {
            match validate::new_message(session_id, message) {
                Ok(()) => {
                    let id = message.id_or_generate();
                    out.push(Ok(id));
                    valid.push(i);
                }
                Err(e) => out.push(Err(e)),
            }
        }
        if valid.is_empty() {
            self.state().await?;
            return Ok(out);
        }
        let ids: Vec<&str> = valid.iter().map(|&i| messages[i].0.as_str()).collect();
        let message_ids: Vec<&str> = valid
            .iter()
            .map(|&i| out[i].as_deref().unwrap_or_default())
            .collect();
        let roles: Vec<&str> = valid.iter().map(|&i| messages[i].1.role.as_str()).collect();
        let contents: Vec<&str> = valid
            .iter()
            .map(|&i| messages[i].1.content.as_str())
            .collect();
        let metadata: Vec<Json<&Metadata>> = valid
            .iter()
            .map(|&i| Json(&messages[i].1.metadata))
            .collect();
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.batch_add_messages,
                &[&ids, &message_ids, &roles, &contents, &metadata, &now()],
            )
            .await?;
        let found = rows
            .iter()
            .map(|r| get::<String>(r, 0))
            .collect::<Result<std::collections::HashSet<_>>>()?;
        for &i in &valid {
            let session_id = &messages[i].0;
            if !found.contains(session_id) {
                out[i] = Err(StorageError::not_found("session", session_id.clone()));
            }
        }
        Ok(out)
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let c = self.conn().await?;
        let rows = c
            .query(&c.sql.history, &[&session_id, &(limit as i64)])
            .await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        validate::restored_messages(session_id, messages)?;
        let c = self.conn().await?;
        if c.query_opt(&c.sql.session_exists, &[&session_id])
            .await?
            .is_none()
        {
            return Err(StorageError::not_found("session", session_id));
        }
        if messages.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        let times: Vec<_> = messages.iter().map(|m| m.timestamp).collect();
        let metadata: Vec<Value> = messages
            .iter()
            .map(|m| Value::Object(m.metadata.clone()))
            .collect();
        c.execute(
            &c.sql.restore_messages,
            &[&session_id, &ids, &roles, &contents, &times, &metadata],
        )
        .await
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.history_range,
                &[&session_id, &(limit as i64), &offset],
            )
            .await?;
        rows.iter().map(message_from_row).collect()
    }
}

#[async_trait]
impl CheckpointStorage for PostgresBackend {
    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.list_threads,
                &[&after.unwrap_or_default(), &(limit as i64 + 1)],
            )
            .await?;
        Ok(IdPage::from_sorted(ids_from_rows(&rows)?, limit))
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        validate::restored_checkpoints(checkpoints)?;
        // A repeated key keeps its first position and its last values, as a sequence of
        // single restores would (one INSERT cannot upsert a row twice).
        let mut rows: Vec<&Checkpoint> = Vec::with_capacity(checkpoints.len());
        let mut at: std::collections::HashMap<(&str, &str, &str), usize> = Default::default();
        for cp in checkpoints {
            let key = (
                cp.thread_id.as_str(),
                cp.checkpoint_ns.as_str(),
                cp.checkpoint_id.as_str(),
            );
            match at.get(&key) {
                Some(&i) => rows[i] = cp,
                None => {
                    at.insert(key, rows.len());
                    rows.push(cp);
                }
            }
        }
        let c = self.conn().await?;
        if rows.is_empty() {
            return Ok(());
        }
        let threads: Vec<&str> = rows.iter().map(|c| c.thread_id.as_str()).collect();
        let namespaces: Vec<&str> = rows.iter().map(|c| c.checkpoint_ns.as_str()).collect();
        let ids: Vec<&str> = rows.iter().map(|c| c.checkpoint_id.as_str()).collect();
        let parents: Vec<Option<&str>> = rows
            .iter()
            .map(|c| c.parent_checkpoint_id.as_deref())
            .collect();
        let data: Vec<&Value> = rows.iter().map(|c| &c.data).collect();
        let metadata: Vec<Value> = rows
            .iter()
            .map(|c| Value::Object(c.metadata.clone()))
            .collect();
        let created: Vec<_> = rows.iter().map(|c| c.created_at).collect();
        c.execute(
            &c.sql.restore_checkpoints,
            &[
                &threads,
                &namespaces,
                &ids,
                &parents,
                &data,
                &metadata,
                &created,
            ],
        )
        .await?;
        Ok(())
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        validate::id("thread_id", thread_id)?;
        let c = self.conn().await?;
        let rows = c.query(&c.sql.list_namespaces, &[&thread_id]).await?;
        ids_from_rows(&rows)
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        validate::thread(thread_id, checkpoint_ns)?;
        let c = self.conn().await?;
        let rows = c
            .query(&c.sql.list_write_checkpoints, &[&thread_id, &checkpoint_ns])
            .await?;
        ids_from_rows(&rows)
    }

    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        validate::new_checkpoint(checkpoint)?;
        let c = self.conn().await?;
        c.execute(
            &c.sql.store_checkpoint,
            &[
                &checkpoint.thread_id,
                &checkpoint.checkpoint_ns,
                &checkpoint.checkpoint_id,
                &checkpoint.parent_checkpoint_id,
                &checkpoint.data,
                &Json(&checkpoint.metadata),
                &now(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, checkpoint_id)?;
        let c = self.conn().await?;
        let row = match checkpoint_id {
            Some(id) => {
                c.query_opt(&c.sql.get_checkpoint, &[&thread_id, &checkpoint_ns, &id])
                    .await?
            }
            None => {
                c.query_opt(&c.sql.latest_checkpoint, &[&thread_id, &checkpoint_ns])
                    .await?
            }
        };
        row.map(|r| checkpoint_at(&r, 0)).transpose()
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        validate::checkpoint_filter(thread_id, checkpoint_ns, filter)?;
        let c = self.conn().await?;
        let limit = filter.limit as i64;
        if filter.metadata.is_empty() {
            let rows = c
                .query(
                    &c.sql.list_checkpoints,
                    &[
                        &thread_id,
                        &checkpoint_ns,
                        &i64::MAX,
                        &filter.before,
                        &limit,
                    ],
                )
                .await?;
            return rows.iter().map(|r| checkpoint_at(r, 1)).collect();
        }
        // jsonb equality is a superset of serde_json's (it equates 4 and 4.0), so rows are
        // checked again here; in the rare case that drops some, the next page continues
        // below the last seq seen until `limit` match or the thread is exhausted.
        let wanted = Json(&filter.metadata);
        let mut out = Vec::new();
        let mut below = i64::MAX;
        loop {
            let rows = c
                .query(
                    &c.sql.list_checkpoints_filtered,
                    &[
                        &thread_id,
                        &checkpoint_ns,
                        &below,
                        &filter.before,
                        &limit,
                        &wanted,
                    ],
                )
                .await?;
            for row in &rows {
                below = get(row, 0)?;
                let metadata = json_map(row, 6)?;
                if filter.matches(&metadata) && out.len() < filter.limit {
                    out.push(checkpoint_from_row(row, 1, metadata)?);
                }
            }
            if out.len() >= filter.limit || (rows.len() as i64) < limit {
                return Ok(out);
            }
        }
    }

    async fn put_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<()> {
        validate::writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)?;
        if writes.is_empty() {
            self.state().await?;
            return Ok(());
        }
        // Validation caps a call at 10 000 writes, so every index fits.
        let idx: Vec<i32> = (0..writes.len() as i32).collect();
        let channels: Vec<&str> = writes.iter().map(|w| w.channel.as_str()).collect();
        let values: Vec<&Value> = writes.iter().map(|w| &w.value).collect();
        let c = self.conn().await?;
        c.execute(
            &c.sql.put_writes,
            &[
                &thread_id,
                &checkpoint_ns,
                &checkpoint_id,
                &task_id,
                &idx,
                &channels,
                &values,
            ],
        )
        .await?;
        Ok(())
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        validate::batch("items", items.len())?;
        // One statement for every valid item. A write repeated in the batch keeps the
        // position of its first occurrence and the value of its last, as a sequence of
        // put_writes calls would (one INSERT cannot upsert the same row twice).
        let mut out = Vec::with_capacity(items.len());
        let mut rows: Vec<(&str, &str, &str, &str, i32, &str, &Value)> = Vec::new();
        let mut seen: std::collections::HashMap<(&str, &str, &str, &str, i32), usize> =
            std::collections::HashMap::new();
        for w in items {
            let checked = validate::writes(
                &w.thread_id,
                &w.checkpoint_ns,
                &w.checkpoint_id,
                &w.task_id,
                &w.writes,
            );
            if checked.is_ok() {
                for (idx, write) in (0i32..).zip(&w.writes) {
                    let key = (
                        w.thread_id.as_str(),
                        w.checkpoint_ns.as_str(),
                        w.checkpoint_id.as_str(),
                        w.task_id.as_str(),
                        idx,
                    );
                    let row = (
                        key.0,
                        key.1,
                        key.2,
                        key.3,
                        idx,
                        write.channel.as_str(),
                        &write.value,
                    );
                    match seen.get(&key) {
                        Some(&at) => rows[at] = row,
                        None => {
                            seen.insert(key, rows.len());
                            rows.push(row);
                        }
                    }
                }
            }
            out.push(checked);
        }
        let c = self.conn().await?;
        if rows.is_empty() {
            return Ok(out);
        }
        let threads: Vec<&str> = rows.iter().map(|r| r.0).collect();
        let namespaces: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let checkpoints: Vec<&str> = rows.iter().map(|r| r.2).collect();
        let tasks: Vec<&str> = rows.iter().map(|r| r.3).collect();
        let idx: Vec<i32> = rows.iter().map(|r| r.4).collect();
        let channels: Vec<&str> = rows.iter().map(|r| r.5).collect();
        let values: Vec<&Value> = rows.iter().map(|r| r.6).collect();
        c.execute(
            &c.sql.batch_put_writes,
            &[
                &threads,
                &namespaces,
                &checkpoints,
                &tasks,
                &idx,
                &channels,
                &values,
            ],
        )
        .await?;
        Ok(out)
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, Some(checkpoint_id))?;
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.get_writes,
                &[&thread_id, &checkpoint_ns, &checkpoint_id],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let idx: i32 = get(row, 1)?;
                Ok(PendingWrite {
                    task_id: get(row, 0)?,
                    idx: u32::try_from(idx).map_err(|_| StorageError::Serialization {
                        message: format!("stored write index {idx} is negative"),
                        source: None,
                    })?,
                    channel: get(row, 2)?,
                    value: get(row, 3)?,
                })
            })
            .collect()
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        validate::id("thread_id", thread_id)?;
        let c = self.conn().await?;
        c.execute(&c.sql.delete_thread, &[&thread_id]).await?;
        Ok(())
    }
}

#[async_trait]
impl TaskContextStorage for PostgresBackend {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.list_task_contexts,
                &[&after.unwrap_or_default(), &(limit as i64 + 1)],
            )
            .await?;
        Ok(IdPage::from_sorted(ids_from_rows(&rows)?, limit))
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        validate::id("session_id", session_id)?;
        let c = self.conn().await?;
        c.query_opt(&c.sql.get_task_context, &[&session_id])
            .await?
            .map(|row| get(&row, 0))
            .transpose()
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        validate::task_context(session_id, context)?;
        let c = self.conn().await?;
        c.execute(&c.sql.store_task_context, &[&session_id, context, &now()])
            .await?;
        Ok(())
    }
}

#[async_trait]
impl StorageBackend for PostgresBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn store_id(&self) -> Option<String> {
        let config = &self.options.config;
        // As the driver connects: the first host and port, a Unix socket's directory.
        let host = match config.get_hosts().first()? {
            tokio_postgres::config::Host::Tcp(h) => h.to_ascii_lowercase(),
            tokio_postgres::config::Host::Unix(dir) => dir.display().to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        Some(format!(
            "postgres:{host}:{port}/{}/{}",
            self.options.dbname, self.schema
        ))
    }

    async fn initialize(&self) -> Result<()> {
        self.state().await.map(|_| ())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some(state) = self.state.get() {
            // Idle connections close now; busy ones when their call finishes.
            state.pool.close();
        }
        Ok(())
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let c = self.conn().await?;
        let row = c
            .query_one("SELECT current_setting('server_version')", &[])
            .await?;
        let server_version: String = get(&row, 0)?;
        let latency = started.elapsed();
        let state = self.state().await?;
        let pool = state.pool.status();
        let mut details = Metadata::new();
        details.insert("url".into(), json!(self.options.redacted));
        details.insert("host".into(), json!(self.options.host));
        details.insert("database".into(), json!(self.options.dbname));
        details.insert("schema".into(), json!(self.schema));
        details.insert("schema_version".into(), json!(state.schema_version));
        details.insert("server_version".into(), json!(server_version));
        details.insert("sslmode".into(), json!(self.options.ssl_mode.as_str()));
        details.insert("pool_max_size".into(), json!(pool.max_size));
        details.insert("pool_size".into(), json!(pool.size));
        details.insert("pool_available".into(), json!(pool.available));
        details.insert("pool_waiting".into(), json!(pool.waiting));
        Ok(HealthReport::healthy(self.kind(), latency, details))
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        let c = self.conn().await?;
        let row = c.query_one(&c.sql.counts, &[]).await?;
        let mut values = Metadata::new();
        for (i, name) in [
            "sessions",
            "messages",
            "checkpoints",
            "pending_writes",
            "task_contexts",
        ]
        .into_iter()
        .enumerate()
        {
            values.insert(name.into(), json!(get::<i64>(&row, i)?));
        }
        Ok(MetricsReport {
            component: self.kind().to_owned(),
            values,
            components: Vec::new(),
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        let cutoff = validate::idle_cutoff(max_idle)?;
        let c = self.conn().await?;
        let row = c.query_one(&c.sql.cleanup, &[&cutoff]).await?;
        count(get(&row, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn list_sessions_uses_only_the_filters_given() {
        let q = Queries::new("aiecs");
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
