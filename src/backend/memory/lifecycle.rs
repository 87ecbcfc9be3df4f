//! Health, metrics and cleanup of the memory backend.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::MemoryBackend;
use crate::error::Result;
use crate::model::{HealthReport, Metadata, MetricsReport};
use crate::storage::StorageBackend;
use crate::validate;

#[async_trait]
impl StorageBackend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn store_id(&self) -> Option<String> {
        Some(format!("memory:{}", self.instance))
    }

    async fn initialize(&self) -> Result<()> {
        self.check_open()
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    async fn health_check(&self) -> Result<HealthReport> {
        self.check_open()?;
        let started = Instant::now();
        let mut details = Metadata::new();
        details.insert("sessions".into(), json!(self.sessions.len()));
        details.insert("threads".into(), json!(self.threads.len()));
        Ok(HealthReport::healthy(
            self.kind(),
            started.elapsed(),
            details,
        ))
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        self.check_open()?;
        Ok(MetricsReport {
            component: self.kind().to_owned(),
            values: self.counts(),
            components: Vec::new(),
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        self.check_open()?;
        let cutoff = validate::idle_cutoff(max_idle)?;
        // Candidates first, then each removed with its context under the session's
        // entry lock and only if still idle: a session re-created (and given a new
        // context) while cleanup runs keeps both. Lock order is sessions, then contexts,
        // as in delete_session; nothing takes them the other way round.
        let candidates: Vec<String> = self
            .sessions
            .iter()
            .filter(|e| e.session.updated_at < cutoff)
            .map(|e| e.key().clone())
            .collect();
        let mut removed = 0;
        for id in candidates {
            let gone = self.sessions.remove_if(&id, |id, entry| {
                let idle = entry.session.updated_at < cutoff;
                if idle {
                    self.task_contexts.remove(id);
                }
                idle
            });
            removed += u64::from(gone.is_some());
        }
        Ok(removed)
    }
}
