//! Sessions: creation, upsert, atomic updates, batches and listing.

use std::sync::Arc;

use aiecs_storage::{
    NewSession, SessionMetrics, SessionQuery, SessionStatus, SessionUpdate, StorageBackend,
    StorageError,
};
use serde_json::json;

use super::{md, pause};

pub async fn get_missing_session_is_none(b: Arc<dyn StorageBackend>) {
    assert_eq!(b.get_session("nope").await.unwrap(), None);
    // A near miss must not match either: lookups are exact.
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    assert_eq!(b.get_session("s").await.unwrap(), None);
    assert_eq!(b.get_session("s10").await.unwrap(), None);
}

pub async fn create_returns_active_session(b: Arc<dyn StorageBackend>) {
    let meta = md(json!({"channel": "web", "n": 3}));
    let s = b.create_session("s1", "u1", &meta).await.unwrap();
    assert_eq!(s.session_id, "s1");
    assert_eq!(s.user_id, "u1");
    assert_eq!(s.status, SessionStatus::ACTIVE);
    assert_eq!(s.metadata, meta);
    assert_eq!(s.metrics, SessionMetrics::default());
    assert_eq!(s.created_at, s.updated_at);
}

pub async fn create_then_get_round_trips(b: Arc<dyn StorageBackend>) {
    let meta = md(json!({"a": [1, 2, {"b": null}], "f": 1.5, "t": true}));
    let created = b.create_session("s1", "u1", &meta).await.unwrap();
    let got = b.get_session("s1").await.unwrap().expect("session stored");
    // Whole-struct equality also pins timestamps to the microsecond.
    assert_eq!(got, created);
}

pub async fn create_on_existing_id_is_upsert(b: Arc<dyn StorageBackend>) {
    let first = b
        .create_session("s1", "u1", &md(json!({"a": 1, "keep": "no"})))
        .await
        .unwrap();
    let update = SessionUpdate::new()
        .increment_requests()
        .increment_requests()
        .add_processing_time(1.25)
        .mark_error()
        .status("paused");
    assert!(b.update_session("s1", &update).await.unwrap());
    let before = b.get_session("s1").await.unwrap().unwrap();
    pause().await;

    let again = b
        .create_session("s1", "u2", &md(json!({"b": 2})))
        .await
        .unwrap();
    assert_eq!(again.user_id, "u2");
    // Replaced, not merged: the old keys are gone.
    assert_eq!(again.metadata, md(json!({"b": 2})));
    assert_eq!(again.created_at, first.created_at);
    assert_eq!(again.status, "paused");
    assert_eq!(
        again.metrics,
        SessionMetrics {
            request_count: 2,
            total_processing_time: 1.25,
            error_count: 1
        }
    );
    assert!(
        again.updated_at > before.updated_at,
        "upsert must move updated_at: {} -> {}",
        before.updated_at,
        again.updated_at
    );
    assert_eq!(b.get_session("s1").await.unwrap().unwrap(), again);
}

pub async fn update_merges_metadata_and_sets_status(b: Arc<dyn StorageBackend>) {
    let created = b
        .create_session("s1", "u1", &md(json!({"a": 1, "b": {"x": 1}})))
        .await
        .unwrap();
    pause().await;
    let update = SessionUpdate::new()
        .metadata_entry("b", json!({"y": 2}))
        .metadata_entry("c", "new")
        .status(SessionStatus::FAILED);
    assert!(b.update_session("s1", &update).await.unwrap());
    let s = b.get_session("s1").await.unwrap().unwrap();
    // Top-level merge: "a" kept, "b" replaced whole (not deep-merged), "c" added.
    assert_eq!(s.metadata, md(json!({"a": 1, "b": {"y": 2}, "c": "new"})));
    assert_eq!(s.status, SessionStatus::FAILED);
    assert_eq!(s.user_id, "u1");
    assert_eq!(s.created_at, created.created_at);
    assert!(s.updated_at > created.updated_at);
    assert_eq!(s.metrics, SessionMetrics::default());

    // An update without a status keeps the status.
    let update = SessionUpdate::new().metadata_entry("a", 2);
    assert!(b.update_session("s1", &update).await.unwrap());
    let s = b.get_session("s1").await.unwrap().unwrap();
    assert_eq!(s.status, SessionStatus::FAILED);
    assert_eq!(s.metadata["a"], json!(2));
    assert_eq!(s.metadata["c"], json!("new"));
}

pub async fn update_missing_session_is_false(b: Arc<dyn StorageBackend>) {
    let update = SessionUpdate::new().increment_requests().status("x");
    assert!(!b.update_session("ghost", &update).await.unwrap());
    // A false update must not create the session.
    assert_eq!(b.get_session("ghost").await.unwrap(), None);
}

pub async fn counters_add_up(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let updates = [
        SessionUpdate::new().increment_requests(),
        SessionUpdate::new()
            .increment_requests()
            .add_processing_time(0.5),
        SessionUpdate::new().mark_error(),
        SessionUpdate::new()
            .increment_requests()
            .increment_requests()
            .add_processing_time(2.25)
            .mark_error(),
        SessionUpdate::new().add_processing_time(0.25),
        SessionUpdate::new(),
    ];
    for u in &updates {
        assert!(b.update_session("s1", u).await.unwrap());
    }
    let s = b.get_session("s1").await.unwrap().unwrap();
    assert_eq!(
        s.metrics,
        SessionMetrics {
            request_count: 4,
            total_processing_time: 3.0,
            error_count: 2
        }
    );
    assert_eq!(s.status, SessionStatus::ACTIVE);
}

/// Counters saturate at their maximum instead of overflowing: the same on every backend,
/// each update applied in full, and the session still readable and listable afterwards.
pub async fn counters_saturate_instead_of_overflowing(b: Arc<dyn StorageBackend>) {
    b.create_session("s1", "u1", &md(json!({}))).await.unwrap();
    let huge = SessionUpdate {
        add_requests: i64::MAX as u64,
        add_errors: i64::MAX as u64,
        add_processing_time: f64::MAX,
        ..Default::default()
    };
    let one = SessionUpdate::new()
        .increment_requests()
        .mark_error()
        .add_processing_time(1.0);
    let max = SessionMetrics {
        request_count: i64::MAX as u64,
        total_processing_time: f64::MAX,
        error_count: i64::MAX as u64,
    };
    // The first update lands exactly on the maxima; the next two would overflow.
    for (i, u) in [&huge, &huge, &one].into_iter().enumerate() {
        assert!(b.update_session("s1", u).await.unwrap(), "update {i}");
        let s = b
            .get_session("s1")
            .await
            .unwrap()
            .expect("session still reads");
        println!("after update {i}: {:?}", s.metrics);
        assert_eq!(s.metrics, max, "counters after update {i}");
    }
    let page = b
        .list_sessions(&SessionQuery::new().limit(100))
        .await
        .unwrap();
    let listed = page.sessions.iter().find(|s| s.session_id == "s1");
    assert_eq!(listed.map(|s| &s.metrics), Some(&max), "listed counters");
    // A saturated session still takes ordinary updates, counters unchanged.
    assert!(b
        .update_session("s1", &SessionUpdate::new().status("paused"))
        .await
        .unwrap());
    let s = b.get_session("s1").await.unwrap().unwrap();
    assert_eq!(s.status, "paused");
    assert_eq!(s.metrics, max);
}

pub async fn end_session_sets_status(b: Arc<dyn StorageBackend>) {
    let created = b
        .create_session("s1", "u1", &md(json!({"k": 1})))
        .await
        .unwrap();
    b.update_session("s1", &SessionUpdate::new().increment_requests())
        .await
        .unwrap();
    let before = b.get_session("s1").await.unwrap().unwrap();
    pause().await;
    assert!(b.end_session("s1", SessionStatus::COMPLETED).await.unwrap());
    let s = b.get_session("s1").await.unwrap().unwrap();
    assert_eq!(s.status, SessionStatus::COMPLETED);
    assert!(
        s.updated_at > before.updated_at,
        "end_session must move updated_at"
    );
    assert_eq!(s.created_at, created.created_at);
    assert_eq!(s.metadata, created.metadata);
    assert_eq!(s.metrics.request_count, 1);

    // Any status string is accepted, not just the well-known ones.
    assert!(b.end_session("s1", "archived").await.unwrap());
    assert_eq!(
        b.get_session("s1").await.unwrap().unwrap().status,
        "archived"
    );
}

pub async fn end_missing_session_is_false(b: Arc<dyn StorageBackend>) {
    assert!(!b
        .end_session("ghost", SessionStatus::COMPLETED)
        .await
        .unwrap());
    assert_eq!(b.get_session("ghost").await.unwrap(), None);
}

pub async fn batch_create_then_batch_get_keeps_order(b: Arc<dyn StorageBackend>) {
    let inputs = vec![
        NewSession::new("s3", "u1").with_metadata(md(json!({"i": 0}))),
        NewSession::new("s1", "u2").with_metadata(md(json!({"i": 1}))),
        NewSession::new("s2", "u1"),
    ];
    let created = b.batch_create_sessions(&inputs).await.unwrap();
    assert_eq!(created.len(), 3);
    for (c, i) in created.iter().zip(&inputs) {
        assert_eq!(c.session_id, i.session_id);
        assert_eq!(c.user_id, i.user_id);
        assert_eq!(c.metadata, i.metadata);
        assert_eq!(c.status, SessionStatus::ACTIVE);
        assert_eq!(c.metrics, SessionMetrics::default());
    }

    let ids: Vec<String> = ["s2", "missing", "s3", "s1", "s2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let got = b.batch_get_sessions(&ids).await.unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(got[0].as_ref(), Some(&created[2]));
    assert_eq!(got[1], None);
    assert_eq!(got[2].as_ref(), Some(&created[0]));
    assert_eq!(got[3].as_ref(), Some(&created[1]));
    assert_eq!(got[4].as_ref(), Some(&created[2]));

    assert!(b.batch_get_sessions(&[]).await.unwrap().is_empty());
}

pub async fn batch_create_upserts_existing(b: Arc<dyn StorageBackend>) {
    let first = b
        .create_session("s1", "u1", &md(json!({"old": true})))
        .await
        .unwrap();
    b.update_session(
        "s1",
        &SessionUpdate::new().increment_requests().status("busy"),
    )
    .await
    .unwrap();
    let out = b
        .batch_create_sessions(&[
            NewSession::new("s1", "u9").with_metadata(md(json!({"new": true}))),
            NewSession::new("s2", "u2"),
        ])
        .await
        .unwrap();
    assert_eq!(out[0].user_id, "u9");
    assert_eq!(out[0].metadata, md(json!({"new": true})));
    assert_eq!(out[0].created_at, first.created_at);
    assert_eq!(out[0].status, "busy");
    assert_eq!(out[0].metrics.request_count, 1);
    assert_eq!(b.get_session("s1").await.unwrap().unwrap(), out[0]);
    assert_eq!(b.get_session("s2").await.unwrap().unwrap(), out[1]);
}

/// 25 sessions, created out of id order, alternating between two users.
async fn populate_for_listing(b: &Arc<dyn StorageBackend>) -> Vec<String> {
    let mut ids: Vec<String> = (0..25).map(|i| format!("s{i:02}")).collect();
    // A fixed shuffle: listing must sort by id, not by insertion.
    ids.sort_by_key(|id| {
        let n: u32 = id[1..].parse().unwrap();
        (n * 7) % 25
    });
    for id in &ids {
        let n: u32 = id[1..].parse().unwrap();
        let user = if n.is_multiple_of(2) { "even" } else { "odd" };
        b.create_session(id, user, &md(json!({"n": n})))
            .await
            .unwrap();
    }
    ids.sort();
    ids
}

pub async fn list_sessions_pages_in_id_order(b: Arc<dyn StorageBackend>) {
    let expected = populate_for_listing(&b).await;
    let mut seen = Vec::new();
    let mut query = SessionQuery::new().limit(10);
    let mut pages = 0;
    loop {
        let page = b.list_sessions(&query).await.unwrap();
        pages += 1;
        assert!(page.sessions.len() <= 10);
        seen.extend(page.sessions.iter().map(|s| s.session_id.clone()));
        match page.next_cursor {
            Some(cursor) => {
                assert_eq!(
                    Some(&cursor),
                    page.sessions.last().map(|s| &s.session_id),
                    "the cursor is the last id of the page"
                );
                query = query.after(cursor);
            }
            None => break,
        }
        assert!(pages < 10, "paging does not terminate");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);

    // One big page has everything and no cursor.
    let page = b
        .list_sessions(&SessionQuery::new().limit(100))
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 25);
    assert_eq!(page.next_cursor, None);
    // The listed records are the stored ones.
    let s07 = page
        .sessions
        .iter()
        .find(|s| s.session_id == "s07")
        .unwrap();
    assert_eq!(Some(s07.clone()), b.get_session("s07").await.unwrap());

    // `after` is exclusive.
    let page = b
        .list_sessions(&SessionQuery::new().after("s20").limit(100))
        .await
        .unwrap();
    let ids: Vec<&str> = page
        .sessions
        .iter()
        .map(|s| s.session_id.as_str())
        .collect();
    assert_eq!(ids, ["s21", "s22", "s23", "s24"]);
}

pub async fn list_sessions_filters_by_user_and_status(b: Arc<dyn StorageBackend>) {
    populate_for_listing(&b).await;
    for id in ["s03", "s04", "s05", "s17"] {
        assert!(b.end_session(id, SessionStatus::COMPLETED).await.unwrap());
    }
    let ids = |page: aiecs_storage::SessionPage| -> Vec<String> {
        page.sessions.into_iter().map(|s| s.session_id).collect()
    };

    let odd: Vec<String> = (0..25)
        .filter(|n| n % 2 == 1)
        .map(|n| format!("s{n:02}"))
        .collect();
    let got = b
        .list_sessions(&SessionQuery::new().user("odd"))
        .await
        .unwrap();
    assert!(got.sessions.iter().all(|s| s.user_id == "odd"));
    assert_eq!(ids(got), odd);

    // User filter with paging: the cursor continues within the filter.
    let first = b
        .list_sessions(&SessionQuery::new().user("even").limit(5))
        .await
        .unwrap();
    let cursor = first.next_cursor.clone().expect("more even sessions");
    assert_eq!(ids(first), ["s00", "s02", "s04", "s06", "s08"]);
    let second = b
        .list_sessions(&SessionQuery::new().user("even").after(cursor).limit(5))
        .await
        .unwrap();
    assert_eq!(ids(second), ["s10", "s12", "s14", "s16", "s18"]);

    let done = b
        .list_sessions(&SessionQuery::new().status(SessionStatus::COMPLETED))
        .await
        .unwrap();
    assert_eq!(ids(done), ["s03", "s04", "s05", "s17"]);

    let both = b
        .list_sessions(
            &SessionQuery::new()
                .user("odd")
                .status(SessionStatus::COMPLETED),
        )
        .await
        .unwrap();
    assert_eq!(ids(both), ["s03", "s05", "s17"]);

    let active = b
        .list_sessions(&SessionQuery::new().status(SessionStatus::ACTIVE))
        .await
        .unwrap();
    assert_eq!(active.sessions.len(), 21);

    let none = b
        .list_sessions(&SessionQuery::new().user("nobody"))
        .await
        .unwrap();
    assert!(none.sessions.is_empty());
    assert_eq!(none.next_cursor, None);
}

pub async fn restore_sessions_writes_every_field_exactly(b: Arc<dyn StorageBackend>) {
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let mut session = aiecs_storage::Session {
        session_id: "old".into(),
        user_id: "u9".into(),
        created_at: at("2024-01-02T03:04:05.123456Z"),
        updated_at: at("2024-02-03T04:05:06.654321Z"),
        status: "completed".into(),
        metadata: md(json!({"k": {"nested": [1, 2.5, "x"]}, "n": null})),
        metrics: aiecs_storage::SessionMetrics {
            request_count: 7,
            total_processing_time: 1.5,
            error_count: 2,
        },
    };
    b.create_session("old", "someone", &md(json!({"stale": true})))
        .await
        .unwrap();
    b.restore_sessions(std::slice::from_ref(&session))
        .await
        .unwrap();
    assert_eq!(b.get_session("old").await.unwrap().unwrap(), session);
    // Again with other values: overwritten, not merged or added to.
    session.metrics.request_count = 3;
    session.metadata = md(json!({"only": 1}));
    b.restore_sessions(std::slice::from_ref(&session))
        .await
        .unwrap();
    assert_eq!(b.get_session("old").await.unwrap().unwrap(), session);
    // Counters keep adding from the restored values.
    b.update_session("old", &SessionUpdate::new().increment_requests())
        .await
        .unwrap();
    let s = b.get_session("old").await.unwrap().unwrap();
    assert_eq!(s.metrics.request_count, 4);
    let mut bad = session.clone();
    bad.session_id = String::new();
    assert!(matches!(
        b.restore_sessions(&[bad]).await,
        Err(StorageError::InvalidInput {
            field: "session_id",
            ..
        })
    ));
}

pub async fn delete_session_removes_it_with_messages_and_context(b: Arc<dyn StorageBackend>) {
    for id in ["a", "b"] {
        b.create_session(id, "u1", &md(json!({}))).await.unwrap();
        b.add_conversation_message(
            id,
            &aiecs_storage::NewMessage::new("user", "hi").with_id("m1"),
        )
        .await
        .unwrap();
        b.store_task_context(id, &json!({"id": id})).await.unwrap();
    }
    b.store_task_context("orphan", &json!(1)).await.unwrap();
    assert!(b.delete_session("a").await.unwrap());
    assert!(b.get_session("a").await.unwrap().is_none());
    assert!(b
        .get_conversation_history("a", 10)
        .await
        .unwrap()
        .is_empty());
    assert!(b.get_task_context("a").await.unwrap().is_none());
    assert!(!b.delete_session("a").await.unwrap());
    // A context without a session goes too; the answer says there was no session.
    assert!(!b.delete_session("orphan").await.unwrap());
    assert!(b.get_task_context("orphan").await.unwrap().is_none());
    // Others are untouched; the id can be used afresh.
    assert_eq!(b.get_conversation_history("b", 10).await.unwrap().len(), 1);
    assert!(b.get_task_context("b").await.unwrap().is_some());
    b.create_session("a", "u2", &md(json!({}))).await.unwrap();
    assert_eq!(
        b.get_session("a")
            .await
            .unwrap()
            .unwrap()
            .metrics
            .request_count,
        0
    );
    assert!(b
        .get_conversation_history("a", 10)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        b.delete_session("").await,
        Err(StorageError::InvalidInput {
            field: "session_id",
            ..
        })
    ));
}
