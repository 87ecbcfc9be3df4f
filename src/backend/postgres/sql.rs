//! The text of every PostgreSQL statement, with the schema name spliced in once.

use super::schema;

pub(super) const SESSION_COLUMNS: &str =
    "session_id, user_id, created_at, updated_at, status, metadata, \
     request_count, total_processing_time, error_count";
/// The SET items that move a session's `updated_at` to `at` (`row` names the updated
/// row): `indexed_at` (the cleanup index's column) follows only once it trails by the
/// granularity, or if `at` is earlier, so most touches change no indexed column and
/// update the row in place (HOT).
pub(super) fn touch(row: &str, at: &str) -> String {
    let g = crate::backend::IDLE_INDEX_GRANULARITY_SECS;
    format!(
        "updated_at = {at}, indexed_at = CASE WHEN {row}.indexed_at <= {at} \
         AND {row}.indexed_at > {at} - interval '{g} seconds' \
         THEN {row}.indexed_at ELSE {at} END"
    )
}

pub(super) const CHECKPOINT_COLUMNS: &str =
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, data, metadata, created_at";

/// Every fixed statement, with the schema name spliced in once. `prepare_cached` keys
/// prepared statements by this text, per connection.
pub(super) struct Queries {
    pub(super) schema: String,
    pub(super) create_session: String,
    pub(super) batch_create_sessions: String,
    pub(super) get_session: String,
    pub(super) batch_get_sessions: String,
    pub(super) update_session: String,
    pub(super) end_session: String,
    pub(super) add_message: String,
    pub(super) batch_add_messages: String,
    pub(super) history: String,
    pub(super) history_range: String,
    pub(super) restore_sessions: String,
    pub(super) session_exists: String,
    pub(super) delete_session: String,
    pub(super) restore_messages: String,
    pub(super) restore_checkpoints: String,
    pub(super) list_threads: String,
    pub(super) list_namespaces: String,
    pub(super) list_write_checkpoints: String,
    pub(super) list_task_contexts: String,
    pub(super) store_checkpoint: String,
    pub(super) get_checkpoint: String,
    pub(super) latest_checkpoint: String,
    pub(super) list_checkpoints: String,
    pub(super) list_checkpoints_filtered: String,
    pub(super) put_writes: String,
    pub(super) batch_put_writes: String,
    pub(super) get_writes: String,
    pub(super) delete_thread: String,
    pub(super) get_task_context: String,
    pub(super) store_task_context: String,
    pub(super) counts: String,
    pub(super) cleanup: String,
    pub(super) prune_changes: String,
    pub(super) vacuum_changes: String,
}

/// Makes `stmt` also log the rows `rows` (a `SELECT` of `kind, id`) to the change log,
/// in a data-modifying CTE: the rows commit with the write, or not at all, and the
/// statement's own answer (its rows, or the count of rows it changed) stays as it was.
/// A logged change of something that was not there (an update of a missing session)
/// only costs a follower one needless invalidation.
///
/// `known_on`: whether the schema logged its writes when this backend opened. The feed
/// is turned on for good, so such a backend logs without looking. Otherwise the
/// statement reads the flag (`change_feed` has its row) itself, and locks the log whether
/// it logs or not, so the feed cannot be turned on between a write's check and its
/// commit (see `schema::ENABLE_FEED`). Reading the flag in every statement costs writers
/// at 32 connections about 4% of their throughput (pgbench: every statement reads the
/// flag's one page), which a backend of a logging schema need not pay.
fn logged(s: &str, rows: &str, stmt: String, known_on: bool) -> String {
    let cte = format!(
        "log AS (INSERT INTO {s}.changes (kind, id) {rows}{})",
        if_logging(s, known_on)
    );
    match stmt.strip_prefix("WITH ") {
        Some(rest) => format!("WITH {cte}, {rest}"),
        None => format!("WITH {cte} {stmt}"),
    }
}

/// The condition a `SELECT` of rows to log ends with (see [`logged`]): none once the
/// schema is known to log.
fn if_logging(s: &str, known_on: bool) -> String {
    if known_on {
        String::new()
    } else {
        format!(" WHERE EXISTS (SELECT FROM {s}.change_feed)")
    }
}

impl Queries {
    /// The statements for schema `schema_name`. Every write also logs what it touched
    /// for the change feed, if the schema's feed is on (see `feed.rs`); `feed_on`: it
    /// was when the backend opened.
    pub(super) fn new(schema_name: &str, feed_on: bool) -> Self {
        let s = schema::quoted(schema_name);
        let log = |rows: &str, stmt: String| logged(&s, rows, stmt, feed_on);
        let logging = if_logging(&s, feed_on);
        let upsert_session = format!(
            "ON CONFLICT (session_id) DO UPDATE SET user_id = EXCLUDED.user_id, \
             metadata = EXCLUDED.metadata, {} \
             RETURNING {SESSION_COLUMNS}",
            touch("sessions", "EXCLUDED.updated_at")
        );
        // `seq < $3` continues a filtered listing; `$4` is `before` (none: NULL), and an
        // id the thread and namespace do not hold compares with NULL and yields nothing.
        let list = format!(
            "SELECT seq, {CHECKPOINT_COLUMNS} FROM {s}.checkpoints c \
             WHERE c.thread_id = $1 AND c.checkpoint_ns = $2 AND c.seq < $3 \
             AND ($4::text IS NULL OR c.seq < (SELECT b.seq FROM {s}.checkpoints b \
             WHERE b.thread_id = $1 AND b.checkpoint_ns = $2 AND b.checkpoint_id = $4))"
        );
        Queries {
            schema: s.clone(),
            create_session: log(
                "SELECT 's', $1::text",
                format!(
                    "INSERT INTO {s}.sessions \
                 (session_id, user_id, created_at, updated_at, indexed_at, status, metadata) \
                 VALUES ($1, $2, $3, $3, $3, 'active', $4) {upsert_session}"
                ),
            ),
            batch_create_sessions: log(
                "SELECT DISTINCT 's', unnest($1::text[])",
                format!(
                    "INSERT INTO {s}.sessions \
                 (session_id, user_id, created_at, updated_at, indexed_at, status, metadata) \
                 SELECT i.session_id, i.user_id, $3, $3, $3, 'active', i.metadata \
                 FROM unnest($1::text[], $2::text[], $4::jsonb[]) \
                 AS i (session_id, user_id, metadata) {upsert_session}"
                ),
            ),
            get_session: format!(
                "SELECT {SESSION_COLUMNS} FROM {s}.sessions WHERE session_id = $1"
            ),
            batch_get_sessions: format!(
                "SELECT {SESSION_COLUMNS} FROM {s}.sessions WHERE session_id = ANY($1::text[])"
            ),
            // Counters saturate (see `SessionUpdate`): bigint and float8 overflow are
            // errors here, so the sum runs only when it fits (CASE evaluates only the taken
            // branch). Validation keeps each add within i64, so `MAX - $n` cannot overflow.
            // The float test neither overflows nor underflows (PG rejects both) and is
            // exact: with x the greater and y the lesser term, x + y rounds to infinity
            // exactly when `(x - f64::MAX) + y >= 2^970` (half an ulp of f64::MAX), which
            // is computed without rounding whenever x is close enough to f64::MAX to matter.
            update_session: log(
                "SELECT 's', $1::text",
                format!(
                    "UPDATE {s}.sessions SET request_count = CASE \
                 WHEN request_count > 9223372036854775807 - $2 THEN 9223372036854775807 \
                 ELSE request_count + $2 END, \
                 total_processing_time = CASE \
                 WHEN GREATEST(total_processing_time, $3) - '1.7976931348623157e308'::float8 \
                 + LEAST(total_processing_time, $3) >= '9.9792015476736e291'::float8 \
                 THEN '1.7976931348623157e308'::float8 \
                 ELSE total_processing_time + $3 END, \
                 error_count = CASE \
                 WHEN error_count > 9223372036854775807 - $4 THEN 9223372036854775807 \
                 ELSE error_count + $4 END, \
                 status = COALESCE($5::text, status), \
                 metadata = metadata || $6::jsonb, {} \
                 WHERE session_id = $1",
                    touch("sessions", "$7")
                ),
            ),
            end_session: log(
                "SELECT 's', $1::text",
                format!(
                    "UPDATE {s}.sessions SET status = $2, {} WHERE session_id = $1",
                    touch("sessions", "$3")
                ),
            ),
            // One statement: the session's updated_at moves and the message is inserted
            // only if the session exists; the count tells a missing session apart.
            add_message: log(
                "SELECT 's', $1::text",
                format!(
                    "WITH touched AS (UPDATE {s}.sessions SET {} \
                 WHERE session_id = $1 RETURNING session_id), \
                 inserted AS (INSERT INTO {s}.messages \
                 (session_id, message_id, role, content, timestamp, metadata) \
                 SELECT session_id, $2::text, $3::text, $4::text, $6, $5::jsonb FROM touched \
                 ON CONFLICT (session_id, message_id) DO NOTHING) \
                 SELECT count(*) FROM touched",
                    touch("sessions", "$6")
                ),
            ),
            // Sessions are locked in id order, so concurrent batches touching the same
            // sessions queue instead of deadlocking; messages are inserted in input order
            // (so their seq follows it), only for sessions that exist.
            batch_add_messages: log(
                "SELECT DISTINCT 's', unnest($1::text[])",
                format!(
                    "WITH input AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], \
                 $4::text[], $5::jsonb[]) WITH ORDINALITY \
                 AS i (session_id, message_id, role, content, metadata, ord)), \
                 locked AS MATERIALIZED (SELECT session_id FROM {s}.sessions \
                 WHERE session_id = ANY($1::text[]) ORDER BY session_id FOR NO KEY UPDATE), \
                 touched AS (UPDATE {s}.sessions t SET {} FROM locked l \
                 WHERE t.session_id = l.session_id RETURNING t.session_id), \
                 inserted AS (INSERT INTO {s}.messages \
                 (session_id, message_id, role, content, timestamp, metadata) \
                 SELECT i.session_id, i.message_id, i.role, i.content, $6, i.metadata \
                 FROM input i WHERE i.session_id IN (SELECT session_id FROM touched) \
                 ORDER BY i.ord \
                 ON CONFLICT (session_id, message_id) DO NOTHING) \
                 SELECT session_id FROM touched",
                    touch("t", "$6")
                ),
            ),
            history: format!(
                "SELECT message_id, role, content, timestamp, metadata FROM \
                 (SELECT seq, message_id, role, content, timestamp, metadata \
                 FROM {s}.messages WHERE session_id = $1 ORDER BY seq DESC LIMIT $2) m \
                 ORDER BY seq"
            ),
            restore_sessions: log(
                "SELECT DISTINCT 's', unnest($1::text[])",
                format!(
                "INSERT INTO {s}.sessions (session_id, user_id, created_at, updated_at, status, \
                 metadata, request_count, total_processing_time, error_count, indexed_at) \
                 SELECT *, r.updated_at FROM unnest($1::text[], $2::text[], \
                 $3::timestamptz[], $4::timestamptz[], $5::text[], $6::jsonb[], $7::bigint[], \
                 $8::float8[], $9::bigint[]) AS r (session_id, user_id, created_at, updated_at, \
                 status, metadata, request_count, total_processing_time, error_count) \
                 ON CONFLICT (session_id) DO UPDATE SET user_id = EXCLUDED.user_id, \
                 created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, \
                 indexed_at = EXCLUDED.updated_at, \
                 status = EXCLUDED.status, metadata = EXCLUDED.metadata, \
                 request_count = EXCLUDED.request_count, \
                 total_processing_time = EXCLUDED.total_processing_time, \
                 error_count = EXCLUDED.error_count"
            ),
            ),
            // One statement: the context and the session (messages cascade) go together;
            // the count is the session's.
            delete_session: log(
                "SELECT k, $1::text FROM (VALUES ('s'), ('t')) AS v (k)",
                format!(
                    "WITH c AS (DELETE FROM {s}.task_contexts WHERE session_id = $1) \
                 DELETE FROM {s}.sessions WHERE session_id = $1"
                ),
            ),
            session_exists: format!("SELECT 1 FROM {s}.sessions WHERE session_id = $1"),
            restore_messages: log(
                "SELECT 's', $1::text",
                format!(
                    "INSERT INTO {s}.messages (session_id, message_id, role, content, timestamp, \
                 metadata) \
                 SELECT $1::text, m.message_id, m.role, m.content, m.ts, m.metadata \
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[], \
                 $6::jsonb[]) WITH ORDINALITY AS m (message_id, role, content, ts, metadata, n) \
                 ORDER BY m.n \
                 ON CONFLICT (session_id, message_id) DO NOTHING"
                ),
            ),
            restore_checkpoints: log(
                "SELECT DISTINCT 'c', unnest($1::text[])",
                format!(
                    "INSERT INTO {s}.checkpoints (thread_id, checkpoint_ns, checkpoint_id, \
                 parent_checkpoint_id, data, metadata, created_at) \
                 SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.parent, c.data, \
                 c.metadata, c.created_at FROM unnest($1::text[], $2::text[], $3::text[], \
                 $4::text[], $5::jsonb[], $6::jsonb[], $7::timestamptz[]) WITH ORDINALITY \
                 AS c (thread_id, checkpoint_ns, checkpoint_id, parent, data, metadata, \
                 created_at, n) ORDER BY c.n \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET \
                 parent_checkpoint_id = EXCLUDED.parent_checkpoint_id, data = EXCLUDED.data, \
                 metadata = EXCLUDED.metadata, created_at = EXCLUDED.created_at"
                ),
            ),
            history_range: format!(
                "SELECT message_id, role, content, timestamp, metadata FROM {s}.messages \
                 WHERE session_id = $1 ORDER BY seq LIMIT $2 OFFSET $3"
            ),
            list_threads: format!(
                "SELECT thread_id FROM (SELECT thread_id FROM {s}.checkpoints \
                 UNION SELECT thread_id FROM {s}.checkpoint_writes) t \
                 WHERE thread_id > $1 ORDER BY thread_id LIMIT $2"
            ),
            list_namespaces: format!(
                "SELECT checkpoint_ns FROM {s}.checkpoints WHERE thread_id = $1 \
                 UNION SELECT checkpoint_ns FROM {s}.checkpoint_writes WHERE thread_id = $1 \
                 ORDER BY 1"
            ),
            list_write_checkpoints: format!(
                "SELECT DISTINCT checkpoint_id FROM {s}.checkpoint_writes \
                 WHERE thread_id = $1 AND checkpoint_ns = $2 ORDER BY 1"
            ),
            list_task_contexts: format!(
                "SELECT session_id FROM {s}.task_contexts WHERE session_id > $1 \
                 ORDER BY session_id LIMIT $2"
            ),
            store_checkpoint: log(
                "SELECT 'c', $1::text",
                format!(
                    "INSERT INTO {s}.checkpoints (thread_id, checkpoint_ns, checkpoint_id, \
                 parent_checkpoint_id, data, metadata, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET \
                 parent_checkpoint_id = EXCLUDED.parent_checkpoint_id, \
                 data = EXCLUDED.data, metadata = EXCLUDED.metadata"
                ),
            ),
            get_checkpoint: format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM {s}.checkpoints \
                 WHERE thread_id = $1 AND checkpoint_ns = $2 AND checkpoint_id = $3"
            ),
            latest_checkpoint: format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM {s}.checkpoints \
                 WHERE thread_id = $1 AND checkpoint_ns = $2 ORDER BY seq DESC LIMIT 1"
            ),
            list_checkpoints: format!("{list} ORDER BY c.seq DESC LIMIT $5"),
            // Each filter key's value must equal the stored one as jsonb; the exact
            // (serde_json) comparison is then made on the rows returned.
            list_checkpoints_filtered: format!(
                "{list} AND NOT EXISTS (SELECT 1 FROM jsonb_each($6::jsonb) f \
                 WHERE c.metadata -> f.key IS DISTINCT FROM f.value) \
                 ORDER BY c.seq DESC LIMIT $5"
            ),
            // Rows are inserted in index order, so new writes get seq in that order; a
            // replay updates in place and keeps the first seq.
            put_writes: log(
                "SELECT 'c', $1::text",
                format!(
                    "INSERT INTO {s}.checkpoint_writes \
                 (thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, value) \
                 SELECT $1::text, $2::text, $3::text, $4::text, w.idx, w.channel, w.value \
                 FROM unnest($5::integer[], $6::text[], $7::jsonb[]) AS w (idx, channel, value) \
                 ORDER BY w.idx \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) \
                 DO UPDATE SET channel = EXCLUDED.channel, value = EXCLUDED.value"
                ),
            ),
            batch_put_writes: log(
                "SELECT DISTINCT 'c', unnest($1::text[])",
                format!(
                    "INSERT INTO {s}.checkpoint_writes \
                 (thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, value) \
                 SELECT w.thread_id, w.checkpoint_ns, w.checkpoint_id, w.task_id, w.idx, \
                 w.channel, w.value FROM unnest($1::text[], $2::text[], $3::text[], \
                 $4::text[], $5::integer[], $6::text[], $7::jsonb[]) WITH ORDINALITY \
                 AS w (thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, value, n) \
                 ORDER BY w.n \
                 ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) \
                 DO UPDATE SET channel = EXCLUDED.channel, value = EXCLUDED.value"
                ),
            ),
            get_writes: format!(
                "SELECT task_id, idx, channel, value FROM {s}.checkpoint_writes \
                 WHERE thread_id = $1 AND checkpoint_ns = $2 AND checkpoint_id = $3 \
                 ORDER BY seq"
            ),
            delete_thread: log(
                "SELECT 'c', $1::text",
                format!(
                    "WITH writes AS (DELETE FROM {s}.checkpoint_writes WHERE thread_id = $1) \
                 DELETE FROM {s}.checkpoints WHERE thread_id = $1"
                ),
            ),
            get_task_context: format!(
                "SELECT context FROM {s}.task_contexts WHERE session_id = $1"
            ),
            store_task_context: log(
                "SELECT 't', $1::text",
                format!(
                    "INSERT INTO {s}.task_contexts (session_id, context, updated_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (session_id) DO UPDATE SET \
                 context = EXCLUDED.context, updated_at = EXCLUDED.updated_at"
                ),
            ),
            counts: format!(
                "SELECT (SELECT count(*) FROM {s}.sessions), \
                 (SELECT count(*) FROM {s}.messages), \
                 (SELECT count(*) FROM {s}.checkpoints), \
                 (SELECT count(*) FROM {s}.checkpoint_writes), \
                 (SELECT count(*) FROM {s}.task_contexts)"
            ),
            // One statement, so one transaction: the idle sessions and their task
            // context go together; messages follow through ON DELETE CASCADE.
            // `indexed_at <= updated_at`, so the index range holds every idle session.
            cleanup: format!(
                "WITH expired AS (DELETE FROM {s}.sessions \
                 WHERE indexed_at < $1 AND updated_at < $1 \
                 RETURNING session_id), \
                 contexts AS (DELETE FROM {s}.task_contexts \
                 WHERE session_id IN (SELECT session_id FROM expired) \
                 RETURNING session_id), \
                 log AS (INSERT INTO {s}.changes (kind, id) \
                 SELECT 's', session_id FROM expired{logging} \
                 UNION ALL SELECT 't', session_id FROM contexts{logging}) \
                 SELECT count(*) FROM expired"
            ),
            // `$1` is how long rows are kept, in seconds (see `feed::KEEP`).
            prune_changes: format!("SELECT {s}.prune_changes(make_interval(secs => $1))"),
            // SKIP_LOCKED: another process vacuuming it already does the work.
            vacuum_changes: format!(
                "VACUUM (SKIP_LOCKED) {s}.changes, {s}.change_horizons, {s}.changes_pruned"
            ),
        }
    }

    /// `list_sessions` with only the filters in use, so the cursor and the user filter
    /// are index ranges: `session_id > $n` on the primary key, or `(user_id,
    /// session_id)` when a user is given.
    pub(super) fn list_sessions(&self, after: bool, user: bool, status: bool) -> String {
        let mut sql = format!(
            "SELECT {SESSION_COLUMNS} FROM {}.sessions WHERE true",
            self.schema
        );
        let mut n = 0;
        for (used, condition) in [
            (after, "session_id >"),
            (user, "user_id ="),
            (status, "status ="),
        ] {
            if used {
                n += 1;
                sql.push_str(&format!(" AND {condition} ${n}"));
            }
        }
        sql.push_str(&format!(" ORDER BY session_id LIMIT ${}", n + 1));
        sql
    }
}
