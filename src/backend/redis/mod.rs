//! Redis and Redis Cluster backend (feature `redis`).

mod keys;
mod scripts;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Value as RedisValue};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use crate::error::{Result, StorageError};
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, IdPage, Message, Metadata, MetricsReport,
    NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionMetrics, SessionPage,
    SessionQuery, SessionStatus, SessionUpdate, TaskWrites, WriteInput,
};
use crate::redact::{redact_url, url_secrets};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
};
use crate::validate;
use keys::{Index, SessionKeys, ThreadKeys};
use scripts::Lua;

/// [`IDLE_INDEX_GRANULARITY_SECS`](super::IDLE_INDEX_GRANULARITY_SECS) in the unit of
/// the index's scores.
const INDEX_GRANULARITY_MICROS: i64 = super::IDLE_INDEX_GRANULARITY_SECS * 1_000_000;
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
    conn: OnceCell<Conn>,
    closed: AtomicBool,
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
        Ok(RedisBackend {
            target,
            redacted,
            secrets,
            prefix: prefix.unwrap_or_else(|| "aiecs:".to_owned()),
            session_ttl: Some(Duration::from_secs(24 * 3600)),
            checkpoint_ttl: None,
            root_certificate: None,
            response_timeout: Duration::from_secs(10),
            conn: OnceCell::new(),
            closed: AtomicBool::new(false),
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
    /// [`StorageError::Timeout`] (default 10 s). A safety net against a hung server; put a
    /// timeout layer in the stack for per-operation deadlines.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
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

    /// The client error's text with the URL's secrets scrubbed.
    fn text(&self, e: &redis::RedisError) -> String {
        let mut text = e.to_string();
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }

    /// Turns the error of a command into a [`StorageError`] of the right kind, with the
    /// password scrubbed from its text. On a node, the command went through a
    /// `ConnectionManager`, which sends a command at most once (see
    /// [`Self::error_sent_once`]); on a cluster, through the shared client, which may
    /// have sent it before the error it reports.
    fn error(&self, e: redis::RedisError) -> StorageError {
        self.command_error(e, !self.is_cluster())
    }

    /// [`Self::error`] for a command its client sent at most once and never again after a
    /// failure (a node's `ConnectionManager`, the cluster's `once` client behind
    /// [`Conn::query_once`]): an error only opening a connection gives means this command
    /// was never sent, and is [`StorageError::Unavailable`].
    fn error_sent_once(&self, e: redis::RedisError) -> StorageError {
        self.command_error(e, true)
    }

    fn command_error(&self, e: redis::RedisError, sent_once: bool) -> StorageError {
        use redis::ErrorKind;
        let text = self.text(&e);
        if sent_once && failed_to_connect(&e, &text) {
            // A `ConnectionManager` waits for its reconnection before it sends a
            // command, and fails the command with the reconnection's error.
            return StorageError::Unavailable {
                message: format!("cannot connect to redis at {}: {text}", self.redacted),
            };
        }
        let message = format!("redis at {}: {text}", self.redacted);
        match e.kind() {
            ErrorKind::AuthenticationFailed => StorageError::Authentication {
                message: format!("redis at {} refused the credentials", self.redacted),
            },
            // The server or the client refused the command before it ran.
            _ if refused_without_running(&e) => StorageError::Unavailable { message },
            _ if e.is_timeout() => StorageError::Timeout {
                operation: "redis command",
                after: self.response_timeout,
            },
            _ if e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_cluster_error() =>
            {
                StorageError::Connection {
                    message,
                    source: None,
                }
            }
            _ => StorageError::Backend {
                message,
                transient: false,
                source: None,
            },
        }
    }

    /// Turns an error of opening the connection (`initialize()` or a first call) into a
    /// [`StorageError`]: no command of the caller was sent yet, so what would pass is
    /// [`StorageError::Unavailable`] (a refused or timed-out connection, a name that does
    /// not resolve, a failed TLS handshake); what will not pass (credentials refused, a
    /// bad configuration) keeps its kind.
    fn connect_error(&self, e: redis::RedisError) -> StorageError {
        let text = self.text(&e);
        match self.command_error(e, true) {
            e @ StorageError::Unavailable { .. } => e,
            e if e.is_transient() => StorageError::Unavailable {
                message: format!("cannot connect to redis at {}: {text}", self.redacted),
            },
            e => e,
        }
    }

    async fn connect(&self) -> Result<Conn> {
        super::tls::install_crypto_provider();
        let conn = match &self.target {
            Target::Node(url) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(self.response_timeout))
                    .set_number_of_retries(3);
                let client = match self.certificates() {
                    Some(certs) => redis::Client::build_with_tls(url.as_str(), certs),
                    None => redis::Client::open(url.as_str()),
                };
                match client {
                    Ok(client) => ConnectionManager::new_with_config(client, config)
                        .await
                        .map(Conn::Node),
                    Err(e) => Err(e),
                }
            }
            Target::Cluster(nodes) => {
                let client = |retries: Option<u32>| {
                    let mut builder = redis::cluster::ClusterClient::builder(nodes.clone())
                        .connection_timeout(Duration::from_secs(5))
                        .response_timeout(self.response_timeout);
                    if let Some(certs) = self.certificates() {
                        builder = builder.certs(certs);
                    }
                    if let Some(retries) = retries {
                        builder = builder.retries(retries);
                    }
                    builder.build()
                };
                // The cluster client sends a command again after a dropped connection or
                // an I/O error (redis-rs 1.8 `RetryMethod::Reconnect`/`RetryImmediately`),
                // though the server may have run it before the reply was lost: harmless
                // for keyed writes and reads, a double count for an `update_session`
                // increment, outside RetryLayer's policy (which retries an increment only
                // after `Unavailable`). Its retry count is per client, not per command, and
                // `retries(0)` also stops it following MOVED and ASK and waiting out a
                // reconnect, which every other command needs. So increments get a client
                // of their own with `retries(0)`, and `Conn::query_once` re-sends only
                // what the server refused without running (MOVED, ASK, TRYAGAIN, ...).
                // It costs one more connection per master.
                match (client(None), client(Some(0))) {
                    (Ok(shared), Ok(once)) => {
                        tokio::try_join!(shared.get_async_connection(), once.get_async_connection())
                            .map(|(shared, once)| Conn::Cluster { shared, once })
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
        }
        .map_err(|e| self.connect_error(e))?;
        let mut c = conn.clone();
        // Loading is part of opening: the caller's command is not sent yet.
        load_scripts(&mut c)
            .await
            .map_err(|e| self.connect_error(e))?;
        self.upgrade_indexes(&mut c).await?;
        Ok(conn)
    }

    /// Moves index buckets an older version wrote to the current layout (see
    /// `keys`): one script a bucket, a few O(1) checks once done.
    async fn upgrade_indexes(&self, conn: &mut Conn) -> Result<()> {
        let mut cmds = Vec::new();
        for index in [Index::SessionIds, Index::Contexts, Index::Threads] {
            for n in 0..keys::INDEX_BUCKETS {
                let keys = index.upgrade_keys(&self.prefix, n);
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                cmds.push(evalsha(&scripts::UPGRADE_INDEX, &keys));
            }
        }
        for reply in conn.many(&cmds).await.map_err(|e| self.connect_error(e))? {
            reply.map_err(|e| self.connect_error(e))?;
        }
        Ok(())
    }

    async fn conn(&self) -> Result<Conn> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        self.conn.get_or_try_init(|| self.connect()).await.cloned()
    }

    /// Runs one command; reloads the scripts once if the server lost them (a restart or
    /// failover empties its script cache).
    async fn run<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let mut conn = self.conn().await?;
        // Converted here, not by the client, so a stored value that does not convert (bytes
        // that are not UTF-8) is a Serialization error like any other corrupt record.
        let reply = match conn.query::<RedisValue>(cmd).await {
            Err(e) if is_noscript(&e) => {
                load_scripts(&mut conn).await.map_err(|e| self.error(e))?;
                conn.query::<RedisValue>(cmd)
                    .await
                    .map_err(|e| self.error(e))
            }
            other => other.map_err(|e| self.error(e)),
        }?;
        from_value(reply)
    }

    /// Runs many commands in one round trip: one pipeline on a node; on a cluster,
    /// concurrent commands that the client pipelines per master. Fails on the first
    /// failed command; see [`Self::many_each`] for an answer per command.
    async fn many(&self, cmds: &[Cmd]) -> Result<Vec<RedisValue>> {
        self.many_each(cmds).await?.into_iter().collect()
    }

    /// Runs many commands in one round trip as [`Self::many`] does, answering per
    /// command: a command the server refused or whose script failed fails alone, since
    /// the others ran regardless. Only an error of the whole round trip (the
    /// connection) fails the call.
    async fn many_each(&self, cmds: &[Cmd]) -> Result<Vec<Result<RedisValue>>> {
        if cmds.is_empty() {
            self.conn().await?;
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut replies = conn.many(cmds).await.map_err(|e| self.error(e))?;
        // NOSCRIPT means the script did not run: reload and send again only the
        // commands refused, so a script that did run never runs twice.
        let refused: Vec<usize> = (0..replies.len())
            .filter(|&i| matches!(&replies[i], Err(e) if is_noscript(e)))
            .collect();
        if !refused.is_empty() {
            load_scripts(&mut conn).await.map_err(|e| self.error(e))?;
            let again: Vec<Cmd> = refused.iter().map(|&i| cmds[i].clone()).collect();
            let answers = conn.many(&again).await.map_err(|e| self.error(e))?;
            for (i, answer) in refused.into_iter().zip(answers) {
                replies[i] = answer;
            }
        }
        Ok(replies
            .into_iter()
            .map(|reply| reply.map_err(|e| self.error(e)))
            .collect())
    }

    /// Runs `stages` so that every command of a stage runs after every command of the
    /// stages before it, answering per command as [`Self::many_each`] does. On a node,
    /// one pipeline: one connection's commands run in the order sent. On a cluster, one
    /// round trip a stage, since a stage's keys (an index bucket) live on another master
    /// than the last's (a session or a thread).
    ///
    /// Why order matters: a write and its index entry live in different slots, so no
    /// script covers both. Writers store the record before indexing it, and deleters
    /// remove the record before its entry and then look again; whatever two processes
    /// interleave, a record that exists at the end has its entry (see `delete_session`).
    async fn in_order_each(&self, stages: &[Vec<Cmd>]) -> Result<Vec<Vec<Result<RedisValue>>>> {
        let mut out = Vec::with_capacity(stages.len());
        if self.is_cluster() {
            for stage in stages {
                out.push(self.many_each(stage).await?);
            }
            return Ok(out);
        }
        let all: Vec<Cmd> = stages.iter().flatten().cloned().collect();
        let mut replies = self.many_each(&all).await?.into_iter();
        for stage in stages {
            out.push(replies.by_ref().take(stage.len()).collect());
        }
        Ok(out)
    }

    /// [`Self::in_order_each`], failing on the first failed command.
    async fn in_order(&self, stages: &[Vec<Cmd>]) -> Result<Vec<Vec<RedisValue>>> {
        self.in_order_each(stages)
            .await?
            .into_iter()
            .map(|stage| stage.into_iter().collect())
            .collect()
    }

    /// Runs one command that must not run twice (a counter increment): neither the
    /// client nor this method sends it again once it may have reached the server; see
    /// [`Conn::query_once`].
    async fn run_once<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let mut conn = self.conn().await?;
        let reply = match conn.query_once(cmd, self.response_timeout).await {
            // NOSCRIPT: refused without running.
            Err(e) if is_noscript(&e) => {
                load_scripts(&mut conn).await.map_err(|e| self.error(e))?;
                conn.query_once(cmd, self.response_timeout)
                    .await
                    .map_err(|e| self.error_sent_once(e))
            }
            other => other.map_err(|e| self.error_sent_once(e)),
        }?;
        from_value(reply)
    }

    fn session_keys(&self, session_id: &str) -> SessionKeys {
        SessionKeys::new(&self.prefix, session_id)
    }

    /// Indexes a session at `score`, only moving its score forward unless `exact`.
    fn index_cmd(&self, session_id: &str, score: i64) -> Cmd {
        self.index_session_cmd(session_id, score, false)
    }

    fn index_session_cmd(&self, session_id: &str, score: i64, exact: bool) -> Cmd {
        let mut c = evalsha(
            &scripts::INDEX_SESSION,
            &[
                &Index::Sessions.key_of(&self.prefix, session_id),
                &Index::SessionIds.key_of(&self.prefix, session_id),
            ],
        );
        c.arg(score)
            .arg(session_id)
            .arg(if exact { "exact" } else { "GT" });
        c
    }

    /// Adds `id` to (`ZADD`) or removes it from (`ZREM`) an index read by id.
    fn id_index_cmd(&self, op: &str, index: Index, id: &str) -> Cmd {
        let mut c = redis::cmd(op);
        c.arg(index.key_of(&self.prefix, id));
        if op == "ZADD" {
            c.arg(0);
        }
        c.arg(id);
        c
    }

    fn thread_index_cmd(&self, op: &str, thread_id: &str) -> Cmd {
        self.id_index_cmd(op, Index::Threads, thread_id)
    }

    /// Every id in every bucket of `index`.
    async fn index_members(&self, index: Index) -> Result<Vec<String>> {
        let cmds: Vec<Cmd> = index
            .buckets(&self.prefix)
            .map(|key| redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).clone())
            .collect();
        let mut ids = Vec::new();
        for reply in self.many(&cmds).await? {
            ids.extend(from_value::<Vec<String>>(reply)?);
        }
        Ok(ids)
    }

    fn checkpoint_cmd(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        record: &CheckpointRecord,
        created_at: i64,
        restore: bool,
    ) -> Result<Cmd> {
        let keys = ThreadKeys::new(&self.prefix, thread_id, checkpoint_ns);
        let mut c = evalsha(
            &scripts::STORE_CHECKPOINT,
            &[
                &keys.seq(),
                &keys.order(),
                &keys.checkpoints(),
                &keys.registry(),
            ],
        );
        c.arg(checkpoint_id)
            .arg(serde_json::to_string(record)?)
            .arg(created_at)
            .arg(Self::ttl_ms(self.checkpoint_ttl))
            .arg(if restore { "1" } else { "0" });
        Ok(c)
    }

    fn put_writes_cmd(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<Cmd> {
        let keys = ThreadKeys::new(&self.prefix, thread_id, checkpoint_ns);
        let (order, values) = keys.writes(checkpoint_id);
        let mut c = evalsha(
            &scripts::PUT_WRITES,
            &[&keys.seq(), &order, &values, &keys.registry()],
        );
        c.arg(Self::ttl_ms(self.checkpoint_ttl));
        for (idx, w) in (0u32..).zip(writes) {
            // Task ids hold no control characters (validated), so '\n' cannot be forged.
            c.arg(format!("{task_id}\n{idx}"))
                .arg(serde_json::to_string(&StoredWrite {
                    task_id: task_id.to_owned(),
                    idx,
                    channel: w.channel.clone(),
                    value: w.value.clone(),
                })?);
        }
        Ok(c)
    }

    /// The next ids of an id-read `index` after `after`, in byte order: at most `n`,
    /// and `true` when none remains after them.
    ///
    /// Each bucket is asked for a few ids from the cursor on (`ZRANGE BYLEX` with
    /// `LIMIT`: O(log n + page) in a bucket, where reading whole buckets made a walk of
    /// every page quadratic in the store's size). Ids are taken only up to the smallest
    /// last id of the buckets that had more to give: below it every bucket has answered
    /// in full, so no id is skipped, and the bucket holding it makes the page non-empty.
    async fn index_page(
        &self,
        index: Index,
        after: Option<&str>,
        n: usize,
    ) -> Result<(Vec<String>, bool)> {
        // Twice a bucket's share and some: a bucket seldom runs out before the page is
        // filled, and a short one only costs another round trip.
        let per = n.div_ceil(keys::INDEX_BUCKETS as usize) * 2 + 8;
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let cmds: Vec<Cmd> = index
            .buckets(&self.prefix)
            .map(|key| {
                let mut c = redis::cmd("ZRANGE");
                c.arg(key)
                    .arg(&start)
                    .arg("+")
                    .arg("BYLEX")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(per);
                c
            })
            .collect();
        let mut buckets = Vec::with_capacity(cmds.len());
        for reply in self.many(&cmds).await? {
            buckets.push(from_value::<Vec<String>>(reply)?);
        }
        let frontier = buckets
            .iter()
            .filter(|ids| ids.len() == per)
            .filter_map(|ids| ids.last())
            .min()
            .cloned();
        let mut ids: Vec<String> = buckets
            .into_iter()
            .flatten()
            .filter(|id| frontier.as_ref().is_none_or(|f| id <= f))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let done = frontier.is_none() && ids.len() <= n;
        ids.truncate(n);
        Ok((ids, done))
    }

    /// A page of the ids of an id-read `index` after the cursor whose `key_of(id)` still
    /// exists (an index entry can outlive its data when a TTL expires it).
    async fn live_members(
        &self,
        index: Index,
        after: Option<&str>,
        limit: usize,
        key_of: impl Fn(&str) -> String,
    ) -> Result<IdPage> {
        // One more than the page, to know whether another page follows.
        let mut live = Vec::with_capacity(limit + 1);
        let mut cursor = after.map(str::to_owned);
        loop {
            let (ids, done) = self
                .index_page(index, cursor.as_deref(), limit + 1 - live.len())
                .await?;
            let checks: Vec<Cmd> = ids
                .iter()
                .map(|id| redis::cmd("EXISTS").arg(key_of(id)).clone())
                .collect();
            let replies = self.many(&checks).await?;
            cursor = ids.last().cloned().or(cursor);
            for (id, exists) in ids.into_iter().zip(replies) {
                if from_value::<i64>(exists)? == 1 {
                    live.push(id);
                }
            }
            if done || live.len() > limit {
                return Ok(IdPage::from_sorted(live, limit));
            }
        }
    }

    fn create_cmd(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
        at: i64,
    ) -> Result<Cmd> {
        let keys = self.session_keys(session_id);
        let mut c = evalsha(&scripts::CREATE_SESSION, &keys.all());
        c.arg(user_id).arg(at).arg(Self::ttl_ms(self.session_ttl));
        metadata_args(&mut c, metadata)?;
        Ok(c)
    }

    fn add_message_cmd(
        &self,
        session_id: &str,
        message: &NewMessage,
        at: DateTime<Utc>,
    ) -> Result<(String, Cmd)> {
        let message_id = message.id_or_generate();
        let stored = StoredMessage {
            message_id: &message_id,
            role: &message.role,
            content: &message.content,
            timestamp: at,
            metadata: &message.metadata,
        };
        let keys = self.session_keys(session_id);
        let mut c = evalsha(&scripts::ADD_MESSAGE, &keys.all());
        c.arg(&message_id)
            .arg(serde_json::to_string(&stored)?)
            .arg(at.timestamp_micros())
            .arg(Self::ttl_ms(self.session_ttl))
            .arg(INDEX_GRANULARITY_MICROS);
        Ok((message_id, c))
    }

    /// Runs a session-touching script (at most once if `once`, see [`Self::run_once`])
    /// and refreshes the cleanup index when it asks. Returns `false` when the session is
    /// missing.
    async fn touch_session(
        &self,
        session_id: &str,
        cmd: &Cmd,
        at: i64,
        once: bool,
    ) -> Result<bool> {
        let reply = if once {
            self.run_once::<i64>(cmd).await?
        } else {
            self.run::<i64>(cmd).await?
        };
        match reply {
            -1 => Ok(false),
            1 => {
                self.run::<RedisValue>(&self.index_cmd(session_id, at))
                    .await?;
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// The session a create script returned (its stored hash).
    fn created(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
        at: DateTime<Utc>,
        reply: Option<&RedisValue>,
    ) -> Result<Session> {
        if let Some(RedisValue::Int(0)) = reply {
            return Ok(Session {
                session_id: session_id.to_owned(),
                user_id: user_id.to_owned(),
                created_at: at,
                updated_at: at,
                status: SessionStatus::ACTIVE.to_owned(),
                metadata: metadata.clone(),
                metrics: SessionMetrics::default(),
            });
        }
        self.session_from_hash(session_id, reply.unwrap_or(&RedisValue::Nil))?
            .ok_or_else(|| StorageError::Serialization {
                message: format!("redis returned no hash for created session `{session_id}`"),
                source: None,
            })
    }

    /// The session a `HGETALL` reply holds; `None` when the hash is absent.
    fn session_from_hash(&self, session_id: &str, reply: &RedisValue) -> Result<Option<Session>> {
        let hash = hash_fields(reply)?;
        if hash.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| {
            hash.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| StorageError::Serialization {
                    message: format!("stored session `{session_id}` lacks field `{name}`"),
                    source: None,
                })
        };
        let number = |name: &str| -> Result<u64> {
            field(name)?.parse().map_err(|e| {
                StorageError::serialization(
                    format!("stored session field `{name}` is not a count"),
                    e,
                )
            })
        };
        let time = |name: &str| -> Result<DateTime<Utc>> {
            let text = field(name)?;
            text.parse::<i64>()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
                .ok_or_else(|| StorageError::Serialization {
                    message: format!("stored session field `{name}` is not a timestamp"),
                    source: None,
                })
        };
        let mut metadata = Metadata::new();
        for (k, v) in &hash {
            if let Some(key) = k.strip_prefix("m:") {
                metadata.insert(
                    key.to_owned(),
                    serde_json::from_str(v).map_err(|e| {
                        StorageError::serialization("stored session metadata is not JSON", e)
                    })?,
                );
            }
        }
        Ok(Some(Session {
            session_id: session_id.to_owned(),
            user_id: field("user_id")?.to_owned(),
            created_at: time("created_at")?,
            updated_at: time("updated_at")?,
            status: field("status")?.to_owned(),
            metadata,
            metrics: SessionMetrics {
                request_count: number("request_count")?,
                total_processing_time: field("total_processing_time")?.parse().map_err(|e| {
                    StorageError::serialization(
                        "stored session field `total_processing_time` is not a number",
                        e,
                    )
                })?,
                error_count: number("error_count")?,
            },
        }))
    }

    /// The stored record and created_at of each id, in order, with one HMGET; ids with
    /// no record (deleted meanwhile, or never stored) are left out.
    async fn checkpoint_records(
        &self,
        keys: &ThreadKeys,
        ids: Vec<String>,
    ) -> Result<Vec<(String, String, String)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Sized up front and fields written through one buffer: a page of ten is 21
        // arguments, and growing the command for each cost more than the reply's decode.
        let key = keys.checkpoints();
        let bytes = key.len() + ids.iter().map(|id| 2 * (id.len() + 2)).sum::<usize>() + 5;
        let mut c = Cmd::with_capacity(2 + 2 * ids.len(), bytes);
        c.arg("HMGET").arg(key);
        let mut field = String::new();
        for id in &ids {
            for tag in ["r:", "c:"] {
                field.clear();
                field.push_str(tag);
                field.push_str(id);
                c.arg(field.as_str());
            }
        }
        let fields: Vec<Option<String>> = self.run(&c).await?;
        let mut fields = fields.into_iter();
        Ok(ids
            .into_iter()
            .filter_map(|id| match (fields.next(), fields.next()) {
                // A record without its created_at is corrupt: checkpoint_from_parts says so.
                (Some(Some(record)), created) => {
                    Some((id, record, created.flatten().unwrap_or_default()))
                }
                _ => None,
            })
            .collect())
    }

    fn checkpoint_from_parts(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        id: String,
        record: &str,
        created: &str,
    ) -> Result<Checkpoint> {
        let record: CheckpointRecord = serde_json::from_str(record)
            .map_err(|e| StorageError::serialization("stored checkpoint is not valid JSON", e))?;
        let created_at = created
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(|| StorageError::Serialization {
                message: format!("stored checkpoint `{id}` has no valid created_at"),
                source: None,
            })?;
        Ok(Checkpoint {
            thread_id: thread_id.to_owned(),
            checkpoint_ns: checkpoint_ns.to_owned(),
            checkpoint_id: id,
            parent_checkpoint_id: record.parent,
            data: record.data,
            metadata: record.metadata,
            created_at,
        })
    }
}

/// Attempts [`Conn::query_once`] makes at most, as redis-rs's default retries.
const ONCE_ATTEMPTS: u32 = 16;

impl Conn {
    async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Node(c) => cmd.query_async(c).await,
            Conn::Cluster { shared, .. } => cmd.query_async(shared).await,
        }
    }

    /// Sends `cmd` again only after an answer that says it did not run: MOVED and ASK
    /// (followed to the node they name, as the client would), and refusals that pass
    /// (TRYAGAIN, CLUSTERDOWN, MASTERDOWN, LOADING, READONLY, no connection to the
    /// slot's node yet), within `budget`. After a timeout or a dropped connection the
    /// command may have run: the error is returned, for the caller (RetryLayer) to
    /// decide. A node's `ConnectionManager` never sends a command again itself.
    async fn query_once(&mut self, cmd: &Cmd, budget: Duration) -> redis::RedisResult<RedisValue> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let once = match self {
            Conn::Node(c) => return cmd.query_async(c).await,
            Conn::Cluster { once, .. } => once,
        };
        let deadline = Instant::now() + budget;
        let mut wait = Duration::from_millis(10);
        let mut redirect: Option<(bool, String, u16)> = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match redirect.take() {
                None => cmd.query_async::<RedisValue>(once).await,
                Some((false, host, port)) => {
                    let to = SingleNodeRoutingInfo::ByAddress { host, port };
                    once.route_command(cmd.clone(), RoutingInfo::SingleNode(to))
                        .await
                }
                Some((true, host, port)) => {
                    // ASKING holds for the next command on the connection only: a
                    // pipeline keeps the two together.
                    let mut pipe = redis::pipe();
                    pipe.cmd("ASKING").add_command(cmd.clone());
                    let to = SingleNodeRoutingInfo::ByAddress { host, port };
                    once.route_pipeline(pipe, 1, 1, to)
                        .await
                        .and_then(|mut replies| {
                            replies.pop().unwrap_or(RedisValue::Nil).extract_error()
                        })
                }
            };
            let Err(e) = result else {
                return result;
            };
            if attempt >= ONCE_ATTEMPTS || Instant::now() >= deadline {
                return Err(e);
            }
            let ask = e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Ask);
            let node = e
                .redirect_node()
                .and_then(|(node, _slot)| node.rsplit_once(':'));
            if let Some((host, Ok(port))) = node.map(|(host, port)| (host, port.parse())) {
                redirect = Some((ask, host.to_owned(), port));
                continue;
            }
            if !(refused_without_running(&e) || e.is_connection_refusal()) {
                return Err(e);
            }
            // The client refreshes its slots and connections meanwhile.
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(wait.min(left)).await;
            wait = (wait * 2).min(Duration::from_millis(250));
        }
    }

    /// Every command's own reply or error; the outer error is the round trip's.
    async fn many(
        &mut self,
        cmds: &[Cmd],
    ) -> redis::RedisResult<Vec<redis::RedisResult<RedisValue>>> {
        match self {
            Conn::Node(c) => {
                let mut pipe = redis::pipe();
                // Without this one failed command turns the whole reply into an error,
                // hiding the replies of the commands that ran.
                pipe.ignore_errors();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                pipe.query_async(c).await
            }
            Conn::Cluster { shared: c, .. } => {
                let calls = cmds.iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<RedisValue>(&mut c).await }
                });
                Ok(futures_util::future::join_all(calls).await)
            }
        }
    }
}

async fn load_scripts(conn: &mut Conn) -> redis::RedisResult<()> {
    for script in scripts::all() {
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(&script.source);
        conn.query::<String>(&load).await?;
    }
    Ok(())
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Whether `e` (whose scrubbed text is `text`) can only come from opening a connection,
/// never from a command on an open one: the connection was refused (or a Unix socket is
/// missing), or the host name did not resolve. An established TCP connection that breaks
/// reports a reset, a broken pipe or an end of file instead. Other failures of opening a
/// connection (a timeout, a TLS alert) look like those of a command and are not counted.
fn failed_to_connect(e: &redis::RedisError, text: &str) -> bool {
    e.is_connection_refusal()
        || (e.is_io_error() && text.starts_with("failed to lookup address information"))
}

/// Whether `e` says the command did not run and may run if sent again later: a server
/// refusal while the cluster changes, or no connection to send it on.
fn refused_without_running(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
        ) | ErrorKind::ClusterConnectionNotFound
    )
}

fn evalsha(script: &Lua, keys: &[&str]) -> Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(&script.hash).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    c
}

fn metadata_args(c: &mut Cmd, metadata: &Metadata) -> Result<()> {
    for (k, v) in metadata {
        c.arg(format!("m:{k}")).arg(serde_json::to_string(v)?);
    }
    Ok(())
}

fn decode_message(text: &str) -> Result<Message> {
    match decode_stored_message(text) {
        Some(message) => Ok(message),
        None => serde_json::from_str(text)
            .map_err(|e| StorageError::serialization("stored message is not valid JSON", e)),
    }
}

/// Reads a message laid out exactly as [`StoredMessage`] writes it (its fields in order,
/// no whitespace) whose strings hold no escapes; anything else is `None` and goes to
/// serde_json, which then decides. History reads decode 50 of these a call and the
/// client's CPU is their limit: loadgen's history reads went from 31k to 42k/s on one
/// worker (README, Performance).
fn decode_stored_message(text: &str) -> Option<Message> {
    /// A JSON string's body up to its closing quote, if it needs no unescaping.
    fn plain(s: &str) -> Option<(&str, &str)> {
        let b = s.as_bytes();
        let end = memchr::memchr2(b'"', b'\\', b)?;
        // A raw control character is invalid JSON: serde_json reports it.
        if b[end] != b'"' || !b[..end].iter().fold(true, |ok, &c| ok & (c >= 0x20)) {
            return None;
        }
        Some((&s[..end], &s[end + 1..]))
    }
    let (message_id, rest) = plain(text.strip_prefix(r#"{"message_id":""#)?)?;
    let (role, rest) = plain(rest.strip_prefix(r#","role":""#)?)?;
    let (content, rest) = plain(rest.strip_prefix(r#","content":""#)?)?;
    let (timestamp, rest) = plain(rest.strip_prefix(r#","timestamp":""#)?)?;
    let timestamp = crate::model::utc_time::fast(timestamp.as_bytes())?;
    let metadata = match rest.strip_prefix(r#","metadata":"#)?.strip_suffix('}')? {
        "{}" => Metadata::new(),
        // A field after metadata leaves trailing text here, which serde_json refuses.
        object => serde_json::from_str(object).ok()?,
    };
    Some(Message {
        message_id: message_id.to_owned(),
        role: role.to_owned(),
        content: content.to_owned(),
        timestamp,
        metadata,
    })
}

/// The field-value pairs of a hash reply (a flat array in RESP2, a map in RESP3),
/// borrowed from the reply: no map is built and no field name is copied.
fn hash_fields(reply: &RedisValue) -> Result<Vec<(&str, &str)>> {
    fn text(v: &RedisValue) -> Result<&str> {
        match v {
            RedisValue::BulkString(bytes) => std::str::from_utf8(bytes)
                .map_err(|e| StorageError::serialization("stored hash field is not UTF-8", e)),
            RedisValue::SimpleString(s) => Ok(s),
            other => Err(StorageError::Serialization {
                message: format!("unexpected hash field from redis: {}", kind_of(other)),
                source: None,
            }),
        }
    }
    match reply {
        RedisValue::Nil => Ok(Vec::new()),
        RedisValue::Array(items) if items.len() % 2 == 0 => items
            .chunks_exact(2)
            .map(|pair| Ok((text(&pair[0])?, text(&pair[1])?)))
            .collect(),
        RedisValue::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| Ok((text(k)?, text(v)?)))
            .collect(),
        other => Err(StorageError::Serialization {
            message: format!("unexpected reply from redis for a hash: {}", kind_of(other)),
            source: None,
        }),
    }
}

/// A reply's type, for errors (never its content, which may be user data).
fn kind_of(v: &RedisValue) -> &'static str {
    match v {
        RedisValue::Nil => "nil",
        RedisValue::Int(_) => "integer",
        RedisValue::BulkString(_) => "bulk string",
        RedisValue::Array(_) => "array",
        RedisValue::SimpleString(_) => "simple string",
        RedisValue::Okay => "OK",
        RedisValue::Map(_) => "map",
        RedisValue::ServerError(_) => "error",
        _ => "other",
    }
}

fn from_value<T: FromRedisValue>(v: RedisValue) -> Result<T> {
    redis::from_redis_value(v)
        .map_err(|e| StorageError::serialization("unexpected reply from redis", e))
}

/// A message as stored in a history list. `decode_stored_message` reads this field order
/// directly; a change of order only sends reads to serde_json.
#[derive(Serialize)]
struct StoredMessage<'a> {
    message_id: &'a str,
    role: &'a str,
    content: &'a str,
    timestamp: DateTime<Utc>,
    metadata: &'a Metadata,
}

#[derive(Serialize, Deserialize)]
struct CheckpointRecord {
    parent: Option<String>,
    data: Value,
    metadata: Metadata,
}

#[derive(Serialize, Deserialize)]
struct StoredWrite {
    task_id: String,
    idx: u32,
    channel: String,
    value: Value,
}

#[async_trait]
impl SessionStorage for RedisBackend {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        validate::create_session(session_id, user_id, metadata)?;
        let time = now();
        let at = time.timestamp_micros();
        let stages = [
            vec![self.create_cmd(session_id, user_id, metadata, at)?],
            vec![self.index_cmd(session_id, at)],
        ];
        let replies = self.in_order(&stages).await?;
        self.created(session_id, user_id, metadata, time, replies[0].first())
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        let keys = self.session_keys(session_id);
        // The keys first, then the index entries, then a second look: a create from
        // another process between the two (its keys written after ours went, its entry
        // before ours went) would otherwise be left live and unindexed, hidden from
        // listing, export, migration and cleanup. Creates write before they index, so
        // if the look finds nothing, any such create indexes after our removal.
        let (index, ids) = (
            Index::Sessions.key_of(&self.prefix, session_id),
            Index::SessionIds.key_of(&self.prefix, session_id),
        );
        let mut unindex = evalsha(&scripts::UNINDEX_SESSION, &[&index, &ids]);
        unindex.arg(session_id);
        let mut updated = redis::cmd("HGET");
        updated.arg(&keys.session).arg("updated_at");
        let mut context = redis::cmd("EXISTS");
        context.arg(&keys.context);
        let stages = [
            vec![evalsha(&scripts::DELETE_SESSION, &keys.all())],
            vec![
                unindex,
                self.id_index_cmd("ZREM", Index::Contexts, session_id),
            ],
            vec![updated, context],
        ];
        let replies = self.in_order(&stages).await?;
        let existed: i64 = from_value(replies[0][0].clone())?;
        let mut again = Vec::new();
        if let Some(updated) = from_value::<Option<i64>>(replies[2][0].clone())? {
            again.push(self.index_cmd(session_id, updated));
        }
        if from_value::<i64>(replies[2][1].clone())? == 1 {
            again.push(self.id_index_cmd("ZADD", Index::Contexts, session_id));
        }
        self.many(&again).await?;
        Ok(existed == 1)
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        validate::restored_sessions(sessions)?;
        let mut writes = Vec::with_capacity(sessions.len());
        let mut indexes = Vec::with_capacity(sessions.len());
        for s in sessions {
            let keys = self.session_keys(&s.session_id);
            let mut c = evalsha(&scripts::RESTORE_SESSION, &keys.all());
            c.arg(&s.user_id)
                .arg(s.created_at.timestamp_micros())
                .arg(s.updated_at.timestamp_micros())
                .arg(&s.status)
                .arg(s.metrics.request_count)
                .arg(s.metrics.total_processing_time.to_string())
                .arg(s.metrics.error_count)
                .arg(Self::ttl_ms(self.session_ttl));
            metadata_args(&mut c, &s.metadata)?;
            writes.push(c);
            // The exact score, not GT: a restored session may be older than a stale entry.
            indexes.push(self.index_session_cmd(
                &s.session_id,
                s.updated_at.timestamp_micros(),
                true,
            ));
        }
        self.in_order(&[writes, indexes]).await.map(|_| ())
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        validate::id("session_id", session_id)?;
        let mut c = redis::cmd("HGETALL");
        c.arg(SessionKeys::session_key(&self.prefix, session_id));
        let reply: RedisValue = self.run(&c).await?;
        self.session_from_hash(session_id, &reply)
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        validate::session_update(session_id, update)?;
        let at = now().timestamp_micros();
        let keys = self.session_keys(session_id);
        let mut c = evalsha(&scripts::UPDATE_SESSION, &keys.all());
        c.arg(update.add_requests)
            .arg(if update.add_processing_time == 0.0 {
                "0".to_owned()
            } else {
                update.add_processing_time.to_string()
            })
            .arg(update.add_errors)
            .arg(update.status.as_deref().unwrap_or(""))
            .arg(at)
            .arg(Self::ttl_ms(self.session_ttl))
            .arg(INDEX_GRANULARITY_MICROS);
        metadata_args(&mut c, &update.metadata)?;
        // Only additions can apply twice; a status or metadata update is idempotent.
        let counts =
            update.add_requests != 0 || update.add_errors != 0 || update.add_processing_time != 0.0;
        self.touch_session(session_id, &c, at, counts).await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        validate::status(status)?;
        self.update_session(session_id, &SessionUpdate::new().status(status))
            .await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        validate::new_sessions(sessions)?;
        let time = now();
        let at = time.timestamp_micros();
        let mut writes = Vec::with_capacity(sessions.len());
        let mut indexes = Vec::with_capacity(sessions.len());
        for s in sessions {
            writes.push(self.create_cmd(&s.session_id, &s.user_id, &s.metadata, at)?);
            indexes.push(self.index_cmd(&s.session_id, at));
        }
        let mut replies = self.in_order(&[writes, indexes]).await?;
        sessions
            .iter()
            .zip(replies.swap_remove(0))
            .map(|(s, reply)| {
                self.created(&s.session_id, &s.user_id, &s.metadata, time, Some(&reply))
            })
            .collect()
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        validate::session_ids(session_ids)?;
        let cmds: Vec<Cmd> = session_ids
            .iter()
            .map(|id| {
                let mut c = redis::cmd("HGETALL");
                c.arg(SessionKeys::session_key(&self.prefix, id));
                c
            })
            .collect();
        let replies = self.many(&cmds).await?;
        session_ids
            .iter()
            .zip(replies)
            .map(|(id, reply)| self.session_from_hash(id, &reply))
            .collect()
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        validate::session_query(query)?;
        // The id index, read from the cursor on; sessions that expired or no longer
        // match are skipped and more ids read, until one match past the page says
        // another page follows.
        let filtered = query.user_id.is_some() || query.status.is_some();
        let mut sessions = Vec::with_capacity(query.limit);
        let mut cursor = query.after.clone();
        let mut more = false;
        loop {
            let wanted = query.limit + 1 - sessions.len();
            // A filter may pass few: read in larger steps then.
            let step = if filtered { wanted.max(256) } else { wanted };
            let (ids, done) = self
                .index_page(Index::SessionIds, cursor.as_deref(), step)
                .await?;
            cursor = ids.last().cloned().or(cursor);
            for chunk in ids.chunks(256) {
                for s in self.batch_get_sessions(chunk).await?.into_iter().flatten() {
                    if !query.matches(&s) {
                        continue;
                    }
                    if sessions.len() == query.limit {
                        more = true;
                        break;
                    }
                    sessions.push(s);
                }
                if more {
                    break;
                }
            }
            if more || done {
                break;
            }
        }
        let next_cursor = more
            .then(|| sessions.last().map(|s| s.session_id.clone()))
            .flatten();
        Ok(SessionPage {
            sessions,
            next_cursor,
        })
    }
}

#[async_trait]
impl ConversationStorage for RedisBackend {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        validate::new_message(session_id, message)?;
        let at = now();
        let (message_id, cmd) = self.add_message_cmd(session_id, message, at)?;
        if self
            .touch_session(session_id, &cmd, at.timestamp_micros(), false)
            .await?
        {
            Ok(message_id)
        } else {
            Err(StorageError::not_found("session", session_id))
        }
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        validate::batch("messages", messages.len())?;
        let at = now();
        let mut out: Vec<Result<String>> = Vec::with_capacity(messages.len());
        let mut cmds = Vec::new();
        let mut sent = Vec::new();
        for (i, (session_id, message)) in messages.iter().enumerate() {
            let prepared = validate::new_message(session_id, message)
                .and_then(|_| self.add_message_cmd(session_id, message, at));
            match prepared {
                Ok((id, cmd)) => {
                    out.push(Ok(id));
                    cmds.push(cmd);
                    sent.push(i);
                }
                Err(e) => out.push(Err(e)),
            }
        }
        // A node runs a pipeline in order, so appends to one session keep their order; a
        // cluster sends each session's appends to its one master over one connection.
        let replies = self.many_each(&cmds).await?;
        let (mut reindexed, mut reindex) = (Vec::new(), Vec::new());
        for (i, reply) in sent.into_iter().zip(replies) {
            let session_id = &messages[i].0;
            match reply.and_then(from_value::<i64>) {
                Ok(-1) => out[i] = Err(StorageError::not_found("session", session_id)),
                Ok(1) => {
                    reindexed.push(i);
                    reindex.push(self.index_cmd(session_id, at.timestamp_micros()));
                }
                Ok(_) => {}
                Err(e) => out[i] = Err(e),
            }
        }
        // As in the single add, a failed index refresh fails its add (which is stored;
        // a retry with the same id stores nothing twice).
        for (i, reply) in reindexed.into_iter().zip(self.many_each(&reindex).await?) {
            if let Err(e) = reply {
                out[i] = Err(e);
            }
        }
        Ok(out)
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        validate::restored_messages(session_id, messages)?;
        let keys = self.session_keys(session_id);
        let mut c = evalsha(&scripts::RESTORE_MESSAGES, &keys.all());
        c.arg(Self::ttl_ms(self.session_ttl));
        for m in messages {
            let stored = StoredMessage {
                message_id: &m.message_id,
                role: &m.role,
                content: &m.content,
                timestamp: m.timestamp,
                metadata: &m.metadata,
            };
            c.arg(&m.message_id).arg(serde_json::to_string(&stored)?);
        }
        match self.run::<i64>(&c).await? {
            -1 => Err(StorageError::not_found("session", session_id)),
            n => Ok(n as u64),
        }
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let start = i64::try_from(offset).unwrap_or(i64::MAX);
        let mut c = redis::cmd("LRANGE");
        c.arg(self.session_keys(session_id).messages)
            .arg(start)
            .arg(start.saturating_add(limit as i64 - 1));
        let raw: Vec<String> = self.run(&c).await?;
        raw.iter().map(|m| decode_message(m)).collect()
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let mut c = redis::cmd("LRANGE");
        c.arg(self.session_keys(session_id).messages)
            .arg(-(limit as i64))
            .arg(-1);
        let raw: Vec<String> = self.run(&c).await?;
        raw.iter().map(|m| decode_message(m)).collect()
    }
}

#[async_trait]
impl CheckpointStorage for RedisBackend {
    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let registry = |id: &str| ThreadKeys::new(&self.prefix, id, "").registry();
        self.live_members(Index::Threads, after, limit, registry)
            .await
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        validate::id("thread_id", thread_id)?;
        let keys = ThreadKeys::new(&self.prefix, thread_id, "");
        let mut c = redis::cmd("SMEMBERS");
        c.arg(keys.registry());
        let members: Vec<String> = self.run(&c).await?;
        let mut namespaces: Vec<String> = members
            .iter()
            .filter_map(|k| keys.namespace_of(k))
            .collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        Ok(namespaces)
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        validate::thread(thread_id, checkpoint_ns)?;
        let keys = ThreadKeys::new(&self.prefix, thread_id, checkpoint_ns);
        let mut c = redis::cmd("SMEMBERS");
        c.arg(keys.registry());
        let members: Vec<String> = self.run(&c).await?;
        let mut ids: Vec<String> = members
            .iter()
            .filter_map(|k| keys.writes_checkpoint_of(k))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        validate::new_checkpoint(checkpoint)?;
        let record = CheckpointRecord {
            parent: checkpoint.parent_checkpoint_id.clone(),
            data: checkpoint.data.clone(),
            metadata: checkpoint.metadata.clone(),
        };
        let c = self.checkpoint_cmd(
            &checkpoint.thread_id,
            &checkpoint.checkpoint_ns,
            &checkpoint.checkpoint_id,
            &record,
            now().timestamp_micros(),
            false,
        )?;
        // Stored, then indexed: see `in_order_each` and `delete_thread`.
        let index = self.thread_index_cmd("ZADD", &checkpoint.thread_id);
        self.in_order(&[vec![c], vec![index]]).await.map(|_| ())
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        validate::restored_checkpoints(checkpoints)?;
        let mut writes = Vec::with_capacity(checkpoints.len());
        let mut indexes = Vec::with_capacity(checkpoints.len());
        for cp in checkpoints {
            let record = CheckpointRecord {
                parent: cp.parent_checkpoint_id.clone(),
                data: cp.data.clone(),
                metadata: cp.metadata.clone(),
            };
            writes.push(self.checkpoint_cmd(
                &cp.thread_id,
                &cp.checkpoint_ns,
                &cp.checkpoint_id,
                &record,
                cp.created_at.timestamp_micros(),
                true,
            )?);
            indexes.push(self.thread_index_cmd("ZADD", &cp.thread_id));
        }
        self.in_order(&[writes, indexes]).await.map(|_| ())
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, checkpoint_id)?;
        let keys = ThreadKeys::new(&self.prefix, thread_id, checkpoint_ns);
        let mut c = evalsha(
            &scripts::GET_CHECKPOINT,
            &[&keys.order(), &keys.checkpoints()],
        );
        c.arg(checkpoint_id.unwrap_or(""));
        let found: Option<(String, String, String)> = self.run(&c).await?;
        found
            .map(|(id, record, created)| {
                self.checkpoint_from_parts(thread_id, checkpoint_ns, id, &record, &created)
            })
            .transpose()
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        validate::checkpoint_filter(thread_id, checkpoint_ns, filter)?;
        let keys = ThreadKeys::new(&self.prefix, thread_id, checkpoint_ns);
        // Without a metadata filter one page is the answer (records vanish only with their
        // whole thread); with one, pages are read newest first until `limit` match.
        let filtered = !filter.metadata.is_empty();
        let page = if filtered {
            filter.limit.max(64)
        } else {
            filter.limit
        };
        // `before` bounds the order's scores; an id the thread does not hold yields
        // nothing.
        let mut max = match &filter.before {
            None => "+inf".to_owned(),
            Some(before) => {
                let mut c = redis::cmd("ZSCORE");
                c.arg(keys.order()).arg(before);
                match self.run::<Option<String>>(&c).await? {
                    Some(score) => format!("({score}"),
                    None => return Ok(Vec::new()),
                }
            }
        };
        let mut out = Vec::new();
        loop {
            // Ids, then records: two plain commands, not one script. Records passed
            // through Lua are copied into Lua strings and back: a script returning ten
            // 1 KiB records ran at 21 000/s in redis-benchmark, where ZREVRANGEBYSCORE
            // ran at 100 000/s and the HMGET at 83 000/s. Redis's CPU is what a shared
            // server runs out of. A checkpoint deleted in between is skipped.
            //
            // The next page starts below the last score read, not at an offset: new
            // checkpoints take the highest scores, so an offset counted from the head
            // shifts under concurrent stores and reads a checkpoint twice. A score never
            // changes once given, so score bounds neither repeat nor skip one.
            let mut c = redis::cmd("ZREVRANGEBYSCORE");
            c.arg(keys.order()).arg(&max).arg("-inf");
            if filtered {
                c.arg("WITHSCORES");
            }
            c.arg("LIMIT").arg(0).arg(page);
            let ids: Vec<String> = if filtered {
                let scored: Vec<(String, f64)> = self.run(&c).await?;
                if let Some((_, last)) = scored.last() {
                    // Sequences are integers far below 2^53: the f64 and its Display
                    // are exact.
                    max = format!("({last}");
                }
                scored.into_iter().map(|(id, _)| id).collect()
            } else {
                self.run(&c).await?
            };
            let rows = ids.len();
            for (id, record, created) in self.checkpoint_records(&keys, ids).await? {
                let cp =
                    self.checkpoint_from_parts(thread_id, checkpoint_ns, id, &record, &created)?;
                if filter.matches(&cp.metadata) {
                    out.push(cp);
                    if out.len() == filter.limit {
                        return Ok(out);
                    }
                }
            }
            if !filtered || rows < page {
                return Ok(out);
            }
        }
    }

    async fn put_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<()> {
        validate::writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)?;
        if writes.is_empty() {
            self.conn().await?;
            return Ok(());
        }
        let c = self.put_writes_cmd(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)?;
        let index = self.thread_index_cmd("ZADD", thread_id);
        self.in_order(&[vec![c], vec![index]]).await.map(|_| ())
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        validate::batch("items", items.len())?;
        let mut out = Vec::with_capacity(items.len());
        let (mut cmds, mut indexes, mut sent) = (Vec::new(), Vec::new(), Vec::new());
        for (i, w) in items.iter().enumerate() {
            let checked = validate::writes(
                &w.thread_id,
                &w.checkpoint_ns,
                &w.checkpoint_id,
                &w.task_id,
                &w.writes,
            );
            if checked.is_ok() && !w.writes.is_empty() {
                cmds.push(self.put_writes_cmd(
                    &w.thread_id,
                    &w.checkpoint_ns,
                    &w.checkpoint_id,
                    &w.task_id,
                    &w.writes,
                )?);
                indexes.push(self.thread_index_cmd("ZADD", &w.thread_id));
                sent.push(i);
            }
            out.push(checked);
        }
        // Two commands an item, the writes then the thread index; either failing fails
        // only its item.
        let replies = self.in_order_each(&[cmds, indexes]).await?;
        let mut replies = replies.into_iter();
        let (writes, indexes) = (replies.next(), replies.next());
        let pairs = writes
            .into_iter()
            .flatten()
            .zip(indexes.into_iter().flatten());
        for (i, (write, index)) in sent.into_iter().zip(pairs) {
            for reply in [write, index] {
                if let (Err(e), Ok(())) = (reply, &out[i]) {
                    out[i] = Err(e);
                }
            }
        }
        Ok(out)
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, Some(checkpoint_id))?;
        let keys = ThreadKeys::new(&self.prefix, thread_id, checkpoint_ns);
        let (order, values) = keys.writes(checkpoint_id);
        let c = evalsha(&scripts::GET_WRITES, &[&order, &values]);
        let raw: Vec<String> = self.run(&c).await?;
        raw.iter()
            .map(|w| {
                let w: StoredWrite = serde_json::from_str(w).map_err(|e| {
                    StorageError::serialization("stored pending write is not valid JSON", e)
                })?;
                Ok(PendingWrite {
                    task_id: w.task_id,
                    idx: w.idx,
                    channel: w.channel,
                    value: w.value,
                })
            })
            .collect()
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        validate::id("thread_id", thread_id)?;
        let keys = ThreadKeys::new(&self.prefix, thread_id, "");
        // As `delete_session`: the keys, then the entry, then a second look, so a store
        // from another process in between cannot leave the thread live and unlisted.
        let mut exists = redis::cmd("EXISTS");
        exists.arg(keys.registry());
        let stages = [
            vec![evalsha(
                &scripts::DELETE_THREAD,
                &[&keys.registry(), &keys.seq()],
            )],
            vec![self.thread_index_cmd("ZREM", thread_id)],
            vec![exists],
        ];
        let replies = self.in_order(&stages).await?;
        if from_value::<i64>(replies[2][0].clone())? == 1 {
            self.run::<RedisValue>(&self.thread_index_cmd("ZADD", thread_id))
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl TaskContextStorage for RedisBackend {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let context = |id: &str| self.session_keys(id).context;
        self.live_members(Index::Contexts, after, limit, context)
            .await
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        validate::id("session_id", session_id)?;
        let mut c = redis::cmd("GET");
        c.arg(self.session_keys(session_id).context);
        let text: Option<String> = self.run(&c).await?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| StorageError::serialization("stored task context is not JSON", e))
        })
        .transpose()
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        validate::task_context(session_id, context)?;
        let mut c = redis::cmd("SET");
        c.arg(self.session_keys(session_id).context)
            .arg(serde_json::to_string(context)?);
        if let Some(ttl) = self.session_ttl {
            c.arg("PX").arg(Self::ttl_ms(Some(ttl)));
        }
        // Stored, then indexed: see `delete_session`.
        let index = self.id_index_cmd("ZADD", Index::Contexts, session_id);
        self.in_order(&[vec![c], vec![index]]).await.map(|_| ())
    }
}

#[async_trait]
impl StorageBackend for RedisBackend {
    fn kind(&self) -> &'static str {
        if self.is_cluster() {
            "redis_cluster"
        } else {
            "redis"
        }
    }

    fn store_id(&self) -> Option<String> {
        let address = |url: &str| {
            let client = redis::Client::open(url).ok()?;
            let info = client.get_connection_info();
            Some((info.addr().to_string(), info.redis_settings().db()))
        };
        match &self.target {
            Target::Node(url) => {
                let (addr, db) = address(url)?;
                Some(format!("redis:{addr}/{db}/{}", self.prefix))
            }
            // Any seed reaches the same cluster only if the seed lists match; a cluster
            // named by two different seed lists is taken for two stores.
            Target::Cluster(nodes) => {
                let mut addrs = nodes
                    .iter()
                    .map(|n| address(n).map(|(addr, _)| addr))
                    .collect::<Option<Vec<_>>>()?;
                addrs.sort();
                addrs.dedup();
                Some(format!("redis_cluster:{}/{}", addrs.join(","), self.prefix))
            }
        }
    }

    async fn initialize(&self) -> Result<()> {
        self.conn().await.map(|_| ())
    }

    async fn close(&self) -> Result<()> {
        // The multiplexed connections close when the last clone is dropped; refusing new
        // calls is what close() must guarantee.
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let pong: String = self.run(&redis::cmd("PING")).await?;
        let latency = started.elapsed();
        let mut details = Metadata::new();
        details.insert("url".into(), json!(self.redacted));
        details.insert("prefix".into(), json!(self.prefix));
        details.insert("cluster".into(), json!(self.is_cluster()));
        details.insert("ping".into(), json!(pong));
        details.insert(
            "session_ttl_seconds".into(),
            json!(self.session_ttl.map(|t| t.as_secs())),
        );
        Ok(HealthReport::healthy(self.kind(), latency, details))
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        // Counted through the indexes (one pipelined command per record holder), so a
        // session or context that expired by TTL is not counted.
        let sessions = self.index_members(Index::Sessions).await?;
        let mut cmds = Vec::with_capacity(sessions.len() * 2);
        for id in &sessions {
            let keys = self.session_keys(id);
            cmds.push(redis::cmd("EXISTS").arg(&keys.session).clone());
            cmds.push(redis::cmd("LLEN").arg(&keys.messages).clone());
        }
        let (mut live, mut messages) = (0i64, 0i64);
        for pair in self.many(&cmds).await?.chunks(2) {
            if from_value::<i64>(pair[0].clone())? == 1 {
                live += 1;
                messages += from_value::<i64>(pair[1].clone())?;
            }
        }
        let contexts: Vec<Cmd> = self
            .index_members(Index::Contexts)
            .await?
            .iter()
            .map(|id| {
                redis::cmd("EXISTS")
                    .arg(self.session_keys(id).context)
                    .clone()
            })
            .collect();
        let mut task_contexts = 0i64;
        for reply in self.many(&contexts).await? {
            task_contexts += from_value::<i64>(reply)?;
        }
        let threads: Vec<Cmd> = self
            .index_members(Index::Threads)
            .await?
            .iter()
            .map(|id| {
                evalsha(
                    &scripts::COUNT_THREAD,
                    &[&ThreadKeys::new(&self.prefix, id, "").registry()],
                )
            })
            .collect();
        let (mut checkpoints, mut writes) = (0i64, 0i64);
        for reply in self.many(&threads).await? {
            let (c, w): (i64, i64) = from_value(reply)?;
            checkpoints += c;
            writes += w;
        }
        let mut values = Metadata::new();
        values.insert("sessions".into(), json!(live));
        values.insert("messages".into(), json!(messages));
        values.insert("checkpoints".into(), json!(checkpoints));
        values.insert("pending_writes".into(), json!(writes));
        values.insert("task_contexts".into(), json!(task_contexts));
        Ok(MetricsReport {
            component: self.kind().to_owned(),
            values,
            components: Vec::new(),
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        let cutoff = validate::idle_cutoff(max_idle)?.timestamp_micros();
        let mut removed = 0u64;
        for n in 0..keys::INDEX_BUCKETS {
            let index = Index::Sessions.bucket(&self.prefix, n);
            let ids = Index::SessionIds.bucket(&self.prefix, n);
            loop {
                let mut c = redis::cmd("ZRANGEBYSCORE");
                c.arg(&index)
                    .arg("-inf")
                    .arg(format!("({cutoff}"))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(CLEANUP_PAGE);
                let candidates: Vec<String> = self.run(&c).await?;
                if candidates.is_empty() {
                    break;
                }
                let cmds: Vec<Cmd> = candidates
                    .iter()
                    .map(|id| {
                        let keys = self.session_keys(id);
                        let mut c = evalsha(&scripts::CLEANUP_SESSION, &keys.all());
                        c.arg(cutoff);
                        c
                    })
                    .collect();
                let outcomes = self.many(&cmds).await?;
                let mut fix = evalsha(&scripts::FIX_INDEX, &[&index, &ids]);
                fix.arg(cutoff);
                let (mut gone, mut look) = (Vec::new(), Vec::new());
                let mut gone_ids = Vec::new();
                for (id, outcome) in candidates.iter().zip(outcomes) {
                    let updated = from_value::<i64>(outcome)?;
                    if updated == 0 {
                        removed += 1;
                    }
                    if updated <= 0 {
                        gone.push(self.id_index_cmd("ZREM", Index::Contexts, id));
                        look.push(
                            redis::cmd("EXISTS")
                                .arg(self.session_keys(id).context)
                                .clone(),
                        );
                        gone_ids.push(id);
                    }
                    fix.arg(id).arg(updated.max(0));
                }
                gone.push(fix);
                // A task context stored since its session went is indexed again, as
                // `delete_session` does.
                let replies = self.in_order(&[gone, look]).await?;
                let mut again = Vec::new();
                for (id, exists) in gone_ids.into_iter().zip(&replies[1]) {
                    if from_value::<i64>(exists.clone())? == 1 {
                        again.push(self.id_index_cmd("ZADD", Index::Contexts, id));
                    }
                }
                self.many(&again).await?;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
