//! The Redis change feed (client tracking) keeps a cache coherent with writes from
//! another process, on one node and on a cluster, and while the feed is cut nothing
//! cached is served.
//!
//! Needs servers: `AIECS_TEST_REDIS_URL=redis://127.0.0.1:6379` and
//! `AIECS_TEST_REDIS_CLUSTER_URL=redis+cluster://127.0.0.1:7101,...` (started by
//! `scripts/redis-cluster.sh start`). Unset, each test prints a notice and passes,
//! except under `CI=true` where it fails. Each test works under a key prefix of its own.
#![cfg(feature = "redis")]

use std::sync::Arc;

use aiecs_storage::layer::CacheLayer;
use aiecs_storage::RedisBackend;
use serde_json::json;
use tower::Layer;

mod common;

use common::coherence::{self, figure, until_feed, until_fresh, until_lost, view};
use common::proxy::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_writer() {
    coherence::child_writer(|url| aiecs_storage::open(url).unwrap()).await
}

/// `url` under a prefix no other test uses.
fn prefixed(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}prefix={}:", common::unique_name("coh"))
}

fn backend(url: &str) -> Arc<RedisBackend> {
    Arc::new(RedisBackend::new(url).unwrap())
}

async fn another_process_writes(server: &str) {
    let url = prefixed(server);
    let store = backend(&url);
    let coherent = CacheLayer::new().layer(store.clone());
    // The same store with a cache that ignores the feed: what the test would see
    // without it.
    let blind = CacheLayer::new().with_coherence(false).layer(store.clone());
    coherence::another_process_writes(&url, &*store, &coherent, &blind).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_another_process_reaches_the_cache() {
    let Some(server) = common::server_url("AIECS_TEST_REDIS_URL", "redis") else {
        return;
    };
    another_process_writes(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_another_process_reaches_the_cache_on_a_cluster() {
    let Some(server) = common::server_url("AIECS_TEST_REDIS_CLUSTER_URL", "redis cluster") else {
        return;
    };
    another_process_writes(&server).await;
}

/// The node URLs a server URL names: one node, or a cluster's seeds.
fn nodes(server: &str) -> Vec<String> {
    match server.strip_prefix("redis+cluster://") {
        Some(rest) => rest
            .split(',')
            .map(|h| format!("redis://{}", h.trim_end_matches('/')))
            .collect(),
        None => vec![server.to_owned()],
    }
}

async fn connection(node: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(node).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Kills, on every node, the connections named `name`; how many.
async fn kill_named(server: &str, name: &str) -> usize {
    let mut killed = 0;
    for node in nodes(server) {
        let mut conn = connection(&node).await;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .unwrap();
        for line in list.lines() {
            let field = |key: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
            };
            if field("name") != Some(name) {
                continue;
            }
            let id = field("id").unwrap();
            let n: usize = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap();
            killed += n;
        }
    }
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_feed_is_cut_reads_go_to_the_store() {
    let Some(server) = common::server_url("AIECS_TEST_REDIS_URL", "redis") else {
        return;
    };
    let url = prefixed(&server);
    let address = url::Url::parse(&url).unwrap();
    let target = format!(
        "{}:{}",
        address.host_str().unwrap(),
        address.port().unwrap_or(6379)
    );
    let proxy = Proxy::start(target, b"TRACKING").await;
    let mut through = url::Url::parse(&url).unwrap();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.port)).unwrap();

    let writer = backend(&url);
    coherence::seed(&*writer).await;
    let cache = CacheLayer::new().layer(backend(through.as_str()));
    view(&cache).await;
    until_feed(&cache, "up").await;
    let before = view(&cache).await;
    assert_eq!(view(&cache).await, before);

    // Kill the feed's connection on the server, and keep it from coming back.
    proxy.refuse(true);
    // The reader turns tracking on with every read, on its one connection.
    let mut marked = proxy.marked();
    marked.dedup();
    assert_eq!(marked.len(), 1, "one feed connection: {marked:?}");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ADDR")
        .arg(marked[0].to_string())
        .query_async(&mut connection(&server).await)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    until_feed(&cache, "down").await;
    coherence::reads_while_down_are_fresh(&*writer, &cache, 0).await;
    assert!(figure(&cache, "feed_losses").await.as_u64().unwrap() >= 1);

    // Let it back: it reconnects, and follows changes again.
    proxy.refuse(false);
    until_feed(&cache, "up").await;
    assert_eq!(view(&cache).await.requests, Some(3));
    coherence::write(&*writer, "session").await;
    let delay = until_fresh(&cache, |v| v.requests == Some(4)).await;
    println!("feed delay after reconnecting: {delay:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_feed_connection_on_a_cluster_never_leaves_a_stale_read() {
    let Some(server) = common::server_url("AIECS_TEST_REDIS_CLUSTER_URL", "redis cluster") else {
        return;
    };
    let url = prefixed(&server);
    let writer = backend(&url);
    coherence::seed(&*writer).await;
    let cache = CacheLayer::new().layer(backend(&url));
    view(&cache).await;
    until_feed(&cache, "up").await;

    // The feed names its connections after the process, so this test kills only its
    // own, on every node; they come back at once, so what matters is that no read
    // between the kill and the return serves what the writer replaced.
    let name = format!("aiecs-storage-feed-{}", std::process::id());
    for round in 1..=3u64 {
        until_feed(&cache, "up").await;
        view(&cache).await;
        let losses = figure(&cache, "feed_losses").await.as_u64().unwrap();
        assert!(
            kill_named(&server, &name).await >= 1,
            "the feed's connections"
        );
        until_lost(&cache, losses).await;
        coherence::write(&*writer, "session").await;
        coherence::write(&*writer, &format!("checkpoint {round}")).await;
        let seen = view(&cache).await;
        assert_eq!(
            seen.requests,
            Some(round),
            "a stale read after the feed was cut"
        );
        assert_eq!(seen.latest, format!("c{round}"));
    }
    until_feed(&cache, "up").await;
    coherence::write(&*writer, "context 9").await;
    until_fresh(&cache, |v| v.context == Some(json!({"step": 9}))).await;
}
