//! The commands that write records and keep their indexes: keys, index entries,
//! checkpoints, pending writes, sessions and messages.

use chrono::{DateTime, Utc};
use redis::{Cmd, Value as RedisValue};

use super::connection::evalsha;
use super::decode::{from_value, metadata_args, CheckpointRecord, StoredMessage, StoredWrite};
use super::{RedisBackend, INDEX_GRANULARITY_MICROS};
use crate::error::{Result, StorageError};
use crate::model::{
    IdPage, Metadata, NewMessage, Session, SessionMetrics, SessionStatus, WriteInput,
};

use super::keys::{self, Index, SessionKeys, ThreadKeys};
use super::scripts::{self};

impl RedisBackend {
    pub(super) fn session_keys(&self, session_id: &str) -> SessionKeys {
        SessionKeys::new(&self.prefix, session_id)
    }

    /// Indexes a session at `score`, only moving its score forward unless `exact`.
    pub(super) fn index_cmd(&self, session_id: &str, score: i64) -> Cmd {
        self.index_session_cmd(session_id, score, false)
    }

    pub(super) fn index_session_cmd(&self, session_id: &str, score: i64, exact: bool) -> Cmd {
        let mut c = evalsha(
            &scripts::INDEX_SESSION,
            &[
                &Index::Sessions.key_of(&self.prefix, session_id),
                &Index::SessionIds.key_of(&self.prefix, session_id),
            ],
        );
        c.arg(score)
            .arg(session_id)
            .arg(if exact { "exact" } else { "GT" });
        c
    }

    /// Adds `id` to (`ZADD`) or removes it from (`ZREM`) an index read by id.
    pub(super) fn id_index_cmd(&self, op: &str, index: Index, id: &str) -> Cmd {
        let mut c = redis::cmd(op);
        c.arg(index.key_of(&self.prefix, id));
        if op == "ZADD" {
            c.arg(0);
        }
        c.arg(id);
        c
    }

    pub(super) fn thread_index_cmd(&self, op: &str, thread_id: &str) -> Cmd {
        self.id_index_cmd(op, Index::Threads, thread_id)
    }

    /// Every id in every bucket of `index`.
    pub(super) async fn index_members(&self, index: Index) -> Result<Vec<String>> {
        let cmds: Vec<Cmd> = index
            .buckets(&self.prefix)
            .map(|key| redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).clone())
            .collect();
        let mut ids = Vec::new();
        for reply in self.many(&cmds).await? {
            ids.extend(from_value::<Vec<String>>(reply)?);
        }
        Ok(ids)
    }

    pub(super) fn checkpoint_cmd(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        record: &CheckpointRecord,
        created_at: i64,
        restore: bool,
    ) -> Result<Cmd> {
        let keys = ThreadKeys::new(&self.prefix, thread_id, checkpoint_ns);
        let mut c = evalsha(
            &scripts::STORE_CHECKPOINT,
            &[
                &keys.seq(),
                &keys.order(),
                &keys.checkpoints(),
                &keys.registry(),
            ],
        );
        c.arg(checkpoint_id)
            .arg(serde_json::to_string(record)?)
            .arg(created_at)
            .arg(Self::ttl_ms(self.checkpoint_ttl))
            .arg(if restore { "1" } else { "0" });
        Ok(c)
    }

    pub(super) fn put_writes_cmd(
        &self,
        thread_id: &str,
        checkpoint_ns: &str,
        checkpoint_id: &str,
        task_id: &str,
        writes: &[WriteInput],
    ) -> Result<Cmd> {
        let keys = ThreadKeys::new(&self.prefix, thread_id, checkpoint_ns);
        let (order, values) = keys.writes(checkpoint_id);
        let mut c = evalsha(
            &scripts::PUT_WRITES,
            &[&keys.seq(), &order, &values, &keys.registry()],
        );
        c.arg(Self::ttl_ms(self.checkpoint_ttl));
        for (idx, w) in (0u32..).zip(writes) {
            // Task ids hold no control characters (validated), so '\n' cannot be forged.
            c.arg(format!("{task_id}\n{idx}"))
                .arg(serde_json::to_string(&StoredWrite {
                    task_id: task_id.to_owned(),
                    idx,
                    channel: w.channel.clone(),
                    value: w.value.clone(),
                })?);
        }
        Ok(c)
    }

    /// The next ids of an id-read `index` after `after`, in byte order: at most `n`,
    /// and `true` when none remains after them.
    ///
    /// Each bucket is asked for a few ids from the cursor on (`ZRANGE BYLEX` with
    /// `LIMIT`: O(log n + page) in a bucket, where reading whole buckets made a walk of
    /// every page quadratic in the store's size). Ids are taken only up to the smallest
    /// last id of the buckets that had more to give: below it every bucket has answered
    /// in full, so no id is skipped, and the bucket holding it makes the page non-empty.
    pub(super) async fn index_page(
        &self,
        index: Index,
        after: Option<&str>,
        n: usize,
    ) -> Result<(Vec<String>, bool)> {
        // Twice a bucket's share and some: a bucket seldom runs out before the page is
        // filled, and a short one only costs another round trip.
        let per = n.div_ceil(keys::INDEX_BUCKETS as usize) * 2 + 8;
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let cmds: Vec<Cmd> = index
            .buckets(&self.prefix)
            .map(|key| {
                let mut c = redis::cmd("ZRANGE");
                c.arg(key)
                    .arg(&start)
                    .arg("+")
                    .arg("BYLEX")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(per);
                c
            })
            .collect();
        let mut buckets = Vec::with_capacity(cmds.len());
        for reply in self.many(&cmds).await? {
            buckets.push(from_value::<Vec<String>>(reply)?);
        }
        let frontier = buckets
            .iter()
            .filter(|ids| ids.len() == per)
            .filter_map(|ids| ids.last())
            .min()
            .cloned();
        let mut ids: Vec<String> = buckets
            .into_iter()
            .flatten()
            .filter(|id| frontier.as_ref().is_none_or(|f| id <= f))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let done = frontier.is_none() && ids.len() <= n;
        ids.truncate(n);
        Ok((ids, done))
    }

    /// A page of the ids of an id-read `index` after the cursor whose `key_of(id)` still
    /// exists (an index entry can outlive its data when a TTL expires it).
    pub(super) async fn live_members(
        &self,
        index: Index,
        after: Option<&str>,
        limit: usize,
        key_of: impl Fn(&str) -> String,
    ) -> Result<IdPage> {
        // One more than the page, to know whether another page follows.
        let mut live = Vec::with_capacity(limit + 1);
        let mut cursor = after.map(str::to_owned);
        loop {
            let (ids, done) = self
                .index_page(index, cursor.as_deref(), limit + 1 - live.len())
                .await?;
            let checks: Vec<Cmd> = ids
                .iter()
                .map(|id| redis::cmd("EXISTS").arg(key_of(id)).clone())
                .collect();
            let replies = self.many(&checks).await?;
            cursor = ids.last().cloned().or(cursor);
            for (id, exists) in ids.into_iter().zip(replies) {
                if from_value::<i64>(exists)? == 1 {
                    live.push(id);
                }
            }
            if done || live.len() > limit {
                return Ok(IdPage::from_sorted(live, limit));
            }
        }
    }

    pub(super) fn create_cmd(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
        at: i64,
    ) -> Result<Cmd> {
        let keys = self.session_keys(session_id);
        let mut c = evalsha(&scripts::CREATE_SESSION, &keys.all());
        c.arg(user_id).arg(at).arg(Self::ttl_ms(self.session_ttl));
        metadata_args(&mut c, metadata)?;
        Ok(c)
    }

    pub(super) fn add_message_cmd(
        &self,
        session_id: &str,
        message: &NewMessage,
        at: DateTime<Utc>,
    ) -> Result<(String, Cmd)> {
        let message_id = message.id_or_generate();
        let stored = StoredMessage {
            message_id: &message_id,
            role: &message.role,
            content: &message.content,
            timestamp: at,
            metadata: &message.metadata,
        };
        let keys = self.session_keys(session_id);
        let mut c = evalsha(&scripts::ADD_MESSAGE, &keys.all());
        c.arg(&message_id)
            .arg(serde_json::to_string(&stored)?)
            .arg(at.timestamp_micros())
            .arg(Self::ttl_ms(self.session_ttl))
            .arg(INDEX_GRANULARITY_MICROS);
        Ok((message_id, c))
    }

    /// Runs a session-touching script (at most once if `once`, see [`Self::run_once`])
    /// and refreshes the cleanup index when it asks. Returns `false` when the session is
    /// missing.
    pub(super) async fn touch_session(
        &self,
        session_id: &str,
        cmd: &Cmd,
        at: i64,
        once: bool,
    ) -> Result<bool> {
        let reply = if once {
            self.run_once::<i64>(cmd).await?
        } else {
            self.run::<i64>(cmd).await?
        };
        match reply {
            -1 => Ok(false),
            1 => {
                self.run::<RedisValue>(&self.index_cmd(session_id, at))
                    .await?;
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// The session a create script returned (its stored hash).
    pub(super) fn created(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
        at: DateTime<Utc>,
        reply: Option<&RedisValue>,
    ) -> Result<Session> {
        if let Some(RedisValue::Int(0)) = reply {
            return Ok(Session {
                session_id: session_id.to_owned(),
                user_id: user_id.to_owned(),
                created_at: at,
                updated_at: at,
                status: SessionStatus::ACTIVE.to_owned(),
                metadata: metadata.clone(),
                metrics: SessionMetrics::default(),
            });
        }
        self.session_from_hash(session_id, reply.unwrap_or(&RedisValue::Nil))?
            .ok_or_else(|| StorageError::Serialization {
                message: format!("redis returned no hash for created session `{session_id}`"),
                source: None,
            })
    }
}
