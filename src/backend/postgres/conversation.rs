//! Conversation histories on PostgreSQL.

use async_trait::async_trait;
use serde_json::Value;
use tokio_postgres::types::Json;

use super::rows::{get, message_from_row};
use super::PostgresBackend;
use crate::error::{Result, StorageError};
use crate::model::{now, Message, Metadata, NewMessage};
use crate::storage::ConversationStorage;
use crate::validate;

#[async_trait]
impl ConversationStorage for PostgresBackend {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        validate::new_message(session_id, message)?;
        let message_id = message.id_or_generate();
        let c = self.conn().await?;
        let row = c
            .query_one(
                &c.sql.add_message,
                &[
                    &session_id,
                    &message_id,
                    &message.role,
                    &message.content,
                    &Json(&message.metadata),
                    &now(),
                ],
            )
            .await?;
        if get::<i64>(&row, 0)? == 0 {
            return Err(StorageError::not_found("session", session_id));
        }
        Ok(message_id)
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        validate::batch("messages", messages.len())?;
        // Bad items are answered here and left out; the rest go in one statement.
        let mut out: Vec<Result<String>> = Vec::with_capacity(messages.len());
        let mut valid = Vec::with_capacity(messages.len());
        for (i, (session_id, message)) in messages.iter().enumerate() {
            match validate::new_message(session_id, message) {
                Ok(()) => {
                    let id = message.id_or_generate();
                    out.push(Ok(id));
                    valid.push(i);
                }
                Err(e) => out.push(Err(e)),
            }
        }
        if valid.is_empty() {
            self.state().await?;
            return Ok(out);
        }
        let ids: Vec<&str> = valid.iter().map(|&i| messages[i].0.as_str()).collect();
        let message_ids: Vec<&str> = valid
            .iter()
            .map(|&i| out[i].as_deref().unwrap_or_default())
            .collect();
        let roles: Vec<&str> = valid.iter().map(|&i| messages[i].1.role.as_str()).collect();
        let contents: Vec<&str> = valid
            .iter()
            .map(|&i| messages[i].1.content.as_str())
            .collect();
        let metadata: Vec<Json<&Metadata>> = valid
            .iter()
            .map(|&i| Json(&messages[i].1.metadata))
            .collect();
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.batch_add_messages,
                &[&ids, &message_ids, &roles, &contents, &metadata, &now()],
            )
            .await?;
        let found = rows
            .iter()
            .map(|r| get::<String>(r, 0))
            .collect::<Result<std::collections::HashSet<_>>>()?;
        for &i in &valid {
            let session_id = &messages[i].0;
            if !found.contains(session_id) {
                out[i] = Err(StorageError::not_found("session", session_id.clone()));
            }
        }
        Ok(out)
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let c = self.conn().await?;
        let rows = c
            .query(&c.sql.history, &[&session_id, &(limit as i64)])
            .await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        validate::restored_messages(session_id, messages)?;
        let c = self.conn().await?;
        if c.query_opt(&c.sql.session_exists, &[&session_id])
            .await?
            .is_none()
        {
            return Err(StorageError::not_found("session", session_id));
        }
        if messages.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        let times: Vec<_> = messages.iter().map(|m| m.timestamp).collect();
        let metadata: Vec<Value> = messages
            .iter()
            .map(|m| Value::Object(m.metadata.clone()))
            .collect();
        c.execute(
            &c.sql.restore_messages,
            &[&session_id, &ids, &roles, &contents, &times, &metadata],
        )
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
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.history_range,
                &[&session_id, &(limit as i64), &offset],
            )
            .await?;
        rows.iter().map(message_from_row).collect()
    }
}
