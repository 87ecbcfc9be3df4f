//! The reading side: where a walk stands ([`Position`], [`Phase`]), what it yields
//! ([`Batch`]), and the [`Source`] that walks a backend batch by batch.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::storage::StorageBackend;
use crate::validate;

use super::walk::{Unit, Work};
use super::{check_batch_size, Record, Scope};

// Only doc links name these, so only doc builds import them.
#[cfg(doc)]
use crate::error::StorageError;

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

    pub(super) fn at(phase: Phase, after: impl Into<String>) -> Self {
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

/// Walks a backend and yields its content as [`Batch`]es of [`Record`]s, in the order
/// described in the [module docs](super). For [`Scope::Session`] and [`Scope::Thread`], a
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
    pub(super) backend: &'a dyn StorageBackend,
    pub(super) batch_size: usize,
    pub(super) work: VecDeque<Work>,
    pub(super) allow_missing: bool,
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
}
