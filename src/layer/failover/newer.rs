//! Replay against a primary that other processes write to: before an entry is sent,
//! what the primary already holds newer than it, as far as the contract can tell.
//!
//! An entry carries when it was acknowledged. A record's version on the primary is the
//! one timestamp the contract gives it: a session's `updated_at` (moved by every create,
//! update, end and message), a checkpoint's `created_at` (when its id was first stored),
//! a thread's newest checkpoint's. A version later than the entry means someone wrote
//! the record after the entry was acknowledged, and a keyed write of the entry would
//! overwrite it: that part is left out.
//!
//! The replay's own writes move those timestamps too, to the time of the replay, which
//! would make a later entry for the same record look older than what the primary holds.
//! So the replay keeps a *mark* per record it wrote: the window of its write (the
//! timestamp a backend gives a write lies between the clock read before the call and the
//! one after) and the time its data stands for (`as_of`, the newest entry or other
//! writer's version it holds). A version inside a mark's window is the replay's own and
//! counts as `as_of`. Marks last until the queue is empty.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::breaker::FailoverState;
use super::replay::Hint;
use super::route::{bounded, primary_limit};
use super::FailoverConfig;
use crate::error::Result;
use crate::layer::Operation;
use crate::model::{Checkpoint, Session, SessionUpdate};
use crate::storage::StorageBackend;

/// Microseconds since the Unix epoch: the precision of the contract's timestamps.
pub(super) type Micros = i64;

/// The clock the contract's timestamps come from, in [`Micros`].
pub(super) fn now_us() -> Micros {
    crate::model::now().timestamp_micros()
}

/// What the replay remembers of a record it wrote: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(super) struct Mark {
    pub(super) from: Micros,
    pub(super) to: Micros,
    pub(super) as_of: Micros,
}

/// Marks by record key, ordered so that a thread's marks are found by prefix.
pub(super) type Marks = BTreeMap<String, Mark>;

// Each id in a key is preceded by its length, so no key is a prefix of another
// record's, and a thread's prefix matches its own namespaces only.
fn session_key(id: &str) -> String {
    format!("s:{}:{id}", id.len())
}

fn checkpoint_key(thread: &str, ns: &str, id: &str) -> String {
    format!(
        "c:{}:{thread}:{}:{ns}:{}:{id}",
        thread.len(),
        ns.len(),
        id.len()
    )
}

fn thread_prefix(thread: &str) -> String {
    format!("l:{}:{thread}:", thread.len())
}

/// The newest checkpoint of a thread's namespace: what a `delete_thread` would remove.
fn latest_key(thread: &str, ns: &str) -> String {
    format!("{}{}:{ns}", thread_prefix(thread), ns.len())
}

/// The end of the key range starting with `prefix`: what follows a prefix is a digit
/// (a length) or nothing, never the last character.
pub(super) fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

impl Hint {
    /// The key prefixes of the marks [`plan`] needs for this entry.
    pub(super) fn mark_prefixes(&self) -> Vec<String> {
        match self {
            Hint::CreateSession(s) => vec![session_key(&s.session_id)],
            Hint::UpdateSession(id, _)
            | Hint::EndSession(id, _)
            | Hint::DeleteSession(id)
            | Hint::AddMessage(id, _) => vec![session_key(id)],
            Hint::BatchCreateSessions(s) => s.iter().map(|s| session_key(&s.session_id)).collect(),
            Hint::RestoreSessions(s) => s.iter().map(|s| session_key(&s.session_id)).collect(),
            Hint::BatchAddMessages(m) => m.iter().map(|(id, _)| session_key(id)).collect(),
            Hint::StoreCheckpoint(c) => vec![
                checkpoint_key(&c.thread_id, &c.checkpoint_ns, &c.checkpoint_id),
                latest_key(&c.thread_id, &c.checkpoint_ns),
            ],
            Hint::RestoreCheckpoints(c) => c
                .iter()
                .map(|c| checkpoint_key(&c.thread_id, &c.checkpoint_ns, &c.checkpoint_id))
                .collect(),
            Hint::DeleteThread(t) => vec![thread_prefix(t)],
            Hint::PutWrites(_)
            | Hint::BatchPutWrites(_)
            | Hint::StoreTaskContext(..)
            | Hint::Cleanup(_)
            | Hint::RestoreMessages(..) => Vec::new(),
        }
    }
}

/// The marks of `marks` under any of `prefixes`.
pub(super) fn marks_under(marks: &Marks, prefixes: &[String]) -> Marks {
    let mut found = Marks::new();
    for p in prefixes {
        for (k, m) in marks.range(p.clone()..prefix_end(p)) {
            found.insert(k.clone(), *m);
        }
    }
    found
}

/// What to send for an entry.
pub(super) enum Payload {
    /// The entry as it is.
    Whole,
    /// Only part of it (or, for a cleanup, the entry as of its acknowledgement).
    Part(Hint),
    /// Nothing: the primary holds newer data for all of it.
    Nothing,
}

/// How to replay one entry.
pub(super) struct Plan {
    pub(super) send: Payload,
    /// Records whose keyed data was left out as older than the primary's.
    pub(super) skipped: u64,
    /// The records the send writes with the replay's clock, and the time their data
    /// stands for once it is done: marked once the send succeeds.
    touched: Vec<(String, Micros)>,
}

impl Plan {
    fn whole(touched: Vec<(String, Micros)>) -> Plan {
        Plan {
            send: Payload::Whole,
            skipped: 0,
            touched,
        }
    }

    fn nothing(skipped: u64) -> Plan {
        Plan {
            send: Payload::Nothing,
            skipped,
            touched: Vec::new(),
        }
    }

    /// The marks to keep once the send succeeded, sent between `from` and `to`.
    pub(super) fn marks(self, from: Micros, to: Micros) -> Vec<(String, Mark)> {
        self.touched
            .into_iter()
            .map(|(key, as_of)| (key, Mark { from, to, as_of }))
            .collect()
    }
}

/// Reads what the primary holds for `hint`'s records and decides what of it to send.
/// `acked`: when the entry was acknowledged. An `Err` is the primary failing
/// transiently: nothing was sent, the entry waits. A read the primary refuses for good
/// (a record it cannot decode) tells nothing, and the entry is sent whole.
pub(super) async fn plan(
    primary: &dyn StorageBackend,
    state: &FailoverState,
    config: &FailoverConfig,
    hint: &Hint,
    acked: Micros,
    marks: &Marks,
) -> Result<Plan> {
    let reader = Reader {
        primary,
        state,
        config,
        marks,
    };
    match reader.plan(hint, acked).await {
        Err(e) if !e.is_transient() => {
            tracing::debug!(error = %e, "failover: could not read what a replayed write replaces");
            Ok(Plan::whole(Vec::new()))
        }
        other => other,
    }
}

struct Reader<'a> {
    primary: &'a dyn StorageBackend,
    state: &'a FailoverState,
    config: &'a FailoverConfig,
    marks: &'a Marks,
}

impl Reader<'_> {
    /// The time the data of record `key` stands for, given the primary's timestamp of it.
    fn version(&self, key: &str, at: Micros) -> Micros {
        match self.marks.get(key) {
            Some(m) if m.from <= at && at <= m.to => m.as_of,
            _ => at,
        }
    }

    async fn read<T>(
        &self,
        operation: Operation,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let limit = primary_limit(self.config, operation);
        bounded(self.state, limit, operation, call).await
    }

    /// The versions of sessions `ids` on the primary (`None`: it has no such session).
    async fn sessions(&self, ids: &[&str]) -> Result<Vec<Option<Micros>>> {
        let found: Vec<Option<Session>> = match ids {
            [id] => {
                let one = self.primary.get_session(id);
                vec![self.read(Operation::GetSession, one).await?]
            }
            _ => {
                let ids: Vec<String> = ids.iter().map(|&id| id.to_owned()).collect();
                let many = self.primary.batch_get_sessions(&ids);
                self.read(Operation::BatchGetSessions, many).await?
            }
        };
        Ok(found
            .into_iter()
            .map(|s| {
                s.map(|s| {
                    self.version(&session_key(&s.session_id), s.updated_at.timestamp_micros())
                })
            })
            .collect())
    }

    async fn session(&self, id: &str) -> Result<Option<Micros>> {
        Ok(self.sessions(&[id]).await?.pop().flatten())
    }

    async fn checkpoint(&self, thread: &str, ns: &str, id: Option<&str>) -> Result<Option<Micros>> {
        let get = self.primary.get_checkpoint(thread, ns, id);
        let found: Option<Checkpoint> = self.read(Operation::GetCheckpoint, get).await?;
        Ok(found.map(|c| {
            let key = match id {
                Some(id) => checkpoint_key(thread, ns, id),
                None => latest_key(thread, ns),
            };
            self.version(&key, c.created_at.timestamp_micros())
        }))
    }

    async fn plan(&self, hint: &Hint, acked: Micros) -> Result<Plan> {
        let newer = |v: Option<Micros>| v.is_some_and(|v| v > acked);
        Ok(match hint {
            Hint::CreateSession(s) => {
                if newer(self.session(&s.session_id).await?) {
                    note_skip("create_session", &s.session_id);
                    Plan::nothing(1)
                } else {
                    Plan::whole(vec![(session_key(&s.session_id), acked)])
                }
            }
            Hint::UpdateSession(id, u) => {
                let v = self.session(id).await?;
                if !newer(v) {
                    return Ok(Plan::whole(vec![(session_key(id), acked)]));
                }
                note_skip("update_session", id);
                let counters = SessionUpdate {
                    add_requests: u.add_requests,
                    add_processing_time: u.add_processing_time,
                    add_errors: u.add_errors,
                    ..SessionUpdate::default()
                };
                if counters == SessionUpdate::default() {
                    return Ok(Plan::nothing(1));
                }
                // Counts add up whatever was written since: they are always owed.
                Plan {
                    send: Payload::Part(Hint::UpdateSession(id.clone(), counters)),
                    skipped: 1,
                    touched: vec![(session_key(id), v.unwrap_or(acked))],
                }
            }
            Hint::EndSession(id, _) | Hint::DeleteSession(id) => {
                if newer(self.session(id).await?) {
                    note_skip(hint.operation().as_str(), id);
                    Plan::nothing(1)
                } else {
                    Plan::whole(vec![(session_key(id), acked)])
                }
            }
            Hint::BatchCreateSessions(list) => {
                let kept = self.older_sessions(list, |s| &s.session_id, acked).await?;
                let touched = kept
                    .iter()
                    .map(|s| (session_key(&s.session_id), acked))
                    .collect();
                let skipped = (list.len() - kept.len()) as u64;
                partial(
                    kept,
                    list.len(),
                    Hint::BatchCreateSessions,
                    skipped,
                    touched,
                )
            }
            Hint::RestoreSessions(list) => {
                // Restored as given, timestamps too: nothing of the replay's clock to mark.
                let kept = self.older_sessions(list, |s| &s.session_id, acked).await?;
                let skipped = (list.len() - kept.len()) as u64;
                partial(kept, list.len(), Hint::RestoreSessions, skipped, Vec::new())
            }
            Hint::AddMessage(id, _) => {
                // Appended whatever the session holds; what it stands for afterwards is
                // the newer of the two, for the entries after this one.
                let v = self.session(id).await?;
                Plan::whole(vec![(session_key(id), v.unwrap_or(acked).max(acked))])
            }
            Hint::BatchAddMessages(list) => {
                let mut ids: Vec<&str> = list.iter().map(|(id, _)| id.as_str()).collect();
                let mut seen = HashSet::new();
                ids.retain(|id| seen.insert(*id));
                let versions = self.sessions(&ids).await?;
                let touched = ids
                    .iter()
                    .zip(versions)
                    .map(|(id, v)| (session_key(id), v.unwrap_or(acked).max(acked)))
                    .collect();
                Plan::whole(touched)
            }
            Hint::StoreCheckpoint(c) => {
                let (t, ns, id) = (&c.thread_id, &c.checkpoint_ns, &c.checkpoint_id);
                match self.checkpoint(t, ns, Some(id)).await? {
                    // Stored again in place; `created_at` stays, so there is no mark.
                    Some(v) if v > acked => {
                        note_skip("store_checkpoint", id);
                        Plan::nothing(1)
                    }
                    Some(_) => Plan::whole(Vec::new()),
                    // A new id becomes the thread's newest.
                    None => {
                        let latest = self.checkpoint(t, ns, None).await?;
                        Plan::whole(vec![
                            (checkpoint_key(t, ns, id), acked),
                            (latest_key(t, ns), latest.unwrap_or(acked).max(acked)),
                        ])
                    }
                }
            }
            Hint::RestoreCheckpoints(list) => {
                let mut kept = Vec::with_capacity(list.len());
                for c in list {
                    let (t, ns, id) = (&c.thread_id, &c.checkpoint_ns, &c.checkpoint_id);
                    if newer(self.checkpoint(t, ns, Some(id)).await?) {
                        note_skip("restore_checkpoints", id);
                    } else {
                        kept.push(c.clone());
                    }
                }
                let skipped = (list.len() - kept.len()) as u64;
                partial(
                    kept,
                    list.len(),
                    Hint::RestoreCheckpoints,
                    skipped,
                    Vec::new(),
                )
            }
            Hint::DeleteThread(t) => {
                let list = self.primary.list_checkpoint_namespaces(t);
                let namespaces = self.read(Operation::ListCheckpointNamespaces, list).await?;
                for ns in &namespaces {
                    if newer(self.checkpoint(t, ns, None).await?) {
                        // Deleting would take a checkpoint stored after the delete with it.
                        note_skip("delete_thread", t);
                        return Ok(Plan::nothing(1));
                    }
                }
                Plan::whole(Vec::new())
            }
            Hint::Cleanup(max_idle) => {
                // As of its acknowledgement: sessions idle that long then, not now. A
                // session written since (by anyone) is kept.
                let since = Duration::from_micros(now_us().saturating_sub(acked).max(0) as u64);
                Plan {
                    send: Payload::Part(Hint::Cleanup(max_idle.saturating_add(since))),
                    skipped: 0,
                    touched: Vec::new(),
                }
            }
            // Appends by id, and records the contract gives no time: sent as they are.
            Hint::PutWrites(_)
            | Hint::BatchPutWrites(_)
            | Hint::StoreTaskContext(..)
            | Hint::RestoreMessages(..) => Plan::whole(Vec::new()),
        })
    }

    /// The sessions of `list` the primary holds nothing newer of.
    async fn older_sessions<T: Clone>(
        &self,
        list: &[T],
        id: impl Fn(&T) -> &String,
        acked: Micros,
    ) -> Result<Vec<T>> {
        let ids: Vec<&str> = list.iter().map(|s| id(s).as_str()).collect();
        let versions = self.sessions(&ids).await?;
        let mut kept = Vec::with_capacity(list.len());
        for (s, v) in list.iter().zip(versions) {
            if v.is_some_and(|v| v > acked) {
                note_skip("a batch of sessions", id(s));
            } else {
                kept.push(s.clone());
            }
        }
        Ok(kept)
    }
}

/// The plan for a batch of which `kept` is left out of `all` records.
fn partial<T>(
    kept: Vec<T>,
    all: usize,
    hint: impl FnOnce(Vec<T>) -> Hint,
    skipped: u64,
    touched: Vec<(String, Micros)>,
) -> Plan {
    let send = if kept.is_empty() {
        Payload::Nothing
    } else if kept.len() == all {
        Payload::Whole
    } else {
        Payload::Part(hint(kept))
    };
    Plan {
        send,
        skipped,
        touched,
    }
}

fn note_skip(operation: &str, id: &str) {
    tracing::warn!(
        operation,
        key = %id,
        "failover: the primary holds a newer version than a replayed write; that write is not replayed"
    );
}
