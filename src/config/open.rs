//! Opening one backend from a URL: the scheme is the type (the spec's StorageFactory).

use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::storage::StorageBackend;

/// Opens the backend a URL names; nothing connects until `initialize()` or the first
/// call.
///
/// | URL | backend |
/// | --- | --- |
/// | `memory://` | [`MemoryBackend`](crate::MemoryBackend) |
/// | `sqlite://path/to/file.db`, `sqlite:///abs/path.db`, `sqlite::memory:` | [`SqliteBackend`](crate::SqliteBackend) (feature `sqlite`) |
/// | `redis://`, `rediss://`, `redis+cluster://h1:7000,h2:7001` | `RedisBackend` (feature `redis`) |
/// | `postgres://`, `postgresql://` | `PostgresBackend` (feature `postgres`) |
///
/// A scheme this build cannot open is [`StorageError::InvalidInput`] on `url`, naming
/// the feature to enable; the password never appears in the error.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// let storage = aiecs_storage::open("sqlite::memory:")?;
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// # Ok(()) }
/// ```
pub fn open(url: &str) -> Result<Arc<dyn StorageBackend>> {
    let scheme = url.split_once(':').map_or("", |(s, _)| s);
    match scheme {
        "memory" => Ok(Arc::new(crate::MemoryBackend::new())),
        "sqlite" => sqlite(url),
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => redis(url),
        "postgres" | "postgresql" => postgres(url),
        _ => Err(StorageError::invalid_input(
            "url",
            format!(
                "unknown scheme `{scheme}`; expected memory://, sqlite://, redis://, \
                 rediss://, redis+cluster://, postgres://"
            ),
        )),
    }
}

#[cfg_attr(
    all(feature = "sqlite", feature = "redis", feature = "postgres"),
    allow(dead_code)
)]
fn missing_feature(feature: &str) -> StorageError {
    StorageError::invalid_input(
        "url",
        format!("this build cannot open it: enable the `{feature}` feature of aiecs-storage"),
    )
}

#[cfg(feature = "sqlite")]
fn sqlite(url: &str) -> Result<Arc<dyn StorageBackend>> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or_default();
    if path.is_empty() {
        return Err(StorageError::invalid_input(
            "url",
            "sqlite URL names no file; use sqlite://path/to/file.db or sqlite::memory:",
        ));
    }
    Ok(Arc::new(crate::SqliteBackend::new(path)))
}

#[cfg(not(feature = "sqlite"))]
fn sqlite(_: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature("sqlite"))
}

#[cfg(feature = "redis")]
fn redis(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Ok(Arc::new(crate::RedisBackend::new(url)?))
}

#[cfg(not(feature = "redis"))]
fn redis(_: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature("redis"))
}

#[cfg(feature = "postgres")]
fn postgres(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Ok(Arc::new(crate::PostgresBackend::new(url)?))
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature("postgres"))
}
