//! What walking every page of `list_sessions` and `list_threads` costs on Redis, the
//! way `migrate` and `export` walk them: N sessions and N threads, then every page in
//! turn, timed as a whole and page by page.
//!
//! ```text
//! cargo run --release --example redis_listing --features redis -- [--url URL] [--n N] [--page P]
//! ```
//!
//! Defaults: `redis://127.0.0.1:6379`, N = 100 000, P = 100 (the migrator's page). The
//! records live under a prefix of their own (`listbench-<pid>:`), removed at the end.
//! One line per listing: `list=<op> n=<N> page=<P> pages=<count> total_s=<x>
//! first10_ms=<mean of the first ten pages> last10_ms=<mean of the last ten>`. If a page
//! reads the whole index, the last pages cost what the first ones do and the total grows
//! with N squared; if it reads from the cursor, the total grows with N.

use std::time::{Duration, Instant};

use aiecs_storage::prelude::*;
use aiecs_storage::{Checkpoint, NewSession, RedisBackend, SessionQuery};
use chrono::Utc;
use serde_json::json;

/// Records written per call (one pipeline on a node).
const BATCH: usize = 1000;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// `first10_ms` and `last10_ms` of one walk.
fn ends(pages: &[Duration]) -> (f64, f64) {
    let mean = |d: &[Duration]| {
        d.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / d.len().max(1) as f64
    };
    let k = pages.len().min(10);
    (mean(&pages[..k]), mean(&pages[pages.len() - k..]))
}

fn report(op: &str, n: usize, page: usize, total: Duration, pages: &[Duration]) {
    let (first, last) = ends(pages);
    println!(
        "list={op} n={n} page={page} pages={} total_s={:.2} first10_ms={first:.2} \
         last10_ms={last:.2}",
        pages.len(),
        total.as_secs_f64()
    );
}

fn session_id(i: usize) -> String {
    format!("s{i:08}")
}

fn thread_id(i: usize) -> String {
    format!("t{i:08}")
}

#[tokio::main]
async fn main() -> aiecs_storage::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = arg(&args, "--url").unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let n: usize = arg(&args, "--n").map_or(100_000, |v| v.parse().expect("--n"));
    let page: usize = arg(&args, "--page").map_or(100, |v| v.parse().expect("--page"));
    let backend =
        RedisBackend::new(&url)?.with_prefix(format!("listbench-{}:", std::process::id()));
    backend.initialize().await?;

    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(BATCH) {
        let sessions: Vec<NewSession> = chunk
            .iter()
            .map(|&i| NewSession::new(session_id(i), format!("user{}", i % 100)))
            .collect();
        backend.batch_create_sessions(&sessions).await?;
        let checkpoints: Vec<Checkpoint> = chunk
            .iter()
            .map(|&i| Checkpoint {
                thread_id: thread_id(i),
                checkpoint_ns: String::new(),
                checkpoint_id: "c1".into(),
                parent_checkpoint_id: None,
                data: json!({ "i": i }),
                metadata: Default::default(),
                created_at: Utc::now(),
            })
            .collect();
        backend.restore_checkpoints(&checkpoints).await?;
    }
    eprintln!(
        "seeded {n} sessions and {n} threads in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (mut query, mut pages, mut seen) = (SessionQuery::new().limit(page), Vec::new(), 0);
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let listed = backend.list_sessions(&query).await?;
        pages.push(t.elapsed());
        seen += listed.sessions.len();
        match listed.next_cursor {
            Some(cursor) => query.after = Some(cursor),
            None => break,
        }
    }
    let total = started.elapsed();
    assert_eq!(seen, n, "list_sessions returned every session once");
    report("sessions", n, page, total, &pages);

    let (mut after, mut pages, mut seen) = (None::<String>, Vec::new(), 0);
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let listed = backend.list_threads(after.as_deref(), page).await?;
        pages.push(t.elapsed());
        seen += listed.ids.len();
        match listed.next_cursor {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    let total = started.elapsed();
    assert_eq!(seen, n, "list_threads returned every thread once");
    report("threads", n, page, total, &pages);

    for chunk in (0..n).collect::<Vec<_>>().chunks(BATCH) {
        let deletes = chunk.iter().map(|&i| {
            let backend = &backend;
            async move {
                backend.delete_session(&session_id(i)).await?;
                backend.delete_thread(&thread_id(i)).await
            }
        });
        for done in futures_util::future::join_all(deletes).await {
            done?;
        }
    }
    Ok(())
}
