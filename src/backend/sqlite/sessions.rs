//! Sessions on SQLite: one row each, counters added in SQL, a cleanup index kept
//! apart from `updated_at`.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::error::{Failure, Sql};
use super::feed::{atomic, record, Touched};
use super::rows::{decode, micros, session_from_row};
use super::schema::SESSION_COLUMNS;
use super::SqliteBackend;
use crate::error::{Result, StorageError};
use crate::model::{now, Metadata, NewSession, Session, SessionPage, SessionQuery, SessionUpdate};
use crate::storage::SessionStorage;
use crate::validate;

pub(super) fn upsert_session(
    conn: &rusqlite::Connection,
    session_id: &str,
    user_id: &str,
    metadata: &str,
    at: i64,
) -> Sql<Session> {
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO sessions (session_id, user_id, created_at, updated_at, indexed_at, \
         status, metadata) VALUES (?1, ?2, ?3, ?3, ?3, 'active', ?4) \
         ON CONFLICT (session_id) DO UPDATE SET user_id = excluded.user_id, \
         metadata = excluded.metadata, updated_at = excluded.updated_at \
         RETURNING {SESSION_COLUMNS}"
    ))?;
    let mut rows = stmt.query(params![session_id, user_id, at, metadata])?;
    let session = match rows.next()? {
        Some(row) => session_from_row(row)?,
        None => {
            return Err(Failure::Storage(StorageError::Backend {
                message: "sqlite upsert returned no row".into(),
                transient: false,
                source: None,
            }))
        }
    };
    // Outside a transaction, the statement commits when it finishes: finished here, a
    // failed commit is an error, where dropping the rows would reset it and lose one.
    while rows.next()?.is_some() {}
    drop(rows);
    drop(stmt);
    // A new row already has indexed_at = at; an upserted one may need it moved.
    if session.created_at.timestamp_micros() != at {
        touch_index(conn, session_id, at)?;
    }
    record(conn, Touched::Session, session_id)?;
    Ok(session)
}

/// Moves the session's `indexed_at` (the cleanup index's column) to `at` when it
/// trails by the granularity or leads; most touches match no row here and write
/// nothing. A separate statement because SQLite rewrites the index entry of any column
/// an UPDATE sets, even to its own value. Run after every change of `updated_at`.
pub(super) fn touch_index(conn: &rusqlite::Connection, session_id: &str, at: i64) -> Sql<()> {
    conn.prepare_cached(
        "UPDATE sessions SET indexed_at = ?2 WHERE session_id = ?1 \
         AND (indexed_at > ?2 OR indexed_at <= ?2 - ?3)",
    )?
    .execute(params![
        session_id,
        at,
        crate::backend::IDLE_INDEX_GRANULARITY_SECS * 1_000_000
    ])?;
    Ok(())
}

#[async_trait]
impl SessionStorage for SqliteBackend {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        validate::create_session(session_id, user_id, metadata)?;
        let (id, user, meta) = (
            session_id.to_owned(),
            user_id.to_owned(),
            serde_json::to_string(metadata)?,
        );
        // Recorded, the change must commit with the session, or another process's cache
        // could keep what it read before for good (see `atomic`). The time is read once,
        // should `atomic` run the write twice.
        self.write(move |c| {
            let at = micros(now());
            atomic(c, |tx| upsert_session(tx, &id, &user, &meta, at))
        })
        .await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        validate::id("session_id", session_id)?;
        let id = session_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?1"
            ))?;
            let mut rows = stmt.query([&id])?;
            rows.next()?.map(session_from_row).transpose()
        })
        .await
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        validate::session_update(session_id, update)?;
        let id = session_id.to_owned();
        let update = update.clone();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let at = micros(now());
            // Counters are added in SQL; only merged metadata is computed here, under the
            // write lock this transaction holds, so no concurrent update is lost.
            let metadata = if update.metadata.is_empty() {
                None
            } else {
                let stored: Option<String> = tx
                    .prepare_cached("SELECT metadata FROM sessions WHERE session_id = ?1")?
                    .query_row([&id], |r| r.get(0))
                    .optional()?;
                let Some(stored) = stored else {
                    return Ok(false);
                };
                let mut merged: Metadata = decode("session metadata", &stored)?;
                merged.extend(update.metadata);
                Some(serde_json::to_string(&merged)?)
            };
            // Counters saturate (see `SessionUpdate`): SQLite would turn an overflowing
            // integer sum into a REAL. Validation keeps each add within i64, so
            // `MAX - ?n` cannot overflow; an overflowing float sum is Inf, which MIN clamps.
            let changed = tx
                .prepare_cached(
                    "UPDATE sessions SET request_count = CASE \
                     WHEN request_count > 9223372036854775807 - ?2 THEN 9223372036854775807 \
                     ELSE request_count + ?2 END, \
                     total_processing_time = MIN(total_processing_time + ?3, ?8), \
                     error_count = CASE \
                     WHEN error_count > 9223372036854775807 - ?4 THEN 9223372036854775807 \
                     ELSE error_count + ?4 END, \
                     status = COALESCE(?5, status), \
                     metadata = COALESCE(?6, metadata), updated_at = ?7 \
                     WHERE session_id = ?1",
                )?
                .execute(params![
                    id,
                    update.add_requests as i64,
                    update.add_processing_time,
                    update.add_errors as i64,
                    update.status,
                    metadata,
                    at,
                    f64::MAX,
                ])?;
            if changed > 0 {
                touch_index(&tx, &id, at)?;
                record(&tx, Touched::Session, &id)?;
            }
            tx.commit()?;
            Ok(changed > 0)
        })
        .await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        validate::status(status)?;
        let (id, status) = (session_id.to_owned(), status.to_owned());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let at = micros(now());
            let changed = tx
                .prepare_cached(
                    "UPDATE sessions SET status = ?2, updated_at = ?3 WHERE session_id = ?1",
                )?
                .execute(params![id, status, at])?;
            if changed > 0 {
                touch_index(&tx, &id, at)?;
                record(&tx, Touched::Session, &id)?;
            }
            tx.commit()?;
            Ok(changed > 0)
        })
        .await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        validate::new_sessions(sessions)?;
        let rows = sessions
            .iter()
            .map(|s| {
                Ok((
                    s.session_id.clone(),
                    s.user_id.clone(),
                    serde_json::to_string(&s.metadata)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let at = micros(now());
            let out = rows
                .iter()
                .map(|(id, user, meta)| upsert_session(&tx, id, user, meta, at))
                .collect::<Sql<Vec<_>>>()?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        validate::session_ids(session_ids)?;
        let ids = session_ids.to_vec();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?1"
            ))?;
            ids.iter()
                .map(|id| {
                    let mut rows = stmt.query([id])?;
                    rows.next()?.map(session_from_row).transpose()
                })
                .collect()
        })
        .await
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        let id = session_id.to_owned();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if tx.execute("DELETE FROM task_contexts WHERE session_id = ?1", [&id])? > 0 {
                record(&tx, Touched::TaskContext, &id)?;
            }
            // Messages go with their session through ON DELETE CASCADE.
            let removed = tx.execute("DELETE FROM sessions WHERE session_id = ?1", [&id])?;
            if removed > 0 {
                record(&tx, Touched::Session, &id)?;
            }
            tx.commit()?;
            Ok(removed > 0)
        })
        .await
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        validate::restored_sessions(sessions)?;
        let rows = sessions
            .iter()
            .map(|s| Ok((s.clone(), serde_json::to_string(&s.metadata)?)))
            .collect::<Result<Vec<_>>>()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO sessions (session_id, user_id, created_at, updated_at, status, \
                     metadata, request_count, total_processing_time, error_count, indexed_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?4) \
                     ON CONFLICT (session_id) DO UPDATE SET user_id = excluded.user_id, \
                     created_at = excluded.created_at, updated_at = excluded.updated_at, \
                     indexed_at = excluded.updated_at, \
                     status = excluded.status, metadata = excluded.metadata, \
                     request_count = excluded.request_count, \
                     total_processing_time = excluded.total_processing_time, \
                     error_count = excluded.error_count",
                )?;
                for (s, metadata) in &rows {
                    stmt.execute(params![
                        s.session_id,
                        s.user_id,
                        micros(s.created_at),
                        micros(s.updated_at),
                        s.status,
                        metadata,
                        s.metrics.request_count as i64,
                        s.metrics.total_processing_time,
                        s.metrics.error_count as i64,
                    ])?;
                    record(&tx, Touched::Session, &s.session_id)?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        validate::session_query(query)?;
        let q = query.clone();
        self.read(move |c| {
            // Only the filters in use go into the SQL, so the cursor is an index range
            // (`session_id > ?`) and paging through every session stays linear.
            let mut sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE 1 = 1");
            let mut args: Vec<&dyn rusqlite::ToSql> = Vec::new();
            for (column, op, value) in [
                ("session_id", ">", &q.after),
                ("user_id", "=", &q.user_id),
                ("status", "=", &q.status),
            ] {
                if let Some(v) = value {
                    args.push(v);
                    sql.push_str(&format!(" AND {column} {op} ?{}", args.len()));
                }
            }
            let limit = q.limit as i64 + 1;
            args.push(&limit);
            sql.push_str(&format!(" ORDER BY session_id LIMIT ?{}", args.len()));
            let mut stmt = c.prepare_cached(&sql)?;
            let mut rows = stmt.query(args.as_slice())?;
            let mut sessions = Vec::new();
            while let Some(row) = rows.next()? {
                sessions.push(session_from_row(row)?);
            }
            let more = sessions.len() > q.limit;
            sessions.truncate(q.limit);
            let next_cursor = more
                .then(|| sessions.last().map(|s| s.session_id.clone()))
                .flatten();
            Ok(SessionPage {
                sessions,
                next_cursor,
            })
        })
        .await
    }
}
