//! How a [`Source`] reads: the queue of work a walk has ahead, and each step of it, each
//! listing page confirmed so that a short page is not taken for the end.

use std::collections::VecDeque;

use crate::error::{Result, StorageError};
use crate::model::{Checkpoint, CheckpointFilter, SessionQuery};
use crate::storage::StorageBackend;
use crate::validate::MAX_LIMIT;

use super::{Phase, Position, Record, Source};

/// Reads of a history's end that may disagree with its latest message before the walk
/// gives up on the source.
const END_CHECKS: u32 = 3;

/// What the walk reads next. A listing page whose cursor says "last page" is confirmed by
/// one more read after it: a failover layer may serve a page from a fallback holding
/// less, and its "last page" would end the walk early.
pub(super) enum Work {
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
pub(super) enum Unit {
    Session,
    TaskContext,
    Thread,
}

impl Source<'_> {
    fn push_front(&mut self, items: Vec<Work>) {
        for w in items.into_iter().rev() {
            self.work.push_front(w);
        }
    }

    pub(super) async fn step(
        &mut self,
        work: Work,
        space: usize,
        out: &mut Vec<Record>,
    ) -> Result<()> {
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
