//! Whether what a backend stores reads back unchanged: a round trip of one record of
//! each kind, removed again.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::checks::Probe;
use super::{DIAGNOSE_PREFIX, DIAGNOSE_USER};
use crate::model::now;
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
