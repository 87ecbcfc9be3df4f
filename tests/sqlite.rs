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
    assert_eq!(health.details["schema_version"], 1);
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
    assert_eq!(version, 1);
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
