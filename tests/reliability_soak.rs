//! Soak: a mixed workload of every kind of call (sessions, counters, appends, history,
//! checkpoints, pending writes, task context) at high concurrency for a bounded time,
//! through the full stack metrics -> logging -> cache -> retry -> timeout -> batch ->
//! backend, over Redis and over PostgreSQL. It proves that under sustained load no call
//! fails or reads back wrong data, and that the process's memory stops growing once warm
//! (resident set growth after the warm-up under 10%); it prints ops/s, errors and RSS.
//!
//! Ignored in the normal suite (it runs for minutes); run it with `scripts/soak.sh` or
//! `cargo test --release --all-features --test reliability_soak -- --ignored --nocapture`.
//!
//! Settings (environment): `AIECS_SOAK_SECS` (per backend, default 60),
//! `AIECS_SOAK_CONCURRENCY` (tasks, default 64), `AIECS_SOAK_WARMUP_SECS` (default 10, at
//! most half the run), `AIECS_SOAK_BACKENDS` (default `redis,postgres`), and the server
//! URLs `AIECS_TEST_REDIS_URL` / `AIECS_TEST_POSTGRES_URL` (a backend whose URL is unset
//! is skipped with a notice, and fails under `CI=true`). Backends run one after the
//! other so each has the machine, and the RSS figures, to itself. Every key lives under
//! a prefix (Redis) or a schema (PostgreSQL) of its own, removed at the end.
#![cfg(all(feature = "redis", feature = "postgres"))]

mod common;

use common::pg::drop_schema_and_disconnect as drop_schema;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aiecs_storage::layer::{
    BatchLayer, CacheLayer, LoggingLayer, MetricsLayer, RetryLayer, StackBuilder, TimeoutLayer,
};
use aiecs_storage::prelude::*;
use aiecs_storage::{
    CheckpointFilter, Metadata, NewCheckpoint, NewMessage, PostgresBackend, RedisBackend,
    SessionUpdate, WriteInput,
};
use serde_json::json;

/// Sessions each task cycles through.
const SESSIONS_PER_TASK: u64 = 4;
/// Threads each task cycles through.
const THREADS_PER_TASK: u64 = 2;
/// Checkpoint ids per thread: stored again and again (upserts), so a thread stays small.
const CHECKPOINTS_PER_THREAD: u64 = 16;
/// A session is deleted and starts over after this many of its rounds, so histories
/// (and the server's data) stay bounded however long the soak runs.
const ROUNDS_PER_SESSION: u64 = 25;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a whole number")),
        Err(_) => default,
    }
}

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// What the tasks count, shared.
#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    errors: AtomicU64,
    /// The first few failures, for the report.
    samples: Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 10 {
            samples.push(what);
        }
    }

    /// Counts one call; a failed call or a wrong answer is an error.
    fn check<T>(&self, op: &str, r: aiecs_storage::Result<T>, ok: impl FnOnce(&T) -> bool) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(v) if ok(&v) => {}
            Ok(_) => self.fail(format!("{op}: wrong answer")),
            Err(e) => self.fail(format!("{op}: {e}")),
        }
    }
}

/// One round of task `task`: every kind of call once, on one of its sessions and one of
/// its threads, checking what each read returns.
async fn round(storage: &dyn StorageBackend, c: &Counters, task: u64, i: u64) {
    let session = format!("w{task}-s{}", i % SESSIONS_PER_TASK);
    let thread = format!("w{task}-t{}", i % THREADS_PER_TASK);
    let per_session = i / SESSIONS_PER_TASK;

    let r = storage
        .create_session(&session, &format!("user-{task}"), &Metadata::new())
        .await;
    c.check("create_session", r, |_| true);
    let r = storage
        .update_session(
            &session,
            &SessionUpdate::new()
                .increment_requests()
                .add_processing_time(0.001),
        )
        .await;
    c.check("update_session", r, |found| *found);
    let r = storage.get_session(&session).await;
    c.check("get_session", r, |s| {
        s.as_ref().is_some_and(|s| s.metrics.request_count >= 1)
    });
    let text = format!("message {i} of task {task}: {}", "lorem ipsum ".repeat(8));
    let r = storage
        .add_conversation_message(&session, &NewMessage::new("user", text))
        .await;
    let added = r.as_ref().ok().cloned();
    c.check("add_conversation_message", r, |_| true);
    let r = storage.get_conversation_history(&session, 20).await;
    c.check("get_conversation_history", r, |h| {
        h.last().map(|m| Some(&m.message_id) == added.as_ref()) == Some(true)
    });

    let cp = format!("cp{}", i % CHECKPOINTS_PER_THREAD);
    let state = json!({"step": i, "task": task, "payload": "x".repeat(256)});
    let r = storage
        .store_checkpoint(
            &NewCheckpoint::new(thread.as_str(), cp.as_str(), state)
                .with_metadata(Metadata::from_iter([("step".to_owned(), json!(i))])),
        )
        .await;
    c.check("store_checkpoint", r, |_| true);
    let r = storage.get_checkpoint(&thread, "", Some(&cp)).await;
    c.check("get_checkpoint", r, |cp| {
        cp.as_ref().is_some_and(|cp| cp.data["step"] == json!(i))
    });
    let r = storage.get_checkpoint(&thread, "", None).await;
    c.check("get_checkpoint(latest)", r, |cp| cp.is_some());
    let r = storage
        .list_checkpoints(&thread, "", &CheckpointFilter::new().limit(5))
        .await;
    c.check("list_checkpoints", r, |l| !l.is_empty());
    let writes = [
        WriteInput::new("messages", json!({"i": i})),
        WriteInput::new("state", json!(task)),
    ];
    let r = storage
        .put_writes(&thread, "", &cp, "task-0", &writes)
        .await;
    c.check("put_writes", r, |_| true);
    let r = storage.get_writes(&thread, "", &cp).await;
    c.check("get_writes", r, |w| {
        w.len() == 2 && w[0].value == json!({"i": i})
    });

    let context = json!({"task": task, "round": i, "plan": ["a", "b", "c"]});
    let r = storage.store_task_context(&session, &context).await;
    c.check("store_task_context", r, |_| true);
    let r = storage.get_task_context(&session).await;
    c.check("get_task_context", r, |v| v.as_ref() == Some(&context));

    if per_session % ROUNDS_PER_SESSION == ROUNDS_PER_SESSION - 1 {
        let r = storage.delete_session(&session).await;
        c.check("delete_session", r, |found| *found);
    }
}

/// The full stack, outermost first, in the order the README recommends: metrics and
/// logging see what the caller sees; the cache answers hits before retry and timeout;
/// timeout inside retry bounds each attempt; batch inside retry lets a failed batch be
/// retried whole (its appends carry ids).
struct Stack {
    storage: Arc<dyn StorageBackend>,
    metrics: MetricsLayer,
    logging: LoggingLayer,
}

fn stack(backend: Arc<dyn StorageBackend>, label: &'static str) -> Stack {
    let metrics = MetricsLayer::new().with_backend_label(label);
    let logging = LoggingLayer::new().with_backend_label(label);
    let storage = StackBuilder::new()
        .layer(metrics.clone())
        .layer(logging.clone())
        .layer(CacheLayer::new().with_max_entries(10_000))
        .layer(RetryLayer::new())
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(BatchLayer::new())
        .build(backend);
    Stack {
        storage,
        metrics,
        logging,
    }
}

/// Installs what a production process would: a subscriber at INFO (so the logging
/// layer's level checks run and its warnings and errors are formatted, into a sink) and
/// the Prometheus recorder (so every metric is really recorded), with the periodic
/// upkeep its docs ask for.
fn install_observability() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        #[cfg(feature = "prometheus")]
        {
            let handle = aiecs_storage::prometheus::install_recorder().unwrap();
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                handle.run_upkeep();
            });
        }
    });
}

struct Figures {
    ops: u64,
    errors: u64,
    secs: f64,
    rss_start: u64,
    rss_warm: u64,
    rss_end: u64,
    rss_peak: u64,
}

/// Runs the workload on `stack` for `secs` with `concurrency` tasks.
async fn soak(stack: &Stack, secs: u64, warmup: u64, concurrency: u64) -> Figures {
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rss_start = rss_kib();
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let (storage, counters, stop) = (stack.storage.clone(), counters.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    round(storage.as_ref(), &counters, task, i).await;
                    i += 1;
                }
            })
        })
        .collect();

    let mut rss_warm = 0;
    let mut rss_peak = rss_start;
    let (mut last_ops, mut last_second) = (0, 0);
    for second in 1..=secs {
        tokio::time::sleep_until((started + Duration::from_secs(second)).into()).await;
        let rss = rss_kib();
        rss_peak = rss_peak.max(rss);
        if second == warmup {
            rss_warm = rss;
        }
        if second % 5 == 0 || second == warmup || second == secs {
            let ops = counters.ops.load(Ordering::Relaxed);
            println!(
                "  t={second:>3}s ops={ops} ({}/s since t={last_second}s) errors={} rss={rss} KiB",
                (ops - last_ops) / (second - last_second),
                counters.errors.load(Ordering::Relaxed)
            );
            (last_ops, last_second) = (ops, second);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let rss_end = rss_kib();
    for s in counters.samples.lock().unwrap().iter() {
        println!("  error: {s}");
    }
    Figures {
        ops: counters.ops.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        secs,
        rss_start,
        rss_warm,
        rss_end,
        rss_peak: rss_peak.max(rss_end),
    }
}

/// Deletes every session and thread the tasks could have written.
async fn remove_all(storage: &dyn StorageBackend, concurrency: u64) {
    for task in 0..concurrency {
        for s in 0..SESSIONS_PER_TASK {
            storage
                .delete_session(&format!("w{task}-s{s}"))
                .await
                .unwrap();
        }
        for t in 0..THREADS_PER_TASK {
            storage
                .delete_thread(&format!("w{task}-t{t}"))
                .await
                .unwrap();
        }
    }
}

/// Keys left under `prefix` on the Redis server.
async fn redis_keys_left(url: &str, prefix: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cursor = 0u64;
    let mut left = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        left += keys.len() as u64;
        if next == 0 {
            return left;
        }
        cursor = next;
    }
}

async fn soak_backend(name: &'static str, secs: u64, warmup: u64, concurrency: u64) {
    let var = match name {
        "redis" => "AIECS_TEST_REDIS_URL",
        "postgres" => "AIECS_TEST_POSTGRES_URL",
        other => panic!("AIECS_SOAK_BACKENDS: unknown backend `{other}` (redis, postgres)"),
    };
    let Some(url) = common::server_url(var, name) else {
        return;
    };
    let unique = common::unique_name("soak");
    let backend: Arc<dyn StorageBackend> = match name {
        "redis" => Arc::new(
            RedisBackend::new(&url)
                .unwrap()
                .with_prefix(format!("{unique}:")),
        ),
        _ => Arc::new(
            PostgresBackend::new(&url)
                .unwrap()
                .with_schema(&unique)
                .unwrap(),
        ),
    };
    let stack = stack(backend, name);
    stack.storage.initialize().await.unwrap();

    println!("{name}: {secs} s at concurrency {concurrency}, warm-up {warmup} s");
    let f = soak(&stack, secs, warmup, concurrency).await;

    remove_all(stack.storage.as_ref(), concurrency).await;
    stack.storage.close().await.unwrap();
    let left = match name {
        "redis" => {
            let left = redis_keys_left(&url, &unique).await;
            println!("{name}: {left} keys left under {unique}:");
            left
        }
        _ => {
            drop_schema(&url, &unique).await;
            0
        }
    };

    let report = stack.metrics.performance_report();
    let layer_errors: u64 = report.operations.values().map(|o| o.error_count).sum();
    for op in [
        "get_session",
        "add_conversation_message",
        "store_checkpoint",
    ] {
        if let Some(o) = report.operations.get(op) {
            println!(
                "{name}: {op}: n={} p50={:.2} ms p99={:.2} ms max={:.1} ms",
                o.total_operations, o.p50_latency_ms, o.p99_latency_ms, o.max_latency_ms
            );
        }
    }
    let growth = (f.rss_end as f64 - f.rss_warm as f64) / f.rss_warm as f64 * 100.0;
    println!(
        "{name}: ops={} ops_per_s={:.0} errors={} layer_errors={layer_errors} slow_calls={} \
         rss_start_kib={} rss_warm_kib={} rss_end_kib={} rss_peak_kib={} growth_after_warmup={growth:.1}%",
        f.ops,
        f.ops as f64 / f.secs,
        f.errors,
        stack.logging.slow_calls(),
        f.rss_start,
        f.rss_warm,
        f.rss_end,
        f.rss_peak,
    );
    assert_eq!(f.errors, 0, "{name}: calls failed or read back wrong data");
    assert_eq!(layer_errors, 0, "{name}: the metrics layer counted errors");
    assert_eq!(
        stack.logging.errors(),
        0,
        "{name}: the logging layer logged errors"
    );
    assert!(f.ops > 0, "{name}: no call ran");
    assert!(
        growth < 10.0,
        "{name}: RSS grew {growth:.1}% after the warm-up ({} -> {} KiB)",
        f.rss_warm,
        f.rss_end
    );
    assert_eq!(left, 0, "{name}: the soak left keys behind");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a soak of minutes: run scripts/soak.sh"]
async fn soak_full_stack() {
    let secs = env_u64("AIECS_SOAK_SECS", 60).max(2);
    let concurrency = env_u64("AIECS_SOAK_CONCURRENCY", 64).max(1);
    let warmup = env_u64("AIECS_SOAK_WARMUP_SECS", 10).clamp(1, secs / 2);
    let backends = std::env::var("AIECS_SOAK_BACKENDS").unwrap_or("redis,postgres".into());
    install_observability();
    for name in backends.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name: &'static str = match name {
            "redis" => "redis",
            "postgres" => "postgres",
            other => panic!("AIECS_SOAK_BACKENDS: unknown backend `{other}` (redis, postgres)"),
        };
        soak_backend(name, secs, warmup, concurrency).await;
    }
}
