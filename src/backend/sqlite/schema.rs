//! The SQLite schema: its migrations, applied in order, and the column lists.

use rusqlite::TransactionBehavior;

use super::error::Sql;
use crate::error::StorageError;

/// Schema migrations, applied in order inside one transaction; `PRAGMA user_version`
/// records how many ran, so a file written by an older version is brought forward on
/// `initialize()` and a file from a newer version is refused rather than misread.
pub(super) const MIGRATIONS: &[&str] = &[
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
    r#"
-- The change feed (see feed.rs): every write adds a row per session ('s'), task
-- context ('c') or thread ('t') it touched, or one 'a' for "anything", in its own
-- transaction, so other processes learn of a change exactly when it commits.
-- seq is the rowid, one above the largest: trimming never removes the newest row, so a
-- seq is never reused and a poller can tell a trimmed row it never read from one not
-- yet written. (AUTOINCREMENT would add a write of sqlite_sequence to every commit:
-- one more WAL page each, for a guarantee the trimming already gives.)
CREATE TABLE changes (
    seq  INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    id   TEXT NOT NULL
);
"#,
    r#"
-- Who follows the change feed (see feed.rs): writers record changes only while a row
-- here has not expired, so a file nobody follows costs its writers nothing. Each
-- follower's poller keeps its own row alive; expires_at is Unix time in milliseconds.
CREATE TABLE feed_followers (
    id         TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
"#,
];

pub(super) const SESSION_COLUMNS: &str =
    "session_id, user_id, created_at, updated_at, status, metadata, \
     request_count, total_processing_time, error_count";
pub(super) const CHECKPOINT_COLUMNS: &str =
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, data, metadata, created_at";

pub(super) fn migrate(conn: &mut rusqlite::Connection) -> Sql<()> {
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
