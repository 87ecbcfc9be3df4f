//! Checkpoints and pending writes on SQLite.

use async_trait::async_trait;
use rusqlite::{params, TransactionBehavior};

use super::error::Sql;
use super::feed::{atomic, record, Touched};
use super::rows::{checkpoint_from_row, checkpoint_metadata, decode, ids, micros};
use super::schema::CHECKPOINT_COLUMNS;
use super::SqliteBackend;
use crate::error::Result;
use crate::model::{
    now, Checkpoint, CheckpointFilter, IdPage, NewCheckpoint, PendingWrite, TaskWrites, WriteInput,
};
use crate::storage::CheckpointStorage;
use crate::validate;

/// One task's pending writes, encoded for the connection thread.
pub(super) struct EncodedWrites {
    key: [String; 4],
    writes: Vec<(String, String)>,
}

impl EncodedWrites {
    fn new(
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<Self> {
        Ok(EncodedWrites {
            key: [thread_id, checkpoint_ns, checkpoint_id, task_id].map(str::to_owned),
            writes: writes
                .iter()
                .map(|w| Ok((w.channel.clone(), serde_json::to_string(&w.value)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Upserts the writes inside the caller's transaction; a write keeps its first `seq`.
    fn insert(&self, conn: &rusqlite::Connection) -> Sql<()> {
        let mut stmt = conn.prepare_cached(
            "INSERT INTO checkpoint_writes (thread_id, checkpoint_ns, checkpoint_id, \
             task_id, idx, channel, value) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) \
             DO UPDATE SET channel = excluded.channel, value = excluded.value",
        )?;
        let k = &self.key;
        for (idx, (channel, value)) in self.writes.iter().enumerate() {
            stmt.execute(params![k[0], k[1], k[2], k[3], idx as i64, channel, value])?;
        }
        record(conn, Touched::Thread, &k[0])
    }
}

#[async_trait]
impl CheckpointStorage for SqliteBackend {
    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        validate::page(after, limit)?;
        let after = after.unwrap_or_default().to_owned();
        let found = self
            .read(move |c| {
                ids(
                    c,
                    "SELECT thread_id FROM (SELECT thread_id FROM checkpoints \
                     UNION SELECT thread_id FROM checkpoint_writes) \
                     WHERE thread_id > ?1 ORDER BY thread_id LIMIT ?2",
                    params![after, limit as i64 + 1],
                )
            })
            .await?;
        Ok(IdPage::from_sorted(found, limit))
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        validate::restored_checkpoints(checkpoints)?;
        let rows = checkpoints
            .iter()
            .map(|c| {
                Ok((
                    c.clone(),
                    serde_json::to_string(&c.data)?,
                    serde_json::to_string(&c.metadata)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut touched = std::collections::HashSet::new();
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, \
                     parent_checkpoint_id, data, metadata, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                     ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET \
                     parent_checkpoint_id = excluded.parent_checkpoint_id, \
                     data = excluded.data, metadata = excluded.metadata, \
                     created_at = excluded.created_at",
                )?;
                for (cp, data, metadata) in &rows {
                    stmt.execute(params![
                        cp.thread_id,
                        cp.checkpoint_ns,
                        cp.checkpoint_id,
                        cp.parent_checkpoint_id,
                        data,
                        metadata,
                        micros(cp.created_at),
                    ])?;
                    if touched.insert(&cp.thread_id) {
                        record(&tx, Touched::Thread, &cp.thread_id)?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        validate::id("thread_id", thread_id)?;
        let thread = thread_id.to_owned();
        self.read(move |c| {
            ids(
                c,
                "SELECT checkpoint_ns FROM checkpoints WHERE thread_id = ?1 \
                 UNION SELECT checkpoint_ns FROM checkpoint_writes WHERE thread_id = ?1 \
                 ORDER BY 1",
                [thread],
            )
        })
        .await
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        validate::thread(thread_id, checkpoint_ns)?;
        let args = [thread_id.to_owned(), checkpoint_ns.to_owned()];
        self.read(move |c| {
            ids(
                c,
                "SELECT DISTINCT checkpoint_id FROM checkpoint_writes \
                 WHERE thread_id = ?1 AND checkpoint_ns = ?2 ORDER BY 1",
                args,
            )
        })
        .await
    }

    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        validate::new_checkpoint(checkpoint)?;
        let cp = checkpoint.clone();
        let data = serde_json::to_string(&cp.data)?;
        let metadata = serde_json::to_string(&cp.metadata)?;
        self.write(move |c| {
            let at = micros(now());
            atomic(c, |tx| {
                tx.prepare_cached(
                    "INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, \
                 parent_checkpoint_id, data, metadata, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET \
                 parent_checkpoint_id = excluded.parent_checkpoint_id, data = excluded.data, \
                 metadata = excluded.metadata",
                )?
                .execute(params![
                    cp.thread_id,
                    cp.checkpoint_ns,
                    cp.checkpoint_id,
                    cp.parent_checkpoint_id,
                    data,
                    metadata,
                    at,
                ])?;
                record(tx, Touched::Thread, &cp.thread_id)
            })
        })
        .await
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, checkpoint_id)?;
        let (thread, ns, id) = (
            thread_id.to_owned(),
            checkpoint_ns.to_owned(),
            checkpoint_id.map(str::to_owned),
        );
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints \
                 WHERE thread_id = ?1 AND checkpoint_ns = ?2 \
                 AND (?3 IS NULL OR checkpoint_id = ?3) ORDER BY seq DESC LIMIT 1"
            ))?;
            let mut rows = stmt.query(params![thread, ns, id])?;
            match rows.next()? {
                Some(row) => Ok(Some(checkpoint_from_row(row, checkpoint_metadata(row)?)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        validate::checkpoint_filter(thread_id, checkpoint_ns, filter)?;
        let (thread, ns, filter) = (
            thread_id.to_owned(),
            checkpoint_ns.to_owned(),
            filter.clone(),
        );
        self.read(move |c| {
            // With a metadata filter the rows are filtered here, newest first, until
            // `limit` match; without one SQLite applies the limit itself.
            let sql_limit = if filter.metadata.is_empty() {
                filter.limit as i64
            } else {
                -1
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints \
                 WHERE thread_id = ?1 AND checkpoint_ns = ?2 AND (?3 IS NULL OR seq < \
                 (SELECT seq FROM checkpoints WHERE thread_id = ?1 AND checkpoint_ns = ?2 \
                 AND checkpoint_id = ?3)) ORDER BY seq DESC LIMIT ?4"
            ))?;
            let mut rows = stmt.query(params![thread, ns, filter.before, sql_limit])?;
            let mut out = Vec::new();
            while out.len() < filter.limit {
                let Some(row) = rows.next()? else { break };
                let metadata = checkpoint_metadata(row)?;
                if filter.matches(&metadata) {
                    out.push(checkpoint_from_row(row, metadata)?);
                }
            }
            Ok(out)
        })
        .await
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
        let item = EncodedWrites::new(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            item.insert(&tx)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        validate::batch("items", items.len())?;
        let encoded: Vec<Result<EncodedWrites>> = items
            .iter()
            .map(|w| {
                validate::writes(
                    &w.thread_id,
                    &w.checkpoint_ns,
                    &w.checkpoint_id,
                    &w.task_id,
                    &w.writes,
                )?;
                EncodedWrites::new(
                    &w.thread_id,
                    &w.checkpoint_ns,
                    &w.checkpoint_id,
                    &w.task_id,
                    &w.writes,
                )
            })
            .collect();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut out = Vec::with_capacity(encoded.len());
            for item in encoded {
                out.push(match item {
                    Ok(item) => {
                        item.insert(&tx)?;
                        Ok(())
                    }
                    Err(e) => Err(e),
                });
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        validate::checkpoint_ref(thread_id, checkpoint_ns, Some(checkpoint_id))?;
        let key = [thread_id, checkpoint_ns, checkpoint_id].map(str::to_owned);
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT task_id, idx, channel, value FROM checkpoint_writes \
                 WHERE thread_id = ?1 AND checkpoint_ns = ?2 AND checkpoint_id = ?3 \
                 ORDER BY seq",
            )?;
            let mut rows = stmt.query(params![key[0], key[1], key[2]])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(PendingWrite {
                    task_id: row.get(0)?,
                    idx: row.get(1)?,
                    channel: row.get(2)?,
                    value: decode("pending write value", &row.get::<_, String>(3)?)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        validate::id("thread_id", thread_id)?;
        let thread = thread_id.to_owned();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM checkpoint_writes WHERE thread_id = ?1",
                [&thread],
            )?;
            tx.execute("DELETE FROM checkpoints WHERE thread_id = ?1", [&thread])?;
            record(&tx, Touched::Thread, &thread)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}
