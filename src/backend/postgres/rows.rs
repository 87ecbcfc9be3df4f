//! Reading rows into the model's types.

use tokio_postgres::types::Json;
use tokio_postgres::Row;

use crate::error::{Result, StorageError};
use crate::model::{Checkpoint, Message, Metadata, Session, SessionMetrics};

/// Reads column `idx`; a value of an unexpected type or JSON that does not decode is a
/// [`StorageError::Serialization`].
pub(super) fn get<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r Row,
    idx: usize,
) -> Result<T> {
    row.try_get(idx).map_err(|e| {
        let column = row.columns().get(idx).map_or("?", |c| c.name()).to_owned();
        StorageError::serialization(format!("stored column `{column}` does not decode"), e)
    })
}

pub(super) fn json_map(row: &Row, idx: usize) -> Result<Metadata> {
    get::<Json<Metadata>>(row, idx).map(|j| j.0)
}

pub(super) fn count(value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| StorageError::Serialization {
        message: format!("stored counter {value} is negative"),
        source: None,
    })
}

pub(super) fn session_from_row(row: &Row) -> Result<Session> {
    Ok(Session {
        session_id: get(row, 0)?,
        user_id: get(row, 1)?,
        created_at: get(row, 2)?,
        updated_at: get(row, 3)?,
        status: get(row, 4)?,
        metadata: json_map(row, 5)?,
        metrics: SessionMetrics {
            request_count: count(get(row, 6)?)?,
            total_processing_time: get(row, 7)?,
            error_count: count(get(row, 8)?)?,
        },
    })
}

/// A checkpoint from the columns of [`CHECKPOINT_COLUMNS`] starting at `at`.
pub(super) fn message_from_row(row: &Row) -> Result<Message> {
    Ok(Message {
        message_id: get(row, 0)?,
        role: get(row, 1)?,
        content: get(row, 2)?,
        timestamp: get(row, 3)?,
        metadata: json_map(row, 4)?,
    })
}

pub(super) fn ids_from_rows(rows: &[Row]) -> Result<Vec<String>> {
    rows.iter().map(|r| get(r, 0)).collect()
}

pub(super) fn checkpoint_from_row(row: &Row, at: usize, metadata: Metadata) -> Result<Checkpoint> {
    Ok(Checkpoint {
        thread_id: get(row, at)?,
        checkpoint_ns: get(row, at + 1)?,
        checkpoint_id: get(row, at + 2)?,
        parent_checkpoint_id: get(row, at + 3)?,
        data: get(row, at + 4)?,
        metadata,
        created_at: get(row, at + 6)?,
    })
}

pub(super) fn checkpoint_at(row: &Row, at: usize) -> Result<Checkpoint> {
    checkpoint_from_row(row, at, json_map(row, at + 5)?)
}
