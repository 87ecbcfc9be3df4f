//! [`export`]: a [`Source`] written out as JSON lines, between a header and a trailer.

use std::io::Write;

use crate::error::Result;
use crate::fnv::Fnv;
use crate::model::now;
use crate::ops::migrate::{fallback_reads, incomplete_read};
use crate::storage::StorageBackend;

use super::format::write_line;
use super::{
    io_error, ExportHeader, ExportTrailer, Record, Scope, Source, TransferCounts, TransferOptions,
    CHECKSUM_ALGORITHM, FORMAT, FORMAT_VERSION,
};

// Only doc links name these, so only doc builds import them.
#[cfg(doc)]
use super::import;

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
    let fallback_before = fallback_reads(source).await?;
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
    let answered = fallback_reads(source).await? - fallback_before;
    if answered > 0 {
        return Err(incomplete_read(answered, "export"));
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
