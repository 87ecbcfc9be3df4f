//! The change feed of the PostgreSQL backend. Every write statement of this library logs
//! the session, task context or thread it touched to the schema's unlogged `changes`
//! table, in a data-modifying CTE of the statement itself (so the row commits with the
//! write, or not at all), once the schema's feed is on (see `sql::logged` and
//! `schema::ENABLE_FEED`). One follower task per backend polls the log on a connection
//! of its own, outside the pool (a pooled connection is shared, and a follower's
//! settings and prepared statement belong to it).
//!
//! Logging in the statement rather than with `NOTIFY` (migration 3, replaced): a
//! transaction that notifies takes a cluster-wide lock at commit and holds it until the
//! commit is flushed, so concurrent writers no longer share WAL flushes (32 writers fell
//! from about 16 000 to 4 500 writes/s). Rather than with row triggers: a PL/pgSQL
//! trigger call costs several times the insert it makes (measured: triggers cost the
//! writes 9-22% of their throughput, the CTE within noise).
//!
//! # Following by snapshots
//!
//! A log cannot be read by an increasing key: keys are drawn before their transaction
//! commits, so a row with a smaller key may commit after a larger one was read. The
//! follower reads by visibility instead, as PgQ does. Each poll is one statement that
//! takes the server's current snapshot (`pg_current_snapshot()`, the very snapshot the
//! statement reads the table with) and returns it with the rows visible in it but not in
//! the previous poll's snapshot: rows whose transaction id is at or above the previous
//! snapshot's `xmax`, or among the transactions it listed as running. A transaction
//! becomes visible when it commits, and once, so every committed write is reported
//! exactly by the first poll after its commit (never before: the rows of a transaction
//! that has not committed are invisible, and so are those of one that rolled back). Both
//! parts are index ranges on `changes.xid`, so a poll reads only what is new, however
//! many rows the table holds or however long a transaction keeps the horizon back.
//!
//! The feed is up once the first snapshot is taken, so every write that commits after
//! [`FeedEvent::Up`](crate::feed::FeedEvent::Up) is reported.
//!
//! # Pruning
//!
//! Every backend prunes the log while it is used (see `PostgresBackend::prune_soon`),
//! one process at a time: a row goes once every transaction that was running [`KEEP`]
//! ago has ended, and `changes_pruned` records how far. A follower whose previous snapshot predates that point (stalled for
//! that long) may have missed rows: it reports [`FeedEvent::Missed`], and its caches
//! empty. A crash empties the unlogged log, but it also ends every follower's connection:
//! they report the feed down and, reconnected, start from a new snapshot.
//!
//! A poll that finds the schema's feed turned off (`change_feed` emptied by hand) ends
//! the session like a lost connection: writes are no longer logged, so the feed is down
//! until the flag is back.
//!
//! The follower starts with the first subscription and stops when the backend closes or
//! is dropped, or when no subscription is left (the next one starts it again). It
//! reconnects after a loss, reporting the feed down meanwhile, with backoff.
//!
//! [`FeedEvent::Missed`]: crate::feed::FeedEvent::Missed

use std::time::Duration;

use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Socket};

use super::connect::{self, ConnectOptions, SslMode};
use super::schema;
use crate::feed::listener::{Ended, Follow, Listener, Listening, Session};
use crate::feed::{Change, ChangeFeed};

/// How often the follower polls: well inside the 50 ms issue 16 aims at for a change to
/// reach another process's cache, for a hundred small statements a second per process.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long a poll may take before the connection counts as lost.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);
/// The most changes one poll publishes; past it, the poll reports that changes were
/// missed instead (a subscriber would fall behind on so many anyway).
const MAX_CHANGES: i64 = 4096;
/// How long rows stay in the log after every transaction running when they could have
/// been written ended; a follower stalled for longer misses changes.
pub(super) const KEEP: Duration = Duration::from_secs(10);
/// The first wait before reconnecting; it doubles after each failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the follower checks that someone still subscribes.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The backend's side of its feed.
#[derive(Debug, Default)]
pub(super) struct Feed(Listener);

impl Feed {
    /// A subscription, starting the follower of `schema` if none runs.
    pub(super) fn subscribe(&self, options: &ConnectOptions, schema: &str) -> ChangeFeed {
        self.0.subscribe(|on| Follower {
            on,
            config: options.config.clone(),
            ssl_mode: options.ssl_mode,
            target: options.redacted.clone(),
            schema: schema.to_owned(),
            start: start_sql(schema),
            poll: poll_sql(schema),
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

/// The first statement: the snapshot to follow from, and whether the schema logs its
/// writes (if it does, every write this snapshot cannot see will be logged).
fn start_sql(schema: &str) -> String {
    let s = schema::quoted(schema);
    format!("SELECT pg_current_snapshot()::text, EXISTS (SELECT FROM {s}.change_feed)")
}

/// The poll: `$1` is the previous snapshot, `$2` the most changes to return. Answers the
/// current snapshot, whether the schema still logs its writes, whether rows the previous
/// snapshot could not see were pruned, and the changes visible now but not then, each
/// `kind:id`, deduplicated. The two parts of the union are index ranges on `xid`. The
/// current snapshot is the statement's own, the same at every call; taken once in a
/// subquery rather than once per row, where each call copies and sorts it.
fn poll_sql(schema: &str) -> String {
    let s = schema::quoted(schema);
    format!(
        "SELECT pg_current_snapshot()::text, EXISTS (SELECT FROM {s}.change_feed), \
         COALESCE((SELECT p.below > pg_snapshot_xmin($1::text::pg_snapshot) \
         FROM {s}.changes_pruned p), false), \
         ARRAY(SELECT DISTINCT c.kind::text || ':' || c.id FROM (\
         SELECT xid, kind, id FROM {s}.changes \
         WHERE xid >= pg_snapshot_xmax($1::text::pg_snapshot) \
         UNION ALL SELECT xid, kind, id FROM {s}.changes \
         WHERE xid = ANY(ARRAY(SELECT pg_snapshot_xip($1::text::pg_snapshot)))) c \
         WHERE pg_visible_in_snapshot(c.xid, (SELECT pg_current_snapshot())) LIMIT $2)"
    )
}

struct Follower {
    on: Listening,
    /// The pool's settings, password included; never printed.
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    /// The redacted URL, the only form logged.
    target: String,
    schema: String,
    start: String,
    poll: String,
}

impl Follow for Follower {
    const BACKOFF: (Duration, Duration) = (FIRST_BACKOFF, MAX_BACKOFF);

    async fn session(&mut self) -> Session {
        match self.ssl_mode {
            SslMode::Require => self.connected(connect::rustls_connector()).await,
            SslMode::Disable | SslMode::Prefer => self.connected(tokio_postgres::NoTls).await,
        }
    }
}

impl Follower {
    /// One connection: take the first snapshot, report the feed up, poll.
    async fn connected<T>(&mut self, tls: T) -> Session
    where
        T: MakeTlsConnect<Socket>,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let (client, connection) = match self.config.connect(tls).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(
                    target = %self.target,
                    error = %connect::describe(&e),
                    "postgres change feed: cannot connect"
                );
                return Session::Lost { was_up: false };
            }
        };
        // The connection is driven by a task of its own while the client's statements
        // are awaited here.
        let mut driver = tokio::spawn(connection);
        let ended = self.follow_on(&client).await;
        // Left to itself, the driver says goodbye to the server once the client is gone;
        // a lost connection cannot, and its socket could linger until the OS gives up.
        drop(client);
        if let Session::Lost { .. } = ended {
            driver.abort();
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut driver).await;
        }
        ended
    }

    /// Takes the first snapshot, checking that the schema logs its writes, reports the
    /// feed up, and polls until the session ends.
    async fn follow_on(&mut self, client: &Client) -> Session {
        let start = async {
            // The poll must read the log through its index whatever the table's
            // statistics say (a server without autovacuum may have none, and then
            // guesses a third of the table): with sequential scans off it does, with one
            // plan made once. JIT would take the disabled scans' cost for a big query.
            client
                .batch_execute(
                    "SET enable_seqscan = off; SET jit = off; \
                     SET plan_cache_mode = force_generic_plan",
                )
                .await?;
            let poll = client.prepare(&self.poll).await?;
            let row = client.query_one(&self.start, &[]).await?;
            Ok::<_, tokio_postgres::Error>((poll, row.try_get(0)?, row.try_get(1)?))
        };
        let (poll, mut snapshot) = match tokio::time::timeout(POLL_TIMEOUT, start).await {
            Ok(Ok((poll, first, true))) => (poll, first),
            Ok(Ok((_, _, false))) => {
                tracing::debug!(
                    target = %self.target,
                    schema = %self.schema,
                    "postgres change feed: the schema does not log its writes (yet)"
                );
                return Session::Lost { was_up: false };
            }
            Ok(Err(e)) => {
                tracing::debug!(
                    target = %self.target,
                    error = %connect::describe(&e),
                    "postgres change feed: cannot start following"
                );
                return Session::Lost { was_up: false };
            }
            Err(_) => return Session::Lost { was_up: false },
        };
        self.on.hub.up();
        tracing::debug!(target = %self.target, schema = %self.schema, "postgres change feed up");

        let mut ticks = tokio::time::interval(POLL_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::Instant::now() + HEARTBEAT;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = self.on.stop_signal() => return Session::Ended(Ended::Stopped),
            }
            let limit = MAX_CHANGES + 1;
            let params: [&(dyn ToSql + Sync); 2] = [&snapshot, &limit];
            let answer = tokio::time::timeout(POLL_TIMEOUT, client.query_one(&poll, &params));
            let row = match answer.await {
                Ok(Ok(row)) => row,
                Ok(Err(e)) => {
                    self.lost(&connect::describe(&e));
                    return Session::Lost { was_up: true };
                }
                Err(_) => {
                    self.lost("the connection stopped answering");
                    return Session::Lost { was_up: true };
                }
            };
            match decode(&row) {
                Ok(Poll { logged: false, .. }) => {
                    self.lost("the schema's change feed was turned off");
                    return Session::Lost { was_up: true };
                }
                Ok(poll) => {
                    snapshot = poll.snapshot;
                    self.publish(poll.pruned, &poll.changes);
                }
                Err(e) => {
                    self.lost(&format!("a poll's answer did not decode: {e}"));
                    return Session::Lost { was_up: true };
                }
            }
            if tokio::time::Instant::now() >= heartbeat {
                heartbeat = tokio::time::Instant::now() + HEARTBEAT;
                if self.on.unwatched() {
                    return Session::Ended(Ended::Unwatched);
                }
            }
        }
    }

    fn lost(&self, why: &str) {
        tracing::warn!(
            target = %self.target,
            error = %why,
            "postgres change feed lost its connection; reconnecting"
        );
    }

    /// Publishes one poll's changes; too many, a pruned row or a change of no known kind
    /// (a truncated table) is reported as missed changes.
    fn publish(&self, pruned: bool, changes: &[String]) {
        if pruned || changes.len() as i64 > MAX_CHANGES {
            self.on.hub.missed();
            return;
        }
        let mut missed = false;
        for payload in changes {
            match change(payload) {
                Some(change) => self.on.hub.changed(change),
                None => missed = true,
            }
        }
        if missed {
            self.on.hub.missed();
        }
    }
}

/// What one poll answered.
struct Poll {
    /// The snapshot the next poll starts from.
    snapshot: String,
    /// Whether the schema still logs its writes.
    logged: bool,
    /// Whether rows the previous snapshot could not see were pruned.
    pruned: bool,
    /// The changes that committed between the two snapshots, `kind:id`.
    changes: Vec<String>,
}

fn decode(row: &tokio_postgres::Row) -> Result<Poll, tokio_postgres::Error> {
    Ok(Poll {
        snapshot: row.try_get(0)?,
        logged: row.try_get(1)?,
        pruned: row.try_get(2)?,
        changes: row.try_get(3)?,
    })
}

/// The change a log row reports: `s:`, `t:` or `c:` and the id.
fn change(payload: &str) -> Option<Change> {
    let (kind, id) = payload.split_once(':')?;
    let id = id.to_owned();
    match kind {
        "s" => Some(Change::Session(id)),
        "t" => Some(Change::TaskContext(id)),
        "c" => Some(Change::Thread(id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_the_kind_and_the_whole_id() {
        assert_eq!(change("s:a:b"), Some(Change::Session("a:b".into())));
        assert_eq!(change("t:x"), Some(Change::TaskContext("x".into())));
        assert_eq!(change("c:"), Some(Change::Thread(String::new())));
        assert_eq!(change("q:x"), None);
        assert_eq!(change("nothing"), None);
    }
}
