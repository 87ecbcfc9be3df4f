//! A pooled connection with the backend's statements, and how its errors are told.

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::connect;
use super::sql::Queries;
use crate::error::{Result, StorageError};

/// A pooled connection with the statements of the backend.
pub(super) struct Conn<'a> {
    pub(super) client: Object,
    pub(super) sql: &'a Queries,
    pub(super) target: &'a str,
}

pub(super) type Params<'p> = [&'p (dyn ToSql + Sync)];

impl Conn<'_> {
    pub(super) fn err(&self, e: tokio_postgres::Error) -> StorageError {
        connect::pg_error(e, self.target)
    }

    pub(super) async fn query(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>> {
        let stmt = self
            .client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.err(e))?;
        self.client
            .query(&stmt, params)
            .await
            .map_err(|e| self.err(e))
    }

    pub(super) async fn query_opt(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>> {
        let stmt = self
            .client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.err(e))?;
        self.client
            .query_opt(&stmt, params)
            .await
            .map_err(|e| self.err(e))
    }

    pub(super) async fn query_one(&self, sql: &str, params: &Params<'_>) -> Result<Row> {
        self.query_opt(sql, params)
            .await?
            .ok_or_else(|| StorageError::Backend {
                message: "postgres statement returned no row".into(),
                transient: false,
                source: None,
            })
    }

    pub(super) async fn execute(&self, sql: &str, params: &Params<'_>) -> Result<u64> {
        let stmt = self
            .client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.err(e))?;
        self.client
            .execute(&stmt, params)
            .await
            .map_err(|e| self.err(e))
    }
}
