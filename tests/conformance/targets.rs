//! The backends and stacks the suite runs against. Each constructor returns a fresh,
//! initialized backend, so cases never see each other's data and may use plain ids.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use aiecs_storage::{MemoryBackend, StorageBackend};

#[cfg(any(feature = "redis", feature = "postgres"))]
use crate::common::{server_url, unique_name};

/// A backend under test, with whatever must outlive it (a temporary directory, a
/// server handle).
pub struct Target {
    pub backend: Arc<dyn StorageBackend>,
    // Dropped after `backend` (fields drop in declaration order), so a database file is
    // removed only once the backend that uses it is gone.
    _guard: Option<Box<dyn Any + Send + Sync>>,
    /// Run after a case passes, to remove what a server-backed test left behind (its
    /// schema or keys), so reruns need no manual cleanup.
    cleanup: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Target {
    async fn ready(
        backend: Arc<dyn StorageBackend>,
        guard: Option<Box<dyn Any + Send + Sync>>,
    ) -> Option<Target> {
        backend.initialize().await.unwrap();
        Some(Target {
            backend,
            _guard: guard,
            cleanup: None,
        })
    }

    /// Sets the cleanup run by [`Target::finish`].
    #[allow(dead_code)]
    fn with_cleanup(mut self, cleanup: impl Future<Output = ()> + Send + 'static) -> Target {
        self.cleanup = Some(Box::pin(cleanup));
        self
    }

    pub async fn finish(self) {
        if let Some(cleanup) = self.cleanup {
            cleanup.await;
        }
    }
}

pub async fn memory() -> Option<Target> {
    Target::ready(Arc::new(MemoryBackend::new()), None).await
}

#[cfg(feature = "sqlite")]
pub async fn sqlite() -> Option<Target> {
    let dir = tempfile::TempDir::new().unwrap();
    let backend = aiecs_storage::SqliteBackend::new(dir.path().join("conformance.db"));
    Target::ready(Arc::new(backend), Some(Box::new(dir))).await
}

#[cfg(feature = "sqlite")]
pub async fn sqlite_memory() -> Option<Target> {
    Target::ready(Arc::new(aiecs_storage::SqliteBackend::in_memory()), None).await
}

/// A Redis backend under a prefix of its own; its keys expire within the hour, so reruns
/// need no cleanup and the suite runs in parallel.
#[cfg(feature = "redis")]
async fn redis_target(var: &str, target: &str) -> Option<Target> {
    let url = server_url(var, target)?;
    let ttl = Some(std::time::Duration::from_secs(3600));
    let backend = aiecs_storage::RedisBackend::new(&url)
        .unwrap()
        .with_prefix(format!("{}:", unique_name(target)))
        .with_session_ttl(ttl)
        .with_checkpoint_ttl(ttl);
    Target::ready(Arc::new(backend), None).await
}

#[cfg(feature = "redis")]
pub async fn redis() -> Option<Target> {
    redis_target("AIECS_TEST_REDIS_URL", "redis").await
}

#[cfg(feature = "redis")]
pub async fn redis_cluster() -> Option<Target> {
    redis_target("AIECS_TEST_REDIS_CLUSTER_URL", "redis_cluster").await
}

// Server backends (redis, postgres) and layer stacks go here, one constructor each plus
// one `target!(name)` line in main.rs. A server target reads its URL with `server_url`,
// isolates itself with `unique_name`, and removes its data with `with_cleanup`.

/// A PostgreSQL backend in a schema of its own, dropped (`DROP SCHEMA ... CASCADE`) over
/// a fresh connection when the case passes, so reruns need no cleanup.
#[cfg(feature = "postgres")]
pub async fn postgres() -> Option<Target> {
    let url = server_url("AIECS_TEST_POSTGRES_URL", "postgres")?;
    let schema = unique_name("pg");
    let backend = aiecs_storage::PostgresBackend::new(&url)
        .unwrap()
        .with_schema(schema.as_str())
        .unwrap();
    let target = Target::ready(Arc::new(backend), None).await?;
    Some(target.with_cleanup(async move {
        crate::common::pg::drop_schema_and_disconnect(&url, &schema).await;
    }))
}

/// retry -> timeout -> SQLite file: each attempt gets its own deadline.
#[cfg(feature = "sqlite")]
pub async fn stack_retry_timeout_sqlite() -> Option<Target> {
    use aiecs_storage::layer::{RetryLayer, StackBuilder, TimeoutLayer};
    let dir = tempfile::TempDir::new().unwrap();
    let backend = aiecs_storage::SqliteBackend::new(dir.path().join("stack.db"));
    let stack = StackBuilder::new()
        .layer(RetryLayer::new())
        .layer(TimeoutLayer::new(std::time::Duration::from_secs(30)))
        .build(Arc::new(backend));
    Target::ready(stack, Some(Box::new(dir))).await
}

/// failover(memory -> SQLite in memory), with a timeout outside it.
#[cfg(feature = "sqlite")]
pub async fn stack_timeout_failover_memory_sqlite() -> Option<Target> {
    use aiecs_storage::layer::{FailoverLayer, StackBuilder, TimeoutLayer};
    let fallback = Arc::new(aiecs_storage::SqliteBackend::in_memory());
    let stack = StackBuilder::new()
        .layer(TimeoutLayer::new(std::time::Duration::from_secs(30)))
        .layer(FailoverLayer::new(fallback))
        .build(Arc::new(MemoryBackend::new()));
    Target::ready(stack, None).await
}

/// batch -> memory: appends and pending writes go through the group-commit writer.
pub async fn stack_batch_memory() -> Option<Target> {
    use aiecs_storage::layer::{BatchLayer, StackBuilder};
    let stack = StackBuilder::new()
        .layer(BatchLayer::new())
        .build(Arc::new(MemoryBackend::new()));
    Target::ready(stack, None).await
}

/// cache -> memory: every case runs through the read cache and its invalidation.
pub async fn stack_cache_memory() -> Option<Target> {
    use aiecs_storage::layer::{CacheLayer, StackBuilder};
    let stack = StackBuilder::new()
        .layer(CacheLayer::new())
        .build(Arc::new(MemoryBackend::new()));
    Target::ready(stack, None).await
}

/// A SQLite file in a temporary directory the target keeps alive.
#[cfg(feature = "sqlite")]
fn sqlite_file() -> (Arc<dyn StorageBackend>, Box<dyn Any + Send + Sync>) {
    let dir = tempfile::TempDir::new().unwrap();
    let backend = aiecs_storage::SqliteBackend::new(dir.path().join("stack.db"));
    (Arc::new(backend), Box::new(dir))
}

/// cache -> retry -> timeout -> SQLite file.
#[cfg(feature = "sqlite")]
pub async fn stack_cache_retry_timeout_sqlite() -> Option<Target> {
    use aiecs_storage::layer::{CacheLayer, RetryLayer, StackBuilder, TimeoutLayer};
    let (backend, dir) = sqlite_file();
    let stack = StackBuilder::new()
        .layer(CacheLayer::new())
        .layer(RetryLayer::new())
        .layer(TimeoutLayer::new(std::time::Duration::from_secs(30)))
        .build(backend);
    Target::ready(stack, Some(dir)).await
}

/// batch -> cache -> memory: the cache sees the batched writes.
pub async fn stack_batch_cache_memory() -> Option<Target> {
    use aiecs_storage::layer::{BatchLayer, CacheLayer, StackBuilder};
    let stack = StackBuilder::new()
        .layer(BatchLayer::new())
        .layer(CacheLayer::new())
        .build(Arc::new(MemoryBackend::new()));
    Target::ready(stack, None).await
}

/// cache -> retry -> batch -> SQLite file: counters and appends through every writer.
#[cfg(feature = "sqlite")]
pub async fn stack_cache_retry_batch_sqlite() -> Option<Target> {
    use aiecs_storage::layer::{BatchLayer, CacheLayer, RetryLayer, StackBuilder};
    let (backend, dir) = sqlite_file();
    let stack = StackBuilder::new()
        .layer(CacheLayer::new())
        .layer(RetryLayer::new())
        .layer(BatchLayer::new())
        .build(backend);
    Target::ready(stack, Some(dir)).await
}

/// cache -> failover(memory -> SQLite): the cache outside the pair.
#[cfg(feature = "sqlite")]
pub async fn stack_cache_failover_memory_sqlite() -> Option<Target> {
    use aiecs_storage::layer::{CacheLayer, FailoverLayer, StackBuilder};
    let stack = StackBuilder::new()
        .layer(CacheLayer::new())
        .layer(FailoverLayer::new(Arc::new(
            aiecs_storage::SqliteBackend::in_memory(),
        )))
        .build(Arc::new(MemoryBackend::new()));
    Target::ready(stack, None).await
}

/// failover(cache -> memory, fallback SQLite): the cache inside, on the primary only.
#[cfg(feature = "sqlite")]
pub async fn stack_failover_cache_memory_sqlite() -> Option<Target> {
    use aiecs_storage::layer::{CacheLayer, FailoverLayer, StackBuilder};
    let stack = StackBuilder::new()
        .layer(FailoverLayer::new(Arc::new(
            aiecs_storage::SqliteBackend::in_memory(),
        )))
        .layer(CacheLayer::new())
        .build(Arc::new(MemoryBackend::new()));
    Target::ready(stack, None).await
}
