//! SQLite-specific behaviour the conformance suite cannot see: the file on disk, schema
//! versions, and corrupted records.
#![cfg(feature = "sqlite")]

use aiecs_storage::prelude::*;
use aiecs_storage::{Metadata, NewMessage, SqliteBackend, StorageError};

fn raw(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("open raw connection")
}

#[tokio::test]
async fn data_survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let first = SqliteBackend::new(&path);
    first
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    first
        .add_conversation_message("s", &NewMessage::new("user", "kept").with_id("m1"))
        .await
        .unwrap();
    first.close().await.unwrap();

    let second = SqliteBackend::new(&path);
    second.initialize().await.unwrap();
    let history = second.get_conversation_history("s", 10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].content, "kept");
    let health = second.health_check().await.unwrap();
    assert_eq!(health.details["journal_mode"], "wal");
    assert_eq!(health.details["schema_version"], 4);
}

#[tokio::test]
async fn a_newer_schema_is_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.db");
    SqliteBackend::new(&path).initialize().await.unwrap();
    raw(&path).pragma_update(None, "user_version", 99).unwrap();

    let err = SqliteBackend::new(&path).initialize().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("99") && text.contains("newer"),
        "unexpected error: {text}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn initialize_migrates_an_empty_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    for _ in 0..3 {
        let b = SqliteBackend::new(&path);
        b.initialize().await.unwrap();
        b.initialize().await.unwrap();
        b.close().await.unwrap();
    }
    let version: i64 = raw(&path)
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
}

#[tokio::test]
async fn corrupted_records_are_serialization_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let b = SqliteBackend::new(&path);
    b.create_session("s", "u", &Metadata::new()).await.unwrap();
    b.store_task_context("s", &serde_json::json!({"a": 1}))
        .await
        .unwrap();
    let conn = raw(&path);
    conn.execute(
        "UPDATE sessions SET metadata = '{\"trunc' WHERE session_id = 's'",
        [],
    )
    .unwrap();
    conn.execute(
        "UPDATE task_contexts SET context = '[1,' WHERE session_id = 's'",
        [],
    )
    .unwrap();
    drop(conn);

    match b.get_session("s").await {
        Err(StorageError::Serialization { .. }) => {}
        other => panic!("expected a serialization error, got {other:?}"),
    }
    match b.get_task_context("s").await {
        Err(StorageError::Serialization { .. }) => {}
        other => panic!("expected a serialization error, got {other:?}"),
    }
}

#[tokio::test]
async fn in_memory_databases_are_private() {
    let a = SqliteBackend::in_memory();
    let b = SqliteBackend::in_memory();
    a.create_session("s", "u", &Metadata::new()).await.unwrap();
    assert!(a.get_session("s").await.unwrap().is_some());
    assert!(b.get_session("s").await.unwrap().is_none());
}

#[tokio::test]
async fn closed_backend_does_not_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let b = SqliteBackend::new(dir.path().join("d.db"));
    b.initialize().await.unwrap();
    b.close().await.unwrap();
    assert!(matches!(b.initialize().await, Err(StorageError::Closed)));
    assert!(matches!(
        b.get_session("s").await,
        Err(StorageError::Closed)
    ));
}

#[tokio::test]
async fn an_unopenable_path_is_a_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let b = SqliteBackend::new(dir.path().join("missing-dir").join("x.db"));
    match b.initialize().await {
        Err(StorageError::Connection { message, .. }) => {
            assert!(message.contains("missing-dir"), "{message}")
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
}

/// `indexed_at` and `updated_at` of a session, read past the backend.
fn index_times(path: &std::path::Path, id: &str) -> (i64, i64) {
    raw(path)
        .query_row(
            "SELECT indexed_at, updated_at FROM sessions WHERE session_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

#[tokio::test]
async fn touches_leave_the_cleanup_index_alone_within_a_minute() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("touch.db");
    let b = SqliteBackend::new(&path);
    b.create_session("s", "u", &Metadata::new()).await.unwrap();
    let (created, _) = index_times(&path, "s");
    for i in 0..20 {
        b.add_conversation_message("s", &NewMessage::new("user", format!("m{i}")))
            .await
            .unwrap();
        b.update_session(
            "s",
            &aiecs_storage::SessionUpdate::new().increment_requests(),
        )
        .await
        .unwrap();
    }
    let batch: Vec<(String, NewMessage)> = (0..5)
        .map(|i| ("s".to_string(), NewMessage::new("user", format!("b{i}"))))
        .collect();
    b.batch_add_conversation_messages(&batch).await.unwrap();
    b.end_session("s", "completed").await.unwrap();
    b.create_session("s", "u2", &Metadata::new()).await.unwrap();
    let (indexed, updated) = index_times(&path, "s");
    assert!(updated > created, "updated_at moved");
    assert_eq!(
        indexed, created,
        "42 touches within a minute left indexed_at alone"
    );

    // An index entry that trails by more than the granularity (or leads) is moved.
    raw(&path)
        .execute(
            "UPDATE sessions SET indexed_at = indexed_at - 61000000 WHERE session_id = 's'",
            [],
        )
        .unwrap();
    b.add_conversation_message("s", &NewMessage::new("user", "late"))
        .await
        .unwrap();
    let (indexed, updated) = index_times(&path, "s");
    assert_eq!(indexed, updated);
    raw(&path)
        .execute(
            "UPDATE sessions SET indexed_at = updated_at + 5000000 WHERE session_id = 's'",
            [],
        )
        .unwrap();
    b.end_session("s", "completed").await.unwrap();
    let (indexed, updated) = index_times(&path, "s");
    assert_eq!(indexed, updated);
    b.close().await.unwrap();
}

/// The released version-1 schema, verbatim (released migrations never change).
const SCHEMA_V1: &str = r#"
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
PRAGMA user_version = 1;
"#;

#[tokio::test]
async fn a_version_1_file_is_upgraded_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let day = 24 * 3600 * 1_000_000_i64;
    let now = chrono::Utc::now().timestamp_micros();
    {
        let conn = raw(&path);
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute(
            "INSERT INTO sessions (session_id, user_id, created_at, updated_at, status, \
             metadata, request_count) VALUES ('idle', 'u', ?1, ?1, 'active', '{}', 1), \
             ('live', 'u', ?2, ?2, 'active', '{\"k\":1}', 7)",
            [now - 2 * day, now - 60_000_000],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO messages (session_id, message_id, role, content, timestamp, metadata) \
             VALUES ('live', 'm1', 'user', 'one', ?1, '{}'), ('live', 'm2', 'user', 'two', ?1, '{}')",
            [now],
        )
        .unwrap();
    }
    let b = SqliteBackend::new(&path);
    b.initialize().await.unwrap();
    assert_eq!(b.health_check().await.unwrap().details["schema_version"], 4);
    // The change feed's tables came with the upgrade.
    for table in ["changes", "feed_followers"] {
        let rows: i64 = raw(&path)
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0, "{table}");
    }
    let live = b.get_session("live").await.unwrap().unwrap();
    assert_eq!(live.metrics.request_count, 7);
    assert_eq!(live.metadata["k"], serde_json::json!(1));
    assert_eq!(index_times(&path, "live").0, now - 60_000_000);
    b.add_conversation_message("live", &NewMessage::new("user", "again").with_id("m2"))
        .await
        .unwrap();
    let ids: Vec<String> = b
        .get_conversation_history("live", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(ids, ["m1", "m2"]);
    assert_eq!(
        b.cleanup_expired_sessions(std::time::Duration::from_secs(24 * 3600))
            .await
            .unwrap(),
        1
    );
    assert!(b.get_session("idle").await.unwrap().is_none());
    assert!(b.get_session("live").await.unwrap().is_some());
    b.close().await.unwrap();
}

#[tokio::test]
async fn the_wal_is_copied_into_the_file_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.db");
    let b = SqliteBackend::new(&path);
    b.create_session("s", "u", &Metadata::new()).await.unwrap();
    let size = || std::fs::metadata(&path).unwrap().len();
    let before = size();
    // About 2 MiB of messages: less than the writer's own checkpoint threshold (64 MiB),
    // and less than SQLite's default one (4 MiB), so only the background task copies
    // the WAL into the database file.
    let content = "x".repeat(1024);
    for round in 0..20 {
        let batch: Vec<(String, NewMessage)> = (0..100)
            .map(|i| {
                let m = NewMessage::new("user", content.clone()).with_id(format!("{round}-{i}"));
                ("s".to_string(), m)
            })
            .collect();
        for r in b.batch_add_conversation_messages(&batch).await.unwrap() {
            r.unwrap();
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while size() < before + 2_000_000 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        size() >= before + 2_000_000,
        "database file {} bytes, {before} before 2 MiB of appends: the WAL was not copied",
        size()
    );
    b.close().await.unwrap();
    let reopened = SqliteBackend::new(&path);
    assert_eq!(
        reopened
            .get_conversation_history("s", 5000)
            .await
            .unwrap()
            .len(),
        2000
    );
    reopened.close().await.unwrap();
}
