//! Round trips of awkward values: unicode, large content, deep metadata, odd ids.

use std::sync::Arc;

use aiecs_storage::{CheckpointFilter, NewCheckpoint, NewMessage, StorageBackend, WriteInput};
use serde_json::json;

use super::{contents, md, nested_metadata};

pub async fn unicode_round_trips(b: Arc<dyn StorageBackend>) {
    let ids = [
        "emoji-🚀👩‍👩‍👧‍👦",
        "中文会话",
        "日本語のセッション",
        "עברית-שיחה",
        "محادثة",
        "e\u{0301}", // e + combining acute
        "é",         // precomposed: a different id, never normalized into the other
        "\u{200f}rtl-mark",
    ];
    for (i, id) in ids.iter().enumerate() {
        let meta = md(json!({"ключ": "значение", "🔑": [id, i], "mixed": "a\u{0301}b"}));
        let s = b
            .create_session(id, &format!("użytkownik-{i}"), &meta)
            .await
            .unwrap();
        assert_eq!(s.session_id, *id);
        b.add_conversation_message(
            id,
            &NewMessage::new("user", format!("{id} ☕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 {i}"))
                .with_id(format!("msg-{id}"))
                .with_metadata(meta.clone()),
        )
        .await
        .unwrap();
        b.store_task_context(id, &json!({"who": id})).await.unwrap();
        b.store_checkpoint(
            &NewCheckpoint::new(*id, format!("cp-{id}"), json!({"text": id}))
                .with_namespace(format!("ns-{id}"))
                .with_metadata(meta.clone()),
        )
        .await
        .unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        let meta = md(json!({"ключ": "значение", "🔑": [id, i], "mixed": "a\u{0301}b"}));
        let s = b.get_session(id).await.unwrap().expect(id);
        assert_eq!(s.user_id, format!("użytkownik-{i}"));
        assert_eq!(s.metadata, meta);
        let h = b.get_conversation_history(id, 10).await.unwrap();
        assert_eq!(h.len(), 1, "history of {id}");
        assert_eq!(h[0].message_id, format!("msg-{id}"));
        assert_eq!(h[0].content, format!("{id} ☕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 {i}"));
        assert_eq!(h[0].metadata, meta);
        assert_eq!(
            b.get_task_context(id).await.unwrap(),
            Some(json!({"who": id}))
        );
        let ns = format!("ns-{id}");
        let c = b.get_checkpoint(id, &ns, None).await.unwrap().expect(id);
        assert_eq!(c.thread_id, *id);
        assert_eq!(c.checkpoint_ns, ns);
        assert_eq!(c.checkpoint_id, format!("cp-{id}"));
        assert_eq!(c.data, json!({"text": id}));
        assert_eq!(c.metadata, meta);
    }
}

pub async fn megabyte_content_round_trips(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    // 1 MiB of varied text (multi-byte chars, newlines, quotes), not one repeated byte.
    let mut content = String::with_capacity(1 << 20);
    let mut i = 0u64;
    while content.len() < (1 << 20) - 16 {
        content.push_str(&format!("{i}:ä\"'\n\\日🚀 "));
        i += 1;
    }
    while content.len() < 1 << 20 {
        content.push('x');
    }
    assert_eq!(content.len(), 1 << 20);
    b.add_conversation_message("s1", &NewMessage::new("user", content.clone()))
        .await
        .unwrap();
    b.add_conversation_message("s1", &NewMessage::new("user", "after"))
        .await
        .unwrap();
    let h = b.get_conversation_history("s1", 10).await.unwrap();
    assert_eq!(h.len(), 2);
    assert!(h[0].content == content, "1 MiB content changed on the way");
    assert_eq!(h[1].content, "after");
}

pub async fn deep_metadata_round_trips(b: Arc<dyn StorageBackend>) {
    let meta = nested_metadata(60);
    let s = b.create_session("s1", "u1", &meta).await.unwrap();
    assert_eq!(s.metadata, meta);
    assert_eq!(b.get_session("s1").await.unwrap().unwrap().metadata, meta);

    b.add_conversation_message(
        "s1",
        &NewMessage::new("user", "x").with_metadata(meta.clone()),
    )
    .await
    .unwrap();
    let h = b.get_conversation_history("s1", 1).await.unwrap();
    assert_eq!(h[0].metadata, meta);

    b.store_checkpoint(&NewCheckpoint::new("t1", "c1", json!(null)).with_metadata(meta.clone()))
        .await
        .unwrap();
    let c = b.get_checkpoint("t1", "", None).await.unwrap().unwrap();
    assert_eq!(c.metadata, meta);
}

pub async fn special_character_ids_round_trip(b: Arc<dyn StorageBackend>) {
    let ids = [
        "*",
        "?",
        "[a-z]",
        "a*",
        "{x}",
        "a:b",
        "it's",
        "say \"hi\"",
        "x; DROP TABLE sessions;--",
        "' OR '1'='1",
        "%_%",
        "\\back\\slash",
        "with space",
        " leading and trailing ",
        "*?[]:{}'\";-- all",
        "/path/like",
        "null",
    ];
    for id in ids {
        b.create_session(id, id, &md(json!({"id": id})))
            .await
            .unwrap();
        b.add_conversation_message(id, &NewMessage::new("user", id).with_id(id))
            .await
            .unwrap();
        b.store_task_context(id, &json!(id)).await.unwrap();
        b.store_checkpoint(&NewCheckpoint::new(id, id, json!(id)).with_namespace(id))
            .await
            .unwrap();
        b.put_writes(id, id, id, id, &[WriteInput::new(id, json!(id))])
            .await
            .unwrap();
    }
    for id in ids {
        let s = b.get_session(id).await.unwrap().expect(id);
        assert_eq!((s.session_id.as_str(), s.user_id.as_str()), (id, id));
        let h = b.get_conversation_history(id, 10).await.unwrap();
        assert_eq!(contents(&h), [id], "history of {id:?}");
        assert_eq!(h[0].message_id, id);
        assert_eq!(b.get_task_context(id).await.unwrap(), Some(json!(id)));
        let c = b.get_checkpoint(id, id, Some(id)).await.unwrap().expect(id);
        assert_eq!(c.data, json!(id));
        let listed = b
            .list_checkpoints(id, id, &CheckpointFilter::new().limit(100))
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "checkpoints of {id:?}");
        let w = b.get_writes(id, id, id).await.unwrap();
        assert_eq!(w.len(), 1, "writes of {id:?}");
        assert_eq!((w[0].task_id.as_str(), w[0].channel.as_str()), (id, id));
    }
    let page = b
        .list_sessions(&aiecs_storage::SessionQuery::new().limit(100))
        .await
        .unwrap();
    let mut expected: Vec<&str> = ids.to_vec();
    expected.sort();
    let listed: Vec<&str> = page
        .sessions
        .iter()
        .map(|s| s.session_id.as_str())
        .collect();
    assert_eq!(listed, expected);

    // Pattern characters are literal: deleting "a*" leaves "a:b" and "*" alone.
    b.delete_thread("a*").await.unwrap();
    b.delete_thread("*").await.unwrap();
    assert_eq!(b.get_checkpoint("a*", "a*", None).await.unwrap(), None);
    assert_eq!(b.get_checkpoint("*", "*", None).await.unwrap(), None);
    for id in ids.iter().filter(|id| **id != "a*" && **id != "*") {
        assert!(
            b.get_checkpoint(id, id, None).await.unwrap().is_some(),
            "delete_thread of a pattern removed {id:?}"
        );
    }
}

pub async fn composed_keys_do_not_collide(b: Arc<dyn StorageBackend>) {
    // Pairs that a naive "thread:ns:id" key would merge.
    b.store_checkpoint(&NewCheckpoint::new("a:b", "c", json!("thread a:b, ns ''")))
        .await
        .unwrap();
    b.store_checkpoint(&NewCheckpoint::new("a", "c", json!("thread a, ns b")).with_namespace("b"))
        .await
        .unwrap();
    b.store_checkpoint(&NewCheckpoint::new("a", "b:c", json!("thread a, ns ''")))
        .await
        .unwrap();
    assert_eq!(
        b.get_checkpoint("a:b", "", Some("c"))
            .await
            .unwrap()
            .unwrap()
            .data,
        json!("thread a:b, ns ''")
    );
    assert_eq!(
        b.get_checkpoint("a", "b", Some("c"))
            .await
            .unwrap()
            .unwrap()
            .data,
        json!("thread a, ns b")
    );
    assert_eq!(
        b.get_checkpoint("a", "", Some("b:c"))
            .await
            .unwrap()
            .unwrap()
            .data,
        json!("thread a, ns ''")
    );
    assert_eq!(b.get_checkpoint("a", "", Some("c")).await.unwrap(), None);
    assert_eq!(
        b.get_checkpoint("a:b", "", Some("b:c")).await.unwrap(),
        None
    );

    b.put_writes("a", "b", "c", "t", &[WriteInput::new("ch", json!(1))])
        .await
        .unwrap();
    b.put_writes("a:b", "", "c", "t", &[WriteInput::new("ch", json!(2))])
        .await
        .unwrap();
    b.put_writes("a", "", "b:c", "t", &[WriteInput::new("ch", json!(3))])
        .await
        .unwrap();
    assert_eq!(
        b.get_writes("a", "b", "c").await.unwrap()[0].value,
        json!(1)
    );
    assert_eq!(
        b.get_writes("a:b", "", "c").await.unwrap()[0].value,
        json!(2)
    );
    assert_eq!(
        b.get_writes("a", "", "b:c").await.unwrap()[0].value,
        json!(3)
    );
    // Task ids and indexes do not merge either: task "t:1" idx 0 vs task "t" idx 1.
    b.put_writes(
        "x",
        "",
        "c",
        "t",
        &[
            WriteInput::new("ch", json!("t0")),
            WriteInput::new("ch", json!("t1")),
        ],
    )
    .await
    .unwrap();
    b.put_writes(
        "x",
        "",
        "c",
        "t:1",
        &[WriteInput::new("ch", json!("t:1 0"))],
    )
    .await
    .unwrap();
    assert_eq!(b.get_writes("x", "", "c").await.unwrap().len(), 3);

    // Deleting thread "a" leaves thread "a:b".
    b.delete_thread("a").await.unwrap();
    assert!(b.get_checkpoint("a:b", "", None).await.unwrap().is_some());
    assert_eq!(b.get_writes("a:b", "", "c").await.unwrap().len(), 1);
    assert_eq!(b.get_checkpoint("a", "b", None).await.unwrap(), None);

    // Sessions: "a" and "a:b" (and their histories and contexts) stay apart.
    b.create_session("a", "u", &md(json!({}))).await.unwrap();
    b.create_session("a:b", "u", &md(json!({}))).await.unwrap();
    b.add_conversation_message("a", &NewMessage::new("user", "in a").with_id("b"))
        .await
        .unwrap();
    b.add_conversation_message("a:b", &NewMessage::new("user", "in a:b"))
        .await
        .unwrap();
    b.store_task_context("a", &json!("ctx a")).await.unwrap();
    assert_eq!(
        contents(&b.get_conversation_history("a", 10).await.unwrap()),
        ["in a"]
    );
    assert_eq!(
        contents(&b.get_conversation_history("a:b", 10).await.unwrap()),
        ["in a:b"]
    );
    assert_eq!(b.get_task_context("a:b").await.unwrap(), None);
}
