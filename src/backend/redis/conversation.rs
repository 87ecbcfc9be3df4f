//! Conversation histories on Redis.

use async_trait::async_trait;

use super::connection::evalsha;
use super::decode::{decode_message, from_value, StoredMessage};
use super::RedisBackend;
use crate::error::{Result, StorageError};
use crate::model::{now, Message, NewMessage};
use crate::storage::ConversationStorage;
use crate::validate;

use super::scripts::{self};

#[async_trait]
impl ConversationStorage for RedisBackend {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        validate::new_message(session_id, message)?;
        let at = now();
        let (message_id, cmd) = self.add_message_cmd(session_id, message, at)?;
        if self
            .touch_session(session_id, &cmd, at.timestamp_micros(), false)
            .await?
        {
            Ok(message_id)
        } else {
            Err(StorageError::not_found("session", session_id))
        }
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        validate::batch("messages", messages.len())?;
        let at = now();
        let mut out: Vec<Result<String>> = Vec::with_capacity(messages.len());
        let mut cmds = Vec::new();
        let mut sent = Vec::new();
        for (i, (session_id, message)) in messages.iter().enumerate() {
            let prepared = validate::new_message(session_id, message)
                .and_then(|_| self.add_message_cmd(session_id, message, at));
            match prepared {
                Ok((id, cmd)) => {
                    out.push(Ok(id));
                    cmds.push(cmd);
                    sent.push(i);
                }
                Err(e) => out.push(Err(e)),
            }
        }
        // A node runs a pipeline in order, so appends to one session keep their order; a
        // cluster sends each session's appends to its one master over one connection.
        let replies = self.many_each(&cmds).await?;
        let (mut reindexed, mut reindex) = (Vec::new(), Vec::new());
        for (i, reply) in sent.into_iter().zip(replies) {
            let session_id = &messages[i].0;
            match reply.and_then(from_value::<i64>) {
                Ok(-1) => out[i] = Err(StorageError::not_found("session", session_id)),
                Ok(1) => {
                    reindexed.push(i);
                    reindex.push(self.index_cmd(session_id, at.timestamp_micros()));
                }
                Ok(_) => {}
                Err(e) => out[i] = Err(e),
            }
        }
        // As in the single add, a failed index refresh fails its add (which is stored;
        // a retry with the same id stores nothing twice).
        for (i, reply) in reindexed.into_iter().zip(self.many_each(&reindex).await?) {
            if let Err(e) = reply {
                out[i] = Err(e);
            }
        }
        Ok(out)
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        validate::restored_messages(session_id, messages)?;
        let keys = self.session_keys(session_id);
        let mut c = evalsha(&scripts::RESTORE_MESSAGES, &keys.all());
        c.arg(Self::ttl_ms(self.session_ttl));
        for m in messages {
            let stored = StoredMessage {
                message_id: &m.message_id,
                role: &m.role,
                content: &m.content,
                timestamp: m.timestamp,
                metadata: &m.metadata,
            };
            c.arg(&m.message_id).arg(serde_json::to_string(&stored)?);
        }
        match self.run::<i64>(&c).await? {
            -1 => Err(StorageError::not_found("session", session_id)),
            n => Ok(n as u64),
        }
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let start = i64::try_from(offset).unwrap_or(i64::MAX);
        let mut c = redis::cmd("LRANGE");
        c.arg(self.session_keys(session_id).messages)
            .arg(start)
            .arg(start.saturating_add(limit as i64 - 1));
        let raw: Vec<String> = self.run(&c).await?;
        raw.iter().map(|m| decode_message(m)).collect()
    }

    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        validate::id("session_id", session_id)?;
        validate::limit("limit", limit)?;
        let mut c = redis::cmd("LRANGE");
        c.arg(self.session_keys(session_id).messages)
            .arg(-(limit as i64))
            .arg(-1);
        let raw: Vec<String> = self.run(&c).await?;
        raw.iter().map(|m| decode_message(m)).collect()
    }
}
