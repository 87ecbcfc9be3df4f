//! The cache follows its backend's change feed: what another process writes drops out
//! of the cache, and nothing cached is served while the feed is down.
//!
//! The backend here is a memory store written "behind the cache" (as another process
//! would write a shared store), with a feed the test drives; the real feeds of each
//! backend are tested against their servers.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aiecs_storage::feed::{Change, FeedHub};
use aiecs_storage::layer::CacheLayer;
use aiecs_storage::{prelude::*, HealthStatus, MemoryBackend, Metadata, SessionUpdate};
use common::fault::Faults;
use serde_json::{json, Value};
use tower::Layer;

/// A cache over a memory store with a feed; the store itself, to write behind the cache.
fn stack(layer: CacheLayer) -> (Arc<dyn StorageBackend>, Arc<MemoryBackend>, FeedHub) {
    let store = Arc::new(MemoryBackend::new());
    let (inner, faults) = Faults::wrap(store.clone());
    let hub = faults.offer_feed();
    (Arc::new(layer.layer(inner)), store, hub)
}

/// The cache's figure `name` (its layer is the outermost).
async fn figure(storage: &dyn StorageBackend, name: &str) -> Value {
    storage.get_metrics().await.unwrap().values[name].clone()
}

/// Waits until the cache's feed state reads `state`: the feed's events are applied by a
/// task of the cache, a moment after they are sent.
async fn until_feed(storage: &dyn StorageBackend, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while figure(storage, "feed").await != json!(state) {
        assert!(Instant::now() < deadline, "the feed never read {state}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn requests(storage: &dyn StorageBackend, id: &str) -> u64 {
    storage
        .get_session(id)
        .await
        .unwrap()
        .unwrap()
        .metrics
        .request_count
}

/// Waits until the cache reads `n` requests for `id`: the feed's events are applied a
/// moment after they are sent.
async fn until_requests(storage: &dyn StorageBackend, id: &str, n: u64, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while requests(storage, id).await != n {
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn increment_behind(store: &MemoryBackend, id: &str) {
    let inc = SessionUpdate::new().increment_requests();
    assert!(store.update_session(id, &inc).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_feed_reports_drops_the_cached_value() {
    let (storage, store, hub) = stack(CacheLayer::new());
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    hub.up();
    assert_eq!(requests(&*storage, "s").await, 0);
    until_feed(&*storage, "up").await;
    assert_eq!(requests(&*storage, "s").await, 0);

    // Another process's write, not yet reported: the cache still serves its value.
    increment_behind(&store, "s").await;
    assert_eq!(
        requests(&*storage, "s").await,
        0,
        "a hit, as before the feed"
    );
    hub.changed(Change::Session("s".into()));
    until_requests(
        &*storage,
        "s",
        1,
        "the reported change never reached the cache",
    )
    .await;
    assert_eq!(figure(&*storage, "remote_changes").await, json!(1));
    // Cached again, and hit.
    let hits = figure(&*storage, "hits").await;
    assert_eq!(requests(&*storage, "s").await, 1);
    assert_ne!(figure(&*storage, "hits").await, hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_feed_is_down_nothing_cached_is_served() {
    let (storage, store, hub) = stack(CacheLayer::new());
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    storage
        .store_task_context("s", &json!({"step": 1}))
        .await
        .unwrap();
    hub.up();
    storage.get_task_context("s").await.unwrap();
    until_feed(&*storage, "up").await;
    assert_eq!(requests(&*storage, "s").await, 0);
    assert_eq!(
        storage.get_task_context("s").await.unwrap(),
        Some(json!({"step": 1}))
    );

    hub.down();
    until_feed(&*storage, "down").await;
    // Writes the feed cannot report now are read at once: slow, never stale.
    increment_behind(&store, "s").await;
    store
        .store_task_context("s", &json!({"step": 2}))
        .await
        .unwrap();
    assert_eq!(requests(&*storage, "s").await, 1);
    assert_eq!(
        storage.get_task_context("s").await.unwrap(),
        Some(json!({"step": 2}))
    );
    assert_eq!(figure(&*storage, "feed_losses").await, json!(1));

    // Back up: the cache starts empty, then caches again.
    hub.up();
    until_feed(&*storage, "up").await;
    assert_eq!(requests(&*storage, "s").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_the_feed_is_first_up_reads_are_not_cached() {
    let (storage, store, _hub) = stack(CacheLayer::new());
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    assert_eq!(requests(&*storage, "s").await, 0);
    increment_behind(&store, "s").await;
    assert_eq!(requests(&*storage, "s").await, 1);
    assert_eq!(figure(&*storage, "feed").await, json!("down"));
    assert_eq!(figure(&*storage, "hits").await, json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_changes_empty_the_cache() {
    let (storage, store, hub) = stack(CacheLayer::new());
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    hub.up();
    until_feed(&*storage, "up").await;
    assert_eq!(requests(&*storage, "s").await, 0);
    increment_behind(&store, "s").await;
    hub.missed();
    until_requests(&*storage, "s", 1, "missed changes never emptied the cache").await;
    assert_eq!(figure(&*storage, "feed_losses").await, json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_without_coherence_ignores_the_feed() {
    let (storage, store, hub) = stack(CacheLayer::new().with_coherence(false));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    hub.up();
    assert_eq!(requests(&*storage, "s").await, 0);
    increment_behind(&store, "s").await;
    hub.changed(Change::Session("s".into()));
    // Nothing follows the feed, so nothing will ever drop the entry before its TTL.
    assert_eq!(figure(&*storage, "feed").await, json!("none"));
    assert_eq!(requests(&*storage, "s").await, 0);
}

/// The first call of a new stack is often its health check, and that call starts the
/// feed: a feed still connecting must not make a healthy store look degraded (CI saw a
/// PostgreSQL stack reported degraded by the health check that had just subscribed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_that_is_still_connecting_does_not_degrade_the_first_health_check() {
    let (storage, _store, hub) = stack(CacheLayer::new());
    let connecting = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        hub.up();
        hub
    });
    let report = storage.health_check().await.unwrap();
    assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
    assert_eq!(report.details["feed"], json!("up"));

    // A feed that goes down later is reported at once.
    let hub = connecting.await.unwrap();
    hub.down();
    until_feed(&*storage, "down").await;
    let report = storage.health_check().await.unwrap();
    assert_eq!(report.status, HealthStatus::Degraded, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_that_never_comes_up_degrades_the_health_check() {
    let (storage, _store, _hub) = stack(CacheLayer::new());
    let report = storage.health_check().await.unwrap();
    assert_eq!(report.status, HealthStatus::Degraded, "{report:?}");
    assert_eq!(report.details["feed"], json!("down"));
}
