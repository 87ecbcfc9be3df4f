//! The embedded default backend: SQLite in WAL mode, one writer and a few readers.
//!
//! `mod.rs` holds the backend type, its settings and connections; `schema` its tables
//! and migrations; `error` how SQLite's errors become [`StorageError`]s; `rows` row
//! decoding; one file per storage trait beside them.

mod checkpoints;
mod conversation;
mod error;
mod feed;
mod lifecycle;
mod rows;
mod schema;
mod sessions;
mod task_context;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_rusqlite::Connection;

use self::error::{sql_error, Sql};
use self::schema::migrate;
use crate::error::{Result, StorageError};

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
/// A file database offers a change feed ([`StorageBackend::changes`]), so a cache in
/// each of several processes sharing the file stays coherent: while a process follows
/// the feed, a task of its polls a `changes` table every 10 ms on a connection of its
/// own, and every write of every process records what it touched there, in its own
/// transaction. While nobody follows, writes record nothing and cost what they cost
/// without a feed; see [`with_change_feed`](SqliteBackend::with_change_feed).
///
/// [`StorageBackend::changes`]: crate::StorageBackend::changes
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
    /// `None` in memory: one process, nobody else writes.
    feed: Option<Arc<feed::Feed>>,
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
            // In memory there is no other process to hear from.
            feed: (path != Path::new(":memory:")).then(Arc::default),
        }
    }

    /// Turns the change feed ([`StorageBackend::changes`](crate::StorageBackend::changes))
    /// on or off (default on; a database in memory has none).
    ///
    /// With the feed on, this backend's writes record the sessions, task contexts and
    /// threads they touch in a `changes` table while any process sharing the file
    /// follows the feed, and a subscription to [`changes`](crate::StorageBackend::changes)
    /// (a coherent cache makes one) follows it: one task polls the table every 10 ms and
    /// registers the process in a `feed_followers` table. Each writer looks at that
    /// table at most every 100 ms, so while nobody follows, writes pay nothing
    /// measurable; while someone does, they pay 12-27% of their throughput here
    /// (create_session the most). A new subscription reports the feed up about 120 ms
    /// after it starts, once every writer records for it.
    ///
    /// Off, this backend neither records nor offers a feed: turn it off only where no
    /// other process caches this file, since another process's cache never hears of
    /// this one's writes. A stack file says `?change_feed=off` after the URL.
    pub fn with_change_feed(mut self, on: bool) -> Self {
        self.feed = (on && self.path.is_some()).then(Arc::default);
        self
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
        if self.feed.is_some() {
            // Only the writer connection writes, on a thread of its own: a flag of that
            // thread and a commit hook make its writes record while someone follows. A
            // backend without a feed has neither, and its writes pay nothing.
            call(&writer, |c| Ok(feed::start_recording(c)?)).await?;
        }
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
