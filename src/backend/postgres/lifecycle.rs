//! Opening, health, metrics and cleanup of the PostgreSQL backend.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::rows::{count, get};
use super::PostgresBackend;
use crate::error::Result;
use crate::feed::ChangeFeed;
use crate::model::{HealthReport, Metadata, MetricsReport};
use crate::storage::StorageBackend;
use crate::validate;

#[async_trait]
impl StorageBackend for PostgresBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn store_id(&self) -> Option<String> {
        let config = &self.options.config;
        // As the driver connects: the first host and port, a Unix socket's directory.
        let host = match config.get_hosts().first()? {
            tokio_postgres::config::Host::Tcp(h) => h.to_ascii_lowercase(),
            tokio_postgres::config::Host::Unix(dir) => dir.display().to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        Some(format!(
            "postgres:{host}:{port}/{}/{}",
            self.options.dbname, self.schema
        ))
    }

    fn changes(&self) -> Option<ChangeFeed> {
        if !self.feed_enabled {
            return None;
        }
        Some(self.feed.subscribe(&self.options, &self.schema))
    }

    async fn initialize(&self) -> Result<()> {
        self.state().await.map(|_| ())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.feed.close();
        if let Some(state) = self.state.get() {
            // Idle connections close now; busy ones when their call finishes.
            state.pool.close();
        }
        Ok(())
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let c = self.conn().await?;
        let row = c
            .query_one("SELECT current_setting('server_version')", &[])
            .await?;
        let server_version: String = get(&row, 0)?;
        let latency = started.elapsed();
        let state = self.state().await?;
        let pool = state.pool.status();
        let mut details = Metadata::new();
        details.insert("url".into(), json!(self.options.redacted));
        details.insert("host".into(), json!(self.options.host));
        details.insert("database".into(), json!(self.options.dbname));
        details.insert("schema".into(), json!(self.schema));
        details.insert("schema_version".into(), json!(state.schema_version));
        details.insert("server_version".into(), json!(server_version));
        details.insert("sslmode".into(), json!(self.options.ssl_mode.as_str()));
        details.insert("pool_max_size".into(), json!(pool.max_size));
        details.insert("pool_size".into(), json!(pool.size));
        details.insert("pool_available".into(), json!(pool.available));
        details.insert("pool_waiting".into(), json!(pool.waiting));
        if self.feed_enabled {
            details.insert("feed".into(), json!(self.feed.state_name()));
        }
        Ok(HealthReport::healthy(self.kind(), latency, details))
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        let c = self.conn().await?;
        let row = c.query_one(&c.sql.counts, &[]).await?;
        let mut values = Metadata::new();
        for (i, name) in [
            "sessions",
            "messages",
            "checkpoints",
            "pending_writes",
            "task_contexts",
        ]
        .into_iter()
        .enumerate()
        {
            values.insert(name.into(), json!(get::<i64>(&row, i)?));
        }
        Ok(MetricsReport {
            component: self.kind().to_owned(),
            values,
            components: Vec::new(),
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        let cutoff = validate::idle_cutoff(max_idle)?;
        let c = self.conn().await?;
        let row = c.query_one(&c.sql.cleanup, &[&cutoff]).await?;
        count(get(&row, 0)?)
    }
}
