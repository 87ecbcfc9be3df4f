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

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Seek, SeekFrom, Write};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::model::{
    now, Checkpoint, CheckpointFilter, Message, PendingWrite, Session, SessionQuery, TaskWrites,
    WriteInput,
};
use crate::storage::StorageBackend;
use crate::validate::{self, MAX_LIMIT, MAX_VALUE_BYTES};

use crate::fnv::Fnv;

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

/// The default number of items (sessions, messages, checkpoints, ...) per batch.
pub const DEFAULT_BATCH_SIZE: usize = 100;

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

/// A phase of a [`Scope::All`] walk, in walk order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Sessions with their histories.
    Sessions,
    /// Task contexts.
    TaskContexts,
    /// Threads with their checkpoints and pending writes.
    Threads,
    /// Nothing left.
    Done,
}

impl Phase {
    /// A stable snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Sessions => "sessions",
            Phase::TaskContexts => "task_contexts",
            Phase::Threads => "threads",
            Phase::Done => "done",
        }
    }
}

/// Where a walk stands: everything of earlier phases, and everything of `phase` up to and
/// including the id `after`, is done.
///
/// For [`Scope::Session`] and [`Scope::Thread`] only [`Phase::Done`] matters: any other
/// position walks the one session or thread again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The phase in progress.
    pub phase: Phase,
    /// The last id of `phase` that is done (`None`: none yet).
    pub after: Option<String>,
}

impl Position {
    /// The start of a walk.
    pub const fn start() -> Self {
        Position {
            phase: Phase::Sessions,
            after: None,
        }
    }

    /// The end of a walk.
    pub const fn done() -> Self {
        Position {
            phase: Phase::Done,
            after: None,
        }
    }

    fn at(phase: Phase, after: impl Into<String>) -> Self {
        Position {
            phase,
            after: Some(after.into()),
        }
    }
}

impl Default for Position {
    fn default() -> Self {
        Position::start()
    }
}

/// Units (sessions, task contexts, threads) a walk has completed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Units {
    /// Sessions copied with their whole history.
    pub sessions: u64,
    /// Task contexts copied.
    pub task_contexts: u64,
    /// Threads copied with every namespace, checkpoint and pending write.
    pub threads: u64,
}

impl Units {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: Units) {
        self.sessions += other.sessions;
        self.task_contexts += other.task_contexts;
        self.threads += other.threads;
    }
}

/// What a [`Source`] yields: records holding up to `batch_size` items, and the position
/// reached once they are applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// The records, in walk order.
    pub records: Vec<Record>,
    /// Set when the batch completes a unit (a session with its history, a task context, a
    /// thread): once `records` are applied, everything before this position is copied.
    pub completed: Option<Position>,
    /// The units this batch completes.
    pub units: Units,
}

impl Batch {
    /// How many items the records hold.
    pub fn items(&self) -> u64 {
        self.records.iter().map(Record::items).sum()
    }
}

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

/// Reads of a history's end that may disagree with its latest message before the walk
/// gives up on the source.
const END_CHECKS: u32 = 3;

/// What the walk reads next. A listing page whose cursor says "last page" is confirmed by
/// one more read after it: a failover layer may serve a page from a fallback holding
/// less, and its "last page" would end the walk early.
enum Work {
    SessionPage {
        after: Option<String>,
    },
    OneSession {
        session_id: String,
    },
    Messages {
        session_id: String,
        offset: u64,
        /// The id of the last message read so far, to check the end against.
        last_id: Option<String>,
        /// Empty reads in a row that disagreed with the latest message.
        misses: u32,
    },
    Context {
        session_id: String,
    },
    ContextPage {
        after: Option<String>,
    },
    ThreadPage {
        after: Option<String>,
    },
    Thread {
        thread_id: String,
        required: bool,
    },
    Checkpoints {
        thread_id: String,
        checkpoint_ns: String,
        oldest_first: VecDeque<Checkpoint>,
    },
    Writes {
        thread_id: String,
        checkpoint_ns: String,
        checkpoint_id: String,
    },
    Mark {
        position: Position,
        unit: Option<Unit>,
    },
}

#[derive(Clone, Copy)]
enum Unit {
    Session,
    TaskContext,
    Thread,
}

/// Walks a backend and yields its content as [`Batch`]es of [`Record`]s, in the order
/// described in the [module docs](self). For [`Scope::Session`] and [`Scope::Thread`], a
/// missing session or thread is [`StorageError::NotFound`] (see
/// [`Source::allow_missing`]). Each batch holds up to `batch_size` items (a
/// [`Record::Writes`] holds all writes of its checkpoint, so a batch may hold more).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::ops::transfer::{Scope, Source};
/// use aiecs_storage::{MemoryBackend, prelude::*};
/// let store = MemoryBackend::new();
/// store.create_session("s1", "alice", &Default::default()).await?;
/// let mut source = Source::new(&store, Scope::All, 100)?;
/// let mut items = 0;
/// while let Some(batch) = source.next_batch().await? {
///     items += batch.items();
/// }
/// assert_eq!(items, 1);
/// # Ok(()) }
/// ```
pub struct Source<'a> {
    backend: &'a dyn StorageBackend,
    batch_size: usize,
    work: VecDeque<Work>,
    allow_missing: bool,
}

impl std::fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("backend", &self.backend.kind())
            .field("batch_size", &self.batch_size)
            .field("pending_work", &self.work.len())
            .finish()
    }
}

impl<'a> Source<'a> {
    /// A walk of `scope` from the start. `batch_size` is 1..=10 000.
    pub fn new(backend: &'a dyn StorageBackend, scope: Scope, batch_size: usize) -> Result<Self> {
        Self::resume(backend, scope, batch_size, Position::start())
    }

    /// A walk of `scope` that continues after `position` (see [`Position`]).
    pub fn resume(
        backend: &'a dyn StorageBackend,
        scope: Scope,
        batch_size: usize,
        position: Position,
    ) -> Result<Self> {
        check_batch_size(batch_size)?;
        let mut work = VecDeque::new();
        if position.phase != Phase::Done {
            match scope {
                Scope::All => {
                    if let Some(after) = &position.after {
                        validate::id("after", after)?;
                    }
                    let after = position.after;
                    work.push_back(match position.phase {
                        Phase::Sessions => Work::SessionPage { after },
                        Phase::TaskContexts => Work::ContextPage { after },
                        Phase::Threads => Work::ThreadPage { after },
                        Phase::Done => unreachable!("checked above"),
                    });
                }
                Scope::Session { session_id } => {
                    validate::id("session_id", &session_id)?;
                    work.push_back(Work::OneSession { session_id });
                    work.push_back(Work::Mark {
                        position: Position::done(),
                        unit: Some(Unit::Session),
                    });
                }
                Scope::Thread { thread_id } => {
                    validate::id("thread_id", &thread_id)?;
                    work.push_back(Work::Thread {
                        thread_id,
                        required: true,
                    });
                    work.push_back(Work::Mark {
                        position: Position::done(),
                        unit: Some(Unit::Thread),
                    });
                }
            }
        }
        Ok(Source {
            backend,
            batch_size,
            work,
            allow_missing: false,
        })
    }

    /// For [`Scope::Session`] and [`Scope::Thread`]: a missing session or thread yields
    /// nothing (the session's task context, if any, is still walked) instead of
    /// [`StorageError::NotFound`].
    pub fn allow_missing(mut self) -> Self {
        self.allow_missing = true;
        self
    }

    /// The next batch, or `None` when the walk is over.
    pub async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let mut batch = Batch::default();
        let mut items = 0usize;
        loop {
            while let Some(Work::Mark { .. }) = self.work.front() {
                if let Some(Work::Mark { position, unit }) = self.work.pop_front() {
                    match unit {
                        Some(Unit::Session) => batch.units.sessions += 1,
                        Some(Unit::TaskContext) => batch.units.task_contexts += 1,
                        Some(Unit::Thread) => batch.units.threads += 1,
                        None => {}
                    }
                    batch.completed = Some(position);
                }
            }
            if items >= self.batch_size {
                break;
            }
            let Some(work) = self.work.pop_front() else {
                break;
            };
            let space = self.batch_size - items;
            let before = batch.records.len();
            self.step(work, space, &mut batch.records).await?;
            items += batch.records[before..]
                .iter()
                .map(|r| r.items() as usize)
                .sum::<usize>();
        }
        if batch.records.is_empty() && batch.completed.is_none() {
            Ok(None)
        } else {
            Ok(Some(batch))
        }
    }

    fn push_front(&mut self, items: Vec<Work>) {
        for w in items.into_iter().rev() {
            self.work.push_front(w);
        }
    }

    async fn step(&mut self, work: Work, space: usize, out: &mut Vec<Record>) -> Result<()> {
        let b = self.backend;
        match work {
            Work::SessionPage { after } => {
                let mut page = b
                    .list_sessions(&SessionQuery {
                        after: after.clone(),
                        limit: space,
                        ..SessionQuery::default()
                    })
                    .await?;
                if page.next_cursor.is_none() {
                    let last = page.sessions.last().map(|s| s.session_id.clone());
                    let end = last.or(after);
                    let probe = b
                        .list_sessions(&SessionQuery {
                            after: end.clone(),
                            limit: 1,
                            ..SessionQuery::default()
                        })
                        .await?;
                    if !probe.sessions.is_empty() {
                        page.next_cursor = end;
                    }
                }
                let mut next = Vec::with_capacity(page.sessions.len() * 2 + 2);
                for s in page.sessions {
                    next.push(Work::Messages {
                        session_id: s.session_id.clone(),
                        offset: 0,
                        last_id: None,
                        misses: 0,
                    });
                    next.push(Work::Mark {
                        position: Position::at(Phase::Sessions, s.session_id.clone()),
                        unit: Some(Unit::Session),
                    });
                    out.push(Record::Session(s));
                }
                match page.next_cursor {
                    Some(cursor) => next.push(Work::SessionPage {
                        after: Some(cursor),
                    }),
                    None => {
                        next.push(Work::Mark {
                            position: Position {
                                phase: Phase::TaskContexts,
                                after: None,
                            },
                            unit: None,
                        });
                        next.push(Work::ContextPage { after: None });
                    }
                }
                self.push_front(next);
            }
            Work::OneSession { session_id } => match b.get_session(&session_id).await? {
                Some(session) => {
                    out.push(Record::Session(session));
                    self.push_front(vec![
                        Work::Messages {
                            session_id: session_id.clone(),
                            offset: 0,
                            last_id: None,
                            misses: 0,
                        },
                        Work::Context { session_id },
                    ]);
                }
                None if self.allow_missing => {
                    self.work.push_front(Work::Context { session_id });
                }
                None => return Err(StorageError::not_found("session", session_id)),
            },
            Work::Messages {
                session_id,
                offset,
                mut last_id,
                misses,
            } => {
                let messages = b.get_conversation_range(&session_id, offset, space).await?;
                let n = messages.len();
                if let Some(m) = messages.last() {
                    last_id = Some(m.message_id.clone());
                }
                // A short page is not proof of the end: a failover layer may have served
                // it from a fallback that holds less. The end is where the latest message
                // of the history is the last one read.
                let more = n == space || {
                    let latest = b.get_conversation_history(&session_id, 1).await?;
                    latest.last().map(|m| &m.message_id) != last_id.as_ref()
                };
                if more {
                    let misses = if n == 0 { misses + 1 } else { 0 };
                    if misses > END_CHECKS {
                        return Err(StorageError::Backend {
                            message: format!(
                                "the history of session `{session_id}` reads as ending at \
                                 position {offset} {misses} times, but its latest message is \
                                 not the last one read there: the source answers \
                                 inconsistently (a failover serving from its fallback?) or \
                                 the session changed during the copy; run again",
                            ),
                            transient: true,
                            source: None,
                        });
                    }
                    self.work.push_front(Work::Messages {
                        session_id: session_id.clone(),
                        offset: offset + n as u64,
                        last_id,
                        misses,
                    });
                }
                if n > 0 {
                    out.push(Record::Messages {
                        session_id,
                        offset,
                        messages,
                    });
                }
            }
            Work::Context { session_id } => {
                if let Some(context) = b.get_task_context(&session_id).await? {
                    out.push(Record::TaskContext {
                        session_id,
                        context,
                    });
                }
            }
            Work::ContextPage { after } => {
                let mut page = b.list_task_contexts(after.as_deref(), space).await?;
                if page.next_cursor.is_none() {
                    let end = page.ids.last().cloned().or(after);
                    let probe = b.list_task_contexts(end.as_deref(), 1).await?;
                    if !probe.ids.is_empty() {
                        page.next_cursor = end;
                    }
                }
                let mut next = Vec::with_capacity(page.ids.len() * 2 + 2);
                for id in page.ids {
                    next.push(Work::Context {
                        session_id: id.clone(),
                    });
                    next.push(Work::Mark {
                        position: Position::at(Phase::TaskContexts, id),
                        unit: Some(Unit::TaskContext),
                    });
                }
                match page.next_cursor {
                    Some(cursor) => next.push(Work::ContextPage {
                        after: Some(cursor),
                    }),
                    None => {
                        next.push(Work::Mark {
                            position: Position {
                                phase: Phase::Threads,
                                after: None,
                            },
                            unit: None,
                        });
                        next.push(Work::ThreadPage { after: None });
                    }
                }
                self.push_front(next);
            }
            Work::ThreadPage { after } => {
                let mut page = b.list_threads(after.as_deref(), self.batch_size).await?;
                if page.next_cursor.is_none() {
                    let end = page.ids.last().cloned().or(after);
                    let probe = b.list_threads(end.as_deref(), 1).await?;
                    if !probe.ids.is_empty() {
                        page.next_cursor = end;
                    }
                }
                let mut next = Vec::with_capacity(page.ids.len() * 2 + 1);
                for id in page.ids {
                    next.push(Work::Thread {
                        thread_id: id.clone(),
                        required: false,
                    });
                    next.push(Work::Mark {
                        position: Position::at(Phase::Threads, id),
                        unit: Some(Unit::Thread),
                    });
                }
                next.push(match page.next_cursor {
                    Some(cursor) => Work::ThreadPage {
                        after: Some(cursor),
                    },
                    None => Work::Mark {
                        position: Position::done(),
                        unit: None,
                    },
                });
                self.push_front(next);
            }
            Work::Thread {
                thread_id,
                required,
            } => {
                let namespaces = b.list_checkpoint_namespaces(&thread_id).await?;
                if namespaces.is_empty() && required && !self.allow_missing {
                    return Err(StorageError::not_found("thread", thread_id));
                }
                let mut next = Vec::new();
                for ns in namespaces {
                    let oldest_first = all_checkpoints(b, &thread_id, &ns).await?;
                    // Writes may come before their checkpoint (or outlive it), so they are
                    // found by listing them, not through the stored checkpoints.
                    let ids = b.list_write_checkpoints(&thread_id, &ns).await?;
                    if !oldest_first.is_empty() {
                        next.push(Work::Checkpoints {
                            thread_id: thread_id.clone(),
                            checkpoint_ns: ns.clone(),
                            oldest_first,
                        });
                    }
                    for checkpoint_id in ids {
                        next.push(Work::Writes {
                            thread_id: thread_id.clone(),
                            checkpoint_ns: ns.clone(),
                            checkpoint_id,
                        });
                    }
                }
                self.push_front(next);
            }
            Work::Checkpoints {
                thread_id,
                checkpoint_ns,
                mut oldest_first,
            } => {
                let take = space.min(oldest_first.len());
                let checkpoints: Vec<Checkpoint> = oldest_first.drain(..take).collect();
                if !oldest_first.is_empty() {
                    self.work.push_front(Work::Checkpoints {
                        thread_id: thread_id.clone(),
                        checkpoint_ns: checkpoint_ns.clone(),
                        oldest_first,
                    });
                }
                out.push(Record::Checkpoints {
                    thread_id,
                    checkpoint_ns,
                    checkpoints,
                });
            }
            Work::Writes {
                thread_id,
                checkpoint_ns,
                checkpoint_id,
            } => {
                let writes = b
                    .get_writes(&thread_id, &checkpoint_ns, &checkpoint_id)
                    .await?;
                if !writes.is_empty() {
                    out.push(Record::Writes {
                        thread_id,
                        checkpoint_ns,
                        checkpoint_id,
                        writes,
                    });
                }
            }
            Work::Mark { .. } => unreachable!("marks are taken in next_batch"),
        }
        Ok(())
    }
}

/// Every checkpoint of a thread and namespace, oldest first (store order), read newest
/// first in pages of 10 000, the last page confirmed by one more read.
async fn all_checkpoints(
    b: &dyn StorageBackend,
    thread_id: &str,
    ns: &str,
) -> Result<VecDeque<Checkpoint>> {
    let mut newest_first: Vec<Checkpoint> = Vec::new();
    let mut before: Option<String> = None;
    let mut misses = 0;
    loop {
        let filter = CheckpointFilter {
            limit: MAX_LIMIT,
            before: before.take(),
            ..CheckpointFilter::default()
        };
        let page = b.list_checkpoints(thread_id, ns, &filter).await?;
        let full = page.len() == MAX_LIMIT;
        misses = if page.is_empty() { misses + 1 } else { 0 };
        before = page
            .last()
            .map(|c| c.checkpoint_id.clone())
            .or(filter.before);
        newest_first.extend(page);
        // A short page may come from a failover's fallback holding less: the end is
        // where one more read finds nothing older.
        if !full {
            let probe = CheckpointFilter {
                limit: 1,
                before: before.clone(),
                ..CheckpointFilter::default()
            };
            if b.list_checkpoints(thread_id, ns, &probe).await?.is_empty() {
                break;
            }
            if misses > END_CHECKS {
                return Err(StorageError::Backend {
                    message: format!(
                        "the checkpoints of thread `{thread_id}` namespace `{ns}` read as \
                         ending {misses} times while one more read finds older ones: the \
                         source answers inconsistently (a failover serving from its \
                         fallback?); run again"
                    ),
                    transient: true,
                    source: None,
                });
            }
        }
    }
    Ok(newest_first.into_iter().rev().collect())
}

/// Applies [`Record`]s to a backend with the contract's `restore_*` methods.
///
/// Consecutive records of one kind are merged into one call where the contract allows
/// (sessions, checkpoints, pending writes), in chunks of at most 10 000 items.
/// A [`Record::Messages`] of a session the backend does not hold fails with
/// [`StorageError::NotFound`]: a session's record must come before its messages.
#[derive(Clone, Copy)]
pub struct Sink<'a> {
    backend: &'a dyn StorageBackend,
}

impl std::fmt::Debug for Sink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("backend", &self.backend.kind())
            .finish()
    }
}

impl<'a> Sink<'a> {
    /// A sink writing to `backend`.
    pub fn new(backend: &'a dyn StorageBackend) -> Self {
        Sink { backend }
    }

    /// Applies `records` in order and returns what it wrote (`batches` is 1).
    pub async fn apply(&self, records: Vec<Record>) -> Result<TransferCounts> {
        let mut counts = TransferCounts {
            batches: 1,
            ..TransferCounts::default()
        };
        let mut sessions: Vec<Session> = Vec::new();
        let mut checkpoints: Vec<Checkpoint> = Vec::new();
        let mut writes: Vec<TaskWrites> = Vec::new();
        for record in records {
            counts.count(&record);
            if !matches!(record, Record::Session(_)) {
                self.flush_sessions(&mut sessions).await?;
            }
            if !matches!(record, Record::Checkpoints { .. }) {
                self.flush_checkpoints(&mut checkpoints).await?;
            }
            if !matches!(record, Record::Writes { .. }) {
                self.flush_writes(&mut writes).await?;
            }
            match record {
                Record::Header(_) | Record::Trailer(_) => {}
                Record::Session(s) => sessions.push(s),
                Record::Messages {
                    session_id,
                    messages,
                    ..
                } => {
                    for chunk in messages.chunks(MAX_LIMIT) {
                        counts.new_messages +=
                            self.backend.restore_messages(&session_id, chunk).await?;
                    }
                }
                Record::TaskContext {
                    session_id,
                    context,
                } => {
                    self.backend
                        .store_task_context(&session_id, &context)
                        .await?;
                }
                Record::Checkpoints {
                    thread_id,
                    checkpoint_ns,
                    checkpoints: list,
                } => {
                    same_thread(&thread_id, &checkpoint_ns, &list)?;
                    checkpoints.extend(list);
                }
                Record::Writes {
                    thread_id,
                    checkpoint_ns,
                    checkpoint_id,
                    writes: list,
                } => writes.extend(task_writes(
                    &thread_id,
                    &checkpoint_ns,
                    &checkpoint_id,
                    list,
                )?),
            }
        }
        self.flush_sessions(&mut sessions).await?;
        self.flush_checkpoints(&mut checkpoints).await?;
        self.flush_writes(&mut writes).await?;
        Ok(counts)
    }

    async fn flush_sessions(&self, sessions: &mut Vec<Session>) -> Result<()> {
        for chunk in sessions.chunks(MAX_LIMIT) {
            self.backend.restore_sessions(chunk).await?;
        }
        sessions.clear();
        Ok(())
    }

    async fn flush_checkpoints(&self, checkpoints: &mut Vec<Checkpoint>) -> Result<()> {
        for chunk in checkpoints.chunks(MAX_LIMIT) {
            self.backend.restore_checkpoints(chunk).await?;
        }
        checkpoints.clear();
        Ok(())
    }

    async fn flush_writes(&self, writes: &mut Vec<TaskWrites>) -> Result<()> {
        for chunk in writes.chunks(MAX_LIMIT) {
            for result in self.backend.batch_put_writes(chunk).await? {
                result?;
            }
        }
        writes.clear();
        Ok(())
    }
}

/// Turns the stored writes of a checkpoint (first-stored order) into `put_writes` calls
/// that reproduce that order: one call per run of consecutive writes of a task, each
/// holding the task's writes 0..=k seen so far (a write's key is its index in the call,
/// so earlier ones are rewritten in place and keep their position).
fn task_writes(
    thread_id: &str,
    checkpoint_ns: &str,
    checkpoint_id: &str,
    writes: Vec<PendingWrite>,
) -> Result<Vec<TaskWrites>> {
    let mut per_task: HashMap<String, Vec<WriteInput>> = HashMap::new();
    let mut out: Vec<TaskWrites> = Vec::new();
    let mut writes = writes.into_iter().peekable();
    while let Some(first) = writes.next() {
        let task_id = first.task_id.clone();
        let list = per_task.entry(task_id.clone()).or_default();
        let push = |w: PendingWrite, list: &mut Vec<WriteInput>| -> Result<()> {
            match (w.idx as usize).cmp(&list.len()) {
                std::cmp::Ordering::Equal => list.push(WriteInput::new(w.channel, w.value)),
                std::cmp::Ordering::Less => {
                    list[w.idx as usize] = WriteInput::new(w.channel, w.value);
                }
                std::cmp::Ordering::Greater => {
                    return Err(StorageError::invalid_input(
                        "writes",
                        format!(
                            "write {} of task `{}` at checkpoint `{checkpoint_id}` comes \
                             before write {}: a task's writes are numbered 0, 1, 2, ...",
                            w.idx,
                            w.task_id,
                            list.len()
                        ),
                    ))
                }
            }
            Ok(())
        };
        push(first, list)?;
        while writes.peek().is_some_and(|w| w.task_id == task_id) {
            if let Some(w) = writes.next() {
                push(w, list)?;
            }
        }
        out.extend(pieces(TaskWrites {
            thread_id: thread_id.to_owned(),
            checkpoint_ns: checkpoint_ns.to_owned(),
            checkpoint_id: checkpoint_id.to_owned(),
            task_id,
            writes: list.clone(),
        })?);
    }
    Ok(out)
}

/// Splits a `put_writes` call larger than one call may carry ([`MAX_VALUE_BYTES`]) into
/// calls that are not, with the same end state. A task's writes can outgrow one call
/// (a long call, then a shorter one rewriting its first writes), yet `put_writes` keys
/// a write by its index in the call, so no call can write index `i` without indexes
/// `0..i`. The first piece therefore writes the last segment of writes behind small
/// placeholders, creating every key in index order as the original call did; each next
/// piece rewrites the segment before in place, behind placeholders of its own, and the
/// last piece leaves no placeholder.
fn pieces(call: TaskWrites) -> Result<Vec<TaskWrites>> {
    let sizes = call
        .writes
        .iter()
        .map(|w| validate::serialized_len(&w.value))
        .collect::<Result<Vec<usize>>>()?;
    if sizes.iter().sum::<usize>() <= MAX_VALUE_BYTES {
        return Ok(vec![call]);
    }
    let placeholder = Value::from(0);
    let placeholder_bytes = validate::serialized_len(&placeholder)?;
    let mut segments = Vec::new();
    let mut start = 0;
    while start < sizes.len() {
        let mut total = start * placeholder_bytes;
        let mut end = start;
        while end < sizes.len() && total + sizes[end] <= MAX_VALUE_BYTES {
            total += sizes[end];
            end += 1;
        }
        if end == start {
            return Err(StorageError::invalid_input(
                "writes",
                format!(
                    "write {start} of task `{}` at checkpoint `{}` serializes to {} bytes, \
                     too many to write behind the {start} writes before it in one \
                     put_writes call (at most {MAX_VALUE_BYTES} bytes)",
                    call.task_id, call.checkpoint_id, sizes[start]
                ),
            ));
        }
        segments.push(start..end);
        start = end;
    }
    Ok(segments
        .into_iter()
        .rev()
        .map(|segment| {
            let writes = call.writes[..segment.start]
                .iter()
                .map(|w| WriteInput::new(w.channel.clone(), placeholder.clone()))
                .chain(call.writes[segment].iter().cloned())
                .collect();
            TaskWrites {
                writes,
                ..call.clone()
            }
        })
        .collect())
}

/// Checks an imported record against the input rules its `restore_*` call applies, and
/// the shape rules [`Sink::apply`] enforces, so a bad value is refused with its line
/// number rather than by a backend call that cannot tell which line it came from; and
/// brings its timestamps to whole microseconds.
///
/// Why microseconds: SQLite and PostgreSQL keep no finer, and [`now`] stamps nothing
/// finer, so a hand-edited or foreign export with nanoseconds or a leap second
/// (`23:59:60`, which chrono keeps as a 61st second) would otherwise be stored as given
/// by the memory and Redis backends and differently by the SQL ones. Truncating (as
/// `timestamp_micros` does) rolls a leap second into the next minute, as PostgreSQL
/// itself reads `23:59:60`.
fn prepare(record: &mut Record) -> Result<()> {
    match record {
        Record::Header(_) | Record::Trailer(_) => {}
        Record::Session(s) => {
            validate::restored_sessions(std::slice::from_ref(s))?;
            s.created_at = to_micros(s.created_at);
            s.updated_at = to_micros(s.updated_at);
        }
        Record::Messages {
            session_id,
            messages,
            ..
        } => {
            for chunk in messages.chunks(MAX_LIMIT) {
                validate::restored_messages(session_id, chunk)?;
            }
            for m in messages.iter_mut() {
                m.timestamp = to_micros(m.timestamp);
            }
        }
        Record::TaskContext {
            session_id,
            context,
        } => validate::task_context(session_id, context)?,
        Record::Checkpoints {
            thread_id,
            checkpoint_ns,
            checkpoints,
        } => {
            validate::thread(thread_id, checkpoint_ns)?;
            same_thread(thread_id, checkpoint_ns, checkpoints)?;
            for chunk in checkpoints.chunks(MAX_LIMIT) {
                validate::restored_checkpoints(chunk)?;
            }
            for c in checkpoints.iter_mut() {
                c.created_at = to_micros(c.created_at);
            }
        }
        Record::Writes {
            thread_id,
            checkpoint_ns,
            checkpoint_id,
            writes,
        } => {
            validate::checkpoint_ref(thread_id, checkpoint_ns, Some(checkpoint_id))?;
            // The calls the sink will make, checked as the backend will check them.
            for call in task_writes(thread_id, checkpoint_ns, checkpoint_id, writes.clone())? {
                validate::writes(
                    &call.thread_id,
                    &call.checkpoint_ns,
                    &call.checkpoint_id,
                    &call.task_id,
                    &call.writes,
                )?;
            }
        }
    }
    Ok(())
}

/// `t` truncated to whole microseconds (see [`prepare`]).
fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Every checkpoint of a [`Record::Checkpoints`] names the record's thread and namespace.
fn same_thread(thread_id: &str, checkpoint_ns: &str, checkpoints: &[Checkpoint]) -> Result<()> {
    match checkpoints
        .iter()
        .find(|c| c.thread_id != thread_id || c.checkpoint_ns != checkpoint_ns)
    {
        Some(c) => Err(StorageError::invalid_input(
            "checkpoints",
            format!(
                "checkpoint `{}` names thread `{}` namespace `{}` in a record of thread \
                 `{thread_id}` namespace `{checkpoint_ns}`",
                c.checkpoint_id, c.thread_id, c.checkpoint_ns
            ),
        )),
        None => Ok(()),
    }
}

/// `err` with `line N: ` before its reason, keeping its kind and field.
fn at_line(line: u64, err: StorageError) -> StorageError {
    match err {
        StorageError::InvalidInput { field, reason } => StorageError::InvalidInput {
            field,
            reason: format!("line {line}: {reason}"),
        },
        StorageError::Serialization { message, source } => StorageError::Serialization {
            message: format!("line {line}: {message}"),
            source,
        },
        other => other,
    }
}

fn io_error(what: String, e: std::io::Error) -> StorageError {
    StorageError::Backend {
        message: format!("{what}: {e}"),
        transient: false,
        source: Some(Box::new(e)),
    }
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

/// Writes `scope` of `source` to `out` as JSON lines: a [`Record::Header`], one
/// [`Record`] per line, and a [`Record::Trailer`] with the counts and checksum of the
/// lines before it. Returns what was written.
///
/// A failed export leaves `out` without a trailer, so [`import`] refuses it; to keep an
/// earlier file whole, write to a new file and rename it over the old one on success
/// (as the `aiecs-storage export -o` command does).
///
/// `out` is written synchronously; wrap a file in a [`std::io::BufWriter`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::ops::transfer::{export, import, Scope, TransferOptions};
/// use aiecs_storage::{MemoryBackend, NewMessage, prelude::*};
/// let source = MemoryBackend::new();
/// source.create_session("s1", "alice", &Default::default()).await?;
/// source.add_conversation_message("s1", &NewMessage::new("user", "hi")).await?;
///
/// let mut lines = Vec::new();
/// export(&source, &Scope::All, &mut lines, &TransferOptions::default()).await?;
/// let target = MemoryBackend::new();
/// let input = std::io::Cursor::new(lines);
/// let counts = import(&target, input, &TransferOptions::default()).await?;
/// assert_eq!((counts.sessions, counts.messages), (1, 1));
/// assert_eq!(target.get_conversation_history("s1", 50).await?[0].content, "hi");
/// # Ok(()) }
/// ```
pub async fn export<W: Write>(
    source: &dyn StorageBackend,
    scope: &Scope,
    out: W,
    options: &TransferOptions,
) -> Result<TransferCounts> {
    export_with_progress(source, scope, out, options, |_| {}).await
}

/// [`export`], calling `progress` with the running counts after each batch.
pub async fn export_with_progress<W: Write>(
    source: &dyn StorageBackend,
    scope: &Scope,
    mut out: W,
    options: &TransferOptions,
    mut progress: impl FnMut(&TransferCounts),
) -> Result<TransferCounts> {
    let mut walk = Source::new(source, scope.clone(), options.batch_size)?;
    let fallback_before = super::migrate::fallback_reads(source).await?;
    let header = Record::Header(ExportHeader {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        scope: scope.clone(),
        source: source.kind().to_owned(),
        exported_at: now(),
    });
    let mut checksum = Fnv::default();
    let mut line = 1u64;
    checksum.bytes(&write_line(&mut out, &header, line)?);
    let mut counts = TransferCounts::default();
    while let Some(batch) = walk.next_batch().await? {
        for record in &batch.records {
            line += 1;
            checksum.bytes(&write_line(&mut out, record, line)?);
            counts.count(record);
        }
        counts.batches += 1;
        progress(&counts);
    }
    // No trailer for a walk the fallback answered part of: without one, the file is
    // refused on import as truncated, whoever ignores this error.
    let answered = super::migrate::fallback_reads(source).await? - fallback_before;
    if answered > 0 {
        return Err(super::migrate::incomplete_read(answered, "export"));
    }
    let trailer = Record::Trailer(ExportTrailer {
        lines: line,
        records: counts.records,
        sessions: counts.sessions,
        messages: counts.messages,
        task_contexts: counts.task_contexts,
        checkpoints: counts.checkpoints,
        writes: counts.writes,
        checksum_algorithm: CHECKSUM_ALGORITHM.to_owned(),
        checksum: checksum.hex(),
    });
    write_line(&mut out, &trailer, line + 1)?;
    out.flush()
        .map_err(|e| io_error("could not write the export".into(), e))?;
    Ok(counts)
}

/// Writes one record and its newline; returns the bytes written, for the checksum.
fn write_line<W: Write>(out: &mut W, record: &Record, line: u64) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(record).map_err(|e| {
        StorageError::serialization(format!("line {line}: could not encode the record: {e}"), e)
    })?;
    bytes.push(b'\n');
    out.write_all(&bytes)
        .map_err(|e| io_error(format!("could not write line {line} of the export"), e))?;
    Ok(bytes)
}

/// Reads an export from `input`, checks all of it, then applies it to `target` through a
/// [`Sink`], `batch_size` items at a time. Returns what was applied.
///
/// `input` is read twice: a first pass checks every line and writes nothing; only if the
/// whole file passes is it read again from where it started and applied. So a file that
/// is truncated, reordered, edited or holds a bad record is refused **before anything is
/// written**. (The second pass checks again, so a file changed between the passes is
/// still refused, but then after applying what came before the change.) For input that
/// cannot be read twice, see [`import_stream`].
///
/// The checks, each failing with an error that names the line:
///
/// - The first line is a header of this [`FORMAT`] and a version this build reads; a
///   version 1 file (written before exports had a trailer) is refused unless
///   [`TransferOptions::accept_v1`] is set. Another header later is refused.
/// - A line that is not a record is [`StorageError::Serialization`].
/// - A record that breaks an input rule (an over-long id, an empty role, a negative
///   counter, a checkpoint of another thread, a gap in a task's write indexes) is
///   [`StorageError::InvalidInput`] naming the field.
/// - Order ([`StorageError::Serialization`]): a session's messages come after its
///   session record, and each [`Record::Messages`] starts at the `offset` where the
///   previous one of its session ended (the first at 0), so no piece of a history is
///   missing or moved.
/// - The trailer ([`StorageError::Serialization`]): present as the last record (a file
///   that ends without one is truncated, and the error names the last line read), its
///   counts equal to what the lines before it hold, its checksum equal to theirs.
///
/// Blank lines and whitespace around a line (such as the `\r` of a CRLF copy) are
/// ignored. Timestamps are stored truncated to whole microseconds, the precision every
/// backend keeps (a leap second, `23:59:60`, becomes the first microseconds of the next
/// minute). Every write is idempotent, so importing a file again changes nothing.
pub async fn import<R: BufRead + Seek>(
    target: &dyn StorageBackend,
    input: R,
    options: &TransferOptions,
) -> Result<TransferCounts> {
    import_with_progress(target, input, options, |_| {}).await
}

/// [`import`], calling `progress` with the running counts after each batch applied.
pub async fn import_with_progress<R: BufRead + Seek>(
    target: &dyn StorageBackend,
    mut input: R,
    options: &TransferOptions,
    progress: impl FnMut(&TransferCounts),
) -> Result<TransferCounts> {
    check_batch_size(options.batch_size)?;
    let start = input
        .stream_position()
        .map_err(|e| io_error("could not read the import".into(), e))?;
    check_export(&mut input, options)?;
    input
        .seek(SeekFrom::Start(start))
        .map_err(|e| io_error("could not read the import a second time".into(), e))?;
    import_stream_with_progress(target, input, options, progress).await
}

/// What [`check_export`] found in a whole, valid export.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    /// The header line.
    pub header: ExportHeader,
    /// What the export holds (`new_messages` and `batches` are 0).
    pub counts: TransferCounts,
}

/// Reads a whole export and checks it as [`import`] does, writing nothing.
pub fn check_export<R: BufRead>(mut input: R, options: &TransferOptions) -> Result<ExportSummary> {
    let mut reader = Checker::new(options);
    let mut buf = String::new();
    while reader.next_record(&mut input, &mut buf)?.is_some() {}
    match reader.header {
        Some(header) => Ok(ExportSummary {
            header,
            counts: reader.counts,
        }),
        None => Err(StorageError::Serialization {
            message: "the input holds no export: it has no header line".into(),
            source: None,
        }),
    }
}

/// [`import`] in one pass, for input that cannot be read twice (a pipe, a socket).
///
/// The same checks run, but records are applied in batches as they are read, so a file
/// found bad part way has had the batches before the bad line applied: the error then
/// says the import is incomplete and up to which line (and how many items) it applied.
/// The last batch is applied only once the trailer has been checked, so an export of up
/// to `batch_size` items is applied whole or not at all. Importing the whole file again
/// afterwards is safe (every write is idempotent).
pub async fn import_stream<R: BufRead>(
    target: &dyn StorageBackend,
    input: R,
    options: &TransferOptions,
) -> Result<TransferCounts> {
    import_stream_with_progress(target, input, options, |_| {}).await
}

/// [`import_stream`], calling `progress` with the running counts after each batch.
pub async fn import_stream_with_progress<R: BufRead>(
    target: &dyn StorageBackend,
    mut input: R,
    options: &TransferOptions,
    mut progress: impl FnMut(&TransferCounts),
) -> Result<TransferCounts> {
    check_batch_size(options.batch_size)?;
    let sink = Sink::new(target);
    let mut reader = Checker::new(options);
    let mut counts = TransferCounts::default();
    let mut pending: Vec<Record> = Vec::new();
    let mut pending_items = 0u64;
    let mut applied_through = 0u64;
    let mut buf = String::new();
    let incomplete = |err: StorageError, counts: &TransferCounts, through: u64| {
        if counts.batches == 0 {
            err
        } else {
            with_note(
                err,
                &format!(
                    "the import is incomplete: {} items of the lines up to line {through} \
                     were applied, nothing after it; importing the whole file again is safe",
                    counts.records
                ),
            )
        }
    };
    loop {
        let next = match reader.next_record(&mut input, &mut buf) {
            Ok(next) => next,
            Err(e) => return Err(incomplete(e, &counts, applied_through)),
        };
        let Some((line, record)) = next else { break };
        pending_items += record.items();
        pending.push(record);
        if pending_items >= options.batch_size as u64 {
            match sink.apply(std::mem::take(&mut pending)).await {
                Ok(c) => counts.add(&c),
                Err(e) => return Err(incomplete(e, &counts, applied_through)),
            }
            applied_through = line;
            pending_items = 0;
            progress(&counts);
        }
    }
    if reader.header.is_none() {
        return Err(StorageError::Serialization {
            message: "the input holds no export: it has no header line".into(),
            source: None,
        });
    }
    if !pending.is_empty() {
        match sink.apply(pending).await {
            Ok(c) => counts.add(&c),
            Err(e) => return Err(incomplete(e, &counts, applied_through)),
        }
        progress(&counts);
    }
    Ok(counts)
}

/// `err` with `; note` after its message, keeping its kind.
fn with_note(err: StorageError, note: &str) -> StorageError {
    match err {
        StorageError::InvalidInput { field, reason } => StorageError::InvalidInput {
            field,
            reason: format!("{reason}; {note}"),
        },
        StorageError::Serialization { message, source } => StorageError::Serialization {
            message: format!("{message}; {note}"),
            source,
        },
        StorageError::Connection { message, source } => StorageError::Connection {
            message: format!("{message}; {note}"),
            source,
        },
        StorageError::Unavailable { message } => StorageError::Unavailable {
            message: format!("{message}; {note}"),
        },
        StorageError::Backend {
            message,
            transient,
            source,
        } => StorageError::Backend {
            message: format!("{message}; {note}"),
            transient,
            source,
        },
        other => other,
    }
}

fn format_error(line: u64, message: String) -> StorageError {
    StorageError::Serialization {
        message: format!("line {line}: {message}"),
        source: None,
    }
}

/// Reads an export line by line and checks it (see [`import`]): yields its content
/// records, checked and with timestamps in microseconds, and ends only once the trailer
/// has matched.
struct Checker {
    accept_v1: bool,
    /// The number of the last line read (blank ones included).
    line: u64,
    /// Non-blank lines before the trailer, and the checksum of them.
    lines: u64,
    checksum: Fnv,
    /// Items read so far.
    counts: TransferCounts,
    header: Option<ExportHeader>,
    trailer_line: Option<u64>,
    /// The last non-blank line and what it held, for the message of a truncated file.
    last: (u64, &'static str),
    /// For each session whose record was read: the offset its history has reached.
    histories: HashMap<String, u64>,
}

impl Checker {
    fn new(options: &TransferOptions) -> Self {
        Checker {
            accept_v1: options.accept_v1,
            line: 0,
            lines: 0,
            checksum: Fnv::default(),
            counts: TransferCounts::default(),
            header: None,
            trailer_line: None,
            last: (0, "nothing"),
            histories: HashMap::new(),
        }
    }

    /// The next content record and its line, or `None` at the end of a whole export.
    fn next_record<R: BufRead>(
        &mut self,
        input: &mut R,
        buf: &mut String,
    ) -> Result<Option<(u64, Record)>> {
        loop {
            buf.clear();
            self.line += 1;
            let line = self.line;
            let read = input.read_line(buf).map_err(|e| {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    StorageError::serialization(format!("line {line}: not UTF-8 text: {e}"), e)
                } else {
                    io_error(format!("could not read line {line} of the import"), e)
                }
            })?;
            if read == 0 {
                self.finish()?;
                return Ok(None);
            }
            let text = buf.trim();
            if text.is_empty() {
                continue;
            }
            if let Some(t) = self.trailer_line {
                return Err(format_error(
                    line,
                    format!(
                        "a line after the trailer (line {t}), which ends the export: \
                         was something appended to the file?"
                    ),
                ));
            }
            let mut record: Record = serde_json::from_str(text).map_err(|e| {
                StorageError::serialization(format!("line {line}: not a valid record: {e}"), e)
            })?;
            let kind = record_kind(&record);
            match &record {
                Record::Header(h) => {
                    self.header_line(line, h)?;
                    self.header = Some(h.clone());
                }
                Record::Trailer(t) => {
                    self.trailer(line, t)?;
                    self.trailer_line = Some(line);
                    self.last = (line, kind);
                    continue;
                }
                _ if self.header.is_none() => {
                    return Err(format_error(
                        line,
                        format!("an export starts with a header line; this is a `{kind}` record"),
                    ))
                }
                _ => {}
            }
            self.checksum.bytes(text.as_bytes());
            self.checksum.bytes(b"\n");
            self.lines += 1;
            self.last = (line, kind);
            if matches!(record, Record::Header(_)) {
                continue;
            }
            self.counts.count(&record);
            prepare(&mut record).map_err(|e| at_line(line, e))?;
            self.follows(line, &record)?;
            return Ok(Some((line, record)));
        }
    }

    fn header_line(&self, line: u64, h: &ExportHeader) -> Result<()> {
        if self.header.is_some() {
            return Err(format_error(
                line,
                "a second header: an export has one, on its first line (were two \
                 exports joined?)"
                    .into(),
            ));
        }
        if h.format != FORMAT {
            return Err(format_error(
                line,
                format!("the header names format `{}`, not `{FORMAT}`", h.format),
            ));
        }
        if h.version > FORMAT_VERSION || h.version == 0 {
            return Err(format_error(
                line,
                format!(
                    "format version {} is not one this build reads (1 to {FORMAT_VERSION})",
                    h.version
                ),
            ));
        }
        if h.version == 1 && !self.accept_v1 {
            return Err(format_error(
                line,
                "a version 1 export, written before exports ended with a trailer: a copy \
                 cut short cannot be told from a whole one, so it is refused; import it with \
                 `accept_v1` (`aiecs-storage import --accept-v1`) if you know it is whole"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks the trailer against the lines before it.
    fn trailer(&self, line: u64, t: &ExportTrailer) -> Result<()> {
        let Some(header) = &self.header else {
            return Err(format_error(
                line,
                "a trailer before any header: an export starts with a header line".into(),
            ));
        };
        if header.version < 2 {
            return Err(format_error(
                line,
                format!(
                    "a trailer in a version {} export, which has none",
                    header.version
                ),
            ));
        }
        let c = &self.counts;
        for (what, said, found) in [
            ("lines", t.lines, self.lines),
            ("items", t.records, c.records),
            ("sessions", t.sessions, c.sessions),
            ("messages", t.messages, c.messages),
            ("task contexts", t.task_contexts, c.task_contexts),
            ("checkpoints", t.checkpoints, c.checkpoints),
            ("pending writes", t.writes, c.writes),
        ] {
            if said != found {
                return Err(format_error(
                    line,
                    format!(
                        "the trailer counts {said} {what}, but the lines before it hold \
                         {found}: lines are missing, added or changed"
                    ),
                ));
            }
        }
        if t.checksum_algorithm != CHECKSUM_ALGORITHM {
            return Err(format_error(
                line,
                format!(
                    "the trailer's checksum algorithm is `{}`; this build knows \
                     `{CHECKSUM_ALGORITHM}`",
                    t.checksum_algorithm
                ),
            ));
        }
        let found = self.checksum.hex();
        if t.checksum != found {
            return Err(format_error(
                line,
                format!(
                    "the checksum of the lines before the trailer is {found}, the trailer \
                     says {}: the file changed after it was exported",
                    t.checksum
                ),
            ));
        }
        Ok(())
    }

    /// Checks the order of a content record: a session before its history, and each
    /// piece of a history where the previous one ended.
    fn follows(&mut self, line: u64, record: &Record) -> Result<()> {
        match record {
            Record::Session(s) => {
                self.histories.entry(s.session_id.clone()).or_insert(0);
            }
            Record::Messages {
                session_id,
                offset,
                messages,
            } => {
                let Some(next) = self.histories.get_mut(session_id) else {
                    return Err(format_error(
                        line,
                        format!(
                            "messages of session `{session_id}` before its session \
                             record: a session's record comes first"
                        ),
                    ));
                };
                if *offset != *next {
                    return Err(format_error(
                        line,
                        format!(
                            "messages of session `{session_id}` start at offset {offset}, \
                             but its history so far ends at offset {next}: lines are out \
                             of order or missing"
                        ),
                    ));
                }
                *next += messages.len() as u64;
            }
            _ => {}
        }
        Ok(())
    }

    /// At the end of the input: a version 2 export must have ended with its trailer.
    fn finish(&self) -> Result<()> {
        let Some(header) = &self.header else {
            return Ok(());
        };
        if header.version >= 2 && self.trailer_line.is_none() {
            let (line, kind) = self.last;
            return Err(format_error(
                line,
                format!(
                    "the export ends here, after a `{kind}` line, without its trailer: the \
                     file is truncated (a killed export or a short copy)"
                ),
            ));
        }
        Ok(())
    }
}

/// The `type` tag of a record.
fn record_kind(record: &Record) -> &'static str {
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
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn w(task: &str, idx: u32, channel: &str) -> PendingWrite {
        PendingWrite {
            task_id: task.into(),
            idx,
            channel: channel.into(),
            value: json!(idx),
        }
    }

    #[test]
    fn writes_split_into_runs_that_keep_first_stored_order() {
        let calls = task_writes(
            "t",
            "",
            "c",
            vec![
                w("a", 0, "x"),
                w("a", 1, "y"),
                w("b", 0, "z"),
                w("a", 2, "q"),
            ],
        )
        .unwrap();
        let shape: Vec<(String, Vec<String>)> = calls
            .iter()
            .map(|c| {
                (
                    c.task_id.clone(),
                    c.writes.iter().map(|w| w.channel.clone()).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("a".to_owned(), vec!["x".to_owned(), "y".to_owned()]),
                ("b".to_owned(), vec!["z".to_owned()]),
                (
                    "a".to_owned(),
                    vec!["x".to_owned(), "y".to_owned(), "q".to_owned()]
                ),
            ]
        );
        let err = task_writes("t", "", "c", vec![w("a", 1, "x")]).unwrap_err();
        assert!(err.to_string().contains("numbered"), "{err}");
    }

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
