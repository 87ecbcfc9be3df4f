//! Checkpoints: "latest" by store order, listing, namespaces, pending writes, deletion.

use std::sync::Arc;

use aiecs_storage::{
    Checkpoint, CheckpointFilter, NewCheckpoint, PendingWrite, StorageBackend, TaskWrites,
    WriteInput,
};
use serde_json::{json, Value};

use super::{md, pause};

fn cp(thread: &str, id: &str, data: Value) -> NewCheckpoint {
    NewCheckpoint::new(thread, id, data)
}

fn ids(list: &[Checkpoint]) -> Vec<&str> {
    list.iter().map(|c| c.checkpoint_id.as_str()).collect()
}

fn pw(task: &str, idx: u32, channel: &str, value: Value) -> PendingWrite {
    PendingWrite {
        task_id: task.into(),
        idx,
        channel: channel.into(),
        value,
    }
}

/// Stores `cp0`..`cp{n-1}` in `t1`, each with its index as data.
async fn store_numbered(b: &Arc<dyn StorageBackend>, n: usize) {
    for i in 0..n {
        b.store_checkpoint(&cp("t1", &format!("cp{i}"), json!({"i": i})))
            .await
            .unwrap();
    }
}

pub async fn latest_checkpoint_is_last_stored(b: Arc<dyn StorageBackend>) {
    // Neither lexical ("cp2" is largest) nor numeric ("cp10") order: store order.
    for id in ["cp2", "cp10", "cp1"] {
        b.store_checkpoint(&cp("t1", id, json!({"id": id})))
            .await
            .unwrap();
    }
    let latest = b.get_checkpoint("t1", "", None).await.unwrap().unwrap();
    assert_eq!(latest.checkpoint_id, "cp1");
    assert_eq!(latest.data, json!({"id": "cp1"}));
    assert_eq!(latest.thread_id, "t1");
    assert_eq!(latest.checkpoint_ns, "");

    b.store_checkpoint(&cp("t1", "a", json!(null)))
        .await
        .unwrap();
    let latest = b.get_checkpoint("t1", "", None).await.unwrap().unwrap();
    assert_eq!(latest.checkpoint_id, "a");
}

pub async fn get_checkpoint_by_id(b: Arc<dyn StorageBackend>) {
    let meta = md(json!({"source": "loop", "step": 3}));
    b.store_checkpoint(&cp("t1", "c1", json!({"v": 1})))
        .await
        .unwrap();
    b.store_checkpoint(
        &cp("t1", "c2", json!({"v": [2, "two"]}))
            .with_metadata(meta.clone())
            .with_parent("c1"),
    )
    .await
    .unwrap();
    b.store_checkpoint(&cp("t1", "c3", json!({"v": 3})))
        .await
        .unwrap();

    let c2 = b
        .get_checkpoint("t1", "", Some("c2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c2.thread_id, "t1");
    assert_eq!(c2.checkpoint_ns, "");
    assert_eq!(c2.checkpoint_id, "c2");
    assert_eq!(c2.parent_checkpoint_id.as_deref(), Some("c1"));
    assert_eq!(c2.data, json!({"v": [2, "two"]}));
    assert_eq!(c2.metadata, meta);
    let c1 = b
        .get_checkpoint("t1", "", Some("c1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c1.data, json!({"v": 1}));
    assert!(c1.metadata.is_empty());
    assert!(c1.created_at <= c2.created_at);

    // The same record is returned by id, by list, and as latest.
    let c3 = b
        .get_checkpoint("t1", "", Some("c3"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.get_checkpoint("t1", "", None).await.unwrap().unwrap(), c3);
    let listed = b
        .list_checkpoints("t1", "", &CheckpointFilter::new())
        .await
        .unwrap();
    assert_eq!(listed, vec![c3, c2, c1]);
}

pub async fn get_missing_checkpoint_is_none(b: Arc<dyn StorageBackend>) {
    assert_eq!(b.get_checkpoint("t1", "", None).await.unwrap(), None);
    assert_eq!(b.get_checkpoint("t1", "", Some("c1")).await.unwrap(), None);
    b.store_checkpoint(&cp("t1", "c1", json!(1))).await.unwrap();
    assert_eq!(b.get_checkpoint("t1", "", Some("c2")).await.unwrap(), None);
    assert_eq!(b.get_checkpoint("t2", "", Some("c1")).await.unwrap(), None);
    assert_eq!(b.get_checkpoint("t2", "", None).await.unwrap(), None);
    assert_eq!(b.get_checkpoint("t1", "other", None).await.unwrap(), None);
    assert_eq!(
        b.get_checkpoint("t1", "other", Some("c1")).await.unwrap(),
        None
    );
    assert!(b
        .list_checkpoints("t2", "", &CheckpointFilter::new())
        .await
        .unwrap()
        .is_empty());
    assert!(b.get_writes("t2", "", "c1").await.unwrap().is_empty());
}

pub async fn restoring_old_id_updates_without_becoming_latest(b: Arc<dyn StorageBackend>) {
    b.store_checkpoint(&cp("t1", "c1", json!({"v": 1})).with_metadata(md(json!({"m": 1}))))
        .await
        .unwrap();
    b.store_checkpoint(&cp("t1", "c2", json!({"v": 2})))
        .await
        .unwrap();
    let original = b
        .get_checkpoint("t1", "", Some("c1"))
        .await
        .unwrap()
        .unwrap();
    pause().await;

    b.store_checkpoint(
        &cp("t1", "c1", json!({"v": "one"}))
            .with_metadata(md(json!({"m": 2})))
            .with_parent("c0"),
    )
    .await
    .unwrap();

    let c1 = b
        .get_checkpoint("t1", "", Some("c1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c1.data, json!({"v": "one"}));
    assert_eq!(c1.metadata, md(json!({"m": 2})));
    assert_eq!(c1.parent_checkpoint_id.as_deref(), Some("c0"));
    assert_eq!(c1.created_at, original.created_at);

    let latest = b.get_checkpoint("t1", "", None).await.unwrap().unwrap();
    assert_eq!(latest.checkpoint_id, "c2");
    let listed = b
        .list_checkpoints("t1", "", &CheckpointFilter::new())
        .await
        .unwrap();
    assert_eq!(ids(&listed), ["c2", "c1"]);
    assert_eq!(listed[1], c1);
}

pub async fn list_is_newest_first_with_limit(b: Arc<dyn StorageBackend>) {
    store_numbered(&b, 15).await;
    let listed = b
        .list_checkpoints("t1", "", &CheckpointFilter::new())
        .await
        .unwrap();
    let expected: Vec<String> = (5..15).rev().map(|i| format!("cp{i}")).collect();
    assert_eq!(ids(&listed), expected);
    assert_eq!(listed[0].data, json!({"i": 14}));

    let three = b
        .list_checkpoints("t1", "", &CheckpointFilter::new().limit(3))
        .await
        .unwrap();
    assert_eq!(ids(&three), ["cp14", "cp13", "cp12"]);

    let all = b
        .list_checkpoints("t1", "", &CheckpointFilter::new().limit(100))
        .await
        .unwrap();
    let expected: Vec<String> = (0..15).rev().map(|i| format!("cp{i}")).collect();
    assert_eq!(ids(&all), expected);
}

pub async fn list_before_is_exclusive(b: Arc<dyn StorageBackend>) {
    store_numbered(&b, 15).await;
    let before = b
        .list_checkpoints("t1", "", &CheckpointFilter::new().before("cp7"))
        .await
        .unwrap();
    assert_eq!(
        ids(&before),
        ["cp6", "cp5", "cp4", "cp3", "cp2", "cp1", "cp0"]
    );

    let page = b
        .list_checkpoints("t1", "", &CheckpointFilter::new().before("cp12").limit(2))
        .await
        .unwrap();
    assert_eq!(ids(&page), ["cp11", "cp10"]);

    // "cp1" sorts before "cp10".."cp14" as text; `before` follows store order.
    let page = b
        .list_checkpoints("t1", "", &CheckpointFilter::new().before("cp1"))
        .await
        .unwrap();
    assert_eq!(ids(&page), ["cp0"]);

    let none = b
        .list_checkpoints("t1", "", &CheckpointFilter::new().before("cp0"))
        .await
        .unwrap();
    assert!(none.is_empty());

    let unknown = b
        .list_checkpoints("t1", "", &CheckpointFilter::new().before("nope"))
        .await
        .unwrap();
    assert!(unknown.is_empty());
}

pub async fn list_filters_by_metadata(b: Arc<dyn StorageBackend>) {
    for i in 0..10 {
        let source = if i % 3 == 0 { "input" } else { "loop" };
        b.store_checkpoint(&cp("t1", &format!("cp{i}"), json!(i)).with_metadata(md(
            json!({"source": source, "step": i, "writes": {"n": i % 2}}),
        )))
        .await
        .unwrap();
    }
    let input = b
        .list_checkpoints(
            "t1",
            "",
            &CheckpointFilter::new().metadata_entry("source", "input"),
        )
        .await
        .unwrap();
    assert_eq!(ids(&input), ["cp9", "cp6", "cp3", "cp0"]);
    assert!(input.iter().all(|c| c.metadata["source"] == "input"));

    // The limit applies after the filter.
    let loops = b
        .list_checkpoints(
            "t1",
            "",
            &CheckpointFilter::new()
                .metadata_entry("source", "loop")
                .limit(3),
        )
        .await
        .unwrap();
    assert_eq!(ids(&loops), ["cp8", "cp7", "cp5"]);

    // Every key must match, with JSON values compared whole (numbers and objects too).
    let both = b
        .list_checkpoints(
            "t1",
            "",
            &CheckpointFilter::new()
                .metadata_entry("source", "loop")
                .metadata_entry("step", 4),
        )
        .await
        .unwrap();
    assert_eq!(ids(&both), ["cp4"]);
    let nested = b
        .list_checkpoints(
            "t1",
            "",
            &CheckpointFilter::new()
                .metadata_entry("writes", json!({"n": 1}))
                .limit(100),
        )
        .await
        .unwrap();
    assert_eq!(ids(&nested), ["cp9", "cp7", "cp5", "cp3", "cp1"]);

    // Filter combined with `before`.
    let older = b
        .list_checkpoints(
            "t1",
            "",
            &CheckpointFilter::new()
                .metadata_entry("source", "input")
                .before("cp6"),
        )
        .await
        .unwrap();
    assert_eq!(ids(&older), ["cp3", "cp0"]);

    // A value of another type does not match ("4" is not 4), nor does a missing key.
    let string_step = b
        .list_checkpoints(
            "t1",
            "",
            &CheckpointFilter::new().metadata_entry("step", "4"),
        )
        .await
        .unwrap();
    assert!(string_step.is_empty());
    let missing = b
        .list_checkpoints(
            "t1",
            "",
            &CheckpointFilter::new().metadata_entry("absent", "x"),
        )
        .await
        .unwrap();
    assert!(missing.is_empty());
}

pub async fn namespaces_are_kept_apart(b: Arc<dyn StorageBackend>) {
    b.store_checkpoint(&cp("t1", "c1", json!("root-1")))
        .await
        .unwrap();
    b.store_checkpoint(&cp("t1", "c1", json!("child-1")).with_namespace("child"))
        .await
        .unwrap();
    b.store_checkpoint(&cp("t1", "c2", json!("child-2")).with_namespace("child"))
        .await
        .unwrap();
    b.store_checkpoint(&cp("t1", "c0", json!("root-0")))
        .await
        .unwrap();

    let root = b
        .get_checkpoint("t1", "", Some("c1"))
        .await
        .unwrap()
        .unwrap();
    let child = b
        .get_checkpoint("t1", "child", Some("c1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(root.data, json!("root-1"));
    assert_eq!(root.checkpoint_ns, "");
    assert_eq!(child.data, json!("child-1"));
    assert_eq!(child.checkpoint_ns, "child");

    let root_latest = b.get_checkpoint("t1", "", None).await.unwrap().unwrap();
    let child_latest = b
        .get_checkpoint("t1", "child", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(root_latest.checkpoint_id, "c0");
    assert_eq!(child_latest.checkpoint_id, "c2");

    let root_list = b
        .list_checkpoints("t1", "", &CheckpointFilter::new())
        .await
        .unwrap();
    let child_list = b
        .list_checkpoints("t1", "child", &CheckpointFilter::new())
        .await
        .unwrap();
    assert_eq!(ids(&root_list), ["c0", "c1"]);
    assert_eq!(ids(&child_list), ["c2", "c1"]);
    assert_eq!(child_list[1].data, json!("child-1"));

    // `before` resolves within the namespace: "c2" exists only in "child".
    let before = b
        .list_checkpoints("t1", "", &CheckpointFilter::new().before("c2"))
        .await
        .unwrap();
    assert!(before.is_empty());
    assert_eq!(b.get_checkpoint("t1", "", Some("c2")).await.unwrap(), None);
}

pub async fn parent_id_round_trips(b: Arc<dyn StorageBackend>) {
    b.store_checkpoint(&cp("t1", "c1", json!(1))).await.unwrap();
    b.store_checkpoint(&cp("t1", "c2", json!(2)).with_parent("c1"))
        .await
        .unwrap();
    // A parent need not exist (it may live in another store or have been pruned).
    b.store_checkpoint(&cp("t1", "c3", json!(3)).with_parent("elsewhere"))
        .await
        .unwrap();
    let get = |id: &'static str| {
        let b = b.clone();
        async move { b.get_checkpoint("t1", "", Some(id)).await.unwrap().unwrap() }
    };
    assert_eq!(get("c1").await.parent_checkpoint_id, None);
    assert_eq!(get("c2").await.parent_checkpoint_id.as_deref(), Some("c1"));
    assert_eq!(
        get("c3").await.parent_checkpoint_id.as_deref(),
        Some("elsewhere")
    );
    let listed = b
        .list_checkpoints("t1", "", &CheckpointFilter::new())
        .await
        .unwrap();
    let parents: Vec<Option<&str>> = listed
        .iter()
        .map(|c| c.parent_checkpoint_id.as_deref())
        .collect();
    assert_eq!(parents, [Some("elsewhere"), Some("c1"), None]);

    // Re-storing without a parent clears it: the stored record is the new one.
    b.store_checkpoint(&cp("t1", "c2", json!(2))).await.unwrap();
    assert_eq!(get("c2").await.parent_checkpoint_id, None);
}

pub async fn pending_writes_keep_order_and_are_idempotent(b: Arc<dyn StorageBackend>) {
    let t1 = [
        WriteInput::new("messages", json!({"content": "a"})),
        WriteInput::new("counter", json!(1)),
    ];
    let t2 = [WriteInput::new("messages", json!("from t2"))];
    // The checkpoint need not exist yet.
    b.put_writes("th", "", "c1", "t1", &t1).await.unwrap();
    b.put_writes("th", "", "c1", "t2", &t2).await.unwrap();
    b.put_writes("th", "", "c1", "t1", &t1).await.unwrap();

    let expected = vec![
        pw("t1", 0, "messages", json!({"content": "a"})),
        pw("t1", 1, "counter", json!(1)),
        pw("t2", 0, "messages", json!("from t2")),
    ];
    assert_eq!(b.get_writes("th", "", "c1").await.unwrap(), expected);

    // A replay with a changed value replaces in place: same position, new value.
    let changed = [
        WriteInput::new("messages", json!({"content": "a"})),
        WriteInput::new("counter", json!(2)),
    ];
    b.put_writes("th", "", "c1", "t1", &changed).await.unwrap();
    let expected = vec![
        pw("t1", 0, "messages", json!({"content": "a"})),
        pw("t1", 1, "counter", json!(2)),
        pw("t2", 0, "messages", json!("from t2")),
    ];
    assert_eq!(b.get_writes("th", "", "c1").await.unwrap(), expected);

    // A longer replay keeps the first positions and appends the new index at the end.
    let longer = [
        WriteInput::new("messages", json!("x")),
        WriteInput::new("counter", json!(3)),
        WriteInput::new("extra", json!(null)),
    ];
    b.put_writes("th", "", "c1", "t1", &longer).await.unwrap();
    let expected = vec![
        pw("t1", 0, "messages", json!("x")),
        pw("t1", 1, "counter", json!(3)),
        pw("t2", 0, "messages", json!("from t2")),
        pw("t1", 2, "extra", json!(null)),
    ];
    assert_eq!(b.get_writes("th", "", "c1").await.unwrap(), expected);

    // Storing the checkpoint afterwards leaves its writes alone.
    b.store_checkpoint(&cp("th", "c1", json!({})))
        .await
        .unwrap();
    assert_eq!(b.get_writes("th", "", "c1").await.unwrap(), expected);
}

pub async fn pending_writes_are_per_checkpoint_and_namespace(b: Arc<dyn StorageBackend>) {
    let w = |v: i64| [WriteInput::new("ch", json!(v))];
    b.put_writes("th", "", "c1", "task", &w(1)).await.unwrap();
    b.put_writes("th", "", "c2", "task", &w(2)).await.unwrap();
    b.put_writes("th", "child", "c1", "task", &w(3))
        .await
        .unwrap();
    b.put_writes("other", "", "c1", "task", &w(4))
        .await
        .unwrap();

    let get = |thread: &'static str, ns: &'static str, id: &'static str| {
        let b = b.clone();
        async move { b.get_writes(thread, ns, id).await.unwrap() }
    };
    assert_eq!(
        get("th", "", "c1").await,
        vec![pw("task", 0, "ch", json!(1))]
    );
    assert_eq!(
        get("th", "", "c2").await,
        vec![pw("task", 0, "ch", json!(2))]
    );
    assert_eq!(
        get("th", "child", "c1").await,
        vec![pw("task", 0, "ch", json!(3))]
    );
    assert_eq!(
        get("other", "", "c1").await,
        vec![pw("task", 0, "ch", json!(4))]
    );
    assert!(get("th", "child", "c2").await.is_empty());
    assert!(get("th", "", "c3").await.is_empty());
}

pub async fn delete_thread_removes_everything_of_that_thread(b: Arc<dyn StorageBackend>) {
    for thread in ["t1", "t2"] {
        for ns in ["", "child"] {
            for id in ["c1", "c2"] {
                b.store_checkpoint(&cp(thread, id, json!(id)).with_namespace(ns))
                    .await
                    .unwrap();
                b.put_writes(thread, ns, id, "task", &[WriteInput::new("ch", json!(1))])
                    .await
                    .unwrap();
            }
        }
    }
    b.delete_thread("t1").await.unwrap();

    for ns in ["", "child"] {
        assert_eq!(b.get_checkpoint("t1", ns, None).await.unwrap(), None);
        assert_eq!(b.get_checkpoint("t1", ns, Some("c1")).await.unwrap(), None);
        assert!(b
            .list_checkpoints("t1", ns, &CheckpointFilter::new())
            .await
            .unwrap()
            .is_empty());
        for id in ["c1", "c2"] {
            assert!(b.get_writes("t1", ns, id).await.unwrap().is_empty());
        }

        let other = b
            .list_checkpoints("t2", ns, &CheckpointFilter::new())
            .await
            .unwrap();
        assert_eq!(ids(&other), ["c2", "c1"]);
        for id in ["c1", "c2"] {
            assert_eq!(b.get_writes("t2", ns, id).await.unwrap().len(), 1);
        }
    }

    // Deleting a missing thread is fine; a deleted thread starts afresh.
    b.delete_thread("t1").await.unwrap();
    b.delete_thread("never").await.unwrap();
    b.store_checkpoint(&cp("t1", "c2", json!("new")))
        .await
        .unwrap();
    b.store_checkpoint(&cp("t1", "c9", json!("newer")))
        .await
        .unwrap();
    let listed = b
        .list_checkpoints("t1", "", &CheckpointFilter::new())
        .await
        .unwrap();
    assert_eq!(ids(&listed), ["c9", "c2"]);
    assert_eq!(listed[1].data, json!("new"));
}

pub async fn batch_put_writes_matches_sequential_puts(b: Arc<dyn StorageBackend>) {
    let w = |channel: &str, v: i64| WriteInput::new(channel, json!(v));
    let item = |cp: &str, task: &str, writes: Vec<WriteInput>| TaskWrites {
        thread_id: "t1".into(),
        checkpoint_ns: String::new(),
        checkpoint_id: cp.into(),
        task_id: task.into(),
        writes,
    };
    let results = b
        .batch_put_writes(&[
            item("c1", "a", vec![w("x", 1), w("y", 2)]),
            item("c1", "", vec![w("bad", 0)]),
            item("c2", "a", vec![w("z", 3)]),
            // The same task again in one batch: replaced in place, as a second put would.
            item("c1", "a", vec![w("x", 10)]),
            item("c1", "b", vec![w("q", 4)]),
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 5);
    assert!(results[0].is_ok() && results[2].is_ok() && results[3].is_ok());
    assert!(
        matches!(
            &results[1],
            Err(aiecs_storage::StorageError::InvalidInput {
                field: "task_id",
                ..
            })
        ),
        "{:?}",
        results[1]
    );
    assert_eq!(
        b.get_writes("t1", "", "c1").await.unwrap(),
        vec![
            pw("a", 0, "x", json!(10)),
            pw("a", 1, "y", json!(2)),
            pw("b", 0, "q", json!(4)),
        ]
    );
    assert_eq!(
        b.get_writes("t1", "", "c2").await.unwrap(),
        vec![pw("a", 0, "z", json!(3))]
    );
}

pub async fn list_threads_pages_every_thread_once_in_order(b: Arc<dyn StorageBackend>) {
    // Threads with checkpoints, threads with only pending writes, ids needing escapes.
    let mut expected = Vec::new();
    for i in 0..23 {
        let thread = format!("t{i:02}:x{{{i}}}");
        if i % 3 == 0 {
            b.put_writes(
                &thread,
                "ns",
                "c1",
                "task",
                &[WriteInput::new("ch", json!(i))],
            )
            .await
            .unwrap();
        } else {
            b.store_checkpoint(&cp(&thread, "c1", json!(i)))
                .await
                .unwrap();
        }
        expected.push(thread);
    }
    b.store_checkpoint(&cp("gone", "c1", json!(0)))
        .await
        .unwrap();
    b.delete_thread("gone").await.unwrap();
    expected.sort();

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = b.list_threads(after.as_deref(), 10).await.unwrap();
        assert!(page.ids.len() <= 10);
        seen.extend(page.ids.iter().cloned());
        match page.next_cursor {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, expected);
    assert!(matches!(
        b.list_threads(None, 0).await,
        Err(aiecs_storage::StorageError::InvalidInput { field: "limit", .. })
    ));
}

pub async fn list_checkpoint_namespaces_names_each_once(b: Arc<dyn StorageBackend>) {
    b.store_checkpoint(&cp("t1", "c1", json!(1))).await.unwrap();
    b.store_checkpoint(&cp("t1", "c2", json!(2)).with_namespace("child:1"))
        .await
        .unwrap();
    b.store_checkpoint(&cp("t1", "c3", json!(3)).with_namespace("child:1"))
        .await
        .unwrap();
    b.put_writes(
        "t1",
        "writes-only",
        "c9",
        "task",
        &[WriteInput::new("x", json!(0))],
    )
    .await
    .unwrap();
    b.store_checkpoint(&cp("t2", "c1", json!(1)).with_namespace("elsewhere"))
        .await
        .unwrap();
    assert_eq!(
        b.list_checkpoint_namespaces("t1").await.unwrap(),
        ["", "child:1", "writes-only"]
    );
    assert!(b
        .list_checkpoint_namespaces("none")
        .await
        .unwrap()
        .is_empty());
}

pub async fn list_write_checkpoints_names_checkpoints_with_writes_stored_or_not(
    b: Arc<dyn StorageBackend>,
) {
    b.store_checkpoint(&cp("t1", "stored-no-writes", json!(0)))
        .await
        .unwrap();
    b.store_checkpoint(&cp("t1", "c:2", json!(0)))
        .await
        .unwrap();
    for (ns, checkpoint) in [
        ("", "c:2"),
        ("", "b-never-stored"),
        ("", "a%7B{x}"),
        ("other", "z"),
    ] {
        b.put_writes(
            "t1",
            ns,
            checkpoint,
            "task",
            &[WriteInput::new("x", json!(0))],
        )
        .await
        .unwrap();
    }
    b.put_writes(
        "t2",
        "",
        "elsewhere",
        "task",
        &[WriteInput::new("x", json!(0))],
    )
    .await
    .unwrap();
    // Storing no writes stores nothing to list.
    b.put_writes("t1", "", "empty", "task", &[]).await.unwrap();
    assert_eq!(
        b.list_write_checkpoints("t1", "").await.unwrap(),
        ["a%7B{x}", "b-never-stored", "c:2"]
    );
    assert_eq!(
        b.list_write_checkpoints("t1", "other").await.unwrap(),
        ["z"]
    );
    assert!(b
        .list_write_checkpoints("none", "")
        .await
        .unwrap()
        .is_empty());
    b.delete_thread("t1").await.unwrap();
    assert!(b.list_write_checkpoints("t1", "").await.unwrap().is_empty());
}

pub async fn restore_checkpoints_keeps_store_order_and_created_at(b: Arc<dyn StorageBackend>) {
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let make = |id: &str, parent: Option<&str>, t: &str, ns: &str| Checkpoint {
        thread_id: "t1".into(),
        checkpoint_ns: ns.into(),
        checkpoint_id: id.into(),
        parent_checkpoint_id: parent.map(str::to_owned),
        data: json!({"id": id}),
        metadata: md(json!({"source": "loop"})),
        created_at: at(t),
    };
    // Ids whose order differs from store order.
    let cps = vec![
        make("z", None, "2024-03-01T00:00:00Z", ""),
        make("a", Some("z"), "2024-03-01T00:00:01Z", ""),
        make("m", Some("a"), "2024-03-01T00:00:02.000001Z", ""),
        make("a", None, "2024-03-01T00:00:09Z", "child"),
    ];
    b.restore_checkpoints(&cps).await.unwrap();
    let list = b
        .list_checkpoints("t1", "", &CheckpointFilter::new())
        .await
        .unwrap();
    assert_eq!(list, vec![cps[2].clone(), cps[1].clone(), cps[0].clone()]);
    assert_eq!(
        b.get_checkpoint("t1", "child", None).await.unwrap(),
        Some(cps[3].clone())
    );
    // Restoring an existing id again updates it in place; latest does not change.
    let mut changed = cps[1].clone();
    changed.data = json!("changed");
    b.restore_checkpoints(std::slice::from_ref(&changed))
        .await
        .unwrap();
    assert_eq!(
        b.get_checkpoint("t1", "", None)
            .await
            .unwrap()
            .unwrap()
            .checkpoint_id,
        "m"
    );
    assert_eq!(
        b.get_checkpoint("t1", "", Some("a")).await.unwrap(),
        Some(changed)
    );
}
