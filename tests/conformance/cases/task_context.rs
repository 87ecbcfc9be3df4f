//! Task context: one JSON value per session, plus the typed helpers.

use std::collections::BTreeMap;
use std::sync::Arc;

use aiecs_storage::{StorageBackend, StorageError, TaskContextExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::md;

pub async fn task_context_round_trips_nested_json(b: Arc<dyn StorageBackend>) {
    let ctx = json!({
        "plan": [
            {"step": 1, "tool": "search", "done": true},
            {"step": 2, "tool": null, "done": false, "args": []}
        ],
        "numbers": {
            "int": 42, "neg": -7, "zero": 0, "float": 0.1, "half": 2.5, "tiny": -1e-7,
            "big": u64::MAX, "min": i64::MIN
        },
        "empty": {}, "empty_list": [], "empty_str": "",
        "unicode": "naïve café — 日本語 — مرحبا — 🚀👩‍👩‍👧",
        "nested": {"a": {"b": {"c": [[1, [2, [3]]]]}}},
        "flag": false, "nothing": null
    });
    // The session need not exist.
    b.store_task_context("s1", &ctx).await.unwrap();
    assert_eq!(b.get_task_context("s1").await.unwrap(), Some(ctx));

    // Any JSON value, not only objects.
    for v in [
        json!([1, "two", null]),
        json!("just a string"),
        json!(3.5),
        json!(null),
    ] {
        b.store_task_context("s2", &v).await.unwrap();
        assert_eq!(b.get_task_context("s2").await.unwrap(), Some(v));
    }
}

pub async fn task_context_replace_overwrites(b: Arc<dyn StorageBackend>) {
    b.store_task_context("s1", &json!({"a": 1, "b": 2}))
        .await
        .unwrap();
    b.store_task_context("s1", &json!({"c": 3})).await.unwrap();
    // Replaced whole, not merged.
    assert_eq!(
        b.get_task_context("s1").await.unwrap(),
        Some(json!({"c": 3}))
    );
}

pub async fn task_context_missing_is_none(b: Arc<dyn StorageBackend>) {
    assert_eq!(b.get_task_context("s1").await.unwrap(), None);
    // A session without a context has none either.
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    assert_eq!(b.get_task_context("s1").await.unwrap(), None);
}

pub async fn task_context_is_per_session(b: Arc<dyn StorageBackend>) {
    b.store_task_context("s1", &json!({"who": 1}))
        .await
        .unwrap();
    b.store_task_context("s2", &json!({"who": 2}))
        .await
        .unwrap();
    assert_eq!(
        b.get_task_context("s1").await.unwrap(),
        Some(json!({"who": 1}))
    );
    assert_eq!(
        b.get_task_context("s2").await.unwrap(),
        Some(json!({"who": 2}))
    );
    assert_eq!(b.get_task_context("s").await.unwrap(), None);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Plan {
    goal: String,
    steps: Vec<Step>,
    budget: Option<f64>,
    tags: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Step {
    Search { query: String },
    Answer(String),
    Stop,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct OtherShape {
    count: u64,
}

pub async fn task_context_typed_helpers_round_trip(b: Arc<dyn StorageBackend>) {
    let plan = Plan {
        goal: "write the report ✍️".into(),
        steps: vec![
            Step::Search {
                query: "rust async".into(),
            },
            Step::Answer("done".into()),
            Step::Stop,
        ],
        budget: Some(12.5),
        tags: BTreeMap::from([("a".into(), 1), ("b".into(), 2)]),
    };
    b.store_task_context_as("s1", &plan).await.unwrap();
    let back: Option<Plan> = b.get_task_context_as("s1").await.unwrap();
    assert_eq!(back, Some(plan.clone()));
    // The stored value is the plain serde form, readable untyped.
    assert_eq!(
        b.get_task_context("s1").await.unwrap(),
        Some(serde_json::to_value(&plan).unwrap())
    );

    let missing: Option<Plan> = b.get_task_context_as("nope").await.unwrap();
    assert_eq!(missing, None);

    let wrong = b.get_task_context_as::<OtherShape>("s1").await;
    assert!(
        matches!(wrong, Err(StorageError::Serialization { .. })),
        "expected Serialization, got {wrong:?}"
    );
}

pub async fn list_task_contexts_pages_every_context(b: Arc<dyn StorageBackend>) {
    let mut expected = Vec::new();
    for i in 0..17 {
        let id = format!("ctx-{i:02}");
        if i % 2 == 0 {
            b.create_session(&id, "u1", &md(json!({}))).await.unwrap();
        }
        b.store_task_context(&id, &json!({"i": i})).await.unwrap();
        expected.push(id);
    }
    b.create_session("no-context", "u1", &md(json!({})))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = b.list_task_contexts(after.as_deref(), 5).await.unwrap();
        seen.extend(page.ids.iter().cloned());
        match page.next_cursor {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, expected);
    let last = b.list_task_contexts(Some("ctx-15"), 5).await.unwrap();
    assert_eq!(last.ids, ["ctx-16"]);
    assert_eq!(last.next_cursor, None);
    assert!(matches!(
        b.list_task_contexts(Some(""), 5).await,
        Err(StorageError::InvalidInput { field: "after", .. })
    ));
}
