//! The checks of a consistency diagnosis: write one record of each kind, read it back,
//! compare field by field, remove it.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::consistency::{CheckOutcome, ConsistencyCheck};
use super::{within, DIAGNOSE_USER};
use crate::error::{Result, StorageError};
use crate::model::{Metadata, NewCheckpoint, NewMessage, WriteInput};
use crate::storage::StorageBackend;

/// The calls of one consistency diagnosis, each bounded by `timeout`.
pub(super) struct Probe<'a> {
    pub(super) storage: &'a dyn StorageBackend,
    pub(super) timeout: Duration,
}

/// Sample values with non-ASCII text, a float and nesting, to catch encoding losses.
pub(super) fn sample(kind: &str) -> Value {
    json!({
        "aiecs_diagnose": kind,
        "text": "consistency ✓ — héllo, 世界, 🦀",
        "float": 1.5,
        "int": 42,
        "nested": {"list": [1, "two", null, true]},
    })
}

pub(super) fn sample_metadata(kind: &str) -> Metadata {
    match sample(kind) {
        Value::Object(map) => map,
        _ => Metadata::new(),
    }
}

/// Field-by-field differences between what was written and what was read.
pub(super) struct Diff(Vec<String>);

impl Diff {
    pub(super) fn new() -> Self {
        Diff(Vec::new())
    }

    pub(super) fn field<T: PartialEq + std::fmt::Debug>(&mut self, name: &str, wrote: T, read: T) {
        if wrote != read {
            self.0
                .push(format!("{name}: wrote {wrote:?}, read {read:?}"));
        }
    }

    pub(super) fn into_check(self, name: &str, latency: Duration) -> ConsistencyCheck {
        if self.0.is_empty() {
            ConsistencyCheck {
                name: name.to_owned(),
                outcome: CheckOutcome::Ok,
                latency,
                details: None,
            }
        } else {
            ConsistencyCheck {
                name: name.to_owned(),
                outcome: CheckOutcome::Mismatch,
                latency,
                details: Some(self.0.join("; ")),
            }
        }
    }
}

pub(super) fn failed(
    name: &str,
    latency: Duration,
    call: &str,
    e: &StorageError,
) -> ConsistencyCheck {
    ConsistencyCheck {
        name: name.to_owned(),
        outcome: CheckOutcome::Failed,
        latency,
        details: Some(format!("{call} failed: {e}")),
    }
}

pub(super) fn mismatch(name: &str, latency: Duration, details: String) -> ConsistencyCheck {
    ConsistencyCheck {
        name: name.to_owned(),
        outcome: CheckOutcome::Mismatch,
        latency,
        details: Some(details),
    }
}

impl Probe<'_> {
    pub(super) async fn call<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        within(self.timeout, operation, call).await
    }

    /// The session check, and whether the session may exist (so that later checks and
    /// the cleanup use it).
    pub(super) async fn session(&self, id: &str) -> (ConsistencyCheck, bool) {
        const NAME: &str = "session";
        let started = Instant::now();
        let metadata = sample_metadata(NAME);
        let written = match self
            .call(
                "create_session",
                self.storage.create_session(id, DIAGNOSE_USER, &metadata),
            )
            .await
        {
            Ok(s) => s,
            // A create that failed (or timed out and landed later) is ended by the
            // cleanup all the same.
            Err(e) => return (failed(NAME, started.elapsed(), "create_session", &e), false),
        };
        let read = match self.call("get_session", self.storage.get_session(id)).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return (
                    mismatch(
                        NAME,
                        started.elapsed(),
                        "get_session found no session right after create_session".into(),
                    ),
                    true,
                )
            }
            Err(e) => return (failed(NAME, started.elapsed(), "get_session", &e), true),
        };
        let mut diff = Diff::new();
        diff.field("session_id", id, read.session_id.as_str());
        diff.field("user_id", DIAGNOSE_USER, read.user_id.as_str());
        diff.field("metadata", &metadata, &read.metadata);
        diff.field("status", written.status.as_str(), read.status.as_str());
        diff.field("created_at", written.created_at, read.created_at);
        diff.field("updated_at", written.updated_at, read.updated_at);
        diff.field("metrics", &written.metrics, &read.metrics);
        (diff.into_check(NAME, started.elapsed()), true)
    }

    pub(super) async fn message(&self, id: &str) -> ConsistencyCheck {
        const NAME: &str = "message";
        let started = Instant::now();
        let message_id = format!("{id}-m1");
        let message = NewMessage::new("user", "consistency ✓ — héllo, 世界, 🦀\nline two")
            .with_id(message_id.clone())
            .with_metadata(sample_metadata(NAME));
        let returned = match self
            .call(
                "add_conversation_message",
                self.storage.add_conversation_message(id, &message),
            )
            .await
        {
            Ok(returned) => returned,
            Err(e) => return failed(NAME, started.elapsed(), "add_conversation_message", &e),
        };
        let history = match self
            .call(
                "get_conversation_history",
                self.storage.get_conversation_history(id, 10),
            )
            .await
        {
            Ok(history) => history,
            Err(e) => return failed(NAME, started.elapsed(), "get_conversation_history", &e),
        };
        let mut diff = Diff::new();
        diff.field("returned id", message_id.as_str(), returned.as_str());
        diff.field("messages in history", 1, history.len());
        match history.iter().find(|m| m.message_id == message_id) {
            None => diff
                .0
                .push(format!("message `{message_id}` missing from the history")),
            Some(read) => {
                diff.field("role", message.role.as_str(), read.role.as_str());
                diff.field("content", message.content.as_str(), read.content.as_str());
                diff.field("metadata", &message.metadata, &read.metadata);
            }
        }
        diff.into_check(NAME, started.elapsed())
    }

    /// The checkpoint check, and whether the checkpoint was stored.
    pub(super) async fn checkpoint(&self, thread: &str) -> (ConsistencyCheck, bool) {
        const NAME: &str = "checkpoint";
        let started = Instant::now();
        let checkpoint = NewCheckpoint::new(thread, "c1", sample("checkpoint data"))
            .with_parent("c0")
            .with_metadata(sample_metadata(NAME));
        if let Err(e) = self
            .call(
                "store_checkpoint",
                self.storage.store_checkpoint(&checkpoint),
            )
            .await
        {
            return (
                failed(NAME, started.elapsed(), "store_checkpoint", &e),
                false,
            );
        }
        let mut diff = Diff::new();
        for (label, wanted) in [("by id", Some("c1")), ("latest", None)] {
            match self
                .call(
                    "get_checkpoint",
                    self.storage.get_checkpoint(thread, "", wanted),
                )
                .await
            {
                Err(e) => return (failed(NAME, started.elapsed(), "get_checkpoint", &e), true),
                Ok(None) => diff
                    .0
                    .push(format!("get_checkpoint ({label}) found nothing")),
                Ok(Some(read)) => {
                    diff.field(
                        &format!("checkpoint_id ({label})"),
                        "c1",
                        read.checkpoint_id.as_str(),
                    );
                    diff.field(
                        &format!("thread_id ({label})"),
                        thread,
                        read.thread_id.as_str(),
                    );
                    diff.field(&format!("data ({label})"), &checkpoint.data, &read.data);
                    diff.field(
                        &format!("metadata ({label})"),
                        &checkpoint.metadata,
                        &read.metadata,
                    );
                    diff.field(
                        &format!("parent ({label})"),
                        checkpoint.parent_checkpoint_id.as_deref(),
                        read.parent_checkpoint_id.as_deref(),
                    );
                }
            }
        }
        (diff.into_check(NAME, started.elapsed()), true)
    }

    pub(super) async fn pending_writes(&self, thread: &str) -> ConsistencyCheck {
        const NAME: &str = "pending_writes";
        let started = Instant::now();
        let writes = [
            WriteInput::new("messages", sample("write 0")),
            WriteInput::new("state", json!(["ü", 2.25])),
        ];
        if let Err(e) = self
            .call(
                "put_writes",
                self.storage
                    .put_writes(thread, "", "c1", "diagnose-task", &writes),
            )
            .await
        {
            return failed(NAME, started.elapsed(), "put_writes", &e);
        }
        let read = match self
            .call("get_writes", self.storage.get_writes(thread, "", "c1"))
            .await
        {
            Ok(read) => read,
            Err(e) => return failed(NAME, started.elapsed(), "get_writes", &e),
        };
        let mut diff = Diff::new();
        diff.field("writes", writes.len(), read.len());
        for (i, (wrote, got)) in writes.iter().zip(&read).enumerate() {
            diff.field(
                &format!("writes[{i}].task_id"),
                "diagnose-task",
                got.task_id.as_str(),
            );
            diff.field(&format!("writes[{i}].idx"), i as u32, got.idx);
            diff.field(
                &format!("writes[{i}].channel"),
                wrote.channel.as_str(),
                got.channel.as_str(),
            );
            diff.field(&format!("writes[{i}].value"), &wrote.value, &got.value);
        }
        diff.into_check(NAME, started.elapsed())
    }

    pub(super) async fn task_context(&self, id: &str) -> ConsistencyCheck {
        const NAME: &str = "task_context";
        let started = Instant::now();
        let context = sample(NAME);
        if let Err(e) = self
            .call(
                "store_task_context",
                self.storage.store_task_context(id, &context),
            )
            .await
        {
            return failed(NAME, started.elapsed(), "store_task_context", &e);
        }
        match self
            .call("get_task_context", self.storage.get_task_context(id))
            .await
        {
            Err(e) => failed(NAME, started.elapsed(), "get_task_context", &e),
            Ok(None) => mismatch(
                NAME,
                started.elapsed(),
                "get_task_context found nothing right after store_task_context".into(),
            ),
            Ok(Some(read)) => {
                let mut diff = Diff::new();
                diff.field("context", &context, &read);
                diff.into_check(NAME, started.elapsed())
            }
        }
    }

    pub(super) async fn delete_thread(&self, thread: &str) -> ConsistencyCheck {
        const NAME: &str = "delete_thread";
        let started = Instant::now();
        if let Err(e) = self
            .call("delete_thread", self.storage.delete_thread(thread))
            .await
        {
            return failed(NAME, started.elapsed(), "delete_thread", &e);
        }
        match self
            .call(
                "get_checkpoint",
                self.storage.get_checkpoint(thread, "", None),
            )
            .await
        {
            Ok(None) => ConsistencyCheck {
                name: NAME.into(),
                outcome: CheckOutcome::Ok,
                latency: started.elapsed(),
                details: None,
            },
            Ok(Some(c)) => mismatch(
                NAME,
                started.elapsed(),
                format!(
                    "checkpoint `{}` still readable after delete_thread",
                    c.checkpoint_id
                ),
            ),
            Err(e) => failed(
                NAME,
                started.elapsed(),
                "get_checkpoint after delete_thread",
                &e,
            ),
        }
    }

    pub(super) async fn delete_session(&self, id: &str) -> ConsistencyCheck {
        const NAME: &str = "delete_session";
        let started = Instant::now();
        match self
            .call("delete_session", self.storage.delete_session(id))
            .await
        {
            Ok(found) => ConsistencyCheck {
                name: NAME.into(),
                outcome: CheckOutcome::Ok,
                latency: started.elapsed(),
                details: (!found).then(|| "no session to delete: it was never created".into()),
            },
            Err(e) => failed(NAME, started.elapsed(), "delete_session", &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_make_a_mismatch_naming_the_field() {
        let mut diff = Diff::new();
        diff.field("content", "héllo", "hello");
        diff.field("role", "user", "user");
        let check = diff.into_check("message", Duration::ZERO);
        assert_eq!(check.outcome, CheckOutcome::Mismatch);
        assert_eq!(
            check.details.as_deref(),
            Some("content: wrote \"héllo\", read \"hello\"")
        );
        let same = Diff::new().into_check("message", Duration::ZERO);
        assert_eq!(same.outcome, CheckOutcome::Ok);
    }
}
