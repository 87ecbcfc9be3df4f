//! The export format: its constants, the [`Record`] of each line with the header and
//! trailer, and the encoding of a line.

use std::io::Write;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::model::{Checkpoint, Message, PendingWrite, Session};

use super::io_error;

// Only doc links name these, so only doc builds import them.
#[cfg(doc)]
use super::{export, import, Sink, Source, TransferOptions};
#[cfg(doc)]
use crate::storage::StorageBackend;

/// The `format` of an export's header line.
pub const FORMAT: &str = "aiecs-storage";

/// The version of the JSON lines format written by [`export`]. [`import`] reads this
/// version, and version 1 (no trailer) only with [`TransferOptions::accept_v1`].
///
/// Version 2 added the [`Record::Trailer`] line.
pub const FORMAT_VERSION: u32 = 2;

/// The checksum algorithm of a [`ExportTrailer`]: 64-bit FNV-1a, written as 16
/// lowercase hex digits. It catches cuts, reorders and edits, not forgery.
pub const CHECKSUM_ALGORITHM: &str = "fnv1a-64";

/// What a walk covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scope {
    /// Every session with its history, every task context, every thread.
    #[default]
    All,
    /// One session: the session, its history and its task context.
    Session {
        /// The session id.
        session_id: String,
    },
    /// One thread: every namespace, checkpoint and pending write of it.
    Thread {
        /// The thread id.
        thread_id: String,
    },
}

impl Scope {
    /// One session: the session, its history and its task context.
    pub fn session(session_id: impl Into<String>) -> Self {
        Scope::Session {
            session_id: session_id.into(),
        }
    }

    /// One thread: every namespace, checkpoint and pending write of it.
    pub fn thread(thread_id: impl Into<String>) -> Self {
        Scope::Thread {
            thread_id: thread_id.into(),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::All => f.write_str("the whole store"),
            Scope::Session { session_id } => write!(f, "session `{session_id}`"),
            Scope::Thread { thread_id } => write!(f, "thread `{thread_id}`"),
        }
    }
}

/// The first line of an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportHeader {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format version ([`FORMAT_VERSION`] when written by this crate).
    pub version: u32,
    /// What the export covers.
    pub scope: Scope,
    /// The [`kind`](StorageBackend::kind) of the backend exported.
    pub source: String,
    /// When the export started.
    pub exported_at: DateTime<Utc>,
}

/// The last line of an export (format version 2 on): what the lines before it hold, so
/// an import can tell a whole export from a cut, reordered or edited one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportTrailer {
    /// Lines before the trailer, the header included; blank lines are not counted.
    pub lines: u64,
    /// All items: sessions + messages + task contexts + checkpoints + writes.
    pub records: u64,
    /// Sessions.
    pub sessions: u64,
    /// Messages.
    pub messages: u64,
    /// Task contexts.
    pub task_contexts: u64,
    /// Checkpoints.
    pub checkpoints: u64,
    /// Pending writes.
    pub writes: u64,
    /// The checksum algorithm, [`CHECKSUM_ALGORITHM`].
    pub checksum_algorithm: String,
    /// The checksum of the lines before the trailer: each line without its surrounding
    /// whitespace, followed by one `\n`; blank lines left out. For a file as
    /// [`export`] writes it, that is every byte before the trailer.
    pub checksum: String,
}

/// One line of an export, and the unit a [`Source`] yields and a [`Sink`] applies.
///
/// Serialized with a `type` tag (`header`, `session`, `messages`, `task_context`,
/// `checkpoints`, `writes`, `trailer`); the other fields are those of the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// The first line of an export; applying it does nothing.
    Header(ExportHeader),
    /// The last line of an export; applying it does nothing.
    Trailer(ExportTrailer),
    /// A session exactly as stored (timestamps, status, metadata, counters).
    Session(Session),
    /// Consecutive messages of a session's history, oldest first.
    Messages {
        /// The session.
        session_id: String,
        /// The position of the first message in the source's history (0 = oldest).
        offset: u64,
        /// The messages, with their ids and timestamps.
        messages: Vec<Message>,
    },
    /// The task context of a session id (which need not hold a session).
    TaskContext {
        /// The session id.
        session_id: String,
        /// The context.
        context: Value,
    },
    /// Consecutive checkpoints of a thread and namespace, oldest first (the order they
    /// were stored, so the last one applied is the latest).
    Checkpoints {
        /// The thread.
        thread_id: String,
        /// The namespace.
        checkpoint_ns: String,
        /// The checkpoints; each names the same thread and namespace.
        checkpoints: Vec<Checkpoint>,
    },
    /// The pending writes of one checkpoint, in the order they were first stored.
    Writes {
        /// The thread.
        thread_id: String,
        /// The namespace.
        checkpoint_ns: String,
        /// The checkpoint the writes belong to.
        checkpoint_id: String,
        /// The writes; within a task, `idx` runs 0, 1, 2, ...
        writes: Vec<PendingWrite>,
    },
}

impl Record {
    /// How many items (sessions, messages, contexts, checkpoints, writes) it holds.
    pub fn items(&self) -> u64 {
        match self {
            Record::Header(_) | Record::Trailer(_) => 0,
            Record::Session(_) | Record::TaskContext { .. } => 1,
            Record::Messages { messages, .. } => messages.len() as u64,
            Record::Checkpoints { checkpoints, .. } => checkpoints.len() as u64,
            Record::Writes { writes, .. } => writes.len() as u64,
        }
    }
}

/// The `type` tag of a record.
pub(super) fn record_kind(record: &Record) -> &'static str {
    match record {
        Record::Header(_) => "header",
        Record::Trailer(_) => "trailer",
        Record::Session(_) => "session",
        Record::Messages { .. } => "messages",
        Record::TaskContext { .. } => "task_context",
        Record::Checkpoints { .. } => "checkpoints",
        Record::Writes { .. } => "writes",
    }
}

/// Writes one record and its newline; returns the bytes written, for the checksum.
pub(super) fn write_line<W: Write>(out: &mut W, record: &Record, line: u64) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(record).map_err(|e| {
        StorageError::serialization(format!("line {line}: could not encode the record: {e}"), e)
    })?;
    bytes.push(b'\n');
    out.write_all(&bytes)
        .map_err(|e| io_error(format!("could not write line {line} of the export"), e))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_are_tagged_by_type() {
        let r = Record::TaskContext {
            session_id: "s".into(),
            context: json!({"a": 1}),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"type": "task_context", "session_id": "s", "context": {"a": 1}})
        );
        assert_eq!(serde_json::from_value::<Record>(v).unwrap(), r);
        let s = serde_json::to_value(Scope::session("s1")).unwrap();
        assert_eq!(s, json!({"kind": "session", "session_id": "s1"}));
    }
}
