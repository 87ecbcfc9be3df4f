//! Input rules shared by every backend.
//!
//! Each backend calls the check for its operation before touching storage, so the same
//! input gets the same answer everywhere: a bad value is a
//! [`StorageError::InvalidInput`] naming the field, never a panic or a backend-specific
//! failure.

use serde::Serialize;
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::model::{
    Checkpoint, CheckpointFilter, Message, Metadata, NewCheckpoint, NewMessage, NewSession,
    Session, SessionQuery, SessionUpdate, WriteInput,
};

/// Longest id (session, user, thread, checkpoint, task, message id), role, status,
/// namespace or channel, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Largest message content, in bytes.
pub const MAX_CONTENT_BYTES: usize = 8 * 1024 * 1024;
/// Largest metadata object, serialized as JSON, in bytes.
pub const MAX_METADATA_BYTES: usize = 1024 * 1024;
/// Largest checkpoint data, task context, or set of pending writes, serialized, in bytes.
pub const MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;
/// Deepest nesting of arrays and objects accepted in any JSON value. Deeper values could
/// not be read back by serde_json (its recursion limit is 128).
pub const MAX_JSON_DEPTH: usize = 64;
/// Largest `limit` of a read and largest batch.
pub const MAX_LIMIT: usize = 10_000;

/// Checks the shape of a backend URL in a stack file, before any backend sees it: a
/// scheme is there. Whether the scheme is known is [`open`](crate::open)'s answer.
pub(crate) fn backend_url(url: &str) -> std::result::Result<(), &'static str> {
    if url.trim().is_empty() || !url.contains(':') {
        return Err(
            "expected a backend URL such as \"memory://\", \"sqlite://data.db\", \
             \"redis://host:6379\" or \"postgres://user@host/db\"",
        );
    }
    Ok(())
}

/// Checks an id-like string: not empty, at most [`MAX_ID_BYTES`], no control characters.
pub fn id(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(StorageError::invalid_input(field, "must not be empty"));
    }
    name(field, value)
}

/// Like [`id`] but allows the empty string (checkpoint namespaces default to `""`).
pub fn name(field: &'static str, value: &str) -> Result<()> {
    if value.len() > MAX_ID_BYTES {
        return Err(StorageError::invalid_input(
            field,
            format!("is {} bytes; at most {MAX_ID_BYTES} allowed", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(StorageError::invalid_input(
            field,
            "must not contain NUL bytes",
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(StorageError::invalid_input(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks a read or page limit: 1..=[`MAX_LIMIT`].
pub fn limit(field: &'static str, value: usize) -> Result<()> {
    if value == 0 || value > MAX_LIMIT {
        return Err(StorageError::invalid_input(
            field,
            format!("is {value}; must be between 1 and {MAX_LIMIT}"),
        ));
    }
    Ok(())
}

/// Checks message content: at most [`MAX_CONTENT_BYTES`] and no NUL bytes (PostgreSQL
/// text cannot hold them, and every backend must give the same answer).
pub fn content(field: &'static str, value: &str) -> Result<()> {
    if value.len() > MAX_CONTENT_BYTES {
        return Err(StorageError::invalid_input(
            field,
            format!(
                "is {} bytes; at most {MAX_CONTENT_BYTES} allowed",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(StorageError::invalid_input(
            field,
            "must not contain NUL bytes",
        ));
    }
    Ok(())
}

/// Checks a metadata object: depth and serialized size.
pub fn metadata(field: &'static str, value: &Metadata) -> Result<()> {
    json_within(field, value, MAX_METADATA_BYTES)
}

/// Checks a JSON value: depth and serialized size at most [`MAX_VALUE_BYTES`].
pub fn value(field: &'static str, value: &Value) -> Result<()> {
    json_within(field, value, MAX_VALUE_BYTES)
}

fn json_within<T: Serialize + AsJson>(field: &'static str, value: &T, max: usize) -> Result<()> {
    json_depth(field, value.as_json_root())?;
    let size = serialized_len(value)?;
    if size > max {
        return Err(StorageError::invalid_input(
            field,
            format!("serializes to {size} bytes; at most {max} allowed"),
        ));
    }
    Ok(())
}

/// Rejects JSON nested deeper than [`MAX_JSON_DEPTH`] or holding strings with NUL
/// characters, without recursion, so a hostile 10 000-deep value cannot overflow the
/// stack here.
fn json_depth(field: &'static str, root: JsonRoot<'_>) -> Result<()> {
    let mut stack: Vec<(&Value, usize)> = Vec::new();
    let check_key = |key: &str| -> Result<()> {
        if key.contains('\0') {
            return Err(StorageError::invalid_input(
                field,
                "object keys must not contain NUL characters",
            ));
        }
        Ok(())
    };
    match root {
        JsonRoot::Value(v) => stack.push((v, 1)),
        JsonRoot::Map(m) => {
            for (k, v) in m {
                check_key(k)?;
                stack.push((v, 2));
            }
        }
    }
    while let Some((value, depth)) = stack.pop() {
        match value {
            Value::Array(items) => {
                if depth > MAX_JSON_DEPTH {
                    return Err(too_deep(field));
                }
                stack.extend(items.iter().map(|v| (v, depth + 1)));
            }
            Value::Object(map) => {
                if depth > MAX_JSON_DEPTH {
                    return Err(too_deep(field));
                }
                for (k, v) in map {
                    check_key(k)?;
                    stack.push((v, depth + 1));
                }
            }
            Value::String(s) if s.contains('\0') => {
                return Err(StorageError::invalid_input(
                    field,
                    "strings must not contain NUL characters",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn too_deep(field: &'static str) -> StorageError {
    StorageError::invalid_input(
        field,
        format!("is nested deeper than {MAX_JSON_DEPTH} levels"),
    )
}

enum JsonRoot<'a> {
    Value(&'a Value),
    Map(&'a Metadata),
}

trait AsJson {
    fn as_json_root(&self) -> JsonRoot<'_>;
}

impl AsJson for Value {
    fn as_json_root(&self) -> JsonRoot<'_> {
        JsonRoot::Value(self)
    }
}

impl AsJson for Metadata {
    fn as_json_root(&self) -> JsonRoot<'_> {
        JsonRoot::Map(self)
    }
}

/// Serialized JSON length without building the string.
pub(crate) fn serialized_len<T: Serialize>(value: &T) -> Result<usize> {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value)?;
    Ok(counter.0)
}

/// Checks the input of `create_session`.
pub fn create_session(session_id: &str, user_id: &str, metadata_value: &Metadata) -> Result<()> {
    id("session_id", session_id)?;
    id("user_id", user_id)?;
    metadata("metadata", metadata_value)
}

/// Checks the input of `batch_create_sessions`.
pub fn new_sessions(sessions: &[NewSession]) -> Result<()> {
    batch("sessions", sessions.len())?;
    sessions
        .iter()
        .try_for_each(|s| create_session(&s.session_id, &s.user_id, &s.metadata))
}

/// The `updated_at` before which a session counts as idle for
/// `cleanup_expired_sessions(max_idle)`.
pub fn idle_cutoff(max_idle: std::time::Duration) -> Result<chrono::DateTime<chrono::Utc>> {
    chrono::Duration::from_std(max_idle)
        .ok()
        .and_then(|d| crate::model::now().checked_sub_signed(d))
        .ok_or_else(|| StorageError::invalid_input("max_idle", "is too large"))
}

/// Checks a session status.
pub fn status(value: &str) -> Result<()> {
    id("status", value)
}

/// Checks the input of `update_session`.
pub fn session_update(session_id: &str, update: &SessionUpdate) -> Result<()> {
    id("session_id", session_id)?;
    if let Some(s) = &update.status {
        status(s)?;
    }
    if !update.add_processing_time.is_finite() || update.add_processing_time < 0.0 {
        return Err(StorageError::invalid_input(
            "add_processing_time",
            format!(
                "is {}; must be a finite number of seconds, not negative",
                update.add_processing_time
            ),
        ));
    }
    if update.add_requests > i64::MAX as u64 {
        return Err(StorageError::invalid_input("add_requests", "is too large"));
    }
    if update.add_errors > i64::MAX as u64 {
        return Err(StorageError::invalid_input("add_errors", "is too large"));
    }
    metadata("metadata", &update.metadata)
}

/// Checks the size of a batch.
pub fn batch(field: &'static str, len: usize) -> Result<()> {
    if len > MAX_LIMIT {
        return Err(StorageError::invalid_input(
            field,
            format!("holds {len} items; at most {MAX_LIMIT} allowed"),
        ));
    }
    Ok(())
}

/// Checks the input of `batch_get_sessions`: the batch size, then each id as a
/// `session_id`.
pub fn session_ids(ids: &[String]) -> Result<()> {
    batch("session_ids", ids.len())?;
    ids.iter().try_for_each(|s| id("session_id", s))
}

/// Checks sessions given to `restore_sessions`.
pub fn restored_sessions(sessions: &[Session]) -> Result<()> {
    batch("sessions", sessions.len())?;
    for s in sessions {
        create_session(&s.session_id, &s.user_id, &s.metadata)?;
        status(&s.status)?;
        if !s.metrics.total_processing_time.is_finite() || s.metrics.total_processing_time < 0.0 {
            return Err(StorageError::invalid_input(
                "total_processing_time",
                "must be a finite number of seconds, not negative",
            ));
        }
        if s.metrics.request_count > i64::MAX as u64 || s.metrics.error_count > i64::MAX as u64 {
            return Err(StorageError::invalid_input(
                "metrics",
                "counter is too large",
            ));
        }
    }
    Ok(())
}

/// Checks messages given to `restore_messages`.
pub fn restored_messages(session_id: &str, messages: &[Message]) -> Result<()> {
    id("session_id", session_id)?;
    batch("messages", messages.len())?;
    for m in messages {
        id("message_id", &m.message_id)?;
        id("role", &m.role)?;
        content("content", &m.content)?;
        metadata("metadata", &m.metadata)?;
    }
    Ok(())
}

/// Checks checkpoints given to `restore_checkpoints`.
pub fn restored_checkpoints(checkpoints: &[Checkpoint]) -> Result<()> {
    batch("checkpoints", checkpoints.len())?;
    for c in checkpoints {
        id("thread_id", &c.thread_id)?;
        name("checkpoint_ns", &c.checkpoint_ns)?;
        id("checkpoint_id", &c.checkpoint_id)?;
        if let Some(p) = &c.parent_checkpoint_id {
            id("parent_checkpoint_id", p)?;
        }
        value("data", &c.data)?;
        metadata("metadata", &c.metadata)?;
    }
    Ok(())
}

/// Checks a listing cursor and page size (`list_threads`, `list_task_contexts`).
pub fn page(after: Option<&str>, limit_value: usize) -> Result<()> {
    if let Some(a) = after {
        id("after", a)?;
    }
    limit("limit", limit_value)
}

/// Checks the input of `list_sessions`.
pub fn session_query(query: &SessionQuery) -> Result<()> {
    if let Some(u) = &query.user_id {
        id("user_id", u)?;
    }
    if let Some(s) = &query.status {
        status(s)?;
    }
    if let Some(a) = &query.after {
        id("after", a)?;
    }
    limit("limit", query.limit)
}

/// Checks the input of `add_conversation_message`.
pub fn new_message(session_id: &str, message: &NewMessage) -> Result<()> {
    id("session_id", session_id)?;
    if let Some(m) = &message.message_id {
        id("message_id", m)?;
    }
    id("role", &message.role)?;
    content("content", &message.content)?;
    metadata("metadata", &message.metadata)
}

/// Checks the input of `store_checkpoint`.
pub fn new_checkpoint(checkpoint: &NewCheckpoint) -> Result<()> {
    id("thread_id", &checkpoint.thread_id)?;
    name("checkpoint_ns", &checkpoint.checkpoint_ns)?;
    id("checkpoint_id", &checkpoint.checkpoint_id)?;
    if let Some(p) = &checkpoint.parent_checkpoint_id {
        id("parent_checkpoint_id", p)?;
    }
    value("data", &checkpoint.data)?;
    metadata("metadata", &checkpoint.metadata)
}

/// Checks a thread id and namespace.
pub fn thread(thread_id: &str, checkpoint_ns: &str) -> Result<()> {
    id("thread_id", thread_id)?;
    name("checkpoint_ns", checkpoint_ns)
}

/// Checks the input of `get_checkpoint`.
pub fn checkpoint_ref(
    thread_id: &str,
    checkpoint_ns: &str,
    checkpoint_id: Option<&str>,
) -> Result<()> {
    thread(thread_id, checkpoint_ns)?;
    if let Some(c) = checkpoint_id {
        id("checkpoint_id", c)?;
    }
    Ok(())
}

/// Checks the input of `list_checkpoints`.
pub fn checkpoint_filter(
    thread_id: &str,
    checkpoint_ns: &str,
    filter: &CheckpointFilter,
) -> Result<()> {
    thread(thread_id, checkpoint_ns)?;
    limit("limit", filter.limit)?;
    if let Some(b) = &filter.before {
        id("before", b)?;
    }
    metadata("metadata", &filter.metadata)
}

/// Checks the input of `put_writes`.
pub fn writes(
    thread_id: &str,
    checkpoint_ns: &str,
    checkpoint_id: &str,
    task_id: &str,
    writes: &[WriteInput],
) -> Result<()> {
    checkpoint_ref(thread_id, checkpoint_ns, Some(checkpoint_id))?;
    id("task_id", task_id)?;
    batch("writes", writes.len())?;
    let mut total = 0usize;
    for w in writes {
        id("channel", &w.channel)?;
        json_depth("value", JsonRoot::Value(&w.value))?;
        total += serialized_len(&w.value)?;
    }
    if total > MAX_VALUE_BYTES {
        return Err(StorageError::invalid_input(
            "writes",
            format!("serialize to {total} bytes; at most {MAX_VALUE_BYTES} allowed"),
        ));
    }
    Ok(())
}

/// Checks the input of `store_task_context`.
pub fn task_context(session_id: &str, context: &Value) -> Result<()> {
    id("session_id", session_id)?;
    value("context", context)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(r: Result<()>) -> &'static str {
        match r {
            Err(StorageError::InvalidInput { field, .. }) => field,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn ids() {
        assert!(id("session_id", "abc:{x}*?[").is_ok());
        assert_eq!(field_of(id("session_id", "")), "session_id");
        assert_eq!(field_of(id("thread_id", "a\0b")), "thread_id");
        assert_eq!(field_of(id("thread_id", "a\nb")), "thread_id");
        assert_eq!(
            field_of(id("user_id", &"x".repeat(MAX_ID_BYTES + 1))),
            "user_id"
        );
        assert!(name("checkpoint_ns", "").is_ok());
    }

    #[test]
    fn deep_json_is_rejected_without_recursion() {
        let mut v = json!(1);
        for _ in 0..10_000 {
            v = Value::Array(vec![v]);
        }
        assert_eq!(field_of(value("data", &v)), "data");
        // Tear down iteratively: dropping a 10 000-deep value recursively could overflow.
        let mut cur = v;
        while let Value::Array(mut items) = cur {
            cur = items.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn depth_limit_is_exact() {
        let mut v = json!({});
        for _ in 1..MAX_JSON_DEPTH {
            v = json!({ "k": v });
        }
        assert!(value("data", &v).is_ok());
        let v = json!([v]);
        assert!(value("data", &v).is_err());
    }

    #[test]
    fn processing_time_must_be_finite() {
        let u = SessionUpdate::new().add_processing_time(f64::NAN);
        assert_eq!(field_of(session_update("s", &u)), "add_processing_time");
        let u = SessionUpdate::new().add_processing_time(-1.0);
        assert_eq!(field_of(session_update("s", &u)), "add_processing_time");
    }
}
