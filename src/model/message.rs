//! Conversation messages: as stored, and as added.

use super::Metadata;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A conversation message as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Unique within its session; a retried add with the same id is not stored twice.
    pub message_id: String,
    /// Who spoke: `user`, `assistant`, `system`, `tool`, ...
    pub role: String,
    /// The text.
    pub content: String,
    /// When it was stored.
    #[serde(deserialize_with = "crate::model::utc_time::deserialize")]
    pub timestamp: DateTime<Utc>,
    /// Free-form metadata.
    pub metadata: Metadata,
}

/// A message to add with
/// [`ConversationStorage::add_conversation_message`](crate::ConversationStorage::add_conversation_message).
///
/// Give it an id with [`NewMessage::with_id`] when the add may be retried: the id makes
/// the add idempotent. Without one, the backend generates a time-ordered UUID (v7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewMessage {
    /// The caller's id for the message, if any.
    #[serde(default)]
    pub message_id: Option<String>,
    /// Who spoke.
    pub role: String,
    /// The text.
    pub content: String,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: Metadata,
}

impl NewMessage {
    /// A message with no id and empty metadata.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        NewMessage {
            message_id: None,
            role: role.into(),
            content: content.into(),
            metadata: Metadata::new(),
        }
    }

    /// Sets the message id, making the add idempotent.
    pub fn with_id(mut self, message_id: impl Into<String>) -> Self {
        self.message_id = Some(message_id.into());
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// This message with an id fixed: itself when it has one, else a copy with a new UUID
    /// v7. Layers that may send a message more than once (retry, failover, batching) fix
    /// the id first, so every copy is stored once.
    pub fn with_fixed_id(&self) -> std::borrow::Cow<'_, NewMessage> {
        match self.message_id {
            Some(_) => std::borrow::Cow::Borrowed(self),
            None => std::borrow::Cow::Owned(self.clone().with_id(self.id_or_generate())),
        }
    }

    /// The id to store: the caller's, or a new UUID v7.
    pub fn id_or_generate(&self) -> String {
        match &self.message_id {
            Some(id) => id.clone(),
            None => uuid::Uuid::now_v7().to_string(),
        }
    }
}
