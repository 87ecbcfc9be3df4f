//! The storage traits over [`Cached`]: reads served from the cache, writes that
//! outdate what they touch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::entry::{stripe_of, Cacheable, Entry, Key};
use super::Cached;
use crate::error::Result;
use crate::model::{
    now, Checkpoint, CheckpointFilter, HealthReport, HealthStatus, IdPage, Message, Metadata,
    MetricsReport, NewCheckpoint, NewMessage, NewSession, PendingWrite, Session, SessionPage,
    SessionQuery, SessionUpdate, TaskWrites, WriteInput,
};
use crate::storage::{
    CheckpointStorage, ConversationStorage, SessionStorage, StorageBackend, TaskContextStorage,
};
use crate::validate;

#[async_trait]
impl<B: StorageBackend> SessionStorage for Cached<B> {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        let w = self
            .shared
            .write([session_id], vec![Key::Session(session_id.to_owned())]);
        w.finish(
            self.inner
                .create_session(session_id, user_id, metadata)
                .await,
        )
        .await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        self.follow();
        self.shared
            .read(Key::Session(session_id.to_owned()), || {
                self.inner.get_session(session_id)
            })
            .await
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        let w = self
            .shared
            .write([session_id], vec![Key::Session(session_id.to_owned())]);
        w.finish(self.inner.update_session(session_id, update).await)
            .await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        let w = self
            .shared
            .write([session_id], vec![Key::Session(session_id.to_owned())]);
        w.finish(self.inner.end_session(session_id, status).await)
            .await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        let w = self.shared.write(
            sessions.iter().map(|s| s.session_id.as_str()),
            sessions
                .iter()
                .map(|s| Key::Session(s.session_id.clone()))
                .collect(),
        );
        w.finish(self.inner.batch_create_sessions(sessions).await)
            .await
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        let keys = vec![
            Key::Session(session_id.to_owned()),
            Key::Context(session_id.to_owned()),
        ];
        let w = self.shared.write([session_id], keys);
        w.finish(self.inner.delete_session(session_id).await).await
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        let w = self.shared.write(
            sessions.iter().map(|s| s.session_id.as_str()),
            sessions
                .iter()
                .map(|s| Key::Session(s.session_id.clone()))
                .collect(),
        );
        w.finish(self.inner.restore_sessions(sessions).await).await
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        // Input the inner backend would refuse (or an empty batch, which only tells
        // whether it is open) goes to it whole, so the answer is its own.
        if session_ids.is_empty() || validate::session_ids(session_ids).is_err() {
            return self.inner.batch_get_sessions(session_ids).await;
        }
        self.follow();
        let shared = &self.shared;
        let mut out = Vec::with_capacity(session_ids.len());
        let mut missing = Vec::new();
        for (i, id) in session_ids.iter().enumerate() {
            let key = Key::Session(id.clone());
            let stripe = stripe_of(id);
            let start = shared.stamp(stripe);
            if shared.is_unsettled(stripe) || shared.feed_is_down() {
                // Read from the store and not cached, as in `Shared::read`.
                shared.counters.misses.add(1);
                out.push(None);
                missing.push((i, None, start));
                continue;
            }
            let hit = match shared.cache.get(&key).await {
                Some(entry) if entry.stamp.covers(start) => {
                    <Option<Session> as Cacheable>::from_cached(&entry.value)
                }
                Some(_) => {
                    shared.counters.stale.add(1);
                    shared.cache.invalidate(&key).await;
                    None
                }
                None => None,
            };
            match hit {
                Some(v) => {
                    shared.counters.hits.add(1);
                    out.push(v);
                }
                None => {
                    shared.counters.misses.add(1);
                    out.push(None);
                    missing.push((i, Some(key), start));
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let ids: Vec<String> = missing
            .iter()
            .map(|(i, ..)| session_ids[*i].clone())
            .collect();
        shared.counters.loads.add(1);
        let loaded = self.inner.batch_get_sessions(&ids).await?;
        // Each value is stamped with the generations read before the load, as in
        // `Shared::read`, so one outdated by a concurrent write is never served later.
        for ((i, key, stamp), value) in missing.into_iter().zip(loaded) {
            let Some(key) = key else {
                out[i] = value;
                continue;
            };
            out[i] = value.clone();
            let entry = Arc::new(Entry {
                stamp,
                value: value.into_cached(),
            });
            shared.cache.insert(key, entry).await;
        }
        Ok(out)
    }

    // Pure pass-through: listings are not cached.
    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        self.inner.list_sessions(query).await
    }
}

#[async_trait]
impl<B: StorageBackend> ConversationStorage for Cached<B> {
    async fn add_conversation_message(
        &self,
        session_id: &str,
        message: &NewMessage,
    ) -> Result<String> {
        let w = self
            .shared
            .write([session_id], vec![Key::Session(session_id.to_owned())]);
        w.finish(
            self.inner
                .add_conversation_message(session_id, message)
                .await,
        )
        .await
    }

    async fn batch_add_conversation_messages(
        &self,
        messages: &[(String, NewMessage)],
    ) -> Result<Vec<Result<String>>> {
        let mut ids: Vec<&str> = messages.iter().map(|(s, _)| s.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let keys = ids.iter().map(|s| Key::Session((*s).to_owned())).collect();
        let w = self.shared.write(ids, keys);
        w.finish(self.inner.batch_add_conversation_messages(messages).await)
            .await
    }

    // Pure pass-through: messages are not cached, and these leave the cached session alone.
    async fn get_conversation_history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.inner.get_conversation_history(session_id, limit).await
    }

    async fn restore_messages(&self, session_id: &str, messages: &[Message]) -> Result<u64> {
        // Restoring leaves the session record alone; nothing cached changes.
        self.inner.restore_messages(session_id, messages).await
    }

    async fn get_conversation_range(
        &self,
        session_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.inner
            .get_conversation_range(session_id, offset, limit)
            .await
    }
}

#[async_trait]
impl<B: StorageBackend> CheckpointStorage for Cached<B> {
    async fn store_checkpoint(&self, checkpoint: &NewCheckpoint) -> Result<()> {
        let (thread, ns) = (&checkpoint.thread_id, &checkpoint.checkpoint_ns);
        let keys = vec![
            Key::checkpoint(thread, ns, Some(&checkpoint.checkpoint_id)),
            Key::checkpoint(thread, ns, None),
        ];
        let w = self.shared.write([thread.as_str()], keys);
        w.finish(self.inner.store_checkpoint(checkpoint).await)
            .await
    }

    async fn restore_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<()> {
        let keys = checkpoints
            .iter()
            .flat_map(|c| {
                [
                    Key::checkpoint(&c.thread_id, &c.checkpoint_ns, Some(&c.checkpoint_id)),
                    Key::checkpoint(&c.thread_id, &c.checkpoint_ns, None),
                ]
            })
            .collect();
        let w = self
            .shared
            .write(checkpoints.iter().map(|c| c.thread_id.as_str()), keys);
        w.finish(self.inner.restore_checkpoints(checkpoints).await)
            .await
    }

    async fn get_checkpoint(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: Option<&str>,
    ) -> Result<Option<Checkpoint>> {
        self.follow();
        self.shared
            .read(
                Key::checkpoint(thread_id, checkpoint_ns, checkpoint_id),
                || {
                    self.inner
                        .get_checkpoint(thread_id, checkpoint_ns, checkpoint_id)
                },
            )
            .await
    }

    async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        // Every checkpoint entry of the thread, in any namespace, shares the thread's
        // stripe: bumping it outdates them all without enumerating them.
        let w = self.shared.write([thread_id], Vec::new());
        w.finish(self.inner.delete_thread(thread_id).await).await
    }

    // Pure pass-through: only single checkpoints are cached, not listings or pending writes.
    async fn list_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        filter: &CheckpointFilter,
    ) -> Result<Vec<Checkpoint>> {
        self.inner
            .list_checkpoints(thread_id, checkpoint_ns, filter)
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
        self.inner
            .put_writes(thread_id, checkpoint_ns, checkpoint_id, task_id, writes)
            .await
    }

    async fn batch_put_writes(&self, items: &[TaskWrites]) -> Result<Vec<Result<()>>> {
        self.inner.batch_put_writes(items).await
    }

    async fn get_writes(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
    ) -> Result<Vec<PendingWrite>> {
        self.inner
            .get_writes(thread_id, checkpoint_ns, checkpoint_id)
            .await
    }

    async fn list_threads(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.inner.list_threads(after, limit).await
    }

    async fn list_checkpoint_namespaces(&self, thread_id: &str) -> Result<Vec<String>> {
        self.inner.list_checkpoint_namespaces(thread_id).await
    }

    async fn list_write_checkpoints(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
    ) -> Result<Vec<String>> {
        self.inner
            .list_write_checkpoints(thread_id, checkpoint_ns)
            .await
    }
}

#[async_trait]
impl<B: StorageBackend> TaskContextStorage for Cached<B> {
    async fn get_task_context(&self, session_id: &str) -> Result<Option<Value>> {
        self.follow();
        self.shared
            .read(Key::Context(session_id.to_owned()), || {
                self.inner.get_task_context(session_id)
            })
            .await
    }

    async fn store_task_context(&self, session_id: &str, context: &Value) -> Result<()> {
        let w = self
            .shared
            .write([session_id], vec![Key::Context(session_id.to_owned())]);
        w.finish(self.inner.store_task_context(session_id, context).await)
            .await
    }

    // Pure pass-through: listings are not cached.
    async fn list_task_contexts(&self, after: Option<&str>, limit: usize) -> Result<IdPage> {
        self.inner.list_task_contexts(after, limit).await
    }
}

#[async_trait]
impl<B: StorageBackend> StorageBackend for Cached<B> {
    async fn initialize(&self) -> Result<()> {
        self.follow();
        // A schema migration may rewrite records.
        let w = self.shared.write_all();
        w.finish(self.inner.initialize().await).await
    }

    async fn close(&self) -> Result<()> {
        let w = self.shared.write_all();
        w.finish(self.inner.close().await).await
    }

    async fn health_check(&self) -> Result<HealthReport> {
        self.follow();
        let started = Instant::now();
        self.settle_feed().await;
        let inner = self.inner.health_check().await?;
        let s = self.shared.stats();
        let mut details = Metadata::new();
        details.insert("entries".into(), json!(s.entries));
        details.insert("weighted_size".into(), json!(s.weighted_size));
        details.insert("hit_rate".into(), json!(s.hit_rate()));
        details.insert("hits".into(), json!(s.hits));
        details.insert("misses".into(), json!(s.misses));
        details.insert("evictions".into(), json!(s.evictions));
        details.insert("feed".into(), json!(self.shared.feed_name()));
        details.insert(
            "remote_changes".into(),
            json!(self.shared.counters.remote_changes.get()),
        );
        // A cache whose feed is down serves every read from the store: correct, slower.
        let status = if self.shared.feed_is_down() && inner.status == HealthStatus::Healthy {
            HealthStatus::Degraded
        } else {
            inner.status
        };
        Ok(HealthReport {
            component: "cache".to_owned(),
            status,
            latency: started.elapsed(),
            checked_at: now(),
            details,
            components: vec![inner],
        })
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        self.follow();
        let inner = self.inner.get_metrics().await?;
        Ok(MetricsReport {
            component: "cache".to_owned(),
            values: self.shared.figures(),
            components: vec![inner],
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        // Any session or context may be gone: outdate everything.
        let w = self.shared.write_all();
        w.finish(self.inner.cleanup_expired_sessions(max_idle).await)
            .await
    }

    // Pure pass-through: the store's identity is the inner backend's.
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn store_id(&self) -> Option<String> {
        self.inner.store_id()
    }

    fn changes(&self) -> Option<crate::feed::ChangeFeed> {
        self.inner.changes()
    }
}
