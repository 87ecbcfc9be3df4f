//! Opening, health, metrics and cleanup of the Redis backend.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Cmd;
use serde_json::json;

use super::connection::evalsha;
use super::decode::from_value;
use super::{feed, RedisBackend, Target, CLEANUP_PAGE};
use crate::error::Result;
use crate::feed::ChangeFeed;
use crate::model::{HealthReport, Metadata, MetricsReport};
use crate::storage::StorageBackend;
use crate::validate;

use super::keys::{self, Index, ThreadKeys};
use super::scripts::{self};

#[async_trait]
impl StorageBackend for RedisBackend {
    fn kind(&self) -> &'static str {
        if self.is_cluster() {
            "redis_cluster"
        } else {
            "redis"
        }
    }

    fn store_id(&self) -> Option<String> {
        let address = |url: &str| {
            let client = redis::Client::open(url).ok()?;
            let info = client.get_connection_info();
            Some((info.addr().to_string(), info.redis_settings().db()))
        };
        match &self.target {
            Target::Node(url) => {
                let (addr, db) = address(url)?;
                Some(format!("redis:{addr}/{db}/{}", self.prefix))
            }
            // Any seed reaches the same cluster only if the seed lists match; a cluster
            // named by two different seed lists is taken for two stores.
            Target::Cluster(nodes) => {
                let mut addrs = nodes
                    .iter()
                    .map(|n| address(n).map(|(addr, _)| addr))
                    .collect::<Option<Vec<_>>>()?;
                addrs.sort();
                addrs.dedup();
                Some(format!("redis_cluster:{}/{}", addrs.join(","), self.prefix))
            }
        }
    }

    fn changes(&self) -> Option<ChangeFeed> {
        Some(self.feed.subscribe(|| feed::Source {
            urls: match &self.target {
                Target::Node(url) => vec![url.clone()],
                Target::Cluster(nodes) => nodes.clone(),
            },
            cluster: self.is_cluster(),
            root_certificate: self.root_certificate.clone(),
            prefix: self.prefix.clone(),
            redacted: self.redacted.clone(),
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
        }))
    }

    async fn initialize(&self) -> Result<()> {
        self.conn().await.map(|_| ())
    }

    async fn close(&self) -> Result<()> {
        // The multiplexed connections close when the last clone is dropped; refusing new
        // calls is what close() must guarantee.
        self.closed.store(true, Ordering::Release);
        self.feed.close();
        Ok(())
    }

    async fn health_check(&self) -> Result<HealthReport> {
        let started = Instant::now();
        let pong: String = self.run(&redis::cmd("PING")).await?;
        let latency = started.elapsed();
        let mut details = Metadata::new();
        details.insert("url".into(), json!(self.redacted));
        details.insert("prefix".into(), json!(self.prefix));
        details.insert("cluster".into(), json!(self.is_cluster()));
        details.insert("ping".into(), json!(pong));
        details.insert(
            "session_ttl_seconds".into(),
            json!(self.session_ttl.map(|t| t.as_secs())),
        );
        details.insert("feed".into(), json!(self.feed.state_name()));
        Ok(HealthReport::healthy(self.kind(), latency, details))
    }

    async fn get_metrics(&self) -> Result<MetricsReport> {
        // Counted through the indexes (one pipelined command per record holder), so a
        // session or context that expired by TTL is not counted.
        let sessions = self.index_members(Index::Sessions).await?;
        let mut cmds = Vec::with_capacity(sessions.len() * 2);
        for id in &sessions {
            let keys = self.session_keys(id);
            cmds.push(redis::cmd("EXISTS").arg(&keys.session).clone());
            cmds.push(redis::cmd("LLEN").arg(&keys.messages).clone());
        }
        let (mut live, mut messages) = (0i64, 0i64);
        for pair in self.many(&cmds).await?.chunks(2) {
            if from_value::<i64>(pair[0].clone())? == 1 {
                live += 1;
                messages += from_value::<i64>(pair[1].clone())?;
            }
        }
        let contexts: Vec<Cmd> = self
            .index_members(Index::Contexts)
            .await?
            .iter()
            .map(|id| {
                redis::cmd("EXISTS")
                    .arg(self.session_keys(id).context)
                    .clone()
            })
            .collect();
        let mut task_contexts = 0i64;
        for reply in self.many(&contexts).await? {
            task_contexts += from_value::<i64>(reply)?;
        }
        let threads: Vec<Cmd> = self
            .index_members(Index::Threads)
            .await?
            .iter()
            .map(|id| {
                evalsha(
                    &scripts::COUNT_THREAD,
                    &[&ThreadKeys::new(&self.prefix, id, "").registry()],
                )
            })
            .collect();
        let (mut checkpoints, mut writes) = (0i64, 0i64);
        for reply in self.many(&threads).await? {
            let (c, w): (i64, i64) = from_value(reply)?;
            checkpoints += c;
            writes += w;
        }
        let mut values = Metadata::new();
        values.insert("sessions".into(), json!(live));
        values.insert("messages".into(), json!(messages));
        values.insert("checkpoints".into(), json!(checkpoints));
        values.insert("pending_writes".into(), json!(writes));
        values.insert("task_contexts".into(), json!(task_contexts));
        Ok(MetricsReport {
            component: self.kind().to_owned(),
            values,
            components: Vec::new(),
        })
    }

    async fn cleanup_expired_sessions(&self, max_idle: Duration) -> Result<u64> {
        let cutoff = validate::idle_cutoff(max_idle)?.timestamp_micros();
        let mut removed = 0u64;
        for n in 0..keys::INDEX_BUCKETS {
            let index = Index::Sessions.bucket(&self.prefix, n);
            let ids = Index::SessionIds.bucket(&self.prefix, n);
            loop {
                let mut c = redis::cmd("ZRANGEBYSCORE");
                c.arg(&index)
                    .arg("-inf")
                    .arg(format!("({cutoff}"))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(CLEANUP_PAGE);
                let candidates: Vec<String> = self.run(&c).await?;
                if candidates.is_empty() {
                    break;
                }
                let cmds: Vec<Cmd> = candidates
                    .iter()
                    .map(|id| {
                        let keys = self.session_keys(id);
                        let mut c = evalsha(&scripts::CLEANUP_SESSION, &keys.all());
                        c.arg(cutoff);
                        c
                    })
                    .collect();
                let outcomes = self.many(&cmds).await?;
                let mut fix = evalsha(&scripts::FIX_INDEX, &[&index, &ids]);
                fix.arg(cutoff);
                let (mut gone, mut look) = (Vec::new(), Vec::new());
                let mut gone_ids = Vec::new();
                for (id, outcome) in candidates.iter().zip(outcomes) {
                    let updated = from_value::<i64>(outcome)?;
                    if updated == 0 {
                        removed += 1;
                    }
                    if updated <= 0 {
                        gone.push(self.id_index_cmd("ZREM", Index::Contexts, id));
                        look.push(
                            redis::cmd("EXISTS")
                                .arg(self.session_keys(id).context)
                                .clone(),
                        );
                        gone_ids.push(id);
                    }
                    fix.arg(id).arg(updated.max(0));
                }
                gone.push(fix);
                // A task context stored since its session went is indexed again, as
                // `delete_session` does.
                let replies = self.in_order(&[gone, look]).await?;
                let mut again = Vec::new();
                for (id, exists) in gone_ids.into_iter().zip(&replies[1]) {
                    if from_value::<i64>(exists.clone())? == 1 {
                        again.push(self.id_index_cmd("ZADD", Index::Contexts, id));
                    }
                }
                self.many(&again).await?;
            }
        }
        Ok(removed)
    }
}
