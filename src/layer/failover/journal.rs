//! The replay queue kept durable: a SQLite file of the layer's own, leased so that one
//! process at a time replays it.
//!
//! Each row is one [`Hint`] in JSON, with its sequence number (the replay order), its
//! size, when it was written, when it was acknowledged (in the contract's microseconds,
//! which the replay compares with the primary's timestamps: see [`newer`](super::newer)),
//! its owner (the layer instance that wrote it) and a state:
//!
//! - `intent`: written before the fallback is called, not yet acknowledged. A row left
//!   in this state by another owner (a process that died, or a caller that gave up) is
//!   replayed without its counter increments, since nobody was told they happened and
//!   the fallback may or may not hold them.
//! - `acked`: the fallback stored it and the caller was told so. Replayed as written.
//! - `sending`: a replay sent it and has not seen the answer. Found at the start of a
//!   replay, the last replayer died or lost its lease mid-send, so the write may be on
//!   the primary: it is replayed without its counter increments (the rest is keyed or
//!   an upsert, so sending it again changes nothing).
//!
//! The lease is one row (owner, expiry) taken in the same `BEGIN IMMEDIATE` transaction
//! that marks the next entry `sending`, so two replayers never both mark an entry. The
//! replay's marks (see [`newer`](super::newer)) are rows too, written in the transaction
//! that removes the entry they come from, so a replay another process takes over knows
//! them; they are cleared when the journal is found empty.
//!
//! The file is written with `synchronous = FULL`, an fsync per transaction, so its calls
//! run on a thread of the journal's own rather than on the async runtime, which would
//! stall every task sharing that worker for the length of an fsync. The thread takes
//! the calls in the order they were made: writers make them while holding the layer's
//! queue lock, so the file sees the order the lock gives. A call whose caller gives up
//! still runs to the end on that thread, like a write a server received: an intent
//! whose caller dropped is in the file, and is replayed as an unknown outcome.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::newer::{now_us, prefix_end, Mark, Marks, Micros};
use super::replay::Hint;
use crate::error::{Result, StorageError};

/// A durable, leased replay queue.
pub(super) struct Journal {
    /// To the thread that owns the connection; it ends when this is dropped, after the
    /// calls already sent.
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
}

/// One call, run on the journal's thread with its connection and this instance's owner
/// id (rows it wrote and leases it holds carry it).
type Job = Box<dyn FnOnce(&mut Connection, &str) + Send>;

/// Entries waiting, and the age of the oldest.
pub(super) type Depth = (u64, Option<Duration>);

/// What a replay finds at the front of the journal.
pub(super) enum Next {
    /// Nothing waits; the lease is released.
    Empty,
    /// The entry to send next, marked `sending`. `unknown`: its counter increments were
    /// dropped, since an earlier attempt may have applied them. `acked`: when it was
    /// acknowledged. `marks`: the replay's marks of the records it writes.
    Entry {
        seq: i64,
        hint: Hint,
        unknown: bool,
        acked: Micros,
        marks: Marks,
    },
    /// Another process holds the lease, or is still writing the front entry.
    Busy(&'static str),
}

fn db(e: rusqlite::Error) -> StorageError {
    let transient = matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    );
    StorageError::Backend {
        message: format!("failover journal: {e}"),
        transient,
        source: Some(Box::new(e)),
    }
}

fn encode(hint: &Hint) -> Result<String> {
    serde_json::to_string(hint).map_err(|e| StorageError::Serialization {
        message: e.to_string(),
        source: Some(Box::new(e)),
    })
}

fn gone() -> StorageError {
    StorageError::Backend {
        message: "failover journal: its thread has stopped".into(),
        transient: false,
        source: None,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Journal {
    /// Opens (creates) the file and starts the journal's thread; also returns what the
    /// file holds, so a layer knows at once whether it starts degraded.
    pub(super) fn open(path: &Path) -> Result<(Journal, Depth)> {
        let mut conn = Connection::open(path).map_err(db)?;
        // FULL: a row must survive a power cut once the caller is told the write is
        // kept, not only a process crash.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS failover_journal (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 entry TEXT NOT NULL,
                 bytes INTEGER NOT NULL,
                 written_at INTEGER NOT NULL,
                 owner TEXT NOT NULL,
                 state TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS failover_journal_lease (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 owner TEXT NOT NULL,
                 expires_at INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS failover_journal_marks (
                 key TEXT PRIMARY KEY,
                 from_us INTEGER NOT NULL,
                 to_us INTEGER NOT NULL,
                 as_of INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )
        .map_err(db)?;
        add_acked_at(&mut conn)?;
        let depth = depth(&conn)?;
        let owner = uuid::Uuid::now_v7().to_string();
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("aiecs-failover-journal".into())
            .spawn(move || {
                for job in queue {
                    // A panicking call loses its answer (its caller sees `gone`), not
                    // the thread: a transaction it left open is rolled back on unwind.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn, &owner)));
                }
            })
            .map_err(|e| StorageError::Backend {
                message: format!("failover journal: could not start its thread: {e}"),
                transient: false,
                source: Some(Box::new(e)),
            })?;
        let journal = Journal {
            jobs,
            path: path.to_owned(),
        };
        Ok((journal, depth))
    }

    /// Where the file is.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `job` on the journal's thread. The job is handed over on the first poll, so
    /// calls reach the file in the order they are first awaited.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |conn, owner| {
                // Nobody waits when the caller gave up: the call is done all the same.
                let _ = answer.send(job(conn, owner));
            }))
            .map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }

    /// Records `hint` as an intent, or refuses with `Unavailable` past the bounds.
    /// Returns its sequence number and the journal's depth with it.
    pub(super) async fn push(
        &self,
        hint: &Hint,
        max_entries: usize,
        max_bytes: u64,
    ) -> Result<(i64, Depth)> {
        let entry = encode(hint)?;
        self.run(move |conn, owner| push(conn, owner, &entry, max_entries, max_bytes))
            .await
    }

    /// Marks an intent acknowledged: from now on its counters are owed to the primary.
    /// Fails if a replayer already took it as abandoned (its fallback write outlasted a
    /// lease): its counters were dropped, so the caller must not be told it succeeded.
    pub(super) async fn ack(&self, seq: i64) -> Result<()> {
        self.run(move |conn, _| ack(conn, seq)).await
    }

    /// Removes an entry: replayed, refused for good, or never stored by the fallback.
    /// Returns the depth left.
    pub(super) async fn remove(&self, seq: i64) -> Result<Depth> {
        self.complete(seq, Vec::new()).await
    }

    /// Removes a replayed entry and keeps the marks its send left, in one transaction.
    /// Returns the depth left.
    pub(super) async fn complete(&self, seq: i64, marks: Vec<(String, Mark)>) -> Result<Depth> {
        self.run(move |conn, _| {
            let tx = conn.transaction().map_err(db)?;
            tx.execute("DELETE FROM failover_journal WHERE seq = ?1", [seq])
                .map_err(db)?;
            for (key, m) in &marks {
                tx.execute(
                    "INSERT INTO failover_journal_marks (key, from_us, to_us, as_of)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (key) DO UPDATE SET
                         from_us = excluded.from_us, to_us = excluded.to_us, as_of = excluded.as_of",
                    params![key, m.from, m.to, m.as_of],
                )
                .map_err(db)?;
            }
            let depth = depth(&tx)?;
            tx.commit().map_err(db)?;
            Ok(depth)
        })
        .await
    }

    /// Puts back an entry whose send failed, as `hint` (which the caller may have
    /// settled), for the next replay.
    pub(super) async fn put_back(&self, seq: i64, hint: &Hint) -> Result<()> {
        let entry = encode(hint)?;
        self.run(move |conn, _| {
            conn.execute(
                "UPDATE failover_journal SET state = 'acked', entry = ?2 WHERE seq = ?1",
                params![seq, entry],
            )
            .map_err(db)
            .map(drop)
        })
        .await
    }

    /// Takes or renews the lease and marks the front entry `sending`. `lease` is how
    /// long the lease lasts without renewal, and how long another owner's unacknowledged
    /// entry is taken to be a write still in progress.
    pub(super) async fn next(&self, lease: Duration) -> Result<Next> {
        self.run(move |conn, owner| next(conn, owner, lease)).await
    }

    /// Entries waiting, and the age of the oldest. Read from the file: other processes
    /// sharing it add and replay entries.
    pub(super) async fn depth(&self) -> Result<Depth> {
        self.run(|conn, _| depth(conn)).await
    }
}

fn push(
    conn: &mut Connection,
    owner: &str,
    entry: &str,
    max_entries: usize,
    max_bytes: u64,
) -> Result<(i64, Depth)> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let (count, bytes): (i64, i64) = tx
        .query_row(
            "SELECT count(*), coalesce(sum(bytes), 0) FROM failover_journal",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db)?;
    if count as u64 >= max_entries as u64 {
        return Err(StorageError::Unavailable {
            message: format!("primary is down and {count} writes already wait for replay"),
        });
    }
    if bytes as u64 + entry.len() as u64 > max_bytes {
        return Err(StorageError::Unavailable {
            message: format!("primary is down and {bytes} bytes of writes already wait for replay"),
        });
    }
    tx.execute(
        "INSERT INTO failover_journal (entry, bytes, written_at, acked_at, owner, state)
         VALUES (?1, ?2, ?3, ?4, ?5, 'intent')",
        params![entry, entry.len() as i64, now_ms(), now_us(), owner],
    )
    .map_err(db)?;
    let seq = tx.last_insert_rowid();
    let depth = depth(&tx)?;
    tx.commit().map_err(db)?;
    Ok((seq, depth))
}

fn ack(conn: &mut Connection, seq: i64) -> Result<()> {
    let changed = conn
        .execute(
            "UPDATE failover_journal SET state = 'acked', written_at = ?2, acked_at = ?3
             WHERE seq = ?1 AND state = 'intent'",
            params![seq, now_ms(), now_us()],
        )
        .map_err(db)?;
    if changed == 0 {
        return Err(StorageError::Backend {
            message: "failover journal: the write outlasted the journal lease and was \
                      replayed without its counters; it is stored in the fallback"
                .into(),
            transient: true,
            source: None,
        });
    }
    Ok(())
}

fn next(conn: &mut Connection, me: &str, lease: Duration) -> Result<Next> {
    let now = now_ms();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let holder: Option<(String, i64)> = tx
        .query_row(
            "SELECT owner, expires_at FROM failover_journal_lease WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db)?;
    if matches!(&holder, Some((o, until)) if o != me && *until > now) {
        return Ok(Next::Busy("another process replays the failover journal"));
    }
    let front: Option<(i64, String, i64, Option<i64>, String, String)> = tx
        .query_row(
            "SELECT seq, entry, written_at, acked_at, owner, state FROM failover_journal
             ORDER BY seq LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .optional()
        .map_err(db)?;
    let Some((seq, entry, written_at, acked_at, owner, row_state)) = front else {
        tx.execute("DELETE FROM failover_journal_lease", [])
            .map_err(db)?;
        tx.execute("DELETE FROM failover_journal_marks", [])
            .map_err(db)?;
        tx.commit().map_err(db)?;
        return Ok(Next::Empty);
    };
    let lease_ms = lease.as_millis() as i64;
    tx.execute(
        "INSERT INTO failover_journal_lease (id, owner, expires_at) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET owner = ?1, expires_at = ?2",
        params![me, now + lease_ms],
    )
    .map_err(db)?;
    let foreign_intent = row_state == "intent" && owner != me;
    if foreign_intent && written_at + lease_ms > now {
        // Its writer may still be waiting for the fallback: replaying it now could
        // apply what that caller is about to be told failed.
        tx.commit().map_err(db)?;
        return Ok(Next::Busy(
            "another process is still writing the oldest entry",
        ));
    }
    // An entry this build cannot read (a newer version wrote it) stops the replay
    // rather than be skipped: the layer stays on the fallback, which holds it.
    let mut hint: Hint = serde_json::from_str(&entry).map_err(|e| StorageError::Serialization {
        message: format!("failover journal entry {seq}: {e}"),
        source: Some(Box::new(e)),
    })?;
    // This owner's own intents are seen here only when their caller gave up (the
    // replay holds the queue lock writers hold): replayed whole, as without a journal.
    let unknown = (row_state == "sending" || foreign_intent) && hint.drop_increments();
    tx.execute(
        "UPDATE failover_journal SET state = 'sending', entry = ?2 WHERE seq = ?1",
        params![seq, encode(&hint)?],
    )
    .map_err(db)?;
    let mut marks = Marks::new();
    {
        let mut select = tx
            .prepare_cached(
                "SELECT key, from_us, to_us, as_of FROM failover_journal_marks
                 WHERE key >= ?1 AND key < ?2",
            )
            .map_err(db)?;
        for prefix in hint.mark_prefixes() {
            let rows = select
                .query_map(params![prefix, prefix_end(&prefix)], |r| {
                    let mark = Mark {
                        from: r.get(1)?,
                        to: r.get(2)?,
                        as_of: r.get(3)?,
                    };
                    Ok((r.get::<_, String>(0)?, mark))
                })
                .map_err(db)?;
            for row in rows {
                let (key, mark) = row.map_err(db)?;
                marks.insert(key, mark);
            }
        }
    }
    tx.commit().map_err(db)?;
    // A row from before the column (its file written by an older build): its write time.
    let acked = acked_at.unwrap_or(written_at.saturating_mul(1000));
    Ok(Next::Entry {
        seq,
        hint,
        unknown,
        acked,
        marks,
    })
}

/// Adds the `acked_at` column to a file made before it existed.
fn add_acked_at(conn: &mut Connection) -> Result<()> {
    // Immediate: two processes opening one old file must not both add it.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let has: bool = tx
        .query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('failover_journal') WHERE name = 'acked_at'",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    if !has {
        tx.execute(
            "ALTER TABLE failover_journal ADD COLUMN acked_at INTEGER",
            [],
        )
        .map_err(db)?;
    }
    tx.commit().map_err(db)
}

fn depth(conn: &Connection) -> Result<Depth> {
    let (count, oldest): (i64, Option<i64>) = conn
        .query_row(
            "SELECT count(*), min(written_at) FROM failover_journal",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db)?;
    let age = oldest.map(|t| Duration::from_millis(now_ms().saturating_sub(t).max(0) as u64));
    Ok((count as u64, age))
}
