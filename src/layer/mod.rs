//! Layers: wrappers that implement [`StorageBackend`](crate::StorageBackend) around any inner backend, so they
//! stack in any order.
//!
//! Each layer is a cheap, cloneable config struct (`RetryLayer`, `TimeoutLayer`, ...)
//! implementing [`tower_layer::Layer`] (re-exported as `tower::Layer`); its wrapper
//! implements [`StorageBackend`](crate::StorageBackend) for any inner
//! `B: StorageBackend`, including `Arc<dyn StorageBackend>` and other wrappers. State
//! shared by all wrappers of one layer (counters, a breaker) lives in the layer.
//!
//! # Order
//!
//! As in tower, the first layer added is the outermost: it sees a call first and its
//! answer last.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
//! use std::time::Duration;
//! use aiecs_storage::layer::{RetryLayer, TimeoutLayer};
//! use aiecs_storage::{prelude::*, MemoryBackend};
//! use tower::ServiceBuilder;
//!
//! // retry -> timeout -> memory: each attempt gets its own 2 s deadline.
//! let storage = ServiceBuilder::new()
//!     .layer(RetryLayer::new())
//!     .layer(TimeoutLayer::new(Duration::from_secs(2)))
//!     .service(MemoryBackend::new());
//! storage.create_session("s1", "alice", &Default::default()).await?;
//! # Ok(()) }
//! ```
//!
//! Layers that treat every operation alike (retry, timeout, and the metrics and logging
//! layers) are a [`Policy`] run by one forwarding wrapper, [`Layered`]; only layers that
//! act on particular operations (cache, failover, batching) implement the trait
//! themselves.

// `pub(crate)` so that `config` can show each layer's settings type where it always
// stood, without adding them to this module's public items.
pub(crate) mod batch;
pub(crate) mod cache;
pub(crate) mod failover;
pub(crate) mod fields;
mod forward;
pub(crate) mod logging;
pub(crate) mod metrics;
pub mod names;
pub(crate) mod retry;
mod stack;
pub(crate) mod timeout;

use std::future::Future;

pub use batch::{BatchLayer, BatchStats, Batched};
pub use cache::{CacheLayer, CacheStats, Cached};
pub use failover::{Failover, FailoverLayer};
pub use forward::Layered;
pub use logging::{LoggingLayer, LoggingPolicy};
pub use metrics::{MetricsLayer, MetricsPolicy, OperationReport, PerformanceReport};
pub use retry::{RetryLayer, RetryPolicy};
pub use stack::{DynLayer, StackBuilder};
pub use timeout::{TimeoutLayer, TimeoutPolicy};

use crate::error::Result;
use crate::model::Metadata;

/// Declares [`Operation`] from one list, so its variants, their names and
/// [`Operation::ALL`] cannot disagree. `CleanupExpiredSessions` stays last:
/// [`Operation::COUNT`] counts up to it.
macro_rules! operations {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// Every operation of the contract, for policies, metric labels and log fields.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Operation {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
        }

        impl Operation {
            /// Every operation, in index order.
            pub const ALL: [Operation; Operation::COUNT] = [$(Operation::$variant),*];

            /// The method name, e.g. `get_session`: a bounded label for metrics and logs.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Operation::$variant => $name,)*
                }
            }
        }
    };
}

operations! {
    CreateSession => "create_session",
    GetSession => "get_session",
    UpdateSession => "update_session",
    EndSession => "end_session",
    DeleteSession => "delete_session",
    BatchCreateSessions => "batch_create_sessions",
    BatchGetSessions => "batch_get_sessions",
    ListSessions => "list_sessions",
    RestoreSessions => "restore_sessions",
    AddConversationMessage => "add_conversation_message",
    BatchAddConversationMessages => "batch_add_conversation_messages",
    GetConversationHistory => "get_conversation_history",
    GetConversationRange => "get_conversation_range",
    RestoreMessages => "restore_messages",
    StoreCheckpoint => "store_checkpoint",
    GetCheckpoint => "get_checkpoint",
    ListCheckpoints => "list_checkpoints",
    PutWrites => "put_writes",
    BatchPutWrites => "batch_put_writes",
    GetWrites => "get_writes",
    DeleteThread => "delete_thread",
    ListThreads => "list_threads",
    ListCheckpointNamespaces => "list_checkpoint_namespaces",
    ListWriteCheckpoints => "list_write_checkpoints",
    RestoreCheckpoints => "restore_checkpoints",
    GetTaskContext => "get_task_context",
    StoreTaskContext => "store_task_context",
    ListTaskContexts => "list_task_contexts",
    Initialize => "initialize",
    Close => "close",
    HealthCheck => "health_check",
    GetMetrics => "get_metrics",
    CleanupExpiredSessions => "cleanup_expired_sessions",
}

impl Operation {
    /// How many operations there are.
    pub const COUNT: usize = Operation::CleanupExpiredSessions as usize + 1;

    /// A dense index in `0..COUNT`, for per-operation tables.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether the operation only reads.
    pub const fn is_read(self) -> bool {
        matches!(
            self,
            Operation::GetSession
                | Operation::BatchGetSessions
                | Operation::ListSessions
                | Operation::GetConversationHistory
                | Operation::GetConversationRange
                | Operation::ListThreads
                | Operation::ListCheckpointNamespaces
                | Operation::ListWriteCheckpoints
                | Operation::ListTaskContexts
                | Operation::GetCheckpoint
                | Operation::ListCheckpoints
                | Operation::GetWrites
                | Operation::GetTaskContext
                | Operation::HealthCheck
                | Operation::GetMetrics
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Operation;

    #[test]
    fn all_is_in_index_order() {
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert_eq!(op.index(), i, "{op}");
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One call as a policy sees it: the operation, the session or thread it concerns, and
/// whether running it twice could apply it twice.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The operation.
    pub operation: Operation,
    /// The session id or thread id the call concerns, if one.
    pub key: Option<&'a str>,
    /// `false` when a second run after an ambiguous failure (a timeout, a dropped
    /// connection) could apply the call twice: an `update_session` that adds to
    /// counters. Everything else is idempotent: upserts, checkpoint stores and pending
    /// writes are keyed, and appends carry a message id fixed before the first attempt.
    pub idempotent: bool,
}

impl<'a> Call<'a> {
    /// An idempotent call of `operation` on `key`.
    pub const fn new(operation: Operation, key: Option<&'a str>) -> Self {
        Call {
            operation,
            key,
            idempotent: true,
        }
    }
}

/// What a pass-through layer does around every call. [`Layered`] runs it for each
/// operation of the contract, so a policy is written once, not once per method.
pub trait Policy: Send + Sync + 'static {
    /// The layer's name in health and metrics reports (`retry`, `timeout`, ...).
    fn name(&self) -> &'static str;

    /// Runs `run` (which makes one call to the inner backend each time it is invoked)
    /// under the policy. A retrying policy may invoke it several times.
    fn call<'a, T, F, Fut>(
        &'a self,
        call: Call<'a>,
        run: F,
    ) -> impl Future<Output = Result<T>> + Send + 'a
    where
        T: Send + 'a,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<T>> + Send + 'a;

    /// The layer's own figures for `get_metrics` and `health_check`.
    fn figures(&self) -> Metadata {
        Metadata::new()
    }

    /// A change feed the layer offers in place of its inner backend's (`None`: the
    /// inner backend's); see [`StorageBackend::changes`](crate::StorageBackend::changes).
    /// A test double uses it to stand for a store other processes write to.
    fn changes(&self) -> Option<crate::feed::ChangeFeed> {
        None
    }
}
