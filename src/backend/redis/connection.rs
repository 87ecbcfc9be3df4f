//! Connecting (one node or a cluster), running commands and scripts, and how the
//! client's errors become [`StorageError`]s.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::{Cmd, FromRedisValue, Value as RedisValue};

use super::decode::from_value;
use super::{Conn, RedisBackend, Target};
use crate::error::{Result, StorageError};

use super::keys::{self, Index};
use super::scripts::{self, Lua};

impl RedisBackend {
    /// The client error's text with the URL's secrets scrubbed.
    pub(super) fn text(&self, e: &redis::RedisError) -> String {
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
    pub(super) fn error(&self, e: redis::RedisError) -> StorageError {
        self.command_error(e, !self.is_cluster())
    }

    /// [`Self::error`] for a command its client sent at most once and never again after a
    /// failure (a node's `ConnectionManager`, the cluster's `once` client behind
    /// [`Conn::query_once`]): an error only opening a connection gives means this command
    /// was never sent, and is [`StorageError::Unavailable`].
    pub(super) fn error_sent_once(&self, e: redis::RedisError) -> StorageError {
        self.command_error(e, true)
    }

    pub(super) fn command_error(&self, e: redis::RedisError, sent_once: bool) -> StorageError {
        use redis::ErrorKind;
        let text = self.text(&e);
        if self.is_cluster()
            && (e.is_timeout()
                || e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal())
        {
            // The node may be gone or hung while the cluster fails it over: the client
            // keeps its slot map until told otherwise, and a hung master tells nothing.
            self.conn.stale();
        }
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
    pub(super) fn connect_error(&self, e: redis::RedisError) -> StorageError {
        let text = self.text(&e);
        match self.command_error(e, true) {
            e @ StorageError::Unavailable { .. } => e,
            e if e.is_transient() => StorageError::Unavailable {
                message: format!("cannot connect to redis at {}: {text}", self.redacted),
            },
            e => e,
        }
    }

    pub(super) async fn connect(&self) -> Result<Conn> {
        crate::backend::tls::install_crypto_provider();
        let conn = match &self.target {
            Target::Node(url) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
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
                    let mut builder = cluster_builder(
                        nodes,
                        self.certificates(),
                        self.connect_timeout,
                        self.response_timeout,
                    );
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
        Ok(conn)
    }

    /// Moves index buckets an older version wrote to the current layout (see
    /// `keys`): one script a bucket, a few O(1) checks once done.
    pub(super) async fn upgrade_indexes(&self, conn: &mut Conn) -> Result<()> {
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

    pub(super) async fn conn(&self) -> Result<Conn> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        if let Some(conn) = self.conn.current() {
            return Ok(conn);
        }
        let _opening = self.conn.opening.lock().await;
        let old = self.conn.get();
        if let Some(conn) = self.conn.current() {
            return Ok(conn);
        }
        let fresh = match self.connect().await {
            Ok(mut conn) => {
                if old.is_none() {
                    self.upgrade_indexes(&mut conn).await?;
                }
                conn
            }
            // Keep what there is, and try again a second later.
            Err(e) => match old {
                Some(old) => {
                    self.conn.set(old.clone());
                    return Ok(old);
                }
                None => return Err(e),
            },
        };
        self.conn.set(fresh.clone());
        Ok(fresh)
    }

    /// Runs one command; reloads the scripts once if the server lost them (a restart or
    /// failover empties its script cache).
    pub(super) async fn run<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
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

    /// [`Self::run`] for a read whose answer a cache may keep: while a cache follows the
    /// change feed, the read goes on the feed's reader, which tracks what it reads (see
    /// `feed`); otherwise as any other command.
    pub(super) async fn run_tracked<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let mut replies = self.many_tracked(std::slice::from_ref(cmd)).await?;
        from_value(replies.pop().unwrap_or(RedisValue::Nil))
    }

    /// [`Self::many`] for reads whose answers a cache may keep, as [`Self::run_tracked`].
    pub(super) async fn many_tracked(&self, cmds: &[Cmd]) -> Result<Vec<RedisValue>> {
        let reader = match self.feed.reader() {
            Some(reader) if !cmds.is_empty() => reader,
            _ => return self.many(cmds).await,
        };
        // The backend's own connection first: where it cannot connect or is refused, so
        // is this read, as every other call (the reader speaks RESP3, whose `HELLO`
        // passes credentials a server without a password takes, where RESP2's `AUTH`
        // is refused).
        let mut conn = self.conn().await?;
        match reader.query(cmds).await {
            Err(e) if is_noscript(&e) => {
                // The server's script cache is the same for every connection.
                load_scripts(&mut conn).await.map_err(|e| self.error(e))?;
                reader.query(cmds).await.map_err(|e| self.error(e))
            }
            other => other.map_err(|e| self.error(e)),
        }
    }

    /// Runs many commands in one round trip: one pipeline on a node; on a cluster,
    /// concurrent commands that the client pipelines per master. Fails on the first
    /// failed command; see [`Self::many_each`] for an answer per command.
    pub(super) async fn many(&self, cmds: &[Cmd]) -> Result<Vec<RedisValue>> {
        self.many_each(cmds).await?.into_iter().collect()
    }

    /// Runs many commands in one round trip as [`Self::many`] does, answering per
    /// command: a command the server refused or whose script failed fails alone, since
    /// the others ran regardless. Only an error of the whole round trip (the
    /// connection) fails the call.
    pub(super) async fn many_each(&self, cmds: &[Cmd]) -> Result<Vec<Result<RedisValue>>> {
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
    /// script covers both. Writers index before they store (see
    /// [`Self::write_indexed`]), and deleters remove the record before its entry and
    /// then look again; whatever two processes interleave, a record that exists at the
    /// end has its entry (see `delete_session`).
    pub(super) async fn in_order_each(
        &self,
        stages: &[Vec<Cmd>],
    ) -> Result<Vec<Vec<Result<RedisValue>>>> {
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

    /// Writes records together with their listing-index entries (`(index, write)` per
    /// item) so that no listing loses a stored record, whatever fails or is dropped
    /// between them. A record and its entry live in different slots, so no script covers
    /// both; the entry goes first, as a hint that listings verify (they skip ids whose
    /// record is missing, and cleanup removes such entries). Only then the record: a
    /// write that lands is indexed already, even if the call times out or the caller
    /// gives up before the answer. A delete from another process between the two could
    /// remove the hint (it removes the record, then the entry, then looks again for a
    /// record to index); so when the write made its record anew (`fresh` says so from
    /// its reply) or its entry failed, the entry is written again after it, which the
    /// delete's second look or this third step always covers (on a node too: another
    /// client's pipelined delete can run between the two commands of ours). Answers
    /// each item's write reply, or its error.
    pub(super) async fn write_indexed(
        &self,
        items: Vec<(Cmd, Cmd)>,
        fresh: impl Fn(&RedisValue) -> bool,
    ) -> Result<Vec<Result<RedisValue>>> {
        let (indexes, writes): (Vec<Cmd>, Vec<Cmd>) = items.into_iter().unzip();
        let mut replies = self.in_order_each(&[indexes.clone(), writes]).await?;
        let (written, indexed) = (
            replies.pop().unwrap_or_default(),
            replies.pop().unwrap_or_default(),
        );
        let mut out = Vec::with_capacity(written.len());
        let mut again = Vec::new();
        for (i, (write, index)) in written.into_iter().zip(indexed).enumerate() {
            if let Ok(reply) = &write {
                if index.is_err() || fresh(reply) {
                    again.push(i);
                }
            }
            out.push(write);
        }
        if !again.is_empty() {
            let cmds: Vec<Cmd> = again.iter().map(|&i| indexes[i].clone()).collect();
            for (i, reply) in again.into_iter().zip(self.many_each(&cmds).await?) {
                if let Err(e) = reply {
                    out[i] = Err(e);
                }
            }
        }
        Ok(out)
    }

    /// [`Self::write_indexed`] for one write.
    pub(super) async fn write_one_indexed(
        &self,
        index: Cmd,
        write: Cmd,
        fresh: impl Fn(&RedisValue) -> bool,
    ) -> Result<()> {
        let reply = self.write_indexed(vec![(index, write)], fresh).await?;
        reply.into_iter().next().transpose().map(|_| ())
    }

    /// [`Self::in_order_each`], failing on the first failed command.
    pub(super) async fn in_order(&self, stages: &[Vec<Cmd>]) -> Result<Vec<Vec<RedisValue>>> {
        self.in_order_each(stages)
            .await?
            .into_iter()
            .map(|stage| stage.into_iter().collect())
            .collect()
    }

    /// Runs one command that must not run twice (a counter increment): neither the
    /// client nor this method sends it again once it may have reached the server; see
    /// [`Conn::query_once`].
    pub(super) async fn run_once<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
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
}

/// Whether a write script made its record anew: `STORE_CHECKPOINT`, `PUT_WRITES` (a new
/// thread) and `STORE_CONTEXT` answer 2 then, 1 otherwise. See
/// [`RedisBackend::write_indexed`].
pub(super) fn made_anew(reply: &RedisValue) -> bool {
    matches!(reply, RedisValue::Int(2))
}

/// Commands [`Conn::many`] sends to a cluster at once.
const CLUSTER_CHUNK: usize = 256;

/// The cluster client's waits before sending a refused command again, in ms.
const RETRY_WAIT_MIN_MS: u64 = 10;
const RETRY_WAIT_MAX_MS: u64 = 250;

/// A cluster client's settings as the backend uses them: its seeds, TLS roots and
/// timeouts, and refused commands sent again after 10-250 ms. redis-rs waits 1.28 s at
/// least before sending a refused command (TRYAGAIN while a slot migrates, CLUSTERDOWN
/// during a failover) again; 10 ms, doubling up to 250 ms, keeps a migration's cost to
/// milliseconds and still gives a failover its seconds within the retries.
pub(super) fn cluster_builder(
    nodes: &[String],
    certificates: Option<redis::TlsCertificates>,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> redis::cluster::ClusterClientBuilder {
    let mut builder = redis::cluster::ClusterClient::builder(nodes.to_vec())
        .connection_timeout(connect_timeout)
        .response_timeout(response_timeout)
        .min_retry_wait(RETRY_WAIT_MIN_MS)
        .max_retry_wait(RETRY_WAIT_MAX_MS)
        .retry_wait_formula(RETRY_WAIT_MIN_MS, 2);
    if let Some(certs) = certificates {
        builder = builder.certs(certs);
    }
    builder
}

/// How often at most a cluster's connection is opened anew after errors that say a node
/// may be gone.
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// The backend's connection: opened on first use; on a cluster, opened again (reading
/// the slots anew) on the first call after an error that says a node may be gone, at
/// most every [`REFRESH_AT_MOST_EVERY`]. Calls in flight keep the connection they
/// started on.
#[derive(Default)]
pub(super) struct Link {
    conn: std::sync::RwLock<Option<Conn>>,
    /// One opening at a time.
    opening: tokio::sync::Mutex<()>,
    /// Set by an error that says a node may be gone.
    stale: std::sync::atomic::AtomicBool,
    /// When the connection was last opened.
    opened: std::sync::Mutex<Option<Instant>>,
}

impl Link {
    /// The connection, unless there is none or it should be opened again.
    fn current(&self) -> Option<Conn> {
        let conn = self.get()?;
        if self.stale.load(Ordering::Acquire) {
            let opened = *self.opened.lock().unwrap_or_else(|e| e.into_inner());
            if opened.is_none_or(|at| at.elapsed() >= REFRESH_AT_MOST_EVERY) {
                return None;
            }
        }
        Some(conn)
    }

    fn get(&self) -> Option<Conn> {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, conn: Conn) {
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        *self.opened.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.stale.store(false, Ordering::Release);
    }

    /// Asks for the connection to be opened again.
    pub(super) fn stale(&self) {
        self.stale.store(true, Ordering::Release);
    }
}

/// Attempts [`Conn::query_once`] makes at most, as redis-rs's default retries.
pub(super) const ONCE_ATTEMPTS: u32 = 16;

impl Conn {
    pub(super) async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> redis::RedisResult<T> {
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
    pub(super) async fn query_once(
        &mut self,
        cmd: &Cmd,
        budget: Duration,
    ) -> redis::RedisResult<RedisValue> {
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
    pub(super) async fn many(
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
                // A command's response timeout runs from when it is queued: 10 000 sent
                // at once would wait behind each other past a second. A chunk at a time
                // keeps each one's wait short.
                let mut replies = Vec::with_capacity(cmds.len());
                for chunk in cmds.chunks(CLUSTER_CHUNK) {
                    let calls = chunk.iter().map(|cmd| {
                        let mut c = c.clone();
                        async move { cmd.query_async::<RedisValue>(&mut c).await }
                    });
                    replies.extend(futures_util::future::join_all(calls).await);
                }
                Ok(replies)
            }
        }
    }
}

pub(super) async fn load_scripts(conn: &mut Conn) -> redis::RedisResult<()> {
    for script in scripts::all() {
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(&script.source);
        conn.query::<String>(&load).await?;
    }
    Ok(())
}

pub(super) fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Whether `e` (whose scrubbed text is `text`) can only come from opening a connection,
/// never from a command on an open one: the connection was refused (or a Unix socket is
/// missing), or the host name did not resolve. An established TCP connection that breaks
/// reports a reset, a broken pipe or an end of file instead. Other failures of opening a
/// connection (a timeout, a TLS alert) look like those of a command and are not counted.
pub(super) fn failed_to_connect(e: &redis::RedisError, text: &str) -> bool {
    e.is_connection_refusal()
        || (e.is_io_error() && text.starts_with("failed to lookup address information"))
}

/// Whether `e` says the command did not run and may run if sent again later: a server
/// refusal while the cluster changes, or no connection to send it on.
pub(super) fn refused_without_running(e: &redis::RedisError) -> bool {
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

pub(super) fn evalsha(script: &Lua, keys: &[&str]) -> Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(&script.hash).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    c
}
