//! Sessions on PostgreSQL.

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::Value;
use tokio_postgres::types::{Json, ToSql};

use super::rows::session_from_row;
use super::PostgresBackend;
use crate::error::{Result, StorageError};
use crate::model::{now, Metadata, NewSession, Session, SessionPage, SessionQuery, SessionUpdate};
use crate::storage::SessionStorage;
use crate::validate;

#[async_trait]
impl SessionStorage for PostgresBackend {
    async fn create_session(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &Metadata,
    ) -> Result<Session> {
        validate::create_session(session_id, user_id, metadata)?;
        let c = self.conn().await?;
        let row = c
            .query_one(
                &c.sql.create_session,
                &[&session_id, &user_id, &now(), &Json(metadata)],
            )
            .await?;
        session_from_row(&row)
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        validate::id("session_id", session_id)?;
        let c = self.conn().await?;
        c.query_opt(&c.sql.get_session, &[&session_id])
            .await?
            .as_ref()
            .map(session_from_row)
            .transpose()
    }

    async fn update_session(&self, session_id: &str, update: &SessionUpdate) -> Result<bool> {
        validate::session_update(session_id, update)?;
        let c = self.conn().await?;
        // Validation keeps both counters within i64.
        let (requests, errors) = (update.add_requests as i64, update.add_errors as i64);
        let changed = c
            .execute(
                &c.sql.update_session,
                &[
                    &session_id,
                    &requests,
                    &update.add_processing_time,
                    &errors,
                    &update.status,
                    &Json(&update.metadata),
                    &now(),
                ],
            )
            .await?;
        Ok(changed > 0)
    }

    async fn end_session(&self, session_id: &str, status: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        validate::status(status)?;
        let c = self.conn().await?;
        let changed = c
            .execute(&c.sql.end_session, &[&session_id, &status, &now()])
            .await?;
        Ok(changed > 0)
    }

    async fn batch_create_sessions(&self, sessions: &[NewSession]) -> Result<Vec<Session>> {
        validate::new_sessions(sessions)?;
        if sessions.is_empty() {
            self.state().await?;
            return Ok(Vec::new());
        }
        // One row per id (its last occurrence): one INSERT cannot upsert a row twice.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(sessions.len());
        for (i, s) in sessions.iter().enumerate() {
            last.insert(&s.session_id, i);
        }
        let rows: Vec<&NewSession> = sessions
            .iter()
            .enumerate()
            .filter(|(i, s)| last[s.session_id.as_str()] == *i)
            .map(|(_, s)| s)
            .collect();
        let ids: Vec<&str> = rows.iter().map(|s| s.session_id.as_str()).collect();
        let users: Vec<&str> = rows.iter().map(|s| s.user_id.as_str()).collect();
        let metadata: Vec<Json<&Metadata>> = rows.iter().map(|s| Json(&s.metadata)).collect();
        let c = self.conn().await?;
        let stored = c
            .query(
                &c.sql.batch_create_sessions,
                &[&ids, &users, &now(), &metadata],
            )
            .await?;
        let mut by_id = HashMap::with_capacity(stored.len());
        for row in &stored {
            let s = session_from_row(row)?;
            by_id.insert(s.session_id.clone(), s);
        }
        // An id given twice: each item returns the session as its own upsert left it,
        // as if the items had been stored one after another (same timestamp).
        sessions
            .iter()
            .map(|item| {
                let mut s =
                    by_id
                        .get(&item.session_id)
                        .cloned()
                        .ok_or_else(|| StorageError::Backend {
                            message: "postgres batch upsert returned too few rows".into(),
                            transient: false,
                            source: None,
                        })?;
                s.user_id.clone_from(&item.user_id);
                s.metadata.clone_from(&item.metadata);
                Ok(s)
            })
            .collect()
    }

    async fn batch_get_sessions(&self, session_ids: &[String]) -> Result<Vec<Option<Session>>> {
        validate::session_ids(session_ids)?;
        if session_ids.is_empty() {
            self.state().await?;
            return Ok(Vec::new());
        }
        let c = self.conn().await?;
        let rows = c.query(&c.sql.batch_get_sessions, &[&session_ids]).await?;
        let mut by_id = HashMap::with_capacity(rows.len());
        for row in &rows {
            let s = session_from_row(row)?;
            by_id.insert(s.session_id.clone(), s);
        }
        Ok(session_ids
            .iter()
            .map(|id| by_id.get(id).cloned())
            .collect())
    }

    async fn delete_session(&self, session_id: &str) -> Result<bool> {
        validate::id("session_id", session_id)?;
        let c = self.conn().await?;
        let removed = c.execute(&c.sql.delete_session, &[&session_id]).await?;
        Ok(removed > 0)
    }

    async fn restore_sessions(&self, sessions: &[Session]) -> Result<()> {
        validate::restored_sessions(sessions)?;
        // One INSERT cannot upsert a row twice: keep the last copy of a repeated id.
        let mut last: std::collections::HashMap<&str, usize> = Default::default();
        for (i, s) in sessions.iter().enumerate() {
            last.insert(&s.session_id, i);
        }
        let rows: Vec<&Session> = sessions
            .iter()
            .enumerate()
            .filter(|(i, s)| last[s.session_id.as_str()] == *i)
            .map(|(_, s)| s)
            .collect();
        let c = self.conn().await?;
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = rows.iter().map(|s| s.session_id.as_str()).collect();
        let users: Vec<&str> = rows.iter().map(|s| s.user_id.as_str()).collect();
        let created: Vec<_> = rows.iter().map(|s| s.created_at).collect();
        let updated: Vec<_> = rows.iter().map(|s| s.updated_at).collect();
        let statuses: Vec<&str> = rows.iter().map(|s| s.status.as_str()).collect();
        let metadata: Vec<Value> = rows
            .iter()
            .map(|s| Value::Object(s.metadata.clone()))
            .collect();
        let requests: Vec<i64> = rows
            .iter()
            .map(|s| s.metrics.request_count as i64)
            .collect();
        let times: Vec<f64> = rows
            .iter()
            .map(|s| s.metrics.total_processing_time)
            .collect();
        let errors: Vec<i64> = rows.iter().map(|s| s.metrics.error_count as i64).collect();
        c.execute(
            &c.sql.restore_sessions,
            &[
                &ids, &users, &created, &updated, &statuses, &metadata, &requests, &times, &errors,
            ],
        )
        .await?;
        Ok(())
    }

    async fn list_sessions(&self, query: &SessionQuery) -> Result<SessionPage> {
        validate::session_query(query)?;
        let c = self.conn().await?;
        let sql = c.sql.list_sessions(
            query.after.is_some(),
            query.user_id.is_some(),
            query.status.is_some(),
        );
        let limit = query.limit as i64 + 1;
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(4);
        for value in [&query.after, &query.user_id, &query.status]
            .into_iter()
            .flatten()
        {
            params.push(value);
        }
        params.push(&limit);
        let rows = c.query(&sql, &params).await?;
        let mut sessions = rows
            .iter()
            .map(session_from_row)
            .collect::<Result<Vec<_>>>()?;
        let more = sessions.len() > query.limit;
        sessions.truncate(query.limit);
        let next_cursor = more
            .then(|| sessions.last().map(|s| s.session_id.clone()))
            .flatten();
        Ok(SessionPage {
            sessions,
            next_cursor,
        })
    }
}
