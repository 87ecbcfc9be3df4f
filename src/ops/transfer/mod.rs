//! One streaming path for migration, export and import.
//!
//! A [`Source`] walks a backend in a fixed order and yields [`Batch`]es of [`Record`]s; a
//! [`Sink`] applies records to a backend with the contract's `restore_*` methods, which
//! keep ids, timestamps, status and counters as they are. The three operations are
//! compositions of the two:
//!
//! - [`export`]: source -> JSON lines (one [`Record`] per line, a [`Record::Header`] first
//!   and a [`Record::Trailer`] last);
//! - [`import`]: JSON lines -> sink, once the whole file has been checked
//!   ([`import_stream`] in one pass, for input that cannot be read twice);
//! - [`Migrator`](crate::ops::migrate::Migrator): source -> sink, with a resumable state
//!   file.
//!
//! Every write a sink makes is idempotent (sessions overwritten, messages deduplicated by
//! id, checkpoints upserted, pending writes keyed by task and index, task contexts
//! replaced), so applying the same records twice changes nothing.
//!
//! # Walk order
//!
//! For [`Scope::All`] the source walks three phases, each in id order by cursor:
//!
//! 1. sessions: a page of [`Record::Session`]s, then the history of each session of the
//!    page as [`Record::Messages`] (oldest first, `offset` = position of the first one);
//! 2. task contexts: every [`Record::TaskContext`], including those of ids that hold no
//!    session;
//! 3. threads: for each thread, each namespace (ascending), its checkpoints oldest first
//!    ([`Record::Checkpoints`], the order they were stored, so "latest" is kept) and then
//!    the pending writes of each checkpoint ([`Record::Writes`]).
//!
//! After each session, task context and thread the source marks a [`Position`]: once the
//! batch holding that mark is applied, everything before the position is copied.
//!
//! # Limits
//!
//! The contract enumerates pending writes by checkpoint only, so pending writes stored
//! against a checkpoint id that was never stored itself are not walked.
//!
//! # JSON lines
//!
//! ```text
//! {"type":"header","format":"aiecs-storage","version":2,"scope":{"kind":"all"},"source":"memory","exported_at":"..."}
//! {"type":"session","session_id":"s1","user_id":"alice","created_at":"...","updated_at":"...","status":"active","metadata":{},"metrics":{...}}
//! {"type":"messages","session_id":"s1","offset":0,"messages":[{"message_id":"...","role":"user",...}]}
//! {"type":"task_context","session_id":"s1","context":{"step":3}}
//! {"type":"checkpoints","thread_id":"t1","checkpoint_ns":"","checkpoints":[{...},{...}]}
//! {"type":"writes","thread_id":"t1","checkpoint_ns":"","checkpoint_id":"c2","writes":[{"task_id":"a","idx":0,...}]}
//! {"type":"trailer","lines":6,"records":9,"sessions":1,"messages":3,"task_contexts":1,"checkpoints":2,"writes":2,"checksum_algorithm":"fnv1a-64","checksum":"9f1c0c2b5e7a4d13"}
//! ```
//!
//! The trailer ([`ExportTrailer`], since version 2) holds the counts of the lines before
//! it and their 64-bit FNV-1a, so [`import`] refuses a file that was cut short (at a line
//! boundary too), reordered or edited. See [`import`] for every check.

mod check;
mod export;
mod format;
mod import;
mod sink;
mod source;
mod walk;

pub use export::{export, export_with_progress};
pub use format::{
    ExportHeader, ExportTrailer, Record, Scope, CHECKSUM_ALGORITHM, FORMAT, FORMAT_VERSION,
};
pub use import::{
    check_export, import, import_stream, import_stream_with_progress, import_with_progress,
    ExportSummary,
};
pub use sink::Sink;
pub use source::{Batch, Phase, Position, Source, Units};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};
use crate::validate;

/// The default number of items (sessions, messages, checkpoints, ...) per batch.
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// Counts of what was read, written or stored by an export, import or migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferCounts {
    /// All items: the sum of the others except `new_messages`.
    pub records: u64,
    /// Sessions.
    pub sessions: u64,
    /// Messages.
    pub messages: u64,
    /// Messages the target did not hold yet (import and migration; 0 for export).
    pub new_messages: u64,
    /// Task contexts.
    pub task_contexts: u64,
    /// Checkpoints.
    pub checkpoints: u64,
    /// Pending writes.
    pub writes: u64,
    /// Batches applied or written.
    pub batches: u64,
}

impl TransferCounts {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &TransferCounts) {
        self.records += other.records;
        self.sessions += other.sessions;
        self.messages += other.messages;
        self.new_messages += other.new_messages;
        self.task_contexts += other.task_contexts;
        self.checkpoints += other.checkpoints;
        self.writes += other.writes;
        self.batches += other.batches;
    }

    fn count(&mut self, record: &Record) {
        let n = record.items();
        self.records += n;
        match record {
            Record::Header(_) | Record::Trailer(_) => {}
            Record::Session(_) => self.sessions += n,
            Record::Messages { .. } => self.messages += n,
            Record::TaskContext { .. } => self.task_contexts += n,
            Record::Checkpoints { .. } => self.checkpoints += n,
            Record::Writes { .. } => self.writes += n,
        }
    }
}

/// Checks a batch size: 1..=10 000 (the contract's page limit).
pub fn check_batch_size(batch_size: usize) -> Result<()> {
    validate::limit("batch_size", batch_size)
}

/// Options of [`export`] and [`import`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferOptions {
    /// Items per batch: per read page on export, per group of writes on import
    /// (1..=10 000; default 100).
    pub batch_size: usize,
    /// Import: accept version 1 exports, written before exports ended with a
    /// [`Record::Trailer`]. Off by default: without a trailer a file cut at a line
    /// boundary cannot be told from a whole one, so a version 1 file is refused unless
    /// the caller vouches that it is whole. Header, order and input rules are still
    /// checked.
    #[serde(default)]
    pub accept_v1: bool,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            accept_v1: false,
        }
    }
}

fn io_error(what: String, e: std::io::Error) -> StorageError {
    StorageError::Backend {
        message: format!("{what}: {e}"),
        transient: false,
        source: Some(Box::new(e)),
    }
}
