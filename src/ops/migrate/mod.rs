//! Copying a store between backends, resumably, and checking the copy (the spec's
//! `StorageMigrator`, completed).
//!
//! [`Migrator`] reads the source with a [`Source`] and writes the target with a [`Sink`]
//! (the same path as [`export`](super::transfer::export) and
//! [`import`](super::transfer::import)). [`verify`] compares two backends by counts and
//! by a content checksum per session and per thread.

mod state;
mod verify;

pub use state::{pair_key, read_state, MigrationState, STATE_FORMAT, STATE_VERSION};
pub use verify::{
    verify, verify_scope, Difference, DifferenceKind, Entity, StoreCounts, VerifyReport,
};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::model::{now, SessionQuery};
use crate::storage::StorageBackend;
use crate::validate::MAX_LIMIT;

use super::transfer::{
    check_batch_size, Phase, Position, Scope, Sink, Source, TransferCounts, Units,
    DEFAULT_BATCH_SIZE,
};

use state::{remove_state, store_fingerprint, write_state};

/// How a [`Migrator`] runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// Items (sessions, messages, task contexts, checkpoints) per batch: one read page
    /// and one group of writes (1..=10 000; default 100).
    pub batch_size: usize,
    /// Where to record progress. When the file exists at the start, the run continues
    /// after the position it records, provided it was written by a run between the same
    /// two stores (compared by [`store_id`](StorageBackend::store_id)) and of the same
    /// scope; any other file is refused. It is rewritten (owner-only, through a fresh
    /// temp file and a rename) after every batch that completes
    /// a session, task context or thread, and removed when the run completes. `None`:
    /// no resume; a rerun copies everything again (harmlessly: every write is
    /// idempotent).
    pub state_file: Option<PathBuf>,
    /// What to copy (default: everything).
    pub scope: Scope,
    /// Count the sessions, task contexts and threads to copy before starting, so that
    /// [`Progress::totals`] is known (one extra walk of the ids; default true).
    pub count_totals: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            state_file: None,
            scope: Scope::All,
            count_totals: true,
        }
    }
}

/// Sessions, task contexts and threads a run will copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Sessions.
    pub sessions: u64,
    /// Task contexts.
    pub task_contexts: u64,
    /// Threads.
    pub threads: u64,
}

impl Totals {
    /// Sessions, task contexts and threads together.
    pub fn units(&self) -> u64 {
        self.sessions + self.task_contexts + self.threads
    }
}

/// What a [`Migrator`] reports after each batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The phase in progress.
    pub phase: Phase,
    /// What this run has copied so far.
    pub copied: TransferCounts,
    /// Sessions, task contexts and threads this run has completed.
    pub done: Units,
    /// What this run will copy, when [`MigrateOptions::count_totals`] is set.
    pub totals: Option<Totals>,
    /// Whether the run continues an interrupted one.
    pub resumed: bool,
}

impl Progress {
    /// Completed units (sessions, task contexts, threads) of this run.
    pub fn units_done(&self) -> u64 {
        self.done.sessions + self.done.task_contexts + self.done.threads
    }
}

/// What a finished [`Migrator::run`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The [`kind`](StorageBackend::kind) of the source.
    pub source: String,
    /// The kind of the target.
    pub target: String,
    /// What was copied.
    pub scope: Scope,
    /// What this run copied (a resumed run counts only its own part).
    pub copied: TransferCounts,
    /// Sessions, task contexts and threads this run completed.
    pub done: Units,
    /// Where the run started, when it continued an interrupted one.
    pub resumed_from: Option<Position>,
    /// How long the run took, serialized as milliseconds.
    #[serde(rename = "elapsed_ms", with = "crate::model::duration_ms")]
    pub elapsed: Duration,
}

type ProgressFn<'a> = Box<dyn FnMut(&Progress) + Send + 'a>;

/// Copies a store from one backend to another (the spec's `StorageMigrator`).
///
/// Copies every session with its timestamps, status, metadata and counters unchanged,
/// every history in order with its message ids and timestamps, every task context
/// (including those of ids that hold no session), and every thread with its namespaces,
/// checkpoints (store order, so the latest stays the latest; parents, metadata and
/// `created_at` kept) and pending writes, in batches of
/// [`batch_size`](MigrateOptions::batch_size) items.
///
/// - Rerunning is safe: sessions are overwritten, messages already held are skipped by
///   id, checkpoints and pending writes are upserted, task contexts replaced.
/// - With a [`state_file`](MigrateOptions::state_file), an interrupted run (an error, a
///   crash, Ctrl-C) continues where it stopped: the next run with the same file skips
///   the sessions, task contexts and threads already copied.
/// - [`Migrator::verify`] then compares the two stores.
/// - A short page is never taken for the end of a listing, and a run during which a
///   source behind a [`FailoverLayer`](crate::layer::FailoverLayer) answered any read
///   from its fallback (which may hold less than the primary) fails instead of
///   reporting a copy that may be short; `verify` does the same.
///
/// What the target already holds and the source does not is left alone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::ops::migrate::Migrator;
/// use aiecs_storage::{MemoryBackend, NewMessage, prelude::*};
/// let source = MemoryBackend::new();
/// source.create_session("s1", "alice", &Default::default()).await?;
/// source.add_conversation_message("s1", &NewMessage::new("user", "hi")).await?;
/// let target = MemoryBackend::new();
///
/// let report = Migrator::new(&source, &target)
///     .batch_size(500)
///     .on_progress(|p| println!("{} sessions", p.done.sessions))
///     .run()
///     .await?;
/// assert_eq!(report.copied.messages, 1);
/// assert!(Migrator::new(&source, &target).verify().await?.is_clean());
/// # Ok(()) }
/// ```
pub struct Migrator<'a> {
    source: &'a dyn StorageBackend,
    target: &'a dyn StorageBackend,
    options: MigrateOptions,
    progress: Option<ProgressFn<'a>>,
}

impl std::fmt::Debug for Migrator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrator")
            .field("source", &self.source.kind())
            .field("target", &self.target.kind())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<'a> Migrator<'a> {
    /// A migrator from `source` to `target` with the default options.
    pub fn new(source: &'a dyn StorageBackend, target: &'a dyn StorageBackend) -> Self {
        Migrator {
            source,
            target,
            options: MigrateOptions::default(),
            progress: None,
        }
    }

    /// Replaces all options.
    pub fn with_options(mut self, options: MigrateOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets the items per batch (1..=10 000).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.options.batch_size = batch_size;
        self
    }

    /// Records progress in `path`, and continues from it when it exists.
    pub fn state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.options.state_file = Some(path.into());
        self
    }

    /// Copies only `scope`.
    pub fn scope(mut self, scope: Scope) -> Self {
        self.options.scope = scope;
        self
    }

    /// Calls `progress` after each batch is written (for a progress bar).
    pub fn on_progress(mut self, progress: impl FnMut(&Progress) + Send + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// The options in use.
    pub fn options(&self) -> &MigrateOptions {
        &self.options
    }

    /// Copies the store. On error the state file (if any) records how far the copy got,
    /// and running again with it continues from there.
    pub async fn run(&mut self) -> Result<MigrationReport> {
        let started = Instant::now();
        check_batch_size(self.options.batch_size)?;
        let scope = self.options.scope.clone();
        let state_path = self.options.state_file.clone();
        let mut state = match &state_path {
            Some(path) => read_state(path)?,
            None => None,
        };
        let (source_store, target_store) = (
            store_fingerprint(self.source),
            store_fingerprint(self.target),
        );
        if let (Some(s), Some(path)) = (&state, &state_path) {
            // Resuming another pair's position would skip everything before it.
            if s.source != self.source.kind()
                || s.target != self.target.kind()
                || s.source_store != source_store
                || s.target_store != target_store
            {
                return Err(StorageError::invalid_input(
                    "state_file",
                    format!(
                        "{} records a migration from {} to {} between other stores than \
                         this {} to {} one; give another state file, or remove it to \
                         start over",
                        path.display(),
                        s.source,
                        s.target,
                        self.source.kind(),
                        self.target.kind()
                    ),
                ));
            }
            if s.scope != scope {
                return Err(StorageError::invalid_input(
                    "state_file",
                    format!(
                        "{} records a migration of {}, not of {scope}",
                        path.display(),
                        s.scope
                    ),
                ));
            }
        }
        let resumed_from = state.as_ref().map(|s| s.position.clone());
        let start = resumed_from.clone().unwrap_or_default();
        if let Some(path) = &state_path {
            let s = state.get_or_insert_with(|| MigrationState {
                format: STATE_FORMAT.to_owned(),
                version: STATE_VERSION,
                scope: scope.clone(),
                source: self.source.kind().to_owned(),
                target: self.target.kind().to_owned(),
                source_store,
                target_store,
                position: Position::start(),
                records: 0,
                started_at: now(),
                updated_at: now(),
            });
            s.updated_at = now();
            write_state(path, s)?;
        }

        let base_records = state.as_ref().map_or(0, |s| s.records);
        let totals = if self.options.count_totals {
            Some(count_units(self.source, &scope, &start).await?)
        } else {
            None
        };
        let mut progress = Progress {
            phase: start.phase,
            copied: TransferCounts::default(),
            done: Units::default(),
            totals,
            resumed: resumed_from.is_some(),
        };
        let fallback_before = fallback_reads(self.source).await?;
        let mut source =
            Source::resume(self.source, scope.clone(), self.options.batch_size, start)?;
        let sink = Sink::new(self.target);
        while let Some(batch) = source.next_batch().await? {
            let copied = sink.apply(batch.records).await?;
            progress.copied.add(&copied);
            progress.done.add(batch.units);
            if let Some(position) = batch.completed {
                progress.phase = position.phase;
                if let (Some(path), Some(s)) = (&state_path, state.as_mut()) {
                    s.records = base_records + progress.copied.records;
                    s.position = position;
                    s.updated_at = now();
                    write_state(path, s)?;
                }
            }
            if let Some(f) = self.progress.as_mut() {
                f(&progress);
            }
        }
        let answered = fallback_reads(self.source).await? - fallback_before;
        if answered > 0 {
            // Which read it was is unknown, so no position can be trusted: the rerun
            // starts over (every write is idempotent).
            if let Some(path) = &state_path {
                remove_state(path)?;
            }
            return Err(incomplete_read(answered, "copy"));
        }
        if let Some(path) = &state_path {
            remove_state(path)?;
        }
        progress.phase = Phase::Done;
        Ok(MigrationReport {
            source: self.source.kind().to_owned(),
            target: self.target.kind().to_owned(),
            scope,
            copied: progress.copied,
            done: progress.done,
            resumed_from,
            elapsed: started.elapsed(),
        })
    }

    /// Compares source and target within the migrator's scope; see [`verify`].
    pub async fn verify(&self) -> Result<VerifyReport> {
        verify_scope(self.source, self.target, &self.options.scope).await
    }
}

/// Reads a source stack answered from a failover's fallback so far (`fallback_reads`,
/// summed over its layers; 0 without failover). A read that returns everything at once
/// (a task's writes, a thread's namespaces, a task context) shows nothing when the
/// fallback answers it with less, so a walk compares this figure before and after.
pub(crate) async fn fallback_reads(b: &dyn StorageBackend) -> Result<u64> {
    fn sum(report: &crate::model::MetricsReport) -> u64 {
        let own = report
            .values
            .get("fallback_reads")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        own + report.components.iter().map(sum).sum::<u64>()
    }
    Ok(sum(&b.get_metrics().await?))
}

/// The error of a walk during which a store answered reads from its fallback; `walk`
/// names it ("copy", "comparison").
pub(crate) fn incomplete_read(answered: u64, walk: &str) -> StorageError {
    StorageError::Backend {
        message: format!(
            "{answered} read(s) of the {walk} were answered by a failover fallback, which \
             may hold less than its primary: the {walk} is not complete; run it again once \
             the primary is healthy (nothing is stored twice)"
        ),
        transient: true,
        source: None,
    }
}

/// Counts the units a walk of `scope` from `start` will copy.
async fn count_units(b: &dyn StorageBackend, scope: &Scope, start: &Position) -> Result<Totals> {
    if start.phase == Phase::Done {
        return Ok(Totals::default());
    }
    match scope {
        Scope::Session { .. } => {
            return Ok(Totals {
                sessions: 1,
                ..Totals::default()
            })
        }
        Scope::Thread { .. } => {
            return Ok(Totals {
                threads: 1,
                ..Totals::default()
            })
        }
        Scope::All => {}
    }
    let after = |phase: Phase| {
        if start.phase == phase {
            start.after.clone()
        } else {
            None
        }
    };
    let mut totals = Totals::default();
    if start.phase <= Phase::Sessions {
        let mut query = SessionQuery {
            after: after(Phase::Sessions),
            limit: MAX_LIMIT,
            ..SessionQuery::default()
        };
        loop {
            let page = b.list_sessions(&query).await?;
            totals.sessions += page.sessions.len() as u64;
            match page.next_cursor {
                Some(c) => query.after = Some(c),
                None => break,
            }
        }
    }
    if start.phase <= Phase::TaskContexts {
        let mut cursor = after(Phase::TaskContexts);
        loop {
            let page = b.list_task_contexts(cursor.as_deref(), MAX_LIMIT).await?;
            totals.task_contexts += page.ids.len() as u64;
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
    }
    if start.phase <= Phase::Threads {
        let mut cursor = after(Phase::Threads);
        loop {
            let page = b.list_threads(cursor.as_deref(), MAX_LIMIT).await?;
            totals.threads += page.ids.len() as u64;
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
    }
    Ok(totals)
}
