//! What each layer costs over the memory backend: `get_session` and `update_session`
//! bare, through each layer alone, and through every layer stacked.
//!
//! ```text
//! cargo bench --bench layers --features prometheus
//! ```
//!
//! The metrics layer runs with a Prometheus recorder installed and the logging layer
//! with a subscriber that filters at info, as they would in production. The cache is
//! measured on hits; the batching layer passes these two operations through.

use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::{
    BatchLayer, CacheLayer, FailoverLayer, LoggingLayer, MetricsLayer, RetryLayer, StackBuilder,
    TimeoutLayer,
};
use aiecs_storage::prelude::*;
use aiecs_storage::{MemoryBackend, Metadata, SessionUpdate};
use criterion::{criterion_group, criterion_main, Criterion};

fn stacks() -> Vec<(&'static str, StackBuilder)> {
    let fallback = || Arc::new(MemoryBackend::new()) as Arc<dyn StorageBackend>;
    vec![
        ("bare", StackBuilder::new()),
        ("retry", StackBuilder::new().layer(RetryLayer::new())),
        (
            "timeout",
            StackBuilder::new().layer(TimeoutLayer::new(Duration::from_secs(5))),
        ),
        ("metrics", StackBuilder::new().layer(MetricsLayer::new())),
        ("logging", StackBuilder::new().layer(LoggingLayer::new())),
        ("cache", StackBuilder::new().layer(CacheLayer::new())),
        ("batch", StackBuilder::new().layer(BatchLayer::new())),
        (
            "failover",
            StackBuilder::new().layer(FailoverLayer::new(fallback())),
        ),
        (
            "all",
            StackBuilder::new()
                .layer(MetricsLayer::new())
                .layer(LoggingLayer::new())
                .layer(CacheLayer::new())
                .layer(RetryLayer::new())
                .layer(TimeoutLayer::new(Duration::from_secs(5)))
                .layer(FailoverLayer::new(fallback()))
                .layer(BatchLayer::new()),
        ),
    ]
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        aiecs_storage::prometheus::install_recorder().expect("recorder");
    });
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::sink)
        .init();

    for op in ["get_session", "update_session"] {
        let mut group = c.benchmark_group(op);
        for (name, stack) in stacks() {
            let storage = stack.build(Arc::new(MemoryBackend::new()));
            rt.block_on(async {
                storage
                    .create_session("bench", "user", &Metadata::new())
                    .await
                    .expect("create");
                storage.get_session("bench").await.expect("warm");
            });
            let update = SessionUpdate::new().increment_requests();
            group.bench_function(name, |b| {
                b.to_async(&rt).iter(|| async {
                    if op == "get_session" {
                        storage.get_session("bench").await.expect("get").is_some()
                    } else {
                        storage
                            .update_session("bench", &update)
                            .await
                            .expect("update")
                    }
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, layers);
criterion_main!(benches);
