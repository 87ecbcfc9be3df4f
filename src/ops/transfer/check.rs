//! The checks of an import: each line read, decoded and checked against the input rules,
//! the order of histories and the trailer, before anything is applied.

use std::collections::HashMap;
use std::io::BufRead;

use chrono::{DateTime, Utc};

use crate::error::{Result, StorageError};
use crate::fnv::Fnv;
use crate::validate::{self, MAX_LIMIT};

use super::format::record_kind;
use super::sink::{same_thread, task_writes};
use super::{
    io_error, ExportHeader, ExportTrailer, Record, TransferCounts, TransferOptions,
    CHECKSUM_ALGORITHM, FORMAT, FORMAT_VERSION,
};

// Only doc links name these, so only doc builds import them.
#[cfg(doc)]
use super::{import, Sink};
#[cfg(doc)]
use crate::model::now;

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

fn format_error(line: u64, message: String) -> StorageError {
    StorageError::Serialization {
        message: format!("line {line}: {message}"),
        source: None,
    }
}

/// Reads an export line by line and checks it (see [`import`]): yields its content
/// records, checked and with timestamps in microseconds, and ends only once the trailer
/// has matched.
pub(super) struct Checker {
    accept_v1: bool,
    /// The number of the last line read (blank ones included).
    line: u64,
    /// Non-blank lines before the trailer, and the checksum of them.
    lines: u64,
    checksum: Fnv,
    /// Items read so far.
    pub(super) counts: TransferCounts,
    pub(super) header: Option<ExportHeader>,
    trailer_line: Option<u64>,
    /// The last non-blank line and what it held, for the message of a truncated file.
    last: (u64, &'static str),
    /// For each session whose record was read: the offset its history has reached.
    histories: HashMap<String, u64>,
}

impl Checker {
    pub(super) fn new(options: &TransferOptions) -> Self {
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
    pub(super) fn next_record<R: BufRead>(
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
