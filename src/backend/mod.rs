//! Concrete backends. Each one implements [`StorageBackend`](crate::StorageBackend) with
//! the same semantics and passes the same conformance suite.

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod tls;

/// How far a backend's cleanup index may trail a session's `updated_at`, in seconds.
/// Refreshing the index on every touch would cost every write an index update (Redis: a
/// second command; PostgreSQL: an entry in every index of the row, since the row could
/// no longer be updated in place; SQLite: an index entry deleted and inserted, and its
/// page written to the WAL); a trailing entry only makes cleanup look at a live session
/// once and pass it by. It never leads `updated_at`.
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
const IDLE_INDEX_GRANULARITY_SECS: i64 = 60;
