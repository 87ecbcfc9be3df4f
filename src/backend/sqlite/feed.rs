//! The SQLite change feed. Several processes may share one file, and SQLite tells none
//! of them what the others wrote: so every write adds a row per session, task context
//! or thread it touched to the `changes` table, in the write's own transaction, and one
//! task per backend polls that table and publishes what it finds on a [`FeedHub`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rusqlite::{params, OpenFlags};
use tokio_rusqlite::Connection;

use super::error::Sql;
use crate::feed::{Change, ChangeFeed, FeedHub};

/// How often the poller looks for new changes. A poll that finds none reads one page
/// already in the page cache or the WAL index, a few microseconds on the poller's own
/// thread; 10 ms keeps the delay until a cache drops a remote change well inside the
/// 50 ms issue 16 aims at, for ~100 such reads a second per process.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The most rows one poll reads: a poll that reads this many polls again at once, so a
/// burst is drained in steps that never hold the poller's connection for long.
const POLL_BATCH: usize = 1000;

/// How many changes the table keeps behind the newest. A poller that falls further
/// behind (stalled for seconds under thousands of writes a second) finds rows it has
/// not read gone and reports [`FeedEvent::Missed`](crate::feed::FeedEvent::Missed),
/// which empties its cache: correct, only slower.
pub(super) const KEEP: i64 = 10_000;

/// Writers trim the table when a change's seq is a multiple of this: one DELETE of
/// about this many rows per this many writes, instead of a DELETE in every write, and
/// no separate task (a file nobody polls is still trimmed).
const TRIM_EVERY: i64 = 1_000;

/// The first and longest waits before the poller tries again after a failure (a file
/// locked for longer than the busy timeout, removed, or not yet migrated).
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What a write touched, as recorded in the `changes` table.
#[derive(Debug, Clone, Copy)]
pub(super) enum Touched {
    Session,
    TaskContext,
    Thread,
    /// Too many to list (a cleanup that removes thousands of sessions): subscribers
    /// are told they missed changes.
    Everything,
}

impl Touched {
    fn code(self) -> &'static str {
        match self {
            Touched::Session => "s",
            Touched::TaskContext => "c",
            Touched::Thread => "t",
            Touched::Everything => "a",
        }
    }
}

thread_local! {
    /// Whether the connection whose thread this is records changes (its backend offers
    /// a feed). tokio-rusqlite runs each connection on a thread of its own.
    static RECORDING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the connection of the calling thread record changes.
pub(super) fn set_recording(on: bool) {
    RECORDING.with(|r| r.set(on));
}

/// Runs a write of one statement in a transaction when its change is recorded, so the
/// change commits with it; otherwise alone, as a statement commits by itself, at no cost
/// to a backend without a feed.
pub(super) fn atomic<R>(
    conn: &mut rusqlite::Connection,
    write: impl FnOnce(&rusqlite::Connection) -> Sql<R>,
) -> Sql<R> {
    if !RECORDING.with(|r| r.get()) {
        return write(conn);
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let answer = write(&tx)?;
    tx.commit()?;
    Ok(answer)
}

/// Records a change inside the caller's transaction, and trims the table now and then;
/// nothing when the connection's backend offers no feed.
pub(super) fn record(conn: &rusqlite::Connection, touched: Touched, id: &str) -> Sql<()> {
    if !RECORDING.with(|r| r.get()) {
        return Ok(());
    }
    conn.prepare_cached("INSERT INTO changes (kind, id) VALUES (?1, ?2)")?
        .execute(params![touched.code(), id])?;
    // The rowid is the seq.
    let seq = conn.last_insert_rowid();
    // Always keeps the newest row, so seqs are never reused (see the schema).
    if seq % TRIM_EVERY == 0 {
        conn.prepare_cached("DELETE FROM changes WHERE seq <= ?1")?
            .execute([seq - KEEP])?;
    }
    Ok(())
}

/// A backend's feed: its hub and whether a poller runs.
#[derive(Debug, Default)]
pub(super) struct Feed {
    hub: FeedHub,
    polling: AtomicBool,
    closed: AtomicBool,
}

impl Feed {
    /// A new subscription; starts the poller on `path` if none runs and a runtime is at
    /// hand (without one, the subscription stays down until a later call starts it).
    pub(super) fn subscribe(self: &Arc<Self>, path: PathBuf, busy: Duration) -> ChangeFeed {
        let feed = self.hub.subscribe();
        if !self.closed.load(Ordering::Acquire) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                if self.claim() {
                    runtime.spawn(poll(Arc::downgrade(self), path, busy));
                }
            }
        }
        feed
    }

    /// Stops the poller at its next tick.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// The feed's state for a health report, once a poller started moments ago had the
    /// time to connect (up to `wait`): a cache over this backend reports itself degraded
    /// while the feed is down, and a poller started by the very call that checks health
    /// should not make a healthy store look degraded. `"off"` while nobody subscribes.
    pub(super) async fn settled_state(&self, wait: Duration) -> &'static str {
        let started = tokio::time::Instant::now();
        while self.polling.load(Ordering::Acquire) && !self.hub.is_up() && started.elapsed() < wait
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        match (self.polling.load(Ordering::Acquire), self.hub.is_up()) {
            (_, true) => "up",
            (true, false) => "down",
            (false, false) => "off",
        }
    }

    fn claim(&self) -> bool {
        self.polling
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn wanted(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.hub.subscribers() > 0
    }

    /// Reports the feed down if it was up: a repeated Down would count as another loss.
    fn down(&self) {
        if self.hub.is_up() {
            self.hub.down();
        }
    }

    /// Called by a poller that is no longer wanted: gives up the poller's place, unless
    /// a subscription made meanwhile found it taken (then this poller goes on).
    fn release(&self) -> bool {
        self.down();
        self.polling.store(false, Ordering::Release);
        !(self.wanted() && self.claim())
    }
}

/// The newest seq, which fails on a file not yet migrated.
fn newest(c: &mut rusqlite::Connection) -> rusqlite::Result<i64> {
    c.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
        r.get(0)
    })
}

const POLL_SQL: &str = "SELECT seq, kind, id FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2";

fn changes_after(c: &mut rusqlite::Connection, last: i64) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = c.prepare_cached(POLL_SQL)?;
    let rows = stmt.query_map(params![last, POLL_BATCH as i64], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    rows.collect()
}

type Row = (i64, String, String);

async fn connect(path: PathBuf, busy: Duration) -> Option<(Connection, i64)> {
    // No CREATE: a poller must not make a file of its own where the backend's is gone.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).await.ok()?;
    let busy = busy.as_millis();
    let last = conn
        .call(move |c| {
            c.execute_batch(&format!(
                "PRAGMA busy_timeout = {busy}; PRAGMA query_only = ON;"
            ))?;
            newest(c)
        })
        .await
        .ok()?;
    Some((conn, last))
}

/// The poller: connects, reports the feed up, then publishes new changes every
/// [`POLL_INTERVAL`] until the backend is closed or dropped or nobody subscribes.
async fn poll(feed: Weak<Feed>, path: PathBuf, busy: Duration) {
    let mut backoff = MIN_BACKOFF;
    'connect: loop {
        let connected = connect(path.clone(), busy).await;
        let Some(f) = feed.upgrade() else { return };
        if !f.wanted() {
            if f.release() {
                return;
            }
            continue 'connect;
        }
        let Some((conn, mut last)) = connected else {
            f.down();
            drop(f);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue 'connect;
        };
        // Up only once the newest seq is known: every change from here on is published.
        f.hub.up();
        drop(f);
        backoff = MIN_BACKOFF;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drained = true;
        loop {
            if drained {
                tick.tick().await;
            }
            let Some(f) = feed.upgrade() else { return };
            if !f.wanted() {
                if f.release() {
                    return;
                }
                // Reported down meanwhile: start over, and up again.
                continue 'connect;
            }
            let rows = match conn.call(move |c| changes_after(c, last)).await {
                Ok(rows) => rows,
                Err(_) => {
                    f.down();
                    continue 'connect;
                }
            };
            // Seqs are never reused and commit in order (one writer at a time), so a
            // gap after `last` is rows trimmed before this poller read them.
            if rows.first().is_some_and(|(seq, _, _)| *seq > last + 1) {
                f.hub.missed();
            }
            drained = rows.len() < POLL_BATCH;
            for (seq, kind, id) in rows {
                last = seq;
                match kind.as_str() {
                    "s" => f.hub.changed(Change::Session(id)),
                    "c" => f.hub.changed(Change::TaskContext(id)),
                    "t" => f.hub.changed(Change::Thread(id)),
                    // "a", or a kind of a newer version: anything may have changed.
                    _ => f.hub.missed(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sqlite::SqliteBackend;
    use crate::feed::FeedEvent;
    use crate::storage::{StorageBackend, TaskContextStorage};

    async fn next(feed: &mut ChangeFeed) -> FeedEvent {
        tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("no event within 10 s")
            .expect("the feed ended")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_is_published_and_closing_takes_the_feed_down() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteBackend::new(dir.path().join("f.db")).with_change_feed(true);
        backend.initialize().await.unwrap();
        let mut feed = backend.changes().unwrap();
        assert_eq!(next(&mut feed).await, FeedEvent::Down);
        assert_eq!(next(&mut feed).await, FeedEvent::Up);
        backend
            .store_task_context("s", &serde_json::json!(1))
            .await
            .unwrap();
        assert_eq!(
            next(&mut feed).await,
            FeedEvent::Changed(Change::TaskContext("s".into()))
        );
        backend.close().await.unwrap();
        assert_eq!(next(&mut feed).await, FeedEvent::Down);
        assert!(SqliteBackend::in_memory().changes().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_trimmed_before_the_poller_read_them_are_reported_missed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let backend = SqliteBackend::new(&path).with_change_feed(true);
        backend.initialize().await.unwrap();
        let mut feed = backend.changes().unwrap();
        assert_eq!(next(&mut feed).await, FeedEvent::Down);
        assert_eq!(next(&mut feed).await, FeedEvent::Up);

        // Another writer commits more changes than the table keeps in one transaction:
        // the oldest are trimmed before the poller could read them.
        let written = KEEP + TRIM_EVERY;
        let mut other = rusqlite::Connection::open(&path).unwrap();
        // As on a writer connection's thread.
        set_recording(true);
        let tx = other.transaction().unwrap();
        for i in 1..=written {
            assert!(record(&tx, Touched::Thread, &format!("t{i}")).is_ok());
        }
        tx.commit().unwrap();
        let oldest: i64 = other
            .query_row("SELECT MIN(seq) FROM changes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(oldest, TRIM_EVERY + 1, "the writer trimmed the table");

        assert_eq!(next(&mut feed).await, FeedEvent::Missed);
        // Then the changes kept, up to the newest (a subscriber this far behind may be
        // told it missed more).
        let newest = Change::Thread(format!("t{written}"));
        loop {
            match next(&mut feed).await {
                FeedEvent::Changed(c) if c == newest => break,
                FeedEvent::Changed(_) | FeedEvent::Missed => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        backend.close().await.unwrap();
    }
}
