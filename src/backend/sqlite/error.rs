//! How SQLite's errors, and ours raised inside a connection's thread, become
//! [`StorageError`]s.

use crate::error::StorageError;

/// An error inside a connection's thread: SQLite's own, or one of ours. `?` works on
/// both, and the boundary turns either into a [`StorageError`].
pub(super) enum Failure {
    Sql(rusqlite::Error),
    Storage(StorageError),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure::Sql(e)
    }
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        Failure::Storage(e)
    }
}

impl From<serde_json::Error> for Failure {
    fn from(e: serde_json::Error) -> Self {
        Failure::Storage(e.into())
    }
}

pub(super) fn sql_error(e: rusqlite::Error) -> StorageError {
    use rusqlite::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            StorageError::backend("sqlite database is busy", true, e)
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::CannotOpen => {
            StorageError::Connection {
                message: "could not open the sqlite database file".into(),
                source: Some(Box::new(e)),
            }
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => {
            StorageError::serialization("stored sqlite record has an unexpected type", e)
        }
        _ => StorageError::backend("sqlite error", false, e),
    }
}

impl From<Failure> for StorageError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Sql(e) => sql_error(e),
            Failure::Storage(e) => e,
        }
    }
}

pub(super) type Sql<T> = std::result::Result<T, Failure>;
