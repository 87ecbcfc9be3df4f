//! Bad input: every backend rejects the same values with `InvalidInput` naming the
//! field, and stores nothing.

use std::sync::Arc;

use aiecs_storage::validate::{MAX_CONTENT_BYTES, MAX_ID_BYTES, MAX_LIMIT, MAX_METADATA_BYTES};
use aiecs_storage::{
    CheckpointFilter, NewCheckpoint, NewMessage, NewSession, SessionMetrics, SessionQuery,
    SessionUpdate, StorageBackend, StorageError, WriteInput,
};
use serde_json::json;

use super::{assert_invalid, md, nested_metadata};

pub async fn empty_session_id_is_rejected(b: Arc<dyn StorageBackend>) {
    let empty = md(json!({}));
    assert_invalid(b.create_session("", "u1", &empty).await, "session_id");
    assert_invalid(b.get_session("").await, "session_id");
    assert_invalid(
        b.update_session("", &SessionUpdate::new()).await,
        "session_id",
    );
    assert_invalid(b.end_session("", "completed").await, "session_id");
    assert_invalid(
        b.add_conversation_message("", &NewMessage::new("user", "x"))
            .await,
        "session_id",
    );
    assert_invalid(b.get_conversation_history("", 10).await, "session_id");
    assert_invalid(b.get_task_context("").await, "session_id");
    assert_invalid(b.store_task_context("", &json!(1)).await, "session_id");
    assert_invalid(b.create_session("s1", "", &empty).await, "user_id");
    assert_eq!(b.get_session("s1").await.unwrap(), None);
    assert!(b
        .list_sessions(&SessionQuery::new())
        .await
        .unwrap()
        .sessions
        .is_empty());
}

pub async fn over_long_session_id_is_rejected(b: Arc<dyn StorageBackend>) {
    let at_limit = "s".repeat(MAX_ID_BYTES);
    let over = "s".repeat(MAX_ID_BYTES + 1);
    // 129 two-byte chars: under 256 chars but over 256 bytes; the limit counts bytes.
    let over_multibyte = "é".repeat(MAX_ID_BYTES / 2 + 1);
    let empty = md(json!({}));

    b.create_session(&at_limit, "u1", &empty).await.unwrap();
    assert!(b.get_session(&at_limit).await.unwrap().is_some());

    assert_invalid(b.create_session(&over, "u1", &empty).await, "session_id");
    assert_invalid(
        b.create_session(&over_multibyte, "u1", &empty).await,
        "session_id",
    );
    assert_invalid(b.get_session(&over).await, "session_id");
    assert_invalid(b.store_task_context(&over, &json!(1)).await, "session_id");
    // Nothing stored under a truncated id either.
    let page = b.list_sessions(&SessionQuery::new()).await.unwrap();
    assert_eq!(page.sessions.len(), 1);
    assert_eq!(page.sessions[0].session_id, at_limit);
}

pub async fn nul_in_session_id_is_rejected(b: Arc<dyn StorageBackend>) {
    let empty = md(json!({}));
    assert_invalid(b.create_session("a\0b", "u1", &empty).await, "session_id");
    assert_invalid(b.get_session("a\0b").await, "session_id");
    assert_invalid(b.create_session("a\nb", "u1", &empty).await, "session_id");
    assert_invalid(b.create_session("s1", "u\0x", &empty).await, "user_id");
    // Nothing stored, not even under the id cut at the NUL.
    assert_eq!(b.get_session("a").await.unwrap(), None);
    assert_eq!(b.get_session("s1").await.unwrap(), None);
    assert!(b
        .list_sessions(&SessionQuery::new())
        .await
        .unwrap()
        .sessions
        .is_empty());
}

pub async fn history_limit_zero_is_rejected(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    b.add_conversation_message("s1", &NewMessage::new("user", "x"))
        .await
        .unwrap();
    assert_invalid(b.get_conversation_history("s1", 0).await, "limit");
    assert_invalid(b.get_conversation_history("missing", 0).await, "limit");
    assert_invalid(
        b.list_sessions(&SessionQuery::new().limit(0)).await,
        "limit",
    );
}

pub async fn history_limit_over_max_is_rejected(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    b.add_conversation_message("s1", &NewMessage::new("user", "x"))
        .await
        .unwrap();
    assert_eq!(
        b.get_conversation_history("s1", MAX_LIMIT)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_invalid(b.get_conversation_history("s1", 10_001).await, "limit");
    assert_invalid(b.get_conversation_history("s1", usize::MAX).await, "limit");
    assert_invalid(
        b.list_sessions(&SessionQuery::new().limit(10_001)).await,
        "limit",
    );
}

pub async fn oversized_content_is_rejected(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let over = "x".repeat(MAX_CONTENT_BYTES + 1);
    assert_invalid(
        b.add_conversation_message("s1", &NewMessage::new("user", over))
            .await,
        "content",
    );
    assert_invalid(
        b.add_conversation_message("s1", &NewMessage::new("user", "a\0b"))
            .await,
        "content",
    );
    assert!(b
        .get_conversation_history("s1", 10)
        .await
        .unwrap()
        .is_empty());

    // Exactly at the limit is accepted and kept whole.
    let at_limit = "y".repeat(MAX_CONTENT_BYTES);
    b.add_conversation_message("s1", &NewMessage::new("user", at_limit))
        .await
        .unwrap();
    let h = b.get_conversation_history("s1", 10).await.unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].content.len(), MAX_CONTENT_BYTES);
}

pub async fn oversized_metadata_is_rejected(b: Arc<dyn StorageBackend>) {
    let big = md(json!({"blob": "x".repeat(MAX_METADATA_BYTES)}));
    assert_invalid(b.create_session("s1", "u1", &big).await, "metadata");
    assert_eq!(b.get_session("s1").await.unwrap(), None);

    b.create_session("s1", "u1", &md(json!({"small": 1})))
        .await
        .unwrap();
    let update = SessionUpdate::new()
        .merge_metadata(big.clone())
        .increment_requests();
    assert_invalid(b.update_session("s1", &update).await, "metadata");
    let s = b.get_session("s1").await.unwrap().unwrap();
    assert_eq!(s.metadata, md(json!({"small": 1})));
    assert_eq!(s.metrics.request_count, 0);

    assert_invalid(
        b.add_conversation_message(
            "s1",
            &NewMessage::new("user", "x").with_metadata(big.clone()),
        )
        .await,
        "metadata",
    );
    assert!(b
        .get_conversation_history("s1", 10)
        .await
        .unwrap()
        .is_empty());

    assert_invalid(
        b.store_checkpoint(&NewCheckpoint::new("t1", "c1", json!(1)).with_metadata(big))
            .await,
        "metadata",
    );
    assert_eq!(b.get_checkpoint("t1", "", None).await.unwrap(), None);
}

pub async fn too_deep_metadata_is_rejected(b: Arc<dyn StorageBackend>) {
    // 64 levels (the metadata object itself counts as one) is the most accepted.
    b.create_session("s1", "u1", &nested_metadata(64))
        .await
        .unwrap();
    assert_eq!(
        b.get_session("s1").await.unwrap().unwrap().metadata,
        nested_metadata(64)
    );

    let deep = nested_metadata(65);
    assert_invalid(b.create_session("s2", "u1", &deep).await, "metadata");
    assert_eq!(b.get_session("s2").await.unwrap(), None);
    assert_invalid(
        b.add_conversation_message(
            "s1",
            &NewMessage::new("user", "x").with_metadata(deep.clone()),
        )
        .await,
        "metadata",
    );
    assert!(b
        .get_conversation_history("s1", 10)
        .await
        .unwrap()
        .is_empty());
    assert_invalid(
        b.store_checkpoint(&NewCheckpoint::new("t1", "c1", json!(1)).with_metadata(deep.clone()))
            .await,
        "metadata",
    );
    // Deep data and context are bounded the same way.
    let deep_value = serde_json::Value::Object(deep);
    assert_invalid(
        b.store_checkpoint(&NewCheckpoint::new("t1", "c1", json!([deep_value.clone()])))
            .await,
        "data",
    );
    assert_eq!(b.get_checkpoint("t1", "", None).await.unwrap(), None);
    assert_invalid(
        b.store_task_context("s1", &json!([deep_value])).await,
        "context",
    );
    assert_eq!(b.get_task_context("s1").await.unwrap(), None);
}

pub async fn bad_processing_time_is_rejected(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.5] {
        let update = SessionUpdate::new()
            .increment_requests()
            .add_processing_time(bad)
            .status("changed");
        assert_invalid(b.update_session("s1", &update).await, "add_processing_time");
    }
    // A rejected update applies none of its parts.
    let s = b.get_session("s1").await.unwrap().unwrap();
    assert_eq!(s.metrics, SessionMetrics::default());
    assert_eq!(s.status, "active");
    // Even on a missing session the input is checked first.
    let nan = SessionUpdate::new().add_processing_time(f64::NAN);
    assert_invalid(b.update_session("ghost", &nan).await, "add_processing_time");
}

pub async fn empty_thread_id_is_rejected(b: Arc<dyn StorageBackend>) {
    assert_invalid(
        b.store_checkpoint(&NewCheckpoint::new("", "c1", json!(1)))
            .await,
        "thread_id",
    );
    assert_invalid(b.get_checkpoint("", "", None).await, "thread_id");
    assert_invalid(
        b.list_checkpoints("", "", &CheckpointFilter::new()).await,
        "thread_id",
    );
    assert_invalid(b.get_writes("", "", "c1").await, "thread_id");
    assert_invalid(b.delete_thread("").await, "thread_id");
    assert_invalid(
        b.store_checkpoint(&NewCheckpoint::new("t\0x", "c1", json!(1)))
            .await,
        "thread_id",
    );
    assert_eq!(b.get_checkpoint("t", "", None).await.unwrap(), None);
    let metrics = b.get_metrics().await.unwrap();
    let metrics = super::leaf(&metrics, |r| r.components.first());
    assert_eq!(
        metrics.values.get("checkpoints").and_then(|v| v.as_u64()),
        Some(0)
    );
}

pub async fn empty_checkpoint_id_is_rejected(b: Arc<dyn StorageBackend>) {
    assert_invalid(
        b.store_checkpoint(&NewCheckpoint::new("t1", "", json!(1)))
            .await,
        "checkpoint_id",
    );
    assert_invalid(b.get_checkpoint("t1", "", Some("")).await, "checkpoint_id");
    assert_invalid(b.get_writes("t1", "", "").await, "checkpoint_id");
    assert_invalid(
        b.put_writes("t1", "", "", "task", &[WriteInput::new("ch", json!(1))])
            .await,
        "checkpoint_id",
    );
    assert_invalid(
        b.store_checkpoint(&NewCheckpoint::new("t1", "c1", json!(1)).with_parent(""))
            .await,
        "parent_checkpoint_id",
    );
    assert_invalid(
        b.store_checkpoint(&NewCheckpoint::new("t1", "c1", json!(1)).with_namespace("n\ns"))
            .await,
        "checkpoint_ns",
    );
    assert_eq!(b.get_checkpoint("t1", "", None).await.unwrap(), None);
    assert!(b
        .list_checkpoints("t1", "", &CheckpointFilter::new())
        .await
        .unwrap()
        .is_empty());
}

pub async fn list_checkpoints_limit_zero_is_rejected(b: Arc<dyn StorageBackend>) {
    b.store_checkpoint(&NewCheckpoint::new("t1", "c1", json!(1)))
        .await
        .unwrap();
    assert_invalid(
        b.list_checkpoints("t1", "", &CheckpointFilter::new().limit(0))
            .await,
        "limit",
    );
    assert_invalid(
        b.list_checkpoints("t1", "", &CheckpointFilter::new().limit(MAX_LIMIT + 1))
            .await,
        "limit",
    );
    assert_invalid(
        b.list_checkpoints("t1", "", &CheckpointFilter::new().before(""))
            .await,
        "before",
    );
    assert_eq!(
        b.list_checkpoints("t1", "", &CheckpointFilter::new().limit(MAX_LIMIT))
            .await
            .unwrap()
            .len(),
        1
    );
}

pub async fn control_char_in_role_is_rejected(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    for role in ["us\ner", "\u{7}bell", "tab\t", "nul\0", ""] {
        assert_invalid(
            b.add_conversation_message("s1", &NewMessage::new(role, "x"))
                .await,
            "role",
        );
    }
    assert_invalid(
        b.add_conversation_message("s1", &NewMessage::new("user", "x").with_id(""))
            .await,
        "message_id",
    );
    assert!(b
        .get_conversation_history("s1", 10)
        .await
        .unwrap()
        .is_empty());
}

pub async fn empty_task_id_is_rejected(b: Arc<dyn StorageBackend>) {
    let w = [WriteInput::new("ch", json!(1))];
    assert_invalid(b.put_writes("t1", "", "c1", "", &w).await, "task_id");
    assert_invalid(
        b.put_writes("t1", "", "c1", "task", &[WriteInput::new("", json!(1))])
            .await,
        "channel",
    );
    assert!(b.get_writes("t1", "", "c1").await.unwrap().is_empty());
}

pub async fn batch_create_with_invalid_item_stores_nothing(b: Arc<dyn StorageBackend>) {
    let batch = [
        NewSession::new("ok1", "u1"),
        NewSession::new("", "u1"),
        NewSession::new("ok2", "u1"),
    ];
    assert_invalid(b.batch_create_sessions(&batch).await, "session_id");
    assert_eq!(b.get_session("ok1").await.unwrap(), None);
    assert_eq!(b.get_session("ok2").await.unwrap(), None);

    let too_many: Vec<NewSession> = (0..=MAX_LIMIT)
        .map(|i| NewSession::new(format!("s{i}"), "u1"))
        .collect();
    assert_invalid(b.batch_create_sessions(&too_many).await, "sessions");
    assert_eq!(b.get_session("s0").await.unwrap(), None);
}

pub async fn batch_add_with_invalid_item_is_answered_per_item(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let batch = vec![
        ("s1".to_string(), NewMessage::new("user", "first")),
        ("s1".to_string(), NewMessage::new("bad\nrole", "bad")),
        ("s1".to_string(), NewMessage::new("user", "last")),
    ];
    // Either answer is within the contract, but each must match what was stored: an
    // outer error stores nothing; per-item results store exactly the good items.
    match b.batch_add_conversation_messages(&batch).await {
        Err(e) => {
            assert!(
                matches!(e, StorageError::InvalidInput { field: "role", .. }),
                "got {e:?}"
            );
            assert!(b
                .get_conversation_history("s1", 10)
                .await
                .unwrap()
                .is_empty());
        }
        Ok(results) => {
            assert_eq!(results.len(), 3);
            assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
            assert!(
                matches!(
                    results[1],
                    Err(StorageError::InvalidInput { field: "role", .. })
                ),
                "got {:?}",
                results[1]
            );
            let h = b.get_conversation_history("s1", 10).await.unwrap();
            let contents: Vec<&str> = h.iter().map(|m| m.content.as_str()).collect();
            assert_eq!(contents, ["first", "last"]);
        }
    }
}

pub async fn batch_get_with_invalid_id_is_rejected(b: Arc<dyn StorageBackend>) {
    b.create_session("ok", "u1", &md(json!({}))).await.unwrap();
    let ids = vec!["ok".to_string(), String::new()];
    assert_invalid(b.batch_get_sessions(&ids).await, "session_id");
    let too_many = vec!["ok".to_string(); MAX_LIMIT + 1];
    assert_invalid(b.batch_get_sessions(&too_many).await, "session_ids");
}
