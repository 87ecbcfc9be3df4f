//! Checkpoints and pending writes on PostgreSQL.

use async_trait::async_trait;
use serde_json::Value;
use tokio_postgres::types::Json;

use super::rows::{checkpoint_at, checkpoint_from_row, get, ids_from_rows, json_map};
use super::PostgresBackend;
use crate::error::{Result, StorageError};
use crate::model::{
    now, Checkpoint, CheckpointFilter, IdPage, NewCheckpoint, PendingWrite, TaskWrites, WriteInput,
};
use crate::storage::CheckpointStorage;
use crate::validate;

#[async_trait]
impl CheckpointStorage for PostgresBackend {
    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.list_threads,
                &[&after.unwrap_or_default(), &(limit as i64 + 1)],
            )
            .await?;
        Ok(IdPage::from_sorted(ids_from_rows(&rows)?, limit))
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        validate::restored_checkpoints(checkpoints)?;
        // A repeated key keeps its first position and its last values, as a sequence of
        // single restores would (one INSERT cannot upsert a row twice).
        let mut rows: Vec<&Checkpoint> = Vec::with_capacity(checkpoints.len());
        let mut at: std::collections::HashMap<(&str, &str, &str), usize> = Default::default();
        for cp in checkpoints {
            let key = (
                cp.thread_id.as_str(),
                cp.checkpoint_ns.as_str(),
                cp.checkpoint_id.as_str(),
            );
            match at.get(&key) {
                Some(&i) => rows[i] = cp,
                None => {
                    at.insert(key, rows.len());
                    rows.push(cp);
                }
            }
        }
        let c = self.conn().await?;
        if rows.is_empty() {
            return Ok(());
        }
        let threads: Vec<&str> = rows.iter().map(|c| c.thread_id.as_str()).collect();
        let namespaces: Vec<&str> = rows.iter().map(|c| c.checkpoint_ns.as_str()).collect();
        let ids: Vec<&str> = rows.iter().map(|c| c.checkpoint_id.as_str()).collect();
        let parents: Vec<Option<&str>> = rows
            .iter()
            .map(|c| c.parent_checkpoint_id.as_deref())
            .collect();
        let data: Vec<&Value> = rows.iter().map(|c| &c.data).collect();
        let metadata: Vec<Value> = rows
            .iter()
            .map(|c| Value::Object(c.metadata.clone()))
            .collect();
        let created: Vec<_> = rows.iter().map(|c| c.created_at).collect();
        c.execute(
            &c.sql.restore_checkpoints,
            &[
                &threads,
                &namespaces,
                &ids,
                &parents,
                &data,
                &metadata,
                &created,
            ],
        )
        .await?;
        Ok(())
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        validate::id("thread_id", thread_id)?;
        let c = self.conn().await?;
        let rows = c.query(&c.sql.list_namespaces, &[&thread_id]).await?;
        ids_from_rows(&rows)
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        validate::thread(thread_id, checkpoint_ns)?;
        let c = self.conn().await?;
        let rows = c
            .query(&c.sql.list_write_checkpoints, &[&thread_id, &checkpoint_ns])
            .await?;
        ids_from_rows(&rows)
    }

    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        validate::new_checkpoint(checkpoint)?;
        let c = self.conn().await?;
        c.execute(
            &c.sql.store_checkpoint,
            &[
                &checkpoint.thread_id,
                &checkpoint.checkpoint_ns,
                &checkpoint.checkpoint_id,
                &checkpoint.parent_checkpoint_id,
                &checkpoint.data,
                &Json(&checkpoint.metadata),
                &now(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, checkpoint_id)?;
        let c = self.conn().await?;
        let row = match checkpoint_id {
            Some(id) => {
                c.query_opt(&c.sql.get_checkpoint, &[&thread_id, &checkpoint_ns, &id])
                    .await?
            }
            None => {
                c.query_opt(&c.sql.latest_checkpoint, &[&thread_id, &checkpoint_ns])
                    .await?
            }
        };
        row.map(|r| checkpoint_at(&r, 0)).transpose()
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        validate::checkpoint_filter(thread_id, checkpoint_ns, filter)?;
        let c = self.conn().await?;
        let limit = filter.limit as i64;
        if filter.metadata.is_empty() {
            let rows = c
                .query(
                    &c.sql.list_checkpoints,
                    &[
                        &thread_id,
                        &checkpoint_ns,
                        &i64::MAX,
                        &filter.before,
                        &limit,
                    ],
                )
                .await?;
            return rows.iter().map(|r| checkpoint_at(r, 1)).collect();
        }
        // jsonb equality is a superset of serde_json's (it equates 4 and 4.0), so rows are
        // checked again here; in the rare case that drops some, the next page continues
        // below the last seq seen until `limit` match or the thread is exhausted.
        let wanted = Json(&filter.metadata);
        let mut out = Vec::new();
        let mut below = i64::MAX;
        loop {
            let rows = c
                .query(
                    &c.sql.list_checkpoints_filtered,
                    &[
                        &thread_id,
                        &checkpoint_ns,
                        &below,
                        &filter.before,
                        &limit,
                        &wanted,
                    ],
                )
                .await?;
            for row in &rows {
                below = get(row, 0)?;
                let metadata = json_map(row, 6)?;
                if filter.matches(&metadata) && out.len() < filter.limit {
                    out.push(checkpoint_from_row(row, 1, metadata)?);
                }
            }
            if out.len() >= filter.limit || (rows.len() as i64) < limit {
                return Ok(out);
            }
        }
    }

    async fn put_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<()> {
        validate::writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)?;
        if writes.is_empty() {
            self.state().await?;
            return Ok(());
        }
        // Validation caps a call at 10 000 writes, so every index fits.
        let idx: Vec<i32> = (0..writes.len() as i32).collect();
        let channels: Vec<&str> = writes.iter().map(|w| w.channel.as_str()).collect();
        let values: Vec<&Value> = writes.iter().map(|w| &w.value).collect();
        let c = self.conn().await?;
        c.execute(
            &c.sql.put_writes,
            &[
                &thread_id,
                &checkpoint_ns,
                &checkpoint_id,
                &task_id,
                &idx,
                &channels,
                &values,
            ],
        )
        .await?;
        Ok(())
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        validate::batch("items", items.len())?;
        // One statement for every valid item. A write repeated in the batch keeps the
        // position of its first occurrence and the value of its last, as a sequence of
        // put_writes calls would (one INSERT cannot upsert the same row twice).
        let mut out = Vec::with_capacity(items.len());
        let mut rows: Vec<(&str, &str, &str, &str, i32, &str, &Value)> = Vec::new();
        let mut seen: std::collections::HashMap<(&str, &str, &str, &str, i32), usize> =
            std::collections::HashMap::new();
        for w in items {
            let checked = validate::writes(
                &w.thread_id,
                &w.checkpoint_ns,
                &w.checkpoint_id,
                &w.task_id,
                &w.writes,
            );
            if checked.is_ok() {
                for (idx, write) in (0i32..).zip(&w.writes) {
                    let key = (
                        w.thread_id.as_str(),
                        w.checkpoint_ns.as_str(),
                        w.checkpoint_id.as_str(),
                        w.task_id.as_str(),
                        idx,
                    );
                    let row = (
                        key.0,
                        key.1,
                        key.2,
                        key.3,
                        idx,
                        write.channel.as_str(),
                        &write.value,
                    );
                    match seen.get(&key) {
                        Some(&at) => rows[at] = row,
                        None => {
                            seen.insert(key, rows.len());
                            rows.push(row);
                        }
                    }
                }
            }
            out.push(checked);
        }
        let c = self.conn().await?;
        if rows.is_empty() {
            return Ok(out);
        }
        let threads: Vec<&str> = rows.iter().map(|r| r.0).collect();
        let namespaces: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let checkpoints: Vec<&str> = rows.iter().map(|r| r.2).collect();
        let tasks: Vec<&str> = rows.iter().map(|r| r.3).collect();
        let idx: Vec<i32> = rows.iter().map(|r| r.4).collect();
        let channels: Vec<&str> = rows.iter().map(|r| r.5).collect();
        let values: Vec<&Value> = rows.iter().map(|r| r.6).collect();
        c.execute(
            &c.sql.batch_put_writes,
            &[
                &threads,
                &namespaces,
                &checkpoints,
                &tasks,
                &idx,
                &channels,
                &values,
            ],
        )
        .await?;
        Ok(out)
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, Some(checkpoint_id))?;
        let c = self.conn().await?;
        let rows = c
            .query(
                &c.sql.get_writes,
                &[&thread_id, &checkpoint_ns, &checkpoint_id],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let idx: i32 = get(row, 1)?;
                Ok(PendingWrite {
                    task_id: get(row, 0)?,
                    idx: u32::try_from(idx).map_err(|_| StorageError::Serialization {
                        message: format!("stored write index {idx} is negative"),
                        source: None,
                    })?,
                    channel: get(row, 2)?,
                    value: get(row, 3)?,
                })
            })
            .collect()
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        validate::id("thread_id", thread_id)?;
        let c = self.conn().await?;
        c.execute(&c.sql.delete_thread, &[&thread_id]).await?;
        Ok(())
    }
}
