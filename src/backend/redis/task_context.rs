//! Task contexts on Redis.

use async_trait::async_trait;
use serde_json::Value;

use super::connection::{evalsha, made_anew};
use super::scripts;
use super::RedisBackend;
use crate::error::{Result, StorageError};
use crate::model::IdPage;
use crate::storage::TaskContextStorage;
use crate::validate;

use super::keys::Index;

#[async_trait]
impl TaskContextStorage for RedisBackend {
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let context = |id: &str| self.session_keys(id).context;
        self.live_members(Index::Contexts, after, limit, context)
            .await
    }

    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        validate::id("session_id", session_id)?;
        let mut c = redis::cmd("GET");
        c.arg(self.session_keys(session_id).context);
        let text: Option<String> = self.run_tracked(&c).await?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| StorageError::serialization("stored task context is not JSON", e))
        })
        .transpose()
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        validate::task_context(session_id, context)?;
        let key = self.session_keys(session_id).context;
        // A script, to know whether the context is new (see `write_indexed`).
        let mut c = evalsha(&scripts::STORE_CONTEXT, &[&key]);
        c.arg(serde_json::to_string(context)?)
            .arg(Self::ttl_ms(self.session_ttl));
        let index = self.id_index_cmd("ZADD", Index::Contexts, session_id);
        self.write_one_indexed(index, c, made_anew).await
    }
}
