//! Reading rows into the model's types, and the timestamp encoding (microseconds).

use chrono::{DateTime, Utc};
use rusqlite::Row;

use super::error::{Failure, Sql};
use crate::error::StorageError;
use crate::model::{Checkpoint, Metadata, Session, SessionMetrics};

pub(super) fn timestamp(micros: i64) -> Sql<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| {
        Failure::Storage(StorageError::Serialization {
            message: format!("stored timestamp {micros} is out of range"),
            source: None,
        })
    })
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Sql<T> {
    serde_json::from_str(text).map_err(|e| {
        Failure::Storage(StorageError::serialization(
            format!("stored {what} is not valid JSON"),
            e,
        ))
    })
}

pub(super) fn count(value: i64) -> Sql<u64> {
    u64::try_from(value).map_err(|_| {
        Failure::Storage(StorageError::Serialization {
            message: format!("stored counter {value} is negative"),
            source: None,
        })
    })
}

pub(super) fn session_from_row(row: &Row<'_>) -> Sql<Session> {
    Ok(Session {
        session_id: row.get(0)?,
        user_id: row.get(1)?,
        created_at: timestamp(row.get(2)?)?,
        updated_at: timestamp(row.get(3)?)?,
        status: row.get(4)?,
        metadata: decode("session metadata", &row.get::<_, String>(5)?)?,
        metrics: SessionMetrics {
            request_count: count(row.get(6)?)?,
            total_processing_time: row.get(7)?,
            error_count: count(row.get(8)?)?,
        },
    })
}

pub(super) fn checkpoint_from_row(row: &Row<'_>, metadata: Metadata) -> Sql<Checkpoint> {
    Ok(Checkpoint {
        thread_id: row.get(0)?,
        checkpoint_ns: row.get(1)?,
        checkpoint_id: row.get(2)?,
        parent_checkpoint_id: row.get(3)?,
        data: decode("checkpoint data", &row.get::<_, String>(4)?)?,
        metadata,
        created_at: timestamp(row.get(6)?)?,
    })
}

pub(super) fn checkpoint_metadata(row: &Row<'_>) -> Sql<Metadata> {
    decode("checkpoint metadata", &row.get::<_, String>(5)?)
}

/// Runs a query whose one column is an id, for listings.
pub(super) fn ids(
    conn: &rusqlite::Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Sql<Vec<String>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(args, |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<std::result::Result<_, _>>()?)
}

pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}
