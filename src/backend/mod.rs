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
