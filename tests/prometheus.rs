//! The Prometheus exporter over real HTTP: counters, histogram buckets, bounded labels.
#![cfg(feature = "prometheus")]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aiecs_storage::layer::{
    names, CacheLayer, FailoverLayer, MetricsLayer, RetryLayer, StackBuilder,
};
use aiecs_storage::{prelude::*, MemoryBackend, Metadata, NewMessage, SessionUpdate};
use common::fault::Faults;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::Layer;

/// The exporter, installed once for the tests of this process (the recorder is
/// global), on a runtime of its own (each test's runtime ends with the test); its
/// address once it accepts.
async fn serve() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    let addr = *ADDR.get_or_init(|| {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (installed, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                aiecs_storage::prometheus::serve(addr).unwrap();
                installed.send(()).unwrap();
                std::future::pending::<()>().await
            })
        });
        done.recv().unwrap();
        addr
    });
    // The listener starts on that runtime; wait until it accepts.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    addr
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample line whose name and labels contain every `part`.
fn sample(text: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_metrics_count_operations_with_buckets_and_no_ids() {
    let addr = serve().await;

    let storage = StackBuilder::new()
        .layer(MetricsLayer::new().with_backend_label("primary"))
        .layer(CacheLayer::new())
        .layer(RetryLayer::new())
        .build(Arc::new(MemoryBackend::new()));
    let ids: Vec<String> = (0..20).map(|i| format!("session-id-{i:04}")).collect();
    for id in &ids {
        storage
            .create_session(id, "user-x", &Metadata::new())
            .await
            .unwrap();
        storage
            .update_session(id, &SessionUpdate::new().increment_requests())
            .await
            .unwrap();
        storage
            .add_conversation_message(id, &NewMessage::new("user", "content-y"))
            .await
            .unwrap();
        for _ in 0..3 {
            storage.get_session(id).await.unwrap();
        }
    }
    // Bad input: counted as an error of its kind.
    assert!(storage.get_session("").await.is_err());

    let text = scrape(addr).await;
    let ops = names::OPERATIONS_TOTAL;
    assert_eq!(
        sample(
            &text,
            &[
                ops,
                "operation=\"create_session\"",
                "backend=\"primary\"",
                "outcome=\"ok\""
            ]
        ),
        Some(20.0)
    );
    assert_eq!(
        sample(&text, &[ops, "operation=\"get_session\"", "outcome=\"ok\""]),
        Some(60.0)
    );
    assert_eq!(
        sample(
            &text,
            &[ops, "operation=\"get_session\"", "outcome=\"error\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            &[
                names::ERRORS_TOTAL,
                "operation=\"get_session\"",
                "kind=\"invalid_input\""
            ]
        ),
        Some(1.0)
    );
    // A histogram with the crate's buckets, not a summary.
    let hist = names::OPERATION_DURATION_SECONDS;
    for le in ["0.00005", "0.001", "10", "+Inf"] {
        let line = format!("le=\"{le}\"");
        assert!(
            sample(
                &text,
                &[
                    &format!("{hist}_bucket"),
                    "operation=\"get_session\"",
                    &line
                ]
            )
            .is_some(),
            "no bucket le={le} in:\n{text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            &[&format!("{hist}_count"), "operation=\"get_session\""]
        ),
        Some(61.0)
    );
    // The other layers report through the same facade: 2 of the 3 reads per session hit.
    assert_eq!(sample(&text, &[names::CACHE_HITS_TOTAL]), Some(40.0));
    assert!(text.contains("# HELP aiecs_storage_operations_total"));

    // Bounded labels: no id or content ever appears as a label value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("session-id-")
                && !line.contains("user-x")
                && !line.contains("content-y"),
            "a label carries an id or content: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_feed_state_and_what_it_reported_are_exported() {
    use aiecs_storage::feed::Change;
    let addr = serve().await;
    let (store, faults) = common::fault::Faults::wrap(MemoryBackend::new());
    let hub = faults.offer_feed();
    let storage = StackBuilder::new()
        .layer(CacheLayer::new())
        .build(Arc::new(store));
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    let feed = async |state: &str| {
        for _ in 0..1000 {
            let values = storage.get_metrics().await.unwrap().values;
            if values["feed"] == serde_json::json!(state) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("the feed never read {state}");
    };
    feed("down").await;
    hub.up();
    feed("up").await;
    hub.changed(Change::Session("s".into()));
    hub.changed(Change::Thread("t".into()));
    hub.missed();
    let mut tries = 0;
    let text = loop {
        let text = scrape(addr).await;
        if sample(&text, &[names::CACHE_FEED_LOSSES_TOTAL]) == Some(1.0) {
            break text;
        }
        tries += 1;
        assert!(tries < 500, "the losses never reached 1:\n{text}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!(sample(&text, &[names::CACHE_FEED_UP]), Some(1.0));
    assert_eq!(
        sample(&text, &[names::CACHE_REMOTE_CHANGES_TOTAL]),
        Some(2.0)
    );
    hub.down();
    feed("down").await;
    let text = scrape(addr).await;
    assert_eq!(sample(&text, &[names::CACHE_FEED_UP]), Some(0.0));
    assert_eq!(sample(&text, &[names::CACHE_FEED_LOSSES_TOTAL]), Some(2.0));
    assert!(text.contains("# HELP aiecs_storage_cache_feed_up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_journal_exports_its_depth_and_the_age_of_its_oldest_write() {
    let addr = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let (primary, faults) = Faults::wrap(MemoryBackend::new());
    faults.set_down(true);
    let layer = FailoverLayer::new(Arc::new(MemoryBackend::new()))
        .with_failure_threshold(1)
        .with_cooldown(Duration::from_millis(50))
        .with_journal(dir.path().join("failover.journal"))
        .unwrap();
    let storage = layer.layer(primary);
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    storage
        .update_session("s", &SessionUpdate::new().increment_requests())
        .await
        .unwrap();

    // The age grows while the primary stays down: the replay's attempts refresh it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let text = scrape(addr).await;
    assert_eq!(sample(&text, &[names::FAILOVER_JOURNAL_DEPTH]), Some(2.0));
    let age = sample(&text, &[names::FAILOVER_JOURNAL_OLDEST_AGE_SECONDS]);
    assert!(
        age.is_some_and(|a| a >= 0.2),
        "oldest age {age:?} in:\n{text}"
    );
    assert!(text.contains(&format!("# HELP {}", names::FAILOVER_JOURNAL_DEPTH)));

    faults.set_down(false);
    for _ in 0..500 {
        if !layer.is_degraded() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!layer.is_degraded(), "the journal was not replayed");
    let text = scrape(addr).await;
    assert_eq!(sample(&text, &[names::FAILOVER_JOURNAL_DEPTH]), Some(0.0));
    assert_eq!(
        sample(&text, &[names::FAILOVER_JOURNAL_OLDEST_AGE_SECONDS]),
        Some(0.0)
    );
}
