//! Task contexts in memory.

use async_trait::async_trait;
use serde_json::Value;

use super::MemoryBackend;
use crate::error::Result;
use crate::model::IdPage;
use crate::storage::TaskContextStorage;
use crate::validate;

#[async_trait]
impl TaskContextStorage for MemoryBackend {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.check_open()?;
        validate::page(after, limit)?;
        let mut ids: Vec<String> = self
            .task_contexts
            .iter()
            .filter(|c| after.is_none_or(|a| c.key().as_str() > a))
            .map(|c| c.key().clone())
            .collect();
        ids.sort_unstable();
        Ok(IdPage::from_sorted(ids, limit))
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        Ok(self.task_contexts.get(session_id).map(|v| v.clone()))
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        self.check_open()?;
        validate::task_context(session_id, context)?;
        self.task_contexts
            .insert(session_id.to_owned(), context.clone());
        Ok(())
    }
}
