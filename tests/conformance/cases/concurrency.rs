//! Concurrency: atomic counters and appends under many tasks on one key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::{
    CheckpointFilter, NewCheckpoint, NewMessage, Session, SessionUpdate, StorageBackend,
};
use serde_json::json;

use super::md;

const TASKS: usize = 32;

pub async fn concurrent_updates_lose_no_increment(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let b = b.clone();
        handles.push(tokio::spawn(async move {
            // 0.5 is exact in binary, so the sum is exact in any order.
            let update = SessionUpdate::new()
                .increment_requests()
                .add_processing_time(0.5);
            for i in 0..1000 {
                let mut u = update.clone();
                if i % 100 == 0 {
                    u = u.mark_error().metadata_entry(format!("task{task}"), i);
                }
                assert!(b.update_session("s1", &u).await.unwrap());
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let s = b.get_session("s1").await.unwrap().unwrap();
    assert_eq!(s.metrics.request_count, 32_000);
    assert_eq!(s.metrics.total_processing_time, 16_000.0);
    assert_eq!(s.metrics.error_count, 320);
    // Concurrent metadata merges of different keys lose none of them.
    for task in 0..TASKS {
        assert_eq!(s.metadata[&format!("task{task}")], json!(900), "task{task}");
    }
}

pub async fn concurrent_appends_keep_every_message(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let b = b.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..100 {
                let id = format!("t{task}-{i}");
                let m = NewMessage::new("user", id.clone()).with_id(id.clone());
                assert_eq!(b.add_conversation_message("s1", &m).await.unwrap(), id);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let h = b.get_conversation_history("s1", 10_000).await.unwrap();
    assert_eq!(h.len(), 3200);
    let unique: HashSet<&str> = h.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(unique.len(), 3200);
    // Each task's messages appear in the order that task added them.
    let mut next: HashMap<usize, usize> = HashMap::new();
    for m in &h {
        assert_eq!(m.content, m.message_id);
        let (task, i) = m.message_id[1..].split_once('-').unwrap();
        let (task, i): (usize, usize) = (task.parse().unwrap(), i.parse().unwrap());
        let expected = next.entry(task).or_insert(0);
        assert_eq!(i, *expected, "task {task} out of order");
        *expected += 1;
    }
    assert_eq!(next.len(), TASKS);
    assert!(next.values().all(|&n| n == 100));
}

pub async fn concurrent_checkpoints_keep_store_order(b: Arc<dyn StorageBackend>) {
    const PER_TASK: usize = 25;
    let mut handles = Vec::new();
    for task in 0..16 {
        let b = b.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                let id = format!("t{task}-{i}");
                b.store_checkpoint(&NewCheckpoint::new("th", id, json!([task, i])))
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let listed = b
        .list_checkpoints("th", "", &CheckpointFilter::new().limit(10_000))
        .await
        .unwrap();
    assert_eq!(listed.len(), 16 * PER_TASK);
    let unique: HashSet<&str> = listed.iter().map(|c| c.checkpoint_id.as_str()).collect();
    assert_eq!(unique.len(), listed.len());
    // Newest first, so each task's checkpoints appear in reverse of its store order.
    let mut last_seen: HashMap<u64, u64> = HashMap::new();
    for c in &listed {
        let (task, i) = (c.data[0].as_u64().unwrap(), c.data[1].as_u64().unwrap());
        if let Some(&prev) = last_seen.get(&task) {
            assert_eq!(
                i + 1,
                prev,
                "task {task}: {} listed after t{task}-{prev}",
                c.checkpoint_id
            );
        }
        last_seen.insert(task, i);
    }
    // The latest is the head of the listing: one sequence decides both.
    let latest = b.get_checkpoint("th", "", None).await.unwrap().unwrap();
    assert_eq!(latest, listed[0]);
    assert_eq!(latest.data[1], json!(PER_TASK - 1));
}

/// Cleanup removes a session with its context as one step: a session re-created (and
/// given a new context) while cleanup runs keeps both, whatever the interleaving.
pub async fn cleanup_spares_sessions_recreated_while_it_runs(b: Arc<dyn StorageBackend>) {
    const SESSIONS: usize = 600;
    const WRITERS: usize = 4;
    let idle_since = chrono::Utc::now() - chrono::Duration::hours(2);
    let ids: Vec<String> = (0..SESSIONS).map(|i| format!("r{i:04}")).collect();
    let idle: Vec<Session> = ids
        .iter()
        .map(|id| Session {
            session_id: id.clone(),
            user_id: "u1".into(),
            created_at: idle_since,
            updated_at: idle_since,
            status: "active".into(),
            metadata: md(json!({})),
            metrics: Default::default(),
        })
        .collect();
    for chunk in idle.chunks(100) {
        b.restore_sessions(chunk).await.unwrap();
    }
    for id in &ids {
        b.store_task_context(id, &json!({"old": id})).await.unwrap();
    }

    let cleanup = {
        let b = b.clone();
        tokio::spawn(async move { b.cleanup_expired_sessions(Duration::from_secs(3600)).await })
    };
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let b = b.clone();
        let mine: Vec<String> = ids.iter().skip(w).step_by(WRITERS).cloned().collect();
        writers.push(tokio::spawn(async move {
            for id in mine {
                b.create_session(&id, "u2", &md(json!({}))).await.unwrap();
                b.store_task_context(&id, &json!({"new": id}))
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let removed = cleanup.await.unwrap().unwrap();
    assert!(removed <= SESSIONS as u64);

    let mut lost = Vec::new();
    for id in &ids {
        let session = b.get_session(id).await.unwrap();
        assert_eq!(
            session.map(|s| s.user_id),
            Some("u2".into()),
            "session {id}"
        );
        if b.get_task_context(id).await.unwrap() != Some(json!({"new": id})) {
            lost.push(id.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {SESSIONS} re-created sessions lost their new context (cleanup removed {removed}): {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}
