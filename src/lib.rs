//! # aiecs-storage
//!
//! Storage for the state of AI applications and agents: sessions with usage metrics,
//! conversation history, workflow checkpoints with pending writes (LangGraph-style), and
//! task context, behind one async, object-safe trait, [`StorageBackend`].
//!
//! Backends: [`MemoryBackend`] (tests, a failover's fallback), `SqliteBackend` (the
//! embedded default, feature `sqlite`), `RedisBackend` (one node or a cluster, feature
//! `redis`) and `PostgresBackend` (feature `postgres`); [`open`] picks one by URL.
//! Layers ([`layer`]) wrap any backend and each other: a cache, failover with a
//! circuit breaker, a batching writer, retry, timeouts, metrics and logging. Every
//! backend and stack obeys the same contract, pinned by the conformance suite in
//! `tests/conformance`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
//! use aiecs_storage::{NewMessage, SqliteBackend, StorageBackend};
//! let storage: std::sync::Arc<dyn StorageBackend> = std::sync::Arc::new(SqliteBackend::in_memory());
//! storage.create_session("s1", "alice", &Default::default()).await?;
//! storage.add_conversation_message("s1", &NewMessage::new("user", "hello")).await?;
//! assert_eq!(storage.get_conversation_history("s1", 50).await?[0].content, "hello");
//! # Ok(()) }
//! ```
//!
//! ## The contract in brief
//!
//! - `create_session` on an existing id is an upsert: user and metadata replaced,
//!   `created_at`, status and counters kept.
//! - `update_session` adds to counters atomically in the store; concurrent increments are
//!   never lost.
//! - `get_conversation_history(id, limit)` returns the newest `limit` messages, oldest
//!   first.
//! - The latest checkpoint is the one first stored last in its thread and namespace;
//!   storing an old id again updates it without making it latest.
//! - Bad input is [`StorageError::InvalidInput`] naming the field; see [`validate`].
//! - After `close()` every call is [`StorageError::Closed`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod config;
pub mod error;
pub mod feed;
mod fnv;
pub mod layer;
pub mod model;
pub mod ops;
#[cfg(feature = "prometheus")]
pub mod prometheus;
mod redact;
pub mod storage;
pub mod validate;

/// The traits of the contract, for `use aiecs_storage::prelude::*;`.
pub mod prelude {
    pub use crate::storage::{
        CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextExt,
        TaskContextStorage,
    };
}

pub use backend::memory::MemoryBackend;
#[cfg(feature = "postgres")]
pub use backend::postgres::PostgresBackend;
#[cfg(feature = "redis")]
pub use backend::redis::RedisBackend;
#[cfg(feature = "sqlite")]
pub use backend::sqlite::SqliteBackend;
pub use config::{open, LayerConfig, StorageConfig};
pub use error::{BoxError, ErrorKind, Result, StorageError};
pub use model::{
    Checkpoint, CheckpointFilter, HealthReport, HealthStatus, IdPage, Message, Metadata,
    MetricsReport, NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionMetrics,
    SessionPage, SessionQuery, SessionStatus, SessionUpdate, TaskWrites, WriteInput,
};
pub use ops::cleanup::CleanupTask;
pub use ops::health::HealthChecker;
pub use ops::migrate::Migrator;
pub use storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextExt,
    TaskContextStorage,
};
