//! Comparing two stores: [`verify`], its report, and the per-session and per-thread
//! digests it compares, hashed with FNV-1a over a canonical encoding of JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::fnv::Fnv;
use crate::ops::transfer::{Record, Scope, Source};
use crate::storage::StorageBackend;

use super::{fallback_reads, incomplete_read};

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
