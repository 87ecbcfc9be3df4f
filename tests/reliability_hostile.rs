//! Hostile input never breaks a backend, corrupted records are reported as such, and no
//! id can reach the query text or the key layout.
//!
//! 1. A corpus of hostile strings (empty, at and over the 256-byte id limit, NUL and
//!    control characters, `U+FFFD`, escaped-surrogate text, Redis glob and key
//!    separators, SQL metacharacters and injections, Unicode normalization twins, RTL
//!    marks, emoji, whitespace, newlines), hostile JSON (10 000 levels deep, at and over
//!    the depth and size limits, odd keys and escapes, extreme numbers) and hostile
//!    limits (0, `usize::MAX`, `u64::MAX`, batches over the limit) goes into every
//!    parameter of every method of the contract, on every backend (memory, sqlite, redis,
//!    redis_cluster, postgres). Each call either succeeds and its data reads back exactly,
//!    or fails with `InvalidInput` naming that parameter, as the documented input rules
//!    predict; anything else (a panic, another error kind, a rejected valid value, a
//!    changed value) fails the test. Ids that glob, LIKE or normalization would confuse
//!    are stored side by side and each reads back only its own data, and at the end the
//!    store holds nothing: no record leaked under a mangled id.
//! 2. Records corrupted behind the backend's back (truncated JSON and wrong-typed columns
//!    in SQLite, wrong-typed hash fields and non-JSON entries in Redis, wrong-shaped
//!    JSONB in PostgreSQL) are a `Serialization` error on every read that meets them,
//!    never a panic; a Redis key of the wrong type (the server's WRONGTYPE reply) is a
//!    permanent `Backend` error.
//! 3. Injection strings used as every id leave the SQLite and PostgreSQL tables intact;
//!    Redis keys hold ids only escaped inside their hash tag (checked on the keys the
//!    server actually has).
//!
//! Each test runs on a thread with a large stack: the 10 000-deep values are built,
//! compared and dropped recursively by serde_json, which a 2 MiB test thread may not hold.
//! Threads the crate starts itself (SQLite's connection threads) keep their default
//! stack, so a hostile value that reached one of them would still crash the test.

#[path = "common/mod.rs"]
mod common;
#[path = "conformance/targets.rs"]
#[allow(dead_code)]
mod targets;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::validate::{
    MAX_CONTENT_BYTES, MAX_ID_BYTES, MAX_JSON_DEPTH, MAX_LIMIT, MAX_METADATA_BYTES, MAX_VALUE_BYTES,
};
use aiecs_storage::{
    Checkpoint, CheckpointFilter, ErrorKind, Message, Metadata, NewCheckpoint, NewMessage,
    NewSession, PendingWrite, Result, Session, SessionMetrics, SessionQuery, SessionUpdate,
    StorageBackend, StorageError, TaskWrites, WriteInput,
};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

type B = Arc<dyn StorageBackend>;

/// Stack of the thread each test runs on (address space only; pages are touched on use).
const STACK_BYTES: usize = 512 << 20;

/// Runs `body` on a thread with a large stack and its own current-thread runtime.
fn on_big_stack<F, Fut>(name: &str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let handle = std::thread::Builder::new()
        .name(name.to_owned())
        .stack_size(STACK_BYTES)
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(body())
        })
        .expect("spawn the test thread");
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------

/// One hostile string and a printable label for it.
struct Hostile {
    label: String,
    s: String,
}

fn label_of(s: &str) -> String {
    if s.len() <= 48 {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(12).collect();
        format!("{head:?}...({} bytes)", s.len())
    }
}

fn corpus() -> Vec<Hostile> {
    let mut v: Vec<String> = [
        // empty, whitespace, newlines, control characters
        "",
        " ",
        "   ",
        "\u{3000}",
        "\u{00A0}",
        "a b",
        " a",
        "a ",
        "\t",
        "\n",
        "a\nb",
        "\r\n",
        "a\0b",
        "\0",
        "a\0",
        "\u{1}",
        "\u{7f}",
        "\u{85}",
        "\u{9b}",
        "\u{1b}[31mred\u{1b}[0m",
        // replacement char, escaped surrogates as text, BOM, separators
        "\u{FFFD}",
        "\\ud800",
        "\\udc00\\ud800",
        "\\u0000",
        "\u{FEFF}bom",
        "\u{2028}\u{2029}",
        "\u{10FFFF}",
        "\u{E000}",
        // Redis glob, hash-tag and key separators
        "*",
        "?",
        "[",
        "]",
        "[a-z]*",
        ":",
        "::",
        "{",
        "}",
        "{}",
        "}{",
        "{s:x}",
        "{t:x}",
        "{idx:0}",
        "a}:b{",
        "x}:session",
        "m:x",
        "%",
        "%25",
        "%7B",
        "%3A",
        "a%3Ab",
        // SQL metacharacters and injections
        "_",
        "a_",
        "a%",
        "'",
        "\"",
        "\\",
        "a\\b",
        "'; DROP TABLE sessions; --",
        "\" OR 1=1 --",
        "x'); DELETE FROM messages; --",
        "' OR '1'='1",
        "$1",
        "?1",
        "%s%n%x",
        "${jndi:ldap://x}",
        "<script>alert(1)</script>",
        "../../etc/passwd",
        "null",
        "[]",
        "{\"a\":1}",
        // Unicode: normalization twins, combining marks, RTL, zero width, emoji, case
        "\u{E9}",
        "e\u{301}",
        "\u{301}",
        "\u{200F}rtl",
        "\u{202E}override",
        "\u{200B}",
        "\u{1F600}",
        "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}",
        "\u{DF}",
        "\u{1E9E}",
        "A",
        "a",
        "ab",
        "a*",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // Lengths at and over the byte limit, in ASCII and multi-byte characters.
    v.push("x".repeat(MAX_ID_BYTES));
    v.push("x".repeat(MAX_ID_BYTES + 1));
    v.push("x".repeat(MAX_ID_BYTES - 1) + "\u{E9}");
    v.push("\u{1F600}".repeat(MAX_ID_BYTES / 4));
    v.push("\u{1F600}".repeat(MAX_ID_BYTES / 4 + 1));
    v.push("\u{E9}".repeat(MAX_ID_BYTES / 2));
    v.push("{".repeat(MAX_ID_BYTES));
    v.push("%".repeat(MAX_ID_BYTES));
    v.push("x".repeat(10_000));
    v.push("y".repeat(1 << 20));
    let mut seen = BTreeSet::new();
    v.retain(|s| seen.insert(s.clone()));
    v.into_iter()
        .map(|s| Hostile {
            label: label_of(&s),
            s,
        })
        .collect()
}

/// Nested arrays `depth` levels deep around `1`, built without recursion.
fn deep_array(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

fn deep_object(depth: usize) -> Value {
    let mut v = json!("leaf");
    for _ in 0..depth {
        let mut m = serde_json::Map::new();
        m.insert("k".into(), v);
        v = Value::Object(m);
    }
    v
}

fn deep_mixed(depth: usize) -> Value {
    let mut v = Value::Null;
    for i in 0..depth {
        v = if i % 2 == 0 {
            Value::Array(vec![v, json!(i)])
        } else {
            let mut m = serde_json::Map::new();
            m.insert(format!("{i}"), v);
            Value::Object(m)
        };
    }
    v
}

fn json_corpus() -> Vec<(String, Value)> {
    let escapes: Value =
        serde_json::from_str(r#""\ud83d\ude00 \u00e9 \u2028 \b\f\n\r\t \/ \" \\ \ufffd \u0001""#)
            .expect("escaped JSON text");
    let mut odd_keys = serde_json::Map::new();
    for k in [
        "", "$", "a.b", "[0]", "m:x", "'", "\"", "{s:x}", "*", "\n", "\\", "%", "_", "\u{FFFD}",
        "e\u{301}", "\u{E9}",
    ] {
        odd_keys.insert(k.to_owned(), json!(k));
    }
    let wide_object: serde_json::Map<String, Value> =
        (0..10_000).map(|i| (format!("key{i}"), json!(i))).collect();
    let mut nul_key = serde_json::Map::new();
    nul_key.insert("a\0".into(), json!(1));
    vec![
        ("json null".into(), Value::Null),
        ("json true".into(), json!(true)),
        ("json 0".into(), json!(0)),
        ("json u64::MAX".into(), json!(u64::MAX)),
        ("json i64::MIN".into(), json!(i64::MIN)),
        ("json 1.5".into(), json!(1.5)),
        ("json 1e300".into(), json!(1e300)),
        ("json f64::MIN_POSITIVE".into(), json!(f64::MIN_POSITIVE)),
        ("json 5e-324".into(), json!(5e-324)),
        ("json \"\"".into(), json!("")),
        ("json escapes".into(), escapes),
        (
            "json control chars".into(),
            json!("\u{1}\u{1f}\u{7f}\u{85}"),
        ),
        ("json NUL string".into(), json!("a\0b")),
        ("json NUL key".into(), Value::Object(nul_key)),
        ("json NUL deep".into(), json!({"a": [{"b": ["\0"]}]})),
        ("json odd keys".into(), Value::Object(odd_keys)),
        ("json []".into(), json!([])),
        ("json {}".into(), json!({})),
        (
            "json 10k-wide array".into(),
            Value::Array((0..10_000).map(|i| json!(i)).collect()),
        ),
        ("json 10k-key object".into(), Value::Object(wide_object)),
        (
            format!("json depth {}", MAX_JSON_DEPTH - 1),
            deep_array(MAX_JSON_DEPTH - 1),
        ),
        (
            format!("json depth {MAX_JSON_DEPTH}"),
            deep_array(MAX_JSON_DEPTH),
        ),
        (
            format!("json depth {}", MAX_JSON_DEPTH + 1),
            deep_array(MAX_JSON_DEPTH + 1),
        ),
        (
            format!("json object depth {MAX_JSON_DEPTH}"),
            deep_object(MAX_JSON_DEPTH),
        ),
        ("json 10000-deep arrays".into(), deep_array(10_000)),
        ("json 10000-deep objects".into(), deep_object(10_000)),
        ("json 10000-deep mixed".into(), deep_mixed(10_000)),
        // Serialized exactly at / one over the metadata limit once wrapped as {"k": v}.
        (
            "json string at metadata limit".into(),
            json!("m".repeat(MAX_METADATA_BYTES - 8)),
        ),
        (
            "json string over metadata limit".into(),
            json!("m".repeat(MAX_METADATA_BYTES - 7)),
        ),
        // Serialized exactly at / one over the value limit (16 MiB).
        (
            "json string at value limit".into(),
            json!("v".repeat(MAX_VALUE_BYTES - 2)),
        ),
        (
            "json string over value limit".into(),
            json!("v".repeat(MAX_VALUE_BYTES - 1)),
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// The oracle: the documented input rules, written independently of src/validate.rs
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Ok,
    Bad(&'static str),
}

impl Expect {
    fn is_ok(self) -> bool {
        self == Expect::Ok
    }
}

/// Ids, roles, statuses, channels: not empty, at most 256 bytes, no control character.
fn expect_id(s: &str, field: &'static str) -> Expect {
    if s.is_empty() {
        Expect::Bad(field)
    } else {
        expect_name(s, field)
    }
}

/// Checkpoint namespaces: like ids, but empty is the default namespace.
fn expect_name(s: &str, field: &'static str) -> Expect {
    if s.len() > MAX_ID_BYTES || s.chars().any(char::is_control) {
        Expect::Bad(field)
    } else {
        Expect::Ok
    }
}

/// Message content: at most 8 MiB and no NUL (other control characters are content).
fn expect_content(s: &str) -> Expect {
    if s.len() > MAX_CONTENT_BYTES || s.contains('\0') {
        Expect::Bad("content")
    } else {
        Expect::Ok
    }
}

/// Deepest container (the root container is depth 1, scalars 0) and whether any string or
/// key holds a NUL, without recursion.
fn json_facts(v: &Value) -> (usize, bool) {
    let mut stack = vec![(v, 1usize)];
    let (mut deepest, mut nul) = (0, false);
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(items) => {
                deepest = deepest.max(d);
                stack.extend(items.iter().map(|x| (x, d + 1)));
            }
            Value::Object(m) => {
                deepest = deepest.max(d);
                for (k, x) in m {
                    nul |= k.contains('\0');
                    stack.push((x, d + 1));
                }
            }
            Value::String(s) => nul |= s.contains('\0'),
            _ => {}
        }
    }
    (deepest, nul)
}

fn json_shape_ok(v: &Value) -> bool {
    let (depth, nul) = json_facts(v);
    depth <= MAX_JSON_DEPTH && !nul
}

fn serialized_len(v: &Value) -> usize {
    serde_json::to_vec(v).expect("serialize").len()
}

fn expect_md(m: &Metadata) -> Expect {
    let v = Value::Object(m.clone());
    let ok = json_shape_ok(&v) && serialized_len(&v) <= MAX_METADATA_BYTES;
    drop_deep(v);
    if ok {
        Expect::Ok
    } else {
        Expect::Bad("metadata")
    }
}

/// Drops a value without recursion (a 10 000-deep value would recurse that deep).
fn drop_deep(v: Value) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(m) => stack.extend(m.into_iter().map(|(_, x)| x)),
            _ => {}
        }
    }
}

fn obj(key: &str, v: Value) -> Metadata {
    let mut m = Metadata::new();
    m.insert(key.to_owned(), v);
    m
}

/// A fixed timestamp with microsecond precision (what every backend keeps).
fn ts(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(1_700_000_000_000_000 + n * 1_000_001).expect("timestamp")
}

fn write(channel: &str, v: Value) -> WriteInput {
    WriteInput::new(channel, v)
}

fn pending(task: &str, idx: u32, channel: &str, value: Value) -> PendingWrite {
    PendingWrite {
        task_id: task.to_owned(),
        idx,
        channel: channel.to_owned(),
        value,
    }
}

fn outcome<T>(r: &Result<T>) -> String {
    match r {
        Ok(_) => "Ok(..)".to_owned(),
        Err(e) => format!("Err({:?}: {e})", e.kind()),
    }
}

// ---------------------------------------------------------------------------------------
// The tally and the matrix run
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    inputs: BTreeSet<String>,
    calls: usize,
    read_back: usize,
    rejected: usize,
    fields: BTreeMap<&'static str, usize>,
}

struct Run {
    name: &'static str,
    b: B,
    t: Tally,
    n: usize,
    anchor: String,
    anchor_messages: usize,
    anchor_thread: String,
    anchor_writes: usize,
}

impl Run {
    async fn new(name: &'static str, b: B) -> Run {
        let anchor = "ok-anchor".to_owned();
        b.create_session(&anchor, "ok-anchor-user", &Metadata::new())
            .await
            .unwrap();
        Run {
            name,
            b,
            t: Tally::default(),
            n: 0,
            anchor,
            anchor_messages: 0,
            anchor_thread: "ok-anchor-thread".to_owned(),
            anchor_writes: 0,
        }
    }

    fn fresh(&mut self, kind: &str) -> String {
        self.n += 1;
        format!("ok-{kind}-{}", self.n)
    }

    /// Checks one call that carries a hostile input: `Ok` exactly when the rules accept
    /// the input, otherwise `InvalidInput` naming the expected field. Returns the value
    /// for the caller to compare with what was written.
    fn check<T>(&mut self, method: &str, input: &str, expect: Expect, r: Result<T>) -> Option<T> {
        self.t.calls += 1;
        match (expect, r) {
            (Expect::Ok, Ok(v)) => {
                self.t.read_back += 1;
                Some(v)
            }
            (Expect::Bad(want), Err(StorageError::InvalidInput { field, .. })) if field == want => {
                self.t.rejected += 1;
                *self.t.fields.entry(field).or_default() += 1;
                None
            }
            (expect, r) => panic!(
                "{}: {method} with {input}: expected {expect:?}, got {}",
                self.name,
                outcome(&r)
            ),
        }
    }

    /// A batch call's outer result, which hostile items must not fail.
    fn outer<T>(&self, method: &str, input: &str, r: Result<T>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => panic!(
                "{}: {method} with {input}: the whole batch failed: {:?}: {e}",
                self.name,
                e.kind()
            ),
        }
    }

    /// An item for the anchor session, sent in each batch beside the hostile item: one
    /// bad item must not fail the others.
    fn anchor_message(&mut self) -> (String, NewMessage) {
        self.anchor_messages += 1;
        let id = self.fresh("anchor-msg");
        (
            self.anchor.clone(),
            NewMessage::new("user", "anchor").with_id(id),
        )
    }

    fn anchor_writes(&mut self) -> TaskWrites {
        self.anchor_writes += 1;
        TaskWrites {
            thread_id: self.anchor_thread.clone(),
            checkpoint_ns: String::new(),
            checkpoint_id: "cp".into(),
            task_id: self.fresh("anchor-task"),
            writes: vec![write("ch", json!(1))],
        }
    }

    fn assert_anchor_ok<T: std::fmt::Debug>(&self, method: &str, input: &str, r: &Result<T>) {
        assert!(
            r.is_ok(),
            "{}: {method} with {input}: the valid item beside it failed: {}",
            self.name,
            outcome(r)
        );
    }

    // --- sessions, conversation, task context: the input as the session id -----------

    async fn as_session_id(&mut self, h: &Hostile) {
        let (s, at) = (h.s.as_str(), h.label.as_str());
        let e = expect_id(s, "session_id");
        let b = self.b.clone();
        let user = self.fresh("user");
        let md0 = obj("stage", json!("created"));
        let created = self.check(
            "create_session",
            at,
            e,
            b.create_session(s, &user, &md0).await,
        );
        if let Some(c) = &created {
            assert_eq!(
                (
                    c.session_id.as_str(),
                    c.user_id.as_str(),
                    &c.metadata,
                    c.status.as_str()
                ),
                (s, user.as_str(), &md0, "active"),
                "{}: create_session({at})",
                self.name
            );
            assert_eq!(c.metrics, SessionMetrics::default());
        }
        if let Some(got) = self.check("get_session", at, e, b.get_session(s).await) {
            assert_eq!(
                got.as_ref(),
                created.as_ref(),
                "{}: get_session({at})",
                self.name
            );
        }
        let update = SessionUpdate::new()
            .metadata_entry("stage", "updated")
            .status("busy")
            .increment_requests()
            .add_processing_time(0.25)
            .mark_error();
        if let Some(changed) =
            self.check("update_session", at, e, b.update_session(s, &update).await)
        {
            assert!(
                changed,
                "{}: update_session({at}) found no session",
                self.name
            );
        }
        if let Some(changed) = self.check("end_session", at, e, b.end_session(s, "ended").await) {
            assert!(changed, "{}: end_session({at}) found no session", self.name);
        }
        let metrics = SessionMetrics {
            request_count: 1,
            total_processing_time: 0.25,
            error_count: 1,
        };
        if let Some(got) = self.check("get_session", at, e, b.get_session(s).await) {
            let got = got.unwrap_or_else(|| panic!("{}: session {at} vanished", self.name));
            assert_eq!(
                got.metadata,
                obj("stage", json!("updated")),
                "{}: {at}",
                self.name
            );
            assert_eq!(got.status, "ended", "{}: {at}", self.name);
            assert_eq!(got.metrics, metrics, "{}: {at}", self.name);
        }
        let user2 = self.fresh("user");
        let md2 = obj("stage", json!("batch"));
        let batch = [NewSession::new(s, &user2).with_metadata(md2.clone())];
        let upserted = self
            .check(
                "batch_create_sessions",
                at,
                e,
                b.batch_create_sessions(&batch).await,
            )
            .map(|mut v| {
                assert_eq!(v.len(), 1, "{}: batch_create_sessions({at})", self.name);
                v.remove(0)
            });
        if let (Some(u), Some(c)) = (&upserted, &created) {
            assert_eq!(
                (
                    u.session_id.as_str(),
                    u.user_id.as_str(),
                    &u.metadata,
                    u.status.as_str()
                ),
                (s, user2.as_str(), &md2, "ended"),
                "{}: batch_create_sessions({at}) upsert",
                self.name
            );
            assert_eq!((&u.metrics, u.created_at), (&metrics, c.created_at));
        }
        let missing = self.fresh("missing");
        let ids = [s.to_owned(), missing];
        if let Some(got) = self.check(
            "batch_get_sessions",
            at,
            e,
            b.batch_get_sessions(&ids).await,
        ) {
            assert_eq!(
                got,
                vec![upserted.clone(), None],
                "{}: batch_get_sessions({at})",
                self.name
            );
        }
        // Nothing was stored under a truncated or altered id either.
        let page = b
            .list_sessions(&SessionQuery::new().user(&user2))
            .await
            .unwrap();
        let listed: Vec<&str> = page
            .sessions
            .iter()
            .map(|x| x.session_id.as_str())
            .collect();
        let want: Vec<&str> = if e.is_ok() { vec![s] } else { vec![] };
        assert_eq!(
            listed, want,
            "{}: list_sessions by the user of {at}",
            self.name
        );

        let m1 = NewMessage::new("user", "first")
            .with_id("m1")
            .with_metadata(obj("n", json!(1)));
        if let Some(id) = self.check(
            "add_conversation_message",
            at,
            e,
            b.add_conversation_message(s, &m1).await,
        ) {
            assert_eq!(id, "m1");
        }
        let anchor = self.anchor_message();
        let m2 = NewMessage::new("assistant", "second").with_id("m2");
        let r = b
            .batch_add_conversation_messages(&[(s.to_owned(), m2), anchor])
            .await;
        let mut items = self
            .outer("batch_add_conversation_messages", at, r)
            .into_iter();
        let first = items.next().expect("one result per item");
        if let Some(id) = self.check("batch_add_conversation_messages", at, e, first) {
            assert_eq!(id, "m2");
        }
        let second = items.next().expect("one result per item");
        self.assert_anchor_ok("batch_add_conversation_messages", at, &second);
        let mut history = Vec::new();
        if let Some(got) = self.check(
            "get_conversation_history",
            at,
            e,
            b.get_conversation_history(s, 10).await,
        ) {
            let brief: Vec<(&str, &str, &str, &Metadata)> = got
                .iter()
                .map(|m| {
                    (
                        m.message_id.as_str(),
                        m.role.as_str(),
                        m.content.as_str(),
                        &m.metadata,
                    )
                })
                .collect();
            let empty = Metadata::new();
            assert_eq!(
                brief,
                vec![
                    ("m1", "user", "first", &m1.metadata),
                    ("m2", "assistant", "second", &empty)
                ],
                "{}: get_conversation_history({at})",
                self.name
            );
            history = got;
        }
        if let Some(got) = self.check(
            "get_conversation_history",
            at,
            e,
            b.get_conversation_history(s, 1).await,
        ) {
            assert_eq!(got, history[1..], "{}: history({at}, 1)", self.name);
        }
        if let Some(got) = self.check(
            "get_conversation_range",
            at,
            e,
            b.get_conversation_range(s, 0, 10).await,
        ) {
            assert_eq!(got, history, "{}: range({at}, 0, 10)", self.name);
        }
        if let Some(got) = self.check(
            "get_conversation_range",
            at,
            e,
            b.get_conversation_range(s, 1, 1).await,
        ) {
            assert_eq!(got, history[1..], "{}: range({at}, 1, 1)", self.name);
        }
        if let Some(got) = self.check(
            "get_conversation_range",
            at,
            e,
            b.get_conversation_range(s, u64::MAX, 10).await,
        ) {
            assert!(got.is_empty(), "{}: range({at}, u64::MAX, 10)", self.name);
        }
        let restored = Message {
            message_id: "m3".into(),
            role: "tool".into(),
            content: "restored".into(),
            timestamp: ts(1),
            metadata: obj("restored", json!(true)),
        };
        let r = b.restore_messages(s, std::slice::from_ref(&restored)).await;
        if let Some(n) = self.check("restore_messages", at, e, r) {
            assert_eq!(n, 1, "{}: restore_messages({at})", self.name);
        }
        if let Some(got) = self.check(
            "get_conversation_history",
            at,
            e,
            b.get_conversation_history(s, 10).await,
        ) {
            history.push(restored.clone());
            assert_eq!(got, history, "{}: history after restore ({at})", self.name);
        }

        let ctx = json!({"owner": "session role", "list": [1, 2, 3], "s": s.replace('\0', "")});
        if let Some(()) = self.check(
            "store_task_context",
            at,
            e,
            b.store_task_context(s, &ctx).await,
        ) {
            let listed = b.list_task_contexts(None, MAX_LIMIT).await.unwrap();
            assert!(
                listed.ids.iter().any(|x| x == s),
                "{}: list_task_contexts lacks {at}",
                self.name
            );
        }
        if let Some(got) = self.check("get_task_context", at, e, b.get_task_context(s).await) {
            assert_eq!(
                got.as_ref(),
                Some(&ctx),
                "{}: get_task_context({at})",
                self.name
            );
        }
        if let Some(existed) = self.check("delete_session", at, e, b.delete_session(s).await) {
            assert!(existed, "{}: delete_session({at}) found nothing", self.name);
        }
        if let Some(got) = self.check("get_session", at, e, b.get_session(s).await) {
            assert!(got.is_none(), "{}: {at} survived delete_session", self.name);
        }
        if let Some(got) = self.check(
            "get_conversation_history",
            at,
            e,
            b.get_conversation_history(s, 10).await,
        ) {
            assert!(
                got.is_empty(),
                "{}: messages of {at} survived delete_session",
                self.name
            );
        }
        if let Some(got) = self.check("get_task_context", at, e, b.get_task_context(s).await) {
            assert!(
                got.is_none(),
                "{}: context of {at} survived delete_session",
                self.name
            );
        }

        let session = Session {
            session_id: s.to_owned(),
            user_id: self.fresh("user"),
            created_at: ts(10),
            updated_at: ts(20),
            status: "restored".into(),
            metadata: obj("restored", json!(1)),
            metrics: SessionMetrics {
                request_count: 7,
                total_processing_time: 1.5,
                error_count: 2,
            },
        };
        let r = b.restore_sessions(std::slice::from_ref(&session)).await;
        self.check("restore_sessions", at, e, r);
        if let Some(got) = self.check("get_session", at, e, b.get_session(s).await) {
            assert_eq!(got.as_ref(), Some(&session), "{}: restored {at}", self.name);
        }
        if let Some(existed) = self.check("delete_session", at, e, b.delete_session(s).await) {
            assert!(existed, "{}: delete_session({at}) after restore", self.name);
        }
    }

    // --- the input as user id, status, listing cursor --------------------------------

    async fn as_user_and_status(&mut self, h: &Hostile) {
        let (s, at) = (h.s.as_str(), h.label.as_str());
        let b = self.b.clone();
        let e = expect_id(s, "user_id");
        let (s1, s2, s3) = (self.fresh("s"), self.fresh("s"), self.fresh("s"));
        let none = Metadata::new();
        if let Some(c) = self.check(
            "create_session",
            at,
            e,
            b.create_session(&s1, s, &none).await,
        ) {
            assert_eq!(c.user_id, s, "{}: user {at}", self.name);
        }
        let batch = [NewSession::new(&s2, s)];
        if let Some(v) = self.check(
            "batch_create_sessions",
            at,
            e,
            b.batch_create_sessions(&batch).await,
        ) {
            assert_eq!(v[0].user_id, s, "{}: user {at}", self.name);
        }
        let session = Session {
            session_id: s3.clone(),
            user_id: s.to_owned(),
            created_at: ts(1),
            updated_at: ts(2),
            status: "active".into(),
            metadata: Metadata::new(),
            metrics: SessionMetrics::default(),
        };
        self.check(
            "restore_sessions",
            at,
            e,
            b.restore_sessions(std::slice::from_ref(&session)).await,
        );
        let query = SessionQuery::new().user(s).limit(MAX_LIMIT);
        if let Some(page) = self.check("list_sessions", at, e, b.list_sessions(&query).await) {
            let ids: Vec<&str> = page
                .sessions
                .iter()
                .map(|x| x.session_id.as_str())
                .collect();
            let mut want = [s1.as_str(), s2.as_str(), s3.as_str()];
            want.sort_unstable();
            assert_eq!(ids, want, "{}: list_sessions(user {at})", self.name);
            let restored = page.sessions.iter().find(|x| x.session_id == s3);
            assert_eq!(
                restored,
                Some(&session),
                "{}: restored user {at}",
                self.name
            );
        }
        for id in [&s1, &s2, &s3] {
            assert_eq!(b.delete_session(id).await.unwrap(), e.is_ok());
        }

        let e = expect_id(s, "status");
        let user = self.fresh("user");
        b.create_session(&s1, &user, &none).await.unwrap();
        let update = SessionUpdate::new().status(s);
        if let Some(changed) = self.check(
            "update_session",
            at,
            e,
            b.update_session(&s1, &update).await,
        ) {
            assert!(changed);
            let got = b.get_session(&s1).await.unwrap().unwrap();
            assert_eq!(got.status, s, "{}: status {at}", self.name);
        }
        b.end_session(&s1, "reset").await.unwrap();
        if let Some(changed) = self.check("end_session", at, e, b.end_session(&s1, s).await) {
            assert!(changed);
            let got = b.get_session(&s1).await.unwrap().unwrap();
            assert_eq!(got.status, s, "{}: status {at}", self.name);
        }
        let query = SessionQuery::new().user(&user).status(s);
        if let Some(page) = self.check("list_sessions", at, e, b.list_sessions(&query).await) {
            let ids: Vec<&str> = page
                .sessions
                .iter()
                .map(|x| x.session_id.as_str())
                .collect();
            assert_eq!(ids, [&s1], "{}: list_sessions(status {at})", self.name);
        }
        let session = Session {
            session_id: s2.clone(),
            user_id: user.clone(),
            status: s.to_owned(),
            ..session
        };
        self.check(
            "restore_sessions",
            at,
            e,
            b.restore_sessions(std::slice::from_ref(&session)).await,
        );
        if e.is_ok() {
            assert_eq!(
                b.get_session(&s2).await.unwrap(),
                Some(session),
                "{}: restored status {at}",
                self.name
            );
        }
        assert!(b.delete_session(&s1).await.unwrap());
        assert_eq!(b.delete_session(&s2).await.unwrap(), e.is_ok());
    }

    async fn as_cursor(&mut self, h: &Hostile) {
        let (s, at) = (h.s.as_str(), h.label.as_str());
        let b = self.b.clone();
        let e = expect_id(s, "after");
        let after = |ids: Vec<String>| -> Vec<String> {
            ids.into_iter().filter(|x| x.as_str() > s).collect()
        };
        let all = b
            .list_sessions(&SessionQuery::new().limit(MAX_LIMIT))
            .await
            .unwrap();
        let all: Vec<String> = all.sessions.into_iter().map(|x| x.session_id).collect();
        let query = SessionQuery::new().after(s).limit(MAX_LIMIT);
        if let Some(page) = self.check("list_sessions", at, e, b.list_sessions(&query).await) {
            let ids: Vec<String> = page.sessions.into_iter().map(|x| x.session_id).collect();
            assert_eq!(ids, after(all), "{}: list_sessions(after {at})", self.name);
        }
        let all = b.list_threads(None, MAX_LIMIT).await.unwrap().ids;
        if let Some(page) = self.check(
            "list_threads",
            at,
            e,
            b.list_threads(Some(s), MAX_LIMIT).await,
        ) {
            assert_eq!(
                page.ids,
                after(all),
                "{}: list_threads(after {at})",
                self.name
            );
        }
        let all = b.list_task_contexts(None, MAX_LIMIT).await.unwrap().ids;
        if let Some(page) = self.check(
            "list_task_contexts",
            at,
            e,
            b.list_task_contexts(Some(s), MAX_LIMIT).await,
        ) {
            assert_eq!(
                page.ids,
                after(all),
                "{}: list_task_contexts(after {at})",
                self.name
            );
        }
    }

    // --- the input in every field of a message ----------------------------------------

    async fn as_message_fields(&mut self, h: &Hostile) {
        let (s, at) = (h.s.as_str(), h.label.as_str());
        let b = self.b.clone();
        let (sid, rid) = (self.fresh("s"), self.fresh("s"));
        let user = self.fresh("user");
        b.create_session(&sid, &user, &Metadata::new())
            .await
            .unwrap();
        b.create_session(&rid, &user, &Metadata::new())
            .await
            .unwrap();
        // (id, role, content, metadata) of what must be in each history.
        let mut added: Vec<(String, String, String, Metadata)> = Vec::new();
        let mut restored: Vec<Message> = Vec::new();

        let variants: [(&'static str, NewMessage, Expect); 4] = [
            (
                "message_id",
                NewMessage::new("user", "by id").with_id(s),
                expect_id(s, "message_id"),
            ),
            ("role", NewMessage::new(s, "by role"), expect_id(s, "role")),
            ("content", NewMessage::new("user", s), expect_content(s)),
            (
                "metadata",
                NewMessage::new("user", "by metadata").with_metadata(obj(s, json!(s))),
                expect_md(&obj(s, json!(s))),
            ),
        ];
        for (field, message, e) in variants {
            let single = if field == "message_id" {
                message.clone()
            } else {
                message.clone().with_id(self.fresh("m"))
            };
            if let Some(id) = self.check(
                "add_conversation_message",
                at,
                e,
                b.add_conversation_message(&sid, &single).await,
            ) {
                assert_eq!(Some(&id), single.message_id.as_ref());
                added.push((
                    id,
                    single.role.clone(),
                    single.content.clone(),
                    single.metadata.clone(),
                ));
            }
            // Again (message_id: a retried add stores nothing) or as one item of a batch.
            let batched = if field == "message_id" {
                message.clone()
            } else {
                message.clone().with_id(self.fresh("m"))
            };
            let anchor = self.anchor_message();
            let r = b
                .batch_add_conversation_messages(&[(sid.clone(), batched.clone()), anchor])
                .await;
            let mut items = self
                .outer("batch_add_conversation_messages", at, r)
                .into_iter();
            let first = items.next().expect("one result per item");
            if let Some(id) = self.check("batch_add_conversation_messages", at, e, first) {
                assert_eq!(Some(&id), batched.message_id.as_ref());
                if field != "message_id" {
                    added.push((
                        id,
                        batched.role.clone(),
                        batched.content.clone(),
                        batched.metadata.clone(),
                    ));
                }
            }
            let second = items.next().expect("one result per item");
            self.assert_anchor_ok("batch_add_conversation_messages", at, &second);
            let m = Message {
                message_id: single.message_id.clone().expect("fixed id"),
                role: message.role.clone(),
                content: message.content.clone(),
                timestamp: ts(restored.len() as i64),
                metadata: message.metadata.clone(),
            };
            let r = b.restore_messages(&rid, std::slice::from_ref(&m)).await;
            if let Some(n) = self.check("restore_messages", at, e, r) {
                assert_eq!(n, 1, "{}: restore_messages({field} {at})", self.name);
                restored.push(m);
            }
        }
        let got = b.get_conversation_history(&sid, MAX_LIMIT).await.unwrap();
        let brief: Vec<(String, String, String, Metadata)> = got
            .into_iter()
            .map(|m| (m.message_id, m.role, m.content, m.metadata))
            .collect();
        assert!(
            brief == added,
            "{}: history with {at} in message fields differs",
            self.name
        );
        let got = b.get_conversation_range(&rid, 0, MAX_LIMIT).await.unwrap();
        assert!(
            got == restored,
            "{}: restored messages with {at} differ",
            self.name
        );
        assert!(b.delete_session(&sid).await.unwrap());
        assert!(b.delete_session(&rid).await.unwrap());
    }

    // --- the input as thread id or namespace: every checkpoint method ----------------

    async fn as_thread_or_namespace(&mut self, h: &Hostile, slot: &'static str) {
        let (s, at) = (h.s.as_str(), h.label.as_str());
        let b = self.b.clone();
        let fresh_thread = self.fresh("t");
        let (th, ns, e) = match slot {
            "thread_id" => (s, "", expect_id(s, "thread_id")),
            _ => (fresh_thread.as_str(), s, expect_name(s, "checkpoint_ns")),
        };
        let valid = e.is_ok();
        // Calls that take only the thread id are benign in the namespace slot.
        let e_thread = if slot == "thread_id" { e } else { Expect::Ok };
        let a = NewCheckpoint::new(th, "cp-a", json!({"step": 1}))
            .with_namespace(ns)
            .with_metadata(obj("source", json!("input")));
        let bb = NewCheckpoint::new(th, "cp-b", json!({"step": 2}))
            .with_namespace(ns)
            .with_parent("cp-a")
            .with_metadata(obj("source", json!("loop")));
        self.check("store_checkpoint", at, e, b.store_checkpoint(&a).await);
        self.check("store_checkpoint", at, e, b.store_checkpoint(&bb).await);
        let same = |c: &Checkpoint, n: &NewCheckpoint| {
            c.thread_id == n.thread_id
                && c.checkpoint_ns == n.checkpoint_ns
                && c.checkpoint_id == n.checkpoint_id
                && c.parent_checkpoint_id == n.parent_checkpoint_id
                && c.data == n.data
                && c.metadata == n.metadata
        };
        let mut stored = Vec::new();
        if let Some(got) = self.check(
            "get_checkpoint",
            at,
            e,
            b.get_checkpoint(th, ns, None).await,
        ) {
            let got = got.unwrap_or_else(|| panic!("{}: no latest checkpoint for {at}", self.name));
            assert!(
                same(&got, &bb),
                "{}: latest checkpoint of {at}: {got:?}",
                self.name
            );
            stored.push(got);
        }
        if let Some(got) = self.check(
            "get_checkpoint",
            at,
            e,
            b.get_checkpoint(th, ns, Some("cp-a")).await,
        ) {
            let got = got.unwrap_or_else(|| panic!("{}: no cp-a for {at}", self.name));
            assert!(same(&got, &a), "{}: cp-a of {at}: {got:?}", self.name);
            stored.push(got);
        }
        if let Some(got) = self.check(
            "list_checkpoints",
            at,
            e,
            b.list_checkpoints(th, ns, &CheckpointFilter::new()).await,
        ) {
            assert_eq!(got, stored, "{}: list_checkpoints({at})", self.name);
        }
        let before = CheckpointFilter::new().before("cp-b");
        if let Some(got) = self.check(
            "list_checkpoints",
            at,
            e,
            b.list_checkpoints(th, ns, &before).await,
        ) {
            assert_eq!(
                got,
                stored[1..],
                "{}: list_checkpoints({at}, before cp-b)",
                self.name
            );
        }
        let filter = CheckpointFilter::new().metadata_entry("source", "loop");
        if let Some(got) = self.check(
            "list_checkpoints",
            at,
            e,
            b.list_checkpoints(th, ns, &filter).await,
        ) {
            assert_eq!(
                got,
                stored[..1],
                "{}: list_checkpoints({at}, source=loop)",
                self.name
            );
        }
        let writes = [write("ch-1", json!(1)), write("ch-2", json!({"v": "two"}))];
        self.check(
            "put_writes",
            at,
            e,
            b.put_writes(th, ns, "cp-b", "task-1", &writes).await,
        );
        let item = TaskWrites {
            thread_id: th.to_owned(),
            checkpoint_ns: ns.to_owned(),
            checkpoint_id: "cp-b".into(),
            task_id: "task-2".into(),
            writes: vec![write("ch-3", Value::Null)],
        };
        let anchor = self.anchor_writes();
        let r = b.batch_put_writes(&[item, anchor]).await;
        let mut items = self.outer("batch_put_writes", at, r).into_iter();
        self.check(
            "batch_put_writes",
            at,
            e,
            items.next().expect("one result per item"),
        );
        let second = items.next().expect("one result per item");
        self.assert_anchor_ok("batch_put_writes", at, &second);
        if let Some(got) = self.check("get_writes", at, e, b.get_writes(th, ns, "cp-b").await) {
            let want = vec![
                pending("task-1", 0, "ch-1", json!(1)),
                pending("task-1", 1, "ch-2", json!({"v": "two"})),
                pending("task-2", 0, "ch-3", Value::Null),
            ];
            assert_eq!(got, want, "{}: get_writes({at})", self.name);
        }
        let want_ns: Vec<String> = if valid { vec![ns.to_owned()] } else { vec![] };
        if let Some(got) = self.check(
            "list_checkpoint_namespaces",
            at,
            e_thread,
            b.list_checkpoint_namespaces(th).await,
        ) {
            assert_eq!(
                got, want_ns,
                "{}: list_checkpoint_namespaces({at})",
                self.name
            );
        }
        let threads = b.list_threads(None, MAX_LIMIT).await.unwrap().ids;
        assert_eq!(
            threads.iter().any(|x| x == th),
            valid,
            "{}: list_threads and {at}",
            self.name
        );
        let restored = Checkpoint {
            thread_id: th.to_owned(),
            checkpoint_ns: ns.to_owned(),
            checkpoint_id: "cp-r".into(),
            parent_checkpoint_id: Some("cp-b".into()),
            data: json!({"restored": [1, 2]}),
            metadata: obj("source", json!("restore")),
            created_at: ts(5),
        };
        self.check(
            "restore_checkpoints",
            at,
            e,
            b.restore_checkpoints(std::slice::from_ref(&restored)).await,
        );
        if let Some(got) = self.check(
            "get_checkpoint",
            at,
            e,
            b.get_checkpoint(th, ns, None).await,
        ) {
            assert_eq!(
                got.as_ref(),
                Some(&restored),
                "{}: restored checkpoint of {at}",
                self.name
            );
        }
        if slot == "checkpoint_ns" && valid && !ns.is_empty() {
            let other = b.get_checkpoint(th, "", None).await.unwrap();
            assert!(
                other.is_none(),
                "{}: namespace {at} leaked into the default one",
                self.name
            );
        }
        self.check("delete_thread", at, e_thread, b.delete_thread(th).await);
        if let Some(got) = self.check(
            "get_checkpoint",
            at,
            e,
            b.get_checkpoint(th, ns, None).await,
        ) {
            assert!(
                got.is_none(),
                "{}: checkpoint of {at} survived delete_thread",
                self.name
            );
        }
        if let Some(got) = self.check("get_writes", at, e, b.get_writes(th, ns, "cp-b").await) {
            assert!(
                got.is_empty(),
                "{}: writes of {at} survived delete_thread",
                self.name
            );
        }
        if let Some(got) = self.check(
            "list_checkpoint_namespaces",
            at,
            e_thread,
            b.list_checkpoint_namespaces(th).await,
        ) {
            assert!(
                got.is_empty(),
                "{}: namespaces of {at} survived delete_thread",
                self.name
            );
        }
    }

    // --- the input as checkpoint id, parent id and `before` cursor -------------------

    async fn as_checkpoint_id(&mut self, h: &Hostile) {
        let (s, at) = (h.s.as_str(), h.label.as_str());
        let b = self.b.clone();
        let (th, th2) = (self.fresh("t"), self.fresh("t"));
        let e = expect_id(s, "checkpoint_id");
        let e_parent = expect_id(s, "parent_checkpoint_id");
        let a = NewCheckpoint::new(&th, s, json!({"id": "hostile"}));
        let child = NewCheckpoint::new(&th, "child", json!({"id": "child"})).with_parent(s);
        self.check("store_checkpoint", at, e, b.store_checkpoint(&a).await);
        self.check(
            "store_checkpoint",
            at,
            e_parent,
            b.store_checkpoint(&child).await,
        );
        let mut first = None;
        if let Some(got) = self.check(
            "get_checkpoint",
            at,
            e,
            b.get_checkpoint(&th, "", Some(s)).await,
        ) {
            let got = got.unwrap_or_else(|| panic!("{}: checkpoint {at} not found", self.name));
            assert_eq!(
                (got.checkpoint_id.as_str(), &got.data),
                (s, &a.data),
                "{}: {at}",
                self.name
            );
            first = Some(got);
        }
        let latest = b.get_checkpoint(&th, "", None).await.unwrap();
        match &latest {
            Some(c) => {
                assert!(
                    e.is_ok(),
                    "{}: a checkpoint was stored for rejected {at}",
                    self.name
                );
                assert_eq!(c.checkpoint_id, "child");
                assert_eq!(
                    c.parent_checkpoint_id.as_deref(),
                    Some(s),
                    "{}: parent {at}",
                    self.name
                );
            }
            None => assert!(!e.is_ok(), "{}: no latest checkpoint for {at}", self.name),
        }
        let before = CheckpointFilter::new().before(s);
        if let Some(got) = self.check(
            "list_checkpoints",
            at,
            expect_id(s, "before"),
            b.list_checkpoints(&th, "", &before).await,
        ) {
            assert!(
                got.is_empty(),
                "{}: nothing was stored before {at}",
                self.name
            );
        }
        let got = b
            .list_checkpoints(&th, "", &CheckpointFilter::new().before("child"))
            .await
            .unwrap();
        assert_eq!(
            got.first(),
            first.as_ref(),
            "{}: before child ({at})",
            self.name
        );
        let writes = [write("ch", json!("w"))];
        self.check(
            "put_writes",
            at,
            e,
            b.put_writes(&th, "", s, "task-1", &writes).await,
        );
        let item = TaskWrites {
            thread_id: th.clone(),
            checkpoint_ns: String::new(),
            checkpoint_id: s.to_owned(),
            task_id: "task-2".into(),
            writes: vec![write("ch", json!(2))],
        };
        let anchor = self.anchor_writes();
        let r = b.batch_put_writes(&[item, anchor]).await;
        let mut items = self.outer("batch_put_writes", at, r).into_iter();
        self.check(
            "batch_put_writes",
            at,
            e,
            items.next().expect("one result per item"),
        );
        let second = items.next().expect("one result per item");
        self.assert_anchor_ok("batch_put_writes", at, &second);
        if let Some(got) = self.check("get_writes", at, e, b.get_writes(&th, "", s).await) {
            let want = vec![
                pending("task-1", 0, "ch", json!("w")),
                pending("task-2", 0, "ch", json!(2)),
            ];
            assert_eq!(got, want, "{}: get_writes(checkpoint {at})", self.name);
        }
        let restored = Checkpoint {
            thread_id: th2.clone(),
            checkpoint_ns: String::new(),
            checkpoint_id: s.to_owned(),
            parent_checkpoint_id: None,
            data: json!([s.replace('\0', "")]),
            metadata: Metadata::new(),
            created_at: ts(3),
        };
        self.check(
            "restore_checkpoints",
            at,
            e,
            b.restore_checkpoints(std::slice::from_ref(&restored)).await,
        );
        let with_parent = Checkpoint {
            checkpoint_id: "cp-r".into(),
            parent_checkpoint_id: Some(s.to_owned()),
            ..restored.clone()
        };
        self.check(
            "restore_checkpoints",
            at,
            e_parent,
            b.restore_checkpoints(std::slice::from_ref(&with_parent))
                .await,
        );
        if let Some(got) = self.check(
            "get_checkpoint",
            at,
            e,
            b.get_checkpoint(&th2, "", Some(s)).await,
        ) {
            assert_eq!(
                got.as_ref(),
                Some(&restored),
                "{}: restored checkpoint {at}",
                self.name
            );
        }
        if e.is_ok() {
            let got = b.get_checkpoint(&th2, "", None).await.unwrap();
            assert_eq!(
                got.as_ref(),
                Some(&with_parent),
                "{}: restored parent {at}",
                self.name
            );
        }
        b.delete_thread(&th).await.unwrap();
        b.delete_thread(&th2).await.unwrap();
    }

    // --- the input as task id and as channel ------------------------------------------

    async fn as_task_and_channel(&mut self, h: &Hostile) {
        let (s, at) = (h.s.as_str(), h.label.as_str());
        let b = self.b.clone();
        let th = self.fresh("t");
        let e = expect_id(s, "task_id");
        let mut want = Vec::new();
        self.check(
            "put_writes",
            at,
            e,
            b.put_writes(&th, "", "cp", s, &[write("ch", json!(1))])
                .await,
        );
        // Repeated: replaced in place, never duplicated.
        self.check(
            "put_writes",
            at,
            e,
            b.put_writes(&th, "", "cp", s, &[write("ch", json!(2))])
                .await,
        );
        let item = TaskWrites {
            thread_id: th.clone(),
            checkpoint_ns: String::new(),
            checkpoint_id: "cp".into(),
            task_id: s.to_owned(),
            writes: vec![write("ch", json!(3)), write("ch", json!(4))],
        };
        let r = b.batch_put_writes(std::slice::from_ref(&item)).await;
        let mut items = self.outer("batch_put_writes", at, r).into_iter();
        self.check("batch_put_writes", at, e, items.next().expect("one result"));
        if e.is_ok() {
            want.push(pending(s, 0, "ch", json!(3)));
            want.push(pending(s, 1, "ch", json!(4)));
        }
        let e = expect_id(s, "channel");
        self.check(
            "put_writes",
            at,
            e,
            b.put_writes(&th, "", "cp", "task-c", &[write(s, json!("c"))])
                .await,
        );
        if e.is_ok() {
            want.push(pending("task-c", 0, s, json!("c")));
        }
        let item = TaskWrites {
            task_id: "task-d".into(),
            writes: vec![write("ch", json!(0)), write(s, json!("d"))],
            ..item
        };
        let r = b.batch_put_writes(std::slice::from_ref(&item)).await;
        let mut items = self.outer("batch_put_writes", at, r).into_iter();
        self.check("batch_put_writes", at, e, items.next().expect("one result"));
        if e.is_ok() {
            want.push(pending("task-d", 0, "ch", json!(0)));
            want.push(pending("task-d", 1, s, json!("d")));
        }
        let got = b.get_writes(&th, "", "cp").await.unwrap();
        assert_eq!(got, want, "{}: writes with task/channel {at}", self.name);
        b.delete_thread(&th).await.unwrap();
    }

    // --- a JSON value in every JSON parameter -----------------------------------------

    /// `v` as checkpoint data, task context and write value, and `{key: v}` as every
    /// metadata (session create, update, batch create, restore; message add, batch,
    /// restore; checkpoint store, filter, restore). Values far over the metadata limit
    /// skip the metadata places: they would only repeat the size check that the strings
    /// at and just over that limit pin, at the cost of serializing 16 MiB a dozen times.
    async fn as_json(&mut self, at: &str, key: &str, v: &Value) {
        let (depth, nul) = json_facts(v);
        let shape_ok = depth <= MAX_JSON_DEPTH && !nul;
        let len = if shape_ok { serialized_len(v) } else { 0 };
        if len <= 2 * MAX_METADATA_BYTES {
            self.as_metadata(at, key, v).await;
        }
        let value_e = |field: &'static str, size_field: &'static str| {
            if !shape_ok {
                Expect::Bad(field)
            } else if len > MAX_VALUE_BYTES {
                Expect::Bad(size_field)
            } else {
                Expect::Ok
            }
        };
        let (e_data, e_ctx, e_writes) = (
            value_e("data", "data"),
            value_e("context", "context"),
            value_e("value", "writes"),
        );
        let b = self.b.clone();
        let th = self.fresh("t");
        let data_cp = NewCheckpoint::new(&th, "cp-d", v.clone());
        self.check(
            "store_checkpoint",
            at,
            e_data,
            b.store_checkpoint(&data_cp).await,
        );
        if e_data.is_ok() {
            let got = b
                .get_checkpoint(&th, "", Some("cp-d"))
                .await
                .unwrap()
                .expect("stored");
            assert!(
                &got.data == v,
                "{}: checkpoint data {at} changed",
                self.name
            );
        }
        let restored = Checkpoint {
            thread_id: th.clone(),
            checkpoint_ns: String::new(),
            checkpoint_id: "cp-r".into(),
            parent_checkpoint_id: None,
            data: v.clone(),
            metadata: Metadata::new(),
            created_at: ts(4),
        };
        self.check(
            "restore_checkpoints",
            at,
            e_data,
            b.restore_checkpoints(std::slice::from_ref(&restored)).await,
        );
        if e_data.is_ok() {
            let got = b.get_checkpoint(&th, "", Some("cp-r")).await.unwrap();
            assert!(
                got.as_ref() == Some(&restored),
                "{}: restored checkpoint data {at} changed",
                self.name
            );
        }
        let writes = vec![write("ch", v.clone())];
        let ctx_id = self.fresh("ctx");
        self.check(
            "store_task_context",
            at,
            e_ctx,
            b.store_task_context(&ctx_id, v).await,
        );
        if e_ctx.is_ok() {
            let got = b.get_task_context(&ctx_id).await.unwrap();
            assert!(
                got.as_ref() == Some(v),
                "{}: task context {at} changed",
                self.name
            );
        }
        self.check(
            "put_writes",
            at,
            e_writes,
            b.put_writes(&th, "", "cp-d", "task", &writes).await,
        );
        let item = TaskWrites {
            thread_id: th.clone(),
            checkpoint_ns: String::new(),
            checkpoint_id: "cp-e".into(),
            task_id: "task".into(),
            writes,
        };
        let anchor = self.anchor_writes();
        let r = b.batch_put_writes(&[item, anchor]).await;
        let mut items = self.outer("batch_put_writes", at, r).into_iter();
        self.check(
            "batch_put_writes",
            at,
            e_writes,
            items.next().expect("one result per item"),
        );
        let second = items.next().expect("one result per item");
        self.assert_anchor_ok("batch_put_writes", at, &second);
        for cp in ["cp-d", "cp-e"] {
            let got = b.get_writes(&th, "", cp).await.unwrap();
            if e_writes.is_ok() {
                assert!(
                    got.len() == 1 && &got[0].value == v,
                    "{}: write value {at} changed",
                    self.name
                );
            } else {
                assert!(
                    got.is_empty(),
                    "{}: rejected write {at} was stored",
                    self.name
                );
            }
        }

        b.delete_session(&ctx_id).await.unwrap();
        b.delete_thread(&th).await.unwrap();
    }

    /// `{key: v}` as every metadata parameter.
    async fn as_metadata(&mut self, at: &str, key: &str, v: &Value) {
        let b = self.b.clone();
        let md = obj(key, v.clone());
        let e_md = expect_md(&md);
        let user = self.fresh("user");
        let (s1, s2, s3, s4) = (
            self.fresh("s"),
            self.fresh("s"),
            self.fresh("s"),
            self.fresh("s"),
        );

        if let Some(c) = self.check(
            "create_session",
            at,
            e_md,
            b.create_session(&s1, &user, &md).await,
        ) {
            assert!(
                c.metadata == md,
                "{}: create_session metadata {at} changed",
                self.name
            );
            let got = b.get_session(&s1).await.unwrap().expect("created");
            assert!(
                got.metadata == md,
                "{}: stored session metadata {at} changed",
                self.name
            );
        }
        let base = obj("base", json!(1));
        b.create_session(&s2, &user, &base).await.unwrap();
        let update = SessionUpdate::new().merge_metadata(md.clone());
        if let Some(changed) = self.check(
            "update_session",
            at,
            e_md,
            b.update_session(&s2, &update).await,
        ) {
            assert!(changed);
            let got = b.get_session(&s2).await.unwrap().expect("created");
            let mut want = base.clone();
            want.extend(md.clone());
            assert!(
                got.metadata == want,
                "{}: merged metadata {at} changed",
                self.name
            );
        }
        let batch = [NewSession::new(&s3, &user).with_metadata(md.clone())];
        if let Some(v) = self.check(
            "batch_create_sessions",
            at,
            e_md,
            b.batch_create_sessions(&batch).await,
        ) {
            assert!(
                v[0].metadata == md,
                "{}: batch_create_sessions metadata {at}",
                self.name
            );
        }
        let session = Session {
            session_id: s4.clone(),
            user_id: user.clone(),
            created_at: ts(1),
            updated_at: ts(2),
            status: "active".into(),
            metadata: md.clone(),
            metrics: SessionMetrics::default(),
        };
        self.check(
            "restore_sessions",
            at,
            e_md,
            b.restore_sessions(std::slice::from_ref(&session)).await,
        );
        if e_md.is_ok() {
            let got = b.get_session(&s4).await.unwrap();
            assert!(
                got.as_ref() == Some(&session),
                "{}: restored session metadata {at}",
                self.name
            );
        }

        let message = NewMessage::new("user", "with metadata")
            .with_id("m-1")
            .with_metadata(md.clone());
        self.check(
            "add_conversation_message",
            at,
            e_md,
            b.add_conversation_message(&s2, &message).await,
        );
        let batched = NewMessage {
            message_id: Some("m-2".into()),
            ..message.clone()
        };
        let anchor = self.anchor_message();
        let r = b
            .batch_add_conversation_messages(&[(s2.clone(), batched), anchor])
            .await;
        let mut items = self
            .outer("batch_add_conversation_messages", at, r)
            .into_iter();
        self.check(
            "batch_add_conversation_messages",
            at,
            e_md,
            items.next().expect("one result per item"),
        );
        let second = items.next().expect("one result per item");
        self.assert_anchor_ok("batch_add_conversation_messages", at, &second);
        let restored = Message {
            message_id: "m-3".into(),
            role: "user".into(),
            content: "restored".into(),
            timestamp: ts(3),
            metadata: md.clone(),
        };
        self.check(
            "restore_messages",
            at,
            e_md,
            b.restore_messages(&s2, std::slice::from_ref(&restored))
                .await,
        );
        let history = b.get_conversation_history(&s2, 10).await.unwrap();
        let want_len = if e_md.is_ok() { 3 } else { 0 };
        assert_eq!(
            history.len(),
            want_len,
            "{}: messages with metadata {at}",
            self.name
        );
        if e_md.is_ok() {
            assert!(
                history.iter().all(|m| m.metadata == md),
                "{}: message metadata {at}",
                self.name
            );
            assert!(
                history[2] == restored,
                "{}: restored message metadata {at}",
                self.name
            );
        }

        let th = self.fresh("t");
        let md_cp = NewCheckpoint::new(&th, "cp-m", json!({"x": 1})).with_metadata(md.clone());
        self.check(
            "store_checkpoint",
            at,
            e_md,
            b.store_checkpoint(&md_cp).await,
        );
        if e_md.is_ok() {
            let got = b
                .get_checkpoint(&th, "", Some("cp-m"))
                .await
                .unwrap()
                .expect("stored");
            assert!(
                got.metadata == md,
                "{}: checkpoint metadata {at} changed",
                self.name
            );
        }
        let filter = CheckpointFilter {
            limit: 10,
            before: None,
            metadata: md.clone(),
        };
        if let Some(got) = self.check(
            "list_checkpoints",
            at,
            e_md,
            b.list_checkpoints(&th, "", &filter).await,
        ) {
            let ids: Vec<&str> = got.iter().map(|c| c.checkpoint_id.as_str()).collect();
            assert_eq!(
                ids,
                ["cp-m"],
                "{}: list_checkpoints filtered by {at}",
                self.name
            );
        }
        let restored = Checkpoint {
            thread_id: th.clone(),
            checkpoint_ns: String::new(),
            checkpoint_id: "cp-r".into(),
            parent_checkpoint_id: None,
            data: json!("restored"),
            metadata: md.clone(),
            created_at: ts(4),
        };
        let e_restore = e_md;
        self.check(
            "restore_checkpoints",
            at,
            e_restore,
            b.restore_checkpoints(std::slice::from_ref(&restored)).await,
        );
        if e_restore.is_ok() {
            let got = b.get_checkpoint(&th, "", Some("cp-r")).await.unwrap();
            assert!(
                got.as_ref() == Some(&restored),
                "{}: restored checkpoint {at} changed",
                self.name
            );
        }

        for id in [&s1, &s2, &s3, &s4] {
            b.delete_session(id).await.unwrap();
        }
        b.delete_thread(&th).await.unwrap();
    }

    async fn as_json_string(&mut self, h: &Hostile) {
        let v = Value::String(h.s.clone());
        let at = format!("{} as a JSON string and key", h.label);
        self.as_json(&at, &h.s.clone(), &v).await;
    }

    // --- limits, batch sizes, counters ----------------------------------------------

    async fn limits(&mut self) {
        let b = self.b.clone();
        let sid = self.fresh("s");
        let user = self.fresh("user");
        b.create_session(&sid, &user, &Metadata::new())
            .await
            .unwrap();
        for i in 0..3 {
            let m = NewMessage::new("user", format!("n{i}")).with_id(format!("m{i}"));
            b.add_conversation_message(&sid, &m).await.unwrap();
        }
        let th = self.fresh("t");
        b.store_checkpoint(&NewCheckpoint::new(&th, "cp", json!(1)))
            .await
            .unwrap();
        let limit_e = |l: usize| {
            if l == 0 || l > MAX_LIMIT {
                Expect::Bad("limit")
            } else {
                Expect::Ok
            }
        };
        for l in [
            0,
            1,
            2,
            MAX_LIMIT,
            MAX_LIMIT + 1,
            usize::MAX / 2,
            usize::MAX,
        ] {
            let at = format!("limit {l}");
            self.t.inputs.insert(at.clone());
            let e = limit_e(l);
            let want = l.min(3);
            if let Some(got) = self.check(
                "get_conversation_history",
                &at,
                e,
                b.get_conversation_history(&sid, l).await,
            ) {
                let ids: Vec<String> = got.into_iter().map(|m| m.message_id).collect();
                let all = ["m0", "m1", "m2"];
                assert_eq!(ids, all[3 - want..], "{}: history {at}", self.name);
            }
            if let Some(got) = self.check(
                "get_conversation_range",
                &at,
                e,
                b.get_conversation_range(&sid, 0, l).await,
            ) {
                assert_eq!(got.len(), want, "{}: range {at}", self.name);
            }
            let query = SessionQuery::new().user(&user).limit(l);
            if let Some(page) = self.check("list_sessions", &at, e, b.list_sessions(&query).await) {
                assert_eq!(page.sessions.len(), 1, "{}: list_sessions {at}", self.name);
            }
            let filter = CheckpointFilter::new().limit(l);
            if let Some(got) = self.check(
                "list_checkpoints",
                &at,
                e,
                b.list_checkpoints(&th, "", &filter).await,
            ) {
                assert_eq!(got.len(), 1, "{}: list_checkpoints {at}", self.name);
            }
            if let Some(page) = self.check("list_threads", &at, e, b.list_threads(None, l).await) {
                assert!(
                    !page.ids.is_empty() && page.ids.len() <= l,
                    "{}: list_threads {at}",
                    self.name
                );
            }
            b.store_task_context(&sid, &json!(1)).await.unwrap();
            if let Some(page) = self.check(
                "list_task_contexts",
                &at,
                e,
                b.list_task_contexts(None, l).await,
            ) {
                assert!(
                    !page.ids.is_empty() && page.ids.len() <= l,
                    "{}: list_task_contexts {at}",
                    self.name
                );
            }
        }
        for offset in [0, 2, 3, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            let at = format!("offset {offset}");
            self.t.inputs.insert(at.clone());
            let got = self.check(
                "get_conversation_range",
                &at,
                Expect::Ok,
                b.get_conversation_range(&sid, offset, 10).await,
            );
            let want = 3usize.saturating_sub(usize::try_from(offset).unwrap_or(usize::MAX));
            assert_eq!(
                got.map(|v| v.len()),
                Some(want),
                "{}: range {at}",
                self.name
            );
        }

        // Batches: empty is fine, one over the limit is rejected naming the batch.
        let over = MAX_LIMIT + 1;
        let at = format!("batch of {over}");
        self.t.inputs.insert(at.clone());
        self.t.inputs.insert("empty batch".into());
        let news: Vec<NewSession> = (0..over)
            .map(|i| NewSession::new(format!("ok-big-{i}"), "u"))
            .collect();
        self.check(
            "batch_create_sessions",
            &at,
            Expect::Bad("sessions"),
            b.batch_create_sessions(&news).await,
        );
        let got = self.check(
            "batch_create_sessions",
            "empty batch",
            Expect::Ok,
            b.batch_create_sessions(&[]).await,
        );
        assert_eq!(got.map(|v| v.len()), Some(0));
        let ids: Vec<String> = (0..over).map(|i| format!("ok-big-{i}")).collect();
        self.check(
            "batch_get_sessions",
            &at,
            Expect::Bad("session_ids"),
            b.batch_get_sessions(&ids).await,
        );
        let at_max = format!("batch of {MAX_LIMIT}");
        self.t.inputs.insert(at_max.clone());
        let got = self.check(
            "batch_get_sessions",
            &at_max,
            Expect::Ok,
            b.batch_get_sessions(&ids[..MAX_LIMIT]).await,
        );
        assert_eq!(
            got.map(|v| v.iter().filter(|s| s.is_none()).count()),
            Some(MAX_LIMIT)
        );
        let got = self.check(
            "batch_get_sessions",
            "empty batch",
            Expect::Ok,
            b.batch_get_sessions(&[]).await,
        );
        assert_eq!(got.map(|v| v.len()), Some(0));
        let messages: Vec<(String, NewMessage)> = (0..over)
            .map(|_| (sid.clone(), NewMessage::new("user", "x")))
            .collect();
        self.check(
            "batch_add_conversation_messages",
            &at,
            Expect::Bad("messages"),
            b.batch_add_conversation_messages(&messages).await,
        );
        let got = self.check(
            "batch_add_conversation_messages",
            "empty batch",
            Expect::Ok,
            b.batch_add_conversation_messages(&[]).await,
        );
        assert_eq!(got.map(|v| v.len()), Some(0));
        let items: Vec<TaskWrites> = (0..over)
            .map(|i| TaskWrites {
                thread_id: th.clone(),
                checkpoint_ns: String::new(),
                checkpoint_id: "cp".into(),
                task_id: format!("t{i}"),
                writes: vec![],
            })
            .collect();
        self.check(
            "batch_put_writes",
            &at,
            Expect::Bad("items"),
            b.batch_put_writes(&items).await,
        );
        let got = self.check(
            "batch_put_writes",
            "empty batch",
            Expect::Ok,
            b.batch_put_writes(&[]).await,
        );
        assert_eq!(got.map(|v| v.len()), Some(0));
        let writes: Vec<WriteInput> = (0..over).map(|_| write("ch", json!(1))).collect();
        self.check(
            "put_writes",
            &at,
            Expect::Bad("writes"),
            b.put_writes(&th, "", "cp", "task", &writes).await,
        );
        let sessions: Vec<Session> = (0..over)
            .map(|i| Session {
                session_id: format!("ok-big-{i}"),
                user_id: "u".into(),
                created_at: ts(0),
                updated_at: ts(0),
                status: "active".into(),
                metadata: Metadata::new(),
                metrics: SessionMetrics::default(),
            })
            .collect();
        self.check(
            "restore_sessions",
            &at,
            Expect::Bad("sessions"),
            b.restore_sessions(&sessions).await,
        );
        self.check(
            "restore_sessions",
            "empty batch",
            Expect::Ok,
            b.restore_sessions(&[]).await,
        );
        let msgs: Vec<Message> = (0..over)
            .map(|i| Message {
                message_id: format!("r{i}"),
                role: "user".into(),
                content: "x".into(),
                timestamp: ts(0),
                metadata: Metadata::new(),
            })
            .collect();
        self.check(
            "restore_messages",
            &at,
            Expect::Bad("messages"),
            b.restore_messages(&sid, &msgs).await,
        );
        let got = self.check(
            "restore_messages",
            "empty batch",
            Expect::Ok,
            b.restore_messages(&sid, &[]).await,
        );
        assert_eq!(got, Some(0));
        let cps: Vec<Checkpoint> = (0..over)
            .map(|i| Checkpoint {
                thread_id: th.clone(),
                checkpoint_ns: String::new(),
                checkpoint_id: format!("c{i}"),
                parent_checkpoint_id: None,
                data: Value::Null,
                metadata: Metadata::new(),
                created_at: ts(0),
            })
            .collect();
        self.check(
            "restore_checkpoints",
            &at,
            Expect::Bad("checkpoints"),
            b.restore_checkpoints(&cps).await,
        );
        self.check(
            "restore_checkpoints",
            "empty batch",
            Expect::Ok,
            b.restore_checkpoints(&[]).await,
        );
        // Empty writes store nothing: the thread gains no namespace and no listing entry.
        let empty_th = self.fresh("t");
        self.check(
            "put_writes",
            "empty batch",
            Expect::Ok,
            b.put_writes(&empty_th, "ns", "cp", "task", &[]).await,
        );
        assert!(b
            .get_writes(&empty_th, "ns", "cp")
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            b.list_checkpoint_namespaces(&empty_th).await.unwrap(),
            Vec::<String>::new(),
            "{}: put_writes with no writes created a namespace",
            self.name
        );
        let threads = b.list_threads(None, MAX_LIMIT).await.unwrap().ids;
        assert!(
            !threads.contains(&empty_th),
            "{}: put_writes with no writes listed a thread holding nothing",
            self.name
        );
        // Nothing of the rejected batches was stored.
        assert!(b.get_session("ok-big-0").await.unwrap().is_none());
        assert_eq!(
            b.get_conversation_history(&sid, MAX_LIMIT)
                .await
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            b.list_checkpoints(&th, "", &CheckpointFilter::new())
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(b.get_writes(&th, "", "cp").await.unwrap().is_empty());

        // Counters: over i64 is rejected; i64::MAX itself is stored exactly.
        for (at, update, e) in [
            (
                "add_requests u64::MAX",
                SessionUpdate {
                    add_requests: u64::MAX,
                    ..Default::default()
                },
                Expect::Bad("add_requests"),
            ),
            (
                "add_errors u64::MAX",
                SessionUpdate {
                    add_errors: u64::MAX,
                    ..Default::default()
                },
                Expect::Bad("add_errors"),
            ),
            (
                "add_requests i64::MAX+1",
                SessionUpdate {
                    add_requests: i64::MAX as u64 + 1,
                    ..Default::default()
                },
                Expect::Bad("add_requests"),
            ),
            (
                "add_processing_time NaN",
                SessionUpdate::new().add_processing_time(f64::NAN),
                Expect::Bad("add_processing_time"),
            ),
            (
                "add_processing_time inf",
                SessionUpdate::new().add_processing_time(f64::INFINITY),
                Expect::Bad("add_processing_time"),
            ),
            (
                "add_processing_time -inf",
                SessionUpdate::new().add_processing_time(f64::NEG_INFINITY),
                Expect::Bad("add_processing_time"),
            ),
            (
                "add_processing_time -1",
                SessionUpdate::new().add_processing_time(-1.0),
                Expect::Bad("add_processing_time"),
            ),
            (
                "add_processing_time -MIN_POSITIVE",
                SessionUpdate::new().add_processing_time(-f64::MIN_POSITIVE),
                Expect::Bad("add_processing_time"),
            ),
        ] {
            self.t.inputs.insert(at.to_owned());
            self.check(
                "update_session",
                at,
                e,
                b.update_session(&sid, &update).await,
            );
        }
        let got = b.get_session(&sid).await.unwrap().expect("session");
        assert_eq!(
            got.metrics,
            SessionMetrics::default(),
            "{}: a rejected update changed counters",
            self.name
        );
        for (at, update, want) in [
            (
                "add_requests i64::MAX",
                SessionUpdate {
                    add_requests: i64::MAX as u64,
                    add_errors: i64::MAX as u64,
                    ..Default::default()
                },
                SessionMetrics {
                    request_count: i64::MAX as u64,
                    total_processing_time: 0.0,
                    error_count: i64::MAX as u64,
                },
            ),
            (
                "add_processing_time f64::MAX",
                SessionUpdate::new().add_processing_time(f64::MAX),
                SessionMetrics {
                    total_processing_time: f64::MAX,
                    ..Default::default()
                },
            ),
            (
                "add_processing_time 1e-9",
                SessionUpdate::new().add_processing_time(1e-9),
                SessionMetrics {
                    total_processing_time: 1e-9,
                    ..Default::default()
                },
            ),
            (
                "add_processing_time 5e-324",
                SessionUpdate::new().add_processing_time(5e-324),
                SessionMetrics {
                    total_processing_time: 5e-324,
                    ..Default::default()
                },
            ),
            (
                "add_processing_time -0.0",
                SessionUpdate::new().add_processing_time(-0.0),
                SessionMetrics::default(),
            ),
        ] {
            self.t.inputs.insert(at.to_owned());
            let fresh = self.fresh("s");
            b.create_session(&fresh, "u", &Metadata::new())
                .await
                .unwrap();
            self.check(
                "update_session",
                at,
                Expect::Ok,
                b.update_session(&fresh, &update).await,
            );
            let mut want = want;
            if update.add_processing_time == 5e-324 && self.name.starts_with("redis") {
                // Known limitation (reported): HINCRBYFLOAT keeps 17 decimal places, so an
                // increment below 5e-18 s is lost on Redis; the others add as f64 does.
                want.total_processing_time = 0.0;
            }
            let got = b.get_session(&fresh).await.unwrap().expect("session");
            assert_eq!(got.metrics, want, "{}: counters after {at}", self.name);
            b.delete_session(&fresh).await.unwrap();
        }
        let restore_cases = [
            (
                "restored request_count u64::MAX",
                SessionMetrics {
                    request_count: u64::MAX,
                    ..Default::default()
                },
                Expect::Bad("metrics"),
            ),
            (
                "restored error_count i64::MAX+1",
                SessionMetrics {
                    error_count: i64::MAX as u64 + 1,
                    ..Default::default()
                },
                Expect::Bad("metrics"),
            ),
            (
                "restored total NaN",
                SessionMetrics {
                    total_processing_time: f64::NAN,
                    ..Default::default()
                },
                Expect::Bad("total_processing_time"),
            ),
            (
                "restored total -1",
                SessionMetrics {
                    total_processing_time: -1.0,
                    ..Default::default()
                },
                Expect::Bad("total_processing_time"),
            ),
            (
                "restored counters at i64::MAX",
                SessionMetrics {
                    request_count: i64::MAX as u64,
                    total_processing_time: f64::MAX,
                    error_count: i64::MAX as u64,
                },
                Expect::Ok,
            ),
        ];
        for (at, metrics, e) in restore_cases {
            self.t.inputs.insert(at.to_owned());
            let session = Session {
                session_id: self.fresh("s"),
                user_id: "u".into(),
                created_at: ts(0),
                updated_at: ts(1),
                status: "active".into(),
                metadata: Metadata::new(),
                metrics,
            };
            self.check(
                "restore_sessions",
                at,
                e,
                b.restore_sessions(std::slice::from_ref(&session)).await,
            );
            let got = b.get_session(&session.session_id).await.unwrap();
            if e.is_ok() {
                assert_eq!(got.as_ref(), Some(&session), "{}: {at}", self.name);
                b.delete_session(&session.session_id).await.unwrap();
            } else {
                assert!(got.is_none(), "{}: {at} was stored", self.name);
            }
        }
        self.t.inputs.insert("max_idle Duration::MAX".into());
        self.check(
            "cleanup_expired_sessions",
            "max_idle Duration::MAX",
            Expect::Bad("max_idle"),
            b.cleanup_expired_sessions(Duration::MAX).await,
        );
        self.t.inputs.insert("max_idle 1000 years".into());
        let thousand_years = Duration::from_secs(1000 * 366 * 24 * 3600);
        let removed = self.check(
            "cleanup_expired_sessions",
            "max_idle 1000 years",
            Expect::Ok,
            b.cleanup_expired_sessions(thousand_years).await,
        );
        assert_eq!(
            removed,
            Some(0),
            "{}: cleanup removed live sessions",
            self.name
        );
        assert!(b.delete_session(&sid).await.unwrap());
        b.delete_thread(&th).await.unwrap();
    }

    // --- isolation: ids that a glob, LIKE, case folding or normalization would confuse -

    async fn isolation(&mut self) {
        let b = self.b.clone();
        let ids: Vec<&str> = vec![
            "a*",
            "ab",
            "a?",
            "a[b]",
            "[ab]",
            "a",
            "A",
            "a%",
            "a_",
            "a ",
            " a",
            "{s:x}",
            "x",
            "s:x",
            "{s:x",
            "a}:b{",
            "a%7D%3Ab%7B",
            "a:b",
            "a%3Ab",
            "%",
            "%25",
            "\u{E9}",
            "e\u{301}",
            "\u{200F}a",
            "a\\b",
            "a\\\\b",
            "*",
            "?",
            "'; DROP TABLE sessions; --",
            "x}:session",
            "\u{DF}",
            "ss",
            "\u{1E9E}",
        ];
        let at = |i: &str| format!("isolation id {}", label_of(i));
        let ns_thread = "ok-iso-ns-thread";
        for (k, id) in ids.iter().enumerate() {
            let id = *id;
            self.t.inputs.insert(at(id));
            let user = format!("ok-iso-user-{k}");
            let owner = obj("owner", json!(id));
            self.check(
                "create_session",
                &at(id),
                Expect::Ok,
                b.create_session(id, &user, &owner).await,
            );
            let m = NewMessage::new("user", format!("message of {id}")).with_id(format!("m-{k}"));
            self.check(
                "add_conversation_message",
                &at(id),
                Expect::Ok,
                b.add_conversation_message(id, &m).await,
            );
            self.check(
                "store_task_context",
                &at(id),
                Expect::Ok,
                b.store_task_context(id, &json!({"owner": id})).await,
            );
            let cp =
                NewCheckpoint::new(id, "cp", json!({"owner": id})).with_metadata(owner.clone());
            self.check(
                "store_checkpoint",
                &at(id),
                Expect::Ok,
                b.store_checkpoint(&cp).await,
            );
            self.check(
                "put_writes",
                &at(id),
                Expect::Ok,
                b.put_writes(id, "", "cp", "task", &[write("ch", json!(id))])
                    .await,
            );
            let in_ns = NewCheckpoint::new(ns_thread, "cp", json!({"ns": id})).with_namespace(id);
            self.check(
                "store_checkpoint",
                &at(id),
                Expect::Ok,
                b.store_checkpoint(&in_ns).await,
            );
            self.check(
                "put_writes",
                &at(id),
                Expect::Ok,
                b.put_writes(ns_thread, id, id, id, &[write(id, json!(id))])
                    .await,
            );
        }
        let verify = |b: B, name: &'static str, k: usize, id: String| async move {
            let s = b
                .get_session(&id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: {id:?} missing"));
            assert_eq!(
                s.user_id,
                format!("ok-iso-user-{k}"),
                "{name}: session {id:?} holds another's user"
            );
            assert_eq!(
                s.metadata,
                obj("owner", json!(id)),
                "{name}: session {id:?} metadata"
            );
            let h = b.get_conversation_history(&id, MAX_LIMIT).await.unwrap();
            let contents: Vec<&str> = h.iter().map(|m| m.content.as_str()).collect();
            assert_eq!(
                contents,
                [format!("message of {id}")],
                "{name}: history of {id:?}"
            );
            assert_eq!(
                b.get_task_context(&id).await.unwrap(),
                Some(json!({"owner": id})),
                "{name}: context of {id:?}"
            );
            let c = b
                .get_checkpoint(&id, "", None)
                .await
                .unwrap()
                .expect("checkpoint");
            assert_eq!(c.data, json!({"owner": id}), "{name}: checkpoint of {id:?}");
            assert_eq!(
                b.list_checkpoints(&id, "", &CheckpointFilter::new())
                    .await
                    .unwrap()
                    .len(),
                1
            );
            let w = b.get_writes(&id, "", "cp").await.unwrap();
            assert_eq!(
                w,
                vec![pending("task", 0, "ch", json!(id))],
                "{name}: writes of {id:?}"
            );
            assert_eq!(
                b.list_checkpoint_namespaces(&id).await.unwrap(),
                [""],
                "{name}: namespaces of {id:?}"
            );
            let page = b
                .list_sessions(&SessionQuery::new().user(format!("ok-iso-user-{k}")))
                .await
                .unwrap();
            let listed: Vec<&str> = page
                .sessions
                .iter()
                .map(|s| s.session_id.as_str())
                .collect();
            assert_eq!(
                listed,
                [id.as_str()],
                "{name}: list_sessions by the user of {id:?}"
            );
            let in_ns = b
                .list_checkpoints("ok-iso-ns-thread", &id, &CheckpointFilter::new())
                .await
                .unwrap();
            let data: Vec<&Value> = in_ns.iter().map(|c| &c.data).collect();
            assert_eq!(data, [&json!({"ns": id})], "{name}: namespace {id:?}");
            let w = b.get_writes("ok-iso-ns-thread", &id, &id).await.unwrap();
            assert_eq!(
                w,
                vec![pending(&id, 0, &id, json!(id))],
                "{name}: writes in namespace {id:?}"
            );
        };
        for (k, id) in ids.iter().enumerate() {
            verify(b.clone(), self.name, k, (*id).to_owned()).await;
        }
        let mut sorted: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        sorted.sort();
        let namespaces = b.list_checkpoint_namespaces(ns_thread).await.unwrap();
        assert_eq!(
            namespaces, sorted,
            "{}: namespaces of the isolation thread",
            self.name
        );
        let listed = common::listed_session_ids(&*b).await;
        for id in &sorted {
            assert!(
                listed.contains(id),
                "{}: list_sessions lacks {id:?}",
                self.name
            );
        }
        // Removing every other id leaves its look-alikes whole.
        for id in ids.iter().step_by(2) {
            self.check(
                "delete_session",
                &at(id),
                Expect::Ok,
                b.delete_session(id).await,
            );
            self.check(
                "delete_thread",
                &at(id),
                Expect::Ok,
                b.delete_thread(id).await,
            );
            assert!(b.get_session(id).await.unwrap().is_none());
            assert!(b.get_checkpoint(id, "", None).await.unwrap().is_none());
        }
        for (k, id) in ids.iter().enumerate().skip(1).step_by(2) {
            verify(b.clone(), self.name, k, (*id).to_owned()).await;
            b.delete_session(id).await.unwrap();
            b.delete_thread(id).await.unwrap();
        }
        b.delete_thread(ns_thread).await.unwrap();
    }

    /// The anchor got every item sent beside a hostile one; then the store must be empty:
    /// nothing was left under a mangled id.
    async fn finish(mut self) -> Tally {
        let b = self.b.clone();
        let history = b
            .get_conversation_history(&self.anchor, MAX_LIMIT)
            .await
            .unwrap();
        assert_eq!(
            history.len(),
            self.anchor_messages,
            "{}: anchor messages",
            self.name
        );
        let writes = b.get_writes(&self.anchor_thread, "", "cp").await.unwrap();
        assert_eq!(
            writes.len(),
            self.anchor_writes,
            "{}: anchor writes",
            self.name
        );
        assert!(b.delete_session(&self.anchor).await.unwrap());
        b.delete_thread(&self.anchor_thread).await.unwrap();
        let sessions = b
            .list_sessions(&SessionQuery::new().limit(MAX_LIMIT))
            .await
            .unwrap()
            .sessions;
        let left: Vec<&str> = sessions.iter().map(|s| s.session_id.as_str()).collect();
        assert!(
            left.is_empty(),
            "{}: sessions left behind: {left:?}",
            self.name
        );
        let threads = b.list_threads(None, MAX_LIMIT).await.unwrap().ids;
        assert!(
            threads.is_empty(),
            "{}: threads left behind: {threads:?}",
            self.name
        );
        let contexts = b.list_task_contexts(None, MAX_LIMIT).await.unwrap().ids;
        assert!(
            contexts.is_empty(),
            "{}: task contexts left behind: {contexts:?}",
            self.name
        );
        std::mem::take(&mut self.t)
    }
}

async fn hostile_matrix(name: &'static str, b: B) {
    let mut run = Run::new(name, b).await;
    let strings = corpus();
    for h in &strings {
        run.t.inputs.insert(h.label.clone());
        run.as_session_id(h).await;
        run.as_user_and_status(h).await;
        run.as_cursor(h).await;
        run.as_message_fields(h).await;
        run.as_thread_or_namespace(h, "thread_id").await;
        run.as_thread_or_namespace(h, "checkpoint_ns").await;
        run.as_checkpoint_id(h).await;
        run.as_task_and_channel(h).await;
        run.as_json_string(h).await;
    }
    for (label, v) in json_corpus() {
        run.t.inputs.insert(label.clone());
        run.as_json(&label, "k", &v).await;
        drop_deep(v);
    }
    run.limits().await;
    run.isolation().await;
    let t = run.finish().await;
    println!(
        "backend={name} inputs_tried={} (strings={}) calls={} stored_and_read_back={} \
         rejected_invalid_input={} fields={:?}",
        t.inputs.len(),
        strings.len(),
        t.calls,
        t.read_back,
        t.rejected,
        t.fields
    );
    assert!(
        t.inputs.len() >= 50,
        "the corpus holds {} inputs",
        t.inputs.len()
    );
    // Every method of the contract that takes input saw hostile values, and both
    // outcomes happened: the rules were exercised, not bypassed.
    assert!(t.read_back > 0 && t.rejected > 0);
    for field in [
        "session_id",
        "user_id",
        "status",
        "after",
        "before",
        "message_id",
        "role",
        "content",
        "metadata",
        "thread_id",
        "checkpoint_ns",
        "checkpoint_id",
        "parent_checkpoint_id",
        "task_id",
        "channel",
        "data",
        "context",
        "value",
        "writes",
        "limit",
        "sessions",
        "session_ids",
        "messages",
        "items",
        "checkpoints",
        "add_requests",
        "add_errors",
        "add_processing_time",
        "metrics",
        "total_processing_time",
        "max_idle",
    ] {
        assert!(
            t.fields.contains_key(field),
            "{name}: no input was rejected for `{field}`"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Redis helpers: a backend under a prefix of our own, raw access, cleanup
// ---------------------------------------------------------------------------------------

#[cfg(feature = "redis")]
mod raw_redis {
    use redis::aio::MultiplexedConnection;
    use redis::cluster_async::ClusterConnection;
    use redis::{Cmd, RedisResult, Value};

    /// A plain connection to the server (or cluster) under test, outside the backend.
    pub enum Raw {
        Node(MultiplexedConnection),
        Cluster {
            conn: ClusterConnection,
            masters: Vec<MultiplexedConnection>,
        },
    }

    async fn node(addr: &str) -> MultiplexedConnection {
        redis::Client::open(addr)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("raw redis connection")
    }

    impl Raw {
        pub async fn connect(url: &str) -> Raw {
            let Some(rest) = url.strip_prefix("redis+cluster://") else {
                return Raw::Node(node(url).await);
            };
            let seeds: Vec<String> = rest
                .split(',')
                .map(|n| format!("redis://{}", n.trim().trim_end_matches('/')))
                .collect();
            let conn = redis::cluster::ClusterClient::new(seeds.clone())
                .expect("cluster client")
                .get_async_connection()
                .await
                .expect("raw cluster connection");
            let mut seed = node(&seeds[0]).await;
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut seed)
                .await
                .expect("CLUSTER NODES");
            let mut masters = Vec::new();
            for line in nodes.lines() {
                let fields: Vec<&str> = line.split(' ').collect();
                if fields.len() > 2 && fields[2].split(',').any(|f| f == "master") {
                    let addr = fields[1].split('@').next().unwrap_or_default();
                    masters.push(node(&format!("redis://{addr}")).await);
                }
            }
            assert!(!masters.is_empty(), "no cluster masters in CLUSTER NODES");
            Raw::Cluster { conn, masters }
        }

        pub async fn query(&mut self, cmd: &Cmd) -> RedisResult<Value> {
            match self {
                Raw::Node(c) => cmd.query_async(c).await,
                Raw::Cluster { conn, .. } => cmd.query_async(conn).await,
            }
        }

        pub async fn run(&mut self, cmd: &Cmd) {
            self.query(cmd).await.expect("raw redis command");
        }

        /// Every key under `prefix`, by SCAN on the server or on each master.
        pub async fn keys(&mut self, prefix: &str) -> Vec<String> {
            let mut nodes: Vec<MultiplexedConnection> = match self {
                Raw::Node(c) => vec![c.clone()],
                Raw::Cluster { masters, .. } => masters.clone(),
            };
            let mut keys = Vec::new();
            for c in &mut nodes {
                let mut cursor: u64 = 0;
                loop {
                    let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{prefix}*"))
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(c)
                        .await
                        .expect("SCAN");
                    keys.extend(batch);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            keys.sort();
            keys.dedup();
            keys
        }

        /// Deletes every key under `prefix`; returns how many there were.
        pub async fn delete_prefix(&mut self, prefix: &str) -> usize {
            let keys = self.keys(prefix).await;
            for k in &keys {
                self.run(redis::cmd("DEL").arg(k)).await;
            }
            keys.len()
        }
    }
}

#[cfg(feature = "redis")]
fn redis_backend(url: &str, prefix: &str) -> aiecs_storage::RedisBackend {
    // A TTL as a safety net: if the test dies before its cleanup, the keys still go.
    let ttl = Some(Duration::from_secs(3600));
    aiecs_storage::RedisBackend::new(url)
        .expect("redis url")
        .with_prefix(prefix)
        .with_session_ttl(ttl)
        .with_checkpoint_ttl(ttl)
}

#[cfg(feature = "redis")]
fn redis_url(var: &str, target: &str) -> Option<String> {
    common::server_url(var, target)
}

// ---------------------------------------------------------------------------------------
// 1. The matrix, one test per backend
// ---------------------------------------------------------------------------------------

#[test]
fn hostile_inputs_memory() {
    on_big_stack("hostile_memory", || async {
        let t = targets::memory().await.expect("memory target");
        hostile_matrix("memory", t.backend.clone()).await;
        t.finish().await;
    });
}

#[cfg(feature = "sqlite")]
#[test]
fn hostile_inputs_sqlite() {
    on_big_stack("hostile_sqlite", || async {
        let t = targets::sqlite().await.expect("sqlite target");
        hostile_matrix("sqlite", t.backend.clone()).await;
        t.finish().await;
    });
}

#[cfg(feature = "redis")]
async fn hostile_redis(var: &'static str, name: &'static str) {
    let Some(url) = redis_url(var, name) else {
        return;
    };
    let prefix = format!("{}:", common::unique_name(name));
    let b: B = Arc::new(redis_backend(&url, &prefix));
    b.initialize().await.unwrap();
    hostile_matrix(name, b.clone()).await;
    b.close().await.unwrap();
    let mut raw = raw_redis::Raw::connect(&url).await;
    // Every record was deleted through the contract, so no key of any kind (sequence,
    // registry, dedupe set, index bucket) may outlive it under the prefix.
    let left = raw.delete_prefix(&prefix).await;
    println!("backend={name} keys_left_under_prefix={left}");
    assert_eq!(
        left, 0,
        "{name}: keys outlived every record deleted through the contract"
    );
}

#[cfg(feature = "redis")]
#[test]
fn hostile_inputs_redis() {
    on_big_stack("hostile_redis", || {
        hostile_redis("AIECS_TEST_REDIS_URL", "redis")
    });
}

#[cfg(feature = "redis")]
#[test]
fn hostile_inputs_redis_cluster() {
    on_big_stack("hostile_redis_cluster", || {
        hostile_redis("AIECS_TEST_REDIS_CLUSTER_URL", "redis_cluster")
    });
}

#[cfg(feature = "postgres")]
#[test]
fn hostile_inputs_postgres() {
    on_big_stack("hostile_postgres", || async {
        let Some(t) = targets::postgres().await else {
            return;
        };
        hostile_matrix("postgres", t.backend.clone()).await;
        t.backend.close().await.unwrap();
        t.finish().await;
    });
}

// ---------------------------------------------------------------------------------------
// 2. Corrupted records are Serialization errors
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Corruption {
    records: usize,
    reads: usize,
    kinds: BTreeMap<String, usize>,
}

impl Corruption {
    /// A read that meets a corrupted record: `Serialization`, not transient.
    fn serialization<T>(&mut self, backend: &str, what: &str, r: Result<T>) {
        self.reads += 1;
        match r {
            Err(e) if e.kind() == ErrorKind::Serialization && !e.is_transient() => {
                *self.kinds.entry("serialization".into()).or_default() += 1;
            }
            other => panic!(
                "{backend}: {what}: expected a Serialization error, got {}",
                outcome(&other)
            ),
        }
    }

    /// A read that meets a key of the wrong Redis type: the crate reports the server's
    /// WRONGTYPE reply; it must be a permanent error (never retried), not a panic and not
    /// a misleading kind such as NotFound or InvalidInput.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn permanent<T>(&mut self, backend: &str, what: &str, r: Result<T>) {
        self.reads += 1;
        match r {
            Err(e)
                if matches!(e.kind(), ErrorKind::Serialization | ErrorKind::Backend)
                    && !e.is_transient() =>
            {
                *self.kinds.entry(e.kind().as_str().to_owned()).or_default() += 1;
            }
            other => panic!(
                "{backend}: {what}: expected a permanent error, got {}",
                outcome(&other)
            ),
        }
    }

    fn print(&self, backend: &str) {
        println!(
            "backend={backend} corrupted_records={} reads={} error_kinds={:?}",
            self.records, self.reads, self.kinds
        );
    }
}

/// Seeds one record of each kind per id, for a corruption to hit.
async fn seed(
    b: &B,
    sessions: &[&str],
    message_sessions: &[&str],
    threads: &[&str],
    contexts: &[&str],
) {
    for s in sessions.iter().chain(message_sessions) {
        b.create_session(s, &format!("u-{s}"), &obj("k", json!(1)))
            .await
            .unwrap();
    }
    for s in message_sessions {
        b.add_conversation_message(s, &NewMessage::new("user", "hi").with_id("m1"))
            .await
            .unwrap();
    }
    for t in threads {
        b.store_checkpoint(
            &NewCheckpoint::new(*t, "c1", json!({"a": 1})).with_metadata(obj("k", json!(1))),
        )
        .await
        .unwrap();
        b.put_writes(t, "", "c1", "task", &[write("ch", json!(1))])
            .await
            .unwrap();
    }
    for c in contexts {
        b.store_task_context(c, &json!({"a": 1})).await.unwrap();
    }
}

async fn read_session(c: &mut Corruption, name: &str, b: &B, id: &str) {
    c.serialization(name, &format!("get_session({id})"), b.get_session(id).await);
    c.serialization(
        name,
        &format!("batch_get_sessions({id})"),
        b.batch_get_sessions(&[id.to_owned()]).await,
    );
    let q = SessionQuery::new().user(format!("u-{id}"));
    c.serialization(
        name,
        &format!("list_sessions(user of {id})"),
        b.list_sessions(&q).await,
    );
}

async fn read_messages(c: &mut Corruption, name: &str, b: &B, id: &str) {
    c.serialization(
        name,
        &format!("get_conversation_history({id})"),
        b.get_conversation_history(id, 10).await,
    );
    c.serialization(
        name,
        &format!("get_conversation_range({id})"),
        b.get_conversation_range(id, 0, 10).await,
    );
}

async fn read_checkpoint(c: &mut Corruption, name: &str, b: &B, t: &str) {
    c.serialization(
        name,
        &format!("get_checkpoint({t}, latest)"),
        b.get_checkpoint(t, "", None).await,
    );
    c.serialization(
        name,
        &format!("get_checkpoint({t}, c1)"),
        b.get_checkpoint(t, "", Some("c1")).await,
    );
    c.serialization(
        name,
        &format!("list_checkpoints({t})"),
        b.list_checkpoints(t, "", &CheckpointFilter::new()).await,
    );
}

/// The records nobody corrupted still read back.
async fn untouched_still_read(b: &B, name: &str) {
    let s = b
        .get_session("ok")
        .await
        .unwrap()
        .expect("untouched session");
    assert_eq!(s.metadata, obj("k", json!(1)), "{name}: untouched session");
    assert_eq!(
        b.get_conversation_history("ok", 10).await.unwrap().len(),
        1,
        "{name}"
    );
    let c = b
        .get_checkpoint("t-ok", "", None)
        .await
        .unwrap()
        .expect("untouched checkpoint");
    assert_eq!(c.data, json!({"a": 1}), "{name}");
    assert_eq!(
        b.get_writes("t-ok", "", "c1").await.unwrap().len(),
        1,
        "{name}"
    );
    assert_eq!(
        b.get_task_context("x-ok").await.unwrap(),
        Some(json!({"a": 1})),
        "{name}"
    );
}

#[cfg(feature = "sqlite")]
#[test]
fn corrupted_records_sqlite() {
    on_big_stack("corrupt_sqlite", || async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corrupt.db");
        let b: B = Arc::new(aiecs_storage::SqliteBackend::new(&path));
        b.initialize().await.unwrap();
        let sessions = [
            "s-meta", "s-shape", "s-count", "s-time", "s-neg", "s-range", "s-blob", "s-utf8",
        ];
        let message_sessions = ["ok", "m-meta", "m-blob", "m-utf8", "m-time"];
        let threads = [
            "t-ok",
            "t-data",
            "t-meta",
            "t-shape",
            "t-created",
            "t-value",
            "t-idx",
            "t-idx-range",
        ];
        let contexts = ["x-ok", "x-ctx", "x-blob"];
        seed(&b, &sessions, &message_sessions, &threads, &contexts).await;
        let raw = rusqlite::Connection::open(&path).unwrap();
        let corruptions = [
            "UPDATE sessions SET metadata = '{\"trunc' WHERE session_id = 's-meta'",
            "UPDATE sessions SET metadata = '[1,2]' WHERE session_id = 's-shape'",
            "UPDATE sessions SET request_count = 'abc' WHERE session_id = 's-count'",
            "UPDATE sessions SET created_at = 'not-a-time' WHERE session_id = 's-time'",
            "UPDATE sessions SET error_count = -1 WHERE session_id = 's-neg'",
            "UPDATE sessions SET updated_at = 9223372036854775807 WHERE session_id = 's-range'",
            "UPDATE sessions SET status = X'FFFE' WHERE session_id = 's-blob'",
            "UPDATE sessions SET status = CAST(X'C328' AS TEXT) WHERE session_id = 's-utf8'",
            "UPDATE messages SET metadata = '[1,' WHERE session_id = 'm-meta'",
            "UPDATE messages SET content = X'FF' WHERE session_id = 'm-blob'",
            "UPDATE messages SET role = CAST(X'FF' AS TEXT) WHERE session_id = 'm-utf8'",
            "UPDATE messages SET timestamp = 'yesterday' WHERE session_id = 'm-time'",
            "UPDATE checkpoints SET data = '{\"a\":' WHERE thread_id = 't-data'",
            "UPDATE checkpoints SET metadata = 'nul' WHERE thread_id = 't-meta'",
            "UPDATE checkpoints SET metadata = '[1,2]' WHERE thread_id = 't-shape'",
            "UPDATE checkpoints SET created_at = 'x' WHERE thread_id = 't-created'",
            "UPDATE checkpoint_writes SET value = '' WHERE thread_id = 't-value'",
            "UPDATE checkpoint_writes SET idx = 'x' WHERE thread_id = 't-idx'",
            "UPDATE checkpoint_writes SET idx = 4294967296 WHERE thread_id = 't-idx-range'",
            "UPDATE task_contexts SET context = '[1,' WHERE session_id = 'x-ctx'",
            "UPDATE task_contexts SET context = X'00FF' WHERE session_id = 'x-blob'",
        ];
        for sql in corruptions {
            assert_eq!(raw.execute(sql, []).unwrap(), 1, "{sql}");
        }
        drop(raw);
        let name = "sqlite";
        let mut c = Corruption {
            records: corruptions.len(),
            ..Default::default()
        };
        for s in sessions {
            read_session(&mut c, name, &b, s).await;
        }
        for s in ["m-meta", "m-blob", "m-utf8", "m-time"] {
            read_messages(&mut c, name, &b, s).await;
        }
        for t in ["t-data", "t-meta", "t-shape", "t-created"] {
            read_checkpoint(&mut c, name, &b, t).await;
        }
        let filter = CheckpointFilter::new().metadata_entry("k", 1);
        c.serialization(
            name,
            "list_checkpoints(t-meta, filtered)",
            b.list_checkpoints("t-meta", "", &filter).await,
        );
        for t in ["t-value", "t-idx", "t-idx-range"] {
            c.serialization(
                name,
                &format!("get_writes({t})"),
                b.get_writes(t, "", "c1").await,
            );
        }
        for x in ["x-ctx", "x-blob"] {
            c.serialization(
                name,
                &format!("get_task_context({x})"),
                b.get_task_context(x).await,
            );
        }
        untouched_still_read(&b, name).await;
        c.print(name);
        b.close().await.unwrap();
    });
}

#[cfg(feature = "redis")]
async fn corrupted_redis(var: &'static str, name: &'static str) {
    use redis::cmd;
    let Some(url) = redis_url(var, name) else {
        return;
    };
    let p = format!("{}:", common::unique_name(&format!("{name}_corrupt")));
    let b: B = Arc::new(redis_backend(&url, &p));
    b.initialize().await.unwrap();
    let sessions = [
        "s-count", "s-time", "s-float", "s-neg", "s-meta", "s-lacks", "s-utf8", "s-type",
    ];
    let message_sessions = ["ok", "m-json", "m-shape", "m-utf8", "m-type"];
    let threads = [
        "t-ok",
        "t-rec",
        "t-shape",
        "t-created",
        "t-writes",
        "t-writes-utf8",
        "t-type",
    ];
    let contexts = ["x-ok", "x-ctx", "x-utf8", "x-type"];
    seed(&b, &sessions, &message_sessions, &threads, &contexts).await;
    let mut raw = raw_redis::Raw::connect(&url).await;
    let session = |id: &str, suffix: &str| format!("{p}{{s:{id}}}:{suffix}");
    let checkpoints = |t: &str| format!("{p}{{t:{t}}}:ns::checkpoints");
    let values = |t: &str| format!("{p}{{t:{t}}}:ns::writes:c1:values");
    let bad_utf8: &[u8] = b"\xff\xfe";
    let mut records = 0;
    let mut hset = |key: String, field: &str, value: &[u8]| {
        records += 1;
        let mut c = cmd("HSET");
        c.arg(key).arg(field).arg(value);
        c
    };
    let fields = [
        hset(session("s-count", "session"), "request_count", b"abc"),
        hset(session("s-time", "session"), "created_at", b"not-a-time"),
        hset(session("s-float", "session"), "total_processing_time", b"x"),
        hset(session("s-neg", "session"), "error_count", b"-1"),
        hset(session("s-meta", "session"), "m:k", b"{trunc"),
        hset(session("s-utf8", "session"), "status", bad_utf8),
        hset(checkpoints("t-rec"), "r:c1", b"{"),
        hset(checkpoints("t-shape"), "r:c1", b"{\"parent\": 5}"),
        hset(checkpoints("t-created"), "c:c1", b"nope"),
        hset(values("t-writes"), "task\n0", b"not json"),
        hset(values("t-writes-utf8"), "task\n0", bad_utf8),
    ];
    for c in &fields {
        raw.run(c).await;
    }
    let mut c = Corruption {
        records: records + 10,
        ..Default::default()
    };
    raw.run(
        cmd("HDEL")
            .arg(session("s-lacks", "session"))
            .arg("user_id"),
    )
    .await;
    raw.run(
        cmd("RPUSH")
            .arg(session("m-json", "messages"))
            .arg("not json"),
    )
    .await;
    raw.run(
        cmd("RPUSH")
            .arg(session("m-shape", "messages"))
            .arg("{\"message_id\": 5}"),
    )
    .await;
    raw.run(
        cmd("RPUSH")
            .arg(session("m-utf8", "messages"))
            .arg(bad_utf8),
    )
    .await;
    raw.run(cmd("SET").arg(session("x-ctx", "context")).arg("[1,"))
        .await;
    raw.run(cmd("SET").arg(session("x-utf8", "context")).arg(bad_utf8))
        .await;
    for s in [
        "s-count", "s-time", "s-float", "s-neg", "s-meta", "s-lacks", "s-utf8",
    ] {
        read_session(&mut c, name, &b, s).await;
    }
    for s in ["m-json", "m-shape", "m-utf8"] {
        read_messages(&mut c, name, &b, s).await;
    }
    for t in ["t-rec", "t-shape", "t-created"] {
        read_checkpoint(&mut c, name, &b, t).await;
    }
    for t in ["t-writes", "t-writes-utf8"] {
        c.serialization(
            name,
            &format!("get_writes({t})"),
            b.get_writes(t, "", "c1").await,
        );
    }
    for x in ["x-ctx", "x-utf8"] {
        c.serialization(
            name,
            &format!("get_task_context({x})"),
            b.get_task_context(x).await,
        );
    }
    untouched_still_read(&b, name).await;
    // Keys of the wrong type, last: listings that meet them fail from then on.
    raw.run(cmd("DEL").arg(session("s-type", "session"))).await;
    raw.run(cmd("SET").arg(session("s-type", "session")).arg("a string"))
        .await;
    raw.run(cmd("DEL").arg(session("m-type", "messages"))).await;
    raw.run(
        cmd("HSET")
            .arg(session("m-type", "messages"))
            .arg("f")
            .arg("v"),
    )
    .await;
    raw.run(cmd("DEL").arg(session("x-type", "context"))).await;
    raw.run(cmd("RPUSH").arg(session("x-type", "context")).arg("x"))
        .await;
    raw.run(cmd("DEL").arg(checkpoints("t-type"))).await;
    raw.run(cmd("SET").arg(checkpoints("t-type")).arg("x"))
        .await;
    // Raw writes dropped some TTLs: put one back on every key, so a run that fails before
    // its cleanup still leaves nothing for long.
    for key in raw.keys(&p).await {
        raw.run(cmd("EXPIRE").arg(key).arg(3600)).await;
    }

    c.permanent(
        name,
        "get_session(s-type: a string key)",
        b.get_session("s-type").await,
    );
    c.permanent(
        name,
        "list_sessions(meets s-type)",
        b.list_sessions(&SessionQuery::new()).await,
    );
    c.permanent(
        name,
        "get_conversation_history(m-type: a hash key)",
        b.get_conversation_history("m-type", 10).await,
    );
    c.permanent(
        name,
        "get_conversation_range(m-type: a hash key)",
        b.get_conversation_range("m-type", 0, 10).await,
    );
    c.permanent(
        name,
        "get_task_context(x-type: a list key)",
        b.get_task_context("x-type").await,
    );
    c.permanent(
        name,
        "get_checkpoint(t-type: a string key)",
        b.get_checkpoint("t-type", "", Some("c1")).await,
    );
    c.permanent(
        name,
        "list_checkpoints(t-type: a string key)",
        b.list_checkpoints("t-type", "", &CheckpointFilter::new())
            .await,
    );
    c.print(name);
    b.close().await.unwrap();
    raw.delete_prefix(&p).await;
}

#[cfg(feature = "redis")]
#[test]
fn corrupted_records_redis() {
    on_big_stack("corrupt_redis", || {
        corrupted_redis("AIECS_TEST_REDIS_URL", "redis")
    });
}

#[cfg(feature = "redis")]
#[test]
fn corrupted_records_redis_cluster() {
    on_big_stack("corrupt_redis_cluster", || {
        corrupted_redis("AIECS_TEST_REDIS_CLUSTER_URL", "redis_cluster")
    });
}

#[cfg(feature = "postgres")]
async fn pg_raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("raw postgres connection");
    tokio::spawn(connection);
    client
}

#[cfg(feature = "postgres")]
async fn pg_backend(url: &str, schema: &str) -> B {
    let b: B = Arc::new(
        aiecs_storage::PostgresBackend::new(url)
            .unwrap()
            .with_schema(schema)
            .unwrap()
            .with_pool_size(2)
            .with_max_overflow(2),
    );
    b.initialize().await.unwrap();
    b
}

#[cfg(feature = "postgres")]
#[test]
fn corrupted_records_postgres() {
    on_big_stack("corrupt_postgres", || async {
        let Some(url) = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres") else {
            return;
        };
        let schema = common::unique_name("pg_corrupt");
        let b = pg_backend(&url, &schema).await;
        let sessions = ["s-array", "s-string", "s-count", "s-errors"];
        let message_sessions = ["ok", "m-meta", "m-null"];
        let threads = ["t-ok", "t-meta", "t-array", "t-idx"];
        seed(&b, &sessions, &message_sessions, &threads, &["x-ok"]).await;
        let raw = pg_raw(&url).await;
        let corruptions = [
            "UPDATE sessions SET metadata = '[1,2]' WHERE session_id = 's-array'",
            "UPDATE sessions SET metadata = '\"text\"' WHERE session_id = 's-string'",
            "UPDATE sessions SET request_count = -1 WHERE session_id = 's-count'",
            "UPDATE sessions SET error_count = -5 WHERE session_id = 's-errors'",
            "UPDATE messages SET metadata = '\"str\"' WHERE session_id = 'm-meta'",
            "UPDATE messages SET metadata = 'null' WHERE session_id = 'm-null'",
            "UPDATE checkpoints SET metadata = '5' WHERE thread_id = 't-meta'",
            "UPDATE checkpoints SET metadata = '[]' WHERE thread_id = 't-array'",
            "UPDATE checkpoint_writes SET idx = -1 WHERE thread_id = 't-idx'",
        ];
        raw.batch_execute(&format!("SET search_path TO \"{schema}\""))
            .await
            .unwrap();
        for sql in corruptions {
            assert_eq!(raw.execute(sql, &[]).await.unwrap(), 1, "{sql}");
        }
        let name = "postgres";
        let mut c = Corruption {
            records: corruptions.len(),
            ..Default::default()
        };
        for s in sessions {
            read_session(&mut c, name, &b, s).await;
        }
        for s in ["m-meta", "m-null"] {
            read_messages(&mut c, name, &b, s).await;
        }
        for t in ["t-meta", "t-array"] {
            read_checkpoint(&mut c, name, &b, t).await;
        }
        c.serialization(
            name,
            "get_writes(t-idx)",
            b.get_writes("t-idx", "", "c1").await,
        );
        untouched_still_read(&b, name).await;
        c.print(name);
        b.close().await.unwrap();
        raw.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// 3. Injection leaves the tables intact; Redis keys hold ids only escaped
// ---------------------------------------------------------------------------------------

const INJECTIONS: &[&str] = &[
    "'; DROP TABLE sessions; --",
    "x'); DELETE FROM messages; --",
    "\" OR 1=1 --",
    "' OR '1'='1",
    "1; DELETE FROM checkpoints WHERE 1=1",
    "'); DROP TABLE task_contexts; --",
    "a' UNION SELECT * FROM sessions --",
    "'; UPDATE sessions SET user_id = 'pwned'; --",
    "$1",
    "?1",
    "%' --",
    "_",
    "\\'; DROP TABLE checkpoint_writes; --",
];

/// Uses each injection string as every id and text of every record kind, then checks
/// that the keepers (records of ordinary ids) and the counts are exactly as written.
/// Returns how many records of each table it expects.
async fn inject(b: &B, name: &str) -> BTreeMap<&'static str, i64> {
    for k in 1..=3 {
        let id = format!("keep-{k}");
        b.create_session(&id, "keeper", &obj("k", json!(k)))
            .await
            .unwrap();
        b.add_conversation_message(&id, &NewMessage::new("user", "kept").with_id("m"))
            .await
            .unwrap();
        b.store_task_context(&id, &json!({"keep": k}))
            .await
            .unwrap();
    }
    b.store_checkpoint(&NewCheckpoint::new("keep-t", "cp", json!("kept")))
        .await
        .unwrap();
    b.put_writes("keep-t", "", "cp", "task", &[write("ch", json!("kept"))])
        .await
        .unwrap();
    for inj in INJECTIONS {
        let md = obj(inj, json!(inj));
        let s = b.create_session(inj, inj, &md).await.unwrap();
        assert_eq!(
            (s.session_id.as_str(), s.user_id.as_str()),
            (*inj, *inj),
            "{name}"
        );
        let update = SessionUpdate::new().status(*inj).merge_metadata(md.clone());
        assert!(b.update_session(inj, &update).await.unwrap());
        let m = NewMessage::new(*inj, *inj)
            .with_id(*inj)
            .with_metadata(md.clone());
        assert_eq!(b.add_conversation_message(inj, &m).await.unwrap(), *inj);
        b.store_task_context(inj, &json!(inj)).await.unwrap();
        let cp = NewCheckpoint::new(*inj, *inj, json!(inj))
            .with_namespace(*inj)
            .with_parent(*inj)
            .with_metadata(md.clone());
        b.store_checkpoint(&cp).await.unwrap();
        b.put_writes(inj, inj, inj, inj, &[write(inj, json!(inj))])
            .await
            .unwrap();
        // Reads and listings with the injection in every filter and cursor.
        let q = SessionQuery::new().user(*inj).status(*inj).after("");
        assert!(matches!(
            b.list_sessions(&q).await,
            Err(StorageError::InvalidInput { field: "after", .. })
        ));
        let q = SessionQuery::new().user(*inj).status(*inj);
        let page = b.list_sessions(&q).await.unwrap();
        assert_eq!(
            page.sessions.len(),
            1,
            "{name}: list_sessions(user = status = {inj:?})"
        );
        b.list_sessions(&SessionQuery::new().after(*inj))
            .await
            .unwrap();
        let filter = CheckpointFilter::new().before(*inj);
        assert!(b
            .list_checkpoints(inj, inj, &filter)
            .await
            .unwrap()
            .is_empty());
        let filter = CheckpointFilter {
            metadata: md.clone(),
            ..CheckpointFilter::new()
        };
        assert_eq!(
            b.list_checkpoints(inj, inj, &filter).await.unwrap().len(),
            1
        );
        b.list_threads(Some(*inj), 10).await.unwrap();
        b.list_task_contexts(Some(*inj), 10).await.unwrap();
        let got = b.get_session(inj).await.unwrap().expect("stored");
        assert_eq!(
            (got.user_id.as_str(), got.status.as_str(), &got.metadata),
            (*inj, *inj, &md),
            "{name}"
        );
        let h = b.get_conversation_history(inj, 10).await.unwrap();
        assert_eq!(
            (h.len(), h[0].content.as_str(), h[0].role.as_str()),
            (1, *inj, *inj),
            "{name}"
        );
        let w = b.get_writes(inj, inj, inj).await.unwrap();
        assert_eq!(w, vec![pending(inj, 0, inj, json!(inj))], "{name}");
        assert_eq!(
            b.list_checkpoint_namespaces(inj).await.unwrap(),
            [*inj],
            "{name}"
        );
    }
    for k in 1..=3 {
        let id = format!("keep-{k}");
        let s = b
            .get_session(&id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: {id} lost"));
        assert_eq!(
            (s.user_id.as_str(), &s.metadata),
            ("keeper", &obj("k", json!(k))),
            "{name}: {id} altered"
        );
        let h = b.get_conversation_history(&id, 10).await.unwrap();
        assert_eq!(h.len(), 1, "{name}: messages of {id}");
        assert_eq!(
            b.get_task_context(&id).await.unwrap(),
            Some(json!({"keep": k})),
            "{name}"
        );
    }
    let c = b
        .get_checkpoint("keep-t", "", None)
        .await
        .unwrap()
        .expect("keeper checkpoint");
    assert_eq!(c.data, json!("kept"), "{name}");
    assert_eq!(
        b.get_writes("keep-t", "", "cp").await.unwrap().len(),
        1,
        "{name}"
    );
    let n = INJECTIONS.len();
    let page = b
        .list_sessions(&SessionQuery::new().limit(MAX_LIMIT))
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 3 + n, "{name}: list_sessions count");
    let keepers = b
        .list_sessions(&SessionQuery::new().user("keeper"))
        .await
        .unwrap();
    assert_eq!(keepers.sessions.len(), 3, "{name}: keeper sessions");
    assert_eq!(
        b.list_threads(None, MAX_LIMIT).await.unwrap().ids.len(),
        1 + n,
        "{name}: threads"
    );
    assert_eq!(
        b.list_task_contexts(None, MAX_LIMIT)
            .await
            .unwrap()
            .ids
            .len(),
        3 + n,
        "{name}: contexts"
    );
    println!(
        "backend={name} injection ids={n} sessions_listed={} keepers_intact=3",
        page.sessions.len()
    );
    let n = n as i64;
    BTreeMap::from([
        ("sessions", 3 + n),
        ("messages", 3 + n),
        ("checkpoints", 1 + n),
        ("checkpoint_writes", 1 + n),
        ("task_contexts", 3 + n),
    ])
}

#[cfg(feature = "sqlite")]
#[test]
fn injection_leaves_sqlite_tables_intact() {
    on_big_stack("inject_sqlite", || async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inject.db");
        let b: B = Arc::new(aiecs_storage::SqliteBackend::new(&path));
        b.initialize().await.unwrap();
        let want = inject(&b, "sqlite").await;
        b.close().await.unwrap();
        let raw = rusqlite::Connection::open(&path).unwrap();
        for (table, rows) in want {
            let n: i64 = raw
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap_or_else(|e| panic!("sqlite: table {table} is gone: {e}"));
            assert_eq!(n, rows, "sqlite: rows in {table}");
            println!("backend=sqlite table={table} rows={n} expected={rows}");
        }
    });
}

#[cfg(feature = "postgres")]
#[test]
fn injection_leaves_postgres_tables_intact() {
    on_big_stack("inject_postgres", || async {
        let Some(url) = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres") else {
            return;
        };
        let schema = common::unique_name("pg_inject");
        let b = pg_backend(&url, &schema).await;
        let want = inject(&b, "postgres").await;
        b.close().await.unwrap();
        let raw = pg_raw(&url).await;
        for (table, rows) in want {
            let n: i64 = raw
                .query_one(&format!("SELECT count(*) FROM \"{schema}\".{table}"), &[])
                .await
                .unwrap_or_else(|e| panic!("postgres: table {table} is gone: {e}"))
                .get(0);
            assert_eq!(n, rows, "postgres: rows in {table}");
            println!("backend=postgres table={table} rows={n} expected={rows}");
        }
        raw.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .unwrap();
    });
}

/// Parses `E` of a key component: only `%25 %7B %7D %3A` escapes and no raw `{ } :`.
#[cfg(feature = "redis")]
fn unescape_component(e: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = e;
    while let Some(c) = rest.chars().next() {
        if c == '%' {
            let decoded = match rest.get(..3) {
                Some("%25") => '%',
                Some("%7B") => '{',
                Some("%7D") => '}',
                Some("%3A") => ':',
                _ => return None,
            };
            out.push(decoded);
            rest = &rest[3..];
        } else if matches!(c, '{' | '}' | ':') {
            return None;
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    Some(out)
}

/// What a key under the prefix is, per the documented layout; `None` if it fits no form.
#[cfg(feature = "redis")]
fn classify_key(prefix: &str, key: &str) -> Option<(String, String)> {
    let rest = key.strip_prefix(prefix)?;
    let rest = rest.strip_prefix('{')?;
    // Redis hashes the text between the first `{` and the next `}`: that must be the
    // whole tag, so an id can never move a key to another slot.
    let (tag, tail) = rest.split_once('}')?;
    let (kind, id) = tag.split_once(':')?;
    let id = unescape_component(id)?;
    let form = match kind {
        "s" => match tail {
            ":session" | ":messages" | ":message_ids" | ":context" => format!("session{tail}"),
            _ => return None,
        },
        "t" => {
            if tail == ":seq" || tail == ":keys" {
                format!("thread{tail}")
            } else {
                let ns_rest = tail.strip_prefix(":ns:")?;
                let parts: Vec<&str> = ns_rest.split(':').collect();
                let ns = unescape_component(parts[0])?;
                match parts[1..] {
                    ["order"] | ["checkpoints"] => format!("ns[{ns}]:{}", parts[1]),
                    ["writes", cp, "order" | "values"] => {
                        format!("ns[{ns}]:writes[{}]:{}", unescape_component(cp)?, parts[3])
                    }
                    _ => return None,
                }
            }
        }
        "idx" | "cidx" | "tidx" => {
            let n: u32 = id.parse().ok()?;
            let want: &[&str] = match kind {
                "idx" => &[":sessions_by_update", ":sessions_by_id"],
                "cidx" => &[":contexts_by_id"],
                _ => &[":threads_by_id"],
            };
            if n >= 16 || !want.contains(&tail) {
                return None;
            }
            format!("index{tail}")
        }
        _ => return None,
    };
    Some((id, form))
}

#[cfg(feature = "redis")]
async fn redis_keys_escape_ids(var: &'static str, name: &'static str) {
    let Some(url) = redis_url(var, name) else {
        return;
    };
    let prefix = format!("{}:", common::unique_name(&format!("{name}_keys")));
    let b: B = Arc::new(redis_backend(&url, &prefix));
    b.initialize().await.unwrap();
    let ids = [
        "{s:x}",
        "a}:b{",
        "*",
        "x:y",
        "}{",
        "%7B",
        "plain",
        "a?[b]",
        "{t:x}:ns:",
        "%",
        "{{}}",
        "'; DROP TABLE sessions; --",
    ];
    let ns = "n:s{}*";
    let cp = ":{cp}%";
    for id in ids {
        b.create_session(id, "u", &obj("k", json!(id)))
            .await
            .unwrap();
        b.add_conversation_message(id, &NewMessage::new("user", id))
            .await
            .unwrap();
        b.store_task_context(id, &json!(id)).await.unwrap();
        b.store_checkpoint(&NewCheckpoint::new(id, cp, json!(id)).with_namespace(ns))
            .await
            .unwrap();
        b.put_writes(id, ns, cp, "task", &[write("ch", json!(id))])
            .await
            .unwrap();
    }
    let mut raw = raw_redis::Raw::connect(&url).await;
    let keys = raw.keys(&prefix).await;
    let mut forms: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for key in &keys {
        let (id, form) = classify_key(&prefix, key)
            .unwrap_or_else(|| panic!("{name}: key {key:?} fits no documented form"));
        if !form.starts_with("index") {
            assert!(
                ids.contains(&id.as_str()),
                "{name}: key {key:?} names unknown id {id:?}"
            );
        }
        if form.starts_with("ns[") {
            assert!(form.starts_with(&format!("ns[{ns}]")), "{name}: {key:?}");
        }
        if form.contains("writes[") {
            assert!(form.contains(&format!("writes[{cp}]")), "{name}: {key:?}");
        }
        forms.entry(id).or_default().insert(form);
    }
    let mut want: BTreeSet<String> = [
        "session:session",
        "session:messages",
        "session:message_ids",
        "session:context",
        "thread:seq",
        "thread:keys",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for tail in [
        "order",
        "checkpoints",
        &format!("writes[{cp}]:order"),
        &format!("writes[{cp}]:values"),
    ] {
        want.insert(format!("ns[{ns}]:{tail}"));
    }
    for id in ids {
        let got = forms.get(id).cloned().unwrap_or_default();
        assert_eq!(got, want, "{name}: keys of id {id:?}");
    }
    println!(
        "backend={name} redis_keys={} ids={} every key in a documented form with the id escaped in its hash tag",
        keys.len(),
        ids.len()
    );
    b.close().await.unwrap();
    raw.delete_prefix(&prefix).await;
}

#[cfg(feature = "redis")]
#[test]
fn redis_keys_hold_ids_only_escaped() {
    on_big_stack("keys_redis", || {
        redis_keys_escape_ids("AIECS_TEST_REDIS_URL", "redis")
    });
}

#[cfg(feature = "redis")]
#[test]
fn redis_cluster_keys_hold_ids_only_escaped() {
    on_big_stack("keys_redis_cluster", || {
        redis_keys_escape_ids("AIECS_TEST_REDIS_CLUSTER_URL", "redis_cluster")
    });
}
