//! Conversation histories in memory.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::error::{Result, StorageError};
use crate::model::{Message, NewMessage};
use crate::storage::ConversationStorage;
use crate::validate;

#[async_trait]
impl ConversationStorage for MemoryBackend {
    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        self.check_open()?;
        validate::restored_messages(session_id, messages)?;
        let mut entry = self
            .sessions
            .get_mut(session_id)
            .ok_or_else(|| StorageError::not_found("session", session_id))?;
        let mut stored = 0;
        for m in messages {
            if entry.message_ids.insert(m.message_id.clone()) {
                entry.messages.push(m.clone());
                stored += 1;
            }
        }
        Ok(stored)
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        Ok(self
            .sessions
            .get(session_id)
            .map(|e| {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(e.messages.len());
                let end = start.saturating_add(limit).min(e.messages.len());
                e.messages[start..end].to_vec()
            })
            .unwrap_or_default())
    }

    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        self.check_open()?;
        self.append(session_id, message)
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        self.check_open()?;
        validate::batch("messages", messages.len())?;
        Ok(messages
            .iter()
            .map(|(session_id, message)| self.append(session_id, message))
            .collect())
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        Ok(self
            .sessions
            .get(session_id)
            .map(|e| {
                let start = e.messages.len().saturating_sub(limit);
                e.messages[start..].to_vec()
            })
            .unwrap_or_default())
    }
}
