//! Task contexts on PostgreSQL.

use async_trait::async_trait;
use serde_json::Value;

use super::rows::{get, ids_from_rows};
use super::PostgresBackend;
use crate::error::Result;
use crate::model::{now, IdPage};
use crate::storage::TaskContextStorage;
use crate::validate;

#[async_trait]
impl TaskContextStorage for PostgresBackend {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.list_task_contexts,
                &[&after.unwrap_or_default(), &(limit as i64 + 1)],
            )
            .await?;
        Ok(IdPage::from_sorted(ids_from_rows(&rows)?, limit))
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        validate::id("session_id", session_id)?;
        let c = self.conn().await?;
        c.query_opt(&c.sql.get_task_context, &[&session_id])
            .await?
            .map(|row| get(&row, 0))
            .transpose()
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        validate::task_context(session_id, context)?;
        let c = self.conn().await?;
        c.execute(&c.sql.store_task_context, &[&session_id, context, &now()])
            .await?;
        Ok(())
    }
}
