//! Task contexts on SQLite: one JSON value per session id.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::feed::{atomic, record, Touched};
use super::rows::{decode, ids, micros};
use super::SqliteBackend;
use crate::error::Result;
use crate::model::{now, IdPage};
use crate::storage::TaskContextStorage;
use crate::validate;

#[async_trait]
impl TaskContextStorage for SqliteBackend {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let after = after.unwrap_or_default().to_owned();
        let found = self
            .read(move |c| {
                ids(
                    c,
                    "SELECT session_id FROM task_contexts WHERE session_id > ?1 \
                     ORDER BY session_id LIMIT ?2",
                    params![after, limit as i64 + 1],
                )
            })
            .await?;
        Ok(IdPage::from_sorted(found, limit))
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        validate::id("session_id", session_id)?;
        let id = session_id.to_owned();
        self.read(move |c| {
            let text: Option<String> = c
                .prepare_cached("SELECT context FROM task_contexts WHERE session_id = ?1")?
                .query_row([&id], |r| r.get(0))
                .optional()?;
            text.map(|t| decode("task context", &t)).transpose()
        })
        .await
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        validate::task_context(session_id, context)?;
        let (id, text) = (session_id.to_owned(), serde_json::to_string(context)?);
        self.write(move |c| {
            let at = micros(now());
            atomic(c, |tx| {
                tx.prepare_cached(
                    "INSERT INTO task_contexts (session_id, context, updated_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (session_id) DO UPDATE SET context = excluded.context, \
                     updated_at = excluded.updated_at",
                )?
                .execute(params![id, text, at])?;
                record(tx, Touched::TaskContext, &id)
            })
        })
        .await
    }
}
