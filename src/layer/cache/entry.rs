//! What the cache holds: keys, values with their generation stamps, and their weight.

use std::sync::Arc;

use serde_json::Value;

use super::{ENTRY_OVERHEAD, STRIPES};
use crate::model::{Checkpoint, Session};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    Session(String),
    Context(String),
    Checkpoint {
        thread: String,
        ns: String,
        /// `None`: the latest of the thread and namespace.
        id: Option<String>,
    },
}

impl Key {
    pub(super) fn checkpoint(thread: &str, ns: &str, id: Option<&str>) -> Key {
        Key::Checkpoint {
            thread: thread.to_owned(),
            ns: ns.to_owned(),
            id: id.map(str::to_owned),
        }
    }

    /// The id whose writes change the entry: the session, or the checkpoint's thread.
    pub(super) fn owner(&self) -> &str {
        match self {
            Key::Session(id) | Key::Context(id) => id,
            Key::Checkpoint { thread, .. } => thread,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) enum CachedValue {
    Session(Option<Session>),
    Context(Option<Value>),
    Checkpoint(Option<Checkpoint>),
}

/// The generations an entry was loaded under: the global epoch (bumped by cleanup,
/// initialize and close) and its owner's stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) epoch: u64,
    pub(super) stripe: u64,
}

impl Stamp {
    /// Whether a value loaded under `self` began its load after every write that had
    /// completed when `start` was read.
    pub(super) fn covers(self, start: Stamp) -> bool {
        self.epoch >= start.epoch && self.stripe >= start.stripe
    }
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) stamp: Stamp,
    pub(super) value: CachedValue,
}

/// A read result the cache can hold.
pub(super) trait Cacheable: Sized + Send + 'static {
    fn into_cached(self) -> CachedValue;
    fn from_cached(value: &CachedValue) -> Option<Self>;
}

/// Each cacheable read maps to one variant of [`CachedValue`].
macro_rules! cacheable {
    ($($ty:ty => $variant:ident),* $(,)?) => {$(
        impl Cacheable for $ty {
            fn into_cached(self) -> CachedValue {
                CachedValue::$variant(self)
            }
            fn from_cached(value: &CachedValue) -> Option<Self> {
                match value {
                    CachedValue::$variant(v) => Some(v.clone()),
                    _ => None,
                }
            }
        }
    )*};
}

cacheable!(
    Option<Session> => Session,
    Option<Value> => Context,
    Option<Checkpoint> => Checkpoint,
);

pub(super) fn weigh(key: &Key, entry: &Arc<Entry>) -> u32 {
    let value = match &entry.value {
        CachedValue::Session(v) => v.as_ref().map_or(0, heap::session),
        CachedValue::Context(v) => v.as_ref().map_or(0, heap::value),
        CachedValue::Checkpoint(v) => v.as_ref().map_or(0, heap::checkpoint),
    };
    u32::try_from(value + heap::key(key) + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
}

/// Estimates of the heap memory a cached value holds, so a byte bound bounds memory
/// rather than some encoding of it. Strings and vectors are blocks of their length;
/// maps are B-tree nodes. A block costs what glibc's malloc spends on it: its size plus
/// an 8-byte header, rounded up to 16 bytes, at least 32.
mod heap {
    use std::mem::size_of;

    use serde_json::{Map, Value};

    use super::Key;
    use crate::model::{Checkpoint, Session};

    /// Entries a B-tree node holds at most (std's `B - 1`).
    const NODE_CAPACITY: usize = 11;
    /// Entries per node on average: nodes split in half when full, so they run between
    /// half and completely full.
    const NODE_FILL: usize = 8;

    fn block(size: usize) -> usize {
        if size == 0 {
            0
        } else {
            ((size + 8 + 15) & !15).max(32)
        }
    }

    fn string(s: &str) -> usize {
        block(s.len())
    }

    pub(super) fn value(v: &Value) -> usize {
        match v {
            Value::String(s) => string(s),
            Value::Array(items) => {
                block(items.len() * size_of::<Value>()) + items.iter().map(value).sum::<usize>()
            }
            Value::Object(m) => map(m),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
    }

    pub(super) fn map(m: &Map<String, Value>) -> usize {
        if m.is_empty() {
            return 0;
        }
        let node = block(NODE_CAPACITY * (size_of::<String>() + size_of::<Value>()) + 16);
        m.len().div_ceil(NODE_FILL) * node
            + m.iter().map(|(k, v)| string(k) + value(v)).sum::<usize>()
    }

    pub(super) fn session(s: &Session) -> usize {
        string(&s.session_id) + string(&s.user_id) + string(&s.status) + map(&s.metadata)
    }

    pub(super) fn checkpoint(c: &Checkpoint) -> usize {
        string(&c.thread_id)
            + string(&c.checkpoint_ns)
            + string(&c.checkpoint_id)
            + c.parent_checkpoint_id.as_deref().map_or(0, string)
            + value(&c.data)
            + map(&c.metadata)
    }

    pub(super) fn key(k: &Key) -> usize {
        match k {
            Key::Session(id) | Key::Context(id) => string(id),
            Key::Checkpoint { thread, ns, id } => {
                string(thread) + string(ns) + id.as_deref().map_or(0, string)
            }
        }
    }
}

/// FNV-1a: a stable hash of an owner id onto a stripe.
pub(super) fn stripe_of(owner: &str) -> usize {
    (crate::fnv::Fnv::hash(owner.as_bytes()) as usize) & (STRIPES - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_cover_only_later_generations() {
        let s = |epoch, stripe| Stamp { epoch, stripe };
        assert!(s(1, 5).covers(s(1, 5)));
        assert!(s(2, 6).covers(s(1, 5)));
        assert!(!s(1, 4).covers(s(1, 5)));
        assert!(!s(0, 9).covers(s(1, 5)));
    }

    #[test]
    fn stripes_are_stable_and_in_range() {
        assert_eq!(stripe_of("session-1"), stripe_of("session-1"));
        assert!(stripe_of("") < STRIPES);
        assert!(stripe_of("a long thread id") < STRIPES);
    }
}
