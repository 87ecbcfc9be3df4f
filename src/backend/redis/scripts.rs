//! Lua scripts for the steps that must be atomic. Each touches the keys of one session or
//! one thread only (one hash tag, so one cluster slot).
//!
//! Numbers cross into Lua as strings and are written back as the same strings: Lua's
//! own number formatting (`%.14g`) would turn a microsecond timestamp into `1.7e+15`.

use std::sync::LazyLock;

/// A script's source and its SHA1, for `EVALSHA` and for loading it again.
pub struct Lua {
    /// The Lua source.
    pub source: String,
    /// Its SHA1, as `EVALSHA` wants it.
    pub hash: String,
}

impl Lua {
    fn new(source: impl Into<String>) -> Lua {
        let source = source.into();
        let hash = redis::Script::new(&source).get_hash().to_owned();
        Lua { source, hash }
    }
}

/// Shared by every script that writes a session's keys (KEYS are the four session keys):
/// gives every one of them the session TTL (ms; 0 keeps them until cleanup). One
/// definition, so no write path can leave the history or its ids without the expiry
/// the session hash has: they would outlive it and leak into a session re-created
/// under the same id.
const EXPIRE: &str = r#"
local function expire(ttl)
  if tonumber(ttl) > 0 then
    for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
"#;

/// Shared by every session-scoped script that moves `updated_at` (needs [`EXPIRE`]):
/// moves it, refreshes the TTL of every session key, and says whether the cleanup
/// index is due for a refresh (its score may lag `updated_at` by up to one granularity,
/// never lead it).
const TOUCH: &str = r#"
local function touch(now, ttl, granularity, indexed_at)
  redis.call('HSET', KEYS[1], 'updated_at', now)
  expire(ttl)
  local indexed = tonumber(indexed_at or redis.call('HGET', KEYS[1], 'indexed_at') or '0')
  if tonumber(now) - indexed >= tonumber(granularity) then
    redis.call('HSET', KEYS[1], 'indexed_at', now)
    return 1
  end
  return 0
end
"#;

/// Creates or upserts a session. ARGV: user, now, ttl ms, then `m:key`/JSON pairs.
/// Returns the session hash after an upsert, 0 for a new session (whose every field the
/// caller knows: no hash to send back and parse).
pub static CREATE_SESSION: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        r#"{EXPIRE}
local s = KEYS[1]
local existed = redis.call('EXISTS', s) == 1
if existed then
  for _, f in ipairs(redis.call('HKEYS', s)) do
    if string.sub(f, 1, 2) == 'm:' then redis.call('HDEL', s, f) end
  end
  redis.call('HSET', s, 'user_id', ARGV[1], 'updated_at', ARGV[2], 'indexed_at', ARGV[2])
else
  redis.call('HSET', s, 'user_id', ARGV[1], 'created_at', ARGV[2], 'updated_at', ARGV[2],
    'indexed_at', ARGV[2], 'status', 'active', 'request_count', '0',
    'total_processing_time', '0', 'error_count', '0')
end
for i = 4, #ARGV, 2 do redis.call('HSET', s, ARGV[i], ARGV[i + 1]) end
expire(ARGV[3])
if existed then return redis.call('HGETALL', s) end
return 0
"#
    ))
});

/// Applies a session update. ARGV: add_requests, add_time, add_errors, status or '',
/// now, ttl ms, index granularity µs, then `m:key`/JSON pairs. Returns -1 when the
/// session is missing, else whether the index needs a refresh (0/1).
///
/// Counters saturate (see `SessionUpdate`) and the update applies in full or not at all:
/// a script error does not undo earlier writes, so the stored counters are checked before
/// the first write (one HMGET, which also reads `indexed_at` for `touch` and stands in for
/// EXISTS: an update costs no more calls than before saturation), and after it every step is a `pcall` whose failure (an overflowing
/// `HINCRBY`) or infinite result (`HINCRBYFLOAT` adds in long double, so it can exceed
/// f64) writes the maximum instead. Lua numbers are doubles, so i64 sums are left to
/// Redis.
pub static UPDATE_SESSION: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        r#"{EXPIRE}{TOUCH}
local s = KEYS[1]
local c = redis.call('HMGET', s, 'request_count', 'total_processing_time', 'error_count',
  'indexed_at')
if not (c[1] or c[2] or c[3]) and redis.call('EXISTS', s) == 0 then return -1 end
local function count(v) return v and string.match(v, '^%d+$') end
if not (count(c[1]) and c[2] and tonumber(c[2]) and count(c[3])) then
  return redis.error_reply('ERR stored session counters are not numbers')
end
local function add(field, by)
  if by ~= '0' and type(redis.pcall('HINCRBY', s, field, by)) == 'table' then
    redis.call('HSET', s, field, '9223372036854775807')
  end
end
add('request_count', ARGV[1])
if ARGV[2] ~= '0' then
  local t = redis.pcall('HINCRBYFLOAT', s, 'total_processing_time', ARGV[2])
  local n = type(t) == 'string' and tonumber(t)
  if not n or n > 1.7976931348623157e308 then
    redis.call('HSET', s, 'total_processing_time', '1.7976931348623157e308')
  end
end
add('error_count', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', s, 'status', ARGV[4]) end
for i = 8, #ARGV, 2 do redis.call('HSET', s, ARGV[i], ARGV[i + 1]) end
return touch(ARGV[5], ARGV[6], ARGV[7], c[4])
"#
    ))
});

/// Appends a message if the session exists and the id is new. ARGV: message id,
/// message JSON, now, ttl ms, index granularity µs. Returns -1 when the session is
/// missing, else whether the index needs a refresh.
pub static ADD_MESSAGE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        r#"{EXPIRE}{TOUCH}
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[3], ARGV[1]) == 1 then redis.call('RPUSH', KEYS[2], ARGV[2]) end
return touch(ARGV[3], ARGV[4], ARGV[5])
"#
    ))
});

/// Writes a session exactly. KEYS: the four session keys. ARGV: user, created_at,
/// updated_at, status, request_count, total_processing_time, error_count, ttl ms, then
/// `m:key`/JSON pairs.
pub static RESTORE_SESSION: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        r#"{EXPIRE}
local s = KEYS[1]
redis.call('DEL', s)
redis.call('HSET', s, 'user_id', ARGV[1], 'created_at', ARGV[2], 'updated_at', ARGV[3],
  'indexed_at', ARGV[3], 'status', ARGV[4], 'request_count', ARGV[5],
  'total_processing_time', ARGV[6], 'error_count', ARGV[7])
for i = 9, #ARGV, 2 do redis.call('HSET', s, ARGV[i], ARGV[i + 1]) end
expire(ARGV[8])
return 1
"#
    ))
});

/// Appends messages with their own ids, skipping known ids. KEYS: the four session keys.
/// ARGV: ttl ms, then id/JSON pairs. Returns -1 when the session is missing, else how
/// many were stored.
///
/// The TTL is refreshed on every key as an append does, though `updated_at` stays: a
/// restore runs after `RESTORE_SESSION`, whose `PEXPIRE` skipped the message keys that
/// did not exist yet.
pub static RESTORE_MESSAGES: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        r#"{EXPIRE}
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local stored = 0
for i = 2, #ARGV, 2 do
  if redis.call('SADD', KEYS[3], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i + 1])
    stored = stored + 1
  end
end
expire(ARGV[1])
return stored
"#
    ))
});

/// Removes a session if it has been idle since before ARGV[1] (µs). Returns -1 when it
/// was already gone, 0 when it was removed, or its `updated_at` when it is still live
/// (so the caller can correct the index).
pub static CLEANUP_SESSION: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local updated = redis.call('HGET', KEYS[1], 'updated_at')
if not updated then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  return -1
end
if tonumber(updated) < tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  return 0
end
return tonumber(updated)
"#,
    )
});

/// Stores or updates a checkpoint. KEYS: seq, order, checkpoints, registry. ARGV: id,
/// record JSON, created_at (µs), ttl ms, and '1' to overwrite created_at of an existing
/// id (a restore) rather than keep it (a store). Returns 2 when the thread is new (its
/// registry did not exist), else 1.
pub static STORE_CHECKPOINT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
if redis.call('ZSCORE', KEYS[2], ARGV[1]) == false then
  local seq = redis.call('INCR', KEYS[1])
  redis.call('ZADD', KEYS[2], seq, ARGV[1])
  redis.call('HSET', KEYS[3], 'c:' .. ARGV[1], ARGV[3])
end
redis.call('HSET', KEYS[3], 'r:' .. ARGV[1], ARGV[2])
if ARGV[5] == '1' then redis.call('HSET', KEYS[3], 'c:' .. ARGV[1], ARGV[3]) end
local fresh = redis.call('EXISTS', KEYS[4]) == 0
redis.call('SADD', KEYS[4], KEYS[2], KEYS[3])
if tonumber(ARGV[4]) > 0 then
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
end
if fresh then return 2 end
return 1
"#,
    )
});

/// One checkpoint: ARGV[1] its id, or '' for the latest. KEYS: order, checkpoints.
/// Returns {id, record, created_at} or nil.
pub static GET_CHECKPOINT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local id = ARGV[1]
if id == '' then
  local newest = redis.call('ZREVRANGE', KEYS[1], 0, 0)
  if #newest == 0 then return false end
  id = newest[1]
end
local v = redis.call('HMGET', KEYS[2], 'r:' .. id, 'c:' .. id)
if not v[1] then return false end
return {id, v[1], v[2]}
"#,
    )
});

/// Stores pending writes, keeping each one's first sequence. KEYS: seq, order, values,
/// registry. ARGV: ttl ms, then field/JSON pairs. Returns 2 when the thread is new, else 1.
pub static PUT_WRITES: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
for i = 2, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) == false then
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[1]), ARGV[i])
  end
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
local fresh = redis.call('EXISTS', KEYS[4]) == 0
redis.call('SADD', KEYS[4], KEYS[2], KEYS[3])
if tonumber(ARGV[1]) > 0 then
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
if fresh then return 2 end
return 1
"#,
    )
});

/// Stores a task context. KEYS: context. ARGV: JSON, ttl ms ('0': none). Returns 2 when
/// the context is new, else 1.
pub static STORE_CONTEXT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local fresh = redis.call('EXISTS', KEYS[1]) == 0
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if fresh then return 2 end
return 1
"#,
    )
});

/// Counts a thread's checkpoints and pending writes. KEYS: registry. Returns {checkpoints,
/// writes}.
pub static COUNT_THREAD: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local checkpoints, writes = 0, 0
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if string.sub(k, -12) == ':checkpoints' then
    checkpoints = checkpoints + redis.call('HLEN', k) / 2
  elseif string.sub(k, -7) == ':values' then
    writes = writes + redis.call('HLEN', k)
  end
end
return {checkpoints, writes}
"#,
    )
});

/// The pending writes of a checkpoint in first-stored order. KEYS: order, values.
pub static GET_WRITES: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local out = {}
for _, f in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = redis.call('HGET', KEYS[2], f)
end
return out
"#,
    )
});

/// Deletes every key of a thread. KEYS: registry, seq.
pub static DELETE_THREAD: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local keys = redis.call('SMEMBERS', KEYS[1])
for _, k in ipairs(keys) do redis.call('DEL', k) end
redis.call('DEL', KEYS[1], KEYS[2])
return #keys
"#,
    )
});

/// Corrects the cleanup index after a cleanup pass. KEYS: the session index buckets of
/// one slot, by update and by id. ARGV: cutoff, then id/updated_at pairs; updated_at 0
/// means the session is gone: its entries are removed unless a concurrent create has
/// already moved it past the cutoff.
pub static FIX_INDEX: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] ~= '0' then
    redis.call('ZADD', KEYS[1], 'GT', ARGV[i + 1], ARGV[i])
    redis.call('ZADD', KEYS[2], 0, ARGV[i])
  else
    local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if score and tonumber(score) < tonumber(ARGV[1]) then
      redis.call('ZREM', KEYS[1], ARGV[i])
      redis.call('ZREM', KEYS[2], ARGV[i])
    end
  end
end
return 1
"#,
    )
});

/// Indexes a session. KEYS: its session index buckets, by update and by id (one slot).
/// ARGV: score (µs), id, and 'GT' to only move the score forward or 'exact' to set it
/// (a restore, which may be older than a stale entry).
///
/// Adding the id every time, not only at creation, heals an id index that misses a
/// session written by an older version after the upgrade copied the rest.
pub static INDEX_SESSION: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
if ARGV[3] == 'exact' then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('ZADD', KEYS[1], 'GT', ARGV[1], ARGV[2])
end
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return 1
"#,
    )
});

/// Removes a session from both its index buckets. KEYS: by update, by id. ARGV: id.
pub static UNINDEX_SESSION: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"#,
    )
});

/// Deletes a session's keys. KEYS: the four session keys. Returns 1 if the session
/// existed.
pub static DELETE_SESSION: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local existed = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return existed
"#,
    )
});

/// Moves one index bucket from an older layout (see `keys::Index::upgrade_keys`).
/// KEYS: the old key, the new sorted set. A plain set (contexts, threads) is moved and
/// removed, so a second run, or a set an older process wrote since, costs nothing or
/// moves only what is there. The session cleanup index stays: its ids are copied when
/// the id index is empty and it is not, which in this layout means an older store (both
/// gain and lose an id together; copying stale ids is harmless, listing skips them).
/// No marker key: it would outlive every record. Returns how many ids it copied.
pub static UPGRADE_INDEX: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ids
if redis.call('TYPE', KEYS[1]).ok == 'zset' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
  ids = redis.call('ZRANGE', KEYS[1], 0, -1)
else
  ids = redis.call('SMEMBERS', KEYS[1])
end
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[2], 0, id) end
if redis.call('TYPE', KEYS[1]).ok == 'set' then redis.call('DEL', KEYS[1]) end
return #ids
"#,
    )
});

/// Every script, for loading them at `initialize()` and after a server lost its cache.
pub fn all() -> [&'static Lua; 18] {
    [
        &CREATE_SESSION,
        &UPDATE_SESSION,
        &ADD_MESSAGE,
        &CLEANUP_SESSION,
        &STORE_CHECKPOINT,
        &GET_CHECKPOINT,
        &PUT_WRITES,
        &GET_WRITES,
        &DELETE_THREAD,
        &FIX_INDEX,
        &COUNT_THREAD,
        &RESTORE_SESSION,
        &RESTORE_MESSAGES,
        &INDEX_SESSION,
        &UNINDEX_SESSION,
        &DELETE_SESSION,
        &UPGRADE_INDEX,
        &STORE_CONTEXT,
    ]
}
