//! Redis behaviour under concurrent writers, on a single node and on a cluster.
//!
//! Needs `AIECS_TEST_REDIS_URL` and/or `AIECS_TEST_REDIS_CLUSTER_URL`; without them each
//! test prints a notice and passes, except under `CI=true`.
#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aiecs_storage::prelude::*;
use aiecs_storage::{CheckpointFilter, Metadata, NewCheckpoint, RedisBackend};
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
