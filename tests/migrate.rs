//! Migration, export/import and verification between backends.
#![cfg(feature = "sqlite")]

mod common;

use std::io::{BufReader, Cursor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aiecs_storage::layer::Operation;
use aiecs_storage::ops::migrate::{
    read_state, verify, verify_scope, DifferenceKind, Entity, MigrateOptions, Migrator, Progress,
};
use aiecs_storage::ops::transfer::{
    check_export, export, import, import_stream, Record, Scope, Source, TransferOptions,
    FORMAT_VERSION,
};
use aiecs_storage::{
    prelude::*, CheckpointFilter, ErrorKind, MemoryBackend, Metadata, NewCheckpoint, NewMessage,
    SessionQuery, SessionUpdate, SqliteBackend, StorageError, WriteInput,
};
use common::fault::{Faults, Target};
use serde_json::json;

const SESSIONS: usize = 50;
const MESSAGES: usize = 30;
const THREADS: usize = 10;
const CHECKPOINTS: usize = 15;

fn meta(v: serde_json::Value) -> Metadata {
    v.as_object().cloned().unwrap()
}

/// 50 sessions x 30 messages (some updated, ended, with metadata), task contexts (one
/// for an id with no session), 10 threads x 15 checkpoints over two namespaces with
/// parents, an in-place update of an old checkpoint, and pending writes of interleaved
/// tasks.
async fn populate(b: &dyn StorageBackend) {
    for i in 0..SESSIONS {
        let id = format!("s{i:02}");
        b.create_session(
            &id,
            &format!("u{}", i % 5),
            &meta(json!({"i": i, "tier": "free"})),
        )
        .await
        .unwrap();
        for j in 0..MESSAGES {
            let mut m = NewMessage::new(
                if j % 2 == 0 { "user" } else { "assistant" },
                format!("{id} message {j} ✓"),
            );
            if j % 3 == 0 {
                m = m.with_id(format!("{id}-m{j}"));
            }
            if j % 5 == 0 {
                m = m.with_metadata(meta(
                    json!({"tokens": j * 7, "nested": {"b": 1, "a": [1.5, null]}}),
                ));
            }
            b.add_conversation_message(&id, &m).await.unwrap();
        }
        if i % 3 == 0 {
            let u = SessionUpdate::new()
                .increment_requests()
                .add_processing_time(0.125 * i as f64)
                .metadata_entry("updated", true)
                .status("paused");
            assert!(b.update_session(&id, &u).await.unwrap());
        }
        if i % 4 == 0 {
            assert!(b
                .update_session(&id, &SessionUpdate::new().mark_error())
                .await
                .unwrap());
        }
        if i % 7 == 0 {
            assert!(b.end_session(&id, "failed").await.unwrap());
        }
        if i % 2 == 0 {
            b.store_task_context(&id, &json!({"step": i, "plan": ["a", "b"], "ratio": 0.1}))
                .await
                .unwrap();
        }
    }
    b.store_task_context("orphan-context", &json!({"no": "session"}))
        .await
        .unwrap();

    for t in 0..THREADS {
        let thread = format!("t{t}");
        let mut last: [Option<String>; 2] = [None, None];
        for c in 0..CHECKPOINTS {
            let slot = c % 2;
            let ns = if slot == 0 { "" } else { "sub" };
            // Ids that do not sort in store order, so order must come from the store.
            let id = format!("cp-{:02}", (c * 7) % CHECKPOINTS);
            let mut cp = NewCheckpoint::new(&thread, &id, json!({"state": c, "v": [t, c]}))
                .with_namespace(ns)
                .with_metadata(meta(json!({"step": c, "source": "loop"})));
            if let Some(p) = &last[slot] {
                cp = cp.with_parent(p);
            }
            b.store_checkpoint(&cp).await.unwrap();
            last[slot] = Some(id.clone());
            if c % 3 == 0 {
                b.put_writes(
                    &thread,
                    ns,
                    &id,
                    "task-a",
                    &[
                        WriteInput::new("x", json!(1)),
                        WriteInput::new("y", json!({"k": c})),
                    ],
                )
                .await
                .unwrap();
                b.put_writes(
                    &thread,
                    ns,
                    &id,
                    "task-b",
                    &[WriteInput::new("z", json!("b"))],
                )
                .await
                .unwrap();
                // task-a again with one more write: it lands after task-b's.
                b.put_writes(
                    &thread,
                    ns,
                    &id,
                    "task-a",
                    &[
                        WriteInput::new("x", json!(1)),
                        WriteInput::new("y", json!({"k": c})),
                        WriteInput::new("w", json!(null)),
                    ],
                )
                .await
                .unwrap();
            }
        }
        // Store the oldest checkpoint of the default namespace again: updated in place,
        // not made latest.
        let first = b
            .list_checkpoints(&thread, "", &CheckpointFilter::new().limit(100))
            .await
            .unwrap()
            .pop()
            .unwrap();
        b.store_checkpoint(
            &NewCheckpoint::new(&thread, &first.checkpoint_id, json!({"rewritten": true}))
                .with_metadata(first.metadata.clone()),
        )
        .await
        .unwrap();
    }
}

/// Asserts that `b` holds exactly what `a` holds, read through the contract.
async fn assert_same(a: &dyn StorageBackend, b: &dyn StorageBackend) {
    let all = SessionQuery::new().limit(10_000);
    let sa = a.list_sessions(&all).await.unwrap().sessions;
    let sb = b.list_sessions(&all).await.unwrap().sessions;
    assert_eq!(sa.len(), sb.len());
    assert_eq!(sa, sb, "sessions (timestamps, status, counters, metadata)");
    for s in &sa {
        let ha = a
            .get_conversation_range(&s.session_id, 0, 10_000)
            .await
            .unwrap();
        let hb = b
            .get_conversation_range(&s.session_id, 0, 10_000)
            .await
            .unwrap();
        assert_eq!(ha, hb, "history of {}", s.session_id);
        assert_eq!(
            a.get_conversation_history(&s.session_id, 5).await.unwrap(),
            b.get_conversation_history(&s.session_id, 5).await.unwrap()
        );
    }
    let ca = a.list_task_contexts(None, 10_000).await.unwrap();
    assert_eq!(ca, b.list_task_contexts(None, 10_000).await.unwrap());
    for id in &ca.ids {
        assert_eq!(
            a.get_task_context(id).await.unwrap(),
            b.get_task_context(id).await.unwrap(),
            "context of {id}"
        );
    }
    let ta = a.list_threads(None, 10_000).await.unwrap();
    assert_eq!(ta, b.list_threads(None, 10_000).await.unwrap());
    for t in &ta.ids {
        let na = a.list_checkpoint_namespaces(t).await.unwrap();
        assert_eq!(na, b.list_checkpoint_namespaces(t).await.unwrap());
        for ns in &na {
            let f = CheckpointFilter::new().limit(10_000);
            let la = a.list_checkpoints(t, ns, &f).await.unwrap();
            let lb = b.list_checkpoints(t, ns, &f).await.unwrap();
            assert_eq!(
                la, lb,
                "checkpoints of {t}/{ns} (order, created_at, parents)"
            );
            assert_eq!(
                a.get_checkpoint(t, ns, None).await.unwrap(),
                b.get_checkpoint(t, ns, None).await.unwrap(),
                "latest of {t}/{ns}"
            );
            for c in &la {
                assert_eq!(
                    a.get_writes(t, ns, &c.checkpoint_id).await.unwrap(),
                    b.get_writes(t, ns, &c.checkpoint_id).await.unwrap(),
                    "writes of {t}/{ns}/{}",
                    c.checkpoint_id
                );
            }
        }
    }
}

fn total_items() -> u64 {
    // sessions + messages + contexts + checkpoints + writes
    let contexts = (SESSIONS as u64).div_ceil(2) + 1;
    let writes_per_thread = (0..CHECKPOINTS).filter(|c| c % 3 == 0).count() as u64 * 4;
    SESSIONS as u64
        + (SESSIONS * MESSAGES) as u64
        + contexts
        + (THREADS * CHECKPOINTS) as u64
        + THREADS as u64 * writes_per_thread
}

#[tokio::test]
async fn migrate_memory_to_sqlite_copies_everything_and_verifies_clean() {
    let source = MemoryBackend::new();
    populate(&source).await;
    let target = SqliteBackend::in_memory();

    let events: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let seen = events.clone();
    let report = Migrator::new(&source, &target)
        .on_progress(move |p| seen.lock().unwrap().push(p.clone()))
        .run()
        .await
        .unwrap();
    assert_eq!(report.copied.records, total_items());
    assert_eq!(report.copied.sessions, SESSIONS as u64);
    assert_eq!(report.copied.messages, (SESSIONS * MESSAGES) as u64);
    assert_eq!(report.copied.new_messages, (SESSIONS * MESSAGES) as u64);
    assert_eq!(report.copied.checkpoints, (THREADS * CHECKPOINTS) as u64);
    assert_eq!(report.done.sessions, SESSIONS as u64);
    assert_eq!(report.done.task_contexts, SESSIONS as u64 / 2 + 1);
    assert_eq!(report.done.threads, THREADS as u64);
    assert!(report.resumed_from.is_none());

    let events = std::mem::take(&mut *events.lock().unwrap());
    assert!(events.len() > 10, "one progress event per batch");
    let last = events.last().unwrap();
    let totals = last.totals.unwrap();
    assert_eq!(totals.units(), last.units_done());
    assert_eq!(last.copied, report.copied);

    let v = verify(&source, &target).await.unwrap();
    assert!(v.is_clean(), "{:#?}", v.differences);
    assert_eq!(v.source, v.target);
    assert_eq!(v.source.sessions, SESSIONS as u64);
    assert_eq!(v.source.messages, (SESSIONS * MESSAGES) as u64);
    assert_eq!(v.source.task_contexts, SESSIONS as u64 / 2 + 1);
    assert_eq!(v.source.threads, THREADS as u64);
    assert_eq!(v.source.checkpoints, (THREADS * CHECKPOINTS) as u64);
    assert_eq!(v.sessions_checked, SESSIONS as u64 + 1);
    assert_eq!(v.threads_checked, THREADS as u64);
    assert_same(&source, &target).await;

    // And back the other way, sqlite -> memory, still identical.
    let back = MemoryBackend::new();
    Migrator::new(&target, &back)
        .batch_size(7)
        .run()
        .await
        .unwrap();
    assert!(verify(&source, &back).await.unwrap().is_clean());
    assert_same(&source, &back).await;
}

#[tokio::test]
async fn rerunning_a_migration_duplicates_nothing() {
    let source = MemoryBackend::new();
    populate(&source).await;
    let target = SqliteBackend::in_memory();
    Migrator::new(&source, &target)
        .batch_size(64)
        .run()
        .await
        .unwrap();
    let again = Migrator::new(&source, &target)
        .batch_size(33)
        .run()
        .await
        .unwrap();
    assert_eq!(again.copied.messages, (SESSIONS * MESSAGES) as u64);
    assert_eq!(
        again.copied.new_messages, 0,
        "every message was already there"
    );
    let v = verify(&source, &target).await.unwrap();
    assert!(v.is_clean(), "{:#?}", v.differences);
    assert_eq!(v.target.messages, (SESSIONS * MESSAGES) as u64);
    assert_eq!(v.target.pending_writes, v.source.pending_writes);
    assert_same(&source, &target).await;
}

#[tokio::test]
async fn verify_names_each_difference() {
    let source = MemoryBackend::new();
    populate(&source).await;
    let target = MemoryBackend::new();
    Migrator::new(&source, &target).run().await.unwrap();

    target
        .add_conversation_message("s03", &NewMessage::new("user", "extra"))
        .await
        .unwrap();
    target
        .update_session("s04", &SessionUpdate::new().increment_requests())
        .await
        .unwrap();
    target
        .create_session("zz-extra", "u", &Metadata::new())
        .await
        .unwrap();
    target.delete_thread("t2").await.unwrap();
    target
        .store_task_context("orphan-context", &json!({"changed": 1}))
        .await
        .unwrap();
    target
        .put_writes(
            "t5",
            "",
            "cp-00",
            "task-c",
            &[WriteInput::new("c", json!(0))],
        )
        .await
        .unwrap();

    let v = verify(&source, &target).await.unwrap();
    assert!(!v.is_clean());
    let found: Vec<(Entity, &str, DifferenceKind)> = v
        .differences
        .iter()
        .map(|d| (d.entity, d.id.as_str(), d.kind))
        .collect();
    assert_eq!(
        found,
        vec![
            (Entity::Session, "s03", DifferenceKind::ChecksumMismatch),
            (Entity::Session, "s04", DifferenceKind::ChecksumMismatch),
            (Entity::Session, "zz-extra", DifferenceKind::ExtraOnTarget),
            (
                Entity::TaskContext,
                "orphan-context",
                DifferenceKind::ChecksumMismatch
            ),
            (Entity::Thread, "t2", DifferenceKind::MissingOnTarget),
            (Entity::Thread, "t5", DifferenceKind::ChecksumMismatch),
        ],
        "{:#?}",
        v.differences
    );
    // The new message moved the session's updated_at too.
    assert_eq!(
        v.differences[0].detail,
        "session record, messages (30 vs 31)"
    );
    assert_eq!(v.differences[1].detail, "session record");
    assert!(
        v.differences[5].detail.starts_with("pending writes"),
        "{}",
        v.differences[5].detail
    );
    assert_eq!(v.target.messages, v.source.messages + 1);
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["clean"], json!(false));
    assert_eq!(json["differences"][4]["kind"], json!("missing_on_target"));
    assert!(json["differences"][4]["source_checksum"].is_string());
}

#[tokio::test]
async fn an_interrupted_migration_resumes_from_its_state_file() {
    let source = MemoryBackend::new();
    populate(&source).await;
    let (target, faults) = Faults::wrap(SqliteBackend::in_memory());
    let dir = tempfile::TempDir::new().unwrap();
    let state = dir.path().join("migration.json");

    // Fail the first restore_messages after 20 batches.
    let batches = Arc::new(AtomicU64::new(0));
    let (count, steer) = (batches.clone(), faults.clone());
    let err = Migrator::new(&source, &target)
        .batch_size(50)
        .state_file(&state)
        .on_progress(move |_| {
            if count.fetch_add(1, Ordering::SeqCst) + 1 == 20 {
                steer.fail_next(
                    Target::Op(Operation::RestoreMessages),
                    1,
                    ErrorKind::Connection,
                );
            }
        })
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert_eq!(faults.injected(), 1);
    let saved = read_state(&state)
        .unwrap()
        .expect("the state file is kept on error");
    assert_eq!(saved.scope, Scope::All);
    assert!(saved.position.after.is_some(), "{:?}", saved.position);
    assert!(saved.records > 0);

    let resumed = Migrator::new(&source, &target)
        .batch_size(50)
        .state_file(&state)
        .run()
        .await
        .unwrap();
    assert_eq!(resumed.resumed_from.as_ref(), Some(&saved.position));
    assert!(
        resumed.copied.records < total_items(),
        "resumed run copied {} of {}",
        resumed.copied.records,
        total_items()
    );
    assert!(resumed.done.sessions < SESSIONS as u64);
    assert!(
        !state.exists(),
        "the state file is removed when the run completes"
    );
    let v = verify(&source, &target).await.unwrap();
    assert!(v.is_clean(), "{:#?}", v.differences);
    assert_same(&source, &target).await;

    // A state file of another scope is refused.
    std::fs::write(&state, serde_json::to_vec(&saved).unwrap()).unwrap();
    let err = Migrator::new(&source, &target)
        .scope(Scope::thread("t1"))
        .state_file(&state)
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

#[tokio::test]
async fn an_interrupted_migration_resumes_in_the_thread_phase() {
    let source = MemoryBackend::new();
    populate(&source).await;
    let (target, faults) = Faults::wrap(MemoryBackend::new());
    let dir = tempfile::TempDir::new().unwrap();
    let state = dir.path().join("state.json");
    faults.fail_next(Target::Op(Operation::BatchPutWrites), 1, ErrorKind::Timeout);
    // Writes fail at the first thread holding some; that thread is redone.
    Migrator::new(&source, &target)
        .with_options(MigrateOptions {
            batch_size: 10,
            state_file: Some(state.clone()),
            ..MigrateOptions::default()
        })
        .run()
        .await
        .unwrap_err();
    let saved = read_state(&state).unwrap().unwrap();
    assert_eq!(
        saved.position.phase,
        aiecs_storage::ops::transfer::Phase::Threads
    );
    let resumed = Migrator::new(&source, &target)
        .batch_size(10)
        .state_file(&state)
        .run()
        .await
        .unwrap();
    assert_eq!(resumed.copied.sessions, 0);
    assert_eq!(resumed.copied.messages, 0);
    assert_eq!(resumed.done.threads, THREADS as u64);
    assert!(verify(&source, &target).await.unwrap().is_clean());
    assert_same(&source, &target).await;
}

#[tokio::test]
async fn export_import_round_trips_the_whole_store() {
    let source = MemoryBackend::new();
    populate(&source).await;
    let mut lines = Vec::new();
    let exported = export(
        &source,
        &Scope::All,
        &mut lines,
        &TransferOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(exported.records, total_items());
    let text = String::from_utf8(lines.clone()).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["type"], json!("header"));
    assert_eq!(first["version"], json!(FORMAT_VERSION));
    assert_eq!(first["source"], json!("memory"));

    let target = SqliteBackend::in_memory();
    let imported = import(
        &target,
        Cursor::new(&lines),
        &TransferOptions {
            batch_size: 250,
            ..TransferOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(imported.records, exported.records);
    assert_eq!(imported.new_messages, (SESSIONS * MESSAGES) as u64);
    assert!(verify(&source, &target).await.unwrap().is_clean());
    assert_same(&source, &target).await;

    // Importing the same file again changes nothing.
    let again = import(&target, Cursor::new(&lines), &TransferOptions::default())
        .await
        .unwrap();
    assert_eq!(again.new_messages, 0);
    assert!(verify(&source, &target).await.unwrap().is_clean());

    // Through a file too, from sqlite this time.
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("backup.jsonl");
    let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    export(
        &target,
        &Scope::All,
        file,
        &TransferOptions {
            batch_size: 1000,
            ..TransferOptions::default()
        },
    )
    .await
    .unwrap();
    let fresh = MemoryBackend::new();
    let reader = BufReader::new(std::fs::File::open(&path).unwrap());
    import(&fresh, reader, &TransferOptions::default())
        .await
        .unwrap();
    assert!(verify(&source, &fresh).await.unwrap().is_clean());
    assert_same(&source, &fresh).await;
}

#[tokio::test]
async fn export_import_of_one_session_and_one_thread() {
    let source = MemoryBackend::new();
    populate(&source).await;

    let mut lines = Vec::new();
    let counts = export(
        &source,
        &Scope::session("s06"),
        &mut lines,
        &TransferOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        (counts.sessions, counts.messages, counts.task_contexts),
        (1, MESSAGES as u64, 1)
    );
    let target = SqliteBackend::in_memory();
    import(&target, Cursor::new(&lines), &TransferOptions::default())
        .await
        .unwrap();
    let v = verify_scope(&source, &target, &Scope::session("s06"))
        .await
        .unwrap();
    assert!(v.is_clean(), "{:#?}", v.differences);
    assert_eq!(v.target.messages, MESSAGES as u64);
    assert_eq!(
        target.get_session("s06").await.unwrap(),
        source.get_session("s06").await.unwrap()
    );
    assert_eq!(
        target.get_conversation_range("s06", 0, 100).await.unwrap(),
        source.get_conversation_range("s06", 0, 100).await.unwrap()
    );
    // Verifying a session the target lacks reports it; one the source lacks is NotFound.
    let v = verify_scope(&source, &target, &Scope::session("s08"))
        .await
        .unwrap();
    assert_eq!(v.differences.len(), 1);
    assert_eq!(v.differences[0].kind, DifferenceKind::MissingOnTarget);
    let err = verify_scope(&source, &target, &Scope::session("nope"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let v = verify_scope(&source, &target, &Scope::thread("t1"))
        .await
        .unwrap();
    assert_eq!(v.differences[0].entity, Entity::Thread);
    assert_eq!(v.differences[0].kind, DifferenceKind::MissingOnTarget);
    let whole = verify(&source, &target).await.unwrap();
    assert_eq!(whole.target.sessions, 1);
    assert_eq!(whole.target.threads, 0);

    let mut lines = Vec::new();
    let counts = export(
        &source,
        &Scope::thread("t7"),
        &mut lines,
        &TransferOptions {
            batch_size: 4,
            ..TransferOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(counts.checkpoints, CHECKPOINTS as u64);
    assert_eq!(counts.sessions, 0);
    let target = MemoryBackend::new();
    import(&target, Cursor::new(&lines), &TransferOptions::default())
        .await
        .unwrap();
    let v = verify_scope(&source, &target, &Scope::thread("t7"))
        .await
        .unwrap();
    assert!(v.is_clean(), "{:#?}", v.differences);
    for ns in ["", "sub"] {
        let f = CheckpointFilter::new().limit(100);
        assert_eq!(
            target.list_checkpoints("t7", ns, &f).await.unwrap(),
            source.list_checkpoints("t7", ns, &f).await.unwrap()
        );
        assert_eq!(
            target.get_checkpoint("t7", ns, None).await.unwrap(),
            source.get_checkpoint("t7", ns, None).await.unwrap()
        );
    }
    assert_eq!(
        target.list_threads(None, 100).await.unwrap().ids,
        vec!["t7".to_owned()]
    );

    // The migrator takes the same scopes.
    let target = SqliteBackend::in_memory();
    let report = Migrator::new(&source, &target)
        .scope(Scope::session("s00"))
        .run()
        .await
        .unwrap();
    assert_eq!(report.done.sessions, 1);
    assert!(Migrator::new(&source, &target)
        .scope(Scope::session("s00"))
        .verify()
        .await
        .unwrap()
        .is_clean());

    // Missing session or thread: NotFound.
    let err = export(
        &source,
        &Scope::session("nope"),
        &mut Vec::new(),
        &TransferOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = export(
        &source,
        &Scope::thread("nope"),
        &mut Vec::new(),
        &TransferOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn a_malformed_line_is_a_serialization_error_naming_the_line() {
    let source = MemoryBackend::new();
    source
        .create_session("s1", "u", &Metadata::new())
        .await
        .unwrap();
    let mut lines = Vec::new();
    export(
        &source,
        &Scope::All,
        &mut lines,
        &TransferOptions::default(),
    )
    .await
    .unwrap();
    let good = String::from_utf8(lines).unwrap();
    assert_eq!(good.lines().count(), 3, "header, session, trailer");
    let session = good.lines().nth(1).unwrap();

    let cases = [
        (format!("{good}\n{{\"type\":\"session\",\"session_id\":"), "line 5"),
        (format!("{good}{{\"type\":\"spaceship\"}}\n"), "line 4"),
        (format!("not json\n{good}"), "line 1"),
        (format!("{session}\n{good}"), "line 1"),
        (format!("{good}{session}\n"), "line 4"),
        (format!("{good}{good}"), "line 4"),
        (
            format!("{{\"type\":\"header\",\"format\":\"aiecs-storage\",\"version\":99,\"scope\":{{\"kind\":\"all\"}},\"source\":\"x\",\"exported_at\":\"2026-01-01T00:00:00Z\"}}\n{good}"),
            "line 1",
        ),
    ];
    for (text, line) in cases {
        let target = MemoryBackend::new();
        let err = import(
            &target,
            Cursor::new(text.as_bytes()),
            &TransferOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, StorageError::Serialization { .. }), "{err}");
        assert!(err.to_string().contains(line), "{err} should name {line}");
        assert_empty(&target, line).await;
    }
    // No export at all.
    for text in ["", "\n\n"] {
        let err = import(
            &MemoryBackend::new(),
            Cursor::new(text.as_bytes()),
            &TransferOptions::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Serialization, "{err}");
        assert!(err.to_string().contains("no header"), "{err}");
    }
    // Invalid UTF-8 too.
    let mut bytes = good.clone().into_bytes();
    bytes.extend_from_slice(b"\xff\xfe\n");
    let err = import(
        &MemoryBackend::new(),
        Cursor::new(bytes),
        &TransferOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Serialization);
    assert!(err.to_string().contains("line 4"), "{err}");

    // Messages of a session the file never creates: refused by order, not a panic.
    let header: serde_json::Value = serde_json::from_str(good.lines().next().unwrap()).unwrap();
    let orphan = json!({"type": "messages", "session_id": "ghost", "offset": 0, "messages": [
        {"message_id": "m", "role": "user", "content": "x",
         "timestamp": "2026-01-01T00:00:00Z", "metadata": {}}
    ]});
    let err = import(
        &MemoryBackend::new(),
        Cursor::new(sealed(&[header, orphan])),
        &TransferOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Serialization, "{err}");
    assert!(err.to_string().contains("line 2:"), "{err}");
    assert!(
        err.to_string().contains("before its session record"),
        "{err}"
    );

    // A bad batch size is InvalidInput.
    let err = import(
        &MemoryBackend::new(),
        Cursor::new(good.as_bytes()),
        &TransferOptions {
            batch_size: 0,
            ..TransferOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

/// An export of a small store as one JSON value per line: session `s1` with two
/// messages and a task context, thread `t1` with checkpoint `c1` and two writes of
/// task `a`.
async fn small_export() -> Vec<serde_json::Value> {
    let source = MemoryBackend::new();
    source
        .create_session("s1", "u", &Metadata::new())
        .await
        .unwrap();
    for text in ["hello", "world"] {
        source
            .add_conversation_message("s1", &NewMessage::new("user", text))
            .await
            .unwrap();
    }
    source
        .store_task_context("s1", &json!({"step": 1}))
        .await
        .unwrap();
    source
        .store_checkpoint(&NewCheckpoint::new("t1", "c1", json!({"v": 1})))
        .await
        .unwrap();
    source
        .put_writes(
            "t1",
            "",
            "c1",
            "a",
            &[
                WriteInput::new("x", json!(1)),
                WriteInput::new("y", json!(2)),
            ],
        )
        .await
        .unwrap();
    let mut lines = Vec::new();
    export(
        &source,
        &Scope::All,
        &mut lines,
        &TransferOptions::default(),
    )
    .await
    .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(lines)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        &kinds[..6],
        [
            "header",
            "session",
            "messages",
            "task_context",
            "checkpoints",
            "writes"
        ]
    );
    lines
}

/// 64-bit FNV-1a, written here from its definition rather than taken from the crate.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The lines as an export file with a trailer that matches them, as a careful hand
/// edit leaves it (a trailer among `lines` is dropped first).
fn sealed(lines: &[serde_json::Value]) -> String {
    let mut text = String::new();
    let mut trailer = json!({
        "type": "trailer", "lines": 0, "records": 0, "sessions": 0, "messages": 0,
        "task_contexts": 0, "checkpoints": 0, "writes": 0,
        "checksum_algorithm": "fnv1a-64",
    });
    let mut bump = |key: &str, n: usize| {
        let v = trailer[key].as_u64().unwrap() + n as u64;
        trailer[key] = json!(v);
    };
    for l in lines.iter().filter(|l| l["type"] != "trailer") {
        text.push_str(&format!("{l}\n"));
        bump("lines", 1);
        let (key, n) = match l["type"].as_str().unwrap() {
            "session" => ("sessions", 1),
            "task_context" => ("task_contexts", 1),
            "messages" => ("messages", l["messages"].as_array().unwrap().len()),
            "checkpoints" => ("checkpoints", l["checkpoints"].as_array().unwrap().len()),
            "writes" => ("writes", l["writes"].as_array().unwrap().len()),
            _ => continue,
        };
        bump(key, n);
        bump("records", n);
    }
    trailer["checksum"] = json!(format!("{:016x}", fnv1a(text.as_bytes())));
    format!("{text}{trailer}\n")
}

/// Asserts that `target` holds nothing at all.
async fn assert_empty(target: &dyn StorageBackend, why: &str) {
    let all = SessionQuery::new().limit(100);
    assert!(
        target
            .list_sessions(&all)
            .await
            .unwrap()
            .sessions
            .is_empty(),
        "{why}: sessions were written"
    );
    assert!(
        target
            .list_task_contexts(None, 100)
            .await
            .unwrap()
            .ids
            .is_empty(),
        "{why}: task contexts were written"
    );
    assert!(
        target.list_threads(None, 100).await.unwrap().ids.is_empty(),
        "{why}: threads were written"
    );
}

/// An export cut at any line boundary (a killed export, a short copy) is refused as
/// truncated, naming the last line read, and nothing of it is written.
#[tokio::test]
async fn a_truncated_export_is_refused_naming_the_last_line_and_writes_nothing() {
    let source = MemoryBackend::new();
    session_with_messages(&source, "s1", 250).await;
    source
        .store_task_context("s1", &json!({"k": 1}))
        .await
        .unwrap();
    source
        .store_checkpoint(&NewCheckpoint::new("t1", "c1", json!(1)))
        .await
        .unwrap();
    let text = export_text(&source, 10).await;
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 25, "{} lines", lines.len());
    for keep in 1..lines.len() {
        let cut: String = lines[..keep].iter().map(|l| format!("{l}\n")).collect();
        let target = MemoryBackend::new();
        let err = import(
            &target,
            std::io::Cursor::new(cut.as_bytes()),
            &TransferOptions::default(),
        )
        .await
        .expect_err(&format!("an export cut after line {keep} was imported"));
        assert_eq!(err.kind(), ErrorKind::Serialization, "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("line {keep}")), "{msg}");
        assert!(msg.contains("truncated"), "{msg}");
        assert_empty(&target, &format!("cut after line {keep}")).await;
    }
}

/// Two message lines of one session swapped, or one of them removed, put the history
/// out of order: refused naming the line whose `offset` does not follow, nothing written.
#[tokio::test]
async fn reordered_or_missing_message_lines_are_refused_naming_the_line() {
    let source = MemoryBackend::new();
    session_with_messages(&source, "s1", 50).await;
    let text = export_text(&source, 10).await;
    let lines: Vec<&str> = text.lines().collect();
    // Lines 3 and 4 (1-based) hold the first two pieces of the history (the session
    // record takes one item of the first batch, so the first piece holds 9).
    assert!(lines[2].contains("\"offset\":0,"), "{}", lines[2]);
    assert!(lines[3].contains("\"offset\":9,"), "{}", lines[3]);

    let mut swapped = lines.clone();
    swapped.swap(2, 3);
    let mut removed = lines.clone();
    removed.remove(3);
    for (what, edited) in [("swapped", swapped), ("removed", removed)] {
        let file: String = edited.iter().map(|l| format!("{l}\n")).collect();
        let target = MemoryBackend::new();
        let err = import(
            &target,
            std::io::Cursor::new(file.as_bytes()),
            &TransferOptions::default(),
        )
        .await
        .expect_err(&format!("{what} lines were imported"));
        assert_eq!(err.kind(), ErrorKind::Serialization, "{what}: {err}");
        let msg = err.to_string();
        let line = if what == "swapped" { 3 } else { 4 };
        assert!(msg.contains(&format!("line {line}:")), "{what}: {msg}");
        assert!(msg.contains("offset"), "{what}: {msg}");
        assert_empty(&target, what).await;
    }
}

/// A line changed after export (here one message's content) no longer matches the
/// checksum in the trailer: refused, nothing written.
#[tokio::test]
async fn an_export_changed_after_writing_is_refused_by_its_checksum() {
    let lines = small_export().await;
    let mut file = sealed(&lines);
    assert!(file.contains("\"hello\""));
    file = file.replacen("\"hello\"", "\"jello\"", 1);
    let target = MemoryBackend::new();
    let err = import(
        &target,
        std::io::Cursor::new(file.as_bytes()),
        &TransferOptions::default(),
    )
    .await
    .expect_err("an edited export was imported");
    assert_eq!(err.kind(), ErrorKind::Serialization, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("checksum"), "{msg}");
    assert!(msg.contains(&format!("line {}:", lines.len())), "{msg}");
    assert_empty(&target, "edited").await;
}

/// A record that parses but breaks an input rule (an over-long id, an empty role, a
/// negative counter, a checkpoint of another thread, a gap in write indexes) is
/// `InvalidInput` naming the field and the line, and nothing is written.
#[tokio::test]
async fn validation_errors_of_an_import_name_the_line() {
    let lines = small_export().await;
    let long = "x".repeat(300);
    let cases: Vec<(usize, &str, serde_json::Value, &str)> = vec![
        (2, "/session_id", json!(long), "session_id"),
        (2, "/status", json!(""), "status"),
        (
            2,
            "/metrics/total_processing_time",
            json!(-1.0),
            "total_processing_time",
        ),
        (3, "/messages/1/role", json!(""), "role"),
        (3, "/messages/0/content", json!("nul \u{0} byte"), "content"),
        (4, "/session_id", json!(""), "session_id"),
        (5, "/checkpoints/0/thread_id", json!("t2"), "checkpoints"),
        (
            5,
            "/checkpoints/0/checkpoint_id",
            json!(long),
            "checkpoint_id",
        ),
        (6, "/writes/0/idx", json!(5), "writes"),
        (6, "/writes/1/channel", json!("bad\nchannel"), "channel"),
    ];
    for (line, pointer, value, field) in cases {
        let mut edited = lines.clone();
        *edited[line - 1].pointer_mut(pointer).unwrap() = value;
        let target = MemoryBackend::new();
        let err = import(
            &target,
            std::io::Cursor::new(sealed(&edited).into_bytes()),
            &TransferOptions::default(),
        )
        .await
        .expect_err(&format!("line {line} {pointer} was imported"));
        match &err {
            StorageError::InvalidInput { field: f, .. } => {
                assert_eq!(*f, field, "line {line} {pointer}: {err}")
            }
            other => panic!("line {line} {pointer}: expected InvalidInput, got {other}"),
        }
        assert!(
            err.to_string().contains(&format!("line {line}:")),
            "line {line} {pointer}: {err}"
        );
        assert_empty(&target, &format!("line {line} {pointer}")).await;
    }
}

/// Timestamps finer than a microsecond, and leap seconds (`23:59:60`), are stored as the
/// microsecond the SQL backends keep, so every backend holds the same value.
#[tokio::test]
async fn imported_timestamps_are_kept_to_the_microsecond_on_every_backend() {
    let mut lines = small_export().await;
    let set = |lines: &mut Vec<serde_json::Value>, line: usize, pointer: &str, v: &str| {
        *lines[line - 1].pointer_mut(pointer).unwrap() = json!(v);
    };
    set(
        &mut lines,
        2,
        "/created_at",
        "2026-01-01T00:00:00.123456789Z",
    );
    set(&mut lines, 2, "/updated_at", "2026-12-31T23:59:60Z");
    set(
        &mut lines,
        3,
        "/messages/0/timestamp",
        "2026-06-30T23:59:60.5Z",
    );
    set(
        &mut lines,
        3,
        "/messages/1/timestamp",
        "2026-07-01T00:00:00.000000999Z",
    );
    set(
        &mut lines,
        5,
        "/checkpoints/0/created_at",
        "2026-03-01T12:00:00.999999999Z",
    );
    let file = sealed(&lines);
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let expected = (
        at("2026-01-01T00:00:00.123456Z"),
        at("2027-01-01T00:00:00Z"),
        vec![at("2026-07-01T00:00:00.5Z"), at("2026-07-01T00:00:00Z")],
        at("2026-03-01T12:00:00.999999Z"),
    );

    let mut backends: Vec<(&str, Box<dyn StorageBackend>)> = vec![
        ("memory", Box::new(MemoryBackend::new())),
        ("sqlite", Box::new(SqliteBackend::in_memory())),
    ];
    #[cfg(feature = "postgres")]
    let mut schema = None;
    #[cfg(feature = "postgres")]
    if let Some(url) = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres") {
        let name = common::unique_name("timestamps");
        let pg = aiecs_storage::PostgresBackend::new(&url)
            .unwrap()
            .with_schema(name.as_str())
            .unwrap();
        backends.push(("postgres", Box::new(pg)));
        schema = Some((url, name));
    }
    for (kind, backend) in &mut backends {
        import(
            backend.as_ref(),
            std::io::Cursor::new(file.as_bytes()),
            &TransferOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let s = backend.get_session("s1").await.unwrap().unwrap();
        let history = backend.get_conversation_range("s1", 0, 10).await.unwrap();
        let c = backend.get_checkpoint("t1", "", Some("c1")).await.unwrap();
        let got = (
            s.created_at,
            s.updated_at,
            history.iter().map(|m| m.timestamp).collect::<Vec<_>>(),
            c.unwrap().created_at,
        );
        assert_eq!(got, expected, "{kind}");
        backend.close().await.unwrap();
    }
    #[cfg(feature = "postgres")]
    if let Some((url, name)) = schema {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
            .await
            .unwrap();
        drop(client);
        let _ = driver.await;
    }
}

/// An export ends with a trailer holding its counts and the FNV-1a 64 of the lines
/// before it; CRLF line ends, blank lines and a missing last newline do not matter.
#[tokio::test]
async fn an_export_ends_with_a_trailer_of_its_counts_and_checksum() {
    let lines = small_export().await;
    // Re-encoding may reorder keys, so the file is sealed again as it now reads.
    let text = sealed(&lines);
    let trailer = lines.last().unwrap();
    assert_eq!(trailer["type"], "trailer");
    assert_eq!(lines[0]["version"], json!(FORMAT_VERSION));
    assert_eq!(FORMAT_VERSION, 2);
    let expected = json!({
        "type": "trailer", "lines": 6, "records": 7, "sessions": 1, "messages": 2,
        "task_contexts": 1, "checkpoints": 1, "writes": 2,
        "checksum_algorithm": "fnv1a-64",
        "checksum": trailer["checksum"],
    });
    assert_eq!(trailer, &expected);
    // The checksum covers the bytes before the trailer, as exported (not re-encoded).
    let mut raw = Vec::new();
    let source = MemoryBackend::new();
    source
        .create_session("s1", "u", &Metadata::new())
        .await
        .unwrap();
    export(&source, &Scope::All, &mut raw, &TransferOptions::default())
        .await
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let cut = raw.trim_end_matches('\n').rfind('\n').unwrap() + 1;
    let last: serde_json::Value = serde_json::from_str(&raw[cut..]).unwrap();
    assert_eq!(
        last["checksum"],
        json!(format!("{:016x}", fnv1a(&raw.as_bytes()[..cut])))
    );

    let summary = check_export(Cursor::new(text.as_bytes()), &TransferOptions::default()).unwrap();
    assert_eq!(summary.header.version, FORMAT_VERSION);
    assert_eq!(
        (
            summary.counts.records,
            summary.counts.messages,
            summary.counts.writes
        ),
        (7, 2, 2)
    );
    let crlf = format!("\r\n{}", text.replace('\n', "\r\n\r\n"));
    for (what, file) in [
        ("as written", text.clone()),
        ("CRLF and blank lines", crlf),
        ("no last newline", text.trim_end().to_owned()),
    ] {
        let target = SqliteBackend::in_memory();
        let counts = import(
            &target,
            Cursor::new(file.as_bytes()),
            &TransferOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(counts.records, 7, "{what}");
        assert_eq!(target.get_writes("t1", "", "c1").await.unwrap().len(), 2);
    }
}

/// A trailer whose counts disagree with the lines before it (its checksum still
/// right) is refused naming the trailer's line and the count.
#[tokio::test]
async fn a_trailer_whose_counts_disagree_is_refused() {
    let lines = small_export().await;
    let n = lines.len();
    let file = sealed(&lines);
    let (body, last) = file.trim_end().rsplit_once('\n').unwrap();
    let trailer: serde_json::Value = serde_json::from_str(last).unwrap();
    let with_trailer = |t: &serde_json::Value| format!("{body}\n{t}\n");
    import(
        &MemoryBackend::new(),
        Cursor::new(with_trailer(&trailer)),
        &TransferOptions::default(),
    )
    .await
    .unwrap();
    for (key, what) in [
        ("messages", "messages"),
        ("lines", "lines"),
        ("writes", "pending writes"),
    ] {
        let mut edited = trailer.clone();
        let v = edited[key].as_u64().unwrap();
        edited[key] = json!(v + 1);
        let file = with_trailer(&edited);
        let target = MemoryBackend::new();
        let err = import(
            &target,
            Cursor::new(file.as_bytes()),
            &TransferOptions::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Serialization, "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("line {n}:")), "{msg}");
        assert!(msg.contains(&format!("{} {what}", v + 1)), "{msg}");
        assert_empty(&target, key).await;
    }
    let mut edited = trailer.clone();
    edited["checksum_algorithm"] = json!("md5");
    let file = with_trailer(&edited);
    let err = import(
        &MemoryBackend::new(),
        Cursor::new(file.as_bytes()),
        &TransferOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("md5"), "{err}");
}

/// A version 1 export (no trailer) is refused unless `accept_v1` vouches for it; then
/// it imports, its order still checked. A version 2 export must keep its trailer even
/// with `accept_v1`.
#[tokio::test]
async fn version_1_exports_are_imported_only_with_accept_v1() {
    let mut lines = small_export().await;
    let v2: String = lines.iter().map(|l| format!("{l}\n")).collect();
    lines.pop();
    lines[0]["version"] = json!(1);
    let v1: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let target = MemoryBackend::new();
    let err = import(
        &target,
        Cursor::new(v1.as_bytes()),
        &TransferOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Serialization, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("line 1:") && msg.contains("version 1"),
        "{msg}"
    );
    assert!(msg.contains("accept_v1"), "{msg}");
    assert_empty(&target, "v1 refused").await;

    let accept = TransferOptions {
        accept_v1: true,
        ..TransferOptions::default()
    };
    let counts = import(&target, Cursor::new(v1.as_bytes()), &accept)
        .await
        .unwrap();
    assert_eq!(counts.records, 7);
    assert_eq!(
        target
            .get_conversation_range("s1", 0, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    // Order is still checked in a version 1 file.
    let mut swapped = lines.clone();
    swapped[2]["offset"] = json!(5);
    let file: String = swapped.iter().map(|l| format!("{l}\n")).collect();
    let err = import(&MemoryBackend::new(), Cursor::new(file.as_bytes()), &accept)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("line 3:"), "{err}");
    // A version 2 file cut short is truncated, accept_v1 or not.
    let cut: String = v2.lines().take(6).map(|l| format!("{l}\n")).collect();
    let err = import(&MemoryBackend::new(), Cursor::new(cut.as_bytes()), &accept)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

/// `import_stream` reads once and applies as it goes: a file found truncated at its
/// end is reported as an incomplete import saying how much was applied.
#[tokio::test]
async fn a_one_pass_import_of_a_truncated_file_says_it_is_incomplete() {
    let source = MemoryBackend::new();
    for s in 0..5 {
        session_with_messages(&source, &format!("s{s}"), 20).await;
    }
    let options = TransferOptions {
        batch_size: 10,
        ..TransferOptions::default()
    };
    let text = export_text(&source, options.batch_size).await;
    let lines: Vec<&str> = text.lines().collect();
    let keep = lines.len() - 1;
    let cut: String = lines[..keep].iter().map(|l| format!("{l}\n")).collect();

    let target = MemoryBackend::new();
    let err = import_stream(&target, cut.as_bytes(), &options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Serialization, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("line {keep}:")), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
    assert!(msg.contains("incomplete"), "{msg}");
    let stored = target
        .list_sessions(&SessionQuery::new().limit(100))
        .await
        .unwrap()
        .sessions
        .len();
    assert!(stored > 0, "nothing was applied before the end");
    // The whole file, in one pass, imports whole.
    let counts = import_stream(&target, text.as_bytes(), &options)
        .await
        .unwrap();
    assert_eq!(counts.messages, 100);
    assert!(verify(&source, &target).await.unwrap().is_clean());
}

#[tokio::test]
async fn source_batches_hold_at_most_batch_size_items_and_mark_positions() {
    let source = MemoryBackend::new();
    populate(&source).await;
    let mut walk = Source::new(&source, Scope::All, 40).unwrap();
    let mut last_position = None;
    let mut total = 0;
    while let Some(batch) = walk.next_batch().await.unwrap() {
        // Only a checkpoint's writes, kept whole, may go past the batch size.
        let last = batch.records.last().map_or(0, Record::items);
        assert!(batch.items() - last < 40, "{} items", batch.items());
        if batch.items() > 40 {
            assert!(matches!(batch.records.last(), Some(Record::Writes { .. })));
        }
        total += batch.items();
        if batch.completed.is_some() {
            last_position = batch.completed;
        }
    }
    assert_eq!(total, total_items());
    assert_eq!(
        last_position.unwrap().phase,
        aiecs_storage::ops::transfer::Phase::Done
    );
}

#[test]
fn the_futures_are_send() {
    fn send<T: Send>(_: T) {}
    let a = MemoryBackend::new();
    let b = MemoryBackend::new();
    send(async {
        let mut m = Migrator::new(&a, &b).on_progress(|_| {});
        m.run().await
    });
    send(verify(&a, &b));
    send(export(
        &a,
        &Scope::All,
        Vec::new(),
        &TransferOptions::default(),
    ));
    send(import(&a, Cursor::new(b""), &TransferOptions::default()));
    send(import_stream(&a, &b""[..], &TransferOptions::default()));
}

/// memory -> server backend -> SQLite: verify clean at each hop. Skipped without a server
/// (see `common::server_url`).
#[cfg(any(feature = "redis", feature = "postgres"))]
async fn round_trip_through(server: &dyn StorageBackend) {
    let source = MemoryBackend::new();
    populate(&source).await;
    Migrator::new(&source, server)
        .batch_size(37)
        .run()
        .await
        .unwrap();
    let v = verify(&source, server).await.unwrap();
    assert!(v.is_clean(), "{:#?}", v.differences);
    assert_same(&source, server).await;
    let back = SqliteBackend::in_memory();
    let mut lines = Vec::new();
    export(server, &Scope::All, &mut lines, &TransferOptions::default())
        .await
        .unwrap();
    import(&back, Cursor::new(&lines), &TransferOptions::default())
        .await
        .unwrap();
    assert!(verify(&source, &back).await.unwrap().is_clean());
    assert_same(&source, &back).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn migrate_through_redis() {
    let Some(url) = common::server_url("AIECS_TEST_REDIS_URL", "redis") else {
        return;
    };
    let ttl = Some(std::time::Duration::from_secs(3600));
    let server = aiecs_storage::RedisBackend::new(&url)
        .unwrap()
        .with_prefix(format!("{}:", common::unique_name("migrate")))
        .with_session_ttl(ttl)
        .with_checkpoint_ttl(ttl);
    round_trip_through(&server).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn migrate_through_postgres() {
    let Some(url) = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres") else {
        return;
    };
    let schema = common::unique_name("migrate");
    let server = aiecs_storage::PostgresBackend::new(&url)
        .unwrap()
        .with_schema(schema.as_str())
        .unwrap();
    round_trip_through(&server).await;
    server.close().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
}

/// A source `failover(primary -> fallback)` whose fallback holds only `fallback_sessions`
/// of the sessions (no messages), so an answer served by the fallback is visibly short.
async fn failover_source(
    sessions: usize,
    messages: usize,
    fallback_sessions: usize,
) -> (Arc<dyn StorageBackend>, Faults) {
    use aiecs_storage::layer::FailoverLayer;
    use tower::Layer;
    let primary = MemoryBackend::new();
    let fallback = MemoryBackend::new();
    for i in 0..sessions {
        let id = format!("s{i:03}");
        primary
            .create_session(&id, "u", &Metadata::new())
            .await
            .unwrap();
        if i < fallback_sessions {
            fallback
                .create_session(&id, "u", &Metadata::new())
                .await
                .unwrap();
        }
        for m in 0..messages {
            primary
                .add_conversation_message(&id, &NewMessage::new("user", format!("m{m}")))
                .await
                .unwrap();
        }
    }
    let (p, faults) = Faults::wrap(primary);
    let source: Arc<dyn StorageBackend> = Arc::new(FailoverLayer::new(Arc::new(fallback)).layer(p));
    (source, faults)
}

/// A run during which the source's fallback answered a read reports that, not success.
fn assert_fallback_error<T: std::fmt::Debug>(result: aiecs_storage::Result<T>) {
    let err = result.expect_err("a copy read partly from the fallback reported as complete");
    assert!(err.to_string().contains("failover fallback"), "{err}");
}

/// Runs a migration that makes the primary fail one `op` after the first batch, and
/// checks that it either fails or copies everything, never "succeeds" short.
async fn migrate_with_one_failed_read(
    source: &dyn StorageBackend,
    faults: &Faults,
    op: Operation,
) -> (
    aiecs_storage::Result<aiecs_storage::ops::migrate::MigrationReport>,
    MemoryBackend,
) {
    let target = MemoryBackend::new();
    let mut armed = false;
    let faults = faults.clone();
    let result = Migrator::new(source, &target)
        .batch_size(100)
        .on_progress(move |_| {
            if !armed {
                armed = true;
                faults.fail_next(Target::Op(op), 1, ErrorKind::Connection);
            }
        })
        .run()
        .await;
    (result, target)
}

#[tokio::test]
async fn one_failed_history_read_under_failover_does_not_end_the_history() {
    let (source, faults) = failover_source(1, 300, 1).await;
    let (result, target) =
        migrate_with_one_failed_read(&*source, &faults, Operation::GetConversationRange).await;
    assert_eq!(faults.injected(), 1, "the fault must have been hit");
    let copied = target
        .get_conversation_range("s000", 0, 1000)
        .await
        .unwrap();
    // The walk reads on past the short page, and still does not call the copy
    // complete: the fallback answered a read.
    assert_fallback_error(result);
    assert_eq!(copied.len(), 300, "{} of 300 messages copied", copied.len());
    let history = source
        .get_conversation_range("s000", 0, 1000)
        .await
        .unwrap();
    assert_eq!(history.len(), 300);
}

#[tokio::test]
async fn one_failed_session_listing_under_failover_does_not_end_the_listing() {
    let (source, faults) = failover_source(250, 0, 100).await;
    let (result, target) =
        migrate_with_one_failed_read(&*source, &faults, Operation::ListSessions).await;
    assert_eq!(faults.injected(), 1, "the fault must have been hit");
    let page = target
        .list_sessions(&SessionQuery {
            limit: 1000,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_fallback_error(result);
    assert_eq!(
        page.sessions.len(),
        250,
        "{} of 250 sessions copied",
        page.sessions.len()
    );
}

#[tokio::test]
async fn a_task_holding_more_than_one_call_allows_is_copied_in_pieces() {
    let source = MemoryBackend::new();
    let big = |c: char| json!(c.to_string().repeat(9 * 1024 * 1024));
    // A long call then a shorter one: the task ends up holding both large values, more
    // than one put_writes call may carry.
    source
        .put_writes(
            "t1",
            "",
            "c1",
            "task",
            &[
                WriteInput::new("a", json!(1)),
                WriteInput::new("b", json!(2)),
                WriteInput::new("c", big('x')),
            ],
        )
        .await
        .unwrap();
    source
        .put_writes("t1", "", "c1", "task", &[WriteInput::new("d", big('y'))])
        .await
        .unwrap();
    for t in ["t1", "t2"] {
        source
            .store_checkpoint(&NewCheckpoint::new(t, "c1", json!({})))
            .await
            .unwrap();
    }
    source
        .put_writes("t2", "", "c1", "task", &[WriteInput::new("e", json!(3))])
        .await
        .unwrap();

    let target = SqliteBackend::in_memory();
    let report = Migrator::new(&source, &target).run().await;
    let report = report.expect("what the source accepted is copied");
    assert_eq!(report.copied.writes, 4);
    for t in ["t1", "t2"] {
        assert_eq!(
            target.get_writes(t, "", "c1").await.unwrap(),
            source.get_writes(t, "", "c1").await.unwrap(),
            "writes of {t}"
        );
    }
    assert!(verify(&source, &target).await.unwrap().is_clean());
}

#[tokio::test]
async fn one_failed_checkpoint_listing_under_failover_does_not_end_the_thread() {
    use aiecs_storage::layer::FailoverLayer;
    use tower::Layer;
    let primary = MemoryBackend::new();
    let fallback = MemoryBackend::new();
    for c in 1..=5 {
        let checkpoint = NewCheckpoint::new("t1", format!("c{c}"), json!({"c": c}));
        primary.store_checkpoint(&checkpoint).await.unwrap();
        // The fallback holds only the newest two, so its answer is a short page.
        if c > 3 {
            fallback.store_checkpoint(&checkpoint).await.unwrap();
        }
    }
    let (p, faults) = Faults::wrap(primary);
    let source = FailoverLayer::new(Arc::new(fallback)).layer(p);
    faults.fail_next(
        Target::Op(Operation::ListCheckpoints),
        1,
        ErrorKind::Connection,
    );
    let target = MemoryBackend::new();
    assert_fallback_error(Migrator::new(&source, &target).run().await);
    assert_eq!(faults.injected(), 1, "the fault must have been hit");
    let copied = target
        .list_checkpoints("t1", "", &CheckpointFilter::default())
        .await
        .unwrap();
    assert_eq!(copied.len(), 5, "checkpoints copied: {copied:?}");
}

#[tokio::test]
async fn writes_of_a_checkpoint_never_stored_are_copied_and_verified() {
    let source = MemoryBackend::new();
    source
        .store_checkpoint(&NewCheckpoint::new("t1", "c1", json!({})))
        .await
        .unwrap();
    // Writes before their checkpoint: allowed by the contract.
    for (thread, checkpoint) in [("t1", "c1"), ("t1", "c2"), ("t2", "c1"), ("t2", "c2")] {
        source
            .put_writes(
                thread,
                "",
                checkpoint,
                "task",
                &[WriteInput::new("ch", json!(1))],
            )
            .await
            .unwrap();
    }
    let target = MemoryBackend::new();
    Migrator::new(&source, &target).run().await.unwrap();
    let copied = target.list_threads(None, 10).await.unwrap().ids;
    assert_eq!(copied, ["t1", "t2"], "threads on the target");
    for (thread, checkpoint) in [("t1", "c1"), ("t1", "c2"), ("t2", "c1"), ("t2", "c2")] {
        assert_eq!(
            target
                .get_writes(thread, "", checkpoint)
                .await
                .unwrap()
                .len(),
            1,
            "writes of {thread}/{checkpoint}"
        );
    }
    let mut lines = Vec::new();
    export(
        &source,
        &Scope::All,
        &mut lines,
        &TransferOptions::default(),
    )
    .await
    .unwrap();
    let imported = MemoryBackend::new();
    import(&imported, Cursor::new(&lines), &TransferOptions::default())
        .await
        .unwrap();
    assert!(verify(&source, &imported).await.unwrap().is_clean());
    for (thread, checkpoint) in [("t1", "c1"), ("t1", "c2"), ("t2", "c1"), ("t2", "c2")] {
        assert_eq!(
            imported
                .get_writes(thread, "", checkpoint)
                .await
                .unwrap()
                .len(),
            1,
            "imported writes of {thread}/{checkpoint}"
        );
    }
    let partial = MemoryBackend::new();
    partial
        .put_writes("t1", "", "c1", "task", &[WriteInput::new("ch", json!(1))])
        .await
        .unwrap();
    assert!(!verify(&source, &partial).await.unwrap().is_clean());
}

/// Runs a migration that fails after `batches` batches, leaving its state file behind.
async fn fail_midway(
    source: &dyn StorageBackend,
    target: Arc<dyn StorageBackend>,
    state: &std::path::Path,
) {
    let (target, faults) = Faults::wrap(target);
    let batches = Arc::new(AtomicU64::new(0));
    let (count, steer) = (batches.clone(), faults.clone());
    Migrator::new(source, &target)
        .batch_size(50)
        .state_file(state)
        .on_progress(move |_| {
            if count.fetch_add(1, Ordering::SeqCst) + 1 == 5 {
                steer.fail_next(
                    Target::Op(Operation::RestoreMessages),
                    1,
                    ErrorKind::Connection,
                );
            }
        })
        .run()
        .await
        .unwrap_err();
    assert!(read_state(state).unwrap().is_some());
}

#[tokio::test]
async fn a_state_file_of_another_pair_of_stores_is_refused() {
    let dir = tempfile::TempDir::new().unwrap();
    let state = dir.path().join("state.json");
    let (a, b) = (MemoryBackend::new(), Arc::new(MemoryBackend::new()));
    populate(&a).await;
    fail_midway(&a, b.clone(), &state).await;
    let saved = std::fs::read(&state).unwrap();

    // Another kind of source (the review's case: SQLite -> memory resumed a memory ->
    // memory run and skipped the sessions before its position).
    let sqlite = SqliteBackend::in_memory();
    populate(&sqlite).await;
    let err = Migrator::new(&sqlite, &b)
        .state_file(&state)
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("state_file"), "{err}");
    // The same kinds, other stores: a fresh target, a fresh source.
    let other = MemoryBackend::new();
    for (source, target) in [(&a, &other), (&other, &*b)] {
        let err = Migrator::new(source, target)
            .state_file(&state)
            .run()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
    assert_eq!(
        std::fs::read(&state).unwrap(),
        saved,
        "a refused file is left alone"
    );
    assert_eq!(
        other
            .list_sessions(&SessionQuery::new())
            .await
            .unwrap()
            .sessions
            .len(),
        0
    );

    // Its own pair resumes it and copies everything.
    let resumed = Migrator::new(&a, &b)
        .state_file(&state)
        .run()
        .await
        .unwrap();
    assert!(resumed.resumed_from.is_some());
    assert!(verify(&a, &b).await.unwrap().is_clean());

    // A file from before the binding (version 1) cannot say which pair it belongs to.
    let mut old: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    old["version"] = json!(1);
    old.as_object_mut().unwrap().remove("source_store");
    old.as_object_mut().unwrap().remove("target_store");
    std::fs::write(&state, serde_json::to_vec(&old).unwrap()).unwrap();
    let err = Migrator::new(&a, &*b)
        .state_file(&state)
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

#[cfg(unix)]
#[tokio::test]
async fn the_state_file_is_private_and_never_written_through_a_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::TempDir::new().unwrap();
    let state = dir.path().join("state.json");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("state.json.tmp")).unwrap();
    let a = MemoryBackend::new();
    populate(&a).await;
    fail_midway(&a, Arc::new(MemoryBackend::new()), &state).await;
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "state file mode {mode:o}");
}

#[tokio::test]
async fn store_ids_name_the_store_not_the_handle() {
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("a.db");
    let one = SqliteBackend::new(&file);
    let two = SqliteBackend::new(dir.path().join("x/../a.db"));
    std::fs::create_dir(dir.path().join("x")).unwrap();
    assert!(one.store_id().is_some());
    assert_eq!(one.store_id(), two.store_id());
    assert_ne!(
        one.store_id(),
        SqliteBackend::new(dir.path().join("b.db")).store_id()
    );
    assert_ne!(
        SqliteBackend::in_memory().store_id(),
        SqliteBackend::in_memory().store_id()
    );
    assert_ne!(
        MemoryBackend::new().store_id(),
        MemoryBackend::new().store_id()
    );
    // Layers report their backend's.
    use aiecs_storage::layer::{
        BatchLayer, CacheLayer, FailoverLayer, MetricsLayer, RetryLayer, StackBuilder,
    };
    let stack = StackBuilder::new()
        .layer(MetricsLayer::new())
        .layer(CacheLayer::new())
        .layer(RetryLayer::new())
        .layer(BatchLayer::new())
        .layer(FailoverLayer::new(Arc::new(MemoryBackend::new())))
        .build(Arc::new(SqliteBackend::new(&file)));
    assert_eq!(stack.store_id(), one.store_id());

    #[cfg(feature = "redis")]
    {
        let redis = |url: &str| aiecs_storage::open(url).unwrap().store_id();
        let plain = redis("redis://127.0.0.1:6379/2");
        assert!(plain.is_some());
        assert_eq!(plain, redis("redis://:hunter2@127.0.0.1:6379/2"));
        assert_ne!(plain, redis("redis://127.0.0.1:6379/3"));
        assert_ne!(plain, redis("redis://127.0.0.1:6379/2?prefix=other:"));
        assert!(!redis("redis://:hunter2@127.0.0.1:6379/2")
            .unwrap()
            .contains("hunter2"));
        assert_eq!(
            redis("redis+cluster://127.0.0.1:7001,127.0.0.1:7000"),
            redis("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001")
        );
    }
    #[cfg(feature = "postgres")]
    {
        let pg = |url: &str| aiecs_storage::open(url).unwrap().store_id();
        let plain = pg("postgres://postgres@127.0.0.1:5432/test");
        assert_eq!(plain, pg("postgres://postgres:secret@127.0.0.1/test"));
        assert_ne!(
            plain,
            pg("postgres://postgres@127.0.0.1:5432/test?schema=other")
        );
        assert_ne!(plain, pg("postgres://postgres@127.0.0.1:5432/prod"));
    }
}

/// Reads that return everything at once (no cursor, so no short page to see) answered by
/// a failover's fallback once each: the run must not call an incomplete copy complete.
#[tokio::test]
async fn a_read_answered_by_the_fallback_fails_the_copy_instead_of_shortening_it() {
    use aiecs_storage::layer::FailoverLayer;
    use tower::Layer;
    for op in [
        Operation::GetWrites,
        Operation::ListCheckpointNamespaces,
        Operation::ListWriteCheckpoints,
        Operation::GetTaskContext,
        Operation::GetConversationHistory,
    ] {
        let primary = MemoryBackend::new();
        primary
            .create_session("s1", "u", &Metadata::new())
            .await
            .unwrap();
        primary
            .add_conversation_message("s1", &NewMessage::new("user", "hi"))
            .await
            .unwrap();
        primary
            .store_task_context("s1", &json!({"step": 1}))
            .await
            .unwrap();
        for ns in ["", "sub"] {
            let checkpoint = NewCheckpoint::new("t1", "c1", json!({})).with_namespace(ns);
            primary.store_checkpoint(&checkpoint).await.unwrap();
            primary
                .put_writes("t1", ns, "c1", "task", &[WriteInput::new("ch", json!(1))])
                .await
                .unwrap();
        }
        let (p, faults) = Faults::wrap(primary);
        // The fallback holds nothing: whatever it answers is short.
        let source = FailoverLayer::new(Arc::new(MemoryBackend::new())).layer(p);
        faults.fail_next(Target::Op(op), 1, ErrorKind::Connection);
        let target = MemoryBackend::new();
        let result = Migrator::new(&source, &target).run().await;
        assert_eq!(faults.injected(), 1, "{op:?}: the fault must have been hit");
        let err = result.expect_err(&format!("{op:?}: a short copy reported as complete"));
        assert!(err.to_string().contains("fallback"), "{op:?}: {err}");
        // Run again: the copy completes and verifies clean.
        Migrator::new(&source, &target).run().await.unwrap();
        assert!(verify(&source, &target).await.unwrap().is_clean(), "{op:?}");
        // Nor may an export be called complete.
        faults.fail_next(Target::Op(op), 1, ErrorKind::Connection);
        let mut file = Vec::new();
        let err = export(&source, &Scope::All, &mut file, &TransferOptions::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("export"), "{op:?}: {err}");
        // Nor may verify call two stores equal from a read the fallback answered.
        faults.fail_next(Target::Op(op), 1, ErrorKind::Connection);
        let err = verify(&source, &target).await.unwrap_err();
        assert!(err.to_string().contains("comparison"), "{op:?}: {err}");
    }
}

/// The whole store exported in batches of `batch_size`, as text.
async fn export_text(source: &dyn StorageBackend, batch_size: usize) -> String {
    let mut out = Vec::new();
    let options = TransferOptions {
        batch_size,
        ..TransferOptions::default()
    };
    export(source, &Scope::All, &mut out, &options)
        .await
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// Creates session `id` holding `messages` user messages `m0`, `m1`, ...
async fn session_with_messages(b: &dyn StorageBackend, id: &str, messages: usize) {
    b.create_session(id, "u", &Metadata::new()).await.unwrap();
    for i in 0..messages {
        b.add_conversation_message(id, &NewMessage::new("user", format!("m{i}")))
            .await
            .unwrap();
    }
}
