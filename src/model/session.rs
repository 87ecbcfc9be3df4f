//! Sessions: the record, its creation and update inputs, and listing queries.

use super::Metadata;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Well-known session statuses. Any other short string is accepted too.
pub struct SessionStatus;

impl SessionStatus {
    /// The status of a newly created session.
    pub const ACTIVE: &'static str = "active";
    /// The status `end_session` sets by default in the spec.
    pub const COMPLETED: &'static str = "completed";
    /// A session that ended in failure.
    pub const FAILED: &'static str = "failed";
}

/// Usage figures of a session, updated atomically by
/// [`SessionStorage::update_session`](crate::SessionStorage::update_session).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionMetrics {
    /// Requests recorded for the session.
    pub request_count: u64,
    /// Sum of the processing time recorded, in seconds.
    pub total_processing_time: f64,
    /// Errors recorded for the session.
    pub error_count: u64,
}

/// A session: who it belongs to, its state and its usage figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// The caller-chosen id.
    pub session_id: String,
    /// The owner.
    pub user_id: String,
    /// When the session was first created. An upsert keeps it.
    pub created_at: DateTime<Utc>,
    /// When the session last changed (create, update, end, or a new message).
    pub updated_at: DateTime<Utc>,
    /// `active` on creation; set by `update_session` or `end_session`.
    pub status: String,
    /// Free-form metadata.
    pub metadata: Metadata,
    /// Usage figures.
    pub metrics: SessionMetrics,
}

/// The input of one session creation in
/// [`SessionStorage::batch_create_sessions`](crate::SessionStorage::batch_create_sessions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewSession {
    /// The session id.
    pub session_id: String,
    /// The owner.
    pub user_id: String,
    /// Initial metadata.
    #[serde(default)]
    pub metadata: Metadata,
}

impl NewSession {
    /// A new session input with empty metadata.
    pub fn new(session_id: impl Into<String>, user_id: impl Into<String>) -> Self {
        NewSession {
            session_id: session_id.into(),
            user_id: user_id.into(),
            metadata: Metadata::new(),
        }
    }

    /// Sets the initial metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A change to a session, applied atomically by
/// [`SessionStorage::update_session`](crate::SessionStorage::update_session).
///
/// Counters are added to, never overwritten, in the store itself, so concurrent updates
/// never lose an increment.
///
/// ```
/// use aiecs_storage::SessionUpdate;
/// let update = SessionUpdate::new().increment_requests().add_processing_time(0.25);
/// assert_eq!(update.add_requests, 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionUpdate {
    /// Keys merged into the metadata (top-level keys replaced, others kept).
    #[serde(default)]
    pub metadata: Metadata,
    /// A new status, if any.
    #[serde(default)]
    pub status: Option<String>,
    /// Added to `request_count`, which saturates at `i64::MAX` instead of overflowing.
    #[serde(default)]
    pub add_requests: u64,
    /// Added to `total_processing_time` (seconds; finite and not negative), which
    /// saturates at `f64::MAX` instead of becoming infinite.
    #[serde(default)]
    pub add_processing_time: f64,
    /// Added to `error_count`, which saturates at `i64::MAX` instead of overflowing.
    #[serde(default)]
    pub add_errors: u64,
}

impl SessionUpdate {
    /// An update that changes nothing but `updated_at`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one request (the spec's `increment_requests=True`).
    pub fn increment_requests(mut self) -> Self {
        self.add_requests += 1;
        self
    }

    /// Adds processing time in seconds (the spec's `add_processing_time`).
    pub fn add_processing_time(mut self, seconds: f64) -> Self {
        self.add_processing_time += seconds;
        self
    }

    /// Counts one error (the spec's `mark_error=True`).
    pub fn mark_error(mut self) -> Self {
        self.add_errors += 1;
        self
    }

    /// Sets the status.
    pub fn status(mut self, status: impl Into<String>) -> Self {
        self.status = Some(status.into());
        self
    }

    /// Merges one metadata key.
    pub fn metadata_entry(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Merges every key of `metadata`.
    pub fn merge_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata.extend(metadata);
        self
    }
}

/// Which sessions [`SessionStorage::list_sessions`](crate::SessionStorage::list_sessions)
/// returns: ordered by session id, paged by cursor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionQuery {
    /// Only sessions of this user.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Only sessions with this status.
    #[serde(default)]
    pub status: Option<String>,
    /// Only sessions whose id sorts after this one: the `next_cursor` of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// Page size (1..=10 000; default 100).
    pub limit: usize,
}

impl Default for SessionQuery {
    fn default() -> Self {
        SessionQuery {
            user_id: None,
            status: None,
            after: None,
            limit: 100,
        }
    }
}

impl SessionQuery {
    /// All sessions, 100 per page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only sessions of `user_id`.
    pub fn user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Only sessions with `status`.
    pub fn status(mut self, status: impl Into<String>) -> Self {
        self.status = Some(status.into());
        self
    }

    /// Continue after this cursor.
    pub fn after(mut self, cursor: impl Into<String>) -> Self {
        self.after = Some(cursor.into());
        self
    }

    /// Sets the page size.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Whether a session passes the user and status filters (not the cursor).
    pub fn matches(&self, session: &Session) -> bool {
        self.user_id.as_deref().is_none_or(|u| session.user_id == u)
            && self.status.as_deref().is_none_or(|s| session.status == s)
    }
}

/// One page of [`SessionStorage::list_sessions`](crate::SessionStorage::list_sessions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionPage {
    /// The sessions, ordered by id.
    pub sessions: Vec<Session>,
    /// Pass as [`SessionQuery::after`] to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}
