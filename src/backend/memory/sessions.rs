//! Sessions in memory.

use std::collections::HashSet;

use async_trait::async_trait;

use super::{MemoryBackend, SessionEntry};
use crate::error::Result;
use crate::model::{now, Metadata, NewSession, Session, SessionPage, SessionQuery, SessionUpdate};
use crate::storage::SessionStorage;
use crate::validate;

#[async_trait]
impl SessionStorage for MemoryBackend {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        self.check_open()?;
        validate::create_session(session_id, user_id, metadata)?;
        Ok(self.upsert(session_id, user_id, metadata))
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        Ok(self.sessions.get(session_id).map(|e| e.session.clone()))
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        self.check_open()?;
        validate::session_update(session_id, update)?;
        let Some(mut entry) = self.sessions.get_mut(session_id) else {
            return Ok(false);
        };
        let s = &mut entry.session;
        s.metadata
            .extend(update.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(status) = &update.status {
            s.status = status.clone();
        }
        // Counters saturate (see `SessionUpdate`), as on every backend.
        let (m, max) = (&mut s.metrics, i64::MAX as u64);
        m.request_count = m.request_count.saturating_add(update.add_requests).min(max);
        m.total_processing_time =
            (m.total_processing_time + update.add_processing_time).min(f64::MAX);
        m.error_count = m.error_count.saturating_add(update.add_errors).min(max);
        s.updated_at = now();
        Ok(true)
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        validate::status(status)?;
        let Some(mut entry) = self.sessions.get_mut(session_id) else {
            return Ok(false);
        };
        entry.session.status = status.to_owned();
        entry.session.updated_at = now();
        Ok(true)
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        self.check_open()?;
        validate::new_sessions(sessions)?;
        Ok(sessions
            .iter()
            .map(|s| self.upsert(&s.session_id, &s.user_id, &s.metadata))
            .collect())
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        self.check_open()?;
        validate::session_ids(session_ids)?;
        Ok(session_ids
            .iter()
            .map(|id| self.sessions.get(id).map(|e| e.session.clone()))
            .collect())
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        self.check_open()?;
        validate::id("session_id", session_id)?;
        // The context goes while the session's entry is locked (present or not), so a
        // re-create of the session and a new context can never land between the two.
        let entry = self.sessions.entry(session_id.to_owned());
        self.task_contexts.remove(session_id);
        Ok(match entry {
            dashmap::Entry::Occupied(e) => {
                e.remove();
                true
            }
            dashmap::Entry::Vacant(_) => false,
        })
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        self.check_open()?;
        validate::restored_sessions(sessions)?;
        for s in sessions {
            self.sessions
                .entry(s.session_id.clone())
                .and_modify(|e| e.session = s.clone())
                .or_insert_with(|| SessionEntry {
                    session: s.clone(),
                    messages: Vec::new(),
                    message_ids: HashSet::new(),
                });
        }
        Ok(())
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        self.check_open()?;
        validate::session_query(query)?;
        let mut matching: Vec<Session> = self
            .sessions
            .iter()
            .filter(|e| query.after.as_deref().is_none_or(|a| e.key().as_str() > a))
            .filter(|e| query.matches(&e.session))
            .map(|e| e.session.clone())
            .collect();
        matching.sort_unstable_by(|a, b| a.session_id.cmp(&b.session_id));
        let more = matching.len() > query.limit;
        matching.truncate(query.limit);
        let next_cursor = more
            .then(|| matching.last().map(|s| s.session_id.clone()))
            .flatten();
        Ok(SessionPage {
            sessions: matching,
            next_cursor,
        })
    }
}
