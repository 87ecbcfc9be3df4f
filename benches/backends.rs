//! Per-call cost of the hot operations on the embedded backends.
//!
//! ```text
//! cargo bench --bench backends
//! ```

use std::sync::Arc;

use aiecs_storage::prelude::*;
use aiecs_storage::{MemoryBackend, Metadata, NewMessage, SessionUpdate, SqliteBackend};
use criterion::{criterion_group, criterion_main, Criterion};

fn bench_backend(c: &mut Criterion, name: &str, storage: Arc<dyn StorageBackend>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        storage.initialize().await.expect("initialize");
        storage
            .create_session("bench", "user", &Metadata::new())
            .await
            .expect("create");
    });
    let mut group = c.benchmark_group(name);
    group.bench_function("get_session", |b| {
        b.to_async(&rt)
            .iter(|| async { storage.get_session("bench").await.expect("get") })
    });
    group.bench_function("update_session", |b| {
        let update = SessionUpdate::new()
            .increment_requests()
            .add_processing_time(0.01);
        b.to_async(&rt).iter(|| async {
            storage
                .update_session("bench", &update)
                .await
                .expect("update")
        })
    });
    group.bench_function("add_conversation_message", |b| {
        let message = NewMessage::new("user", "x".repeat(110));
        b.to_async(&rt).iter(|| async {
            storage
                .add_conversation_message("bench", &message)
                .await
                .expect("add")
        })
    });
    group.finish();
    rt.block_on(storage.close()).expect("close");
}

fn backends(c: &mut Criterion) {
    bench_backend(c, "memory", Arc::new(MemoryBackend::new()));
    let dir = tempfile::tempdir().expect("tempdir");
    bench_backend(
        c,
        "sqlite",
        Arc::new(SqliteBackend::new(dir.path().join("bench.db"))),
    );
}

criterion_group!(benches, backends);
criterion_main!(benches);
