//! The PostgreSQL schema: versioned migrations applied at `initialize()`.
//!
//! Every table lives in the backend's own schema (`aiecs` by default), so several
//! applications or test runs can share one database. `<schema>.schema_version` records
//! each applied migration. Migrations run in order inside one transaction that first
//! takes a transaction-scoped advisory lock derived from the schema name, so backends
//! initializing concurrently (in one process or many) apply each migration exactly once;
//! a schema written by a newer version of this library is refused rather than misread.

use tokio_postgres::Transaction;

use crate::error::{Result, StorageError};

/// The migrations, in order. `{s}` stands for the quoted schema name, `{channel}` for
/// the schema's [`channel`] (a plain identifier, safe inside quotes). Migration `i`
/// (0-based) brings the schema to version `i + 1`. Never edit a released migration; add
/// a new one.
///
/// Id columns use the `"C"` collation: byte order, the same order as every other backend
/// (and as Rust's `str`), whatever the database's default collation, and cheaper to
/// compare and index.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE {s}.sessions (
    session_id            text COLLATE "C" PRIMARY KEY,
    user_id               text COLLATE "C" NOT NULL,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    status                text COLLATE "C" NOT NULL,
    metadata              jsonb NOT NULL,
    request_count         bigint NOT NULL DEFAULT 0,
    total_processing_time double precision NOT NULL DEFAULT 0,
    error_count           bigint NOT NULL DEFAULT 0
);
-- cleanup_expired_sessions scans by idle time; list_sessions by user pages by id.
CREATE INDEX sessions_by_updated_at ON {s}.sessions (updated_at);
CREATE INDEX sessions_by_user ON {s}.sessions (user_id, session_id);

-- seq is drawn when a row is inserted, so it orders a session's messages by arrival.
CREATE TABLE {s}.messages (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id text COLLATE "C" NOT NULL
               REFERENCES {s}.sessions (session_id) ON DELETE CASCADE,
    message_id text COLLATE "C" NOT NULL,
    role       text NOT NULL,
    content    text NOT NULL,
    timestamp  timestamptz NOT NULL,
    metadata   jsonb NOT NULL,
    UNIQUE (session_id, message_id)
);
CREATE INDEX messages_by_session ON {s}.messages (session_id, seq);

-- seq is the per-thread store order: "latest" is the highest seq of a thread and
-- namespace. Re-storing an id updates the row in place and keeps its seq.
CREATE TABLE {s}.checkpoints (
    seq                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    thread_id            text COLLATE "C" NOT NULL,
    checkpoint_ns        text COLLATE "C" NOT NULL,
    checkpoint_id        text COLLATE "C" NOT NULL,
    parent_checkpoint_id text,
    data                 jsonb NOT NULL,
    metadata             jsonb NOT NULL,
    created_at           timestamptz NOT NULL,
    UNIQUE (thread_id, checkpoint_ns, checkpoint_id)
);
CREATE INDEX checkpoints_by_thread ON {s}.checkpoints (thread_id, checkpoint_ns, seq);

-- seq keeps the order in which each write was first stored; a replay updates in place.
CREATE TABLE {s}.checkpoint_writes (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    thread_id     text COLLATE "C" NOT NULL,
    checkpoint_ns text COLLATE "C" NOT NULL,
    checkpoint_id text COLLATE "C" NOT NULL,
    task_id       text COLLATE "C" NOT NULL,
    idx           integer NOT NULL,
    channel       text NOT NULL,
    value         jsonb NOT NULL,
    UNIQUE (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
);

CREATE TABLE {s}.task_contexts (
    session_id text COLLATE "C" PRIMARY KEY,
    context    jsonb NOT NULL,
    updated_at timestamptz NOT NULL
);
"#,
    r#"
-- Touching a session (an append, an update) now changes no indexed column, so the row
-- is updated in place (a HOT update: no new entry in any index, less WAL): cleanup
-- scans indexed_at, which trails updated_at by under a minute and never leads it, and
-- the pages keep room for the new row versions.
ALTER TABLE {s}.sessions ADD COLUMN indexed_at timestamptz;
UPDATE {s}.sessions SET indexed_at = updated_at;
ALTER TABLE {s}.sessions ALTER COLUMN indexed_at SET NOT NULL;
ALTER TABLE {s}.sessions SET (fillfactor = 80);
DROP INDEX {s}.sessions_by_updated_at;
CREATE INDEX sessions_by_indexed_at ON {s}.sessions (indexed_at);
-- A message is keyed by its session and id (the key that makes a retried add
-- idempotent); seq keeps its order index only: one index fewer per append. (Rebuilds
-- that key's index once.)
ALTER TABLE {s}.messages DROP CONSTRAINT messages_pkey,
    DROP CONSTRAINT messages_session_id_message_id_key,
    ADD PRIMARY KEY (session_id, message_id);
"#,
    // The change feed's first form (issue 16), replaced by migration 4, which drops
    // these functions. Triggers rather than a pg_notify in each statement of
    // `sql.rs`: no write can be missed (a restore, a cascade, a statement added later, a
    // hand-written fix), and a row trigger costs a few microseconds per row next to a
    // round trip of a hundred. Row rather than statement triggers: transition tables
    // would copy every written row, checkpoint data included, to find its id.
    // PostgreSQL sends a notification when its transaction commits, never if it rolls
    // back, and drops duplicate payloads within one, so a session touched by a message
    // and its append is reported once.
    // The price is PostgreSQL's, not the triggers': a transaction that notifies takes a
    // cluster-wide lock on the notification queue at commit and holds it until the commit
    // is flushed, so notifying commits no longer share a WAL flush. Measured on loopback
    // (fsync on): one writer pays 7-11% per write, 32 writers lose about 70% of their
    // throughput (16 000 to 4 500 writes/s).
    // Messages go away only with their session, whose own delete reports it: no DELETE
    // trigger there, or deleting a long conversation would run one call per message.
    r#"
CREATE FUNCTION {s}.notify_session_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('{channel}', TG_ARGV[0] || ':' || OLD.session_id);
    ELSE
        PERFORM pg_notify('{channel}', TG_ARGV[0] || ':' || NEW.session_id);
        IF TG_OP = 'UPDATE' AND OLD.session_id <> NEW.session_id THEN
            PERFORM pg_notify('{channel}', TG_ARGV[0] || ':' || OLD.session_id);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
CREATE FUNCTION {s}.notify_thread_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('{channel}', 'c:' || OLD.thread_id);
    ELSE
        PERFORM pg_notify('{channel}', 'c:' || NEW.thread_id);
        IF TG_OP = 'UPDATE' AND OLD.thread_id <> NEW.thread_id THEN
            PERFORM pg_notify('{channel}', 'c:' || OLD.thread_id);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
"#,
    // The change feed, second form (issue 16): each write statement logs what it
    // touched to an unlogged table, in the statement itself (see `sql.rs`), and each
    // process's follower reads the log by transaction visibility (see `feed.rs`).
    // Replaces migration 3's NOTIFY, which made committing writers queue one at a time.
    //
    // - `changes`: one row per session, task context or thread a statement wrote, keyed
    //   by the writing transaction's id (`xid`, as `pg_current_xact_id()` gives it),
    //   which a follower compares with the snapshots it took. Unlogged: no WAL for it,
    //   and a crash empties it, which every follower learns by losing its connection.
    //   Kind `s` (session), `t` (task context), `c` (thread).
    // - `change_feed`: one row once a backend with the feed on initialized the schema;
    //   from then on every backend of this library writing the schema logs.
    // - `change_horizons`: snapshot xmins recorded by `prune_changes` with the time, so
    //   that rows are pruned only once every transaction running `keep` ago ended.
    // - `changes_pruned`: one row, the xid below which rows were pruned: a follower whose
    //   last snapshot is older reports that it may have missed changes. Also the lock
    //   that makes one pruner at a time do the work.
    r#"
DROP TRIGGER IF EXISTS notify_change ON {s}.sessions;
DROP TRIGGER IF EXISTS notify_change ON {s}.messages;
DROP TRIGGER IF EXISTS notify_change ON {s}.task_contexts;
DROP TRIGGER IF EXISTS notify_change ON {s}.checkpoints;
DROP TRIGGER IF EXISTS notify_change ON {s}.checkpoint_writes;
DROP FUNCTION {s}.notify_session_change();
DROP FUNCTION {s}.notify_thread_change();

CREATE UNLOGGED TABLE {s}.changes (
    xid  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    kind "char" NOT NULL,
    id   text COLLATE "C" NOT NULL
);
CREATE INDEX changes_by_xid ON {s}.changes (xid);
CREATE TABLE {s}.change_feed (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    enabled_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNLOGGED TABLE {s}.change_horizons (
    at      timestamptz NOT NULL,
    horizon xid8 NOT NULL
);
CREATE UNLOGGED TABLE {s}.changes_pruned (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    below    xid8 NOT NULL
);

-- Records the current xmin as a horizon, then deletes the rows of transactions that
-- ended before the newest horizon at least `keep` old, and records how far it pruned.
-- Returns the rows deleted; 0 at once if another call is pruning or the feed is off.
-- The delete goes through the index whatever the statistics say (none on a server
-- without autovacuum).
CREATE FUNCTION {s}.prune_changes(keep interval) RETURNS bigint LANGUAGE plpgsql
    SET enable_seqscan = off SET jit = off AS $$
DECLARE
    v_now     xid8 := pg_snapshot_xmin(pg_current_snapshot());
    v_below   xid8;
    v_at      timestamptz;
    v_deleted bigint;
BEGIN
    IF NOT EXISTS (SELECT FROM {s}.change_feed) THEN
        RETURN 0;
    END IF;
    INSERT INTO {s}.changes_pruned (below) VALUES ('0') ON CONFLICT DO NOTHING;
    PERFORM FROM {s}.changes_pruned FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    INSERT INTO {s}.change_horizons (at, horizon) VALUES (clock_timestamp(), v_now);
    SELECT max(h.horizon), max(h.at) INTO v_below, v_at FROM {s}.change_horizons h
        WHERE h.at <= clock_timestamp() - keep;
    IF v_below IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM {s}.changes c WHERE c.xid < v_below;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    -- The newest horizon old enough stays: the next call may prune up to it again.
    DELETE FROM {s}.change_horizons h WHERE h.at < v_at AND h.horizon <= v_below;
    UPDATE {s}.changes_pruned p SET below = v_below WHERE p.below < v_below;
    RETURN v_deleted;
END
$$;
"#,
    // 5: the log is pruned while it holds rows, even with the feed turned off by hand:
    // a backend that opened while the schema logged keeps logging without reading the
    // flag (see `sql::logged`), until it opens again. Migration 4's function again
    // with one condition changed: released migrations stay as they were applied.
    r#"
CREATE OR REPLACE FUNCTION {s}.prune_changes(keep interval) RETURNS bigint LANGUAGE plpgsql
    SET enable_seqscan = off SET jit = off AS $$
DECLARE
    v_now     xid8 := pg_snapshot_xmin(pg_current_snapshot());
    v_below   xid8;
    v_at      timestamptz;
    v_deleted bigint;
BEGIN
    -- Nested, not one condition: a single expression is planned whole, locking the log
    -- before `changes_pruned`, where the function otherwise locks it last (a DROP
    -- SCHEMA meanwhile deadlocked with it).
    IF NOT EXISTS (SELECT FROM {s}.change_feed) THEN
        IF NOT EXISTS (SELECT FROM {s}.changes) THEN
            RETURN 0;
        END IF;
    END IF;
    INSERT INTO {s}.changes_pruned (below) VALUES ('0') ON CONFLICT DO NOTHING;
    PERFORM FROM {s}.changes_pruned FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    INSERT INTO {s}.change_horizons (at, horizon) VALUES (clock_timestamp(), v_now);
    SELECT max(h.horizon), max(h.at) INTO v_below, v_at FROM {s}.change_horizons h
        WHERE h.at <= clock_timestamp() - keep;
    IF v_below IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM {s}.changes c WHERE c.xid < v_below;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    -- The newest horizon old enough stays: the next call may prune up to it again.
    DELETE FROM {s}.change_horizons h WHERE h.at < v_at AND h.horizon <= v_below;
    UPDATE {s}.changes_pruned p SET below = v_below WHERE p.below < v_below;
    RETURN v_deleted;
END
$$;
"#,
];

/// Turns the change feed on for a schema, for good: run at `initialize()` by a backend
/// with the feed on, if the schema's feed is off. From then on every write statement of
/// this library logs (see `sql::logged`), whatever its backend's settings. The lock waits
/// for every transaction that wrote to the schema (each write statement locks the log,
/// logging or not) and holds new ones until the flag commits, so a follower that sees
/// the flag knows that every write it cannot see yet will be logged.
pub(super) const ENABLE_FEED: &str = "LOCK TABLE {s}.changes IN SHARE MODE; \
     INSERT INTO {s}.change_feed (only_row) VALUES (true) ON CONFLICT DO NOTHING";

/// Whether the schema's writes are logged for the change feed.
pub(super) const FEED_ENABLED: &str = "SELECT EXISTS (SELECT FROM {s}.change_feed)";

/// The schema version this library writes: the number of migrations.
pub(super) const LATEST_VERSION: i32 = MIGRATIONS.len() as i32;

/// The longest schema name PostgreSQL keeps (NAMEDATALEN - 1).
pub(super) const MAX_SCHEMA_BYTES: usize = 63;

/// Checks a schema name: `[a-z_][a-z0-9_]*`, at most 63 bytes. Such a name needs no
/// escaping inside double quotes, so it can be spliced into SQL safely.
pub(super) fn validate_schema(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok {
        return Err(StorageError::invalid_input(
            "schema",
            format!(
                "{name:?} is not a plain SQL identifier: use lowercase letters, digits and \
                 `_`, not starting with a digit"
            ),
        ));
    }
    if name.len() > MAX_SCHEMA_BYTES {
        return Err(StorageError::invalid_input(
            "schema",
            format!(
                "is {} bytes; at most {MAX_SCHEMA_BYTES} allowed",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// The schema name quoted for SQL. Only called on names [`validate_schema`] accepted.
pub(super) fn quoted(schema: &str) -> String {
    format!("\"{schema}\"")
}

/// Where migration 3's functions notify: longest channel name PostgreSQL keeps
/// (NAMEDATALEN - 1).
const MAX_CHANNEL_BYTES: usize = 63;
const CHANNEL_PREFIX: &str = "aiecs_changes_";

/// The `NOTIFY` channel of `schema`'s change feed in migration 3 (the feed no longer
/// notifies): `aiecs_changes_<schema>`. A name too
/// long for that (over 48 bytes) keeps its first 32 bytes and adds a 64-bit hash, which
/// makes exactly 63 bytes: no short name's channel (at most 62) can equal it, and two
/// long names share one only if they share the prefix and the hash.
pub(super) fn channel(schema: &str) -> String {
    let direct = format!("{CHANNEL_PREFIX}{schema}");
    if direct.len() < MAX_CHANNEL_BYTES {
        return direct;
    }
    let mut h = crate::fnv::Fnv::default();
    h.bytes(b"aiecs-storage:channel:");
    h.bytes(schema.as_bytes());
    // Schema names are ASCII, so any byte index is a char boundary.
    format!("{CHANNEL_PREFIX}{}_{:016x}", &schema[..32], h.finish())
}

/// The advisory lock key serializing migrations of `schema`: a 64-bit FNV-1a hash of a
/// fixed prefix and the name, so every process computes the same key and different
/// schemas rarely share one (sharing would only serialize their migrations).
pub(super) fn lock_key(schema: &str) -> i64 {
    let mut h = crate::fnv::Fnv::default();
    h.bytes(b"aiecs-storage:migrate:");
    h.bytes(schema.as_bytes());
    let hash = h.finish();
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// What [`migrate`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Migrated {
    /// The version before this call.
    pub from: i32,
    /// The version now.
    pub to: i32,
    /// Whether the schema logs its writes for the change feed (turned on by this call
    /// or earlier): from then on it does for good, unless turned off by hand.
    pub logged: bool,
}

/// Why [`migrate`] failed: PostgreSQL's error, or a schema it refuses.
pub(super) enum MigrateError {
    Pg(tokio_postgres::Error),
    Storage(StorageError),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Pg(e)
    }
}

/// Creates the schema if missing and applies the pending migrations, all inside `tx`,
/// which the caller commits. Takes `pg_advisory_xact_lock` first so concurrent callers
/// wait for each other and then find the work done.
pub(super) async fn migrate(
    tx: &Transaction<'_>,
    schema: &str,
    feed: bool,
) -> std::result::Result<Migrated, MigrateError> {
    let s = quoted(schema);
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(schema)])
        .await?;

    // Checked first so that a role without CREATE on the database can use a schema an
    // administrator created for it.
    let schema_exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await?
        .get(0);
    if !schema_exists {
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
            .await?;
    }
    let table_exists: bool = tx
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{s}.schema_version")],
        )
        .await?
        .get(0);
    if !table_exists {
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {s}.schema_version (\
                 version    integer PRIMARY KEY, \
                 applied_at timestamptz NOT NULL DEFAULT now(), \
                 library    text NOT NULL)"
        ))
        .await?;
    }

    let from: i32 = tx
        .query_one(
            &format!("SELECT COALESCE(max(version), 0) FROM {s}.schema_version"),
            &[],
        )
        .await?
        .get(0);
    if from > LATEST_VERSION {
        return Err(MigrateError::Storage(StorageError::Backend {
            message: format!(
                "postgres schema `{schema}` is at version {from}, newer than this library \
                 knows ({LATEST_VERSION}); upgrade aiecs-storage"
            ),
            transient: false,
            source: None,
        }));
    }
    let library = concat!("aiecs-storage ", env!("CARGO_PKG_VERSION"));
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from.max(0) as usize) {
        tx.batch_execute(
            &sql.replace("{s}", &s)
                .replace("{channel}", &channel(schema)),
        )
        .await?;
        let version = i as i32 + 1;
        tx.execute(
            &format!("INSERT INTO {s}.schema_version (version, library) VALUES ($1, $2)"),
            &[&version, &library],
        )
        .await?;
    }
    let logged: bool = tx
        .query_one(&FEED_ENABLED.replace("{s}", &s), &[])
        .await?
        .get(0);
    if feed && !logged {
        tx.batch_execute(&ENABLE_FEED.replace("{s}", &s)).await?;
    }
    Ok(Migrated {
        from,
        to: LATEST_VERSION.max(from),
        logged: logged || feed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["aiecs", "_x", "a1_b2", &"a".repeat(63)] {
            assert!(validate_schema(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Aiecs",
            "a-b",
            "a b",
            "a\"b",
            "é",
            &"a".repeat(64),
        ] {
            match validate_schema(bad) {
                Err(StorageError::InvalidInput { field, .. }) => assert_eq!(field, "schema"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn channels_are_identifiers_postgres_keeps_whole() {
        assert_eq!(channel("aiecs"), "aiecs_changes_aiecs");
        let longest_direct = "a".repeat(48);
        assert_eq!(
            channel(&longest_direct),
            format!("aiecs_changes_{longest_direct}")
        );
        let long = "b".repeat(63);
        let hashed = channel(&long);
        assert_eq!(hashed.len(), MAX_CHANNEL_BYTES);
        assert!(hashed.starts_with(&format!("aiecs_changes_{}_", "b".repeat(32))));
        assert_ne!(hashed, channel(&"b".repeat(62)));
        assert_eq!(hashed, channel(&long));
        for name in [longest_direct.as_str(), &long, "a", "x_1"] {
            assert!(validate_schema(&channel(name)).is_ok(), "{name}");
        }
    }

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(lock_key("aiecs"), lock_key("aiecs"));
        assert_ne!(lock_key("aiecs"), lock_key("aiecs2"));
    }
}
