//! The PostgreSQL change feed keeps a cache coherent with writes from another process
//! (within 50 ms), reports each committed write exactly once and never before it
//! commits, says when it may have missed some or is off, and while the feed is cut
//! nothing cached is served.
//!
//! Needs a server: `AIECS_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test`.
//! Unset, each test prints a notice and passes, except under `CI=true` where it fails.
//! Each test works in a schema of its own and drops it when it passes.
#![cfg(feature = "postgres")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::feed::{Change, ChangeFeed, FeedEvent};
use aiecs_storage::layer::CacheLayer;
use aiecs_storage::prelude::*;
use aiecs_storage::PostgresBackend;
use serde_json::json;
use tower::Layer;

mod common;

use common::coherence::{self, figure, seed, until_feed, until_fresh, view};
use common::pg::{drop_schema, raw};
use common::proxy::Proxy;

/// How long the tests wait for what is not about freshness (a reconnection, an event).
const DEADLINE: Duration = Duration::from_secs(10);

/// Held by the tests that time the feed and by the one that loads the server, so that
/// this binary's own load does not make the first late.
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// A backend as the tests use it: the change feed on, as by default.
fn backend(url: &str) -> Arc<PostgresBackend> {
    Arc::new(
        PostgresBackend::new(url)
            .unwrap()
            .with_pool_size(2)
            .with_max_overflow(2),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_writer() {
    coherence::child_writer(|url| backend(url)).await
}

/// Another process writes through a backend made from `child_url` (the parent's schema);
/// a coherent cache here reads each write, a blind one never.
async fn a_cache_follows_the_writes_of(base: &str, schema: &str, child_url: &str) {
    let _timed = TIMED.lock().await;
    let url = with_params(base, &[("schema", schema)]);
    let store = backend(&url);
    let coherent = CacheLayer::new().layer(store.clone());
    // The same store with a cache that ignores the feed: what the test would see
    // without it.
    let blind = CacheLayer::new().with_coherence(false).layer(store.clone());
    coherence::another_process_writes(child_url, &*store, &coherent, &blind).await;
    // A feed that starts down has lost nothing, and nothing was missed since.
    assert_eq!(figure(&coherent, "feed_losses").await, json!(0));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_another_process_reaches_the_cache() {
    let Some(base) = server() else { return };
    let schema = common::unique_name("coh");
    let url = with_params(&base, &[("schema", &schema)]);
    a_cache_follows_the_writes_of(&base, &schema, &url).await;
    drop_schema(&base, &schema).await;
}

/// A process whose backend has the feed off still logs its writes to a schema whose feed
/// is on, so the others' caches see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_with_the_feed_off_is_still_followed() {
    let Some(base) = server() else { return };
    let schema = common::unique_name("cohoff");
    let url = with_params(&base, &[("schema", &schema), ("change_feed", "off")]);
    a_cache_follows_the_writes_of(&base, &schema, &url).await;
    drop_schema(&base, &schema).await;
}

/// What only the feed's follower sends: its statements take the server's snapshot.
const FOLLOWER_MARK: &[u8] = b"pg_current_snapshot()::text";

/// A TCP proxy to the server that, when told, cuts every connection that sends
/// [`FOLLOWER_MARK`]: the feed's connection cannot come back, the pool's are untouched.
async fn proxy(url: &str) -> Proxy {
    let u = url::Url::parse(url).unwrap();
    let target = format!(
        "{}:{}",
        u.host_str().unwrap_or("localhost"),
        u.port().unwrap_or(5432)
    );
    Proxy::start(target, FOLLOWER_MARK).await
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
    proxy.refuse(true);
    let cut = raw(&base)
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE '%pg_current_snapshot()::text%'",
            &[&app],
        )
        .await
        .unwrap();
    assert_eq!(cut, 1, "exactly the feed's connection");
    until_feed(&cache, "down").await;

    // Writes the feed cannot report: every read right after sees them.
    coherence::reads_while_down_are_fresh(&*writer, &cache, 0).await;
    assert!(writer.delete_session("s").await.unwrap());
    let seen = view(&cache).await;
    assert_eq!(
        (seen.requests, seen.context),
        (None, None),
        "a deleted session read while the feed is down"
    );
    assert!(figure(&cache, "feed_losses").await.as_u64().unwrap() >= 1);

    // Let it back: it reconnects, and follows changes again.
    proxy.refuse(false);
    until_feed(&cache, "up").await;
    assert_eq!(view(&cache).await.latest, "c3");
    writer
        .store_task_context("s", &json!({"step": 9}))
        .await
        .unwrap();
    let delay = until_fresh(&cache, |v| v.context == Some(json!({"step": 9}))).await;
    println!("feed delay after reconnecting: {delay:?}");
    drop_schema(&base, &schema).await;
}

/// The next event of `feed` within [`DEADLINE`].
async fn next_event(feed: &mut ChangeFeed) -> FeedEvent {
    tokio::time::timeout(DEADLINE, feed.next())
        .await
        .expect("the feed said something in time")
        .expect("the feed is open")
}

/// Waits for `wanted`, skipping changes (and, waiting for `Up`, the `Down` a
/// subscription starts with while the follower connects).
async fn until_event(feed: &mut ChangeFeed, wanted: FeedEvent) {
    loop {
        match next_event(feed).await {
            FeedEvent::Changed(_) => {}
            FeedEvent::Down if wanted == FeedEvent::Up => {}
            event if event == wanted => return,
            other => panic!("waiting for {wanted:?}, got {other:?}"),
        }
    }
}

/// Many writers on two backends (two pools, so concurrent transactions commit in any
/// order): each write is reported once, and only once it committed (a read on a third
/// backend, made when the report arrives, finds it), and nothing is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_commit_is_reported_once_and_never_before() {
    let Some(base) = server() else { return };
    let _timed = TIMED.lock().await;
    let schema = common::unique_name("once");
    let url = with_params(&base, &[("schema", &schema)]);
    let follower = backend(&url);
    follower.initialize().await.unwrap();
    let mut feed = follower.changes().expect("the feed is on by default");
    until_event(&mut feed, FeedEvent::Up).await;

    let checker = backend(&url);
    const WRITERS: usize = 16;
    const WRITES: usize = 40;
    let writers: Vec<_> = (0..2)
        .map(|_| {
            Arc::new(
                PostgresBackend::new(&url)
                    .unwrap()
                    .with_pool_size(8)
                    .with_max_overflow(0),
            )
        })
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let store = writers[w % 2].clone();
        tasks.spawn(async move {
            for i in 0..WRITES {
                store
                    .store_task_context(&format!("w{w}-{i}"), &json!({"i": i}))
                    .await
                    .unwrap();
            }
        });
    }

    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.len() < WRITERS * WRITES {
        match next_event(&mut feed).await {
            FeedEvent::Changed(Change::TaskContext(id)) => {
                assert!(
                    checker.get_task_context(&id).await.unwrap().is_some(),
                    "{id} was reported before it committed"
                );
                *seen.entry(id).or_default() += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    // Nothing more comes: a change reported twice would show up by now.
    let quiet = tokio::time::timeout(Duration::from_millis(200), feed.next()).await;
    assert!(quiet.is_err(), "after every write: {quiet:?}");
    assert!(seen.values().all(|&n| n == 1), "reported more than once");
    follower.close().await.unwrap();
    drop_schema(&base, &schema).await;
}

/// A follower whose last snapshot is older than what was pruned says it missed
/// changes, and goes on; a schema whose feed is turned off takes the feed down, and
/// turning it on again brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_past_the_follower_is_missed_and_off_is_down() {
    let Some(base) = server() else { return };
    let schema = common::unique_name("prn");
    let url = with_params(&base, &[("schema", &schema)]);
    let store = backend(&url);
    store.initialize().await.unwrap();
    let mut feed = store.changes().unwrap();
    until_event(&mut feed, FeedEvent::Up).await;
    let admin = raw(&base).await;
    let s = format!("\"{schema}\"");

    // As if rows written after the follower's last snapshot had been pruned: past
    // this transaction's own id, which no earlier snapshot can see.
    admin
        .batch_execute(&format!(
            "INSERT INTO {s}.changes_pruned (below) \
             VALUES ((pg_current_xact_id()::text::bigint + 1)::text::xid8) \
             ON CONFLICT (only_row) DO UPDATE SET below = EXCLUDED.below"
        ))
        .await
        .unwrap();
    until_event(&mut feed, FeedEvent::Missed).await;
    // More `Missed` (which stand for whatever else the polls found) may follow while
    // the follower's snapshots predate the mark, held back by transactions of other
    // tests; then the feed, still up, reports changes again.
    while let Ok(event) = tokio::time::timeout(Duration::from_millis(300), feed.next()).await {
        assert_eq!(event, Some(FeedEvent::Missed));
    }
    store.store_task_context("x", &json!(1)).await.unwrap();
    assert_eq!(
        next_event(&mut feed).await,
        FeedEvent::Changed(Change::TaskContext("x".into()))
    );

    admin
        .batch_execute(&format!("DELETE FROM {s}.change_feed"))
        .await
        .unwrap();
    until_event(&mut feed, FeedEvent::Down).await;
    // Off, a backend opened now logs nothing; one that opened while the schema logged
    // goes on logging without reading the flag, and its rows are pruned as before.
    let later = backend(&with_params(
        &base,
        &[("schema", &schema), ("change_feed", "off")],
    ));
    later.store_task_context("y", &json!(1)).await.unwrap();
    store.store_task_context("w", &json!(1)).await.unwrap();
    let logged = |id: &'static str| {
        let admin = &admin;
        let s = &s;
        async move {
            admin
                .query_one(
                    &format!("SELECT count(*) FROM {s}.changes WHERE id = $1"),
                    &[&id],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(logged("y").await, 0);
    assert_eq!(logged("w").await, 1);
    // Another pruner (the backend's own) or a transaction of another test running
    // since before the write may hold a prune back for a while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while logged("w").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log is not pruned while the feed is off"
        );
        admin
            .batch_execute(&format!(
                "SELECT {s}.prune_changes(make_interval(secs => 0))"
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    later.close().await.unwrap();
    admin
        .batch_execute(&format!("INSERT INTO {s}.change_feed DEFAULT VALUES"))
        .await
        .unwrap();
    until_event(&mut feed, FeedEvent::Up).await;
    store.store_task_context("z", &json!(1)).await.unwrap();
    assert_eq!(
        next_event(&mut feed).await,
        FeedEvent::Changed(Change::TaskContext("z".into()))
    );
    store.close().await.unwrap();
    drop_schema(&base, &schema).await;
}

/// With the feed off (`?change_feed=off`) a backend offers none and turns none on:
/// writes to a schema nobody turned it on for log nothing. Once another backend turns
/// it on, the first one's writes are logged too, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_offers_no_feed_and_logs_only_once_another_turned_it_on() {
    let Some(base) = server() else { return };
    let schema = common::unique_name("foff");
    let off_url = with_params(&base, &[("schema", &schema), ("change_feed", "off")]);
    let off = backend(&off_url);
    assert!(off.changes().is_none());
    assert!(
        PostgresBackend::new(&with_params(&base, &[("schema", &schema)]))
            .unwrap()
            .with_change_feed(false)
            .changes()
            .is_none()
    );
    off.store_task_context("a", &json!(1)).await.unwrap();
    let admin = raw(&base).await;
    let count = |id: &'static str| {
        let (admin, schema) = (&admin, &schema);
        async move {
            admin
                .query_one(
                    &format!("SELECT count(*) FROM \"{schema}\".changes WHERE id = $1"),
                    &[&id],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count("a").await, 0);

    let on = backend(&with_params(&base, &[("schema", &schema)]));
    on.initialize().await.unwrap();
    let mut feed = on.changes().unwrap();
    until_event(&mut feed, FeedEvent::Up).await;
    off.store_task_context("b", &json!(1)).await.unwrap();
    assert_eq!(
        next_event(&mut feed).await,
        FeedEvent::Changed(Change::TaskContext("b".into()))
    );
    on.close().await.unwrap();
    off.close().await.unwrap();
    drop_schema(&base, &schema).await;
}
