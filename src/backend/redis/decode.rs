//! Reading replies into the model's types, and the JSON forms records are stored in.

use chrono::{DateTime, Utc};
use redis::{Cmd, FromRedisValue, Value as RedisValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::RedisBackend;
use crate::error::{Result, StorageError};
use crate::model::{Checkpoint, Message, Metadata, Session, SessionMetrics};

use super::keys::ThreadKeys;

impl RedisBackend {
    /// The session a `HGETALL` reply holds; `None` when the hash is absent.
    pub(super) fn session_from_hash(
        &self,
        session_id: &str,
        reply: &RedisValue,
    ) -> Result<Option<Session>> {
        let hash = hash_fields(reply)?;
        if hash.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| {
            hash.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| StorageError::Serialization {
                    message: format!("stored session `{session_id}` lacks field `{name}`"),
                    source: None,
                })
        };
        let number = |name: &str| -> Result<u64> {
            field(name)?.parse().map_err(|e| {
                StorageError::serialization(
                    format!("stored session field `{name}` is not a count"),
                    e,
                )
            })
        };
        let time = |name: &str| -> Result<DateTime<Utc>> {
            let text = field(name)?;
            text.parse::<i64>()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
                .ok_or_else(|| StorageError::Serialization {
                    message: format!("stored session field `{name}` is not a timestamp"),
                    source: None,
                })
        };
        let mut metadata = Metadata::new();
        for (k, v) in &hash {
            if let Some(key) = k.strip_prefix("m:") {
                metadata.insert(
                    key.to_owned(),
                    serde_json::from_str(v).map_err(|e| {
                        StorageError::serialization("stored session metadata is not JSON", e)
                    })?,
                );
            }
        }
        Ok(Some(Session {
            session_id: session_id.to_owned(),
            user_id: field("user_id")?.to_owned(),
            created_at: time("created_at")?,
            updated_at: time("updated_at")?,
            status: field("status")?.to_owned(),
            metadata,
            metrics: SessionMetrics {
                request_count: number("request_count")?,
                total_processing_time: field("total_processing_time")?.parse().map_err(|e| {
                    StorageError::serialization(
                        "stored session field `total_processing_time` is not a number",
                        e,
                    )
                })?,
                error_count: number("error_count")?,
            },
        }))
    }

    /// The stored record and created_at of each id, in order, with one HMGET; ids with
    /// no record (deleted meanwhile, or never stored) are left out.
    pub(super) async fn checkpoint_records(
        &self,
        keys: &ThreadKeys,
        ids: Vec<String>,
    ) -> Result<Vec<(String, String, String)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Sized up front and fields written through one buffer: a page of ten is 21
        // arguments, and growing the command for each cost more than the reply's decode.
        let key = keys.checkpoints();
        let bytes = key.len() + ids.iter().map(|id| 2 * (id.len() + 2)).sum::<usize>() + 5;
        let mut c = Cmd::with_capacity(2 + 2 * ids.len(), bytes);
        c.arg("HMGET").arg(key);
        let mut field = String::new();
        for id in &ids {
            for tag in ["r:", "c:"] {
                field.clear();
                field.push_str(tag);
                field.push_str(id);
                c.arg(field.as_str());
            }
        }
        let fields: Vec<Option<String>> = self.run(&c).await?;
        let mut fields = fields.into_iter();
        Ok(ids
            .into_iter()
            .filter_map(|id| match (fields.next(), fields.next()) {
                // A record without its created_at is corrupt: checkpoint_from_parts says so.
                (Some(Some(record)), created) => {
                    Some((id, record, created.flatten().unwrap_or_default()))
                }
                _ => None,
            })
            .collect())
    }

    pub(super) fn checkpoint_from_parts(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        id: String,
        record: &str,
        created: &str,
    ) -> Result<Checkpoint> {
        let record: CheckpointRecord = serde_json::from_str(record)
            .map_err(|e| StorageError::serialization("stored checkpoint is not valid JSON", e))?;
        let created_at = created
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(|| StorageError::Serialization {
                message: format!("stored checkpoint `{id}` has no valid created_at"),
                source: None,
            })?;
        Ok(Checkpoint {
            thread_id: thread_id.to_owned(),
            checkpoint_ns: checkpoint_ns.to_owned(),
            checkpoint_id: id,
            parent_checkpoint_id: record.parent,
            data: record.data,
            metadata: record.metadata,
            created_at,
        })
    }
}

pub(super) fn metadata_args(c: &mut Cmd, metadata: &Metadata) -> Result<()> {
    for (k, v) in metadata {
        c.arg(format!("m:{k}")).arg(serde_json::to_string(v)?);
    }
    Ok(())
}

pub(super) fn decode_message(text: &str) -> Result<Message> {
    match decode_stored_message(text) {
        Some(message) => Ok(message),
        None => serde_json::from_str(text)
            .map_err(|e| StorageError::serialization("stored message is not valid JSON", e)),
    }
}

/// Reads a message laid out exactly as [`StoredMessage`] writes it (its fields in order,
/// no whitespace) whose strings hold no escapes; anything else is `None` and goes to
/// serde_json, which then decides. History reads decode 50 of these a call and the
/// client's CPU is their limit: loadgen's history reads went from 31k to 42k/s on one
/// worker (README, Performance).
pub(super) fn decode_stored_message(text: &str) -> Option<Message> {
    /// A JSON string's body up to its closing quote, if it needs no unescaping.
    fn plain(s: &str) -> Option<(&str, &str)> {
        let b = s.as_bytes();
        let end = memchr::memchr2(b'"', b'\\', b)?;
        // A raw control character is invalid JSON: serde_json reports it.
        if b[end] != b'"' || !b[..end].iter().fold(true, |ok, &c| ok & (c >= 0x20)) {
            return None;
        }
        Some((&s[..end], &s[end + 1..]))
    }
    let (message_id, rest) = plain(text.strip_prefix(r#"{"message_id":""#)?)?;
    let (role, rest) = plain(rest.strip_prefix(r#","role":""#)?)?;
    let (content, rest) = plain(rest.strip_prefix(r#","content":""#)?)?;
    let (timestamp, rest) = plain(rest.strip_prefix(r#","timestamp":""#)?)?;
    let timestamp = crate::model::utc_time::fast(timestamp.as_bytes())?;
    let metadata = match rest.strip_prefix(r#","metadata":"#)?.strip_suffix('}')? {
        "{}" => Metadata::new(),
        // A field after metadata leaves trailing text here, which serde_json refuses.
        object => serde_json::from_str(object).ok()?,
    };
    Some(Message {
        message_id: message_id.to_owned(),
        role: role.to_owned(),
        content: content.to_owned(),
        timestamp,
        metadata,
    })
}

/// The field-value pairs of a hash reply (a flat array in RESP2, a map in RESP3),
/// borrowed from the reply: no map is built and no field name is copied.
pub(super) fn hash_fields(reply: &RedisValue) -> Result<Vec<(&str, &str)>> {
    fn text(v: &RedisValue) -> Result<&str> {
        match v {
            RedisValue::BulkString(bytes) => std::str::from_utf8(bytes)
                .map_err(|e| StorageError::serialization("stored hash field is not UTF-8", e)),
            RedisValue::SimpleString(s) => Ok(s),
            other => Err(StorageError::Serialization {
                message: format!("unexpected hash field from redis: {}", kind_of(other)),
                source: None,
            }),
        }
    }
    match reply {
        RedisValue::Nil => Ok(Vec::new()),
        RedisValue::Array(items) if items.len() % 2 == 0 => items
            .chunks_exact(2)
            .map(|pair| Ok((text(&pair[0])?, text(&pair[1])?)))
            .collect(),
        RedisValue::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| Ok((text(k)?, text(v)?)))
            .collect(),
        other => Err(StorageError::Serialization {
            message: format!("unexpected reply from redis for a hash: {}", kind_of(other)),
            source: None,
        }),
    }
}

/// A reply's type, for errors (never its content, which may be user data).
pub(super) fn kind_of(v: &RedisValue) -> &'static str {
    match v {
        RedisValue::Nil => "nil",
        RedisValue::Int(_) => "integer",
        RedisValue::BulkString(_) => "bulk string",
        RedisValue::Array(_) => "array",
        RedisValue::SimpleString(_) => "simple string",
        RedisValue::Okay => "OK",
        RedisValue::Map(_) => "map",
        RedisValue::ServerError(_) => "error",
        _ => "other",
    }
}

pub(super) fn from_value<T: FromRedisValue>(v: RedisValue) -> Result<T> {
    redis::from_redis_value(v)
        .map_err(|e| StorageError::serialization("unexpected reply from redis", e))
}

/// A message as stored in a history list. `decode_stored_message` reads this field order
/// directly; a change of order only sends reads to serde_json.
#[derive(Serialize)]
pub(super) struct StoredMessage<'a> {
    pub(super) message_id: &'a str,
    pub(super) role: &'a str,
    pub(super) content: &'a str,
    pub(super) timestamp: DateTime<Utc>,
    pub(super) metadata: &'a Metadata,
}

#[derive(Serialize, Deserialize)]
pub(super) struct CheckpointRecord {
    pub(super) parent: Option<String>,
    pub(super) data: Value,
    pub(super) metadata: Metadata,
}

#[derive(Serialize, Deserialize)]
pub(super) struct StoredWrite {
    pub(super) task_id: String,
    pub(super) idx: u32,
    pub(super) channel: String,
    pub(super) value: Value,
}
