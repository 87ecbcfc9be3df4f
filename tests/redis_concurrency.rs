//! Redis behaviour under concurrent writers, on a single node and on a cluster.
//!
//! Needs `AIECS_TEST_REDIS_URL` and/or `AIECS_TEST_REDIS_CLUSTER_URL`; without them each
//! test prints a notice and passes, except under `CI=true`.
#![cfg(feature = "redis")]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::prelude::*;
use aiecs_storage::{
    CheckpointFilter, IdPage, Metadata, NewCheckpoint, NewSession, RedisBackend, SessionQuery,
};
use serde_json::json;

mod common;

/// The servers configured for this run: (name, URL).
fn servers() -> Vec<(&'static str, String)> {
    [
        ("node", "AIECS_TEST_REDIS_URL"),
        ("cluster", "AIECS_TEST_REDIS_CLUSTER_URL"),
    ]
    .into_iter()
    .filter_map(|(name, var)| common::server_url(var, "redis").map(|url| (name, url)))
    .collect()
}

fn prefix() -> String {
    format!("{}:", common::unique_name("redis_conc"))
}

/// Checkpoints stored before the listing starts: several pages for a filtered listing.
const SEEDED: u64 = 400;
/// Checkpoints the writer stores while the reader lists.
const WRITTEN: u64 = 600;
const LIMIT: usize = 50;

fn checkpoint_id(seq: u64) -> String {
    format!("cp-{seq:08}")
}

fn seq_of(checkpoint_id: &str) -> u64 {
    checkpoint_id
        .strip_prefix("cp-")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected checkpoint id {checkpoint_id}"))
}

/// One checkpoint in three matches the filter, so a listing of `LIMIT` reads about
/// `3 * LIMIT` rows: more than one internal page.
fn kept(seq: u64) -> bool {
    seq.is_multiple_of(3)
}

fn checkpoint(thread: &str, seq: u64) -> NewCheckpoint {
    let mut metadata = Metadata::new();
    metadata.insert(
        "kind".into(),
        json!(if kept(seq) { "kept" } else { "other" }),
    );
    NewCheckpoint::new(thread, checkpoint_id(seq), json!({ "seq": seq })).with_metadata(metadata)
}

async fn filtered_listing_under_concurrent_stores(server: &str, url: &str) {
    let backend = Arc::new(RedisBackend::new(url).unwrap().with_prefix(prefix()));
    let thread = "busy-thread";
    for seq in 0..SEEDED {
        backend
            .store_checkpoint(&checkpoint(thread, seq))
            .await
            .unwrap();
    }
    // The highest sequence whose store has returned, plus one: every checkpoint below it
    // existed before a listing that reads it first.
    let stored = Arc::new(AtomicU64::new(SEEDED));
    let writer = tokio::spawn({
        let (backend, stored) = (backend.clone(), stored.clone());
        async move {
            for seq in SEEDED..SEEDED + WRITTEN {
                backend
                    .store_checkpoint(&checkpoint(thread, seq))
                    .await
                    .unwrap();
                stored.store(seq + 1, Ordering::SeqCst);
            }
        }
    });
    let filter = CheckpointFilter::new()
        .limit(LIMIT)
        .metadata_entry("kind", "kept");
    let mut listings = 0;
    loop {
        let finished = writer.is_finished();
        let existing = stored.load(Ordering::SeqCst);
        let listed = backend.list_checkpoints(thread, "", &filter).await.unwrap();
        listings += 1;
        let seqs: Vec<u64> = listed.iter().map(|c| seq_of(&c.checkpoint_id)).collect();
        let mut distinct = seqs.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            seqs.len(),
            "{server}: listing {listings} returned a checkpoint twice: {seqs:?}"
        );
        assert!(
            seqs.windows(2).all(|w| w[0] > w[1]),
            "{server}: listing {listings} is not newest first: {seqs:?}"
        );
        assert!(
            seqs.iter().all(|&s| kept(s)),
            "{server}: listing {listings} ignored the filter: {seqs:?}"
        );
        assert_eq!(seqs.len(), LIMIT, "{server}: listing {listings}");
        // Below `existing` the answer is fixed: every kept checkpoint from the oldest
        // returned up, none skipped.
        let oldest = *seqs.last().unwrap();
        let expected: Vec<u64> = (oldest..existing).rev().filter(|&s| kept(s)).collect();
        let old: Vec<u64> = seqs.iter().copied().filter(|&s| s < existing).collect();
        assert_eq!(
            old, expected,
            "{server}: listing {listings} skipped a checkpoint that existed when it started"
        );
        if finished {
            break;
        }
    }
    writer.await.unwrap();
    eprintln!("{server}: {listings} filtered listings while another task stored");
}

/// A filtered listing pages internally; checkpoints stored meanwhile arrive at the head
/// and must neither repeat a checkpoint nor push one out of the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_list_checkpoints_is_consistent_while_another_task_stores() {
    for (server, url) in servers() {
        filtered_listing_under_concurrent_stores(server, &url).await;
    }
}

/// Ids raced per round: enough that the two connections' commands interleave.
const RACED: usize = 64;
/// Rounds of the delete/re-create races.
const ROUNDS: usize = 60;

fn raced_id(i: usize) -> String {
    format!("raced-{i:03}")
}

/// Every session id `list_sessions` returns, page by page.
async fn listed_sessions(backend: &RedisBackend) -> BTreeSet<String> {
    let (mut query, mut ids) = (SessionQuery::new().limit(7), BTreeSet::new());
    loop {
        let page = backend.list_sessions(&query).await.unwrap();
        ids.extend(page.sessions.into_iter().map(|s| s.session_id));
        match page.next_cursor {
            Some(cursor) => query.after = Some(cursor),
            None => return ids,
        }
    }
}

/// Every id an `IdPage` listing returns, page by page.
async fn listed_ids<F, Fut>(list: F) -> BTreeSet<String>
where
    F: Fn(Option<String>) -> Fut,
    Fut: std::future::Future<Output = aiecs_storage::Result<IdPage>>,
{
    let (mut after, mut ids) = (None, BTreeSet::new());
    loop {
        let page = list(after.clone()).await.unwrap();
        ids.extend(page.ids);
        match page.next_cursor {
            Some(cursor) => after = Some(cursor),
            None => return ids,
        }
    }
}

/// Two backends on the server: two connections, so their commands interleave at the
/// server as two processes' would.
fn two_clients(url: &str) -> (Arc<RedisBackend>, Arc<RedisBackend>) {
    let prefix = prefix();
    let client = || Arc::new(RedisBackend::new(url).unwrap().with_prefix(prefix.clone()));
    (client(), client())
}

async fn delete_session_races_create(server: &str, url: &str) {
    let (a, b) = two_clients(url);
    for round in 0..ROUNDS {
        // Every other round starts from existing sessions, so the delete has one to remove.
        if round % 2 == 0 {
            let seed: Vec<NewSession> = (0..RACED)
                .map(|i| NewSession::new(raced_id(i), "seed"))
                .collect();
            a.batch_create_sessions(&seed).await.unwrap();
            for i in 0..RACED {
                a.store_task_context(&raced_id(i), &json!({ "round": round }))
                    .await
                    .unwrap();
            }
        }
        let races = (0..RACED).map(|i| {
            let (a, b, id) = (a.clone(), b.clone(), raced_id(i));
            tokio::spawn(async move {
                let (meta, context) = (Metadata::new(), json!({ "by": "racer" }));
                // A delete may read before it writes: the writer waits for zero to two
                // round trips of its own, so its writes land at varied points of it.
                let writes = async {
                    for _ in 0..i % 3 {
                        b.get_session("no-such-session").await.unwrap();
                    }
                    tokio::join!(
                        b.create_session(&id, "racer", &meta),
                        b.store_task_context(&id, &context),
                    )
                };
                let (deleted, (created, stored)) = tokio::join!(a.delete_session(&id), writes);
                deleted.unwrap();
                created.unwrap();
                stored.unwrap();
            })
        });
        for race in futures_util::future::join_all(races).await {
            race.unwrap();
        }
        let listed = listed_sessions(&a).await;
        let contexts = listed_ids(|after| {
            let a = a.clone();
            async move { a.list_task_contexts(after.as_deref(), 7).await }
        })
        .await;
        let mut live = 0;
        for i in 0..RACED {
            let id = raced_id(i);
            let exists = a.get_session(&id).await.unwrap().is_some();
            live += usize::from(exists);
            assert_eq!(
                listed.contains(&id),
                exists,
                "{server} round {round}: session {id} exists: {exists}, listed: {}",
                listed.contains(&id)
            );
            let has_context = a.get_task_context(&id).await.unwrap().is_some();
            assert_eq!(
                contexts.contains(&id),
                has_context,
                "{server} round {round}: task context of {id} exists: {has_context}, \
                 listed: {}",
                contexts.contains(&id)
            );
        }
        // Cleanup finds sessions through its own index: with no idle time allowed, a
        // session it leaves behind is one that index lost.
        a.cleanup_expired_sessions(Duration::ZERO).await.unwrap();
        for i in 0..RACED {
            let id = raced_id(i);
            assert!(
                a.get_session(&id).await.unwrap().is_none(),
                "{server} round {round}: session {id} escaped cleanup ({live} were live)"
            );
            a.delete_session(&id).await.unwrap();
        }
    }
}

/// A delete racing a re-create of the same id, from another connection, must leave the
/// indexes agreeing with the data: a session (or task context) that exists is listed and
/// reachable by cleanup, one that does not is not listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_session_racing_create_keeps_the_indexes_true() {
    for (server, url) in servers() {
        delete_session_races_create(server, &url).await;
    }
}

async fn delete_thread_races_store(server: &str, url: &str) {
    let (a, b) = two_clients(url);
    let thread = |i: usize| format!("raced-thread-{i:03}");
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            for i in 0..RACED {
                a.store_checkpoint(&NewCheckpoint::new(thread(i), "seed", json!({})))
                    .await
                    .unwrap();
            }
        }
        let races = (0..RACED).map(|i| {
            let (a, b, id) = (a.clone(), b.clone(), thread(i));
            tokio::spawn(async move {
                let checkpoint = NewCheckpoint::new(&id, format!("r{round}"), json!({}));
                let (deleted, stored) =
                    tokio::join!(a.delete_thread(&id), b.store_checkpoint(&checkpoint));
                deleted.unwrap();
                stored.unwrap();
            })
        });
        for race in futures_util::future::join_all(races).await {
            race.unwrap();
        }
        let listed = listed_ids(|after| {
            let a = a.clone();
            async move { a.list_threads(after.as_deref(), 7).await }
        })
        .await;
        for i in 0..RACED {
            let id = thread(i);
            let exists = a.get_checkpoint(&id, "", None).await.unwrap().is_some();
            assert_eq!(
                listed.contains(&id),
                exists,
                "{server} round {round}: thread {id} exists: {exists}, listed: {}",
                listed.contains(&id)
            );
        }
    }
    for i in 0..RACED {
        a.delete_thread(&thread(i)).await.unwrap();
    }
}

/// The same race for threads: `delete_thread` against `store_checkpoint` on one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_thread_racing_store_keeps_the_thread_index_true() {
    for (server, url) in servers() {
        delete_thread_races_store(server, &url).await;
    }
}

async fn listing_while_others_come_and_go(server: &str, url: &str) {
    let (a, b) = two_clients(url);
    // Even ids stay throughout; odd ids are created and deleted while the walk runs.
    let stable: Vec<String> = (0..600).step_by(2).map(|i| format!("w{i:04}")).collect();
    let seed: Vec<NewSession> = stable.iter().map(|id| NewSession::new(id, "u")).collect();
    a.batch_create_sessions(&seed).await.unwrap();
    let churn = tokio::spawn(async move {
        for round in 0..4 {
            for i in (1..600).step_by(2) {
                let id = format!("w{i:04}");
                if round % 2 == 0 {
                    b.create_session(&id, "u", &Metadata::new()).await.unwrap();
                } else {
                    b.delete_session(&id).await.unwrap();
                }
            }
        }
    });
    let mut walks = 0;
    while !churn.is_finished() || walks == 0 {
        let (mut query, mut seen) = (SessionQuery::new().limit(13), Vec::new());
        loop {
            let page = a.list_sessions(&query).await.unwrap();
            seen.extend(page.sessions.into_iter().map(|s| s.session_id));
            match page.next_cursor {
                Some(cursor) => query.after = Some(cursor),
                None => break,
            }
        }
        walks += 1;
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "{server}: walk {walks} repeated or reordered an id"
        );
        let listed: BTreeSet<&String> = seen.iter().collect();
        let missing: Vec<&String> = stable.iter().filter(|id| !listed.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{server}: walk {walks} skipped sessions that existed throughout: {missing:?}"
        );
    }
    churn.await.unwrap();
    for i in 0..600 {
        a.delete_session(&format!("w{i:04}")).await.unwrap();
    }
}

/// Walking `list_sessions` page by page while another connection creates and deletes
/// other sessions neither repeats a session nor skips one that existed throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_sessions_pages_neither_repeat_nor_skip_under_churn() {
    for (server, url) in servers() {
        listing_while_others_come_and_go(server, &url).await;
    }
}
