//! The Redis backend: one node or a cluster; records written by Lua scripts, their
//! indexes kept true by the order of the steps.
//!
//! `mod.rs` holds the backend type and its settings; `keys` the key layout; `scripts`
//! the Lua scripts; `connection` connecting and running commands; `commands` the
//! commands that write records and their indexes; `decode` reading replies; one file
//! per storage trait beside them.

mod checkpoints;
mod commands;
mod connection;
mod conversation;
mod decode;
mod feed;
mod keys;
mod lifecycle;
mod scripts;
mod sessions;
mod task_context;

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

use crate::error::{Result, StorageError};
use crate::redact::{redact_url, url_secrets};

/// [`IDLE_INDEX_GRANULARITY_SECS`](crate::backend::IDLE_INDEX_GRANULARITY_SECS) in the unit of
/// the index's scores.
const INDEX_GRANULARITY_MICROS: i64 = crate::backend::IDLE_INDEX_GRANULARITY_SECS * 1_000_000;
/// A cluster's default response and connection timeouts: a failover takes a few
/// seconds (the cluster's node timeout and an election), and a call waiting 10 s on a
/// master that hangs would outlast it.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(1);
/// Candidates examined per cleanup round trip.
const CLEANUP_PAGE: usize = 256;

/// Stores everything in Redis, one node or a cluster.
///
/// URLs: `redis://[:password@]host:port[/db]`, `rediss://...` (TLS via rustls), and for a
/// cluster `redis+cluster://[:password@]h1:7000,h2:7001` (or `rediss+cluster://`) with
/// any number of seed nodes; `?prefix=app:` sets the key prefix, as
/// [`RedisBackend::with_prefix`] does. A single node uses one multiplexed, auto-reconnecting
/// connection (`ConnectionManager`); a cluster uses the async cluster client, which
/// follows MOVED and ASK. Concurrent calls share the connection and are pipelined. On a
/// cluster, counter increments use a second connection (one more per master) whose
/// client never sends a command again once it may have run, so one call never counts
/// twice.
///
/// Keys live under a prefix (default `aiecs:`); every key of a session or a thread
/// carries the same hash tag, so multi-key steps run as one Lua script in one slot. A
/// session and its keys expire after a TTL (default 24 hours, as in the spec) refreshed
/// on every write to the session; checkpoints do not expire unless
/// [`RedisBackend::with_checkpoint_ttl`] says so. `cleanup_expired_sessions` walks an
/// index of sessions by last update (16 sorted sets spread over the cluster's masters),
/// never `KEYS` or `SCAN`.
///
/// It offers a change feed ([`StorageBackend::changes`](crate::StorageBackend::changes)),
/// so a cache in each of several processes stays coherent: while a cache follows it, the
/// reads a cache may keep go on a connection of the feed's own with client tracking on
/// (`CLIENT TRACKING ON`, RESP3), and the server reports each key this process read
/// once when anyone changes it. Writes pay nothing for keys nobody read; a cluster's
/// masters and slots are read every second, a change of them counted as missed
/// changes.
///
/// The password never appears in errors or `Debug` output.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::{prelude::*, RedisBackend};
/// let storage = RedisBackend::new("redis://127.0.0.1:6379")?.with_prefix("myapp:");
/// storage.initialize().await?;
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// # Ok(()) }
/// ```
pub struct RedisBackend {
    target: Target,
    redacted: String,
    /// The URL's secrets, to scrub from any error text the client library produces.
    secrets: Vec<String>,
    prefix: String,
    session_ttl: Option<Duration>,
    checkpoint_ttl: Option<Duration>,
    root_certificate: Option<Vec<u8>>,
    response_timeout: Duration,
    connect_timeout: Duration,
    conn: connection::Link,
    closed: AtomicBool,
    feed: feed::Feed,
}

enum Target {
    Node(String),
    Cluster(Vec<String>),
}

#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster {
        /// Every command but counter increments: idempotent, so the client may send one
        /// again after a timeout or a dropped connection (its default retries).
        shared: ClusterConnection,
        /// Counter increments: never sent again by the client (see `RedisBackend::connect`).
        once: ClusterConnection,
    },
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.redacted)
            .field("prefix", &self.prefix)
            .field("session_ttl", &self.session_ttl)
            .field("checkpoint_ttl", &self.checkpoint_ttl)
            .finish_non_exhaustive()
    }
}

/// Splits a `prefix=` query parameter off a Redis URL.
fn take_prefix_param(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut prefix = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("prefix=") {
            Some(p) => {
                prefix = Some(p.replace("%3A", ":").replace("%3a", ":"));
                false
            }
            None => true,
        })
        .collect();
    if rest.is_empty() {
        (base.to_owned(), prefix)
    } else {
        (format!("{base}?{}", rest.join("&")), prefix)
    }
}

fn invalid_url(reason: impl Into<String>) -> StorageError {
    StorageError::invalid_input("url", reason)
}

impl RedisBackend {
    /// A backend for `url` (see the type docs for the forms). Nothing connects until
    /// `initialize()` or the first call.
    pub fn new(url: &str) -> Result<Self> {
        // `?prefix=` is ours, not the client's: take it out before the client parses.
        let (url, prefix) = take_prefix_param(url);
        let url = url.as_str();
        let (redacted, secrets) = (redact_url(url), url_secrets(url));
        let target = if let Some(rest) = url
            .strip_prefix("redis+cluster://")
            .map(|r| ("redis", r))
            .or_else(|| url.strip_prefix("rediss+cluster://").map(|r| ("rediss", r)))
        {
            let (scheme, rest) = rest;
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let (userinfo, hosts) = match authority.rsplit_once('@') {
                Some((u, h)) => (format!("{u}@"), h),
                None => (String::new(), authority),
            };
            let nodes: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("{scheme}://{userinfo}{h}{path}"))
                .collect();
            if nodes.is_empty() {
                return Err(invalid_url(format!(
                    "cluster URL {redacted} names no seed node"
                )));
            }
            for node in &nodes {
                redis::Client::open(node.as_str())
                    .map_err(|_| invalid_url(format!("cannot parse cluster URL {redacted}")))?;
            }
            Target::Cluster(nodes)
        } else if url.starts_with("redis://") || url.starts_with("rediss://") {
            redis::Client::open(url)
                .map_err(|_| invalid_url(format!("cannot parse Redis URL {redacted}")))?;
            Target::Node(url.to_owned())
        } else {
            return Err(invalid_url(format!(
                "{redacted} is not a redis://, rediss://, redis+cluster:// or \
                 rediss+cluster:// URL"
            )));
        };
        let cluster = matches!(target, Target::Cluster(_));
        Ok(RedisBackend {
            target,
            redacted,
            secrets,
            prefix: prefix.unwrap_or_else(|| "aiecs:".to_owned()),
            session_ttl: Some(Duration::from_secs(24 * 3600)),
            checkpoint_ttl: None,
            root_certificate: None,
            response_timeout: if cluster {
                CLUSTER_TIMEOUT
            } else {
                Duration::from_secs(10)
            },
            connect_timeout: if cluster {
                CLUSTER_TIMEOUT
            } else {
                Duration::from_secs(5)
            },
            conn: connection::Link::default(),
            closed: AtomicBool::new(false),
            feed: feed::Feed::default(),
        })
    }

    /// Sets the key prefix (default `aiecs:`). Backends with different prefixes share a
    /// server without seeing each other's data.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets how long a session and its keys live after their last write (default 24
    /// hours; `None` keeps them until cleanup).
    pub fn with_session_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// Sets how long a thread's checkpoints and writes live after their last write
    /// (default `None`: until `delete_thread`).
    pub fn with_checkpoint_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.checkpoint_ttl = ttl;
        self
    }

    /// Sets how long a command may wait for its reply before it fails with
    /// [`StorageError::Timeout`] (default 10 s on a node, 1 s on a cluster). A safety net
    /// against a hung server; put a timeout layer in the stack for per-operation
    /// deadlines. On a cluster it is also how soon a master that hangs with its
    /// connections open is noticed: a timeout makes the client read the cluster's slots
    /// again and connect anew (at most once a second), so once a replica is promoted in
    /// its place, calls go to the replica.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets how long opening a connection to a node may take (default 5 s on a node, 1 s
    /// on a cluster, where a node that does not answer is skipped for the next).
    pub fn with_connection_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Trusts this PEM certificate (a private CA or a self-signed server certificate)
    /// for `rediss://` connections, instead of the public web roots.
    pub fn with_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    fn certificates(&self) -> Option<redis::TlsCertificates> {
        self.root_certificate
            .as_ref()
            .map(|pem| redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            })
    }

    /// The URL with the password masked.
    pub fn redacted_url(&self) -> &str {
        &self.redacted
    }

    fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    fn ttl_ms(ttl: Option<Duration>) -> u64 {
        ttl.map_or(0, |t| t.as_millis().max(1) as u64)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::connection::failed_to_connect;
    use super::decode::{decode_message, decode_stored_message, StoredMessage};
    use super::*;
    use crate::model::Message;

    /// What a command's client error becomes: only an error that opening a connection
    /// alone gives is `Unavailable`, and only when the client sent the command at most
    /// once; a broken connection may have carried the command and stays `Connection`.
    #[test]
    fn only_a_connection_never_made_is_unavailable() {
        use std::io::{Error, ErrorKind};
        let io = |kind| redis::RedisError::from(Error::from(kind));
        let node = RedisBackend::new("redis://:pw-1@127.0.0.1:1").unwrap();
        let cluster = RedisBackend::new("redis+cluster://:pw-1@127.0.0.1:1").unwrap();

        let e = node.error(io(ErrorKind::ConnectionRefused));
        assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
        assert!(!e.may_have_applied() && e.is_transient());
        assert_eq!(
            e.to_string(),
            "storage unavailable: cannot connect to redis at redis://:***@127.0.0.1:1: \
             connection refused"
        );
        let dns = redis::RedisError::from(Error::other(
            "failed to lookup address information: Name or service not known",
        ));
        assert_eq!(node.error(dns).kind(), crate::ErrorKind::Unavailable);
        for kind in [
            ErrorKind::ConnectionReset,
            ErrorKind::BrokenPipe,
            ErrorKind::UnexpectedEof,
            ErrorKind::ConnectionAborted,
            ErrorKind::HostUnreachable,
        ] {
            let e = node.error(io(kind));
            assert!(
                matches!(e, StorageError::Connection { .. }),
                "{kind:?}: {e:?}"
            );
            assert!(e.may_have_applied());
        }
        assert!(matches!(
            node.error(io(ErrorKind::TimedOut)),
            StorageError::Timeout { .. }
        ));

        // The cluster's shared client may have sent it before it was refused a
        // connection; its `once` client did not.
        let e = cluster.error(io(ErrorKind::ConnectionRefused));
        assert!(matches!(e, StorageError::Connection { .. }), "{e:?}");
        let e = cluster.error_sent_once(io(ErrorKind::ConnectionRefused));
        assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");

        // Opening: whatever would pass is Unavailable, the rest keeps its kind.
        for e in [io(ErrorKind::TimedOut), io(ErrorKind::ConnectionReset)] {
            let e = node.connect_error(e);
            assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
            assert!(e.to_string().contains("cannot connect to redis at "), "{e}");
        }
        let auth = redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "no"));
        assert!(matches!(
            node.connect_error(auth),
            StorageError::Authentication { .. }
        ));
    }

    /// The resolver's error text, which [`failed_to_connect`] recognises.
    #[tokio::test]
    async fn a_name_that_does_not_resolve_failed_to_connect() {
        let err = tokio::net::lookup_host(("no-such-host.invalid", 6379))
            .await
            .err()
            .expect("the .invalid domain never resolves");
        let err = redis::RedisError::from(err);
        assert!(failed_to_connect(&err, &err.to_string()), "{err}");
    }

    fn stored(message: &Message) -> String {
        serde_json::to_string(&StoredMessage {
            message_id: &message.message_id,
            role: &message.role,
            content: &message.content,
            timestamp: message.timestamp,
            metadata: &message.metadata,
        })
        .unwrap()
    }

    fn message(content: &str, metadata: serde_json::Value, timestamp: &str) -> Message {
        Message {
            message_id: "0193a1b2-c3d4-7e5f-a7b8-c9d0e1f2a3b4".into(),
            role: "user".into(),
            content: content.into(),
            timestamp: timestamp.parse().unwrap(),
            metadata: match metadata {
                Value::Object(map) => map,
                _ => unreachable!("metadata is an object"),
            },
        }
    }

    #[test]
    fn stored_messages_read_back_the_same_whichever_path_decodes_them() {
        let cases = [
            message("plain text", json!({}), "2026-11-26T11:22:33.123456Z"),
            message("", json!({"turn": 1}), "2026-11-26T11:22:33Z"),
            message(
                "ünïcödé ✓ 🦀",
                json!({"a": {"b": [1, 2.5, null]}}),
                "2026-01-01T00:00:00.1Z",
            ),
            message(
                "quote \" and backslash \\",
                json!({}),
                "2026-11-26T11:22:33.123456789Z",
            ),
            message(
                "tab\tnewline\ncontrol\u{1}",
                json!({"k": "v\"}"}),
                "1999-12-31T23:59:59Z",
            ),
        ];
        for expected in &cases {
            let text = stored(expected);
            assert_eq!(&decode_message(&text).unwrap(), expected, "{text}");
            let serde: Message = serde_json::from_str(&text).unwrap();
            assert_eq!(&serde, expected, "{text}");
            if let Some(fast) = decode_stored_message(&text) {
                assert_eq!(&fast, expected, "{text}");
            }
        }
    }

    #[test]
    fn the_fast_path_reads_what_the_backend_writes() {
        for metadata in [json!({}), json!({"turn": 1, "tags": ["a", "b"]})] {
            let expected = message("hello", metadata, "2026-11-26T11:22:33.123456Z");
            assert_eq!(decode_stored_message(&stored(&expected)), Some(expected));
        }
        // Escapes are left to serde_json.
        let escaped = message("say \"hi\"", json!({}), "2026-11-26T11:22:33Z");
        assert_eq!(decode_stored_message(&stored(&escaped)), None);
    }

    #[test]
    fn what_the_fast_path_does_not_know_is_decided_by_serde_json() {
        let ts = "2026-11-26T11:22:33Z";
        let head = format!(r#"{{"message_id":"m","role":"user","content":"c","timestamp":"{ts}""#);
        let texts = [
            // A field after metadata, whitespace, another order, an offset timestamp.
            format!(r#"{head},"metadata":{{}},"extra":1}}"#),
            format!(r#"{head}, "metadata": {{}} }}"#),
            format!(r#"{{"role":"user","message_id":"m","content":"c","timestamp":"{ts}","metadata":{{}}}}"#),
            r#"{"message_id":"m","role":"user","content":"c","timestamp":"2026-11-26T12:22:33+01:00","metadata":{}}"#.to_owned(),
            // Invalid: a raw control character, metadata that is not an object, truncation.
            format!(r#"{},"metadata":{{}}}}"#, head.replace(r#""c""#, "\"c\u{1}\"")),
            format!(r#"{head},"metadata":[]}}"#),
            format!(r#"{head},"metadata":{{"#),
        ];
        for text in &texts {
            assert_eq!(decode_stored_message(text), None, "{text}");
            let serde = serde_json::from_str::<Message>(text);
            match decode_message(text) {
                Ok(m) => assert_eq!(m, serde.unwrap(), "{text}"),
                Err(e) => {
                    assert!(serde.is_err(), "{text}");
                    assert!(
                        matches!(e, StorageError::Serialization { .. }),
                        "{text}: {e}"
                    );
                }
            }
        }
    }
}
