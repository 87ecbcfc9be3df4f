//! The batching layer (group commit) driven through a fault-injecting backend.

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::{
    BatchLayer, BatchStats, Batched, Call, Layered, Operation, Policy, RetryLayer,
};
use aiecs_storage::{
    prelude::*, ErrorKind, HealthStatus, MemoryBackend, Metadata, NewMessage, Result,
    SessionUpdate, StorageError, WriteInput,
};
use common::fault::{Faults, Target};
use serde_json::json;
use tower::Layer;

/// The failure mode of every test that could hang: far longer than any batch needs.
const GENEROUS: Duration = Duration::from_secs(20);

/// A linger no test waits for: only a full batch, a read, or close flushes.
const FOREVER: Duration = Duration::from_secs(3600);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GENEROUS, f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// Waits until the layer's counters satisfy `ready`.
async fn until(layer: &BatchLayer, what: &str, ready: impl Fn(&BatchStats) -> bool) {
    within(what, async {
        while !ready(&layer.stats()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
}

fn msg(content: impl Into<String>) -> NewMessage {
    NewMessage::new("user", content)
}

/// Spawns `n` appends to `session`, message `i` with content `{prefix}{i}`.
fn spawn_appends<S: StorageBackend + 'static>(
    storage: &Arc<S>,
    session: &str,
    prefix: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<String>>> {
    (0..n)
        .map(|i| {
            let storage = storage.clone();
            let session = session.to_owned();
            let m = msg(format!("{prefix}{i}"));
            tokio::spawn(async move { storage.add_conversation_message(&session, &m).await })
        })
        .collect()
}

async fn join_all<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(within("a spawned call", h).await.expect("task panicked"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_few_batch_calls() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let batch = BatchLayer::new()
        .with_max_batch(32)
        .with_linger(Duration::from_millis(200));
    let storage = Arc::new(batch.layer(inner));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();

    let ids: Vec<String> = join_all(spawn_appends(&storage, "s", "m", 100))
        .await
        .into_iter()
        .map(|r| r.expect("append"))
        .collect();

    let calls = faults.calls(Operation::BatchAddConversationMessages);
    assert!(
        (1..=10).contains(&calls),
        "{calls} batch calls for 100 appends"
    );
    assert_eq!(faults.calls(Operation::AddConversationMessage), 0);

    let history = storage.get_conversation_history("s", 1000).await.unwrap();
    assert_eq!(history.len(), 100);
    let stored: HashSet<&str> = history.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(stored.len(), 100, "ids are distinct");
    let returned: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(stored, returned, "each caller got its own stored id");

    let stats = batch.stats();
    assert_eq!(stats.batches, calls);
    assert_eq!(stats.items, 100);
    assert_eq!(stats.items_written, 100);
    assert!(stats.max_batch_size <= 32, "{stats:?}");
    assert!(stats.average_batch_size() >= 10.0, "{stats:?}");
    assert_eq!(stats.pending, 0);
    assert_eq!(stats.queue_depth, 0);
}

#[tokio::test]
async fn a_lone_append_is_flushed_by_the_linger_timer() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let batch = BatchLayer::new().with_linger(Duration::from_millis(50));
    let storage = batch.layer(inner);
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    let id = within(
        "a lone append",
        storage.add_conversation_message("s", &msg("alone")),
    )
    .await
    .unwrap();
    assert_eq!(faults.calls(Operation::BatchAddConversationMessages), 1);
    let history = storage.get_conversation_history("s", 10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].message_id, id);
    assert_eq!(batch.stats().batches, 1);
    // The read found nothing pending and did not flush.
    assert_eq!(batch.stats().flushes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_every_caller_in_it() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let batch = BatchLayer::new().with_max_batch(20).with_linger(FOREVER);
    let storage = Arc::new(batch.layer(inner));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    faults.fail_next(
        Target::Op(Operation::BatchAddConversationMessages),
        1,
        ErrorKind::Connection,
    );

    let results = join_all(spawn_appends(&storage, "s", "m", 20)).await;
    for r in &results {
        let e = r.as_ref().expect_err("the batch failed");
        assert_eq!(e.kind(), ErrorKind::Connection, "{e:?}");
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "connection error: injected: connection refused"
        );
    }
    assert_eq!(faults.injected(), 1, "one batch call, failed once");
    assert!(storage
        .get_conversation_history("s", 100)
        .await
        .unwrap()
        .is_empty());
    let stats = batch.stats();
    assert_eq!(stats.failed_batches, 1);
    assert_eq!(stats.items_written, 0);
    assert_eq!(stats.pending, 0);

    // The writer survives a failed batch.
    let ok = join_all(spawn_appends(&storage, "s", "n", 20)).await;
    assert!(ok.iter().all(|r| r.is_ok()), "{ok:?}");
    assert_eq!(
        storage
            .get_conversation_history("s", 100)
            .await
            .unwrap()
            .len(),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_item_errors_reach_only_their_caller() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let batch = BatchLayer::new().with_max_batch(5).with_linger(FOREVER);
    let storage = Arc::new(batch.layer(inner));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();

    let mut handles = spawn_appends(&storage, "s", "good", 4);
    handles.extend(spawn_appends(&storage, "missing", "lost", 1));
    let results = join_all(handles).await;
    assert_eq!(faults.calls(Operation::BatchAddConversationMessages), 1);
    for r in &results[..4] {
        assert!(r.is_ok(), "{r:?}");
    }
    assert!(
        matches!(&results[4], Err(StorageError::NotFound { .. })),
        "{:?}",
        results[4]
    );
    assert_eq!(
        storage
            .get_conversation_history("s", 10)
            .await
            .unwrap()
            .len(),
        4
    );
    assert_eq!(storage.get_session("missing").await.unwrap(), None);
    let stats = batch.stats();
    assert_eq!((stats.items_written, stats.item_errors), (4, 1));
    assert_eq!(stats.failed_batches, 0);

    // Bad input is answered at once and never joins a batch (the linger is an hour).
    let bad = within(
        "an invalid append",
        storage.add_conversation_message("s", &NewMessage::new("bad\nrole", "x")),
    )
    .await;
    assert!(
        matches!(bad, Err(StorageError::InvalidInput { field: "role", .. })),
        "{bad:?}"
    );
    let bad = within(
        "an invalid put_writes",
        storage.put_writes("t", "", "c", "", &[WriteInput::new("ch", json!(1))]),
    )
    .await;
    assert!(
        matches!(
            bad,
            Err(StorageError::InvalidInput {
                field: "task_id",
                ..
            })
        ),
        "{bad:?}"
    );
    assert_eq!(batch.stats().pending, 0);
    assert_eq!(batch.stats().batches, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_flush_that_sessions_pending_appends() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let batch = BatchLayer::new().with_linger(FOREVER);
    let storage = Arc::new(batch.layer(inner));
    for s in ["s", "other"] {
        storage
            .create_session(s, "u", &Metadata::new())
            .await
            .unwrap();
    }
    let append = spawn_appends(&storage, "s", "pending", 1);
    until(&batch, "the append to be queued", |s| s.pending == 1).await;

    // Another session has nothing pending: its read does not flush.
    assert!(storage
        .get_conversation_history("other", 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(batch.stats().flushes, 0);
    assert_eq!(batch.stats().pending, 1);
    assert_eq!(faults.calls(Operation::BatchAddConversationMessages), 0);

    // The session's own read flushes its pending append and sees it.
    let history = within(
        "a read of a pending session",
        storage.get_conversation_history("s", 10),
    )
    .await
    .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].content, "pending0");
    let id = join_all(append).await.pop().unwrap().unwrap();
    assert_eq!(history[0].message_id, id);
    assert_eq!(faults.calls(Operation::BatchAddConversationMessages), 1);
    assert_eq!(batch.stats().flushes, 1);
    assert_eq!(batch.stats().pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_writes_flushes_that_threads_pending_writes() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let batch = BatchLayer::new().with_linger(FOREVER);
    let storage = Arc::new(batch.layer(inner));
    let put = {
        let storage = storage.clone();
        tokio::spawn(async move {
            let writes = [
                WriteInput::new("a", json!(1)),
                WriteInput::new("b", json!({"x": 2})),
            ];
            storage.put_writes("t1", "", "c1", "task", &writes).await
        })
    };
    until(&batch, "the writes to be queued", |s| s.pending == 1).await;

    assert!(storage.get_writes("t2", "", "c1").await.unwrap().is_empty());
    assert_eq!(batch.stats().flushes, 0);

    let writes = within(
        "a read of pending writes",
        storage.get_writes("t1", "", "c1"),
    )
    .await
    .unwrap();
    assert_eq!(writes.len(), 2);
    assert_eq!((writes[0].channel.as_str(), writes[0].idx), ("a", 0));
    assert_eq!(writes[1].value, json!({"x": 2}));
    within("put_writes", put).await.unwrap().unwrap();
    assert_eq!(faults.calls(Operation::BatchPutWrites), 1);
    assert_eq!(faults.calls(Operation::PutWrites), 0);
    assert_eq!(batch.stats().pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_thread_stores_that_threads_queued_writes_first() {
    let batch = BatchLayer::new().with_linger(FOREVER);
    let storage = Arc::new(batch.layer(MemoryBackend::new()));
    let put = {
        let storage = storage.clone();
        tokio::spawn(async move {
            let writes = [WriteInput::new("a", json!(1))];
            storage.put_writes("t1", "", "c1", "task", &writes).await
        })
    };
    until(&batch, "the writes to be queued", |s| s.pending == 1).await;

    within("delete_thread", storage.delete_thread("t1"))
        .await
        .unwrap();
    // The write was queued before the delete: it is stored, then deleted with the
    // thread, and acknowledged. (A read flushes whatever is still queued.)
    let left = storage.get_writes("t1", "", "c1").await.unwrap();
    assert!(
        left.is_empty(),
        "a write queued before the delete came back: {left:?}"
    );
    within("put_writes", put).await.unwrap().unwrap();
    assert_eq!(batch.stats().pending, 0);
    let threads = storage.list_threads(None, 100).await.unwrap();
    assert!(threads.ids.is_empty(), "the thread came back: {threads:?}");
}

#[tokio::test]
async fn one_callers_appends_keep_call_order_across_sessions() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let batch = BatchLayer::new().with_linger(Duration::from_millis(20));
    let storage = batch.layer(inner);
    for s in ["a", "b"] {
        storage
            .create_session(s, "u", &Metadata::new())
            .await
            .unwrap();
    }
    // One after another...
    for i in 0..5 {
        for s in ["a", "b"] {
            storage
                .add_conversation_message(s, &msg(format!("{s}{i}")))
                .await
                .unwrap();
        }
    }
    // ...and issued in order within one batch (join! polls its futures in order).
    let add = |s: &'static str, i: usize| {
        let m = msg(format!("{s}{i}"));
        let storage = &storage;
        async move { storage.add_conversation_message(s, &m).await }
    };
    let before = faults.calls(Operation::BatchAddConversationMessages);
    let (r5, r6, r7, r8, r9) = tokio::join!(
        add("a", 5),
        add("b", 5),
        add("a", 6),
        add("b", 6),
        add("a", 7)
    );
    for r in [r5, r6, r7, r8, r9] {
        r.unwrap();
    }
    assert_eq!(
        faults.calls(Operation::BatchAddConversationMessages),
        before + 1
    );

    let contents = |h: Vec<aiecs_storage::Message>| -> Vec<String> {
        h.into_iter().map(|m| m.content).collect()
    };
    let a = contents(storage.get_conversation_history("a", 100).await.unwrap());
    let b = contents(storage.get_conversation_history("b", 100).await.unwrap());
    assert_eq!(a, ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"]);
    assert_eq!(b, ["b0", "b1", "b2", "b3", "b4", "b5", "b6"]);
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_drains_the_queue_before_closing_the_backend() {
    use aiecs_storage::SqliteBackend;

    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("batch.db");
    let batch = BatchLayer::new().with_max_batch(1000).with_linger(FOREVER);
    let storage = Arc::new(batch.layer(SqliteBackend::new(&path)));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();

    let appends = spawn_appends(&storage, "s", "m", 30);
    let puts: Vec<_> = (0..5)
        .map(|i| {
            let storage = storage.clone();
            tokio::spawn(async move {
                let w = [WriteInput::new("ch", json!(i))];
                storage
                    .put_writes("t", "", "c", &format!("task{i}"), &w)
                    .await
            })
        })
        .collect();
    until(&batch, "35 queued items", |s| s.pending == 35).await;
    assert_eq!(batch.stats().batches, 0, "nothing written before close");

    within("close", storage.close()).await.unwrap();
    // Every caller was answered Ok before close returned.
    assert_eq!(batch.stats().pending, 0);
    let ids: HashSet<String> = join_all(appends)
        .await
        .into_iter()
        .map(|r| r.expect("append stored by close"))
        .collect();
    for r in join_all(puts).await {
        r.expect("writes stored by close");
    }
    assert_eq!(batch.stats().batches, 2, "one batch per kind");

    // Closed for good, batched or not.
    let closed = |r: Result<()>| matches!(r, Err(StorageError::Closed));
    assert!(matches!(
        storage.add_conversation_message("s", &msg("late")).await,
        Err(StorageError::Closed)
    ));
    assert!(closed(
        storage
            .put_writes("t", "", "c", "late", &[WriteInput::new("ch", json!(0))])
            .await
    ));
    assert!(matches!(
        storage.get_conversation_history("s", 10).await,
        Err(StorageError::Closed)
    ));
    storage.close().await.unwrap();

    // Reopened, the file holds everything the callers were told was stored.
    let reopened = SqliteBackend::new(&path);
    let history = reopened.get_conversation_history("s", 100).await.unwrap();
    assert_eq!(history.len(), 30);
    let stored: HashSet<String> = history.into_iter().map(|m| m.message_id).collect();
    assert_eq!(stored, ids);
    assert_eq!(reopened.get_writes("t", "", "c").await.unwrap().len(), 5);
    reopened.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_applies_backpressure_and_drops_nothing() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let batch = BatchLayer::new()
        .with_max_queue(4)
        .with_max_batch(8)
        .with_linger(Duration::from_millis(1));
    let storage = Arc::new(batch.layer(inner));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    faults.set_latency(Duration::from_millis(20));

    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (batch, running) = (batch.clone(), running.clone());
        tokio::spawn(async move {
            let (mut depth, mut pending) = (0, 0);
            while running.load(Ordering::SeqCst) {
                let s = batch.stats();
                depth = depth.max(s.queue_depth);
                pending = pending.max(s.pending);
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            (depth, pending)
        })
    };
    let results = join_all(spawn_appends(&storage, "s", "m", 50)).await;
    running.store(false, Ordering::SeqCst);
    let (depth, pending) = sampler.await.unwrap();

    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    faults.set_latency(Duration::ZERO);
    assert_eq!(
        storage
            .get_conversation_history("s", 100)
            .await
            .unwrap()
            .len(),
        50
    );
    let stats = batch.stats();
    assert!(depth <= 4, "sampled queue depth {depth}");
    assert_eq!(stats.max_queue_depth, 4, "the queue filled up: {stats:?}");
    // Queued plus one batch being written: the memory held is bounded.
    assert!(pending <= 4 + 8, "sampled pending {pending}");
    assert!(stats.max_batch_size <= 8);
    assert_eq!(stats.items_written, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_counters_pass_straight_through() {
    let batch = BatchLayer::new();
    let storage = Arc::new(batch.layer(MemoryBackend::new()));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let storage = storage.clone();
            tokio::spawn(async move {
                let inc = SessionUpdate::new().increment_requests();
                for _ in 0..1000 {
                    assert!(storage.update_session("s", &inc).await.unwrap());
                }
            })
        })
        .collect();
    join_all(tasks).await;
    let s = storage.get_session("s").await.unwrap().unwrap();
    assert_eq!(s.metrics.request_count, 32_000);
    assert_eq!(
        batch.stats().batches,
        0,
        "nothing but appends and writes batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_inside_batch_retries_the_same_batch_once() {
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let batch = BatchLayer::new().with_max_batch(10).with_linger(FOREVER);
    let retry = RetryLayer::new()
        .with_min_delay(Duration::from_millis(1))
        .with_max_delay(Duration::from_millis(5));
    let storage = Arc::new(
        tower::ServiceBuilder::new()
            .layer(batch.clone())
            .layer(retry.clone())
            .service(inner),
    );
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    faults.fail_next(
        Target::Op(Operation::BatchAddConversationMessages),
        1,
        ErrorKind::Connection,
    );
    let ids: HashSet<String> = join_all(spawn_appends(&storage, "s", "m", 10))
        .await
        .into_iter()
        .map(|r| r.expect("retried batch"))
        .collect();
    assert_eq!(retry.retries(), 1, "one retry for ten callers");
    assert_eq!(faults.calls(Operation::BatchAddConversationMessages), 1);
    let history = storage.get_conversation_history("s", 100).await.unwrap();
    let stored: HashSet<String> = history.into_iter().map(|m| m.message_id).collect();
    assert_eq!(stored, ids);
    assert_eq!(batch.stats().failed_batches, 0);
}

#[tokio::test]
async fn metrics_and_health_report_the_layer_with_the_inner_nested() {
    let batch = BatchLayer::new().with_max_batch(7);
    let storage = batch.layer(MemoryBackend::new());
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    storage
        .add_conversation_message("s", &msg("hi"))
        .await
        .unwrap();

    let metrics = storage.get_metrics().await.unwrap();
    assert_eq!(metrics.component, "batch");
    assert_eq!(metrics.values["batches"], json!(1));
    assert_eq!(metrics.values["items_written"], json!(1));
    assert_eq!(metrics.values["max_batch"], json!(7));
    assert_eq!(metrics.values["queue_depth"], json!(0));
    assert_eq!(metrics.components[0].component, "memory");
    assert_eq!(metrics.components[0].values["messages"], json!(1));

    let health = storage.health_check().await.unwrap();
    assert_eq!(health.component, "batch");
    assert_eq!(health.status, HealthStatus::Healthy);
    assert_eq!(health.details["queue_depth"], json!(0));
    assert_eq!(health.details["writer"], json!("running"));
    assert_eq!(health.components[0].component, "memory");
    assert_eq!(storage.kind(), "memory");
}

/// Panics in `batch_add_conversation_messages` while armed: a writer task that dies.
struct PanicPolicy(Arc<AtomicBool>);

impl Policy for PanicPolicy {
    fn name(&self) -> &'static str {
        "panic"
    }

    async fn call<'a, T, F, Fut>(&'a self, call: Call<'a>, run: F) -> Result<T>
    where
        T: Send + 'a,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<T>> + Send + 'a,
    {
        if call.operation == Operation::BatchAddConversationMessages
            && self.0.load(Ordering::SeqCst)
        {
            panic!("injected panic in the batch call");
        }
        run().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_writer_fails_its_callers_and_is_restarted() {
    let armed = Arc::new(AtomicBool::new(true));
    let inner = Layered::new(MemoryBackend::new(), Arc::new(PanicPolicy(armed.clone())));
    let batch = BatchLayer::new().with_linger(Duration::from_millis(5));
    let storage: Arc<Batched<_>> = Arc::new(batch.layer(inner));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();

    let results = join_all(spawn_appends(&storage, "s", "m", 3)).await;
    for r in &results {
        let e = r.as_ref().expect_err("the writer died");
        assert_eq!(e.kind(), ErrorKind::Backend, "{e:?}");
    }
    until(&batch, "tickets of lost items to be released", |s| {
        s.pending == 0
    })
    .await;
    // The dead task's queue closes as its future is dropped, just after the callers
    // were woken.
    let health = within("the writer to be seen stopped", async {
        loop {
            let health = storage.health_check().await.unwrap();
            if health.details["writer"] == json!("stopped") {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert_eq!(health.status, HealthStatus::Degraded);

    armed.store(false, Ordering::SeqCst);
    within(
        "an append after a restart",
        storage.add_conversation_message("s", &msg("after")),
    )
    .await
    .unwrap();
    assert_eq!(
        storage.health_check().await.unwrap().status,
        HealthStatus::Healthy
    );
}

#[test]
fn a_wrapper_built_outside_a_runtime_starts_its_writer_on_first_use() {
    let storage = BatchLayer::new().layer(MemoryBackend::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        storage
            .create_session("s", "u", &Metadata::new())
            .await
            .unwrap();
        storage
            .add_conversation_message("s", &msg("hi"))
            .await
            .unwrap();
        assert_eq!(
            storage.get_conversation_history("s", 10).await.unwrap()[0].content,
            "hi"
        );
        storage.close().await.unwrap();
    });
}

#[tokio::test]
async fn close_without_use_and_close_twice_are_ok() {
    let storage = BatchLayer::new().layer(MemoryBackend::new());
    storage.close().await.unwrap();
    storage.close().await.unwrap();
    assert!(matches!(
        storage.add_conversation_message("s", &msg("x")).await,
        Err(StorageError::Closed)
    ));
    assert!(matches!(
        storage.get_session("s").await,
        Err(StorageError::Closed)
    ));
}
