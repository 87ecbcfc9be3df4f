//! The Redis key layout.
//!
//! Every key starts with the configured prefix (default `aiecs:`). All keys of one
//! session share the hash tag `{s:<id>}` and all keys of one thread the tag `{t:<id>}`,
//! so each lives in one cluster slot and multi-key steps can run as one Lua script.
//! Ids are escaped (`%` `{` `}` `:` become `%25` `%7B` `%7D` `%3A`) so a caller's id can
//! neither end a hash tag early nor make two different keys collide.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `P{s:ID}:session` | hash | session fields; metadata key `k` as field `m:k` (JSON) |
//! | `P{s:ID}:messages` | list | messages as JSON, oldest first (RPUSH) |
//! | `P{s:ID}:message_ids` | set | ids already appended (dedupe) |
//! | `P{s:ID}:context` | string | task context JSON |
//! | `P{idx:N}:sessions_by_update` | sorted set | session id by last update (16 buckets) |
//! | `P{idx:N}:sessions_by_id` | sorted set | session ids, score 0: read by id (16 buckets) |
//! | `P{cidx:N}:contexts_by_id` | sorted set | session ids holding a task context, score 0 (16 buckets) |
//! | `P{tidx:N}:threads_by_id` | sorted set | thread ids holding checkpoints or writes, score 0 (16 buckets) |
//! | `P{t:ID}:seq` | string | per-thread sequence: store order of checkpoints and writes |
//! | `P{t:ID}:keys` | set | every other key of the thread, for `delete_thread` |
//! | `P{t:ID}:ns:NS:order` | sorted set | checkpoint id by sequence |
//! | `P{t:ID}:ns:NS:checkpoints` | hash | `r:<id>` record JSON, `c:<id>` created_at |
//! | `P{t:ID}:ns:NS:writes:CP:order` | sorted set | `task\nidx` by sequence |
//! | `P{t:ID}:ns:NS:writes:CP:values` | hash | `task\nidx` -> pending write JSON |
//!
//! The `_by_id` indexes hold every member at score 0, so `ZRANGE BYLEX` reads them in
//! id order from a cursor: a listing page costs O(log n + page), not a read of the
//! whole index. Earlier versions kept the context and thread indexes as plain sets
//! (`P{cidx:N}:contexts`, `P{tidx:N}:threads`) and sessions had no id index; a backend
//! moves such a store to this layout when it connects ([`Index::upgrade_keys`]).

use std::borrow::Cow;

use crate::feed::Change;

/// Buckets of the cleanup index: spread over slots, hence over every cluster master.
pub const INDEX_BUCKETS: u32 = 16;

/// Escapes the characters that would end a hash tag or split a key component.
pub fn escape(id: &str) -> Cow<'_, str> {
    if !id.contains(['%', '{', '}', ':']) {
        return Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Reverses [`escape`].
pub fn unescape(escaped: &str) -> String {
    escaped
        .replace("%7B", "{")
        .replace("%7D", "}")
        .replace("%3A", ":")
        .replace("%25", "%")
}

/// What a write to `key` touched: the session, task context or thread whose hash tag
/// it carries; `None` for any other key (an index, another prefix's). Escaped ids hold
/// no `}` or `:`, so the first `}` ends the tag.
pub fn change_of(prefix: &str, key: &str) -> Option<Change> {
    let tag = key.strip_prefix(prefix)?.strip_prefix('{')?;
    let (tag, rest) = tag.split_once('}')?;
    let (kind, escaped) = tag.split_once(':')?;
    match (kind, rest) {
        ("s", ":context") => Some(Change::TaskContext(unescape(escaped))),
        ("s", _) => Some(Change::Session(unescape(escaped))),
        ("t", _) => Some(Change::Thread(unescape(escaped))),
        _ => None,
    }
}

/// The four keys of a session, in the order the Lua scripts expect them.
pub struct SessionKeys {
    /// The session hash.
    pub session: String,
    /// The message list.
    pub messages: String,
    /// The set of message ids.
    pub message_ids: String,
    /// The task context.
    pub context: String,
}

impl SessionKeys {
    /// The keys of `session_id` under `prefix`.
    pub fn new(prefix: &str, session_id: &str) -> Self {
        let base = Self::base(prefix, session_id);
        SessionKeys {
            session: format!("{base}:session"),
            messages: format!("{base}:messages"),
            message_ids: format!("{base}:message_ids"),
            context: format!("{base}:context"),
        }
    }

    fn base(prefix: &str, session_id: &str) -> String {
        format!("{prefix}{{s:{}}}", escape(session_id))
    }

    /// Only the session hash's key, for reads that need no other (one allocation
    /// instead of five).
    pub fn session_key(prefix: &str, session_id: &str) -> String {
        let mut key = Self::base(prefix, session_id);
        key.push_str(":session");
        key
    }

    /// All four, as script KEYS.
    pub fn all(&self) -> [&str; 4] {
        [
            &self.session,
            &self.messages,
            &self.message_ids,
            &self.context,
        ]
    }
}

/// The indexes that let cleanup, listing, metrics and migration find records without
/// `KEYS` or `SCAN`. Each is split into [`INDEX_BUCKETS`] keys with their own hash tags,
/// so in a cluster they spread over every master.
#[derive(Clone, Copy)]
pub enum Index {
    /// Sessions by last update (a sorted set scored by `updated_at`): cleanup's.
    Sessions,
    /// Session ids (a sorted set, every score 0): listing's. Same buckets and hash tags
    /// as [`Index::Sessions`], so one script updates both.
    SessionIds,
    /// Session ids with a task context (a sorted set, every score 0).
    Contexts,
    /// Thread ids with checkpoints or writes (a sorted set, every score 0).
    Threads,
}

impl Index {
    /// The bucket key of `id`: FNV-1a of the id, stable across processes and versions
    /// (unlike std's hasher).
    pub fn key_of(self, prefix: &str, id: &str) -> String {
        let mut hash: u32 = 0x811c_9dc5;
        for b in id.bytes() {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        self.bucket(prefix, hash % INDEX_BUCKETS)
    }

    /// The key of bucket `n`.
    pub fn bucket(self, prefix: &str, n: u32) -> String {
        match self {
            Index::Sessions => format!("{prefix}{{idx:{n}}}:sessions_by_update"),
            Index::SessionIds => format!("{prefix}{{idx:{n}}}:sessions_by_id"),
            Index::Contexts => format!("{prefix}{{cidx:{n}}}:contexts_by_id"),
            Index::Threads => format!("{prefix}{{tidx:{n}}}:threads_by_id"),
        }
    }

    /// The KEYS of bucket `n`'s upgrade script (see [`super::scripts::UPGRADE_INDEX`]):
    /// where an older layout kept the ids, then this bucket's key. Empty for
    /// [`Index::Sessions`], which did not change.
    pub fn upgrade_keys(self, prefix: &str, n: u32) -> Vec<String> {
        let old = match self {
            Index::Sessions => return Vec::new(),
            Index::SessionIds => Index::Sessions.bucket(prefix, n),
            Index::Contexts => format!("{prefix}{{cidx:{n}}}:contexts"),
            Index::Threads => format!("{prefix}{{tidx:{n}}}:threads"),
        };
        vec![old, self.bucket(prefix, n)]
    }

    /// Every bucket key.
    pub fn buckets(self, prefix: &str) -> impl Iterator<Item = String> + '_ {
        (0..INDEX_BUCKETS).map(move |n| self.bucket(prefix, n))
    }
}

/// Keys of one thread and namespace.
pub struct ThreadKeys {
    base: String,
    ns: String,
}

impl ThreadKeys {
    /// The keys of `thread_id` and `checkpoint_ns` under `prefix`.
    pub fn new(prefix: &str, thread_id: &str, checkpoint_ns: &str) -> Self {
        let base = format!("{prefix}{{t:{}}}", escape(thread_id));
        let ns = format!("{base}:ns:{}", escape(checkpoint_ns));
        ThreadKeys { base, ns }
    }

    /// The namespace a key of this thread's registry belongs to, if it is one.
    pub fn namespace_of(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&self.base)?.strip_prefix(":ns:")?;
        let escaped = rest.split(':').next()?;
        Some(unescape(escaped))
    }

    /// The checkpoint whose pending writes a key of this thread's registry orders, if
    /// it is one in this namespace.
    pub fn writes_checkpoint_of(&self, key: &str) -> Option<String> {
        let escaped = key
            .strip_prefix(&self.ns)?
            .strip_prefix(":writes:")?
            .strip_suffix(":order")?;
        Some(unescape(escaped))
    }

    /// The per-thread sequence.
    pub fn seq(&self) -> String {
        format!("{}:seq", self.base)
    }

    /// The registry of the thread's keys.
    pub fn registry(&self) -> String {
        format!("{}:keys", self.base)
    }

    /// Checkpoint ids by sequence.
    pub fn order(&self) -> String {
        format!("{}:order", self.ns)
    }

    /// Checkpoint records.
    pub fn checkpoints(&self) -> String {
        format!("{}:checkpoints", self.ns)
    }

    /// Pending writes of `checkpoint_id`: (order, values).
    pub fn writes(&self, checkpoint_id: &str) -> (String, String) {
        let w = format!("{}:writes:{}", self.ns, escape(checkpoint_id));
        (format!("{w}:order"), format!("{w}:values"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_break_tags_or_collide() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a}b{c:d%"), "a%7Db%7Bc%3Ad%25");
        let a = ThreadKeys::new("p:", "a", "b:w:c");
        let b = ThreadKeys::new("p:", "a:ns:b", "w:c");
        assert_ne!(a.order(), b.order());
        assert_ne!(
            a.writes("x").1,
            ThreadKeys::new("p:", "a", "b").writes("w:x").1
        );
        let s = SessionKeys::new("p:", "x}y");
        assert_eq!(s.session, "p:{s:x%7Dy}:session");
        for id in ["a}b{c:d%", "%7B", "plain", ""] {
            assert_eq!(unescape(&escape(id)), id);
        }
        let t = ThreadKeys::new("p:", "t", "n:s");
        assert_eq!(t.namespace_of(&t.checkpoints()).as_deref(), Some("n:s"));
        assert_eq!(t.namespace_of(&t.writes("c").1).as_deref(), Some("n:s"));
        assert_eq!(t.namespace_of(&t.seq()), None);
    }

    #[test]
    fn index_buckets_are_stable() {
        let key = |id: &str| Index::Sessions.key_of("p:", id);
        assert_eq!(key("session-1"), key("session-1"));
        let buckets: std::collections::HashSet<String> =
            (0..200).map(|i| key(&format!("s{i}"))).collect();
        assert_eq!(buckets.len(), INDEX_BUCKETS as usize);
        // The two session indexes of one id share a slot: one script writes both.
        let tag = |key: String| key[..key.find('}').unwrap() + 1].to_owned();
        assert_eq!(
            tag(Index::Sessions.key_of("p:", "x")),
            tag(Index::SessionIds.key_of("p:", "x"))
        );
    }
}
