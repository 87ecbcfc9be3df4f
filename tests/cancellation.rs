//! Callers who give up: each layer's promises when the caller's future is dropped at a
//! gate (before the inner call, or after it applied), or when the call times out while
//! the store goes on and applies the write. Every case here failed before its fix.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use aiecs_storage::layer::{
    BatchLayer, CacheLayer, Failover, FailoverLayer, Layered, LoggingLayer, MetricsLayer,
    Operation, RetryLayer, TimeoutLayer,
};
use aiecs_storage::{
    prelude::*, ErrorKind, MemoryBackend, Metadata, NewCheckpoint, NewMessage, SessionUpdate,
};
use common::fault::{FaultPolicy, Faults, Point, Target};
use serde_json::json;
use tower::{Layer, ServiceBuilder};

type Faulty = Layered<Arc<MemoryBackend>, FaultPolicy>;

/// The failure mode of anything that could hang: far longer than any case needs.
const GENEROUS: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GENEROUS, f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// Runs `call` until a call reaches `gate`, then drops it: the caller gives up there.
async fn give_up_at<T: std::fmt::Debug>(gate: &common::fault::Gate, call: impl Future<Output = T>) {
    let reached = gate.count() + 1;
    tokio::select! {
        r = call => panic!("the call ended before reaching the gate: {r:?}"),
        _ = gate.arrived(reached) => {}
    }
}

/// Polls `done` (making calls through the stack as a user would) until it holds, for at
/// most a few seconds; the cases check that something happens, never how fast.
async fn eventually(what: &str, mut step: impl AsyncFnMut() -> bool) {
    for _ in 0..400 {
        if step().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

struct Pair {
    storage: Failover<Faulty>,
    layer: FailoverLayer,
    primary: Arc<MemoryBackend>,
    primary_faults: Faults,
    fallback: Arc<MemoryBackend>,
    fallback_faults: Faults,
}

const COOLDOWN: Duration = Duration::from_millis(50);

fn pair(configure: impl FnOnce(FailoverLayer) -> FailoverLayer) -> Pair {
    let primary = Arc::new(MemoryBackend::new());
    let fallback = Arc::new(MemoryBackend::new());
    let (p, primary_faults) = Faults::wrap(primary.clone());
    let (f, fallback_faults) = Faults::wrap(fallback.clone());
    let layer = configure(
        FailoverLayer::new(Arc::new(f))
            .with_failure_threshold(1)
            .with_cooldown(COOLDOWN),
    );
    Pair {
        storage: layer.layer(p),
        layer,
        primary,
        primary_faults,
        fallback,
        fallback_faults,
    }
}

impl Pair {
    /// Takes the primary down and opens the breaker with one failed read.
    async fn outage(&self) {
        self.primary_faults.set_down(true);
        self.storage.get_session("any").await.unwrap();
        assert_eq!(self.layer.breaker_state(), "open");
    }

    /// Brings the primary back and waits until failover has replayed everything and
    /// serves from it again.
    async fn recover(&self) {
        self.primary_faults.set_down(false);
        eventually("the primary to serve again", async || {
            self.storage.get_session("any").await.unwrap();
            self.layer.breaker_state() == "closed" && !self.layer.is_degraded()
        })
        .await;
        assert_eq!(self.layer.pending_writes(), 0);
    }
}

/// One of the failover layer's own figures.
async fn figure(p: &Pair, name: &str) -> u64 {
    let report = p.storage.get_metrics().await.unwrap();
    report.values[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no figure {name}"))
}

// ---------------------------------------------------------------------------------------
// Failover

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_probe_reopens_the_breaker_and_the_primary_returns() {
    let p = pair(|l| l.with_primary_timeout(None));
    p.storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    p.outage().await;
    p.primary_faults.set_down(false);
    tokio::time::sleep(COOLDOWN * 2).await;

    // The call chosen as the probe hangs on a slow primary; its caller gives up.
    let gate = p
        .primary_faults
        .gate(Target::Op(Operation::GetSession), Point::Before);
    give_up_at(&gate, p.storage.get_session("s")).await;
    gate.open();
    p.primary_faults.ungate();
    assert_eq!(
        p.layer.breaker_state(),
        "open",
        "a dropped probe is a failure"
    );

    let before = p.primary_faults.calls(Operation::GetSession);
    p.recover().await;
    assert!(p.primary_faults.calls(Operation::GetSession) > before);
    // Writes reach the primary directly again.
    p.storage
        .create_session("s2", "u", &Metadata::new())
        .await
        .unwrap();
    assert!(p.primary.get_session("s2").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_starting_call_is_dropped_still_reaches_the_primary() {
    let p = pair(|l| l);
    p.outage().await;
    for i in 0..3 {
        p.storage
            .create_session(&format!("s{i}"), "u", &Metadata::new())
            .await
            .unwrap();
    }
    assert_eq!(p.layer.pending_writes(), 3);

    // The replay stops at its first write; a call made meanwhile gives up.
    let gate = p
        .primary_faults
        .gate(Target::Op(Operation::CreateSession), Point::Before);
    p.primary_faults.set_down(false);
    tokio::select! {
        _ = async {
            p.storage.get_session("s0").await.unwrap();
            std::future::pending::<()>().await
        } => {}
        _ = gate.arrived(1) => {}
    }
    gate.open();
    p.primary_faults.ungate();

    p.recover().await;
    for i in 0..3 {
        assert!(
            p.primary
                .get_session(&format!("s{i}"))
                .await
                .unwrap()
                .is_some(),
            "s{i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_fails_over_under_an_outer_timeout() {
    // The README's order: retry -> timeout -> failover -> primary. The primary hangs
    // (a SIGSTOPped server): every call to it waits at a gate that never opens.
    let primary = Arc::new(MemoryBackend::new());
    let fallback = Arc::new(MemoryBackend::new());
    let (p, faults) = Faults::wrap(primary.clone());
    let failover = FailoverLayer::new(fallback.clone())
        .with_failure_threshold(2)
        .with_primary_timeout(Some(Duration::from_millis(100)));
    let storage = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .layer(failover.clone())
        .service(p);
    fallback
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    let hang = faults.gate(Target::All, Point::Before);

    for _ in 0..4 {
        let s = within("a read", storage.get_session("s")).await.unwrap();
        assert!(s.is_some(), "the fallback holds the session");
    }
    assert_eq!(failover.breaker_state(), "open");
    // A write is acknowledged from the fallback and kept for the primary.
    within(
        "a write",
        storage.create_session("s2", "u", &Metadata::new()),
    )
    .await
    .unwrap();
    assert_eq!(failover.pending_writes(), 1);
    drop(hang);
    faults.ungate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_acknowledged_after_a_dropped_create_survives_the_replay() {
    let p = pair(|l| l);
    p.outage().await;
    // The create lands in the fallback, but its caller is gone before it hears so.
    let gate = p
        .fallback_faults
        .gate(Target::Op(Operation::CreateSession), Point::After);
    give_up_at(&gate, p.storage.create_session("s2", "u", &Metadata::new())).await;
    gate.open();
    p.fallback_faults.ungate();
    assert!(p.fallback.get_session("s2").await.unwrap().is_some());

    // Reads show s2, so the caller appends to it; that is acknowledged.
    assert!(p.storage.get_session("s2").await.unwrap().is_some());
    let id = p
        .storage
        .add_conversation_message("s2", &NewMessage::new("user", "hello"))
        .await
        .unwrap();

    p.recover().await;
    assert_eq!(figure(&p, "dropped_writes").await, 0);
    assert!(p.primary.get_session("s2").await.unwrap().is_some());
    let history = p.primary.get_conversation_history("s2", 10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].message_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_increment_whose_replay_may_have_applied_is_not_replayed_twice() {
    let p = pair(|l| l.with_primary_timeout(Some(Duration::from_millis(100))));
    p.storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    p.outage().await;
    let update = SessionUpdate::new()
        .increment_requests()
        .metadata_entry("k", "v");
    assert!(p.storage.update_session("s", &update).await.unwrap());
    assert_eq!(p.layer.pending_writes(), 1);

    // The replayed increment applies on the primary, whose answer is held past the
    // layer's deadline: the replay cannot know it landed.
    let gate = p
        .primary_faults
        .gate(Target::Op(Operation::UpdateSession), Point::After);
    p.primary_faults.set_down(false);
    tokio::time::sleep(COOLDOWN * 2).await;
    p.storage.get_session("s").await.unwrap();
    gate.arrived(1).await;
    eventually("the replay to give up on the held write", async || {
        p.layer.breaker_state() == "open"
    })
    .await;
    gate.open();
    p.primary_faults.ungate();

    p.recover().await;
    let s = p.primary.get_session("s").await.unwrap().unwrap();
    assert_eq!(s.metrics.request_count, 1, "the increment counted once");
    assert_eq!(s.metadata["k"], json!("v"));
    assert_eq!(figure(&p, "unreplayed_increments").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_the_fallback_answers_false_is_not_replayed() {
    let p = pair(|l| l);
    // The primary has the session; the fallback never got it.
    p.primary
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    p.outage().await;
    let answered = p
        .storage
        .update_session("s", &SessionUpdate::new().increment_requests())
        .await
        .unwrap();
    assert!(!answered);
    assert!(!p.storage.end_session("s", "completed").await.unwrap());
    assert_eq!(p.layer.pending_writes(), 0);
    p.recover().await;
    let s = p.primary.get_session("s").await.unwrap().unwrap();
    assert_eq!((s.metrics.request_count, s.status.as_str()), (0, "active"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_during_an_outage_replays_or_says_what_is_left() {
    // The primary is back by close: the queue is replayed, not discarded.
    let p = pair(|l| l.with_cooldown(Duration::from_secs(3600)));
    p.outage().await;
    p.storage
        .create_session("s1", "u", &Metadata::new())
        .await
        .unwrap();
    p.primary_faults.set_down(false);
    p.storage.close().await.unwrap();
    assert_eq!(p.layer.pending_writes(), 0);
    // (The memory backends are closed too; their faults wrappers count the calls.)
    assert_eq!(p.primary_faults.calls(Operation::CreateSession), 1);

    // Still down: close says so, and which side holds the writes.
    let p = pair(|l| l.with_cooldown(Duration::from_secs(3600)));
    p.outage().await;
    p.storage
        .create_session("s1", "u", &Metadata::new())
        .await
        .unwrap();
    let err = p.storage.close().await.unwrap_err();
    assert!(!err.is_transient());
    assert!(err.to_string().contains("fallback only"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_dropped_while_its_journal_entry_is_written_counts_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("failover.journal");
    let p = pair(|l| l.with_journal(&journal).unwrap());
    p.storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    p.outage().await;

    // Polled once, the call has handed its intent to the journal's thread and waits for
    // the answer when its caller gives up: before the fallback saw anything.
    let update = SessionUpdate::new()
        .increment_requests()
        .metadata_entry("k", 1);
    {
        let mut call = std::pin::pin!(p.storage.update_session("s", &update));
        let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "the call ended at once: {first:?}");
    }
    assert_eq!(p.fallback_faults.calls(Operation::UpdateSession), 0);
    // A write acknowledged next is queued behind the dropped one.
    let later = SessionUpdate::new().metadata_entry("k", 2);
    assert!(p.storage.update_session("s", &later).await.unwrap());

    p.recover().await;
    let s = p.primary.get_session("s").await.unwrap().unwrap();
    assert!(s.metrics.request_count <= 1, "an increment counted twice");
    assert_eq!(
        s.metadata["k"],
        json!(2),
        "the later write was replayed first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_outside_retry_engages_when_retry_gives_up() {
    // RetryLayer returns the last error as it was (transient), so a failover outside
    // it still sees a failing primary; an error turned permanent would be raised instead.
    let primary = Arc::new(MemoryBackend::new());
    let fallback = Arc::new(MemoryBackend::new());
    let (p, faults) = Faults::wrap(primary);
    let retry = RetryLayer::new()
        .with_max_attempts(2)
        .with_min_delay(Duration::from_millis(1));
    let failover = FailoverLayer::new(fallback.clone()).with_failure_threshold(1);
    let storage = failover.layer(retry.layer(p));
    fallback
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    faults.set_down(true);
    assert!(storage.get_session("s").await.unwrap().is_some());
    assert_eq!(
        faults.injected(),
        2,
        "both attempts ran, then failover served"
    );
    assert_eq!(failover.breaker_state(), "open");
}

// ---------------------------------------------------------------------------------------
// Cache

/// cache -> timeout -> faults -> memory, and the memory store itself.
fn cached_with_timeout() -> (impl StorageBackend, Arc<MemoryBackend>, Faults) {
    let store = Arc::new(MemoryBackend::new());
    let (inner, faults) = Faults::wrap(store.clone());
    let storage = ServiceBuilder::new()
        .layer(CacheLayer::new())
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .service(inner);
    (storage, store, faults)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_times_out_and_lands_later_is_seen_by_the_next_reads() {
    let (storage, store, faults) = cached_with_timeout();
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    storage
        .store_checkpoint(&NewCheckpoint::new("t", "cp1", json!(1)))
        .await
        .unwrap();
    for _ in 0..2 {
        let latest = storage
            .get_checkpoint("t", "", None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(latest.checkpoint_id, "cp1");
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
    }

    // Both writes are held (a locked database) until the caller's deadline passes.
    let gate = faults.gate(Target::Writes, Point::Before);
    let cp2 = NewCheckpoint::new("t", "cp2", json!(2));
    let timed_out = storage.store_checkpoint(&cp2).await.unwrap_err();
    assert_eq!(timed_out.kind(), ErrorKind::Timeout);
    let increment = SessionUpdate::new().increment_requests();
    let timed_out = storage.update_session("s", &increment).await.unwrap_err();
    assert_eq!(timed_out.kind(), ErrorKind::Timeout);
    gate.open();
    faults.ungate();

    // Read before the writes land: the old values, from the store.
    assert_eq!(
        storage
            .get_checkpoint("t", "", None)
            .await
            .unwrap()
            .unwrap()
            .checkpoint_id,
        "cp1"
    );
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
    // Then the store applies them, as a server does with a write its caller left.
    store.store_checkpoint(&cp2).await.unwrap();
    store.update_session("s", &increment).await.unwrap();
    assert_eq!(
        storage
            .get_checkpoint("t", "", None)
            .await
            .unwrap()
            .unwrap()
            .checkpoint_id,
        "cp2"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_caller_gives_up_is_seen_once_it_lands() {
    let store = Arc::new(MemoryBackend::new());
    let (inner, faults) = Faults::wrap(store.clone());
    let storage = CacheLayer::new().layer(inner);
    storage
        .store_task_context("s", &json!({"v": 1}))
        .await
        .unwrap();
    assert_eq!(
        storage.get_task_context("s").await.unwrap(),
        Some(json!({"v": 1}))
    );

    let gate = faults.gate(Target::Op(Operation::StoreTaskContext), Point::Before);
    give_up_at(&gate, storage.store_task_context("s", &json!({"v": 2}))).await;
    gate.open();
    faults.ungate();
    assert_eq!(
        storage.get_task_context("s").await.unwrap(),
        Some(json!({"v": 1}))
    );
    store
        .store_task_context("s", &json!({"v": 2}))
        .await
        .unwrap();
    assert_eq!(
        storage.get_task_context("s").await.unwrap(),
        Some(json!({"v": 2}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_cache_again_once_the_unknown_outcome_window_has_passed() {
    let store = Arc::new(MemoryBackend::new());
    let (inner, faults) = Faults::wrap(store.clone());
    let cache = CacheLayer::new().with_unknown_outcome_window(Duration::from_millis(50));
    let storage = cache.clone().layer(inner);
    storage.store_task_context("s", &json!(1)).await.unwrap();
    faults.fail_next(
        Target::Op(Operation::StoreTaskContext),
        1,
        ErrorKind::Timeout,
    );
    storage
        .store_task_context("s", &json!(2))
        .await
        .unwrap_err();
    for _ in 0..3 {
        storage.get_task_context("s").await.unwrap();
    }
    assert_eq!(
        cache.stats().hits,
        0,
        "inside the window every read goes to the store"
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    for _ in 0..3 {
        storage.get_task_context("s").await.unwrap();
    }
    assert_eq!(cache.stats().hits, 2);
    // A permanent failure applied nothing: it does not open a window.
    faults.fail_next(
        Target::Op(Operation::StoreTaskContext),
        1,
        ErrorKind::InvalidInput,
    );
    storage
        .store_task_context("s", &json!(3))
        .await
        .unwrap_err();
    for _ in 0..2 {
        storage.get_task_context("s").await.unwrap();
    }
    assert_eq!(cache.stats().hits, 3);
}

// ---------------------------------------------------------------------------------------
// Batch

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_caller_that_gives_up_leaves_the_others_their_own_answers() {
    let store = Arc::new(MemoryBackend::new());
    let (inner, faults) = Faults::wrap(store.clone());
    let batch = BatchLayer::new();
    let storage = Arc::new(batch.clone().layer(inner));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();

    // The first batch is held at the store; three callers wait in it.
    let gate = faults.gate(
        Target::Op(Operation::BatchAddConversationMessages),
        Point::Before,
    );
    let mut calls = Vec::new();
    for i in 0..3 {
        let storage = storage.clone();
        calls.push(tokio::spawn(async move {
            let m = NewMessage::new("user", format!("m{i}")).with_id(format!("m{i}"));
            storage.add_conversation_message("s", &m).await
        }));
    }
    gate.arrived(1).await;
    eventually("every caller to be queued", async || {
        batch.stats().pending == 3
    })
    .await;
    // The second caller gives up.
    calls.remove(1).abort();
    gate.open();
    faults.ungate();
    for call in calls {
        within("a batch caller", call).await.unwrap().unwrap();
    }
    // Its item was in the batch: stored (its outcome was unknown to it), once.
    let history = storage.get_conversation_history("s", 10).await.unwrap();
    assert_eq!(history.len(), 3, "{history:?}");
    assert_eq!(batch.stats().pending, 0);
}

// ---------------------------------------------------------------------------------------
// Metrics and logging

#[tokio::test]
async fn a_call_given_up_on_is_counted_and_logged_as_cancelled() {
    let (cap, _guard) = common::capture::capture(tracing::level_filters::LevelFilter::INFO);
    let (inner, faults) = Faults::wrap(MemoryBackend::new());
    let metrics = MetricsLayer::new();
    let logging = LoggingLayer::new();
    let storage = ServiceBuilder::new()
        .layer(metrics.clone())
        .layer(logging)
        .service(inner);
    let gate = faults.gate(Target::Op(Operation::GetSession), Point::Before);
    give_up_at(&gate, storage.get_session("s-hung")).await;
    gate.open();
    faults.ungate();
    storage.get_session("s-ok").await.unwrap();

    let report = &metrics.performance_report().operations["get_session"];
    assert_eq!(
        (
            report.total_operations,
            report.cancelled_count,
            report.error_count
        ),
        (2, 1, 0)
    );
    let warns = cap.lines_at("WARN");
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("abandoned by its caller"), "{warns:?}");
    assert!(warns[0].contains("s-hung") && warns[0].contains("outcome=\"cancelled\""));
}

// ---------------------------------------------------------------------------------------
// Found by review of the fixes above

#[test]
fn a_replay_task_left_without_a_wrapper_ends_instead_of_spinning() {
    // On a current-thread runtime a task that loops without awaiting blocks everything:
    // the sleep below would never end. A watchdog fails the test instead of hanging.
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let finished = finished.clone();
        std::thread::spawn(move || {
            for _ in 0..400 {
                if finished.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("the runtime is blocked: the replay task spins");
            std::process::abort();
        })
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let p = pair(|l| l.with_cooldown(Duration::from_millis(1)));
        p.outage().await;
        p.storage
            .create_session("s1", "u", &Metadata::new())
            .await
            .unwrap();
        // The application keeps the layer (to watch its breaker) but drops the stack.
        let Pair { storage, layer, .. } = p;
        drop(storage);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(layer.is_degraded());

        // A new stack over the same layer replays what waits.
        let primary = Arc::new(MemoryBackend::new());
        let storage = layer.layer(primary.clone());
        eventually("the new stack to replay", async || {
            storage.get_session("s1").await.unwrap();
            !layer.is_degraded()
        })
        .await;
        assert!(primary.get_session("s1").await.unwrap().is_some());
    });
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_given_up_during_its_replay_applies_an_increment_once() {
    let p = pair(|l| l.with_cooldown(Duration::from_millis(300)));
    p.storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    p.outage().await;
    let increment = SessionUpdate::new().increment_requests();
    assert!(p.storage.update_session("s", &increment).await.unwrap());

    // close() replays (the layer's own task waits out its cooldown); the increment lands
    // on the primary and close's caller gives up before the replay heard back.
    let gate = p
        .primary_faults
        .gate(Target::Op(Operation::UpdateSession), Point::After);
    p.primary_faults.set_down(false);
    give_up_at(&gate, p.storage.close()).await;
    gate.open();
    p.primary_faults.ungate();

    // The layer's task replays it again: without its counters, since it may have landed.
    eventually("the replay task to finish", async || !p.layer.is_degraded()).await;
    let s = p.primary.get_session("s").await.unwrap().unwrap();
    assert_eq!(s.metrics.request_count, 1, "applied once");
    assert_eq!(figure(&p, "unreplayed_increments").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_joined_one_started_before_an_unknown_write_is_not_cached() {
    let store = Arc::new(MemoryBackend::new());
    let (inner, faults) = Faults::wrap(store.clone());
    let storage = Arc::new(
        CacheLayer::new()
            .with_unknown_outcome_window(Duration::from_millis(100))
            .layer(inner),
    );
    store.store_task_context("s", &json!(1)).await.unwrap();
    // A load of the old value is held at the store.
    let gate = faults.gate(Target::Op(Operation::GetTaskContext), Point::Before);
    let first = {
        let storage = storage.clone();
        tokio::spawn(async move { storage.get_task_context("s").await })
    };
    gate.arrived(1).await;
    faults.ungate();
    // A write that completes, then a read that starts after it and retries its load.
    storage.store_task_context("s", &json!(1)).await.unwrap();
    let second = {
        let storage = storage.clone();
        tokio::spawn(async move { storage.get_task_context("s").await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    // A write whose caller gives up before the store has it; it lands later.
    let two = json!(2);
    faults.set_latency(Duration::from_millis(50));
    let _ = tokio::time::timeout(
        Duration::from_millis(1),
        storage.store_task_context("s", &two),
    )
    .await;
    faults.set_latency(Duration::ZERO);
    gate.open();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    store.store_task_context("s", &json!(2)).await.unwrap();
    // Past the window, reads are cached again, and what they cache is the store's.
    tokio::time::sleep(Duration::from_millis(150)).await;
    for _ in 0..2 {
        assert_eq!(storage.get_task_context("s").await.unwrap(), Some(json!(2)));
    }
}
