//! Checkpoints and pending writes: as stored, as stored by callers, and filters.

use super::Metadata;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A workflow checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The thread (workflow run) it belongs to.
    pub thread_id: String,
    /// The namespace within the thread; `""` by default. Namespaces are kept apart.
    pub checkpoint_ns: String,
    /// The checkpoint id, an opaque string.
    pub checkpoint_id: String,
    /// The checkpoint this one follows, if any.
    pub parent_checkpoint_id: Option<String>,
    /// The checkpoint's state.
    pub data: Value,
    /// Free-form metadata, filterable in
    /// [`CheckpointStorage::list_checkpoints`](crate::CheckpointStorage::list_checkpoints).
    pub metadata: Metadata,
    /// When the checkpoint id was first stored. Storing it again keeps this.
    #[serde(deserialize_with = "crate::model::utc_time::deserialize")]
    pub created_at: DateTime<Utc>,
}

/// A checkpoint to store with
/// [`CheckpointStorage::store_checkpoint`](crate::CheckpointStorage::store_checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewCheckpoint {
    /// The thread.
    pub thread_id: String,
    /// The namespace (`""` by default).
    #[serde(default)]
    pub checkpoint_ns: String,
    /// The checkpoint id.
    pub checkpoint_id: String,
    /// The parent checkpoint id.
    #[serde(default)]
    pub parent_checkpoint_id: Option<String>,
    /// The state.
    pub data: Value,
    /// Metadata.
    #[serde(default)]
    pub metadata: Metadata,
}

impl NewCheckpoint {
    /// A checkpoint in the default namespace with no parent and empty metadata.
    pub fn new(
        thread_id: impl Into<String>,
        checkpoint_id: impl Into<String>,
        data: Value,
    ) -> Self {
        NewCheckpoint {
            thread_id: thread_id.into(),
            checkpoint_ns: String::new(),
            checkpoint_id: checkpoint_id.into(),
            parent_checkpoint_id: None,
            data,
            metadata: Metadata::new(),
        }
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, checkpoint_ns: impl Into<String>) -> Self {
        self.checkpoint_ns = checkpoint_ns.into();
        self
    }

    /// Sets the parent checkpoint id.
    pub fn with_parent(mut self, parent_checkpoint_id: impl Into<String>) -> Self {
        self.parent_checkpoint_id = Some(parent_checkpoint_id.into());
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// Which checkpoints [`CheckpointStorage::list_checkpoints`](crate::CheckpointStorage::list_checkpoints)
/// returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointFilter {
    /// At most this many (1..=10 000; default 10).
    pub limit: usize,
    /// Only checkpoints stored before this checkpoint id (exclusive). An id the thread
    /// does not hold yields an empty list.
    #[serde(default)]
    pub before: Option<String>,
    /// Only checkpoints whose metadata holds every one of these keys with an equal value.
    #[serde(default)]
    pub metadata: Metadata,
}

impl Default for CheckpointFilter {
    fn default() -> Self {
        CheckpointFilter {
            limit: 10,
            before: None,
            metadata: Metadata::new(),
        }
    }
}

impl CheckpointFilter {
    /// The default filter: the 10 newest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the limit.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Only checkpoints stored before `checkpoint_id`.
    pub fn before(mut self, checkpoint_id: impl Into<String>) -> Self {
        self.before = Some(checkpoint_id.into());
        self
    }

    /// Only checkpoints whose metadata has `key` equal to `value`.
    pub fn metadata_entry(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Whether a checkpoint's metadata passes the metadata filter.
    pub fn matches(&self, metadata: &Metadata) -> bool {
        self.metadata
            .iter()
            .all(|(key, value)| metadata.get(key) == Some(value))
    }
}

/// One pending write of a task, as given to
/// [`CheckpointStorage::put_writes`](crate::CheckpointStorage::put_writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteInput {
    /// The channel written to.
    pub channel: String,
    /// The value written.
    pub value: Value,
}

impl WriteInput {
    /// A write of `value` to `channel`.
    pub fn new(channel: impl Into<String>, value: Value) -> Self {
        WriteInput {
            channel: channel.into(),
            value,
        }
    }
}

/// The pending writes of one task, as one item of
/// [`CheckpointStorage::batch_put_writes`](crate::CheckpointStorage::batch_put_writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskWrites {
    /// The thread.
    pub thread_id: String,
    /// The namespace.
    #[serde(default)]
    pub checkpoint_ns: String,
    /// The checkpoint the writes belong to.
    pub checkpoint_id: String,
    /// The task that made them.
    pub task_id: String,
    /// The writes, in order.
    pub writes: Vec<WriteInput>,
}

/// A pending write as stored: the spec's `(task_id, channel, value)` tuple with its index
/// within the task's `put_writes` call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingWrite {
    /// The task that made the write.
    pub task_id: String,
    /// Position of the write in the task's `put_writes` call.
    pub idx: u32,
    /// The channel written to.
    pub channel: String,
    /// The value written.
    pub value: Value,
}
