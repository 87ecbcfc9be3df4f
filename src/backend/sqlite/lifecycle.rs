//! Opening, health, metrics and cleanup of the SQLite backend.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, TransactionBehavior};
use serde_json::json;

use super::error::sql_error;
use super::feed::{record, Touched};
use super::rows::{ids, micros};
use super::SqliteBackend;
use crate::error::{Result, StorageError};
use crate::model::{HealthReport, Metadata, MetricsReport};
use crate::storage::StorageBackend;
use crate::validate;

/// How long a health check waits for a change feed whose poller is connecting.
const FEED_WAIT: Duration = Duration::from_secs(2);

/// The most sessions a cleanup reports one by one in the change feed.
const CLEANUP_ITEMIZED: i64 = 1_000;

#[async_trait]
impl StorageBackend for SqliteBackend {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn store_id(&self) -> Option<String> {
        let Some(path) = &self.path else {
            return Some(format!("sqlite::memory:{}", self.instance));
        };
        // A target may not exist yet: then its directory is canonicalized. Symlinks and
        // `..` resolve, so two spellings of one file compare equal.
        let canonical = std::fs::canonicalize(path).ok().or_else(|| {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
        })?;
        Some(format!("sqlite:{}", canonical.display()))
    }

    fn changes(&self) -> Option<crate::feed::ChangeFeed> {
        let (feed, path) = (self.feed.as_ref()?, self.path.clone()?);
        Some(feed.subscribe(path, self.busy_timeout))
    }

    async fn initialize(&self) -> Result<()> {
        self.connections().await.map(|_| ())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some(feed) = &self.feed {
            feed.close();
        }
        if let Some(conns) = self.state.get() {
            let checkpointer = conns.checkpointer.as_ref().map(|c| {
                c.task.abort();
                &c.conn
            });
            // Queued calls run before the close message, so nothing accepted is dropped.
            for conn in checkpointer
                .into_iter()
                .chain(&conns.readers)
                .chain([&conns.writer])
            {
                conn.clone().close().await.map_err(|e| match e {
                    tokio_rusqlite::Error::Close((_, e)) => sql_error(e),
                    other => StorageError::Backend {
                        message: format!("could not close sqlite connection: {other}"),
                        transient: false,
                        source: None,
                    },
                })?;
            }
        }
        Ok(())
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let readers = self.connections().await?.readers.len();
        let (journal_mode, schema_version, pages, page_size) = self
            .read(|c| {
                let journal: String = c.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
                let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
                let pages: i64 = c.pragma_query_value(None, "page_count", |r| r.get(0))?;
                let size: i64 = c.pragma_query_value(None, "page_size", |r| r.get(0))?;
                Ok((journal, version, pages, size))
            })
            .await?;
        let mut details = Metadata::new();
        if let Some(feed) = &self.feed {
            let state = feed.settled_state(self.busy_timeout.min(FEED_WAIT)).await;
            details.insert("feed".into(), json!(state));
        }
        details.insert("path".into(), json!(self.location()));
        details.insert("journal_mode".into(), json!(journal_mode));
        details.insert("schema_version".into(), json!(schema_version));
        details.insert("size_bytes".into(), json!(pages * page_size));
        details.insert("readers".into(), json!(readers));
        Ok(HealthReport::healthy(
            self.kind(),
            started.elapsed(),
            details,
        ))
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        let values = self
            .read(|c| {
                let mut values = Metadata::new();
                for (name, table) in [
                    ("sessions", "sessions"),
                    ("messages", "messages"),
                    ("checkpoints", "checkpoints"),
                    ("pending_writes", "checkpoint_writes"),
                    ("task_contexts", "task_contexts"),
                ] {
                    let n: i64 =
                        c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
                    values.insert(name.into(), json!(n));
                }
                Ok(values)
            })
            .await?;
        Ok(MetricsReport {
            component: self.kind().to_owned(),
            values,
            components: Vec::new(),
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        let cutoff = micros(validate::idle_cutoff(max_idle)?);
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // One change per session removed, up to a point: past it, a single
            // "everything" is cheaper to write than a change list nobody needs itemized.
            let doomed = ids(
                &tx,
                "SELECT session_id FROM sessions WHERE indexed_at < ?1 AND updated_at < ?1 \
                 LIMIT ?2",
                params![cutoff, CLEANUP_ITEMIZED + 1],
            )?;
            if doomed.len() > CLEANUP_ITEMIZED as usize {
                record(&tx, Touched::Everything, "")?;
            } else {
                for id in &doomed {
                    record(&tx, Touched::Session, id)?;
                    record(&tx, Touched::TaskContext, id)?;
                }
            }
            // `indexed_at <= updated_at`, so the index range holds every idle session.
            tx.execute(
                "DELETE FROM task_contexts WHERE session_id IN (SELECT session_id FROM \
                 sessions WHERE indexed_at < ?1 AND updated_at < ?1)",
                [cutoff],
            )?;
            // Messages go with their session through ON DELETE CASCADE.
            let removed = tx.execute(
                "DELETE FROM sessions WHERE indexed_at < ?1 AND updated_at < ?1",
                [cutoff],
            )?;
            tx.commit()?;
            Ok(removed as u64)
        })
        .await
    }
}
