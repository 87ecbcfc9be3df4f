//! [`import`], [`import_stream`] and [`check_export`]: an export read back, checked, and
//! applied through a [`Sink`].

use std::io::{BufRead, Seek, SeekFrom};

use crate::error::{Result, StorageError};
use crate::storage::StorageBackend;

use super::check::Checker;
use super::{
    check_batch_size, io_error, ExportHeader, Record, Sink, TransferCounts, TransferOptions,
};

// Only doc links name these, so only doc builds import them.
#[cfg(doc)]
use super::FORMAT;

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
