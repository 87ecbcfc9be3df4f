//! Whether what a backend stores reads back unchanged: a round trip of one record of
//! each kind, removed again.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{within, DIAGNOSE_PREFIX, DIAGNOSE_USER};
use crate::error::{Result, StorageError};
use crate::model::{now, Metadata, NewCheckpoint, NewMessage, WriteInput};
use crate::storage::StorageBackend;

/// The result of one check of a [`ConsistencyDiagnosis`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckOutcome {
    /// What was read equals what was written.
    Ok,
    /// The calls worked but what was read differs from what was written (or is
    /// missing).
    Mismatch,
    /// A call failed; the details hold the error.
    Failed,
    /// Not run: it needs an earlier step that failed.
    Skipped,
}

/// One check of a [`ConsistencyDiagnosis`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsistencyCheck {
    /// `session`, `message`, `checkpoint`, `pending_writes`, `task_context`, or, for the
    /// cleanup, `delete_thread` and `delete_session`.
    pub name: String,
    /// The result.
    pub outcome: CheckOutcome,
    /// How long the check took, serialized as milliseconds.
    #[serde(rename = "latency_ms", with = "crate::model::duration_ms")]
    pub latency: Duration,
    /// What differed, or the error, or why it was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
}

/// What [`diagnose_consistency`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsistencyDiagnosis {
    /// Whether every check passed and the cleanup worked (`consistent && cleaned_up`):
    /// a summary for JSON readers.
    pub ok: bool,
    /// The backend's [`kind`](StorageBackend::kind).
    pub backend: String,
    /// The session id written (`aiecs-diagnose-<uuid>`).
    pub session_id: String,
    /// The checkpoint thread id written (the same id).
    pub thread_id: String,
    /// Whether every check is [`CheckOutcome::Ok`].
    pub consistent: bool,
    /// The write-read-compare checks, in the order they ran.
    pub checks: Vec<ConsistencyCheck>,
    /// Whether the cleanup worked (every cleanup step [`CheckOutcome::Ok`]).
    pub cleaned_up: bool,
    /// The cleanup steps: `delete_thread` (then a read proving the thread is gone) and
    /// `delete_session`.
    pub cleanup: Vec<ConsistencyCheck>,
    /// What stays in the store after the diagnosis, and when it goes.
    pub leftovers: Vec<String>,
    /// How long the whole diagnosis took, serialized as milliseconds.
    #[serde(rename = "latency_ms", with = "crate::model::duration_ms")]
    pub latency: Duration,
    /// When it started.
    pub checked_at: DateTime<Utc>,
}

impl ConsistencyDiagnosis {
    /// The check named `name`, among the checks and the cleanup steps.
    pub fn check(&self, name: &str) -> Option<&ConsistencyCheck> {
        self.checks
            .iter()
            .chain(&self.cleanup)
            .find(|c| c.name == name)
    }
}

/// Writes one of each kind of record, reads each back and compares (the spec's
/// `diagnose_data_consistency`), with a 10 s limit per call. See
/// [`diagnose_consistency_within`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use aiecs_storage::ops::diagnose::diagnose_consistency;
/// use aiecs_storage::MemoryBackend;
///
/// let report = diagnose_consistency(&MemoryBackend::new()).await;
/// assert!(report.consistent, "{report:#?}");
/// assert!(report.cleaned_up);
/// # }
/// ```
pub async fn diagnose_consistency(storage: &dyn StorageBackend) -> ConsistencyDiagnosis {
    diagnose_consistency_within(storage, Duration::from_secs(10)).await
}

/// Writes one of each kind of record under a fresh id `aiecs-diagnose-<uuid>`, reads
/// each back and compares what was written with what was read:
///
/// | check | writes | reads |
/// | --- | --- | --- |
/// | `session` | `create_session` (metadata with non-ASCII text and a float) | `get_session` |
/// | `message` | `add_conversation_message` with a fixed id | `get_conversation_history` |
/// | `checkpoint` | `store_checkpoint` | `get_checkpoint` by id and as latest |
/// | `pending_writes` | `put_writes` | `get_writes` |
/// | `task_context` | `store_task_context` | `get_task_context` |
///
/// Each call is bounded by `step_timeout`, so a hung backend cannot hang the diagnosis.
/// A check that fails or mismatches does not stop the others (the message and task
/// context checks are skipped when the session could not be created).
///
/// **Cleanup** runs whatever happened before: `delete_thread` removes the checkpoint
/// and its writes (and a read then proves them gone), and `delete_session` removes the
/// session with its message and task context. What a failed cleanup step leaves behind
/// is listed in `leftovers` (find such sessions with `list_sessions` filtered on user
/// `aiecs-diagnose`). The cleanup runs after failed and mismatched checks alike; it
/// cannot run if the calling task is cancelled midway or a backend panics.
pub async fn diagnose_consistency_within(
    storage: &dyn StorageBackend,
    step_timeout: Duration,
) -> ConsistencyDiagnosis {
    let checked_at = now();
    let started = Instant::now();
    let id = format!("{DIAGNOSE_PREFIX}{}", uuid::Uuid::now_v7().simple());
    let probe = Probe {
        storage,
        timeout: step_timeout,
    };
    let mut checks = Vec::new();

    let session = probe.session(&id).await;
    let session_created = session.1;
    checks.push(session.0);
    let needs_session = |name: &str| ConsistencyCheck {
        name: name.to_owned(),
        outcome: CheckOutcome::Skipped,
        latency: Duration::ZERO,
        details: Some("needs the session, which could not be created".into()),
    };
    checks.push(if session_created {
        probe.message(&id).await
    } else {
        needs_session("message")
    });
    let (checkpoint, stored) = probe.checkpoint(&id).await;
    checks.push(checkpoint);
    checks.push(if stored {
        probe.pending_writes(&id).await
    } else {
        ConsistencyCheck {
            name: "pending_writes".into(),
            outcome: CheckOutcome::Skipped,
            latency: Duration::ZERO,
            details: Some("needs the checkpoint, which could not be stored".into()),
        }
    });
    checks.push(if session_created {
        probe.task_context(&id).await
    } else {
        needs_session("task_context")
    });

    // Cleanup: always, whatever the checks found.
    let cleanup = vec![
        probe.delete_thread(&id).await,
        probe.delete_session(&id).await,
    ];
    let cleaned_up = cleanup.iter().all(|c| c.outcome == CheckOutcome::Ok);
    let mut leftovers = Vec::new();
    if cleanup[1].outcome != CheckOutcome::Ok {
        leftovers.push(format!(
            "session `{id}` (user `{DIAGNOSE_USER}`) with its message and task context: \
             delete_session did not complete; the next cleanup_expired_sessions run removes \
             them once they are idle longer than its max_idle"
        ));
    }
    if cleanup[0].outcome != CheckOutcome::Ok {
        leftovers.push(format!(
            "checkpoint thread `{id}`: delete_thread did not complete; run it again"
        ));
    }

    let consistent = checks.iter().all(|c| c.outcome == CheckOutcome::Ok);
    let report = ConsistencyDiagnosis {
        ok: consistent && cleaned_up,
        backend: storage.kind().to_owned(),
        session_id: id.clone(),
        thread_id: id,
        consistent,
        checks,
        cleaned_up,
        cleanup,
        leftovers,
        latency: started.elapsed(),
        checked_at,
    };
    if report.consistent && report.cleaned_up {
        tracing::debug!(
            db.system.name = report.backend.as_str(),
            session_id = report.session_id.as_str(),
            "storage consistency diagnosis: consistent"
        );
    } else {
        let problems: Vec<String> = report
            .checks
            .iter()
            .chain(&report.cleanup)
            .filter(|c| c.outcome != CheckOutcome::Ok)
            .map(|c| {
                format!(
                    "{} {:?}: {}",
                    c.name,
                    c.outcome,
                    c.details.as_deref().unwrap_or("")
                )
            })
            .collect();
        tracing::warn!(
            db.system.name = report.backend.as_str(),
            session_id = report.session_id.as_str(),
            consistent = report.consistent,
            cleaned_up = report.cleaned_up,
            problems = %problems.join("; "),
            "storage consistency diagnosis found problems"
        );
    }
    report
}

/// The calls of one consistency diagnosis, each bounded by `timeout`.
struct Probe<'a> {
    storage: &'a dyn StorageBackend,
    timeout: Duration,
}

/// Sample values with non-ASCII text, a float and nesting, to catch encoding losses.
fn sample(kind: &str) -> Value {
    json!({
        "aiecs_diagnose": kind,
        "text": "consistency ✓ — héllo, 世界, 🦀",
        "float": 1.5,
        "int": 42,
        "nested": {"list": [1, "two", null, true]},
    })
}

fn sample_metadata(kind: &str) -> Metadata {
    match sample(kind) {
        Value::Object(map) => map,
        _ => Metadata::new(),
    }
}

/// Field-by-field differences between what was written and what was read.
struct Diff(Vec<String>);

impl Diff {
    fn new() -> Self {
        Diff(Vec::new())
    }

    fn field<T: PartialEq + std::fmt::Debug>(&mut self, name: &str, wrote: T, read: T) {
        if wrote != read {
            self.0
                .push(format!("{name}: wrote {wrote:?}, read {read:?}"));
        }
    }

    fn into_check(self, name: &str, latency: Duration) -> ConsistencyCheck {
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

fn failed(name: &str, latency: Duration, call: &str, e: &StorageError) -> ConsistencyCheck {
    ConsistencyCheck {
        name: name.to_owned(),
        outcome: CheckOutcome::Failed,
        latency,
        details: Some(format!("{call} failed: {e}")),
    }
}

fn mismatch(name: &str, latency: Duration, details: String) -> ConsistencyCheck {
    ConsistencyCheck {
        name: name.to_owned(),
        outcome: CheckOutcome::Mismatch,
        latency,
        details: Some(details),
    }
}

impl Probe<'_> {
    async fn call<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        within(self.timeout, operation, call).await
    }

    /// The session check, and whether the session may exist (so that later checks and
    /// the cleanup use it).
    async fn session(&self, id: &str) -> (ConsistencyCheck, bool) {
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

    async fn message(&self, id: &str) -> ConsistencyCheck {
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
    async fn checkpoint(&self, thread: &str) -> (ConsistencyCheck, bool) {
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

    async fn pending_writes(&self, thread: &str) -> ConsistencyCheck {
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

    async fn task_context(&self, id: &str) -> ConsistencyCheck {
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

    async fn delete_thread(&self, thread: &str) -> ConsistencyCheck {
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

    async fn delete_session(&self, id: &str) -> ConsistencyCheck {
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
