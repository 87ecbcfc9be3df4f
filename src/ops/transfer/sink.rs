//! The writing side: the [`Sink`] that applies records to a backend, and the
//! `put_writes` calls that restore a checkpoint's pending writes in their order.

use std::collections::HashMap;

use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::model::{Checkpoint, PendingWrite, Session, TaskWrites, WriteInput};
use crate::storage::StorageBackend;
use crate::validate::{self, MAX_LIMIT, MAX_VALUE_BYTES};

use super::{Record, TransferCounts};

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
pub(super) fn task_writes(
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

/// Every checkpoint of a [`Record::Checkpoints`] names the record's thread and namespace.
pub(super) fn same_thread(
    thread_id: &str,
    checkpoint_ns: &str,
    checkpoints: &[Checkpoint],
) -> Result<()> {
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
}
