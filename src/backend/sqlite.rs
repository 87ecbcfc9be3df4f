//! The embedded default backend: SQLite in WAL mode, one writer and a few readers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde_json::{json, Value};
use tokio::sync::OnceCell;
use tokio_rusqlite::Connection;

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

/// Schema migrations, applied in order inside one transaction; `PRAGMA user_version`
/// records how many ran, so a file written by an older version is brought forward on
/// `initialize()` and a file from a newer version is refused rather than misread.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sessions (
    session_id            TEXT PRIMARY KEY,
    user_id               TEXT NOT NULL,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL,
    status                TEXT NOT NULL,
    metadata              TEXT NOT NULL,
    request_count         INTEGER NOT NULL DEFAULT 0,
    total_processing_time REAL NOT NULL DEFAULT 0,
    error_count           INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sessions_by_updated_at ON sessions (updated_at);
CREATE INDEX sessions_by_user ON sessions (user_id, session_id);

-- seq is the rowid: always above every existing row, so it orders messages by arrival.
CREATE TABLE messages (
    seq        INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    message_id TEXT NOT NULL,
    role       TEXT NOT NULL,
    content    TEXT NOT NULL,
    timestamp  INTEGER NOT NULL,
    metadata   TEXT NOT NULL,
    UNIQUE (session_id, message_id)
);
CREATE INDEX messages_by_session ON messages (session_id, seq);

CREATE TABLE checkpoints (
    seq                  INTEGER PRIMARY KEY,
    thread_id            TEXT NOT NULL,
    checkpoint_ns        TEXT NOT NULL,
    checkpoint_id        TEXT NOT NULL,
    parent_checkpoint_id TEXT,
    data                 TEXT NOT NULL,
    metadata             TEXT NOT NULL,
    created_at           INTEGER NOT NULL,
    UNIQUE (thread_id, checkpoint_ns, checkpoint_id)
);
CREATE INDEX checkpoints_by_thread ON checkpoints (thread_id, checkpoint_ns, seq);

CREATE TABLE checkpoint_writes (
    seq           INTEGER PRIMARY KEY,
    thread_id     TEXT NOT NULL,
    checkpoint_ns TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    channel       TEXT NOT NULL,
    value         TEXT NOT NULL,
    UNIQUE (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
);

CREATE TABLE task_contexts (
    session_id TEXT PRIMARY KEY,
    context    TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
"#,
    r#"
-- Touching a session (an append, an update) no longer rewrites an index entry: cleanup
-- scans indexed_at, which trails updated_at by under a minute and never leads it (see
-- touch_index).
ALTER TABLE sessions ADD COLUMN indexed_at INTEGER NOT NULL DEFAULT 0;
UPDATE sessions SET indexed_at = updated_at;
DROP INDEX sessions_by_updated_at;
CREATE INDEX sessions_by_indexed_at ON sessions (indexed_at);
"#,
];

const SESSION_COLUMNS: &str = "session_id, user_id, created_at, updated_at, status, metadata, \
     request_count, total_processing_time, error_count";
const CHECKPOINT_COLUMNS: &str =
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, data, metadata, created_at";

/// Stores everything in one SQLite file (or in memory), created and migrated on
/// `initialize()` (or on first use).
///
/// The file is opened in WAL mode with `synchronous=NORMAL`: one writer connection
/// serializes writes (counters are added in SQL, multi-statement steps run in one
/// `BEGIN IMMEDIATE` transaction) while reader connections serve reads concurrently. An
/// acknowledged write survives the process being killed; a power loss may drop the last
/// few. `:memory:` uses a single connection.
///
/// The WAL is checkpointed (copied into the database file) every 100 ms by a connection
/// of its own, not by the writer after a commit as SQLite does by default: a writer
/// that checkpoints stops writing while it copies and syncs, which made every few
/// hundredth append wait ~10 ms. The writer still checkpoints itself if the WAL
/// reaches 64 MiB, should the background task fall behind.
///
/// Each connection runs on its own thread (tokio-rusqlite), so calls never block the
/// async runtime.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::{prelude::*, SqliteBackend};
/// let dir = tempfile::tempdir().unwrap();
/// let storage = SqliteBackend::new(dir.path().join("agent.db")).with_readers(2);
/// storage.initialize().await?;
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// storage.close().await?;
///
/// // The data survives reopening the file.
/// let reopened = SqliteBackend::new(dir.path().join("agent.db"));
/// assert!(reopened.get_session("s1").await?.is_some());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SqliteBackend {
    path: Option<PathBuf>,
    /// Names an in-memory database in [`StorageBackend::store_id`].
    instance: uuid::Uuid,
    readers: usize,
    busy_timeout: Duration,
    state: OnceCell<Connections>,
    closed: AtomicBool,
}

#[derive(Debug)]
struct Connections {
    writer: Connection,
    readers: Vec<Connection>,
    next_reader: AtomicUsize,
    checkpointer: Option<Checkpointer>,
}

/// How often the background task checkpoints the WAL. A checkpoint of a WAL with
/// nothing new reads a header and returns.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// The writer's own checkpoint threshold, in pages (64 MiB of 4 KiB pages): a safety
/// net for a background task that falls behind.
const WRITER_CHECKPOINT_PAGES: u32 = 16_384;

/// The background WAL checkpointer: its connection and its task.
#[derive(Debug)]
struct Checkpointer {
    conn: Connection,
    task: tokio::task::AbortHandle,
}

impl Checkpointer {
    /// Starts checkpointing the WAL through `conn` every [`CHECKPOINT_INTERVAL`]. The
    /// task ends when the connection closes or the handle aborts it.
    fn start(conn: Connection) -> Self {
        let on_task = conn.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // PASSIVE copies what it can without waiting for readers or the writer;
                // what it could not copy waits for the next tick.
                let done = on_task
                    .call(|c| {
                        c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
                        Ok::<_, rusqlite::Error>(())
                    })
                    .await;
                if let Err(tokio_rusqlite::Error::ConnectionClosed) = done {
                    break;
                }
            }
        });
        Checkpointer {
            conn,
            task: task.abort_handle(),
        }
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        // Dropped without close(): the task must not keep its connection alive.
        if let Some(c) = &self.checkpointer {
            c.task.abort();
        }
    }
}

impl Connections {
    fn reader(&self) -> &Connection {
        if self.readers.is_empty() {
            return &self.writer;
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        &self.readers[i]
    }
}

/// An error inside a connection's thread: SQLite's own, or one of ours. `?` works on
/// both, and the boundary turns either into a [`StorageError`].
enum Failure {
    Sql(rusqlite::Error),
    Storage(StorageError),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure::Sql(e)
    }
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        Failure::Storage(e)
    }
}

impl From<serde_json::Error> for Failure {
    fn from(e: serde_json::Error) -> Self {
        Failure::Storage(e.into())
    }
}

fn sql_error(e: rusqlite::Error) -> StorageError {
    use rusqlite::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            StorageError::backend("sqlite database is busy", true, e)
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::CannotOpen => {
            StorageError::Connection {
                message: "could not open the sqlite database file".into(),
                source: Some(Box::new(e)),
            }
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => {
            StorageError::serialization("stored sqlite record has an unexpected type", e)
        }
        _ => StorageError::backend("sqlite error", false, e),
    }
}

impl From<Failure> for StorageError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Sql(e) => sql_error(e),
            Failure::Storage(e) => e,
        }
    }
}

type Sql<T> = std::result::Result<T, Failure>;

fn timestamp(micros: i64) -> Sql<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| {
        Failure::Storage(StorageError::Serialization {
            message: format!("stored timestamp {micros} is out of range"),
            source: None,
        })
    })
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Sql<T> {
    serde_json::from_str(text).map_err(|e| {
        Failure::Storage(StorageError::serialization(
            format!("stored {what} is not valid JSON"),
            e,
        ))
    })
}

fn count(value: i64) -> Sql<u64> {
    u64::try_from(value).map_err(|_| {
        Failure::Storage(StorageError::Serialization {
            message: format!("stored counter {value} is negative"),
            source: None,
        })
    })
}

fn session_from_row(row: &Row<'_>) -> Sql<Session> {
    Ok(Session {
        session_id: row.get(0)?,
        user_id: row.get(1)?,
        created_at: timestamp(row.get(2)?)?,
        updated_at: timestamp(row.get(3)?)?,
        status: row.get(4)?,
        metadata: decode("session metadata", &row.get::<_, String>(5)?)?,
        metrics: SessionMetrics {
            request_count: count(row.get(6)?)?,
            total_processing_time: row.get(7)?,
            error_count: count(row.get(8)?)?,
        },
    })
}

fn checkpoint_from_row(row: &Row<'_>, metadata: Metadata) -> Sql<Checkpoint> {
    Ok(Checkpoint {
        thread_id: row.get(0)?,
        checkpoint_ns: row.get(1)?,
        checkpoint_id: row.get(2)?,
        parent_checkpoint_id: row.get(3)?,
        data: decode("checkpoint data", &row.get::<_, String>(4)?)?,
        metadata,
        created_at: timestamp(row.get(6)?)?,
    })
}

fn checkpoint_metadata(row: &Row<'_>) -> Sql<Metadata> {
    decode("checkpoint metadata", &row.get::<_, String>(5)?)
}

fn upsert_session(
    conn: &rusqlite::Connection,
    session_id: &str,
    user_id: &str,
    metadata: &str,
    at: i64,
) -> Sql<Session> {
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO sessions (session_id, user_id, created_at, updated_at, indexed_at, \
         status, metadata) VALUES (?1, ?2, ?3, ?3, ?3, 'active', ?4) \
         ON CONFLICT (session_id) DO UPDATE SET user_id = excluded.user_id, \
         metadata = excluded.metadata, updated_at = excluded.updated_at \
         RETURNING {SESSION_COLUMNS}"
    ))?;
    let mut rows = stmt.query(params![session_id, user_id, at, metadata])?;
    let session = match rows.next()? {
        Some(row) => session_from_row(row)?,
        None => {
            return Err(Failure::Storage(StorageError::Backend {
                message: "sqlite upsert returned no row".into(),
                transient: false,
                source: None,
            }))
        }
    };
    drop(rows);
    drop(stmt);
    // A new row already has indexed_at = at; an upserted one may need it moved.
    if session.created_at.timestamp_micros() != at {
        touch_index(conn, session_id, at)?;
    }
    Ok(session)
}

/// Moves the session's `indexed_at` (the cleanup index's column) to `at` when it
/// trails by the granularity or leads; most touches match no row here and write
/// nothing. A separate statement because SQLite rewrites the index entry of any column
/// an UPDATE sets, even to its own value. Run after every change of `updated_at`.
fn touch_index(conn: &rusqlite::Connection, session_id: &str, at: i64) -> Sql<()> {
    conn.prepare_cached(
        "UPDATE sessions SET indexed_at = ?2 WHERE session_id = ?1 \
         AND (indexed_at > ?2 OR indexed_at <= ?2 - ?3)",
    )?
    .execute(params![
        session_id,
        at,
        super::IDLE_INDEX_GRANULARITY_SECS * 1_000_000
    ])?;
    Ok(())
}

/// Appends one message inside the caller's transaction; `NotFound` leaves nothing
/// written.
fn append_message(
    conn: &rusqlite::Connection,
    session_id: &str,
    message: &NewMessage,
    at: i64,
) -> Sql<String> {
    let touched = conn
        .prepare_cached("UPDATE sessions SET updated_at = ?2 WHERE session_id = ?1")?
        .execute(params![session_id, at])?;
    if touched == 0 {
        return Err(StorageError::not_found("session", session_id).into());
    }
    touch_index(conn, session_id, at)?;
    let message_id = message.id_or_generate();
    conn.prepare_cached(
        "INSERT INTO messages (session_id, message_id, role, content, timestamp, metadata) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (session_id, message_id) DO NOTHING",
    )?
    .execute(params![
        session_id,
        message_id,
        message.role,
        message.content,
        at,
        serde_json::to_string(&message.metadata)?
    ])?;
    Ok(message_id)
}

/// One task's pending writes, encoded for the connection thread.
struct EncodedWrites {
    key: [String; 4],
    writes: Vec<(String, String)>,
}

impl EncodedWrites {
    fn new(
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<Self> {
        Ok(EncodedWrites {
            key: [thread_id, checkpoint_ns, checkpoint_id, task_id].map(str::to_owned),
            writes: writes
                .iter()
                .map(|w| Ok((w.channel.clone(), serde_json::to_string(&w.value)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Upserts the writes inside the caller's transaction; a write keeps its first `seq`.
    fn insert(&self, conn: &rusqlite::Connection) -> Sql<()> {
        let mut stmt = conn.prepare_cached(
            "INSERT INTO checkpoint_writes (thread_id, checkpoint_ns, checkpoint_id, \
             task_id, idx, channel, value) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) \
             DO UPDATE SET channel = excluded.channel, value = excluded.value",
        )?;
        let k = &self.key;
        for (idx, (channel, value)) in self.writes.iter().enumerate() {
            stmt.execute(params![k[0], k[1], k[2], k[3], idx as i64, channel, value])?;
        }
        Ok(())
    }
}

/// Runs a message query whose columns are message_id, role, content, timestamp, metadata.
fn messages(
    conn: &rusqlite::Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Sql<Vec<Message>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(args)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(Message {
            message_id: row.get(0)?,
            role: row.get(1)?,
            content: row.get(2)?,
            timestamp: timestamp(row.get(3)?)?,
            metadata: decode("message metadata", &row.get::<_, String>(4)?)?,
        });
    }
    Ok(out)
}

/// Runs a query whose one column is an id, for listings.
fn ids(conn: &rusqlite::Connection, sql: &str, args: impl rusqlite::Params) -> Sql<Vec<String>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(args, |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<std::result::Result<_, _>>()?)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

impl SqliteBackend {
    /// A backend on the file at `path` (created if missing). `":memory:"` gives a private
    /// in-memory database. Nothing is opened until `initialize()` or the first call.
    pub fn new(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        SqliteBackend {
            path: (path != Path::new(":memory:")).then(|| path.to_owned()),
            instance: uuid::Uuid::now_v7(),
            readers: 4,
            busy_timeout: Duration::from_secs(5),
            state: OnceCell::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// A private in-memory database, gone when the backend closes.
    pub fn in_memory() -> Self {
        Self::new(":memory:")
    }

    /// Sets how many reader connections serve reads concurrently with the writer
    /// (default 4; 0 sends reads to the writer). Ignored in memory.
    pub fn with_readers(mut self, readers: usize) -> Self {
        self.readers = readers;
        self
    }

    /// Sets how long a connection waits for a lock held by another process before it
    /// reports a transient busy error (default 5 s).
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The database file, or `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    async fn connections(&self) -> Result<&Connections> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        self.state.get_or_try_init(|| self.open()).await
    }

    async fn open_one(&self, pragmas: String) -> Result<Connection> {
        let conn = match &self.path {
            Some(p) => Connection::open(p).await,
            None => Connection::open_in_memory().await,
        }
        .map_err(|e| StorageError::Connection {
            message: format!("could not open sqlite database {}", self.location()),
            source: Some(Box::new(e)),
        })?;
        call(&conn, move |c| {
            c.execute_batch(&pragmas)?;
            Ok(())
        })
        .await?;
        Ok(conn)
    }

    async fn open(&self) -> Result<Connections> {
        let busy = self.busy_timeout.as_millis();
        let wal = if self.path.is_some() {
            "PRAGMA journal_mode = WAL;"
        } else {
            ""
        };
        let writer = self
            .open_one(format!(
                "PRAGMA busy_timeout = {busy}; {wal} PRAGMA synchronous = NORMAL; \
                 PRAGMA foreign_keys = ON; \
                 PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES};"
            ))
            .await?;
        call(&writer, migrate).await?;
        let mut readers = Vec::new();
        if self.path.is_some() {
            for _ in 0..self.readers {
                readers.push(
                    self.open_one(format!(
                        "PRAGMA busy_timeout = {busy}; PRAGMA query_only = ON;"
                    ))
                    .await?,
                );
            }
        }
        // Started last, so that a failed open leaves no task behind.
        let checkpointer = match self.path {
            Some(_) => Some(Checkpointer::start(
                self.open_one(format!("PRAGMA busy_timeout = {busy};"))
                    .await?,
            )),
            None => None,
        };
        Ok(Connections {
            writer,
            readers,
            next_reader: AtomicUsize::new(0),
            checkpointer,
        })
    }

    fn location(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => ":memory:".into(),
        }
    }

    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> Sql<R> + Send + 'static,
    {
        call(&self.connections().await?.writer, f).await
    }

    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> Sql<R> + Send + 'static,
    {
        call(self.connections().await?.reader(), f).await
    }
}

async fn call<R, F>(conn: &Connection, f: F) -> Result<R>
where
    R: Send + 'static,
    F: FnOnce(&mut rusqlite::Connection) -> Sql<R> + Send + 'static,
{
    conn.call(f).await.map_err(|e| match e {
        tokio_rusqlite::Error::ConnectionClosed => StorageError::Closed,
        tokio_rusqlite::Error::Error(f) => f.into(),
        tokio_rusqlite::Error::Close((_, e)) => sql_error(e),
        // tokio-rusqlite's error is non-exhaustive; no other variant exists today.
        _ => StorageError::Backend {
            message: "unexpected sqlite connection error".into(),
            transient: false,
            source: None,
        },
    })
}

fn migrate(conn: &mut rusqlite::Connection) -> Sql<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StorageError::Backend {
            message: format!(
                "sqlite schema version {version} is newer than this library knows ({known}); \
                 upgrade aiecs-storage"
            ),
            transient: false,
            source: None,
        }
        .into());
    }
    for sql in &MIGRATIONS[version as usize..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

#[async_trait]
impl SessionStorage for SqliteBackend {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        validate::create_session(session_id, user_id, metadata)?;
        let (id, user, meta) = (
            session_id.to_owned(),
            user_id.to_owned(),
            serde_json::to_string(metadata)?,
        );
        // No transaction: if the process died between the upsert and the index move,
        // indexed_at would only trail (or lead) until the next touch, which cleanup
        // tolerates.
        self.write(move |c| upsert_session(c, &id, &user, &meta, micros(now())))
            .await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        validate::id("session_id", session_id)?;
        let id = session_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?1"
            ))?;
            let mut rows = stmt.query([&id])?;
            rows.next()?.map(session_from_row).transpose()
        })
        .await
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        validate::session_update(session_id, update)?;
        let id = session_id.to_owned();
        let update = update.clone();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let at = micros(now());
            // Counters are added in SQL; only merged metadata is computed here, under the
            // write lock this transaction holds, so no concurrent update is lost.
            let metadata = if update.metadata.is_empty() {
                None
            } else {
                let stored: Option<String> = tx
                    .prepare_cached("SELECT metadata FROM sessions WHERE session_id = ?1")?
                    .query_row([&id], |r| r.get(0))
                    .optional()?;
                let Some(stored) = stored else {
                    return Ok(false);
                };
                let mut merged: Metadata = decode("session metadata", &stored)?;
                merged.extend(update.metadata);
                Some(serde_json::to_string(&merged)?)
            };
            // Counters saturate (see `SessionUpdate`): SQLite would turn an overflowing
            // integer sum into a REAL. Validation keeps each add within i64, so
            // `MAX - ?n` cannot overflow; an overflowing float sum is Inf, which MIN clamps.
            let changed = tx
                .prepare_cached(
                    "UPDATE sessions SET request_count = CASE \
                     WHEN request_count > 9223372036854775807 - ?2 THEN 9223372036854775807 \
                     ELSE request_count + ?2 END, \
                     total_processing_time = MIN(total_processing_time + ?3, ?8), \
                     error_count = CASE \
                     WHEN error_count > 9223372036854775807 - ?4 THEN 9223372036854775807 \
                     ELSE error_count + ?4 END, \
                     status = COALESCE(?5, status), \
                     metadata = COALESCE(?6, metadata), updated_at = ?7 \
                     WHERE session_id = ?1",
                )?
                .execute(params![
                    id,
                    update.add_requests as i64,
                    update.add_processing_time,
                    update.add_errors as i64,
                    update.status,
                    metadata,
                    at,
                    f64::MAX,
                ])?;
            if changed > 0 {
                touch_index(&tx, &id, at)?;
            }
            tx.commit()?;
            Ok(changed > 0)
        })
        .await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        validate::status(status)?;
        let (id, status) = (session_id.to_owned(), status.to_owned());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let at = micros(now());
            let changed = tx
                .prepare_cached(
                    "UPDATE sessions SET status = ?2, updated_at = ?3 WHERE session_id = ?1",
                )?
                .execute(params![id, status, at])?;
            if changed > 0 {
                touch_index(&tx, &id, at)?;
            }
            tx.commit()?;
            Ok(changed > 0)
        })
        .await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        validate::new_sessions(sessions)?;
        let rows = sessions
            .iter()
            .map(|s| {
                Ok((
                    s.session_id.clone(),
                    s.user_id.clone(),
                    serde_json::to_string(&s.metadata)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let at = micros(now());
            let out = rows
                .iter()
                .map(|(id, user, meta)| upsert_session(&tx, id, user, meta, at))
                .collect::<Sql<Vec<_>>>()?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        validate::session_ids(session_ids)?;
        let ids = session_ids.to_vec();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?1"
            ))?;
            ids.iter()
                .map(|id| {
                    let mut rows = stmt.query([id])?;
                    rows.next()?.map(session_from_row).transpose()
                })
                .collect()
        })
        .await
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        let id = session_id.to_owned();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM task_contexts WHERE session_id = ?1", [&id])?;
            // Messages go with their session through ON DELETE CASCADE.
            let removed = tx.execute("DELETE FROM sessions WHERE session_id = ?1", [&id])?;
            tx.commit()?;
            Ok(removed > 0)
        })
        .await
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        validate::restored_sessions(sessions)?;
        let rows = sessions
            .iter()
            .map(|s| Ok((s.clone(), serde_json::to_string(&s.metadata)?)))
            .collect::<Result<Vec<_>>>()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO sessions (session_id, user_id, created_at, updated_at, status, \
                     metadata, request_count, total_processing_time, error_count, indexed_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?4) \
                     ON CONFLICT (session_id) DO UPDATE SET user_id = excluded.user_id, \
                     created_at = excluded.created_at, updated_at = excluded.updated_at, \
                     indexed_at = excluded.updated_at, \
                     status = excluded.status, metadata = excluded.metadata, \
                     request_count = excluded.request_count, \
                     total_processing_time = excluded.total_processing_time, \
                     error_count = excluded.error_count",
                )?;
                for (s, metadata) in &rows {
                    stmt.execute(params![
                        s.session_id,
                        s.user_id,
                        micros(s.created_at),
                        micros(s.updated_at),
                        s.status,
                        metadata,
                        s.metrics.request_count as i64,
                        s.metrics.total_processing_time,
                        s.metrics.error_count as i64,
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        validate::session_query(query)?;
        let q = query.clone();
        self.read(move |c| {
            // Only the filters in use go into the SQL, so the cursor is an index range
            // (`session_id > ?`) and paging through every session stays linear.
            let mut sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE 1 = 1");
            let mut args: Vec<&dyn rusqlite::ToSql> = Vec::new();
            for (column, op, value) in [
                ("session_id", ">", &q.after),
                ("user_id", "=", &q.user_id),
                ("status", "=", &q.status),
            ] {
                if let Some(v) = value {
                    args.push(v);
                    sql.push_str(&format!(" AND {column} {op} ?{}", args.len()));
                }
            }
            let limit = q.limit as i64 + 1;
            args.push(&limit);
            sql.push_str(&format!(" ORDER BY session_id LIMIT ?{}", args.len()));
            let mut stmt = c.prepare_cached(&sql)?;
            let mut rows = stmt.query(args.as_slice())?;
            let mut sessions = Vec::new();
            while let Some(row) = rows.next()? {
                sessions.push(session_from_row(row)?);
            }
            let more = sessions.len() > q.limit;
            sessions.truncate(q.limit);
            let next_cursor = more
                .then(|| sessions.last().map(|s| s.session_id.clone()))
                .flatten();
            Ok(SessionPage {
                sessions,
                next_cursor,
            })
        })
        .await
    }
}

#[async_trait]
impl ConversationStorage for SqliteBackend {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        validate::new_message(session_id, message)?;
        let (id, message) = (session_id.to_owned(), message.clone());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let message_id = append_message(&tx, &id, &message, micros(now()))?;
            tx.commit()?;
            Ok(message_id)
        })
        .await
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        validate::batch("messages", messages.len())?;
        // Checked here and only valid items copied: a rejected one (metadata 10 000 levels
        // deep) dropped on the connection thread could overflow that thread's stack.
        let items: Vec<Result<(String, NewMessage)>> = messages
            .iter()
            .map(|(s, m)| validate::new_message(s, m).map(|()| (s.clone(), m.clone())))
            .collect();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let at = micros(now());
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                let (session_id, message) = match item {
                    Ok(valid) => valid,
                    Err(e) => {
                        out.push(Err(e));
                        continue;
                    }
                };
                out.push(match append_message(&tx, &session_id, &message, at) {
                    Ok(id) => Ok(id),
                    Err(Failure::Storage(e)) => Err(e),
                    Err(sql) => return Err(sql),
                });
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let id = session_id.to_owned();
        self.read(move |c| {
            messages(
                c,
                "SELECT message_id, role, content, timestamp, metadata FROM \
                 (SELECT * FROM messages WHERE session_id = ?1 ORDER BY seq DESC LIMIT ?2) \
                 ORDER BY seq",
                params![id, limit as i64],
            )
        })
        .await
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        validate::restored_messages(session_id, messages)?;
        let id = session_id.to_owned();
        let rows = messages
            .iter()
            .map(|m| Ok((m.clone(), serde_json::to_string(&m.metadata)?)))
            .collect::<Result<Vec<_>>>()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let exists = tx
                .prepare_cached("SELECT 1 FROM sessions WHERE session_id = ?1")?
                .exists([&id])?;
            if !exists {
                return Err(StorageError::not_found("session", id).into());
            }
            let mut stored = 0u64;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO messages (session_id, message_id, role, content, timestamp, \
                     metadata) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (session_id, message_id) DO NOTHING",
                )?;
                for (m, metadata) in &rows {
                    stored += stmt.execute(params![
                        id,
                        m.message_id,
                        m.role,
                        m.content,
                        micros(m.timestamp),
                        metadata
                    ])? as u64;
                }
            }
            tx.commit()?;
            Ok(stored)
        })
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
        let id = session_id.to_owned();
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        self.read(move |c| {
            messages(
                c,
                "SELECT message_id, role, content, timestamp, metadata FROM messages \
                 WHERE session_id = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3",
                params![id, limit as i64, offset],
            )
        })
        .await
    }
}

#[async_trait]
impl CheckpointStorage for SqliteBackend {
    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let after = after.unwrap_or_default().to_owned();
        let found = self
            .read(move |c| {
                ids(
                    c,
                    "SELECT thread_id FROM (SELECT thread_id FROM checkpoints \
                     UNION SELECT thread_id FROM checkpoint_writes) \
                     WHERE thread_id > ?1 ORDER BY thread_id LIMIT ?2",
                    params![after, limit as i64 + 1],
                )
            })
            .await?;
        Ok(IdPage::from_sorted(found, limit))
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        validate::restored_checkpoints(checkpoints)?;
        let rows = checkpoints
            .iter()
            .map(|c| {
                Ok((
                    c.clone(),
                    serde_json::to_string(&c.data)?,
                    serde_json::to_string(&c.metadata)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, \
                     parent_checkpoint_id, data, metadata, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                     ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET \
                     parent_checkpoint_id = excluded.parent_checkpoint_id, \
                     data = excluded.data, metadata = excluded.metadata, \
                     created_at = excluded.created_at",
                )?;
                for (cp, data, metadata) in &rows {
                    stmt.execute(params![
                        cp.thread_id,
                        cp.checkpoint_ns,
                        cp.checkpoint_id,
                        cp.parent_checkpoint_id,
                        data,
                        metadata,
                        micros(cp.created_at),
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        validate::id("thread_id", thread_id)?;
        let thread = thread_id.to_owned();
        self.read(move |c| {
            ids(
                c,
                "SELECT checkpoint_ns FROM checkpoints WHERE thread_id = ?1 \
                 UNION SELECT checkpoint_ns FROM checkpoint_writes WHERE thread_id = ?1 \
                 ORDER BY 1",
                [thread],
            )
        })
        .await
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        validate::thread(thread_id, checkpoint_ns)?;
        let args = [thread_id.to_owned(), checkpoint_ns.to_owned()];
        self.read(move |c| {
            ids(
                c,
                "SELECT DISTINCT checkpoint_id FROM checkpoint_writes \
                 WHERE thread_id = ?1 AND checkpoint_ns = ?2 ORDER BY 1",
                args,
            )
        })
        .await
    }

    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        validate::new_checkpoint(checkpoint)?;
        let cp = checkpoint.clone();
        let data = serde_json::to_string(&cp.data)?;
        let metadata = serde_json::to_string(&cp.metadata)?;
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, \
                 parent_checkpoint_id, data, metadata, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET \
                 parent_checkpoint_id = excluded.parent_checkpoint_id, data = excluded.data, \
                 metadata = excluded.metadata",
            )?
            .execute(params![
                cp.thread_id,
                cp.checkpoint_ns,
                cp.checkpoint_id,
                cp.parent_checkpoint_id,
                data,
                metadata,
                micros(now()),
            ])?;
            Ok(())
        })
        .await
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, checkpoint_id)?;
        let (thread, ns, id) = (
            thread_id.to_owned(),
            checkpoint_ns.to_owned(),
            checkpoint_id.map(str::to_owned),
        );
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints \
                 WHERE thread_id = ?1 AND checkpoint_ns = ?2 \
                 AND (?3 IS NULL OR checkpoint_id = ?3) ORDER BY seq DESC LIMIT 1"
            ))?;
            let mut rows = stmt.query(params![thread, ns, id])?;
            match rows.next()? {
                Some(row) => Ok(Some(checkpoint_from_row(row, checkpoint_metadata(row)?)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        validate::checkpoint_filter(thread_id, checkpoint_ns, filter)?;
        let (thread, ns, filter) = (
            thread_id.to_owned(),
            checkpoint_ns.to_owned(),
            filter.clone(),
        );
        self.read(move |c| {
            // With a metadata filter the rows are filtered here, newest first, until
            // `limit` match; without one SQLite applies the limit itself.
            let sql_limit = if filter.metadata.is_empty() {
                filter.limit as i64
            } else {
                -1
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints \
                 WHERE thread_id = ?1 AND checkpoint_ns = ?2 AND (?3 IS NULL OR seq < \
                 (SELECT seq FROM checkpoints WHERE thread_id = ?1 AND checkpoint_ns = ?2 \
                 AND checkpoint_id = ?3)) ORDER BY seq DESC LIMIT ?4"
            ))?;
            let mut rows = stmt.query(params![thread, ns, filter.before, sql_limit])?;
            let mut out = Vec::new();
            while out.len() < filter.limit {
                let Some(row) = rows.next()? else { break };
                let metadata = checkpoint_metadata(row)?;
                if filter.matches(&metadata) {
                    out.push(checkpoint_from_row(row, metadata)?);
                }
            }
            Ok(out)
        })
        .await
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
        let item = EncodedWrites::new(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            item.insert(&tx)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        validate::batch("items", items.len())?;
        let encoded: Vec<Result<EncodedWrites>> = items
            .iter()
            .map(|w| {
                validate::writes(
                    &w.thread_id,
                    &w.checkpoint_ns,
                    &w.checkpoint_id,
                    &w.task_id,
                    &w.writes,
                )?;
                EncodedWrites::new(
                    &w.thread_id,
                    &w.checkpoint_ns,
                    &w.checkpoint_id,
                    &w.task_id,
                    &w.writes,
                )
            })
            .collect();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut out = Vec::with_capacity(encoded.len());
            for item in encoded {
                out.push(match item {
                    Ok(item) => {
                        item.insert(&tx)?;
                        Ok(())
                    }
                    Err(e) => Err(e),
                });
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, Some(checkpoint_id))?;
        let key = [thread_id, checkpoint_ns, checkpoint_id].map(str::to_owned);
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT task_id, idx, channel, value FROM checkpoint_writes \
                 WHERE thread_id = ?1 AND checkpoint_ns = ?2 AND checkpoint_id = ?3 \
                 ORDER BY seq",
            )?;
            let mut rows = stmt.query(params![key[0], key[1], key[2]])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(PendingWrite {
                    task_id: row.get(0)?,
                    idx: row.get(1)?,
                    channel: row.get(2)?,
                    value: decode("pending write value", &row.get::<_, String>(3)?)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        validate::id("thread_id", thread_id)?;
        let thread = thread_id.to_owned();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM checkpoint_writes WHERE thread_id = ?1",
                [&thread],
            )?;
            tx.execute("DELETE FROM checkpoints WHERE thread_id = ?1", [&thread])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl TaskContextStorage for SqliteBackend {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let after = after.unwrap_or_default().to_owned();
        let found = self
            .read(move |c| {
                ids(
                    c,
                    "SELECT session_id FROM task_contexts WHERE session_id > ?1 \
                     ORDER BY session_id LIMIT ?2",
                    params![after, limit as i64 + 1],
                )
            })
            .await?;
        Ok(IdPage::from_sorted(found, limit))
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        validate::id("session_id", session_id)?;
        let id = session_id.to_owned();
        self.read(move |c| {
            let text: Option<String> = c
                .prepare_cached("SELECT context FROM task_contexts WHERE session_id = ?1")?
                .query_row([&id], |r| r.get(0))
                .optional()?;
            text.map(|t| decode("task context", &t)).transpose()
        })
        .await
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        validate::task_context(session_id, context)?;
        let (id, text) = (session_id.to_owned(), serde_json::to_string(context)?);
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO task_contexts (session_id, context, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (session_id) DO UPDATE SET context = excluded.context, \
                 updated_at = excluded.updated_at",
            )?
            .execute(params![id, text, micros(now())])?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl StorageBackend for SqliteBackend {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn store_id(&self) -> Option<String> {
        let Some(path) = &self.path else {
            return Some(format!("sqlite::memory:{}", self.instance));
        };
        // A target may not exist yet: then its directory is canonicalized. Symlinks and
        // `..` resolve, so two spellings of one file compare equal.
        let canonical = std::fs::canonicalize(path).ok().or_else(|| {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
        })?;
        Some(format!("sqlite:{}", canonical.display()))
    }

    async fn initialize(&self) -> Result<()> {
        self.connections().await.map(|_| ())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some(conns) = self.state.get() {
            let checkpointer = conns.checkpointer.as_ref().map(|c| {
                c.task.abort();
                &c.conn
            });
            // Queued calls run before the close message, so nothing accepted is dropped.
            for conn in checkpointer
                .into_iter()
                .chain(&conns.readers)
                .chain([&conns.writer])
            {
                conn.clone().close().await.map_err(|e| match e {
                    tokio_rusqlite::Error::Close((_, e)) => sql_error(e),
                    other => StorageError::Backend {
                        message: format!("could not close sqlite connection: {other}"),
                        transient: false,
                        source: None,
                    },
                })?;
            }
        }
        Ok(())
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let readers = self.connections().await?.readers.len();
        let (journal_mode, schema_version, pages, page_size) = self
            .read(|c| {
                let journal: String = c.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
                let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
                let pages: i64 = c.pragma_query_value(None, "page_count", |r| r.get(0))?;
                let size: i64 = c.pragma_query_value(None, "page_size", |r| r.get(0))?;
                Ok((journal, version, pages, size))
            })
            .await?;
        let mut details = Metadata::new();
        details.insert("path".into(), json!(self.location()));
        details.insert("journal_mode".into(), json!(journal_mode));
        details.insert("schema_version".into(), json!(schema_version));
        details.insert("size_bytes".into(), json!(pages * page_size));
        details.insert("readers".into(), json!(readers));
        Ok(HealthReport::healthy(
            self.kind(),
            started.elapsed(),
            details,
        ))
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        let values = self
            .read(|c| {
                let mut values = Metadata::new();
                for (name, table) in [
                    ("sessions", "sessions"),
                    ("messages", "messages"),
                    ("checkpoints", "checkpoints"),
                    ("pending_writes", "checkpoint_writes"),
                    ("task_contexts", "task_contexts"),
                ] {
                    let n: i64 =
                        c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
                    values.insert(name.into(), json!(n));
                }
                Ok(values)
            })
            .await?;
        Ok(MetricsReport {
            component: self.kind().to_owned(),
            values,
            components: Vec::new(),
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        let cutoff = micros(validate::idle_cutoff(max_idle)?);
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // `indexed_at <= updated_at`, so the index range holds every idle session.
            tx.execute(
                "DELETE FROM task_contexts WHERE session_id IN (SELECT session_id FROM \
                 sessions WHERE indexed_at < ?1 AND updated_at < ?1)",
                [cutoff],
            )?;
            // Messages go with their session through ON DELETE CASCADE.
            let removed = tx.execute(
                "DELETE FROM sessions WHERE indexed_at < ?1 AND updated_at < ?1",
                [cutoff],
            )?;
            tx.commit()?;
            Ok(removed as u64)
        })
        .await
    }
}
