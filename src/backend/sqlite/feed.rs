//! The SQLite change feed. Several processes may share one file, and SQLite tells none
//! of them what the others wrote: so while anyone follows the feed, every write adds a
//! row per session, task context or thread it touched to the `changes` table, in the
//! write's own transaction, and one task per following backend polls that table and
//! publishes what it finds on a [`FeedHub`].
//!
//! Recording costs a write 12-27% of its throughput, so writers record only while a
//! follower is registered in `feed_followers`. A writer connection caches whether one
//! is, and looks again, under the write lock, once the answer is [`LOOK_EVERY`] old.
//! A poller registers, then waits until no write can still commit on an older
//! "nobody follows", and only then reports the feed up:
//!
//! - No write commits unrecorded on an answer read, under the write lock, [`FRESH`] or
//!   more before it took the lock. A write transaction (`BEGIN IMMEDIATE`) decides
//!   under the lock, on an answer younger than [`LOOK_EVERY`]. A write of one statement
//!   run alone on a "nobody follows" younger than [`LOOK_EVERY`] takes the lock only
//!   as it runs, so its commit is refused once the answer is [`FRESH`] old, and it runs
//!   again in a transaction (see [`atomic`]). A registration an answer missed
//!   committed after that answer was read.
//! - The poller waits [`FRESH`] and a margin after its registration committed, then
//!   takes the write lock itself (the fence): any write that committed unrecorded on an
//!   answer older than the registration took the lock before the wait ended, and held
//!   it until it committed, so before the fence got it. Every write after the fence
//!   records. Time is only ever measured within one process, on the monotonic clock,
//!   which runs at one rate for every process of a host (and a shared SQLite file in
//!   WAL mode only works between processes of one host).
//! - Writes that committed unrecorded before the feed came up do not matter: a cache
//!   empties itself when its feed goes down and trusts nothing until it is up again.
//! - A registration expires unless renewed ([`RENEW_EVERY`]); writers ignore expired
//!   rows, so a follower that died stops costing writers anything within seconds. A
//!   poller whose renewal fails (the lock held by others for longer than its busy
//!   timeout) reports the feed down before its registration expires; one that finds
//!   its registration about to expire or expired (its task stalled for ~10 s, the wall
//!   clock stepped forward), or gone, reports it down as soon as it runs. Then it
//!   registers again, and comes up as it did the first time. A process stalled past
//!   its registration's expiry may serve values cached before the stall until its
//!   poller runs again.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rusqlite::{params, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio_rusqlite::Connection;

use super::error::{Failure, Sql};
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
/// no separate task.
const TRIM_EVERY: i64 = 1_000;

/// The first and longest waits before the poller tries again after a failure (a file
/// locked for longer than the busy timeout, removed, or not yet migrated).
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The oldest answer to "does anyone follow?" a write may commit on, from when it took
/// the write lock; a new follower waits this long (and [`FENCE_MARGIN`]) before its
/// feed is up.
pub(super) const FRESH: Duration = Duration::from_millis(100);

/// How often a writer looks again whether anyone follows: one indexed read of a table
/// of a few rows every 50 ms costs nothing measurable. Half of [`FRESH`]: a write run
/// alone on an answer younger than this may wait the other half for the lock before
/// its commit is refused.
const LOOK_EVERY: Duration = Duration::from_millis(50);

/// Added to [`FRESH`] before the fence, for the instants each side takes around its
/// SQLite calls.
const FENCE_MARGIN: Duration = Duration::from_millis(20);

/// How often a poller renews its registration.
const RENEW_EVERY: Duration = Duration::from_secs(2);

/// A registration lasts this much longer than the poller's busy timeout, so a renewal
/// that waits out a busy lock and fails still leaves it time to report the feed down
/// before writers could ignore it.
const LEASE_BASE: Duration = Duration::from_secs(10);

/// A poller whose registration has less than this left, by the wall clock writers
/// compare it with or by its own monotonic clock, reports the feed down and registers
/// again, rather than let writers ignore it unawares.
const LEASE_SAFETY: Duration = Duration::from_secs(3);

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

/// What the writer connection of a thread knows of the feed. tokio-rusqlite runs each
/// connection on a thread of its own, and only a backend's writer connection writes.
#[derive(Debug, Clone, Copy)]
struct Recording {
    /// Its backend offers a feed: record while someone follows.
    on: bool,
    /// Whether a follower was registered when last looked, and when that was (under
    /// the write lock).
    followed: bool,
    looked: Option<Instant>,
}

thread_local! {
    static RECORDING: Cell<Recording> = const {
        Cell::new(Recording { on: false, followed: false, looked: None })
    };
    /// Set while [`atomic`] runs a write alone, outside a transaction, on a recent
    /// "nobody follows": [`late`] then refuses its commits once that answer is
    /// [`FRESH`] old.
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// Makes `conn`, the writer connection of the calling thread, record changes while
/// someone follows.
pub(super) fn start_recording(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    RECORDING.set(Recording {
        on: true,
        followed: false,
        looked: None,
    });
    conn.commit_hook(Some(late))
}

/// The writer's commit hook, which SQLite calls under the write lock just before a
/// commit: `true` turns the commit into a rollback. It refuses a commit of a write run
/// alone once its "nobody follows" is [`FRESH`] old, since a follower registered
/// since may have passed its fence (see the module docs).
fn late() -> bool {
    ALONE.get()
        && RECORDING
            .get()
            .looked
            .is_none_or(|looked| looked.elapsed() >= FRESH)
}

/// Whether a write failed because [`late`] refused its commit.
fn refused(failure: &Failure) -> bool {
    matches!(
        failure,
        Failure::Sql(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_COMMITHOOK
    )
}

/// The wall clock in Unix milliseconds, as `feed_followers.expires_at` counts.
fn wall_ms() -> i64 {
    crate::model::now().timestamp_millis()
}

/// Whether this write records its changes: whether a follower is registered, as last
/// read under the write lock less than [`LOOK_EVERY`] ago. Must run inside a
/// transaction that holds the write lock (see the module docs), or in a write run
/// alone by [`atomic`], whose commits [`late`] checks instead.
fn recording(conn: &rusqlite::Connection) -> Sql<bool> {
    let state = RECORDING.get();
    if !state.on || ALONE.get() {
        return Ok(false);
    }
    let now = Instant::now();
    if let Some(looked) = state.looked {
        if now.duration_since(looked) < LOOK_EVERY {
            return Ok(state.followed);
        }
    }
    // Every write transaction here is `BEGIN IMMEDIATE`: in one, the lock is held.
    debug_assert!(
        !conn.is_autocommit(),
        "a writer must decide whether to record under the write lock"
    );
    let followed = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM feed_followers WHERE expires_at > ?1)")?
        .query_row([wall_ms()], |r| r.get(0))?;
    RECORDING.set(Recording {
        on: true,
        followed,
        looked: Some(now),
    });
    Ok(followed)
}

/// Runs a write of one statement (or of a few, each of which may commit alone) so
/// that, with a feed, it decides whether to record under the write lock and its change
/// commits with it: in a `BEGIN IMMEDIATE` transaction (`BEGIN` and `COMMIT` prepared
/// once, since parsing them each time cost 2% more). Without a feed, alone.
///
/// With a feed nobody followed at a look less than [`LOOK_EVERY`] ago, alone as well,
/// which spares the write the transaction: about 5% of a single-statement write's time
/// in SQLite. Such a write decides before it has the lock, and may wait for the lock
/// (up to the busy timeout) until after a new follower's fence; so [`late`] refuses its
/// commit once the look is [`FRESH`] old, and it runs again in a transaction. `write`
/// must therefore be safe to run twice: a statement of it may have committed before a
/// later one was refused.
pub(super) fn atomic<R>(
    conn: &mut rusqlite::Connection,
    write: impl Fn(&rusqlite::Connection) -> Sql<R>,
) -> Sql<R> {
    let state = RECORDING.get();
    if !state.on {
        return write(conn);
    }
    let recent = |looked: Instant| looked.elapsed() < LOOK_EVERY;
    if !state.followed && state.looked.is_some_and(recent) {
        let alone = Alone::start();
        let done = write(conn);
        drop(alone);
        match done {
            Err(failure) if refused(&failure) => {}
            done => return done,
        }
    }
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let open = Open(conn);
    let answer = write(open.0)?;
    open.0.prepare_cached("COMMIT")?.execute([])?;
    Ok(answer)
}

/// Marks a write run alone by [`atomic`] for as long as it lives.
struct Alone;

impl Alone {
    fn start() -> Self {
        ALONE.set(true);
        Alone
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        ALONE.set(false);
    }
}

/// An open transaction of [`atomic`], rolled back unless it committed.
struct Open<'c>(&'c rusqlite::Connection);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if !self.0.is_autocommit() {
            let _ = self.0.execute_batch("ROLLBACK");
        }
    }
}

/// Records a change inside the caller's write transaction, and trims the table now and
/// then; nothing when nobody follows or the connection's backend offers no feed.
pub(super) fn record(conn: &rusqlite::Connection, touched: Touched, id: &str) -> Sql<()> {
    if !recording(conn)? {
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
fn newest(c: &rusqlite::Connection) -> rusqlite::Result<i64> {
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

/// A poller's registration in `feed_followers`, as this poller last wrote it.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// As stored: Unix milliseconds, compared by writers with their wall clock.
    expires_at: i64,
    /// Taken before the write that stored `expires_at`.
    renewed: Instant,
    /// How long a registration lasts.
    ttl: Duration,
}

impl Lease {
    /// Written at `renewed`, when the wall clock read `now`.
    fn new(now: i64, renewed: Instant, ttl: Duration) -> Self {
        Lease {
            expires_at: now.saturating_add(ttl.as_millis() as i64),
            renewed,
            ttl,
        }
    }

    /// Whether writers may soon ignore the registration: by the wall clock they use, or
    /// by the monotonic clock, which a stepped wall clock does not move.
    fn at_risk(&self) -> bool {
        self.expires_at.saturating_sub(wall_ms()) < LEASE_SAFETY.as_millis() as i64
            || self.renewed.elapsed() + LEASE_SAFETY >= self.ttl
    }

    fn due(&self) -> bool {
        self.renewed.elapsed() >= RENEW_EVERY
    }
}

/// Registers follower `me` (and removes expired registrations). Returns the lease and
/// when the registration had committed.
fn register(
    c: &mut rusqlite::Connection,
    me: &str,
    ttl: Duration,
) -> rusqlite::Result<(Lease, Instant)> {
    let (renewed, now) = (Instant::now(), wall_ms());
    let lease = Lease::new(now, renewed, ttl);
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.prepare_cached("DELETE FROM feed_followers WHERE expires_at <= ?1")?
        .execute([wall_ms()])?;
    tx.prepare_cached(
        "INSERT INTO feed_followers (id, expires_at) VALUES (?1, ?2) \
         ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at",
    )?
    .execute(params![me, lease.expires_at])?;
    tx.commit()?;
    Ok((lease, Instant::now()))
}

/// Extends follower `me`'s registration; `None` if it was gone or had expired, so that
/// writers may have ignored it.
fn renew(c: &mut rusqlite::Connection, me: &str, ttl: Duration) -> rusqlite::Result<Option<Lease>> {
    let (renewed, now) = (Instant::now(), wall_ms());
    let lease = Lease::new(now, renewed, ttl);
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // The clock read under the lock, after any writer's look that this check answers for.
    let now = wall_ms();
    let kept = tx
        .prepare_cached(
            "UPDATE feed_followers SET expires_at = ?2 WHERE id = ?1 AND expires_at > ?3",
        )?
        .execute(params![me, lease.expires_at, now])?
        == 1;
    tx.prepare_cached("DELETE FROM feed_followers WHERE expires_at <= ?1")?
        .execute([now])?;
    tx.commit()?;
    Ok(kept.then_some(lease))
}

/// The fence: takes the write lock, so every transaction that decided not to record
/// before this follower's registration was seen has committed (see the module docs),
/// and returns the newest seq; `None` if the registration expired meanwhile.
fn fence(c: &mut rusqlite::Connection, me: &str) -> rusqlite::Result<Option<i64>> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let alive = tx
        .prepare_cached("SELECT expires_at > ?2 FROM feed_followers WHERE id = ?1")?
        .query_row(params![me, wall_ms()], |r| r.get(0))
        .optional()?
        .unwrap_or(false);
    let newest = newest(&tx)?;
    tx.commit()?;
    Ok(alive.then_some(newest))
}

/// Opens the poller's connection and registers follower `me` on it.
async fn connect(
    path: PathBuf,
    busy: Duration,
    me: Arc<str>,
    ttl: Duration,
) -> Option<(Connection, Lease, Instant)> {
    // No CREATE: a poller must not make a file of its own where the backend's is gone.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).await.ok()?;
    let busy = busy.as_millis();
    let (lease, registered) = conn
        .call(move |c| {
            c.execute_batch(&format!("PRAGMA busy_timeout = {busy};"))?;
            // A file the backend has not yet made a WAL file is left alone: a write lock
            // held on it makes the backend's switch to WAL fail at once (SQLite does not
            // wait for that lock), and its initialize() with it.
            let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Ok(None);
            }
            register(c, &me, ttl).map(Some)
        })
        .await
        .ok()??;
    Some((conn, lease, registered))
}

/// Removes follower `me`'s registration, so writers stop recording for it; should this
/// fail, it expires.
async fn leave(conn: &Connection, me: &Arc<str>) {
    let me = me.clone();
    let _ = conn
        .call(move |c| {
            c.prepare_cached("DELETE FROM feed_followers WHERE id = ?1")?
                .execute([&*me])
        })
        .await;
}

/// Waits until `at` by the monotonic clock writers' answers are timed with.
async fn sleep_until(at: Instant) {
    loop {
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left).await;
    }
}

/// What a poller does when it is no longer wanted: leaves, and stops (`true`) unless a
/// subscription made meanwhile needs it again.
async fn stop(feed: &Feed, conn: Option<&Connection>, me: &Arc<str>) -> bool {
    if let Some(conn) = conn {
        leave(conn, me).await;
    }
    feed.release()
}

/// The poller: connects and registers, reports the feed up once writers record for it,
/// then publishes new changes every [`POLL_INTERVAL`] and renews its registration, until
/// the backend is closed or dropped or nobody subscribes.
async fn poll(feed: Weak<Feed>, path: PathBuf, busy: Duration) {
    let me: Arc<str> = uuid::Uuid::now_v7().to_string().into();
    let ttl = LEASE_BASE + busy;
    let mut backoff = MIN_BACKOFF;
    'connect: loop {
        let connected = connect(path.clone(), busy, me.clone(), ttl).await;
        let conn = connected.as_ref().map(|(c, _, _)| c);
        let Some(f) = feed.upgrade() else {
            if let Some(conn) = conn {
                leave(conn, &me).await;
            }
            return;
        };
        if !f.wanted() {
            if stop(&f, conn, &me).await {
                return;
            }
            continue 'connect;
        }
        let Some((conn, mut lease, registered)) = connected else {
            f.down();
            drop(f);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue 'connect;
        };
        drop(f);
        // Up only once every writer records for this registration, and the newest seq
        // is known: every change from here on is published.
        sleep_until(registered + FRESH + FENCE_MARGIN).await;
        let id = me.clone();
        let fenced = conn.call(move |c| fence(c, &id)).await;
        let Some(f) = feed.upgrade() else {
            leave(&conn, &me).await;
            return;
        };
        if !f.wanted() {
            if stop(&f, Some(&conn), &me).await {
                return;
            }
            continue 'connect;
        }
        let mut last = match fenced {
            Ok(Some(last)) if !lease.at_risk() => last,
            _ => {
                f.down();
                drop(f);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue 'connect;
            }
        };
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
            let Some(f) = feed.upgrade() else {
                leave(&conn, &me).await;
                return;
            };
            if !f.wanted() {
                if stop(&f, Some(&conn), &me).await {
                    return;
                }
                // Reported down meanwhile: start over, and up again.
                continue 'connect;
            }
            // Writers may soon skip recording, or already do: trust nothing until
            // registered again.
            if lease.at_risk() {
                f.down();
                continue 'connect;
            }
            if lease.due() {
                let id = me.clone();
                match conn.call(move |c| renew(c, &id, ttl)).await {
                    Ok(Some(renewed)) => lease = renewed,
                    Ok(None) | Err(_) => {
                        f.down();
                        continue 'connect;
                    }
                }
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
        let backend = SqliteBackend::new(dir.path().join("f.db"));
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
        let backend = SqliteBackend::new(&path);
        backend.initialize().await.unwrap();
        let mut feed = backend.changes().unwrap();
        assert_eq!(next(&mut feed).await, FeedEvent::Down);
        assert_eq!(next(&mut feed).await, FeedEvent::Up);

        // Another writer commits more changes than the table keeps in one transaction:
        // the oldest are trimmed before the poller could read them.
        let written = KEEP + TRIM_EVERY;
        let mut other = rusqlite::Connection::open(&path).unwrap();
        // As a writer connection (this test's poller follows).
        start_recording(&other).unwrap();
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

    fn count(path: &std::path::Path, sql: &str) -> i64 {
        let c = rusqlite::Connection::open(path).unwrap();
        c.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_record_only_while_someone_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let backend = SqliteBackend::new(&path);
        let context = serde_json::json!(1);
        backend.store_task_context("a", &context).await.unwrap();
        assert_eq!(count(&path, "SELECT count(*) FROM changes"), 0);

        let mut feed = backend.changes().unwrap();
        assert_eq!(next(&mut feed).await, FeedEvent::Down);
        let started = Instant::now();
        assert_eq!(next(&mut feed).await, FeedEvent::Up);
        // Not before every writer's answer to "does anyone follow?" may be outdated.
        assert!(started.elapsed() >= FRESH, "{:?}", started.elapsed());
        assert_eq!(count(&path, "SELECT count(*) FROM feed_followers"), 1);
        backend.store_task_context("b", &context).await.unwrap();
        assert_eq!(
            next(&mut feed).await,
            FeedEvent::Changed(Change::TaskContext("b".into()))
        );

        // The last subscription gone, the poller leaves at its next tick, and writes
        // record nothing once the writer looked again.
        drop(feed);
        let started = Instant::now();
        while count(&path, "SELECT count(*) FROM feed_followers") > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "still following"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(FRESH).await;
        let before = count(&path, "SELECT count(*) FROM changes");
        backend.store_task_context("c", &context).await.unwrap();
        assert_eq!(count(&path, "SELECT count(*) FROM changes"), before);
        backend.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_whose_registration_went_reports_the_feed_down_and_registers_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let backend = SqliteBackend::new(&path);
        backend.initialize().await.unwrap();
        let mut feed = backend.changes().unwrap();
        assert_eq!(next(&mut feed).await, FeedEvent::Down);
        assert_eq!(next(&mut feed).await, FeedEvent::Up);
        // As if it had expired while the poller stalled: writers may have skipped
        // recording since.
        for sql in [
            "UPDATE feed_followers SET expires_at = 0",
            "DELETE FROM feed_followers",
        ] {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute(sql, []).unwrap();
            assert_eq!(next(&mut feed).await, FeedEvent::Down, "{sql}");
            assert_eq!(next(&mut feed).await, FeedEvent::Up, "{sql}");
            assert_eq!(
                count(
                    &path,
                    "SELECT count(*) FROM feed_followers WHERE expires_at > 0"
                ),
                1
            );
        }
        backend.close().await.unwrap();
    }

    #[test]
    fn a_lease_is_at_risk_before_it_expires_by_either_clock() {
        let ttl = LEASE_BASE;
        let fresh = Lease::new(wall_ms(), Instant::now(), ttl);
        assert!(!fresh.at_risk() && !fresh.due());
        // The wall clock stepped forward by a second more than the safety allows.
        let step = (ttl - LEASE_SAFETY + Duration::from_secs(1)).as_millis() as i64;
        let stepped = Lease::new(wall_ms() - step, Instant::now(), ttl);
        assert!(stepped.at_risk() && !stepped.due());
        // The poller stalled.
        let stalled = Lease {
            renewed: Instant::now() - (ttl - LEASE_SAFETY),
            ..fresh
        };
        assert!(stalled.at_risk() && stalled.due());
    }

    /// A writer connection on `path`, as the backend opens one.
    fn writer(path: &std::path::Path) -> rusqlite::Connection {
        let mut c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000;")
            .unwrap();
        super::super::schema::migrate(&mut c).unwrap_or_else(|_| panic!("migrate"));
        start_recording(&c).unwrap();
        c
    }

    /// The race a write run alone could lose: it decided on "nobody follows", then
    /// waited for the lock while a follower registered and fenced. Its commit comes too
    /// late and is refused, and it runs again in a transaction, which records.
    #[test]
    fn a_write_alone_that_got_the_lock_too_late_runs_again_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let mut c = writer(&path);
        // Nobody follows: a write looks, and records nothing.
        let at = crate::backend::sqlite::rows::micros(crate::model::now());
        let upsert = |c: &rusqlite::Connection, id: &str| {
            crate::backend::sqlite::sessions::upsert_session(c, id, "u", "{}", at)
        };
        let first = atomic(&mut c, |tx| upsert(tx, "first"));
        assert!(first.is_ok());
        assert_eq!(count(&path, "SELECT count(*) FROM changes"), 0);

        // A follower registers and holds the lock past the writer's answer, as its
        // fence would.
        let (registered, holding) = std::sync::mpsc::channel();
        let follower = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut f = rusqlite::Connection::open(path).unwrap();
                let tx = f
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .unwrap();
                tx.execute(
                    "INSERT INTO feed_followers (id, expires_at) VALUES ('f', ?1)",
                    [wall_ms() + 60_000],
                )
                .unwrap();
                registered.send(()).unwrap();
                std::thread::sleep(FRESH + Duration::from_millis(20));
                tx.commit().unwrap();
            })
        };
        holding.recv().unwrap();
        // The writer's answer is recent: it writes alone, and waits for the lock.
        RECORDING.set(Recording {
            looked: Some(Instant::now()),
            ..RECORDING.get()
        });
        let runs = Cell::new(0);
        let second = atomic(&mut c, |tx| {
            runs.set(runs.get() + 1);
            upsert(tx, "second")
        });
        follower.join().unwrap();
        assert!(second.is_ok());
        assert_eq!(runs.get(), 2, "run alone, refused, run again");
        assert_eq!(
            count(&path, "SELECT count(*) FROM changes WHERE id = 'second'"),
            1
        );
        assert_eq!(
            count(
                &path,
                "SELECT count(*) FROM sessions WHERE created_at = updated_at"
            ),
            2
        );

        // While the answer is recent and the lock free, a write alone commits alone.
        RECORDING.set(Recording {
            followed: false,
            looked: Some(Instant::now()),
            ..RECORDING.get()
        });
        let runs = Cell::new(0);
        let third = atomic(&mut c, |tx| {
            runs.set(runs.get() + 1);
            upsert(tx, "third")
        });
        assert!(third.is_ok());
        assert_eq!(runs.get(), 1);
        assert_eq!(
            count(&path, "SELECT count(*) FROM changes WHERE id = 'third'"),
            0
        );
    }
}
