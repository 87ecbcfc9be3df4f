//! The replay queue kept durable: a SQLite file of the layer's own, leased so that one
//! process at a time replays it.
//!
//! Each row is one [`Hint`] in JSON, with its sequence number (the replay order), its
//! size, when it was written, its owner (the layer instance that wrote it) and a state:
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
//! that marks the next entry `sending`, so two replayers never both mark an entry.
//!
//! The calls are synchronous: each is a short local transaction, made while the
//! layer's async queue lock is held, and never held across an await.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::breaker::FailoverState;
use super::replay::Hint;
use crate::error::{Result, StorageError};

/// A durable, leased replay queue.
pub(super) struct Journal {
    conn: Mutex<Connection>,
    /// This layer instance: rows it wrote and leases it holds carry it.
    owner: String,
}

/// What a replay finds at the front of the journal.
pub(super) enum Next {
    /// Nothing waits; the lease is released.
    Empty,
    /// The entry to send next, marked `sending`.
    Entry { seq: i64, hint: Hint },
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Journal {
    pub(super) fn open(path: &Path) -> Result<Journal> {
        let conn = Connection::open(path).map_err(db)?;
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
             );",
        )
        .map_err(db)?;
        Ok(Journal {
            conn: Mutex::new(conn),
            owner: uuid::Uuid::now_v7().to_string(),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `hint` as an intent, or refuses with `Unavailable` past the bounds.
    pub(super) fn push(&self, hint: &Hint, max_entries: usize, max_bytes: u64) -> Result<i64> {
        let entry = serde_json::to_string(hint).map_err(|e| StorageError::Serialization {
            message: e.to_string(),
            source: Some(Box::new(e)),
        })?;
        let mut conn = self.conn();
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
                message: format!(
                    "primary is down and {bytes} bytes of writes already wait for replay"
                ),
            });
        }
        tx.execute(
            "INSERT INTO failover_journal (entry, bytes, written_at, owner, state)
             VALUES (?1, ?2, ?3, ?4, 'intent')",
            params![entry, entry.len() as i64, now_ms(), self.owner],
        )
        .map_err(db)?;
        let seq = tx.last_insert_rowid();
        tx.commit().map_err(db)?;
        Ok(seq)
    }

    /// Marks an intent acknowledged: from now on its counters are owed to the primary.
    /// Fails if a replayer already took it as abandoned (its fallback write outlasted a
    /// lease): its counters were dropped, so the caller must not be told it succeeded.
    pub(super) fn ack(&self, seq: i64) -> Result<()> {
        let changed = self
            .conn()
            .execute(
                "UPDATE failover_journal SET state = 'acked', written_at = ?2
                 WHERE seq = ?1 AND state = 'intent'",
                params![seq, now_ms()],
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

    /// Removes an entry: replayed, refused for good, or never stored by the fallback.
    pub(super) fn remove(&self, seq: i64) -> Result<()> {
        self.conn()
            .execute("DELETE FROM failover_journal WHERE seq = ?1", [seq])
            .map_err(db)
            .map(drop)
    }

    /// Puts back an entry whose send failed, as `hint` (which the caller may have
    /// settled), for the next replay.
    pub(super) fn put_back(&self, seq: i64, hint: &Hint) -> Result<()> {
        let entry = serde_json::to_string(hint).map_err(|e| StorageError::Serialization {
            message: e.to_string(),
            source: Some(Box::new(e)),
        })?;
        self.conn()
            .execute(
                "UPDATE failover_journal SET state = 'acked', entry = ?2 WHERE seq = ?1",
                params![seq, entry],
            )
            .map_err(db)
            .map(drop)
    }

    /// Takes or renews the lease and marks the front entry `sending`. `lease` is how
    /// long the lease lasts without renewal, and how long another owner's unacknowledged
    /// entry is taken to be a write still in progress.
    pub(super) fn next(&self, state: &FailoverState, lease: Duration) -> Result<Next> {
        let now = now_ms();
        let mut conn = self.conn();
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
        if matches!(&holder, Some((o, until)) if *o != self.owner && *until > now) {
            return Ok(Next::Busy("another process replays the failover journal"));
        }
        let front: Option<(i64, String, i64, String, String)> = tx
            .query_row(
                "SELECT seq, entry, written_at, owner, state FROM failover_journal
                 ORDER BY seq LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(db)?;
        let Some((seq, entry, written_at, owner, row_state)) = front else {
            tx.execute("DELETE FROM failover_journal_lease", [])
                .map_err(db)?;
            tx.commit().map_err(db)?;
            return Ok(Next::Empty);
        };
        let lease_ms = lease.as_millis() as i64;
        tx.execute(
            "INSERT INTO failover_journal_lease (id, owner, expires_at) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET owner = ?1, expires_at = ?2",
            params![self.owner, now + lease_ms],
        )
        .map_err(db)?;
        let foreign_intent = row_state == "intent" && owner != self.owner;
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
        let mut hint: Hint =
            serde_json::from_str(&entry).map_err(|e| StorageError::Serialization {
                message: format!("failover journal entry {seq}: {e}"),
                source: Some(Box::new(e)),
            })?;
        // This owner's own intents are seen here only when their caller gave up (the
        // replay holds the queue lock writers hold): replayed whole, as without a journal.
        if row_state == "sending" || foreign_intent {
            hint.settle_unknown(state);
        }
        let entry = serde_json::to_string(&hint).map_err(|e| StorageError::Serialization {
            message: e.to_string(),
            source: Some(Box::new(e)),
        })?;
        tx.execute(
            "UPDATE failover_journal SET state = 'sending', entry = ?2 WHERE seq = ?1",
            params![seq, entry],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Next::Entry { seq, hint })
    }

    /// Entries waiting, and the age of the oldest.
    pub(super) fn depth(&self) -> Result<(u64, Option<Duration>)> {
        let (count, oldest): (i64, Option<i64>) = self
            .conn()
            .query_row(
                "SELECT count(*), min(written_at) FROM failover_journal",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(db)?;
        let age = oldest.map(|t| Duration::from_millis(now_ms().saturating_sub(t).max(0) as u64));
        Ok((count as u64, age))
    }
}
