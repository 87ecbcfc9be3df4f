//! Checkpoints and pending writes in memory.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::error::Result;
use crate::model::{
    now, Checkpoint, CheckpointFilter, IdPage, NewCheckpoint, PendingWrite, TaskWrites, WriteInput,
};
use crate::storage::CheckpointStorage;
use crate::validate;

#[async_trait]
impl CheckpointStorage for MemoryBackend {
    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.check_open()?;
        validate::page(after, limit)?;
        let mut ids: Vec<String> = self
            .threads
            .iter()
            .filter(|t| after.is_none_or(|a| t.key().as_str() > a))
            .map(|t| t.key().clone())
            .collect();
        ids.sort_unstable();
        Ok(IdPage::from_sorted(ids, limit))
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        self.check_open()?;
        validate::restored_checkpoints(checkpoints)?;
        for c in checkpoints {
            let mut thread = self.threads.entry(c.thread_id.clone()).or_default();
            let ns = thread.entry(c.checkpoint_ns.clone()).or_default();
            match ns.positions.get(&c.checkpoint_id) {
                Some(&pos) => ns.checkpoints[pos] = c.clone(),
                None => {
                    ns.positions
                        .insert(c.checkpoint_id.clone(), ns.checkpoints.len());
                    ns.checkpoints.push(c.clone());
                }
            }
        }
        Ok(())
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        self.check_open()?;
        validate::id("thread_id", thread_id)?;
        let mut namespaces: Vec<String> = self
            .threads
            .get(thread_id)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        namespaces.sort_unstable();
        Ok(namespaces)
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        self.check_open()?;
        validate::thread(thread_id, checkpoint_ns)?;
        let mut ids: Vec<String> = self
            .threads
            .get(thread_id)
            .and_then(|t| {
                t.get(checkpoint_ns).map(|ns| {
                    ns.writes
                        .iter()
                        .filter(|(_, w)| !w.list.is_empty())
                        .map(|(id, _)| id.clone())
                        .collect()
                })
            })
            .unwrap_or_default();
        ids.sort_unstable();
        Ok(ids)
    }

    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        self.check_open()?;
        validate::new_checkpoint(checkpoint)?;
        let mut thread = self
            .threads
            .entry(checkpoint.thread_id.clone())
            .or_default();
        let ns = thread.entry(checkpoint.checkpoint_ns.clone()).or_default();
        match ns.positions.get(&checkpoint.checkpoint_id) {
            Some(&pos) => {
                let stored = &mut ns.checkpoints[pos];
                stored.parent_checkpoint_id = checkpoint.parent_checkpoint_id.clone();
                stored.data = checkpoint.data.clone();
                stored.metadata = checkpoint.metadata.clone();
            }
            None => {
                ns.positions
                    .insert(checkpoint.checkpoint_id.clone(), ns.checkpoints.len());
                ns.checkpoints.push(Checkpoint {
                    thread_id: checkpoint.thread_id.clone(),
                    checkpoint_ns: checkpoint.checkpoint_ns.clone(),
                    checkpoint_id: checkpoint.checkpoint_id.clone(),
                    parent_checkpoint_id: checkpoint.parent_checkpoint_id.clone(),
                    data: checkpoint.data.clone(),
                    metadata: checkpoint.metadata.clone(),
                    created_at: now(),
                });
            }
        }
        Ok(())
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        self.check_open()?;
        validate::checkpoint_ref(thread_id, checkpoint_ns, checkpoint_id)?;
        let Some(thread) = self.threads.get(thread_id) else {
            return Ok(None);
        };
        let Some(ns) = thread.get(checkpoint_ns) else {
            return Ok(None);
        };
        Ok(match checkpoint_id {
            Some(id) => ns.positions.get(id).map(|&p| ns.checkpoints[p].clone()),
            None => ns.checkpoints.last().cloned(),
        })
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        self.check_open()?;
        validate::checkpoint_filter(thread_id, checkpoint_ns, filter)?;
        let Some(thread) = self.threads.get(thread_id) else {
            return Ok(Vec::new());
        };
        let Some(ns) = thread.get(checkpoint_ns) else {
            return Ok(Vec::new());
        };
        let end = match &filter.before {
            Some(before) => match ns.positions.get(before) {
                Some(&p) => p,
                None => return Ok(Vec::new()),
            },
            None => ns.checkpoints.len(),
        };
        Ok(ns.checkpoints[..end]
            .iter()
            .rev()
            .filter(|c| filter.matches(&c.metadata))
            .take(filter.limit)
            .cloned()
            .collect())
    }

    async fn put_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<()> {
        self.check_open()?;
        self.store_writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        self.check_open()?;
        validate::batch("items", items.len())?;
        Ok(items
            .iter()
            .map(|w| {
                self.store_writes(
                    &w.thread_id,
                    &w.checkpoint_ns,
                    &w.checkpoint_id,
                    &w.task_id,
                    &w.writes,
                )
            })
            .collect())
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        self.check_open()?;
        validate::checkpoint_ref(thread_id, checkpoint_ns, Some(checkpoint_id))?;
        Ok(self
            .threads
            .get(thread_id)
            .and_then(|t| {
                t.get(checkpoint_ns)
                    .and_then(|ns| ns.writes.get(checkpoint_id))
                    .map(|w| w.list.clone())
            })
            .unwrap_or_default())
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        self.check_open()?;
        validate::id("thread_id", thread_id)?;
        self.threads.remove(thread_id);
        Ok(())
    }
}
