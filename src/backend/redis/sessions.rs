//! Sessions on Redis.

use async_trait::async_trait;
use redis::{Cmd, Value as RedisValue};

use super::connection::evalsha;
use super::decode::{from_value, metadata_args};
use super::{RedisBackend, INDEX_GRANULARITY_MICROS};
use crate::error::Result;
use crate::model::{now, Metadata, NewSession, Session, SessionPage, SessionQuery, SessionUpdate};
use crate::storage::SessionStorage;
use crate::validate;

use super::keys::{Index, SessionKeys};
use super::scripts::{self};

#[async_trait]
impl SessionStorage for RedisBackend {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        validate::create_session(session_id, user_id, metadata)?;
        let time = now();
        let at = time.timestamp_micros();
        let item = (
            self.index_cmd(session_id, at),
            self.create_cmd(session_id, user_id, metadata, at)?,
        );
        let reply = self.write_indexed(vec![item], is_new_session).await?;
        let reply = reply.into_iter().next().transpose()?;
        self.created(session_id, user_id, metadata, time, reply.as_ref())
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        let keys = self.session_keys(session_id);
        // The keys first, then the index entries, then a second look: a create from
        // another process between the two (its keys written after ours went, its entry
        // before ours went) would otherwise be left live and unindexed, hidden from
        // listing, export, migration and cleanup. If the look finds nothing, such a
        // create wrote its keys anew after ours went, and indexes again after its
        // write (see `write_indexed`).
        let (index, ids) = (
            Index::Sessions.key_of(&self.prefix, session_id),
            Index::SessionIds.key_of(&self.prefix, session_id),
        );
        let mut unindex = evalsha(&scripts::UNINDEX_SESSION, &[&index, &ids]);
        unindex.arg(session_id);
        let mut updated = redis::cmd("HGET");
        updated.arg(&keys.session).arg("updated_at");
        let mut context = redis::cmd("EXISTS");
        context.arg(&keys.context);
        let stages = [
            vec![evalsha(&scripts::DELETE_SESSION, &keys.all())],
            vec![
                unindex,
                self.id_index_cmd("ZREM", Index::Contexts, session_id),
            ],
            vec![updated, context],
        ];
        let replies = self.in_order(&stages).await?;
        let existed: i64 = from_value(replies[0][0].clone())?;
        let mut again = Vec::new();
        if let Some(updated) = from_value::<Option<i64>>(replies[2][0].clone())? {
            again.push(self.index_cmd(session_id, updated));
        }
        if from_value::<i64>(replies[2][1].clone())? == 1 {
            again.push(self.id_index_cmd("ZADD", Index::Contexts, session_id));
        }
        self.many(&again).await?;
        Ok(existed == 1)
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        validate::restored_sessions(sessions)?;
        let mut items = Vec::with_capacity(sessions.len());
        for s in sessions {
            let keys = self.session_keys(&s.session_id);
            let mut c = evalsha(&scripts::RESTORE_SESSION, &keys.all());
            c.arg(&s.user_id)
                .arg(s.created_at.timestamp_micros())
                .arg(s.updated_at.timestamp_micros())
                .arg(&s.status)
                .arg(s.metrics.request_count)
                .arg(s.metrics.total_processing_time.to_string())
                .arg(s.metrics.error_count)
                .arg(Self::ttl_ms(self.session_ttl));
            metadata_args(&mut c, &s.metadata)?;
            // The exact score, not GT: a restored session may be older than a stale entry.
            let index =
                self.index_session_cmd(&s.session_id, s.updated_at.timestamp_micros(), true);
            items.push((index, c));
        }
        // A restore replaces what was there: index again after each, as after a create.
        for reply in self.write_indexed(items, |_| true).await? {
            reply?;
        }
        Ok(())
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        validate::id("session_id", session_id)?;
        let mut c = redis::cmd("HGETALL");
        c.arg(SessionKeys::session_key(&self.prefix, session_id));
        let reply: RedisValue = self.run_tracked(&c).await?;
        self.session_from_hash(session_id, &reply)
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        validate::session_update(session_id, update)?;
        let at = now().timestamp_micros();
        let keys = self.session_keys(session_id);
        let mut c = evalsha(&scripts::UPDATE_SESSION, &keys.all());
        c.arg(update.add_requests)
            .arg(if update.add_processing_time == 0.0 {
                "0".to_owned()
            } else {
                update.add_processing_time.to_string()
            })
            .arg(update.add_errors)
            .arg(update.status.as_deref().unwrap_or(""))
            .arg(at)
            .arg(Self::ttl_ms(self.session_ttl))
            .arg(INDEX_GRANULARITY_MICROS);
        metadata_args(&mut c, &update.metadata)?;
        // Only additions can apply twice; a status or metadata update is idempotent.
        let counts =
            update.add_requests != 0 || update.add_errors != 0 || update.add_processing_time != 0.0;
        self.touch_session(session_id, &c, at, counts).await
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        validate::status(status)?;
        self.update_session(session_id, &SessionUpdate::new().status(status))
            .await
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        validate::new_sessions(sessions)?;
        let time = now();
        let at = time.timestamp_micros();
        let mut items = Vec::with_capacity(sessions.len());
        for s in sessions {
            items.push((
                self.index_cmd(&s.session_id, at),
                self.create_cmd(&s.session_id, &s.user_id, &s.metadata, at)?,
            ));
        }
        let replies = self.write_indexed(items, is_new_session).await?;
        sessions
            .iter()
            .zip(replies)
            .map(|(s, reply)| {
                self.created(&s.session_id, &s.user_id, &s.metadata, time, Some(&reply?))
            })
            .collect()
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        validate::session_ids(session_ids)?;
        let cmds: Vec<Cmd> = session_ids
            .iter()
            .map(|id| {
                let mut c = redis::cmd("HGETALL");
                c.arg(SessionKeys::session_key(&self.prefix, id));
                c
            })
            .collect();
        let replies = self.many_tracked(&cmds).await?;
        session_ids
            .iter()
            .zip(replies)
            .map(|(id, reply)| self.session_from_hash(id, &reply))
            .collect()
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        validate::session_query(query)?;
        // The id index, read from the cursor on; sessions that expired or no longer
        // match are skipped and more ids read, until one match past the page says
        // another page follows.
        let filtered = query.user_id.is_some() || query.status.is_some();
        let mut sessions = Vec::with_capacity(query.limit);
        let mut cursor = query.after.clone();
        let mut more = false;
        loop {
            let wanted = query.limit + 1 - sessions.len();
            // A filter may pass few: read in larger steps then.
            let step = if filtered { wanted.max(256) } else { wanted };
            let (ids, done) = self
                .index_page(Index::SessionIds, cursor.as_deref(), step)
                .await?;
            cursor = ids.last().cloned().or(cursor);
            for chunk in ids.chunks(256) {
                for s in self.batch_get_sessions(chunk).await?.into_iter().flatten() {
                    if !query.matches(&s) {
                        continue;
                    }
                    if sessions.len() == query.limit {
                        more = true;
                        break;
                    }
                    sessions.push(s);
                }
                if more {
                    break;
                }
            }
            if more || done {
                break;
            }
        }
        let next_cursor = more
            .then(|| sessions.last().map(|s| s.session_id.clone()))
            .flatten();
        Ok(SessionPage {
            sessions,
            next_cursor,
        })
    }
}

/// Whether `CREATE_SESSION` made the session anew (it answers 0; an upsert answers the
/// hash).
fn is_new_session(reply: &RedisValue) -> bool {
    matches!(reply, RedisValue::Int(0))
}
