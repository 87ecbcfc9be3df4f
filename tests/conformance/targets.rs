//! The backends and stacks the suite runs against. Each constructor returns a fresh,
//! initialized backend, so cases never see each other's data and may use plain ids.

use std::any::Any;
use std::sync::Arc;

use aiecs_storage::{MemoryBackend, StorageBackend};

/// A backend under test, with whatever must outlive it (a temporary directory, a
/// server handle).
pub struct Target {
    pub backend: Arc<dyn StorageBackend>,
    // Dropped after `backend` (fields drop in declaration order), so a database file is
    // removed only once the backend that uses it is gone.
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl Target {
    async fn ready(
        backend: Arc<dyn StorageBackend>,
        guard: Option<Box<dyn Any + Send + Sync>>,
    ) -> Target {
        backend.initialize().await.unwrap();
        Target {
            backend,
            _guard: guard,
        }
    }
}

pub async fn memory() -> Target {
    Target::ready(Arc::new(MemoryBackend::new()), None).await
}

#[cfg(feature = "sqlite")]
pub async fn sqlite() -> Target {
    let dir = tempfile::TempDir::new().unwrap();
    let backend = aiecs_storage::SqliteBackend::new(dir.path().join("conformance.db"));
    Target::ready(Arc::new(backend), Some(Box::new(dir))).await
}

#[cfg(feature = "sqlite")]
pub async fn sqlite_memory() -> Target {
    Target::ready(Arc::new(aiecs_storage::SqliteBackend::in_memory()), None).await
}

// Server backends (redis, postgres) and layer stacks go here, one constructor each plus
// one `target!(name)` line in main.rs. A server target reads its URL from an env var
// (e.g. `AIECS_TEST_REDIS_URL`) and, when it is unset, prints a notice and skips.
