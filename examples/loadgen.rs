//! A load generator: drives every kind of operation through a backend and a stack of
//! layers chosen on the command line, measures throughput and latency, checks two
//! correctness properties under load, and removes what it wrote.
//!
//! ```text
//! cargo run --release --example loadgen --all-features -- --url URL [--layers LIST] [--ops LIST] [--n N] [--concurrency C] [--cache-bytes B] [--coherence on|off] [--followers K] [--keep]
//! cargo run --release --example loadgen --all-features -- --url memory:// --n 2000 --concurrency 8
//! cargo run --release --example loadgen --all-features -- --url sqlite:///tmp/lg.db --layers cache,retry,timeout,batch
//! cargo run --release --example loadgen --all-features -- --url redis://127.0.0.1:6379/?prefix=lg:
//! cargo run --release --example loadgen --all-features -- --url 'postgres://postgres@127.0.0.1:5432/test?schema=loadgen'
//! ```
//!
//! - `--url`: any URL [`aiecs_storage::open`] takes; default
//!   `sqlite://<temp dir>/aiecs-loadgen.db`.
//! - `--layers`: a comma list of `cache`, `retry`, `timeout` (5 s), `batch`, `metrics`,
//!   `logging`, outermost first; default none.
//! - `--ops`: a comma list of operations to measure; default all, in this order:
//!   `create_session`, `get_session`, `update_session` (one increment),
//!   `add_conversation_message` (about 110 bytes), `get_conversation_history` (limit 50
//!   on a session holding 200 messages), `store_checkpoint` (1 KiB of JSON, threads of
//!   20 checkpoints), `get_checkpoint` (latest), `list_checkpoints` (limit 10),
//!   `put_writes` (2 writes), `get_writes`, `store_task_context`, `get_task_context`,
//!   `read_update_session` (`get_session` then one increment of the same session, as an
//!   agent's step reads its session and records the call; one call is both).
//! - `--n`: calls per operation (default 10 000); `--concurrency`: tokio tasks sharing
//!   them (default 32); `--cache-bytes`: bound the `cache` layer to B bytes of heap
//!   (default: 10 000 entries); `--keep`: leave the data behind.
//! - `--coherence`: whether the `cache` layer follows the backend's change feed (`on`,
//!   the default) or not (`off`). With it on, the run waits until the feed is up.
//! - `--followers K`: starts K more processes (this program with `--follow URL`) that
//!   each subscribe to the backend's change feed and take every event, as K other
//!   replicas with coherent caches would; the run starts once each reports its feed up.
//!   On PostgreSQL and SQLite every follower is sent every change; on Redis a follower
//!   is sent only keys it read, and these read nothing, so there they cost nothing.
//!
//! Each operation is measured on its own: what it reads is written first (up to 1 000
//! sessions or task contexts, 50 threads of 20 checkpoints, one session of 200
//! messages), then exactly N calls are handed out to C tasks by an atomic counter. Each
//! call's latency is recorded in microseconds; p50 and p99 are nearest-rank percentiles
//! of all N calls; `ops_per_s` is N divided by the wall time of the measured phase
//! (setup excluded). `cpu_us` is the CPU time the whole machine used in that phase per
//! call (every process: the server, followers, this one), `own_cpu_us` this process's;
//! both count in clock ticks of 10 ms, so they need phases of a second or more. Every id starts with a run id (`lg-` and 8 random hex digits of a
//! UUID v7), so runs never collide.
//!
//! Output, one line per operation, then the checks, then the peak RSS:
//!
//! ```text
//! op=<name> backend=<kind> layers=<list or none> n=<N> conc=<C> ops_per_s=<x> p50_us=<x> p99_us=<x> cpu_us=<x> own_cpu_us=<x>
//! op=<name> errors=<n>                          (only when n > 0)
//! check=lost_update expected=<C*100> actual=<request_count>
//! check=history_order expected=m150..m199 actual=<first id>..<last id> ok=<true|false>
//! peak_rss_kib=<VmHWM of /proc/self/status, or unknown>
//! ```
//!
//! An error is a failed call, a failed setup call for that operation, or a read that
//! finds nothing (or too little) where the setup stored data. `lost_update` makes C
//! tasks each add 100 increments to one session, then reads its `request_count`.
//! `history_order` appends `m000`..`m199` to one session one after the other and reads
//! the newest 50: `actual` shows the first and last ids read, and `ok=true` only if the
//! 50 ids are exactly `m150`..`m199` in that order. Progress and cleanup notes go to
//! stderr. The exit status is 1 if any operation had errors, a check failed or the
//! cleanup failed (then a line `cleanup errors=<n>` is printed), and 2 if the command
//! line is bad or the backend cannot be opened or initialized.
//!
//! Unless `--keep` is given, every session it created is removed with `delete_session`
//! (which takes messages and task contexts along) and every thread with
//! `delete_thread`, then the stack is closed.
//!
//! With `batch` among the layers, stderr also shows how many batch calls the batching
//! layer made and their average size. The README's Performance section holds figures
//! measured with it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aiecs_storage::layer::{
    BatchLayer, CacheLayer, LoggingLayer, MetricsLayer, RetryLayer, StackBuilder, TimeoutLayer,
};
use aiecs_storage::prelude::*;
use aiecs_storage::{
    CheckpointFilter, Metadata, NewCheckpoint, NewMessage, SessionUpdate, WriteInput,
};
use serde_json::{json, Value};

/// The operations, in their default order.
const OPS: [&str; 13] = [
    "create_session",
    "get_session",
    "update_session",
    "add_conversation_message",
    "get_conversation_history",
    "store_checkpoint",
    "get_checkpoint",
    "list_checkpoints",
    "put_writes",
    "get_writes",
    "store_task_context",
    "get_task_context",
    "read_update_session",
];

const LAYERS: [&str; 6] = ["cache", "retry", "timeout", "batch", "metrics", "logging"];

/// Sessions (or task contexts) written for the read and update phases.
const MAX_SESSIONS: usize = 1_000;
/// Threads written for the checkpoint and pending-write read phases.
const MAX_THREADS: usize = 50;
/// Checkpoints per thread.
const PER_THREAD: usize = 20;
/// Messages in the session read by `get_conversation_history`.
const HISTORY: usize = 200;
/// Increments per task in the lost-update check.
const INCREMENTS: usize = 100;

struct Args {
    url: String,
    layers: Vec<String>,
    ops: Vec<&'static str>,
    n: usize,
    concurrency: usize,
    cache_bytes: Option<u64>,
    coherence: bool,
    followers: usize,
    keep: bool,
}

const USAGE: &str =
    "use --url URL --layers LIST --ops LIST --n N --concurrency C --cache-bytes B --coherence on|off --followers K --keep (see the doc comment)";

fn args() -> Result<Args, String> {
    let mut a = Args {
        url: format!(
            "sqlite://{}",
            std::env::temp_dir().join("aiecs-loadgen.db").display()
        ),
        layers: Vec::new(),
        ops: OPS.to_vec(),
        n: 10_000,
        concurrency: 32,
        cache_bytes: None,
        coherence: true,
        followers: 0,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value()?,
            "--layers" => {
                let list = value()?;
                a.layers = Vec::new();
                for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    if name == "none" {
                        continue;
                    }
                    if !LAYERS.contains(&name) {
                        return Err(format!(
                            "--layers: unknown layer `{name}`; known: {}",
                            LAYERS.join(",")
                        ));
                    }
                    a.layers.push(name.to_string());
                }
            }
            "--ops" => {
                let list = value()?;
                let wanted: Vec<&str> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(bad) = wanted.iter().find(|w| !OPS.contains(w)) {
                    return Err(format!(
                        "--ops: unknown operation `{bad}`; known: {}",
                        OPS.join(",")
                    ));
                }
                if wanted.is_empty() {
                    return Err("--ops: the list is empty".into());
                }
                a.ops = OPS.iter().copied().filter(|o| wanted.contains(o)).collect();
            }
            "--n" => {
                a.n = value()?.parse().map_err(|e| format!("--n: {e}"))?;
                if a.n == 0 {
                    return Err("--n must be at least 1".into());
                }
            }
            "--concurrency" => {
                a.concurrency = value()?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?;
                if a.concurrency == 0 {
                    return Err("--concurrency must be at least 1".into());
                }
            }
            "--cache-bytes" => {
                let bytes: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--cache-bytes: {e}"))?;
                if bytes == 0 {
                    return Err("--cache-bytes must be at least 1".into());
                }
                a.cache_bytes = Some(bytes);
            }
            "--coherence" => {
                a.coherence = match value()?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => return Err(format!("--coherence: `{other}`; use on or off")),
                }
            }
            "--followers" => {
                a.followers = value()?.parse().map_err(|e| format!("--followers: {e}"))?;
            }
            "--keep" => a.keep = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}; {USAGE}")),
        }
    }
    Ok(a)
}

fn build_stack(
    args: &Args,
    backend: Arc<dyn StorageBackend>,
    batch: &BatchLayer,
) -> Arc<dyn StorageBackend> {
    let mut stack = StackBuilder::new();
    for name in &args.layers {
        stack = match name.as_str() {
            "cache" => stack.layer(
                match args.cache_bytes {
                    Some(bytes) => CacheLayer::new().with_max_bytes(bytes),
                    None => CacheLayer::new(),
                }
                .with_coherence(args.coherence),
            ),
            "retry" => stack.layer(RetryLayer::new()),
            "timeout" => stack.layer(TimeoutLayer::new(Duration::from_secs(5))),
            "batch" => stack.layer(batch.clone()),
            "metrics" => stack.layer(MetricsLayer::new()),
            "logging" => stack.layer(LoggingLayer::new()),
            other => unreachable!("layer {other} was validated"),
        };
    }
    stack.build(backend)
}

/// What one phase is: writing what an operation reads, the measured calls, or cleanup.
#[derive(Clone, Copy)]
enum Step {
    Setup(&'static str),
    Run(&'static str),
    Increment,
    DeleteSession,
    DeleteThread,
}

/// Everything the tasks share.
struct Ctx {
    storage: Arc<dyn StorageBackend>,
    run: String,
    n: usize,
    /// Sessions (or task contexts) read or updated by the read phases.
    sessions: usize,
    /// Threads read by the checkpoint and pending-write read phases.
    threads: usize,
    /// About 1 000 bytes of filler for checkpoint data.
    filler: String,
    /// Every session id (and task context id) this run may have written.
    created_sessions: Mutex<Vec<String>>,
    /// Every thread id this run may have written.
    created_threads: Mutex<Vec<String>>,
    /// The session ids to delete, taken from `created_sessions` before cleanup.
    delete_sessions: OnceLock<Vec<String>>,
    /// The thread ids to delete, taken from `created_threads` before cleanup.
    delete_threads: OnceLock<Vec<String>>,
}

type CallResult = Result<(), String>;

fn fail(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn expect(ok: bool, what: impl FnOnce() -> String) -> CallResult {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

impl Ctx {
    fn sid(&self, tag: &str, i: usize) -> String {
        format!("{}-{tag}-{i}", self.run)
    }

    fn tid(&self, tag: &str, i: usize) -> String {
        format!("{}-{tag}-t{i}", self.run)
    }

    fn cp(i: usize) -> String {
        format!("cp{i:02}")
    }

    fn note_sessions(&self, tag: &str, count: usize) {
        let mut v = self.created_sessions.lock().unwrap();
        v.extend((0..count).map(|i| self.sid(tag, i)));
    }

    fn note_threads(&self, tag: &str, count: usize) {
        let mut v = self.created_threads.lock().unwrap();
        v.extend((0..count).map(|i| self.tid(tag, i)));
    }

    fn message(&self, i: usize) -> NewMessage {
        let mut content = format!("loadgen {} message {i:08}: ", self.run);
        while content.len() < 110 {
            content.push_str("lorem ipsum ");
        }
        content.truncate(110);
        NewMessage::new("user", content)
    }

    fn checkpoint(&self, thread: &str, i: usize) -> NewCheckpoint {
        let cp = NewCheckpoint::new(
            thread,
            Self::cp(i % PER_THREAD),
            json!({"step": i, "state": self.filler}),
        );
        if i.is_multiple_of(PER_THREAD) {
            cp
        } else {
            cp.with_parent(Self::cp(i % PER_THREAD - 1))
        }
    }

    fn writes(i: usize) -> [WriteInput; 2] {
        [
            WriteInput::new("messages", json!({"role": "assistant", "n": i})),
            WriteInput::new("step", json!(i)),
        ]
    }

    fn context(i: usize) -> Value {
        json!({"plan": ["fetch", "summarize", "answer"], "step": i, "done": false})
    }

    /// How many setup calls an operation needs, and the ids to remember for cleanup
    /// (noted before anything is written, so a failed run still cleans up).
    fn setup_count(&self, op: &str) -> usize {
        match op {
            "create_session" => {
                self.note_sessions("cs", self.n);
                0
            }
            "get_session"
            | "update_session"
            | "add_conversation_message"
            | "get_task_context"
            | "read_update_session" => {
                self.note_sessions(tag(op), self.sessions);
                self.sessions
            }
            "get_conversation_history" => {
                self.note_sessions("gh", 1);
                1
            }
            "store_checkpoint" | "put_writes" => {
                self.note_threads(tag(op), self.n.div_ceil(PER_THREAD));
                0
            }
            "get_checkpoint" | "list_checkpoints" | "get_writes" => {
                self.note_threads(tag(op), self.threads);
                self.threads
            }
            "store_task_context" => {
                self.note_sessions("tc", self.n);
                0
            }
            other => unreachable!("operation {other} was validated"),
        }
    }

    /// Setup call `i` of operation `op`.
    async fn setup(&self, op: &str, i: usize) -> CallResult {
        let s = &self.storage;
        let meta = Metadata::new();
        match op {
            "get_session"
            | "update_session"
            | "add_conversation_message"
            | "read_update_session" => s
                .create_session(&self.sid(tag(op), i), "loadgen", &meta)
                .await
                .map(drop)
                .map_err(fail),
            "get_task_context" => s
                .store_task_context(&self.sid("gt", i), &Self::context(i))
                .await
                .map_err(fail),
            "get_conversation_history" => {
                let id = self.sid("gh", i);
                s.create_session(&id, "loadgen", &meta)
                    .await
                    .map_err(fail)?;
                for m in 0..HISTORY {
                    s.add_conversation_message(&id, &self.message(m))
                        .await
                        .map_err(fail)?;
                }
                Ok(())
            }
            "get_checkpoint" | "list_checkpoints" => {
                let thread = self.tid(tag(op), i);
                for k in 0..PER_THREAD {
                    s.store_checkpoint(&self.checkpoint(&thread, k))
                        .await
                        .map_err(fail)?;
                }
                Ok(())
            }
            "get_writes" => {
                let thread = self.tid("gw", i);
                for k in 0..PER_THREAD {
                    s.put_writes(&thread, "", &Self::cp(k), "task-0", &Self::writes(k))
                        .await
                        .map_err(fail)?;
                }
                Ok(())
            }
            other => unreachable!("operation {other} needs no setup"),
        }
    }

    /// Measured call `i` of operation `op`.
    async fn call(&self, op: &str, i: usize) -> CallResult {
        let s = &self.storage;
        match op {
            "create_session" => s
                .create_session(&self.sid("cs", i), "loadgen", &Metadata::new())
                .await
                .map(drop)
                .map_err(fail),
            "get_session" => {
                let found = s
                    .get_session(&self.sid("gs", i % self.sessions))
                    .await
                    .map_err(fail)?;
                expect(found.is_some(), || "session not found".into())
            }
            "update_session" => {
                let found = s
                    .update_session(
                        &self.sid("us", i % self.sessions),
                        &SessionUpdate::new().increment_requests(),
                    )
                    .await
                    .map_err(fail)?;
                expect(found, || "update_session found no session".into())
            }
            "read_update_session" => {
                let id = self.sid("ru", i % self.sessions);
                let found = s.get_session(&id).await.map_err(fail)?;
                expect(found.is_some(), || "session not found".into())?;
                let found = s
                    .update_session(&id, &SessionUpdate::new().increment_requests())
                    .await
                    .map_err(fail)?;
                expect(found, || "update_session found no session".into())
            }
            "add_conversation_message" => s
                .add_conversation_message(&self.sid("am", i % self.sessions), &self.message(i))
                .await
                .map(drop)
                .map_err(fail),
            "get_conversation_history" => {
                let h = s
                    .get_conversation_history(&self.sid("gh", 0), 50)
                    .await
                    .map_err(fail)?;
                expect(h.len() == 50, || {
                    format!("history held {} messages", h.len())
                })
            }
            "store_checkpoint" => s
                .store_checkpoint(&self.checkpoint(&self.tid("sc", i / PER_THREAD), i))
                .await
                .map_err(fail),
            "get_checkpoint" => {
                let cp = s
                    .get_checkpoint(&self.tid("gc", i % self.threads), "", None)
                    .await
                    .map_err(fail)?;
                expect(cp.is_some(), || "no latest checkpoint".into())
            }
            "list_checkpoints" => {
                let list = s
                    .list_checkpoints(
                        &self.tid("lc", i % self.threads),
                        "",
                        &CheckpointFilter::new().limit(10),
                    )
                    .await
                    .map_err(fail)?;
                expect(list.len() == 10, || {
                    format!("listed {} checkpoints", list.len())
                })
            }
            "put_writes" => s
                .put_writes(
                    &self.tid("pw", i / PER_THREAD),
                    "",
                    &Self::cp(i % PER_THREAD),
                    "task-0",
                    &Self::writes(i),
                )
                .await
                .map_err(fail),
            "get_writes" => {
                let w = s
                    .get_writes(
                        &self.tid("gw", i % self.threads),
                        "",
                        &Self::cp((i / self.threads) % PER_THREAD),
                    )
                    .await
                    .map_err(fail)?;
                expect(w.len() == 2, || format!("read {} pending writes", w.len()))
            }
            "store_task_context" => s
                .store_task_context(&self.sid("tc", i), &Self::context(i))
                .await
                .map_err(fail),
            "get_task_context" => {
                let c = s
                    .get_task_context(&self.sid("gt", i % self.sessions))
                    .await
                    .map_err(fail)?;
                expect(c.is_some(), || "task context not found".into())
            }
            other => unreachable!("operation {other} was validated"),
        }
    }

    async fn step(&self, step: Step, i: usize) -> CallResult {
        match step {
            Step::Setup(op) => self.setup(op, i).await,
            Step::Run(op) => self.call(op, i).await,
            Step::Increment => {
                let found = self
                    .storage
                    .update_session(
                        &self.sid("lu", 0),
                        &SessionUpdate::new().increment_requests(),
                    )
                    .await
                    .map_err(fail)?;
                expect(found, || "update_session found no session".into())
            }
            Step::DeleteSession => {
                let id = &self.delete_sessions.get().expect("set before cleanup")[i];
                self.storage
                    .delete_session(id)
                    .await
                    .map(drop)
                    .map_err(fail)
            }
            Step::DeleteThread => {
                let id = &self.delete_threads.get().expect("set before cleanup")[i];
                self.storage.delete_thread(id).await.map_err(fail)
            }
        }
    }
}

/// The short tag of an operation's ids.
fn tag(op: &str) -> &'static str {
    match op {
        "create_session" => "cs",
        "get_session" => "gs",
        "update_session" => "us",
        "add_conversation_message" => "am",
        "get_conversation_history" => "gh",
        "store_checkpoint" => "sc",
        "get_checkpoint" => "gc",
        "list_checkpoints" => "lc",
        "put_writes" => "pw",
        "get_writes" => "gw",
        "store_task_context" => "tc",
        "get_task_context" => "gt",
        "read_update_session" => "ru",
        _ => "xx",
    }
}

/// The outcome of one phase.
struct Phase {
    /// Latency of every call in microseconds, sorted.
    latencies: Vec<u32>,
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
}

impl Phase {
    /// Nearest-rank percentile of the sorted latencies.
    fn percentile(&self, p: f64) -> u32 {
        if self.latencies.is_empty() {
            return 0;
        }
        let rank = (p / 100.0 * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }
}

/// Runs calls `0..n` of `step` over `c` tasks, each taking the next index from a shared
/// counter.
async fn run_phase(ctx: &Arc<Ctx>, step: Step, n: usize, c: usize) -> Phase {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(c);
    for _ in 0..c.min(n.max(1)) {
        let (ctx, next) = (ctx.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(n / c + 1);
            let (mut errors, mut first_error) = (0usize, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                let result = ctx.step(step, i).await;
                latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                if let Err(e) = result {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let mut phase = Phase {
        latencies: Vec::with_capacity(n),
        errors: 0,
        first_error: None,
        wall: Duration::ZERO,
    };
    for task in tasks {
        match task.await {
            Ok((latencies, errors, first_error)) => {
                phase.latencies.extend(latencies);
                phase.errors += errors;
                if phase.first_error.is_none() {
                    phase.first_error = first_error;
                }
            }
            Err(e) => {
                phase.errors += 1;
                phase.first_error.get_or_insert(format!("task failed: {e}"));
            }
        }
    }
    phase.wall = started.elapsed();
    phase.latencies.sort_unstable();
    phase
}

/// `VmHWM` of /proc/self/status in KiB, where there is one (Linux).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `--follow URL`: a follower process. Subscribes to the backend's change feed, prints
/// `FOLLOWER up` once it is, and takes every event until its stdin closes.
async fn follow(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let backend = aiecs_storage::open(url)?;
    backend.initialize().await?;
    let mut feed = backend
        .changes()
        .ok_or("--followers: this backend offers no change feed")?;
    let mut said = false;
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    });
    tokio::pin!(stdin_closed);
    loop {
        tokio::select! {
            event = feed.next() => match event {
                Some(aiecs_storage::feed::FeedEvent::Up) if !said => {
                    println!("FOLLOWER up");
                    said = true;
                }
                Some(_) => {}
                None => return Ok(()),
            },
            _ = &mut stdin_closed => {
                // What following cost this process, for README's coherence figures.
                if let Some(cpu) = cpu_seconds() {
                    eprintln!("follower cpu_s={cpu:.2}");
                }
                return Ok(());
            }
        }
    }
}

/// This process's CPU time (user + system) in seconds, from /proc/self/stat (Linux;
/// clock ticks taken as 100 per second).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (in parentheses, which may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The CPU time every process of the machine used (all CPUs, idle and I/O wait left
/// out), in seconds, from /proc/stat (Linux; clock ticks taken as 100 per second): on a
/// machine that runs the server too, what a call costs the server and the client
/// together, which throughput hides once the cores are busy.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    let busy: f64 = ticks.iter().take(8).sum::<f64>() - ticks.get(3)? - ticks.get(4)?;
    Some(busy / 100.0)
}

/// Starts `k` follower processes over `url` and waits until each reports its feed up;
/// they end when the returned handles (their stdin) are dropped.
fn start_followers(url: &str, k: usize) -> Result<Vec<std::process::Child>, String> {
    use std::io::BufRead;
    let mut children = Vec::new();
    for _ in 0..k {
        let mut child =
            std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
                .args(["--follow", url])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("--followers: cannot start a follower: {e}"))?;
        let out = child.stdout.take().expect("piped");
        let up = std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == "FOLLOWER up");
        if !up {
            return Err("--followers: a follower ended before its feed was up".into());
        }
        children.push(child);
    }
    Ok(children)
}

#[tokio::main]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.len() == 3 && argv[1] == "--follow" {
        if let Err(e) = follow(&argv[2]).await {
            eprintln!("loadgen follower: {e}");
            std::process::exit(2);
        }
        return;
    }
    match run().await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    }
}

/// Runs everything; `Ok(false)` when an operation had errors or a check failed.
async fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let args = args()?;
    let (n, c) = (args.n, args.concurrency);
    let backend = aiecs_storage::open(&args.url)?;
    let batch = BatchLayer::new();
    let storage = build_stack(&args, backend, &batch);
    storage.initialize().await?;
    let kind = storage.kind();
    let layers = if args.layers.is_empty() {
        "none".to_string()
    } else {
        args.layers.join(",")
    };

    let followers = start_followers(&args.url, args.followers)?;
    if args.followers > 0 {
        eprintln!(
            "{} follower processes subscribed to the change feed",
            followers.len()
        );
    }
    if args.coherence && args.layers.iter().any(|l| l == "cache") && storage.changes().is_some() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while storage.get_metrics().await?.values.get("feed") != Some(&json!("up")) {
            if Instant::now() > deadline {
                return Err("the cache's change feed did not come up in 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    let uuid = uuid::Uuid::now_v7().simple().to_string();
    // The last 8 hex digits are random; the first 8 of a v7 UUID are a clock that
    // stays the same for about a minute.
    let run = format!("lg-{}", &uuid[uuid.len() - 8..]);
    eprintln!("run {run}: url {} ({kind}), layers {layers}", args.url);

    let ctx = Arc::new(Ctx {
        storage: storage.clone(),
        run,
        n,
        sessions: n.min(MAX_SESSIONS),
        threads: n.div_ceil(PER_THREAD).min(MAX_THREADS),
        filler: "x".repeat(1000),
        created_sessions: Mutex::new(Vec::new()),
        created_threads: Mutex::new(Vec::new()),
        delete_sessions: OnceLock::new(),
        delete_threads: OnceLock::new(),
    });

    let mut ok = true;
    for &op in &args.ops {
        let setup_calls = ctx.setup_count(op);
        let setup = run_phase(&ctx, Step::Setup(op), setup_calls, c).await;
        if let Some(e) = &setup.first_error {
            eprintln!("op={op} setup first_error={e}");
        }
        let (machine_before, own_before) = (machine_busy_seconds(), cpu_seconds());
        let phase = run_phase(&ctx, Step::Run(op), n, c).await;
        let per_call = |before: Option<f64>, after: Option<f64>| match (before, after) {
            (Some(b), Some(a)) => format!("{:.1}", (a - b) * 1e6 / n as f64),
            _ => "unknown".to_owned(),
        };
        println!(
            "op={op} backend={kind} layers={layers} n={n} conc={c} ops_per_s={:.0} p50_us={} p99_us={} cpu_us={} own_cpu_us={}",
            n as f64 / phase.wall.as_secs_f64().max(1e-9),
            phase.percentile(50.0),
            phase.percentile(99.0),
            per_call(machine_before, machine_busy_seconds()),
            per_call(own_before, cpu_seconds()),
        );
        if args.layers.iter().any(|l| l == "batch") {
            let stats = batch.stats();
            eprintln!(
                "op={op} batch calls={} items={} average_size={:.1}",
                stats.batches,
                stats.items,
                stats.average_batch_size()
            );
        }
        let errors = setup.errors + phase.errors;
        if errors > 0 {
            ok = false;
            println!("op={op} errors={errors}");
            if let Some(e) = &phase.first_error {
                eprintln!("op={op} first_error={e}");
            }
        }
    }

    // Lost updates: C tasks x 100 increments on one session.
    ctx.note_sessions("lu", 1);
    let lu = ctx.sid("lu", 0);
    let expected = c * INCREMENTS;
    let actual = match storage
        .create_session(&lu, "loadgen", &Metadata::new())
        .await
    {
        Ok(_) => {
            let inc = run_phase(&ctx, Step::Increment, expected, c).await;
            if let Some(e) = &inc.first_error {
                eprintln!("check=lost_update errors={} first_error={e}", inc.errors);
            }
            match storage.get_session(&lu).await {
                Ok(Some(s)) => s.metrics.request_count.to_string(),
                Ok(None) => "missing".to_string(),
                Err(e) => format!("error({e})"),
            }
        }
        Err(e) => format!("error({e})"),
    };
    ok &= actual == expected.to_string();
    println!("check=lost_update expected={expected} actual={actual}");

    // History order: m000..m199 appended one after the other, the newest 50 read back.
    ctx.note_sessions("ho", 1);
    let ho = ctx.sid("ho", 0);
    let want: Vec<String> = (HISTORY - 50..HISTORY)
        .map(|i| format!("m{i:03}"))
        .collect();
    let got: Result<Vec<String>, String> = async {
        storage
            .create_session(&ho, "loadgen", &Metadata::new())
            .await
            .map_err(fail)?;
        for i in 0..HISTORY {
            let m = ctx.message(i).with_id(format!("m{i:03}"));
            storage
                .add_conversation_message(&ho, &m)
                .await
                .map_err(fail)?;
        }
        let h = storage
            .get_conversation_history(&ho, 50)
            .await
            .map_err(fail)?;
        Ok(h.into_iter().map(|m| m.message_id).collect())
    }
    .await;
    let (actual, order_ok) = match &got {
        Ok(ids) => (
            match (ids.first(), ids.last()) {
                (Some(f), Some(l)) => format!("{f}..{l}"),
                _ => "empty".to_string(),
            },
            *ids == want,
        ),
        Err(e) => (format!("error({})", e.replace(' ', "_")), false),
    };
    ok &= order_ok;
    println!(
        "check=history_order expected={}..{} actual={actual} ok={order_ok}",
        want[0],
        want[want.len() - 1]
    );

    if args.keep {
        eprintln!("--keep: leaving the data of run {} behind", ctx.run);
    } else {
        let sessions = std::mem::take(&mut *ctx.created_sessions.lock().unwrap());
        let threads = std::mem::take(&mut *ctx.created_threads.lock().unwrap());
        let (session_count, thread_count) = (sessions.len(), threads.len());
        ctx.delete_sessions.get_or_init(|| sessions);
        ctx.delete_threads.get_or_init(|| threads);
        let ds = run_phase(&ctx, Step::DeleteSession, session_count, c).await;
        let dt = run_phase(&ctx, Step::DeleteThread, thread_count, c).await;
        let errors = ds.errors + dt.errors;
        eprintln!(
            "cleanup: {} sessions, {} threads deleted in {:.1?}, {errors} errors",
            session_count,
            thread_count,
            ds.wall + dt.wall
        );
        if let Some(e) = ds.first_error.or(dt.first_error) {
            eprintln!("cleanup first_error={e}");
        }
        if errors > 0 {
            ok = false;
            println!("cleanup errors={errors}");
        }
    }
    storage.close().await?;
    for mut follower in followers {
        // Closing its stdin ends it; it reports its CPU time first.
        drop(follower.stdin.take());
        let _ = follower.wait();
    }

    match peak_rss_kib() {
        Some(kib) => println!("peak_rss_kib={kib}"),
        None => println!("peak_rss_kib=unknown"),
    }
    Ok(ok)
}
