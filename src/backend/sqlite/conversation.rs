//! Conversation histories on SQLite: one row per message, ordered by an offset.

use async_trait::async_trait;
use rusqlite::{params, TransactionBehavior};

use super::error::{Failure, Sql};
use super::feed::{record, Touched};
use super::rows::{decode, micros, timestamp};
use super::sessions::touch_index;
use super::SqliteBackend;
use crate::error::{Result, StorageError};
use crate::model::{now, Message, NewMessage};
use crate::storage::ConversationStorage;
use crate::validate;

/// Appends one message inside the caller's transaction; `NotFound` leaves nothing
/// written.
pub(super) fn append_message(
    conn: &rusqlite::Connection,
    session_id: &str,
    message: &NewMessage,
    at: i64,
) -> Sql<String> {
    let touched = conn
        .prepare_cached("UPDATE sessions SET updated_at = ?2 WHERE session_id = ?1")?
        .execute(params![session_id, at])?;
    if touched == 0 {
        return Err(StorageError::not_found("session", session_id).into());
    }
    touch_index(conn, session_id, at)?;
    let message_id = message.id_or_generate();
    conn.prepare_cached(
        "INSERT INTO messages (session_id, message_id, role, content, timestamp, metadata) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (session_id, message_id) DO NOTHING",
    )?
    .execute(params![
        session_id,
        message_id,
        message.role,
        message.content,
        at,
        serde_json::to_string(&message.metadata)?
    ])?;
    Ok(message_id)
}

/// Runs a message query whose columns are message_id, role, content, timestamp, metadata.
pub(super) fn messages(
    conn: &rusqlite::Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Sql<Vec<Message>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(args)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(Message {
            message_id: row.get(0)?,
            role: row.get(1)?,
            content: row.get(2)?,
            timestamp: timestamp(row.get(3)?)?,
            metadata: decode("message metadata", &row.get::<_, String>(4)?)?,
        });
    }
    Ok(out)
}

#[async_trait]
impl ConversationStorage for SqliteBackend {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        validate::new_message(session_id, message)?;
        let (id, message) = (session_id.to_owned(), message.clone());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let message_id = append_message(&tx, &id, &message, micros(now()))?;
            record(&tx, Touched::Session, &id)?;
            tx.commit()?;
            Ok(message_id)
        })
        .await
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        validate::batch("messages", messages.len())?;
        // Checked here and only valid items copied: a rejected one (metadata 10 000 levels
        // deep) dropped on the connection thread could overflow that thread's stack.
        let items: Vec<Result<(String, NewMessage)>> = messages
            .iter()
            .map(|(s, m)| validate::new_message(s, m).map(|()| (s.clone(), m.clone())))
            .collect();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let at = micros(now());
            let mut out = Vec::with_capacity(items.len());
            // A batch often appends several messages to one session: one change each.
            let mut touched = std::collections::HashSet::new();
            for item in items {
                let (session_id, message) = match item {
                    Ok(valid) => valid,
                    Err(e) => {
                        out.push(Err(e));
                        continue;
                    }
                };
                out.push(match append_message(&tx, &session_id, &message, at) {
                    Ok(id) => {
                        if touched.insert(session_id.clone()) {
                            record(&tx, Touched::Session, &session_id)?;
                        }
                        Ok(id)
                    }
                    Err(Failure::Storage(e)) => Err(e),
                    Err(sql) => return Err(sql),
                });
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let id = session_id.to_owned();
        self.read(move |c| {
            messages(
                c,
                "SELECT message_id, role, content, timestamp, metadata FROM \
                 (SELECT * FROM messages WHERE session_id = ?1 ORDER BY seq DESC LIMIT ?2) \
                 ORDER BY seq",
                params![id, limit as i64],
            )
        })
        .await
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        validate::restored_messages(session_id, messages)?;
        let id = session_id.to_owned();
        let rows = messages
            .iter()
            .map(|m| Ok((m.clone(), serde_json::to_string(&m.metadata)?)))
            .collect::<Result<Vec<_>>>()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let exists = tx
                .prepare_cached("SELECT 1 FROM sessions WHERE session_id = ?1")?
                .exists([&id])?;
            if !exists {
                return Err(StorageError::not_found("session", id).into());
            }
            let mut stored = 0u64;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO messages (session_id, message_id, role, content, timestamp, \
                     metadata) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (session_id, message_id) DO NOTHING",
                )?;
                for (m, metadata) in &rows {
                    stored += stmt.execute(params![
                        id,
                        m.message_id,
                        m.role,
                        m.content,
                        micros(m.timestamp),
                        metadata
                    ])? as u64;
                }
            }
            if stored > 0 {
                record(&tx, Touched::Session, &id)?;
            }
            tx.commit()?;
            Ok(stored)
        })
        .await
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let id = session_id.to_owned();
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        self.read(move |c| {
            messages(
                c,
                "SELECT message_id, role, content, timestamp, metadata FROM messages \
                 WHERE session_id = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3",
                params![id, limit as i64, offset],
            )
        })
        .await
    }
}
