//! The PostgreSQL change feed keeps a cache coherent with writes from another process,
//! and while the feed is cut nothing cached is served.
//!
//! Needs a server: `AIECS_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test`.
//! Unset, each test prints a notice and passes, except under `CI=true` where it fails.
//! Each test works in a schema of its own and drops it when it passes.
#![cfg(feature = "postgres")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiecs_storage::layer::CacheLayer;
use aiecs_storage::prelude::*;
use aiecs_storage::{Metadata, NewCheckpoint, PostgresBackend, SessionUpdate};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::Layer;

mod common;

use common::pg::{drop_schema, raw};

/// Set in the child process: the URL (schema included) it writes to.
const CHILD_URL: &str = "AIECS_TEST_COHERENCE_CHILD_URL";
/// How long a change may take to reach the cache before the test fails. The issue
/// aims at 50 ms on loopback; this bound only catches a feed that does not work.
const DEADLINE: Duration = Duration::from_secs(5);

fn server() -> Option<String> {
    common::server_url("AIECS_TEST_POSTGRES_URL", "postgres")
}

/// `url` with the query parameters `pairs` added.
fn with_params(url: &str, pairs: &[(&str, &str)]) -> String {
    let mut u = url::Url::parse(url).unwrap();
    for (k, v) in pairs {
        u.query_pairs_mut().append_pair(k, v);
    }
    u.to_string()
}

fn backend(url: &str) -> Arc<PostgresBackend> {
    Arc::new(
        PostgresBackend::new(url)
            .unwrap()
            .with_change_feed(true)
            .with_pool_size(2)
            .with_max_overflow(2),
    )
}

/// The cache's figure `name` (its layer is the outermost).
async fn figure(storage: &dyn StorageBackend, name: &str) -> Value {
    storage.get_metrics().await.unwrap().values[name].clone()
}

async fn until_feed(storage: &dyn StorageBackend, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while figure(storage, "feed").await != json!(state) {
        assert!(Instant::now() < deadline, "the feed never read {state}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What the test reads through a cache: a session's request count, the thread's latest
/// checkpoint id and the task context.
#[derive(Debug, Clone, PartialEq)]
struct View {
    requests: u64,
    latest: String,
    context: Value,
}

async fn view(storage: &dyn StorageBackend) -> View {
    View {
        requests: storage
            .get_session("s")
            .await
            .unwrap()
            .unwrap()
            .metrics
            .request_count,
        latest: storage
            .get_checkpoint("t", "", None)
            .await
            .unwrap()
            .unwrap()
            .checkpoint_id,
        context: storage.get_task_context("s").await.unwrap().unwrap(),
    }
}

async fn seed(storage: &dyn StorageBackend) {
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

/// The writer process: one write per line read ("session", "checkpoint N",
/// "context N"), a line `CHILD done ...` once it committed. Runs only when the parent
/// test starts it; otherwise it passes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_writer() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let store = backend(&url);
    store.initialize().await.unwrap();
    let mut out = std::io::stdout();
    writeln!(out, "CHILD ready").unwrap();
    out.flush().unwrap();
    let lines = BufReader::new(std::io::stdin()).lines();
    for line in lines {
        let line = line.unwrap();
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("session"), _) => {
                let inc = SessionUpdate::new().increment_requests();
                assert!(store.update_session("s", &inc).await.unwrap());
            }
            (Some("checkpoint"), Some(n)) => store
                .store_checkpoint(&NewCheckpoint::new("t", format!("c{n}"), json!({"n": n})))
                .await
                .unwrap(),
            (Some("context"), Some(n)) => store
                .store_task_context("s", &json!({"step": n.parse::<u64>().unwrap()}))
                .await
                .unwrap(),
            (Some("quit"), _) => break,
            other => panic!("unknown command {other:?}"),
        }
        writeln!(out, "CHILD done {line}").unwrap();
        out.flush().unwrap();
    }
    store.close().await.unwrap();
}

/// The child process and its pipes.
struct Child {
    process: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Child {
    fn start(url: &str) -> Child {
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
    fn write(&mut self, command: &str) {
        writeln!(self.input, "{command}").unwrap();
        self.input.flush().unwrap();
        self.expect(&format!("CHILD done {command}"));
    }

    fn finish(mut self) {
        writeln!(self.input, "quit").unwrap();
        drop(self.input);
        assert!(self.process.wait().unwrap().success(), "the writer failed");
    }
}

/// Whether a view shows a write.
type Fresh = dyn Fn(&View) -> bool;

/// Reads through `storage` until `fresh` holds for what it sees; the time it took.
async fn until_fresh(storage: &dyn StorageBackend, fresh: impl Fn(&View) -> bool) -> Duration {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_another_process_reaches_the_cache() {
    let Some(base) = server() else { return };
    let schema = common::unique_name("coh");
    let url = with_params(&base, &[("schema", &schema)]);
    let store = backend(&url);
    seed(&*store).await;

    let coherent = CacheLayer::new().layer(store.clone());
    // The same store with a cache that ignores the feed: what the test would see
    // without it.
    let blind = CacheLayer::new().with_coherence(false).layer(store.clone());
    view(&coherent).await;
    until_feed(&coherent, "up").await;
    let before = view(&coherent).await;
    assert_eq!(view(&blind).await, before);
    let hits = figure(&coherent, "hits").await;
    assert_eq!(view(&coherent).await, before);
    assert_ne!(
        figure(&coherent, "hits").await,
        hits,
        "the reads are cached"
    );

    let mut child = Child::start(&url);
    let steps: [(&str, &Fresh); 3] = [
        ("session", &|v| v.requests == 1),
        ("checkpoint 1", &|v| v.latest == "c1"),
        ("context 1", &|v| v.context == json!({"step": 1})),
    ];
    for (command, fresh) in steps {
        child.write(command);
        let delay = until_fresh(&coherent, fresh).await;
        println!("feed delay after `{command}`: {delay:?} (the issue aims at 50 ms)");
    }
    child.finish();

    // The blind cache still serves what it read first.
    assert_eq!(view(&blind).await, before);
    let after = view(&store).await;
    assert_eq!(
        after,
        View {
            requests: 1,
            latest: "c1".into(),
            context: json!({"step": 1}),
        }
    );
    assert_eq!(view(&coherent).await, after);
    assert!(figure(&coherent, "remote_changes").await.as_u64().unwrap() >= 3);
    drop_schema(&base, &schema).await;
}

/// A TCP proxy to the server that, when told, cuts every connection that sends
/// `LISTEN`: the feed's connection cannot come back, the pool's are untouched.
struct Proxy {
    port: u16,
    refuse_listen: Arc<AtomicBool>,
}

async fn proxy(url: &str) -> Proxy {
    let u = url::Url::parse(url).unwrap();
    let target = format!(
        "{}:{}",
        u.host_str().unwrap_or("localhost"),
        u.port().unwrap_or(5432)
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let refuse_listen = Arc::new(AtomicBool::new(false));
    let refuse = refuse_listen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = match tokio::net::TcpStream::connect(&target).await {
                Ok(server) => server,
                Err(e) => {
                    eprintln!("proxy: cannot reach {target}: {e}");
                    continue;
                }
            };
            let refuse = refuse.clone();
            tokio::spawn(async move {
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let upstream = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = from_client.read(&mut buf).await?;
                        let sent = &buf[..n];
                        if n == 0
                            || (refuse.load(Ordering::SeqCst)
                                && sent.windows(7).any(|w| w == b"LISTEN "))
                        {
                            return Ok::<(), std::io::Error>(());
                        }
                        to_server.write_all(sent).await?;
                    }
                };
                let downstream = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = from_server.read(&mut buf).await?;
                        if n == 0 {
                            return Ok::<(), std::io::Error>(());
                        }
                        to_client.write_all(&buf[..n]).await?;
                    }
                };
                // Either side ending drops both connections.
                tokio::select! {
                    _ = upstream => {}
                    _ = downstream => {}
                }
            });
        }
    });
    Proxy {
        port,
        refuse_listen,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_feed_is_cut_reads_go_to_the_store() {
    let Some(base) = server() else { return };
    let schema = common::unique_name("cut");
    let app = format!("aiecs-test-{schema}");
    let url = with_params(&base, &[("schema", &schema)]);
    let proxy = proxy(&url).await;
    let mut through = url::Url::parse(&url).unwrap();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.port)).unwrap();
    let through = with_params(through.as_str(), &[("application_name", &app)]);

    let writer = backend(&url);
    seed(&*writer).await;
    let cache = CacheLayer::new().layer(backend(&through));
    view(&cache).await;
    until_feed(&cache, "up").await;
    let before = view(&cache).await;
    assert_eq!(view(&cache).await, before);

    // Cut the feed's connection on the server, and keep it from coming back.
    proxy.refuse_listen.store(true, Ordering::SeqCst);
    let cut = raw(&base)
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE 'LISTEN%'",
            &[&app],
        )
        .await
        .unwrap();
    assert_eq!(cut, 1, "exactly the feed's connection");
    until_feed(&cache, "down").await;

    // Writes the feed cannot report: every read right after sees them.
    let hits = figure(&cache, "hits").await;
    for n in 1..=3u64 {
        let inc = SessionUpdate::new().increment_requests();
        assert!(writer.update_session("s", &inc).await.unwrap());
        writer
            .store_checkpoint(&NewCheckpoint::new("t", format!("c{n}"), json!({"n": n})))
            .await
            .unwrap();
        writer
            .store_task_context("s", &json!({"step": n}))
            .await
            .unwrap();
        let seen = view(&cache).await;
        assert_eq!(
            seen,
            View {
                requests: n,
                latest: format!("c{n}"),
                context: json!({"step": n}),
            },
            "a stale read while the feed is down"
        );
    }
    assert_eq!(figure(&cache, "feed").await, json!("down"));
    assert_eq!(
        figure(&cache, "hits").await,
        hits,
        "nothing served from cache"
    );
    assert!(figure(&cache, "feed_losses").await.as_u64().unwrap() >= 1);

    // Let it back: it reconnects, and follows changes again.
    proxy.refuse_listen.store(false, Ordering::SeqCst);
    until_feed(&cache, "up").await;
    assert_eq!(view(&cache).await.requests, 3);
    let inc = SessionUpdate::new().increment_requests();
    assert!(writer.update_session("s", &inc).await.unwrap());
    let delay = until_fresh(&cache, |v| v.requests == 4).await;
    println!("feed delay after reconnecting: {delay:?}");
    drop_schema(&base, &schema).await;
}
