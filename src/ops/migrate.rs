//! Copying a store between backends, resumably, and checking the copy (the spec's
//! `StorageMigrator`, completed).
//!
//! [`Migrator`] reads the source with a [`Source`] and writes the target with a [`Sink`]
//! (the same path as [`export`](super::transfer::export) and
//! [`import`](super::transfer::import)). [`verify`] compares two backends by counts and
//! by a content checksum per session and per thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::fnv::Fnv;
use crate::model::{now, SessionQuery};
use crate::storage::StorageBackend;
use crate::validate::MAX_LIMIT;

use super::transfer::{
    check_batch_size, Phase, Position, Record, Scope, Sink, Source, TransferCounts, Units,
    DEFAULT_BATCH_SIZE,
};

/// The `format` of a migration state file.
pub const STATE_FORMAT: &str = "aiecs-storage-migration";

/// The version of the migration state file. Version 2 binds the file to its pair of
/// stores; a version 1 file is refused, since the pair it belongs to is unknown.
pub const STATE_VERSION: u32 = 2;

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

/// The content of a migration state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationState {
    /// Always [`STATE_FORMAT`].
    pub format: String,
    /// [`STATE_VERSION`].
    pub version: u32,
    /// What the migration copies; a run with another scope refuses the file.
    pub scope: Scope,
    /// The source's kind, for people reading the file.
    pub source: String,
    /// The target's kind, for people reading the file.
    pub target: String,
    /// A fingerprint of the source's [`store_id`](StorageBackend::store_id) (a hash:
    /// the file never holds a URL); a run between other stores refuses the file.
    #[serde(default)]
    pub source_store: Option<String>,
    /// A fingerprint of the target's `store_id`.
    #[serde(default)]
    pub target_store: Option<String>,
    /// Everything before this position is copied.
    pub position: Position,
    /// Items copied by all runs so far.
    pub records: u64,
    /// When the first run started.
    pub started_at: DateTime<Utc>,
    /// When the file was last written.
    pub updated_at: DateTime<Utc>,
}

/// Reads a migration state file; `None` when there is none.
pub fn read_state(path: &Path) -> Result<Option<MigrationState>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StorageError::Backend {
                message: format!(
                    "could not read the migration state file {}: {e}",
                    path.display()
                ),
                transient: false,
                source: Some(Box::new(e)),
            })
        }
    };
    let state: MigrationState = serde_json::from_slice(&bytes).map_err(|e| {
        StorageError::serialization(
            format!("{} is not a migration state file: {e}", path.display()),
            e,
        )
    })?;
    if state.format == STATE_FORMAT && state.version < STATE_VERSION {
        return Err(StorageError::invalid_input(
            "state_file",
            format!(
                "{} is a version {} state file, which does not record the stores it \
                 belongs to; remove it to start the migration over",
                path.display(),
                state.version
            ),
        ));
    }
    if state.format != STATE_FORMAT || state.version > STATE_VERSION {
        return Err(StorageError::Serialization {
            message: format!(
                "{} is a `{}` file of version {}; this build reads `{STATE_FORMAT}` up to \
                 version {STATE_VERSION}",
                path.display(),
                state.format,
                state.version
            ),
            source: None,
        });
    }
    Ok(Some(state))
}

fn write_state(path: &Path, state: &MigrationState) -> Result<()> {
    let io = |e: std::io::Error| StorageError::Backend {
        message: format!(
            "could not write the migration state file {}: {e}",
            path.display()
        ),
        transient: false,
        source: Some(Box::new(e)),
    };
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| StorageError::serialization("could not encode the migration state", e))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover temp file (a crash) or a planted symlink is removed, not written
    // through: `create_new` refuses any existing path, symlinks included, and the new
    // file is readable by its owner only. The rename replaces `path` itself, never
    // what a symlink there points to.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut file, &bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

/// A fingerprint of a store's id (FNV-1a, 64 bits): enough to tell two stores apart in
/// a state file without writing down where they are.
fn store_fingerprint(backend: &dyn StorageBackend) -> Option<String> {
    Some(format!(
        "fnv1a64:{:016x}",
        Fnv::hash(backend.store_id()?.as_bytes())
    ))
}

/// Names a pair of stores (kinds and [`store_id`](StorageBackend::store_id)s) as 16 hex
/// digits, the same in every process: the command line names its default state file
/// with it, so rerunning a migration between the same stores resumes it.
pub fn pair_key(source: &dyn StorageBackend, target: &dyn StorageBackend) -> String {
    let mut h = Fnv::default();
    h.bytes(
        format!(
            "{}|{:?}|{}|{:?}",
            source.kind(),
            source.store_id(),
            target.kind(),
            target.store_id()
        )
        .as_bytes(),
    );
    h.hex()
}

fn remove_state(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::Backend {
            message: format!(
                "could not remove the migration state file {}: {e}",
                path.display()
            ),
            transient: false,
            source: Some(Box::new(e)),
        }),
    }
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

// ---------------------------------------------------------------------------------------
// Verification

/// How many of each thing a store holds (within a scope).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCounts {
    /// Sessions.
    pub sessions: u64,
    /// Messages of all sessions.
    pub messages: u64,
    /// Task contexts (including those of ids holding no session).
    pub task_contexts: u64,
    /// Threads holding checkpoints.
    pub threads: u64,
    /// Checkpoints of all threads and namespaces.
    pub checkpoints: u64,
    /// Pending writes of all checkpoints.
    pub pending_writes: u64,
}

/// What a [`Difference`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    /// A session with its history and task context.
    Session,
    /// The task context of an id that holds no session.
    TaskContext,
    /// A thread with its namespaces, checkpoints and pending writes.
    Thread,
}

/// How a source's and a target's entity differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// In the source, not in the target.
    MissingOnTarget,
    /// In the target, not in the source.
    ExtraOnTarget,
    /// In both, with different content.
    ChecksumMismatch,
}

/// One entity that differs between source and target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// What kind of entity.
    pub entity: Entity,
    /// Its id (session id or thread id).
    pub id: String,
    /// How it differs.
    pub kind: DifferenceKind,
    /// Which parts differ, for example `messages (30 vs 29)` or `session record`.
    pub detail: String,
    /// The source's checksum (16 hex digits), when the source holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_checksum: Option<String>,
    /// The target's checksum, when the target holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_checksum: Option<String>,
}

/// What [`verify`] found. Serializes as `{scope, source{counts}, target{counts},
/// sessions_checked, threads_checked, differences[...], clean}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// What was compared.
    pub scope: Scope,
    /// The source's counts.
    pub source: StoreCounts,
    /// The target's counts.
    pub target: StoreCounts,
    /// Session ids (sessions or task contexts) compared, across both sides.
    pub sessions_checked: u64,
    /// Thread ids compared, across both sides.
    pub threads_checked: u64,
    /// Every entity that differs, sessions first, then task contexts, then threads,
    /// each by id.
    pub differences: Vec<Difference>,
    /// Whether counts and every checksum agree.
    pub clean: bool,
}

impl VerifyReport {
    /// Whether counts and every checksum agree.
    pub fn is_clean(&self) -> bool {
        self.clean
    }
}

/// Compares two whole stores; see [`verify_scope`].
pub async fn verify(
    source: &dyn StorageBackend,
    target: &dyn StorageBackend,
) -> Result<VerifyReport> {
    verify_scope(source, target, &Scope::All).await
}

/// Compares `scope` of two backends: counts of sessions, messages, task contexts,
/// threads, checkpoints and pending writes on both sides, and per session id and per
/// thread a content checksum.
///
/// A session's checksum covers the session record (timestamps, status, metadata,
/// counters), its messages in order (ids, roles, content, timestamps, metadata) and its
/// task context; a thread's covers each namespace's checkpoints in store order (ids,
/// parents, data, metadata, `created_at`) and the pending writes of each. The checksum
/// is FNV-1a 64 over a canonical encoding of the JSON values (object keys sorted;
/// integral floats equal to the integer), so it does not depend on how a backend orders
/// keys. Both stores are read concurrently; memory grows with the number of sessions
/// and threads, not with their content.
///
/// For [`Scope::Session`] and [`Scope::Thread`], the source must hold the session or
/// thread ([`StorageError::NotFound`] otherwise); a target lacking it is reported as
/// [`DifferenceKind::MissingOnTarget`].
pub async fn verify_scope(
    source: &dyn StorageBackend,
    target: &dyn StorageBackend,
    scope: &Scope,
) -> Result<VerifyReport> {
    let before = (fallback_reads(source).await?, fallback_reads(target).await?);
    let (src, dst) = tokio::try_join!(
        Digest::of(source, scope, false),
        Digest::of(target, scope, true)
    )?;
    // A side read partly from its fallback can agree with a copy short in the same way.
    let answered =
        fallback_reads(source).await? - before.0 + fallback_reads(target).await? - before.1;
    if answered > 0 {
        return Err(incomplete_read(answered, "comparison"));
    }
    let mut differences = Vec::new();

    let mut ids: Vec<&String> = src.sessions.keys().chain(dst.sessions.keys()).collect();
    ids.sort();
    ids.dedup();
    let sessions_checked = ids.len() as u64;
    let mut context_only = Vec::new();
    for id in ids {
        let (a, b) = (src.sessions.get(id), dst.sessions.get(id));
        let entity =
            if a.is_some_and(|d| d.session.is_some()) || b.is_some_and(|d| d.session.is_some()) {
                Entity::Session
            } else {
                Entity::TaskContext
            };
        if let Some(d) = compare(entity, id, a, b) {
            match entity {
                Entity::Session => differences.push(d),
                _ => context_only.push(d),
            }
        }
    }
    differences.extend(context_only);

    let mut ids: Vec<&String> = src.threads.keys().chain(dst.threads.keys()).collect();
    ids.sort();
    ids.dedup();
    let threads_checked = ids.len() as u64;
    for id in ids {
        if let Some(d) = compare(Entity::Thread, id, src.threads.get(id), dst.threads.get(id)) {
            differences.push(d);
        }
    }
    let clean = differences.is_empty() && src.counts == dst.counts;
    Ok(VerifyReport {
        scope: scope.clone(),
        source: src.counts,
        target: dst.counts,
        sessions_checked,
        threads_checked,
        differences,
        clean,
    })
}

trait Part {
    fn checksum(&self) -> u64;
    fn differing_parts(&self, other: &Self) -> Vec<String>;
}

fn compare<P: Part>(entity: Entity, id: &str, a: Option<&P>, b: Option<&P>) -> Option<Difference> {
    let hex = |p: &P| format!("{:016x}", p.checksum());
    let (kind, detail) = match (a, b) {
        (Some(a), Some(b)) => {
            if a.checksum() == b.checksum() {
                return None;
            }
            let parts = a.differing_parts(b);
            (DifferenceKind::ChecksumMismatch, parts.join(", "))
        }
        (Some(_), None) => (
            DifferenceKind::MissingOnTarget,
            "not on the target".to_owned(),
        ),
        (None, Some(_)) => (
            DifferenceKind::ExtraOnTarget,
            "not in the source".to_owned(),
        ),
        (None, None) => return None,
    };
    Some(Difference {
        entity,
        id: id.to_owned(),
        kind,
        detail,
        source_checksum: a.map(hex),
        target_checksum: b.map(hex),
    })
}

#[derive(Default)]
struct SessionDigest {
    session: Option<u64>,
    messages: u64,
    messages_hash: Fnv,
    context: Option<u64>,
}

impl Part for SessionDigest {
    fn checksum(&self) -> u64 {
        let mut h = Fnv::default();
        h.opt(self.session);
        h.u64(self.messages);
        h.u64(self.messages_hash.finish());
        h.opt(self.context);
        h.finish()
    }

    fn differing_parts(&self, o: &Self) -> Vec<String> {
        let mut parts = Vec::new();
        match (self.session.is_some(), o.session.is_some()) {
            (true, false) => parts.push("session missing on the target".to_owned()),
            (false, true) => parts.push("session not in the source".to_owned()),
            _ if self.session != o.session => parts.push("session record".to_owned()),
            _ => {}
        }
        if self.messages != o.messages {
            parts.push(format!("messages ({} vs {})", self.messages, o.messages));
        } else if self.messages_hash != o.messages_hash {
            parts.push(format!("messages content ({} each)", self.messages));
        }
        match (self.context.is_some(), o.context.is_some()) {
            (true, false) => parts.push("task context missing on the target".to_owned()),
            (false, true) => parts.push("task context not in the source".to_owned()),
            _ if self.context != o.context => parts.push("task context".to_owned()),
            _ => {}
        }
        parts
    }
}

#[derive(Default)]
struct ThreadDigest {
    checkpoints: u64,
    checkpoints_hash: Fnv,
    writes: u64,
    writes_hash: Fnv,
}

impl Part for ThreadDigest {
    fn checksum(&self) -> u64 {
        let mut h = Fnv::default();
        h.u64(self.checkpoints);
        h.u64(self.checkpoints_hash.finish());
        h.u64(self.writes);
        h.u64(self.writes_hash.finish());
        h.finish()
    }

    fn differing_parts(&self, o: &Self) -> Vec<String> {
        let mut parts = Vec::new();
        if self.checkpoints != o.checkpoints {
            parts.push(format!(
                "checkpoints ({} vs {})",
                self.checkpoints, o.checkpoints
            ));
        } else if self.checkpoints_hash != o.checkpoints_hash {
            parts.push(format!(
                "checkpoints content or order ({} each)",
                self.checkpoints
            ));
        }
        if self.writes != o.writes {
            parts.push(format!("pending writes ({} vs {})", self.writes, o.writes));
        } else if self.writes_hash != o.writes_hash {
            parts.push(format!(
                "pending writes content or order ({} each)",
                self.writes
            ));
        }
        parts
    }
}

struct Digest {
    counts: StoreCounts,
    sessions: BTreeMap<String, SessionDigest>,
    threads: BTreeMap<String, ThreadDigest>,
}

impl Digest {
    async fn of(
        backend: &dyn StorageBackend,
        scope: &Scope,
        allow_missing: bool,
    ) -> Result<Digest> {
        let mut digest = Digest {
            counts: StoreCounts::default(),
            sessions: BTreeMap::new(),
            threads: BTreeMap::new(),
        };
        let mut source = Source::new(backend, scope.clone(), 1000)?;
        if allow_missing {
            source = source.allow_missing();
        }
        while let Some(batch) = source.next_batch().await? {
            for record in &batch.records {
                digest.add(record)?;
            }
        }
        Ok(digest)
    }

    fn add(&mut self, record: &Record) -> Result<()> {
        let encode = |v: Result<Value, serde_json::Error>| {
            v.map_err(|e| StorageError::serialization("could not encode a record to verify", e))
        };
        match record {
            Record::Header(_) | Record::Trailer(_) => {}
            Record::Session(s) => {
                self.counts.sessions += 1;
                let v = encode(serde_json::to_value(s))?;
                self.sessions
                    .entry(s.session_id.clone())
                    .or_default()
                    .session = Some(Fnv::of(&v));
            }
            Record::Messages {
                session_id,
                messages,
                ..
            } => {
                self.counts.messages += messages.len() as u64;
                let d = self.sessions.entry(session_id.clone()).or_default();
                for m in messages {
                    d.messages += 1;
                    d.messages_hash.value(&encode(serde_json::to_value(m))?);
                }
            }
            Record::TaskContext {
                session_id,
                context,
            } => {
                self.counts.task_contexts += 1;
                self.sessions.entry(session_id.clone()).or_default().context =
                    Some(Fnv::of(context));
            }
            Record::Checkpoints {
                thread_id,
                checkpoints,
                ..
            } => {
                self.counts.checkpoints += checkpoints.len() as u64;
                let d = self.threads.entry(thread_id.clone()).or_default();
                if d.checkpoints == 0 && d.writes == 0 {
                    self.counts.threads += 1;
                }
                for c in checkpoints {
                    d.checkpoints += 1;
                    d.checkpoints_hash.value(&encode(serde_json::to_value(c))?);
                }
            }
            Record::Writes {
                thread_id,
                checkpoint_ns,
                checkpoint_id,
                writes,
            } => {
                self.counts.pending_writes += writes.len() as u64;
                let d = self.threads.entry(thread_id.clone()).or_default();
                if d.checkpoints == 0 && d.writes == 0 {
                    self.counts.threads += 1;
                }
                d.writes_hash.str(checkpoint_ns);
                d.writes_hash.str(checkpoint_id);
                for w in writes {
                    d.writes += 1;
                    d.writes_hash.value(&encode(serde_json::to_value(w))?);
                }
            }
        }
        Ok(())
    }
}

/// FNV-1a 64 over a canonical, self-delimiting encoding of JSON values.
impl Fnv {
    fn of(v: &Value) -> u64 {
        let mut h = Fnv::default();
        h.value(v);
        h.finish()
    }

    fn u64(&mut self, n: u64) {
        self.bytes(&n.to_le_bytes());
    }

    fn opt(&mut self, n: Option<u64>) {
        match n {
            None => self.bytes(b"-"),
            Some(n) => {
                self.bytes(b"+");
                self.u64(n);
            }
        }
    }

    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.bytes(b"n"),
            Value::Bool(b) => self.bytes(if *b { b"t" } else { b"f" }),
            Value::Number(n) => {
                self.bytes(b"#");
                let text = if let Some(i) = n.as_i64() {
                    i.to_string()
                } else if let Some(u) = n.as_u64() {
                    u.to_string()
                } else {
                    match n.as_f64() {
                        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => (f as i64).to_string(),
                        Some(f) => f.to_string(),
                        None => n.to_string(),
                    }
                };
                self.str(&text);
            }
            Value::String(s) => {
                self.bytes(b"\"");
                self.str(s);
            }
            Value::Array(items) => {
                self.bytes(b"[");
                self.u64(items.len() as u64);
                for item in items {
                    self.value(item);
                }
            }
            Value::Object(map) => {
                self.bytes(b"{");
                self.u64(map.len() as u64);
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                for k in keys {
                    self.str(k);
                    self.value(&map[k]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn checksum_ignores_key_order_and_integral_float_form() {
        let a = json!({"a": 1, "b": [1.0, "x", null]});
        let mut m = serde_json::Map::new();
        m.insert("b".into(), json!([1, "x", null]));
        m.insert("a".into(), json!(1.0));
        assert_eq!(Fnv::of(&a), Fnv::of(&Value::Object(m)));
        assert_ne!(Fnv::of(&json!(["ab", "c"])), Fnv::of(&json!(["a", "bc"])));
        assert_ne!(Fnv::of(&json!(0.5)), Fnv::of(&json!(0.25)));
    }
}
