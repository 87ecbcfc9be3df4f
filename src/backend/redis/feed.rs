//! The change feed of the Redis backend, built on the server's own support for
//! client-side caching in its default mode: the reads whose answers a cache may keep
//! (`get_session`, `batch_get_sessions`, `get_checkpoint`, `get_task_context`) go, while
//! a cache follows, on a connection of the feed's own (the reader: RESP3, one per node)
//! with `CLIENT TRACKING ON`, so the server remembers which keys this process read and
//! pushes each such key's name once when anyone changes it (a write by any client or
//! tool, an expiry, an eviction, `FLUSHALL`). A key names the session or thread it
//! belongs to (see [`super::keys::change_of`]), which is all a cache needs.
//!
//! Default mode rather than `BCAST` (every key under a prefix) or a `PUBLISH` in every
//! write script: the server reports only what a process read and may hold, once per
//! read, so writes nobody cached cost nothing to report, and a process is not sent its
//! own writes back unless it had read the key. README's Performance section compares
//! the three.
//!
//! Tracking is turned on when the reader opens, and on a cluster again in the same round
//! trip as each read (`CLIENT TRACKING ON`, then the read), since the cluster client
//! opens node connections on its own (a promoted replica, a node a slot moved to): a key
//! is never read on a connection that does not
//! track it. What the reader read before is tracked on its connection only, so the feed
//! goes down when that connection is lost (closed, or a `PING` every [`HEARTBEAT`] not
//! answered within [`ANSWER_WITHIN`]) and a new reader is opened with backoff, caches
//! reading through meanwhile. On a cluster a key can also change where the reader never
//! read it: on the new master after a failover, or on the node a slot moves to. The
//! feed reads the cluster's masters and slots (`CLUSTER NODES`) with each heartbeat and
//! reports missed changes when they differ from the last reading.
//!
//! The reader opens with the first subscription and closes when the backend closes or
//! is dropped, or when no subscription is left (the next one opens it again).

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{AsyncConnectionConfig, Cmd, IntoConnectionInfo, ProtocolVersion, PushInfo};
use redis::{FromRedisValue, PushKind, RedisResult, Value};
use tokio::sync::Notify;

use super::keys;
use crate::feed::listener::{Ended, Follow, Listener, Listening, Session};
use crate::feed::{ChangeFeed, FeedHub};

/// The first wait before reconnecting; it doubles after each failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the reader's connections are checked with a `PING` (on a cluster, also
/// how often its masters and slots are read).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a heartbeat may take before the reader is taken for lost.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// Commands [`Reader::query`] sends to a cluster at once.
const CLUSTER_CHUNK: usize = 256;

/// The backend's side of its feed: the listener, and the reader while it is up.
#[derive(Debug, Default)]
pub(super) struct Feed {
    listener: Listener,
    reader: Slot,
}

/// Where the follower puts its reader while it is up, for the backend's reads.
#[derive(Default)]
struct Slot(Arc<RwLock<Option<Reader>>>);

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Slot {
    fn get(&self) -> Option<Reader> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, reader: Option<Reader>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = reader;
    }
}

/// What the follower connects to: the backend's settings, secrets included; never
/// printed.
#[derive(Clone)]
pub(super) struct Source {
    /// The node's URL, or the cluster's seed URLs.
    pub(super) urls: Vec<String>,
    pub(super) cluster: bool,
    /// A PEM root certificate for `rediss://`.
    pub(super) root_certificate: Option<Vec<u8>>,
    pub(super) prefix: String,
    /// The redacted URL, the only form logged.
    pub(super) redacted: String,
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
}

impl Feed {
    /// A subscription, starting the follower if none runs.
    pub(super) fn subscribe(&self, source: impl FnOnce() -> Source) -> ChangeFeed {
        let slot = Slot(self.reader.0.clone());
        self.listener.subscribe(|on| Follower {
            on,
            source: source(),
            slot,
        })
    }

    /// The reader, while the feed is up: the connection reads a cache may keep go on.
    pub(super) fn reader(&self) -> Option<Reader> {
        self.reader.get()
    }

    /// The feed's state for a health report: `up`, `down` or `off`.
    pub(super) fn state_name(&self) -> &'static str {
        self.listener.state_name()
    }

    /// Stops the follower for good: the backend is closed.
    pub(super) fn close(&self) {
        self.listener.close();
        self.reader.set(None);
    }
}

/// The feed's connection for reads a cache may keep, tracking what it reads.
#[derive(Clone)]
pub(super) enum Reader {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Reader {
    /// Each command's reply, every command sent with tracking on for its connection;
    /// fails on the first error, as [`super::RedisBackend::many`] does.
    pub(super) async fn query(&self, cmds: &[Cmd]) -> RedisResult<Vec<Value>> {
        match self {
            // Tracking was turned on when the connection opened, and the reader ends
            // with it: a node's connection is never opened again behind its back.
            Reader::Node(conn) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                pipe.query_async(&mut conn.clone()).await
            }
            Reader::Cluster(conn) => {
                // The client opens node connections of its own accord (a promoted
                // replica, the node a slot moved to), so each command goes in one
                // pipeline after `CLIENT TRACKING ON`, to the node of its key (redis-rs
                // would route the pipeline by the `ON`), MOVED and ASK followed.
                let mut replies = Vec::with_capacity(cmds.len());
                for chunk in cmds.chunks(CLUSTER_CHUNK) {
                    let calls = chunk.iter().map(|cmd| {
                        let mut conn = conn.clone();
                        async move {
                            let slot = slot_of(cmd).ok_or_else(|| {
                                redis::RedisError::from((
                                    redis::ErrorKind::Client,
                                    "a tracked read without a key",
                                ))
                            })?;
                            let to = SingleNodeRoutingInfo::SpecificNode(Route::new(
                                slot,
                                SlotAddr::Master,
                            ));
                            let mut reply = conn.route_pipeline(tracked(cmd), 1, 1, to).await?;
                            reply.pop().unwrap_or(Value::Nil).extract_error()
                        }
                    });
                    for reply in futures_util::future::join_all(calls).await {
                        replies.push(reply?);
                    }
                }
                Ok(replies)
            }
        }
    }

    /// Names the connections and turns tracking on, to learn whether the server allows
    /// it.
    async fn enable(&self) -> RedisResult<()> {
        match self {
            Reader::Node(conn) => {
                let mut conn = conn.clone();
                name().exec_async(&mut conn).await?;
                tracking_on().exec_async(&mut conn).await
            }
            Reader::Cluster(conn) => {
                let every_master = || {
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::AllSucceeded),
                    ))
                };
                let mut conn = conn.clone();
                conn.route_command(name(), every_master()).await?;
                conn.route_command(tracking_on(), every_master())
                    .await
                    .map(drop)
            }
        }
    }

    /// Checks every connection answers; on a cluster, returns its masters and slots.
    async fn heartbeat(&self) -> RedisResult<Option<String>> {
        match self {
            Reader::Node(conn) => {
                redis::cmd("PING")
                    .query_async::<Value>(&mut conn.clone())
                    .await?;
                Ok(None)
            }
            Reader::Cluster(conn) => {
                let mut conn = conn.clone();
                let every_master = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                ));
                conn.route_command(redis::cmd("PING"), every_master).await?;
                let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                let mut nodes = redis::cmd("CLUSTER");
                nodes.arg("NODES");
                let text = conn.route_command(nodes, any).await?;
                let text = String::from_redis_value(text)?;
                Ok(Some(shards(&text)))
            }
        }
    }
}

/// `cmd` after `CLIENT TRACKING ON`: a connection the client opened since the last
/// read tracks from this one on. The reply of `cmd` is the pipeline's second.
fn tracked(cmd: &Cmd) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.add_command(tracking_on()).add_command(cmd.clone());
    pipe
}

fn tracking_on() -> Cmd {
    let mut on = redis::cmd("CLIENT");
    on.arg("TRACKING").arg("ON");
    on
}

/// Names the connection `aiecs-storage-feed-<pid>`, so `CLIENT LIST` tells an operator
/// whose it is.
fn name() -> Cmd {
    let mut name = redis::cmd("CLIENT");
    name.arg("SETNAME")
        .arg(format!("aiecs-storage-feed-{}", std::process::id()));
    name
}

/// The cluster slot of a read's key (the first key of a script): CRC16 of its hash tag,
/// or of the whole key without one, modulo 16384.
fn slot_of(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()??;
    let key = if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        args.nth(2)??
    } else {
        args.next()??
    };
    let tag = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    Some(crc16::State::<crc16::XMODEM>::calculate(tag) % 16384)
}

struct Follower {
    on: Listening,
    source: Source,
    slot: Slot,
}

/// Why the reader stopped being followed.
enum Watch {
    Lost(String),
    Ended(Ended),
}

impl Follow for Follower {
    const BACKOFF: (Duration, Duration) = (FIRST_BACKOFF, MAX_BACKOFF);

    /// Opens the reader, publishes it and reports the feed up, watches it; after a loss
    /// reports the feed down and drops the reader.
    async fn session(&mut self) -> Session {
        let lost = Arc::new(Notify::new());
        let (reader, shape) = match self.open(lost.clone()).await {
            Ok(opened) => opened,
            Err(why) => {
                tracing::debug!(target = %self.source.redacted, error = %why, "redis change feed: cannot connect");
                return Session::Lost { was_up: false };
            }
        };
        self.slot.set(Some(reader.clone()));
        tracing::debug!(target = %self.source.redacted, "redis change feed up");
        self.on.hub.up();
        let watched = self.watch(&reader, &lost, shape).await;
        // Down first: a read made meanwhile goes to the backend's own connection, and no
        // cache keeps it.
        self.on.down();
        self.slot.set(None);
        match watched {
            Watch::Ended(ended) => Session::Ended(ended),
            Watch::Lost(why) => {
                tracing::warn!(target = %self.source.redacted, error = %why, "redis change feed lost its connection; reconnecting");
                Session::Lost { was_up: true }
            }
        }
    }
}

impl Follower {
    /// A reader whose pushes are published, once the server has taken tracking on it;
    /// on a cluster, with the masters and slots it was opened on.
    async fn open(&self, lost: Arc<Notify>) -> Result<(Reader, Option<String>), String> {
        let source = &self.source;
        let scrubbed = |e: redis::RedisError| scrub(&e, source);
        // The sender runs on the connection's reading task: it must not block, and a
        // hub's publish does not.
        let sender = {
            let (hub, prefix) = (self.on.hub.clone(), source.prefix.clone());
            move |push: PushInfo| -> Result<(), ()> {
                match push.kind {
                    PushKind::Invalidate => publish(&hub, &prefix, push.data),
                    PushKind::Disconnection => lost.notify_one(),
                    _ => {}
                }
                Ok(())
            }
        };
        let certificates = source
            .root_certificate
            .as_ref()
            .map(|pem| redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        let reader = if source.cluster {
            let client = super::connection::cluster_builder(
                &source.urls,
                certificates,
                source.connect_timeout,
                source.response_timeout,
            )
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(sender)
            .build()
            .map_err(scrubbed)?;
            Reader::Cluster(client.get_async_connection().await.map_err(scrubbed)?)
        } else {
            let url = source.urls.first().ok_or("no URL")?;
            let info = url.as_str().into_connection_info().map_err(scrubbed)?;
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            let info = info.set_redis_settings(settings);
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(info, certificates),
                None => redis::Client::open(info),
            }
            .map_err(scrubbed)?;
            let config = AsyncConnectionConfig::new()
                .set_push_sender(sender)
                .set_connection_timeout(Some(source.connect_timeout))
                .set_response_timeout(Some(source.response_timeout));
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(scrubbed)?;
            Reader::Node(conn)
        };
        if let Err(e) = reader.enable().await {
            use redis::{ErrorKind::Server, ServerErrorKind::*};
            if matches!(e.kind(), Server(ResponseError | NoPerm)) {
                // Not a passing fault: say, loudly, why caches over this store serve
                // nothing cached.
                tracing::error!(
                    target = %source.redacted,
                    error = %scrub(&e, source),
                    "the redis server refused CLIENT TRACKING, so the change feed stays down and \
                     coherent caches over this store read through; set `coherent = false` on \
                     the cache to cache without following other processes' writes"
                );
            }
            return Err(scrub(&e, source));
        }
        match tokio::time::timeout(ANSWER_WITHIN, reader.heartbeat()).await {
            Ok(Ok(shape)) => Ok((reader, shape)),
            Ok(Err(e)) => Err(scrub(&e, source)),
            Err(_) => Err("the server did not answer".into()),
        }
    }

    /// Heartbeats until the reader is lost, the backend stops or nobody follows;
    /// reports missed changes when a cluster's masters or slots change.
    async fn watch(&self, reader: &Reader, lost: &Notify, mut shape: Option<String>) -> Watch {
        loop {
            tokio::select! {
                _ = lost.notified() => return Watch::Lost("the connection closed".into()),
                _ = self.on.stop_signal() => return Watch::Ended(Ended::Stopped),
                _ = tokio::time::sleep(HEARTBEAT) => {
                    if self.on.unwatched() {
                        return Watch::Ended(Ended::Unwatched);
                    }
                    match tokio::time::timeout(ANSWER_WITHIN, reader.heartbeat()).await {
                        Ok(Ok(now)) if now != shape => {
                            tracing::debug!(target = %self.source.redacted, "redis cluster's masters or slots changed: changes there may be missed");
                            self.on.hub.missed();
                            shape = now;
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Watch::Lost(scrub(&e, &self.source)),
                        Err(_) => return Watch::Lost("the server stopped answering".into()),
                    }
                }
            }
        }
    }
}

/// The masters of a `CLUSTER NODES` answer with their slots, one line each, sorted: the
/// same on every node while no failover or slot move is under way. A node marked failed,
/// without an address or still joining holds nothing.
fn shards(text: &str) -> String {
    let mut lines: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_id, address, flags) = (fields.next()?, fields.next()?, fields.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master")
                || flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "noaddr" | "handshake"))
            {
                return None;
            }
            // After the address: flags, master, ping, pong, epoch, link state, slots.
            let slots: Vec<&str> = fields.skip(5).collect();
            Some(format!("{address} {}", slots.join(" ")))
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// An error's text with nothing of the URL's secrets: only its kind and the server's
/// words are kept, never the connection details the client may add.
fn scrub(e: &redis::RedisError, source: &Source) -> String {
    let mut text = e.to_string();
    for url in &source.urls {
        for secret in crate::redact::url_secrets(url) {
            text = text.replace(secret.as_str(), "***");
        }
    }
    text
}

/// Publishes the changes an `invalidate` push names; a push without key names (the
/// server's answer to `FLUSHALL` or `FLUSHDB`) or with names it cannot read means
/// changes the cache cannot tell apart: reported missed.
fn publish(hub: &FeedHub, prefix: &str, data: Vec<Value>) {
    let Some(Value::Array(names)) = data.into_iter().next() else {
        hub.missed();
        return;
    };
    // The server lists the keys of one push in order, so the keys of one session or
    // thread (one write touches several) are neighbours: report each once.
    let mut last = None;
    for name in names {
        let change = match &name {
            Value::BulkString(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|key| keys::change_of(prefix, key)),
            Value::SimpleString(key) => keys::change_of(prefix, key),
            _ => None,
        };
        match change {
            Some(change) if last.as_ref() == Some(&change) => {}
            Some(change) => {
                hub.changed(change.clone());
                last = Some(change);
            }
            None => hub.missed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_shape_is_its_masters_and_slots_whoever_answers() {
        let seen_by_a = "\
a1 127.0.0.1:7101@17101 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7102@17102,redis-b master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7103@17103 master,fail - 0 1 3 disconnected
d4 127.0.0.1:7104@17104 slave b2 0 1 2 connected
e5 :0@0 master,noaddr - 0 1 0 disconnected
g7 127.0.0.1:7107@17107 master,fail? - 0 1 1 connected 10923-16383
";
        let seen_by_b = "\
b2 127.0.0.1:7102@17102,redis-b myself,master - 0 1 2 connected 5461-10922
g7 127.0.0.1:7107@17107 master - 0 1 1 connected 10923-16383
a1 127.0.0.1:7101@17101 master - 0 2 1 connected 0-5460
d4 127.0.0.1:7104@17104 slave b2 0 1 2 connected
";
        assert_eq!(
            shards(seen_by_a),
            "127.0.0.1:7101@17101 0-5460\n127.0.0.1:7102@17102,redis-b 5461-10922\n\
             127.0.0.1:7107@17107 10923-16383"
        );
        assert_eq!(shards(seen_by_a), shards(seen_by_b));
        let promoted = seen_by_b.replace("slave b2", "master -").replace(
            "127.0.0.1:7102@17102,redis-b myself,master - 0 1 2 connected 5461-10922",
            "127.0.0.1:7102@17102,redis-b myself,slave d4 0 1 2 connected",
        );
        let promoted = promoted.replace(
            "master - 0 1 2 connected\n",
            "master - 0 1 2 connected 5461-10922\n",
        );
        assert_ne!(shards(&promoted), shards(seen_by_b));
        let moving = seen_by_b.replace("0-5460", "0-5460 [5461->-b2]");
        assert_ne!(shards(&moving), shards(seen_by_b));
    }

    #[test]
    fn a_reads_slot_is_the_servers() {
        // Expected values from `CLUSTER KEYSLOT` on Redis 7.0.
        let get = |key: &str| {
            let mut c = redis::cmd("GET");
            c.arg(key);
            slot_of(&c)
        };
        assert_eq!(get("foo"), Some(12182));
        assert_eq!(get("p:{s:a%3Ab}:session"), Some(8967));
        assert_eq!(get("{}x"), Some(10595));
        assert_eq!(get("a{}{b}"), Some(15033));
        let mut script = redis::cmd("EVALSHA");
        script
            .arg("0123")
            .arg(2)
            .arg("p:{s:a%3Ab}:order")
            .arg("other");
        assert_eq!(slot_of(&script), Some(8967));
        assert_eq!(slot_of(&redis::cmd("PING")), None);
    }

    #[tokio::test]
    async fn an_invalidation_names_sessions_contexts_and_threads() {
        use crate::feed::{Change, FeedEvent};
        let hub = FeedHub::new();
        let mut feed = hub.subscribe();
        let key = |k: &str| Value::BulkString(k.as_bytes().to_vec());
        publish(
            &hub,
            "p:",
            vec![Value::Array(vec![
                key("p:{s:a%3Ab}:message_ids"),
                key("p:{s:a%3Ab}:messages"),
                key("p:{s:a%3Ab}:session"),
                key("p:{s:x}:context"),
                key("p:{t:t1}:ns::order"),
                key("p:{idx:1}:sessions_by_update"),
            ])],
        );
        publish(&hub, "p:", vec![Value::Nil]);
        assert_eq!(feed.next().await, Some(FeedEvent::Down));
        for wanted in [
            FeedEvent::Changed(Change::Session("a:b".into())),
            FeedEvent::Changed(Change::TaskContext("x".into())),
            FeedEvent::Changed(Change::Thread("t1".into())),
            FeedEvent::Missed,
            FeedEvent::Missed,
        ] {
            assert_eq!(feed.next().await, Some(wanted));
        }
    }
}
