//! Conversation history: order, limits, idempotent ids, batches.

use std::collections::HashSet;
use std::sync::Arc;

use aiecs_storage::{NewMessage, StorageBackend, StorageError};
use serde_json::json;

use super::{contents, md, message_ids, pause};

pub async fn history_is_newest_limit_oldest_first(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    for i in 0..200 {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        b.add_conversation_message("s1", &NewMessage::new(role, format!("m{i}")))
            .await
            .unwrap();
    }
    let last50 = b.get_conversation_history("s1", 50).await.unwrap();
    let expected: Vec<String> = (150..200).map(|i| format!("m{i}")).collect();
    assert_eq!(contents(&last50), expected);

    let all = b.get_conversation_history("s1", 500).await.unwrap();
    let expected: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    assert_eq!(contents(&all), expected);

    let one = b.get_conversation_history("s1", 1).await.unwrap();
    assert_eq!(contents(&one), ["m199"]);
    assert_eq!(one[0].role, "assistant");

    // Timestamps follow the order of the history.
    assert!(all.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
}

pub async fn add_to_missing_session_is_not_found(b: Arc<dyn StorageBackend>) {
    let r = b
        .add_conversation_message("ghost", &NewMessage::new("user", "hi"))
        .await;
    assert!(
        matches!(r, Err(StorageError::NotFound { .. })),
        "expected NotFound, got {r:?}"
    );
    // The failed add neither creates the session nor stores the message.
    assert_eq!(b.get_session("ghost").await.unwrap(), None);
    assert!(b
        .get_conversation_history("ghost", 10)
        .await
        .unwrap()
        .is_empty());
    b.create_session("ghost", "u1", &md(json!({})))
        .await
        .unwrap();
    assert!(b
        .get_conversation_history("ghost", 10)
        .await
        .unwrap()
        .is_empty());
}

pub async fn message_id_dedupes_retries(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let first = NewMessage::new("user", "hello").with_id("x");
    assert_eq!(b.add_conversation_message("s1", &first).await.unwrap(), "x");
    b.add_conversation_message("s1", &NewMessage::new("assistant", "between").with_id("y"))
        .await
        .unwrap();
    // A retry of "x" (even with other content) stores nothing and keeps the original.
    let retry = NewMessage::new("user", "changed").with_id("x");
    assert_eq!(b.add_conversation_message("s1", &retry).await.unwrap(), "x");
    assert_eq!(b.add_conversation_message("s1", &first).await.unwrap(), "x");

    let h = b.get_conversation_history("s1", 100).await.unwrap();
    assert_eq!(message_ids(&h), ["x", "y"]);
    assert_eq!(h[0].content, "hello");
}

pub async fn message_ids_are_scoped_to_their_session(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    b.create_session("s2", "u1", &md(json!({}))).await.unwrap();
    let m = NewMessage::new("user", "same id").with_id("m1");
    assert_eq!(b.add_conversation_message("s1", &m).await.unwrap(), "m1");
    assert_eq!(b.add_conversation_message("s2", &m).await.unwrap(), "m1");
    assert_eq!(b.get_conversation_history("s1", 10).await.unwrap().len(), 1);
    assert_eq!(b.get_conversation_history("s2", 10).await.unwrap().len(), 1);
}

pub async fn generated_ids_are_distinct(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let mut returned = Vec::new();
    for i in 0..50 {
        let id = b
            .add_conversation_message("s1", &NewMessage::new("user", format!("m{i}")))
            .await
            .unwrap();
        assert!(!id.is_empty());
        returned.push(id);
    }
    let unique: HashSet<&String> = returned.iter().collect();
    assert_eq!(unique.len(), 50);
    // The stored ids are the ones handed back, in order.
    let h = b.get_conversation_history("s1", 100).await.unwrap();
    let stored: Vec<String> = h.into_iter().map(|m| m.message_id).collect();
    assert_eq!(stored, returned);
}

pub async fn history_of_missing_session_is_empty(b: Arc<dyn StorageBackend>) {
    assert!(b
        .get_conversation_history("ghost", 50)
        .await
        .unwrap()
        .is_empty());
}

pub async fn message_fields_round_trip(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let meta = md(json!({
        "tokens": 42, "model": "m-1", "score": 0.75,
        "tools": [{"name": "search", "args": {"q": "x"}}], "none": null, "ok": false
    }));
    let content = "line one\nline two\ttabbed\r\n  \"quoted\" \\ back";
    let m = NewMessage::new("tool", content)
        .with_id("msg-1")
        .with_metadata(meta.clone());
    b.add_conversation_message("s1", &m).await.unwrap();
    b.add_conversation_message("s1", &NewMessage::new("system", ""))
        .await
        .unwrap();

    let h = b.get_conversation_history("s1", 10).await.unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].message_id, "msg-1");
    assert_eq!(h[0].role, "tool");
    assert_eq!(h[0].content, content);
    assert_eq!(h[0].metadata, meta);
    assert_eq!(h[1].role, "system");
    assert_eq!(h[1].content, "");
    assert!(h[1].metadata.is_empty());
    // Reads are stable: the same record twice.
    assert_eq!(b.get_conversation_history("s1", 10).await.unwrap(), h);
}

pub async fn add_message_moves_session_updated_at(b: Arc<dyn StorageBackend>) {
    let created = b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    pause().await;
    b.add_conversation_message("s1", &NewMessage::new("user", "hi"))
        .await
        .unwrap();
    let s = b.get_session("s1").await.unwrap().unwrap();
    assert!(
        s.updated_at > created.updated_at,
        "updated_at did not move: {} -> {}",
        created.updated_at,
        s.updated_at
    );
    assert_eq!(s.created_at, created.created_at);
    let h = b.get_conversation_history("s1", 1).await.unwrap();
    assert!(h[0].timestamp >= created.updated_at);
}

pub async fn batch_add_gives_per_item_results(b: Arc<dyn StorageBackend>) {
    b.create_session("a", "u1", &md(json!({}))).await.unwrap();
    b.create_session("b", "u1", &md(json!({}))).await.unwrap();
    let batch = vec![
        ("a".to_string(), NewMessage::new("user", "a1").with_id("a1")),
        ("b".to_string(), NewMessage::new("user", "b1")),
        ("missing".to_string(), NewMessage::new("user", "x")),
        ("a".to_string(), NewMessage::new("assistant", "a2")),
        ("b".to_string(), NewMessage::new("assistant", "b2")),
        // A retry of an id added earlier in the same batch.
        (
            "a".to_string(),
            NewMessage::new("user", "a1 again").with_id("a1"),
        ),
    ];
    let results = b.batch_add_conversation_messages(&batch).await.unwrap();
    assert_eq!(results.len(), batch.len());
    assert_eq!(results[0].as_ref().unwrap(), "a1");
    assert!(
        matches!(results[2], Err(StorageError::NotFound { .. })),
        "expected NotFound, got {:?}",
        results[2]
    );
    assert_eq!(results[5].as_ref().unwrap(), "a1");
    let ok_ids: Vec<&String> = [0, 1, 3, 4]
        .iter()
        .map(|&i| results[i].as_ref().expect("stored"))
        .collect();

    let ha = b.get_conversation_history("a", 10).await.unwrap();
    assert_eq!(contents(&ha), ["a1", "a2"]);
    assert_eq!(ha[0].message_id, *ok_ids[0]);
    assert_eq!(ha[1].message_id, *ok_ids[2]);
    let hb = b.get_conversation_history("b", 10).await.unwrap();
    assert_eq!(contents(&hb), ["b1", "b2"]);
    assert_eq!(hb[0].message_id, *ok_ids[1]);
    assert_eq!(hb[1].message_id, *ok_ids[3]);
    assert_eq!(b.get_session("missing").await.unwrap(), None);

    assert!(b
        .batch_add_conversation_messages(&[])
        .await
        .unwrap()
        .is_empty());
}

pub async fn history_is_per_session(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    b.create_session("s2", "u1", &md(json!({}))).await.unwrap();
    // Also a prefix of both, so a prefix scan would leak.
    b.create_session("s", "u1", &md(json!({}))).await.unwrap();
    for i in 0..5 {
        b.add_conversation_message("s1", &NewMessage::new("user", format!("one-{i}")))
            .await
            .unwrap();
        b.add_conversation_message("s2", &NewMessage::new("user", format!("two-{i}")))
            .await
            .unwrap();
    }
    let h1 = b.get_conversation_history("s1", 100).await.unwrap();
    let h2 = b.get_conversation_history("s2", 100).await.unwrap();
    assert_eq!(contents(&h1), ["one-0", "one-1", "one-2", "one-3", "one-4"]);
    assert_eq!(contents(&h2), ["two-0", "two-1", "two-2", "two-3", "two-4"]);
    assert!(b
        .get_conversation_history("s", 100)
        .await
        .unwrap()
        .is_empty());
    // The limit counts this session's messages only.
    let last2 = b.get_conversation_history("s1", 2).await.unwrap();
    assert_eq!(contents(&last2), ["one-3", "one-4"]);
}

pub async fn range_pages_through_the_whole_history_in_order(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    b.create_session("s2", "u1", &md(json!({}))).await.unwrap();
    for i in 0..250 {
        b.add_conversation_message("s1", &NewMessage::new("user", format!("m{i}")))
            .await
            .unwrap();
    }
    b.add_conversation_message("s2", &NewMessage::new("user", "other"))
        .await
        .unwrap();
    let mut all = Vec::new();
    let mut offset = 0u64;
    loop {
        let page = b.get_conversation_range("s1", offset, 100).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 100);
        offset += page.len() as u64;
        all.extend(page);
    }
    let expected: Vec<String> = (0..250).map(|i| format!("m{i}")).collect();
    assert_eq!(contents(&all), expected);
    assert!(b
        .get_conversation_range("s1", 10_000, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(b
        .get_conversation_range("missing", 0, 10)
        .await
        .unwrap()
        .is_empty());
    let middle = b.get_conversation_range("s1", 120, 3).await.unwrap();
    assert_eq!(contents(&middle), ["m120", "m121", "m122"]);
    assert!(matches!(
        b.get_conversation_range("s1", 0, 0).await,
        Err(StorageError::InvalidInput { field: "limit", .. })
    ));
}

pub async fn restore_messages_keeps_ids_timestamps_and_order_once(b: Arc<dyn StorageBackend>) {
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let msg = |id: &str, t: &str| aiecs_storage::Message {
        message_id: id.into(),
        role: "user".into(),
        content: format!("content of {id}"),
        timestamp: at(t),
        metadata: md(json!({"id": id})),
    };
    let first = vec![
        msg("a", "2024-01-01T00:00:01Z"),
        msg("b", "2024-01-01T00:00:02.5Z"),
        msg("c", "2024-01-01T00:00:03Z"),
    ];
    assert!(matches!(
        b.restore_messages("missing", &first).await,
        Err(StorageError::NotFound { .. })
    ));
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let before = b.get_session("s1").await.unwrap().unwrap().updated_at;
    assert_eq!(b.restore_messages("s1", &first).await.unwrap(), 3);
    let mut again = first.clone();
    again.push(msg("d", "2024-01-01T00:00:04Z"));
    // A rerun stores only what is new.
    assert_eq!(b.restore_messages("s1", &again).await.unwrap(), 1);
    assert_eq!(b.get_conversation_history("s1", 50).await.unwrap(), again);
    assert_eq!(
        b.get_session("s1").await.unwrap().unwrap().updated_at,
        before
    );
}
