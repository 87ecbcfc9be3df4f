//! CacheLayer: hits and misses, coalesced loads, invalidation by every write, coherence
//! under interleaving, byte bounds, health and metrics.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::{CacheLayer, Call, Layered, Operation, Policy};
use aiecs_storage::{
    prelude::*, HealthStatus, MemoryBackend, Metadata, NewCheckpoint, NewMessage, NewSession,
    Result, SessionUpdate,
};
use common::fault::Faults;
use serde_json::json;
use tokio::sync::Notify;
use tower::Layer;

fn md() -> Metadata {
    Metadata::new()
}

/// Cache over fault-injecting memory: the handle counts the calls that reach memory.
fn cached() -> (impl StorageBackend, CacheLayer, Faults) {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let cache = CacheLayer::new();
    (cache.layer(inner), cache, faults)
}

#[tokio::test]
async fn repeated_reads_hit_and_count() {
    let (storage, cache, faults) = cached();
    storage.create_session("s", "u", &md()).await.unwrap();
    let first = storage.get_session("s").await.unwrap().unwrap();
    let second = storage.get_session("s").await.unwrap().unwrap();
    assert_eq!(first, second);
    assert_eq!(
        faults.calls(Operation::GetSession),
        1,
        "second read is a hit"
    );
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.loads), (1, 1, 1));
    assert_eq!(stats.hit_rate(), 0.5);

    // Missing records are cached too.
    assert!(storage.get_session("nobody").await.unwrap().is_none());
    assert!(storage.get_session("nobody").await.unwrap().is_none());
    assert_eq!(faults.calls(Operation::GetSession), 2);

    // So are task context and checkpoints (by id and latest).
    storage
        .store_task_context("s", &json!({"k": 1}))
        .await
        .unwrap();
    storage
        .store_checkpoint(&NewCheckpoint::new("t", "c1", json!(1)))
        .await
        .unwrap();
    for _ in 0..3 {
        storage.get_task_context("s").await.unwrap().unwrap();
        storage
            .get_checkpoint("t", "", None)
            .await
            .unwrap()
            .unwrap();
        storage
            .get_checkpoint("t", "", Some("c1"))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(faults.calls(Operation::GetTaskContext), 1);
    assert_eq!(faults.calls(Operation::GetCheckpoint), 2);
}

#[tokio::test]
async fn other_reads_pass_through() {
    let (storage, _cache, faults) = cached();
    storage.create_session("s", "u", &md()).await.unwrap();
    for _ in 0..2 {
        storage.get_conversation_history("s", 10).await.unwrap();
        storage
            .list_sessions(&aiecs_storage::SessionQuery::new())
            .await
            .unwrap();
    }
    assert_eq!(faults.calls(Operation::GetConversationHistory), 2);
    assert_eq!(faults.calls(Operation::ListSessions), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_misses_make_one_inner_call() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let cache = CacheLayer::new();
    let storage = Arc::new(cache.layer(inner));
    storage.create_session("s", "u", &md()).await.unwrap();
    faults.set_latency(Duration::from_millis(50));
    let reads: Vec<_> = (0..100)
        .map(|_| {
            let storage = storage.clone();
            tokio::spawn(async move { storage.get_session("s").await })
        })
        .collect();
    for r in reads {
        assert_eq!(r.await.unwrap().unwrap().unwrap().session_id, "s");
    }
    assert_eq!(faults.calls(Operation::GetSession), 1);
    let stats = cache.stats();
    assert_eq!(stats.loads, 1);
    assert_eq!(stats.hits + stats.misses, 100);
}

#[tokio::test]
async fn batch_get_serves_hits_and_loads_the_rest_in_one_call() {
    let (storage, cache, faults) = cached();
    for id in ["a", "b", "c"] {
        storage.create_session(id, "u", &md()).await.unwrap();
    }
    storage.get_session("b").await.unwrap();
    let ids: Vec<String> = ["a", "b", "c", "zz"].map(String::from).to_vec();
    let got = storage.batch_get_sessions(&ids).await.unwrap();
    let names: Vec<_> = got
        .iter()
        .map(|s| s.as_ref().map(|s| s.session_id.as_str()))
        .collect();
    assert_eq!(names, [Some("a"), Some("b"), Some("c"), None]);
    assert_eq!(faults.calls(Operation::BatchGetSessions), 1);
    // Now everything (the missing one too) is cached.
    assert_eq!(storage.batch_get_sessions(&ids).await.unwrap(), got);
    storage.get_session("zz").await.unwrap();
    assert_eq!(faults.calls(Operation::BatchGetSessions), 1);
    assert_eq!(faults.calls(Operation::GetSession), 1);
    assert!(cache.stats().hits >= 6);
    // A batch update is seen by the next batch read.
    storage
        .update_session("a", &SessionUpdate::new().increment_requests())
        .await
        .unwrap();
    let again = storage.batch_get_sessions(&ids).await.unwrap();
    assert_eq!(again[0].as_ref().unwrap().metrics.request_count, 1);
}

// ---------------------------------------------------------------------------------------
// Every invalidating write: read (cached), write through the layer, read the new value.

#[tokio::test]
async fn create_session_upsert_invalidates() {
    let (storage, _, _) = cached();
    storage.create_session("s", "u1", &md()).await.unwrap();
    assert_eq!(
        storage.get_session("s").await.unwrap().unwrap().user_id,
        "u1"
    );
    storage.create_session("s", "u2", &md()).await.unwrap();
    assert_eq!(
        storage.get_session("s").await.unwrap().unwrap().user_id,
        "u2"
    );
}

#[tokio::test]
async fn create_session_invalidates_a_cached_none() {
    let (storage, _, _) = cached();
    assert!(storage.get_session("s").await.unwrap().is_none());
    storage.create_session("s", "u", &md()).await.unwrap();
    assert!(storage.get_session("s").await.unwrap().is_some());
}

#[tokio::test]
async fn update_session_invalidates_counters() {
    let (storage, _, _) = cached();
    storage.create_session("s", "u", &md()).await.unwrap();
    assert_eq!(
        storage
            .get_session("s")
            .await
            .unwrap()
            .unwrap()
            .metrics
            .request_count,
        0
    );
    let update = SessionUpdate::new().increment_requests().mark_error();
    storage.update_session("s", &update).await.unwrap();
    let s = storage.get_session("s").await.unwrap().unwrap();
    assert_eq!((s.metrics.request_count, s.metrics.error_count), (1, 1));
}

#[tokio::test]
async fn end_session_invalidates_status() {
    let (storage, _, _) = cached();
    storage.create_session("s", "u", &md()).await.unwrap();
    assert_eq!(
        storage.get_session("s").await.unwrap().unwrap().status,
        "active"
    );
    storage.end_session("s", "completed").await.unwrap();
    assert_eq!(
        storage.get_session("s").await.unwrap().unwrap().status,
        "completed"
    );
}

#[tokio::test]
async fn add_conversation_message_invalidates_updated_at() {
    let (storage, _, _) = cached();
    storage.create_session("s", "u", &md()).await.unwrap();
    let before = storage.get_session("s").await.unwrap().unwrap().updated_at;
    tokio::time::sleep(Duration::from_millis(2)).await;
    storage
        .add_conversation_message("s", &NewMessage::new("user", "hi"))
        .await
        .unwrap();
    let after = storage.get_session("s").await.unwrap().unwrap().updated_at;
    assert!(after > before, "{after} should be after {before}");
}

#[tokio::test]
async fn batch_add_conversation_messages_invalidates_updated_at() {
    let (storage, _, _) = cached();
    storage.create_session("s", "u", &md()).await.unwrap();
    let before = storage.get_session("s").await.unwrap().unwrap().updated_at;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let results = storage
        .batch_add_conversation_messages(&[("s".into(), NewMessage::new("user", "hi"))])
        .await
        .unwrap();
    assert!(results[0].is_ok());
    let after = storage.get_session("s").await.unwrap().unwrap().updated_at;
    assert!(after > before, "{after} should be after {before}");
}

#[tokio::test]
async fn batch_create_sessions_invalidates() {
    let (storage, _, _) = cached();
    storage.create_session("a", "u1", &md()).await.unwrap();
    assert_eq!(
        storage.get_session("a").await.unwrap().unwrap().user_id,
        "u1"
    );
    assert!(storage.get_session("b").await.unwrap().is_none());
    storage
        .batch_create_sessions(&[NewSession::new("a", "u2"), NewSession::new("b", "u2")])
        .await
        .unwrap();
    assert_eq!(
        storage.get_session("a").await.unwrap().unwrap().user_id,
        "u2"
    );
    assert!(storage.get_session("b").await.unwrap().is_some());
}

#[tokio::test]
async fn store_task_context_invalidates() {
    let (storage, _, _) = cached();
    assert!(storage.get_task_context("s").await.unwrap().is_none());
    storage
        .store_task_context("s", &json!({"v": 1}))
        .await
        .unwrap();
    assert_eq!(
        storage.get_task_context("s").await.unwrap(),
        Some(json!({"v": 1}))
    );
    storage
        .store_task_context("s", &json!({"v": 2}))
        .await
        .unwrap();
    assert_eq!(
        storage.get_task_context("s").await.unwrap(),
        Some(json!({"v": 2}))
    );
}

#[tokio::test]
async fn store_checkpoint_invalidates_the_id_and_the_latest() {
    let (storage, _, _) = cached();
    let ns = "ns";
    storage
        .store_checkpoint(&NewCheckpoint::new("t", "c1", json!(1)).with_namespace(ns))
        .await
        .unwrap();
    let latest = storage
        .get_checkpoint("t", ns, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.checkpoint_id, "c1");
    assert!(storage
        .get_checkpoint("t", ns, Some("c2"))
        .await
        .unwrap()
        .is_none());
    storage
        .store_checkpoint(&NewCheckpoint::new("t", "c2", json!(2)).with_namespace(ns))
        .await
        .unwrap();
    let latest = storage
        .get_checkpoint("t", ns, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.checkpoint_id, "c2");
    assert_eq!(
        storage
            .get_checkpoint("t", ns, Some("c2"))
            .await
            .unwrap()
            .unwrap()
            .data,
        json!(2)
    );
    // Storing an existing id again updates that entry.
    storage.get_checkpoint("t", ns, Some("c1")).await.unwrap();
    storage
        .store_checkpoint(&NewCheckpoint::new("t", "c1", json!(10)).with_namespace(ns))
        .await
        .unwrap();
    assert_eq!(
        storage
            .get_checkpoint("t", ns, Some("c1"))
            .await
            .unwrap()
            .unwrap()
            .data,
        json!(10)
    );
}

#[tokio::test]
async fn delete_thread_invalidates_every_namespace() {
    let (storage, _, _) = cached();
    for ns in ["", "a", "b"] {
        storage
            .store_checkpoint(&NewCheckpoint::new("t", "c1", json!(1)).with_namespace(ns))
            .await
            .unwrap();
        assert!(storage
            .get_checkpoint("t", ns, None)
            .await
            .unwrap()
            .is_some());
        assert!(storage
            .get_checkpoint("t", ns, Some("c1"))
            .await
            .unwrap()
            .is_some());
    }
    storage.delete_thread("t").await.unwrap();
    for ns in ["", "a", "b"] {
        assert!(storage
            .get_checkpoint("t", ns, None)
            .await
            .unwrap()
            .is_none());
        assert!(storage
            .get_checkpoint("t", ns, Some("c1"))
            .await
            .unwrap()
            .is_none());
    }
}

#[tokio::test]
async fn cleanup_expired_sessions_invalidates_sessions_and_context() {
    let (storage, _, _) = cached();
    storage.create_session("s", "u", &md()).await.unwrap();
    storage.store_task_context("s", &json!(1)).await.unwrap();
    assert!(storage.get_session("s").await.unwrap().is_some());
    assert!(storage.get_task_context("s").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(
        storage
            .cleanup_expired_sessions(Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert!(storage.get_session("s").await.unwrap().is_none());
    assert!(storage.get_task_context("s").await.unwrap().is_none());
}

#[tokio::test]
async fn close_invalidates_so_reads_fail_closed() {
    let (storage, _, _) = cached();
    storage.create_session("s", "u", &md()).await.unwrap();
    assert!(storage.get_session("s").await.unwrap().is_some());
    storage.close().await.unwrap();
    assert_eq!(
        storage.get_session("s").await.unwrap_err().kind(),
        aiecs_storage::ErrorKind::Closed
    );
}

#[tokio::test]
async fn failed_write_invalidates() {
    // The write fails after it applied (as a timeout can), so the cache must not keep
    // the old value.
    let inner = Arc::new(MemoryBackend::new());
    let lossy = Layered::new(inner.clone(), Arc::new(FailAfterWrite));
    let storage = CacheLayer::new().layer(lossy);
    assert!(storage.get_session("s").await.unwrap().is_none());
    storage.create_session("s", "u", &md()).await.unwrap_err();
    assert!(
        inner.get_session("s").await.unwrap().is_some(),
        "it applied"
    );
    assert!(storage.get_session("s").await.unwrap().is_some());
    assert_eq!(
        storage
            .get_session("s")
            .await
            .unwrap()
            .unwrap()
            .metrics
            .request_count,
        0
    );
    storage
        .update_session("s", &SessionUpdate::new().increment_requests())
        .await
        .unwrap_err();
    assert_eq!(
        storage
            .get_session("s")
            .await
            .unwrap()
            .unwrap()
            .metrics
            .request_count,
        1
    );
}

/// Runs every write, then reports a timeout as if the reply was lost.
struct FailAfterWrite;

impl Policy for FailAfterWrite {
    fn name(&self) -> &'static str {
        "fail_after_write"
    }

    async fn call<'a, T, F, Fut>(&'a self, call: Call<'a>, run: F) -> Result<T>
    where
        T: Send + 'a,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<T>> + Send + 'a,
    {
        let result = run().await;
        if call.operation.is_read() {
            return result;
        }
        result?;
        Err(common::fault::error_of(aiecs_storage::ErrorKind::Timeout))
    }
}

// ---------------------------------------------------------------------------------------
// Coherence under interleaving

/// Delays the reply of the next `get_session` after the backend answered, and tells the
/// test when that read has been made. `Faults::set_latency` sleeps *before* the inner
/// call, so a slow read would see a write made meanwhile; the stale-insert race needs a
/// read that returns the old value after a write has completed.
#[derive(Default)]
struct SlowReply {
    next_delay_ms: AtomicU64,
    read_done: Notify,
}

struct SlowReplyPolicy(Arc<SlowReply>);

impl Policy for SlowReplyPolicy {
    fn name(&self) -> &'static str {
        "slow_reply"
    }

    async fn call<'a, T, F, Fut>(&'a self, call: Call<'a>, run: F) -> Result<T>
    where
        T: Send + 'a,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<T>> + Send + 'a,
    {
        if call.operation != Operation::GetSession {
            return run().await;
        }
        let delay = self.0.next_delay_ms.swap(0, Ordering::SeqCst);
        let result = run().await;
        if delay > 0 {
            self.0.read_done.notify_one();
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        result
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_racing_a_write_never_leaves_the_old_value_cached() {
    let (counted, faults) = Faults::wrap(MemoryBackend::new());
    let slow = Arc::new(SlowReply::default());
    let cache = CacheLayer::new();
    let storage = Arc::new(cache.layer(Layered::new(
        counted,
        Arc::new(SlowReplyPolicy(slow.clone())),
    )));
    storage.create_session("s", "u", &md()).await.unwrap();

    // A: a cold read that fetches count 0, then takes 300 ms to reply.
    slow.next_delay_ms.store(300, Ordering::SeqCst);
    let a = tokio::spawn({
        let storage = storage.clone();
        async move { storage.get_session("s").await }
    });
    slow.read_done.notified().await;

    // The write completes while A's old value is still on its way to the cache.
    let inc = SessionUpdate::new().increment_requests();
    assert!(storage.update_session("s", &inc).await.unwrap());

    // B starts after the write: it joins A's load (moka coalesces misses) and must not
    // accept A's pre-write value.
    let b = storage.get_session("s").await.unwrap().unwrap();
    assert_eq!(b.metrics.request_count, 1, "B began after the write");

    // A overlapped the write: either value is allowed for A itself.
    let a = a.await.unwrap().unwrap().unwrap();
    assert!(a.metrics.request_count <= 1);

    // And the old value was not left in the cache.
    for _ in 0..3 {
        let c = storage.get_session("s").await.unwrap().unwrap();
        assert_eq!(c.metrics.request_count, 1);
    }
    assert!(cache.stats().stale >= 1);
    assert!(faults.calls(Operation::GetSession) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_load_started_before_a_write_is_not_served_after_it() {
    // As above without a joiner: A's late insert must be outdated for the next reader.
    let slow = Arc::new(SlowReply::default());
    let cache = CacheLayer::new();
    let storage = Arc::new(cache.layer(Layered::new(
        MemoryBackend::new(),
        Arc::new(SlowReplyPolicy(slow.clone())),
    )));
    storage.create_session("s", "u1", &md()).await.unwrap();
    slow.next_delay_ms.store(200, Ordering::SeqCst);
    let a = tokio::spawn({
        let storage = storage.clone();
        async move { storage.get_session("s").await }
    });
    slow.read_done.notified().await;
    storage.create_session("s", "u2", &md()).await.unwrap();
    let a = a.await.unwrap().unwrap().unwrap();
    assert_eq!(
        a.user_id, "u1",
        "A read before the write and was slow to reply"
    );
    assert_eq!(
        storage.get_session("s").await.unwrap().unwrap().user_id,
        "u2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_and_reads_end_coherent() {
    let inner = Arc::new(MemoryBackend::new());
    let (counted, faults) = Faults::wrap(inner.clone());
    let cache = CacheLayer::new();
    let storage = Arc::new(cache.layer(counted));
    let ids: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    for id in &ids {
        storage.create_session(id, "u", &md()).await.unwrap();
    }
    faults.set_latency(Duration::from_millis(1));
    let writers: Vec<_> = (0..6u64)
        .map(|w| {
            let storage = storage.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut x = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..150 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let id = &ids[(x % ids.len() as u64) as usize];
                    let inc = SessionUpdate::new().increment_requests();
                    assert!(storage.update_session(id, &inc).await.unwrap());
                    if x.is_multiple_of(3) {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..6u64)
        .map(|r| {
            let storage = storage.clone();
            let ids = ids.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut i = r as usize;
                while !stop.load(Ordering::Relaxed) {
                    let id = &ids[i % ids.len()];
                    storage.get_session(id).await.unwrap().unwrap();
                    if i.is_multiple_of(5) {
                        storage.batch_get_sessions(&ids).await.unwrap();
                    }
                    i += 1;
                    // Hits complete without yielding; let the writers run.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let mut total = 0;
    for id in &ids {
        let truth = inner.get_session(id).await.unwrap().unwrap();
        let seen = storage.get_session(id).await.unwrap().unwrap();
        assert_eq!(seen, truth, "{id}");
        total += truth.metrics.request_count;
    }
    assert_eq!(total, 6 * 150);
    let stats = cache.stats();
    assert!(stats.hits > 0, "{stats:?}");
}

// ---------------------------------------------------------------------------------------
// Bounds, health and metrics

#[tokio::test]
async fn bounded_by_bytes() {
    const BOUND: u64 = 64 * 1024;
    let cache = CacheLayer::new().with_max_bytes(BOUND);
    let storage = cache.layer(MemoryBackend::new());
    let mut metadata = md();
    metadata.insert("blob".into(), json!("x".repeat(1024)));
    for i in 0..300 {
        let id = format!("session-{i}");
        storage.create_session(&id, "u", &metadata).await.unwrap();
        storage.get_session(&id).await.unwrap().unwrap();
    }
    cache.run_pending_tasks().await;
    let stats = cache.stats();
    assert!(stats.weighted_size <= BOUND, "{stats:?}");
    assert!(
        stats.weighted_size > BOUND / 2,
        "entries weigh their bytes: {stats:?}"
    );
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(stats.entries < 300 && stats.entries > 0, "{stats:?}");
}

#[tokio::test]
async fn bounded_by_entries_and_expiring() {
    let cache = CacheLayer::new()
        .with_max_entries(10)
        .with_time_to_live(Duration::from_millis(100));
    let storage = cache.layer(MemoryBackend::new());
    for i in 0..50 {
        storage.get_session(&format!("s{i}")).await.unwrap();
    }
    cache.run_pending_tasks().await;
    let stats = cache.stats();
    assert!(stats.entries <= 10, "{stats:?}");
    assert!(stats.evictions >= 40, "{stats:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    cache.run_pending_tasks().await;
    assert_eq!(cache.stats().entries, 0);
}

#[tokio::test]
async fn time_to_idle_expires_unread_entries() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let cache = CacheLayer::new().with_time_to_idle(Duration::from_millis(50));
    let storage = cache.layer(inner);
    storage.get_session("s").await.unwrap();
    storage.get_session("s").await.unwrap();
    assert_eq!(faults.calls(Operation::GetSession), 1);
    tokio::time::sleep(Duration::from_millis(120)).await;
    storage.get_session("s").await.unwrap();
    assert_eq!(faults.calls(Operation::GetSession), 2);
}

#[tokio::test]
async fn wrappers_of_one_layer_share_the_cache() {
    let inner = Arc::new(MemoryBackend::new());
    let cache = CacheLayer::new();
    let a = cache.layer(inner.clone());
    let b = cache.layer(inner.clone());
    a.create_session("s", "u", &md()).await.unwrap();
    a.get_session("s").await.unwrap();
    b.get_session("s").await.unwrap();
    assert_eq!(cache.stats().hits, 1);
    // A reconfigured clone has a cache of its own.
    let other = cache.clone().with_max_entries(5);
    other.layer(inner).get_session("s").await.unwrap();
    assert_eq!(other.stats().misses, 1);
    assert_eq!(cache.stats().misses, 1);
    assert!(format!("{cache:?}").contains("CacheLayer"));
}

#[tokio::test]
async fn health_and_metrics_nest_the_inner_report() {
    let (storage, _, _) = cached();
    storage.create_session("s", "u", &md()).await.unwrap();
    storage.get_session("s").await.unwrap();
    storage.get_session("s").await.unwrap();

    let health = storage.health_check().await.unwrap();
    assert_eq!(health.component, "cache");
    assert_eq!(health.status, HealthStatus::Healthy);
    assert_eq!(health.details["hits"], json!(1));
    assert_eq!(health.details["hit_rate"], json!(0.5));
    assert!(health.details.contains_key("entries"));
    assert!(health.details.contains_key("weighted_size"));
    assert_eq!(health.components.len(), 1);
    assert_eq!(health.components[0].component, "faults");
    assert_eq!(health.components[0].components[0].component, "memory");

    let metrics = storage.get_metrics().await.unwrap();
    assert_eq!(metrics.component, "cache");
    for key in ["hits", "misses", "evictions", "entries", "weighted_size"] {
        assert!(
            metrics.values.contains_key(key),
            "{key}: {:?}",
            metrics.values
        );
    }
    assert_eq!(metrics.values["hits"], json!(1));
    assert_eq!(metrics.values["misses"], json!(1));
    assert_eq!(metrics.values["max_entries"], json!(10_000));
    assert_eq!(metrics.components[0].component, "faults");
    assert_eq!(
        metrics.components[0].components[0].values["sessions"],
        json!(1)
    );
}
