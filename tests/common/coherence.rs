//! Two real processes over one store: a writer child process (the test binary run again
//! on its `child_writer` test) and the test's own cache, which must see the child's
//! writes through the backend's change feed.
//!
//! A test binary using it defines
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn child_writer() {
//!     common::coherence::child_writer(|url| aiecs_storage::open(url).unwrap()).await
//! }
//! ```

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiecs_storage::prelude::*;
use aiecs_storage::{Metadata, NewCheckpoint, SessionUpdate};
use serde_json::{json, Value};

/// Set in the child process: the URL it writes to.
const CHILD_URL: &str = "AIECS_TEST_COHERENCE_CHILD_URL";
/// How long a change may take to reach the cache before the test fails. The issue
/// aims at 50 ms on loopback; this bound only catches a feed that does not work.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// The cache's figure `name` (its layer is the outermost).
pub async fn figure(storage: &dyn StorageBackend, name: &str) -> Value {
    storage.get_metrics().await.unwrap().values[name].clone()
}

/// Waits until the cache's feed figure reads `state`.
pub async fn until_feed(storage: &dyn StorageBackend, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while figure(storage, "feed").await != json!(state) {
        assert!(Instant::now() < deadline, "the feed never read {state}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until the cache counts more feed losses than `before`.
pub async fn until_lost(storage: &dyn StorageBackend, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while figure(storage, "feed_losses").await.as_u64().unwrap() <= before {
        assert!(
            Instant::now() < deadline,
            "the feed never reported the loss"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What the tests read through a cache: session `s`'s request count (`None` once
/// deleted), thread `t`'s latest checkpoint id and `s`'s task context.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub requests: Option<u64>,
    pub latest: String,
    pub context: Option<Value>,
}

pub async fn view(storage: &dyn StorageBackend) -> View {
    View {
        requests: storage
            .get_session("s")
            .await
            .unwrap()
            .map(|s| s.metrics.request_count),
        latest: storage
            .get_checkpoint("t", "", None)
            .await
            .unwrap()
            .unwrap()
            .checkpoint_id,
        context: storage.get_task_context("s").await.unwrap(),
    }
}

/// Session `s`, checkpoint `c0` of thread `t`, and a task context `{"step": 0}`.
pub async fn seed(storage: &dyn StorageBackend) {
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    storage
        .store_checkpoint(&NewCheckpoint::new("t", "c0", json!({"n": 0})))
        .await
        .unwrap();
    storage
        .store_task_context("s", &json!({"step": 0}))
        .await
        .unwrap();
}

/// One write per command: `session` (one more request), `checkpoint N`, `context N`,
/// `delete` (session `s`).
pub async fn write(storage: &dyn StorageBackend, command: &str) {
    let mut words = command.split_whitespace();
    match (words.next(), words.next()) {
        (Some("session"), _) => {
            let inc = SessionUpdate::new().increment_requests();
            assert!(storage.update_session("s", &inc).await.unwrap());
        }
        (Some("checkpoint"), Some(n)) => storage
            .store_checkpoint(&NewCheckpoint::new("t", format!("c{n}"), json!({"n": n})))
            .await
            .unwrap(),
        (Some("context"), Some(n)) => storage
            .store_task_context("s", &json!({"step": n.parse::<u64>().unwrap()}))
            .await
            .unwrap(),
        (Some("delete"), _) => assert!(storage.delete_session("s").await.unwrap()),
        other => panic!("unknown command {other:?}"),
    }
}

/// The child's side: one [`write`] per line read, a line `CHILD done ...` once it
/// committed, until `quit`. Runs only when a parent test started it; otherwise it
/// returns at once.
pub async fn child_writer(open: impl Fn(&str) -> Arc<dyn StorageBackend>) {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let store = open(&url);
    store.initialize().await.unwrap();
    let mut out = std::io::stdout();
    writeln!(out, "CHILD ready").unwrap();
    out.flush().unwrap();
    for line in BufReader::new(std::io::stdin()).lines() {
        let line = line.unwrap();
        if line == "quit" {
            break;
        }
        write(&*store, &line).await;
        writeln!(out, "CHILD done {line}").unwrap();
        out.flush().unwrap();
    }
    store.close().await.unwrap();
}

/// The writer child process and its pipes.
pub struct Child {
    process: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Child {
    /// Runs this test binary again as the writer over `url`.
    pub fn start(url: &str) -> Child {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args(["child_writer", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_URL, url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the test binary runs again as the writer");
        let input = process.stdin.take().unwrap();
        let output = BufReader::new(process.stdout.take().unwrap()).lines();
        let mut child = Child {
            process,
            input,
            output,
        };
        child.expect("CHILD ready");
        child
    }

    fn expect(&mut self, wanted: &str) {
        for line in &mut self.output {
            let line = line.unwrap();
            // libtest may print `test child_writer ... ` on the same line first.
            if line.ends_with(wanted) {
                return;
            }
        }
        panic!("the writer ended before printing {wanted:?}");
    }

    /// Sends a command and waits until the child reports it committed.
    pub fn write(&mut self, command: &str) {
        writeln!(self.input, "{command}").unwrap();
        self.input.flush().unwrap();
        self.expect(&format!("CHILD done {command}"));
    }

    pub fn finish(mut self) {
        writeln!(self.input, "quit").unwrap();
        drop(self.input);
        assert!(self.process.wait().unwrap().success(), "the writer failed");
    }
}

/// Reads through `storage` until `fresh` holds for what it sees; the time it took.
pub async fn until_fresh(storage: &dyn StorageBackend, fresh: impl Fn(&View) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let seen = view(storage).await;
        if fresh(&seen) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the cache still served {seen:?} {DEADLINE:?} after another process wrote"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Whether a view shows a write.
type Fresh = dyn Fn(&View) -> bool;

/// The issue's case: `coherent` (a cache over the store at `url`, following its feed)
/// and `blind` (a cache over it that does not) have read everything; a child process
/// writes through a stack of its own opened from `url`: a session's counters, a newer
/// checkpoint, a task context, then deletes the session. The coherent cache sees each
/// write (the delay printed), the blind one stays stale, which shows the reads were
/// cached. `store` is the uncached store.
pub async fn another_process_writes(
    url: &str,
    store: &dyn StorageBackend,
    coherent: &dyn StorageBackend,
    blind: &dyn StorageBackend,
) {
    seed(store).await;
    view(coherent).await;
    until_feed(coherent, "up").await;
    let before = view(coherent).await;
    assert_eq!(view(blind).await, before);
    let hits = figure(coherent, "hits").await;
    assert_eq!(view(coherent).await, before);
    assert_ne!(figure(coherent, "hits").await, hits, "the reads are cached");

    let mut child = Child::start(url);
    let steps: [(&str, &Fresh); 4] = [
        ("session", &|v| v.requests == Some(1)),
        ("checkpoint 1", &|v| v.latest == "c1"),
        ("context 1", &|v| v.context == Some(json!({"step": 1}))),
        ("delete", &|v| v.requests.is_none() && v.context.is_none()),
    ];
    for (command, fresh) in steps {
        // Cached before the write: the read that follows it must not be served from the
        // cache unless the feed dropped it.
        view(coherent).await;
        child.write(command);
        // Speed is not asserted (a loaded machine would fail it); `until_fresh` fails
        // past its deadline, and README quotes the printed delays.
        let delay = until_fresh(coherent, fresh).await;
        println!("feed delay after `{command}`: {delay:?} (the issue aims at 50 ms)");
    }
    child.finish();

    assert_eq!(
        view(blind).await,
        before,
        "the blind cache serves what it read"
    );
    let after = view(store).await;
    assert_eq!(
        after,
        View {
            requests: None,
            latest: "c1".into(),
            context: None,
        }
    );
    assert_eq!(view(coherent).await, after);
    assert!(figure(coherent, "remote_changes").await.as_u64().unwrap() >= 4);
}

/// While a cache's feed is down: every read right after a write (through `writer`, a
/// stack of its own) sees it, and nothing is served from the cache. Session `s`'s
/// requests read `from` when called.
pub async fn reads_while_down_are_fresh(
    writer: &dyn StorageBackend,
    cache: &dyn StorageBackend,
    from: u64,
) {
    let hits = figure(cache, "hits").await;
    for n in from + 1..=from + 3 {
        write(writer, "session").await;
        write(writer, &format!("checkpoint {n}")).await;
        write(writer, &format!("context {n}")).await;
        assert_eq!(
            view(cache).await,
            View {
                requests: Some(n),
                latest: format!("c{n}"),
                context: Some(json!({"step": n})),
            },
            "a stale read while the feed is down"
        );
    }
    assert_eq!(figure(cache, "feed").await, json!("down"));
    assert_eq!(
        figure(cache, "hits").await,
        hits,
        "nothing served from cache"
    );
}
