//! The change feed of the Redis backend, built on the server's own support for
//! client-side caching: on a RESP3 connection, `CLIENT TRACKING ON BCAST PREFIX
//! <prefix>{s: PREFIX <prefix>{t:` makes the server push the name of every key under
//! those prefixes that changes, whoever changed it and however (a write, an expiry, an
//! eviction, `FLUSHALL`). A key names the session or thread it belongs to (see
//! [`super::keys::change_of`]), which is all a cache needs.
//!
//! Tracking rather than a `PUBLISH` in every write script: writers send nothing more
//! and run no extra command, so a store nobody follows pays nothing; the server batches
//! the keys changed in one pass of its event loop into one message per follower, where
//! a `PUBLISH` would send one per write; writes made by other tools and versions, and
//! expiries, are reported too; and on a cluster each node reports its own writes with
//! no routing of messages between shards. README's Performance section has the cost.
//!
//! A cluster is followed node by node: one connection to every node, masters and
//! replicas alike. A replica reports nothing of what it replicates (Redis 7 sends no
//! invalidation for writes that arrive from its master; each write is reported once,
//! by the master that ran it), but it is followed already when a failover promotes it,
//! so the first write it takes as a master is reported. The node list is read with `CLUSTER NODES`
//! every [`TOPOLOGY_EVERY`]; nodes the cluster marks failed are left out, and a node
//! that appears is followed at once. The feed is up only while every node's connection
//! is: a node not followed could take writes nobody reports.
//!
//! The follower starts with the first subscription and stops when the backend closes
//! or is dropped, or when no subscription is left (the next one starts it again). Each
//! node's connection is checked every [`HEARTBEAT`], since a connection cut without a
//! word would otherwise look idle while changes go unreported, and reconnects after a
//! loss with backoff, the feed reported down meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, Notify};

use super::keys;
use crate::feed::listener::{Backoff, Ended, Follow, Listener, Listening};
use crate::feed::{ChangeFeed, FeedHub};

/// The first wait before reconnecting; it doubles after each failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often each node's connection is checked with a `PING`.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long connecting, enabling tracking or a `PING` may take before the connection
/// is taken for lost.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// How often a cluster's node list is read again; also how often the follower checks
/// that someone still subscribes.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// The backend's side of its feed.
#[derive(Debug, Default)]
pub(super) struct Feed(Listener);

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
}

impl Feed {
    /// A subscription, starting the follower if none runs.
    pub(super) fn subscribe(&self, source: impl FnOnce() -> Source) -> ChangeFeed {
        self.0.subscribe(|on| Follower {
            on,
            source: source(),
        })
    }

    /// The feed's state for a health report: `up`, `down` or `off`.
    pub(super) fn state_name(&self) -> &'static str {
        self.0.state_name()
    }

    /// Stops the follower for good: the backend is closed.
    pub(super) fn close(&self) {
        self.0.close();
    }
}

struct Follower {
    on: Listening,
    source: Source,
}

/// A node being followed: the task holding its connection, and whether tracking is on.
struct Node {
    task: tokio::task::JoinHandle<()>,
    /// Tells this task's reports from those of an earlier task for the same address.
    generation: u64,
    up: bool,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node task's report: its address, its generation, whether tracking is on.
type Report = (String, u64, bool);

impl Follow for Follower {
    /// Follows every node until stopped or unwatched, keeping the node set in step with
    /// the cluster's and the hub's state in step with the nodes'.
    async fn follow(&mut self) -> Ended {
        let (reports_tx, mut reports) = mpsc::unbounded_channel::<Report>();
        let mut nodes: HashMap<String, Node> = HashMap::new();
        let mut generation = 0u64;
        let mut topology = Topology::new(&self.source);
        let mut tick = tokio::time::interval(TOPOLOGY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some((address, from, up)) = reports.recv() => {
                    if let Some(node) = nodes.get_mut(&address) {
                        if node.generation == from {
                            node.up = up;
                        }
                    }
                }
                _ = tick.tick() => {
                    if self.on.unwatched() {
                        return Ended::Unwatched;
                    }
                    if let Some(found) = topology.nodes().await {
                        nodes.retain(|address, _| found.contains_key(address));
                        for (address, info) in found {
                            if nodes.contains_key(&address) {
                                continue;
                            }
                            generation += 1;
                            let task = tokio::spawn(track(
                                info,
                                self.source.clone(),
                                self.on.hub.clone(),
                                reports_tx.clone(),
                                (address.clone(), generation),
                            ));
                            nodes.insert(address, Node { task, generation, up: false });
                        }
                    }
                }
                _ = self.on.stop_signal() => return Ended::Stopped,
            }
            let up = !nodes.is_empty() && nodes.values().all(|n| n.up);
            if up != self.on.hub.is_up() {
                if up {
                    tracing::debug!(target = %self.source.redacted, nodes = nodes.len(), "redis change feed up");
                    self.on.hub.up();
                } else {
                    self.on.hub.down();
                }
            }
        }
    }
}

/// Where the nodes to follow come from: the one node of the URL, or a cluster's
/// `CLUSTER NODES`.
struct Topology {
    source: Source,
    /// Addresses to ask for the node list: the seeds, then every node found.
    known: Vec<ConnectionInfo>,
    /// The connection the last answer came on, kept while it answers.
    asking: Option<redis::aio::MultiplexedConnection>,
}

impl Topology {
    fn new(source: &Source) -> Topology {
        let known = source
            .urls
            .iter()
            .filter_map(|url| url.as_str().into_connection_info().ok())
            .collect();
        Topology {
            source: source.clone(),
            known,
            asking: None,
        }
    }

    /// The nodes to follow by address; `None` when no node answered (the set followed
    /// stays as it was).
    async fn nodes(&mut self) -> Option<HashMap<String, ConnectionInfo>> {
        if !self.source.cluster {
            let info = self.known.first()?.clone();
            return Some(HashMap::from([(info.addr().to_string(), info)]));
        }
        let mut candidates = self.known.clone().into_iter();
        loop {
            let mut conn = match self.asking.take() {
                Some(conn) => conn,
                None => {
                    let info = candidates.next()?;
                    match connect(&info, &self.source, AsyncConnectionConfig::new()).await {
                        Ok(conn) => conn,
                        Err(_) => continue,
                    }
                }
            };
            let answer = tokio::time::timeout(
                ANSWER_WITHIN,
                redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut conn),
            )
            .await;
            let Ok(Ok(text)) = answer else { continue };
            let seed = self.known.first()?.clone();
            let found: HashMap<String, ConnectionInfo> = live_nodes(&text)
                .into_iter()
                .map(|(host, port)| (format!("{host}:{port}"), at(&seed, host, port)))
                .collect();
            if found.is_empty() {
                continue;
            }
            for info in found.values() {
                if !self.known.iter().any(|k| k.addr() == info.addr()) {
                    self.known.push(info.clone());
                }
            }
            self.asking = Some(conn);
            return Some(found);
        }
    }
}

/// `seed`'s settings (credentials, TLS) for the node at `host:port`.
fn at(seed: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match seed.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    seed.clone().set_addr(addr)
}

/// The nodes of a `CLUSTER NODES` answer that can take or replicate writes: every
/// line's address, except nodes marked failed, without an address, or still joining.
fn live_nodes(text: &str) -> Vec<(&str, u16)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_id, address, flags) = (fields.next()?, fields.next()?, fields.next()?);
            if flags
                .split(',')
                .any(|f| matches!(f, "fail" | "noaddr" | "handshake"))
            {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            if host.is_empty() {
                return None;
            }
            Some((host, port.parse().ok()?))
        })
        .collect()
}

/// A connection to one node with the backend's credentials and TLS settings.
async fn connect(
    info: &ConnectionInfo,
    source: &Source,
    config: AsyncConnectionConfig,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = match &source.root_certificate {
        Some(pem) => redis::Client::build_with_tls(
            info.clone(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        )?,
        None => redis::Client::open(info.clone())?,
    };
    let config = config
        .set_connection_timeout(Some(ANSWER_WITHIN))
        .set_response_timeout(Some(ANSWER_WITHIN));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Follows one node for as long as its task lives: connects, turns tracking on,
/// reports up, publishes what the node pushes; after a loss reports down and connects
/// again with backoff.
async fn track(
    info: ConnectionInfo,
    source: Source,
    hub: FeedHub,
    reports: mpsc::UnboundedSender<Report>,
    (address, generation): (String, u64),
) {
    let info = {
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        info.set_redis_settings(settings)
    };
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    loop {
        let was_up = match session(&info, &source, &hub, || {
            let _ = reports.send((address.clone(), generation, true));
        })
        .await
        {
            Lost::Before(why) => {
                tracing::debug!(target = %source.redacted, node = %address, error = %why, "redis change feed: cannot follow node");
                false
            }
            Lost::After(why) => {
                tracing::warn!(target = %source.redacted, node = %address, error = %why, "redis change feed lost a node's connection; reconnecting");
                let _ = reports.send((address.clone(), generation, false));
                true
            }
        };
        if was_up {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

/// How a node's connection ended, with why.
enum Lost {
    /// Before tracking was on.
    Before(String),
    /// After it was on (the node had been reported up).
    After(String),
}

/// One connection to a node: tracking on, `up()` called, then pushes published until
/// the connection is lost.
async fn session(info: &ConnectionInfo, source: &Source, hub: &FeedHub, up: impl FnOnce()) -> Lost {
    let lost = Arc::new(Notify::new());
    // The sender runs on the connection's reading task: it must not block, and a
    // hub's publish does not.
    let sender = {
        let (hub, prefix, lost) = (hub.clone(), source.prefix.clone(), lost.clone());
        move |push: PushInfo| -> Result<(), ()> {
            match push.kind {
                PushKind::Invalidate => publish(&hub, &prefix, push.data),
                PushKind::Disconnection => lost.notify_one(),
                _ => {}
            }
            Ok(())
        }
    };
    let config = AsyncConnectionConfig::new().set_push_sender(sender);
    let mut conn = match connect(info, source, config).await {
        Ok(conn) => conn,
        Err(e) => return Lost::Before(scrub(&e, source)),
    };
    // Named after the process, so `CLIENT LIST` tells an operator whose it is.
    let name = format!("aiecs-storage-feed-{}", std::process::id());
    let mut tracking = redis::pipe();
    tracking
        .cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .ignore()
        .cmd("CLIENT");
    tracking.arg("TRACKING").arg("ON").arg("BCAST");
    for kind in ["s", "t"] {
        tracking
            .arg("PREFIX")
            .arg(format!("{}{{{kind}:", source.prefix));
    }
    if let Err(e) = tracking.exec_async(&mut conn).await {
        use redis::{ErrorKind::Server, ServerErrorKind::*};
        if matches!(e.kind(), Server(ResponseError | NoPerm)) {
            // Not a passing fault: say once, loudly, why caches over this store serve
            // nothing cached.
            tracing::error!(
                target = %source.redacted,
                error = %scrub(&e, source),
                "the redis server refused CLIENT TRACKING, so the change feed stays down and \
                 coherent caches over this store read through; set `coherent = false` on \
                 the cache to cache without following other processes' writes"
            );
        }
        return Lost::Before(scrub(&e, source));
    }
    up();
    loop {
        tokio::select! {
            _ = lost.notified() => return Lost::After("the connection closed".into()),
            _ = tokio::time::sleep(HEARTBEAT) => {
                let ping = redis::cmd("PING");
                match tokio::time::timeout(ANSWER_WITHIN, ping.query_async::<Value>(&mut conn)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Lost::After(scrub(&e, source)),
                    Err(_) => return Lost::After("the node stopped answering".into()),
                }
            }
        }
    }
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
    fn cluster_nodes_lists_every_node_that_holds_or_replicates_slots() {
        let text = "\
a1 127.0.0.1:7101@17101 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7102@17102,redis-b master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7103@17103 master,fail - 0 1 3 disconnected
d4 127.0.0.1:7104@17104 slave b2 0 1 2 connected
e5 :0@0 master,noaddr - 0 1 0 disconnected
f6 127.0.0.1:7106@17106 handshake - 0 0 0 connected
g7 ::1:7107@17107 slave,fail? a1 0 1 1 connected
";
        assert_eq!(
            live_nodes(text),
            [
                ("127.0.0.1", 7101),
                ("127.0.0.1", 7102),
                ("127.0.0.1", 7104),
                ("::1", 7107)
            ]
        );
    }

    #[test]
    fn a_node_keeps_the_seeds_credentials_and_tls() {
        let seed = "rediss://:secret@10.0.0.1:7000/"
            .into_connection_info()
            .unwrap();
        let node = at(&seed, "10.0.0.2", 7001);
        assert_eq!(node.addr().to_string(), "10.0.0.2:7001");
        assert!(matches!(node.addr(), ConnectionAddr::TcpTls { .. }));
        assert_eq!(node.redis_settings().password(), Some("secret"));
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
