//! Reliability under real server faults: the stack keeps answering and loses nothing it
//! acknowledged when
//!
//! 1. the Redis primary of a failover stack (Redis -> SQLite) is SIGKILLed under 32
//!    concurrent writers and readers and restarted on the same port: no call fails,
//!    every acknowledged message is found afterwards (through the stack and in the
//!    restarted Redis itself), and the primary serves again, and keeps serving under
//!    the same load, once the kept writes are replayed. The server persists with an
//!    append-only file fsynced before each reply: the layer assumes a primary keeps
//!    what it acknowledged, and a Redis without persistence restarts empty;
//! 2. the pooled PostgreSQL connections behind a retry layer are terminated
//!    (`pg_terminate_backend`) over and over under 16 concurrent writers: appends are
//!    all stored exactly once, and counter increments, which retry does not repeat after
//!    an ambiguous failure, are never over-counted;
//! 3. a server hangs (accepts and never answers): calls through a timeout layer fail
//!    with `Timeout` within a bounded time, one after another and concurrently, and the
//!    same backend instance works again when the server (a proxy to the real one)
//!    resumes.
//!
//! Test 1 starts its own `redis-server` (it must be on PATH; skipped with a notice
//! otherwise, a failure under `CI=true`). Test 2 and the recovery halves of test 3 need
//! `AIECS_TEST_POSTGRES_URL` / `AIECS_TEST_REDIS_URL` (skipped with a notice when unset).
#![cfg(all(feature = "redis", feature = "postgres", feature = "sqlite"))]

mod common;
#[path = "reliability_faults/servers.rs"]
mod servers;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiecs_storage::layer::{FailoverLayer, RetryLayer, TimeoutLayer};
use aiecs_storage::prelude::*;
use aiecs_storage::{
    ErrorKind, Metadata, NewMessage, PostgresBackend, RedisBackend, SessionUpdate, SqliteBackend,
    StorageError,
};
use tower::Layer;

use servers::{host_port, with_address, with_params, HungServer, Proxy, RedisServer};

/// The most a history read returns (the contract's maximum limit); each test checks it
/// stayed below, so a read saw a session's whole history.
const HISTORY_LIMIT: usize = 10_000;

fn figure(values: &Metadata, name: &str) -> u64 {
    values
        .get(name)
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("figure `{name}` missing from {values:?}"))
}

// ---------------------------------------------------------------------------------------
// 1b. Redis frozen (SIGSTOP) behind the README's order: retry -> timeout -> failover.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_frozen_fails_over_behind_an_outer_timeout() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let dir = tempfile::TempDir::new().unwrap();
    let prefix = format!("{}:", common::unique_name("frozen"));
    let fallback = Arc::new(SqliteBackend::new(dir.path().join("fallback.db")));
    // The layer's defaults but a short cooldown, so the test does not wait 10 s for the
    // replay; the primary's own deadline (1 s) is the default.
    let failover = FailoverLayer::new(fallback.clone()).with_cooldown(COOLDOWN);
    let primary = RedisBackend::new(&server.url())
        .unwrap()
        .with_prefix(prefix.as_str());
    let stack = tower::ServiceBuilder::new()
        .layer(RetryLayer::new())
        .layer(TimeoutLayer::new(Duration::from_secs(2)))
        .layer(failover.clone())
        .service(primary);
    stack.initialize().await.unwrap();
    stack
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();

    server.freeze(true);
    // Each read waits out the primary's deadline, then the fallback answers: well inside
    // the outer 2 s. Five failures open the breaker; then reads skip the primary.
    for i in 0..8 {
        let read = stack.get_session("s").await;
        assert!(
            matches!(read, Ok(Some(_))),
            "read {i} with Redis frozen: {read:?}"
        );
    }
    assert_eq!(failover.breaker_state(), "open");
    let metrics = stack.get_metrics().await.unwrap();
    let values = &metrics.components[0].components[0].values;
    assert_eq!(figure(values, "fallback_reads"), 8);
    // Five reads, and this metrics read's own bounded look at the frozen primary.
    assert_eq!(figure(values, "primary_timeouts"), 6);
    // A write made during the freeze is acknowledged from the fallback and kept.
    stack
        .create_session("s2", "u", &Metadata::new())
        .await
        .unwrap();
    assert!(fallback.get_session("s2").await.unwrap().is_some());

    server.freeze(false);
    wait_for("the replay to the thawed Redis", || {
        !failover.is_degraded() && failover.breaker_state() == "closed"
    })
    .await;
    let direct = RedisBackend::new(&server.url())
        .unwrap()
        .with_prefix(prefix.as_str());
    assert!(direct.get_session("s2").await.unwrap().is_some());
    assert!(stack.get_session("s2").await.unwrap().is_some());
}

// ---------------------------------------------------------------------------------------
// 1. Redis killed under load, behind failover to SQLite.
// ---------------------------------------------------------------------------------------

const FAILOVER_TASKS: usize = 32;
const FAILURE_THRESHOLD: u32 = 3;
const COOLDOWN: Duration = Duration::from_millis(250);

/// What one load task saw.
#[derive(Default)]
struct FailoverLog {
    /// (message id returned, content) of every acknowledged append.
    acked: Vec<(String, String)>,
    /// Calls that returned an error while the breaker had not yet been seen open.
    failed_before_open: u64,
    /// Calls that returned an error after the breaker had been seen open.
    failed_after_open: u64,
    /// Acknowledged messages a later read of the same session did not show (or the
    /// session itself missing).
    hidden: u64,
    calls: u64,
    errors: Vec<String>,
}

impl FailoverLog {
    fn failed(&mut self, e: &StorageError, opened: &AtomicBool) {
        if opened.load(Ordering::SeqCst) {
            self.failed_after_open += 1;
        } else {
            self.failed_before_open += 1;
        }
        if self.errors.len() < 5 {
            self.errors.push(e.to_string());
        }
    }
}

async fn failover_load(
    stack: Arc<dyn StorageBackend>,
    session: String,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicBool>,
    acked_total: Arc<AtomicU64>,
) -> FailoverLog {
    let mut log = FailoverLog::default();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        // The content is unique, so a message stored twice under two ids shows too.
        let content = format!("{session}-m{i}");
        log.calls += 1;
        match stack
            .add_conversation_message(&session, &NewMessage::new("user", content.as_str()))
            .await
        {
            Ok(id) => {
                log.acked.push((id, content));
                acked_total.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => log.failed(&e, &opened),
        }
        log.calls += 1;
        if i.is_multiple_of(8) {
            match stack
                .get_conversation_history(&session, HISTORY_LIMIT)
                .await
            {
                Ok(history) => {
                    let seen: HashSet<&str> =
                        history.iter().map(|m| m.message_id.as_str()).collect();
                    log.hidden += log
                        .acked
                        .iter()
                        .filter(|(id, _)| !seen.contains(id.as_str()))
                        .count() as u64;
                }
                Err(e) => log.failed(&e, &opened),
            }
        } else {
            match stack.get_session(&session).await {
                Ok(Some(_)) => {}
                Ok(None) => log.hidden += 1,
                Err(e) => log.failed(&e, &opened),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_load_failover_loses_nothing_acknowledged() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let dir = tempfile::TempDir::new().unwrap();
    let prefix = format!("{}:", common::unique_name("failover"));
    let fallback = Arc::new(SqliteBackend::new(dir.path().join("fallback.db")));
    let failover = FailoverLayer::new(fallback)
        .with_failure_threshold(FAILURE_THRESHOLD)
        .with_cooldown(COOLDOWN);
    let primary = RedisBackend::new(&server.url())
        .unwrap()
        .with_prefix(prefix.as_str())
        .with_response_timeout(Duration::from_secs(3));
    let stack: Arc<dyn StorageBackend> = Arc::new(failover.layer(primary));
    stack.initialize().await.unwrap();
    let sessions: Vec<String> = (0..FAILOVER_TASKS).map(|t| format!("s{t}")).collect();
    for s in &sessions {
        stack
            .create_session(s, "load", &Metadata::new())
            .await
            .unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicU64::new(0));
    // Records when the breaker is first seen open, to split failures before and after.
    let monitor = {
        let (failover, stop, opened) = (failover.clone(), stop.clone(), opened.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if failover.breaker_state() == "open" {
                    opened.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let tasks: Vec<_> = sessions
        .iter()
        .map(|s| {
            tokio::spawn(failover_load(
                stack.clone(),
                s.clone(),
                stop.clone(),
                opened.clone(),
                acked_total.clone(),
            ))
        })
        .collect();

    // Phases end on progress, not on a clock: under a loaded CI machine a fixed sleep
    // may see no call complete at all.
    wait_for("500 appends before the kill", || {
        acked_total.load(Ordering::SeqCst) >= 500
    })
    .await;
    let acked_before_kill = acked_total.load(Ordering::SeqCst);
    server.kill();
    let killed = Instant::now();
    wait_for(
        "the breaker to open and 300 appends during the outage",
        || {
            opened.load(Ordering::SeqCst)
                && failover.is_degraded()
                && acked_total.load(Ordering::SeqCst) >= acked_before_kill + 300
        },
    )
    .await;
    let acked_during_outage = acked_total.load(Ordering::SeqCst) - acked_before_kill;
    let opened_during_outage = opened.load(Ordering::SeqCst);
    let degraded_during_outage = failover.is_degraded();
    let pending_at_restart = failover.pending_writes();

    server.restart().await;
    let restarted = Instant::now();
    // The load keeps going until the layer has replayed the kept writes and serves from
    // the primary again.
    let deadline = restarted + Duration::from_secs(20);
    while failover.is_degraded()
        || failover.breaker_state() != "closed"
        || failover.pending_writes() != 0
    {
        assert!(
            Instant::now() < deadline,
            "the primary did not serve again within 20 s of the restart: breaker {}, \
             degraded {}, {} writes pending",
            failover.breaker_state(),
            failover.is_degraded(),
            failover.pending_writes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered_after = restarted.elapsed();
    let outage = killed.elapsed();
    // With the primary back, the load keeps going: writes must now reach the primary
    // directly, not keep being queued in the fallback and replayed one batch at a time.
    let replayed_at_recovery = figure(
        &stack.get_metrics().await.unwrap().values,
        "replayed_writes",
    );
    let acked_at_recovery = acked_total.load(Ordering::SeqCst);
    let (mut samples, mut degraded_samples) = (0u32, 0u32);
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(500) {
        samples += 1;
        degraded_samples += u32::from(failover.is_degraded());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let replayed_in_window = figure(
        &stack.get_metrics().await.unwrap().values,
        "replayed_writes",
    ) - replayed_at_recovery;
    let acked_in_window = acked_total.load(Ordering::SeqCst) - acked_at_recovery;
    stop.store(true, Ordering::SeqCst);
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.unwrap());
    }
    monitor.await.unwrap();

    // A write queued by a call racing the end of the replay waits for the next call:
    // a read lets it through before the primary is checked.
    stack.get_session(&sessions[0]).await.unwrap();
    assert!(!failover.is_degraded() && failover.pending_writes() == 0);
    let fresh = stack
        .add_conversation_message(&sessions[0], &NewMessage::new("user", "after recovery"))
        .await
        .unwrap();
    assert!(
        !failover.is_degraded(),
        "the fresh write went to the fallback"
    );

    // Every acknowledged message, through the stack (now reading the primary) and in the
    // restarted Redis directly.
    let direct = RedisBackend::new(&server.url())
        .unwrap()
        .with_prefix(prefix.as_str());
    let (mut acked, mut missing_stack, mut missing_redis, mut duplicates) = (0, 0, 0, 0);
    for (session, log) in sessions.iter().zip(&logs) {
        let through_stack = stack
            .get_conversation_history(session, HISTORY_LIMIT)
            .await
            .unwrap();
        let in_redis = direct
            .get_conversation_history(session, HISTORY_LIMIT)
            .await
            .unwrap();
        assert!(through_stack.len() < HISTORY_LIMIT && in_redis.len() < HISTORY_LIMIT);
        for history in [&through_stack, &in_redis] {
            let mut by_id: HashMap<&str, u32> = HashMap::new();
            let mut by_content: HashMap<&str, u32> = HashMap::new();
            for m in history.iter() {
                *by_id.entry(&m.message_id).or_default() += 1;
                *by_content.entry(&m.content).or_default() += 1;
            }
            duplicates += by_id.values().filter(|&&n| n > 1).count();
            duplicates += by_content.values().filter(|&&n| n > 1).count();
        }
        let ids = |h: &[aiecs_storage::Message]| -> HashMap<String, String> {
            h.iter()
                .map(|m| (m.message_id.clone(), m.content.clone()))
                .collect()
        };
        let (stack_ids, redis_ids) = (ids(&through_stack), ids(&in_redis));
        for (id, content) in &log.acked {
            acked += 1;
            if stack_ids.get(id) != Some(content) {
                missing_stack += 1;
            }
            if redis_ids.get(id) != Some(content) {
                missing_redis += 1;
            }
        }
    }
    let fresh_in_redis = direct
        .get_conversation_history(&sessions[0], HISTORY_LIMIT)
        .await
        .unwrap()
        .iter()
        .any(|m| m.message_id == fresh);

    let metrics = stack.get_metrics().await.unwrap();
    let values = &metrics.values;
    let primary_failures = figure(values, "primary_failures");
    let replayed = figure(values, "replayed_writes");
    let dropped = figure(values, "dropped_writes");
    let fallback_write_failures = figure(values, "fallback_write_failures");
    let sum = |f: fn(&FailoverLog) -> u64| logs.iter().map(f).sum::<u64>();
    let failed_before_open = sum(|l| l.failed_before_open);
    let failed_after_open = sum(|l| l.failed_after_open);
    let hidden = sum(|l| l.hidden);
    let calls = sum(|l| l.calls);
    let errors: Vec<&String> = logs.iter().flat_map(|l| &l.errors).take(5).collect();
    // The breaker opens at FAILURE_THRESHOLD consecutive failures; every task may have
    // had one call admitted before it opened (failing after) and one success landing
    // late that resets the count; once open, only one probe per cooldown reaches the
    // primary.
    let probes = (outage.as_millis() / COOLDOWN.as_millis()) as u64 + 2;
    let primary_failure_bound = u64::from(FAILURE_THRESHOLD) + 2 * FAILOVER_TASKS as u64 + probes;

    println!(
        "redis kill: {FAILOVER_TASKS} tasks, {calls} calls; acknowledged appends: {acked} \
         ({acked_before_kill} before the kill, {acked_during_outage} during the outage); \
         breaker opened during outage: {opened_during_outage}, degraded: \
         {degraded_during_outage}, {pending_at_restart} writes pending at restart; \
         served by the primary {:.0} ms after the restart ({:.0} ms after the kill); in \
         the next 500 ms of load: {acked_in_window} appends, {replayed_in_window} of them \
         kept for replay instead of reaching the primary, layer degraded in \
         {degraded_samples} of {samples} samples",
        recovered_after.as_secs_f64() * 1000.0,
        outage.as_secs_f64() * 1000.0
    );
    println!(
        "redis kill: failed calls before the breaker opened: {failed_before_open} (bound 0), \
         after: {failed_after_open} (must be 0); primary failures {primary_failures} \
         (bound {primary_failure_bound}); replayed writes {replayed}, dropped {dropped}, \
         fallback write failures {fallback_write_failures}; acknowledged messages missing \
         through the stack: {missing_stack}, in the restarted Redis: {missing_redis}; \
         duplicates: {duplicates}; hidden from a read during the run: {hidden}; fresh \
         write in the restarted Redis: {fresh_in_redis}; first errors: {errors:?}"
    );

    assert!(acked_before_kill > 0 && acked_during_outage > 0);
    assert!(
        opened_during_outage && degraded_during_outage && pending_at_restart > 0,
        "the kill did not take the primary out"
    );
    // Bound 0 before the breaker opened too: a call whose primary attempt fails with a
    // transient error is answered by the fallback within the same call, so the breaker
    // only decides which backend is tried first, never whether the call fails.
    assert_eq!(failed_before_open, 0, "{errors:?}");
    assert_eq!(failed_after_open, 0, "{errors:?}");
    assert!(
        primary_failures <= primary_failure_bound,
        "the breaker let {primary_failures} calls reach the dead primary"
    );
    assert_eq!(hidden, 0, "a read did not show an acknowledged write");
    assert_eq!(missing_stack, 0);
    assert_eq!(missing_redis, 0);
    assert_eq!(duplicates, 0);
    assert!(replayed > 0 && dropped == 0 && fallback_write_failures == 0);
    assert!(
        fresh_in_redis,
        "a write after recovery did not land in Redis"
    );
    // Once the primary serves again it keeps serving under the same load: at most one
    // write per task may race the end of the replay into the queue.
    assert!(
        acked_in_window > 0 && replayed_in_window <= FAILOVER_TASKS as u64,
        "after recovery {replayed_in_window} of {acked_in_window} writes still went \
         through the fallback and the replay queue"
    );
    stack.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 2. PostgreSQL connections terminated under load, behind retry.
// ---------------------------------------------------------------------------------------

const PG_TASKS: usize = 16;

/// Terminates the connections of one application name: this test's pool only, never
/// another test's running in parallel.
const TERMINATE: &str = "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) AS done \
     FROM pg_stat_activity WHERE datname = current_database() \
     AND pid <> pg_backend_pid() AND application_name = $1) t WHERE done";

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("an admin connection to the test server");
    tokio::spawn(connection);
    client
}

async fn drop_schema(client: &tokio_postgres::Client, schema: &str) {
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .expect("drop the test schema");
}

#[derive(Default)]
struct PgLog {
    attempted: Vec<String>,
    acked: Vec<String>,
    failed_appends: Vec<String>,
    increments_attempted: u64,
    increments_acked: u64,
    /// Increments that failed with a transient error: they may or may not have landed.
    increments_ambiguous: u64,
    permanent_errors: Vec<String>,
}

async fn pg_load(
    stack: Arc<dyn StorageBackend>,
    task: usize,
    session: String,
    stop: Arc<AtomicBool>,
    ambiguous_total: Arc<AtomicU64>,
) -> PgLog {
    let mut log = PgLog::default();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let id = format!("t{task}-m{i}");
        log.attempted.push(id.clone());
        let message = NewMessage::new("user", format!("message {i}")).with_id(id.as_str());
        match stack.add_conversation_message(&session, &message).await {
            Ok(returned) => {
                assert_eq!(returned, id);
                log.acked.push(id);
            }
            Err(e) => log.failed_appends.push(format!("{id}: {e}")),
        }
        log.increments_attempted += 1;
        match stack
            .update_session(&session, &SessionUpdate::new().increment_requests())
            .await
        {
            Ok(true) => log.increments_acked += 1,
            Ok(false) => log.permanent_errors.push(format!("{session} vanished")),
            Err(e) if e.is_transient() => {
                log.increments_ambiguous += 1;
                ambiguous_total.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => log.permanent_errors.push(e.to_string()),
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_terminated_under_load_store_once_and_never_overcount() {
    let Some(url) = common::server_url("AIECS_TEST_POSTGRES_URL", "reliability_faults") else {
        return;
    };
    let schema = common::unique_name("pgkill");
    // The pool's connections carry the schema's unique name as application_name (the
    // URL parameter reaches the server), which is what the terminator matches.
    let app = schema.clone();
    let admin = Arc::new(admin(&url).await);
    let backend = PostgresBackend::new(&with_params(
        &url,
        &[
            ("schema", schema.as_str()),
            ("application_name", app.as_str()),
        ],
    ))
    .unwrap()
    .with_pool_size(8)
    .with_max_overflow(8);
    let retry = RetryLayer::new()
        .with_max_attempts(10)
        .with_min_delay(Duration::from_millis(5))
        .with_max_delay(Duration::from_millis(100))
        .with_max_elapsed(Duration::from_secs(10));
    let stack: Arc<dyn StorageBackend> = Arc::new(retry.layer(backend));
    stack.initialize().await.unwrap();
    let sessions: Vec<String> = (0..PG_TASKS).map(|t| format!("s{t}")).collect();
    for s in &sessions {
        stack
            .create_session(s, "load", &Metadata::new())
            .await
            .unwrap();
    }

    let stop_load = Arc::new(AtomicBool::new(false));
    let stop_killer = Arc::new(AtomicBool::new(false));
    let terminated = Arc::new(AtomicU64::new(0));
    let ambiguous_total = Arc::new(AtomicU64::new(0));
    let killer = {
        let (admin, app, stop, terminated) = (
            admin.clone(),
            app.clone(),
            stop_killer.clone(),
            terminated.clone(),
        );
        tokio::spawn(async move {
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let n: i64 = admin.query_one(TERMINATE, &[&app]).await.unwrap().get(0);
                terminated.fetch_add(n as u64, Ordering::SeqCst);
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            rounds
        })
    };
    let tasks: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(t, s)| {
            tokio::spawn(pg_load(
                stack.clone(),
                t,
                s.clone(),
                stop_load.clone(),
                ambiguous_total.clone(),
            ))
        })
        .collect();

    // At least 3 s, and on until the fault has reached callers a few times (a retry or an
    // ambiguous increment), so the run always exercises what it checks.
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let hits = retry.retries() + ambiguous_total.load(Ordering::SeqCst);
        if started.elapsed() >= Duration::from_secs(3) && hits >= 5 {
            break;
        }
        if started.elapsed() >= Duration::from_secs(15) {
            break;
        }
    }
    stop_load.store(true, Ordering::SeqCst);
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.unwrap());
    }
    stop_killer.store(true, Ordering::SeqCst);
    let rounds = killer.await.unwrap();
    let retries = retry.retries();

    // Read back over a pool of its own, which nothing terminates.
    let reader = PostgresBackend::new(&with_params(&url, &[("schema", schema.as_str())]))
        .unwrap()
        .with_pool_size(1)
        .with_max_overflow(1);
    let mut stored_total = 0usize;
    let mut duplicate_ids = 0usize;
    let mut missing = 0usize;
    let mut unexpected = 0usize;
    let mut counters = Vec::new();
    for (session, log) in sessions.iter().zip(&logs) {
        let history = reader
            .get_conversation_history(session, HISTORY_LIMIT)
            .await
            .unwrap();
        assert!(history.len() < HISTORY_LIMIT);
        stored_total += history.len();
        let mut by_id: HashMap<&str, u32> = HashMap::new();
        for m in &history {
            *by_id.entry(&m.message_id).or_default() += 1;
        }
        duplicate_ids += by_id.values().filter(|&&n| n > 1).count();
        missing += log
            .acked
            .iter()
            .filter(|id| !by_id.contains_key(id.as_str()))
            .count();
        let attempted: HashSet<&str> = log.attempted.iter().map(String::as_str).collect();
        unexpected += by_id.keys().filter(|id| !attempted.contains(*id)).count();
        let count = reader
            .get_session(session)
            .await
            .unwrap()
            .expect("the session survives")
            .metrics
            .request_count;
        counters.push((
            count,
            log.increments_acked,
            log.increments_ambiguous,
            log.increments_attempted,
        ));
    }
    reader.close().await.unwrap();
    stack.close().await.unwrap();
    drop_schema(&admin, &schema).await;

    let sum = |f: fn(&PgLog) -> usize| logs.iter().map(f).sum::<usize>();
    let acked = sum(|l| l.acked.len());
    let attempted = sum(|l| l.attempted.len());
    let failed_appends: Vec<&String> = logs.iter().flat_map(|l| &l.failed_appends).collect();
    let permanent: Vec<&String> = logs.iter().flat_map(|l| &l.permanent_errors).collect();
    let increments_acked: u64 = counters.iter().map(|c| c.1).sum();
    let ambiguous: u64 = counters.iter().map(|c| c.2).sum();
    let increments_attempted: u64 = counters.iter().map(|c| c.3).sum();
    let counted: u64 = counters.iter().map(|c| c.0).sum();
    let terminated = terminated.load(Ordering::SeqCst);
    println!(
        "pg terminate: {:.1} s, {rounds} terminate rounds, {terminated} connections \
         terminated, {retries} retries; appends: {attempted} attempted, {acked} \
         acknowledged, {} failed, {stored_total} stored, {missing} acknowledged missing, \
         {duplicate_ids} ids stored twice, {unexpected} never attempted; increments: \
         {increments_attempted} attempted, {increments_acked} acknowledged, {ambiguous} \
         failed ambiguously (transient, not retried), request_count total {counted} \
         (so {} of the ambiguous ones landed); permanent errors: {}",
        started.elapsed().as_secs_f64(),
        failed_appends.len(),
        counted.saturating_sub(increments_acked),
        permanent.len()
    );

    assert!(terminated > 0, "no connection was terminated");
    assert!(
        retries + ambiguous > 0,
        "the terminations never reached a caller: the run proves nothing"
    );
    // Appends carry their id, so retry repeats them after any transient failure: every one
    // must end acknowledged.
    assert!(failed_appends.is_empty(), "{failed_appends:?}");
    assert!(permanent.is_empty(), "{permanent:?}");
    assert_eq!(missing, 0);
    assert_eq!(duplicate_ids, 0);
    assert_eq!(unexpected, 0);
    assert_eq!(stored_total, acked);
    // An increment is repeated only after `Unavailable` (refused before it ran); after a
    // cut connection it is returned as a transient error and may or may not have landed.
    // So per session: acknowledged <= request_count <= acknowledged + ambiguous, and
    // never more than the increments attempted.
    for (session, (count, acked, ambiguous, attempted)) in sessions.iter().zip(&counters) {
        assert!(
            acked <= count && *count <= acked + ambiguous && count <= attempted,
            "{session}: request_count {count}, {acked} acknowledged, {ambiguous} ambiguous, \
             {attempted} attempted"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. A hung server, behind a timeout layer.
// ---------------------------------------------------------------------------------------

const DEADLINE: Duration = Duration::from_millis(300);
/// Generous: the layer's deadline plus scheduling on a loaded 2-core machine.
const BOUND: Duration = Duration::from_millis(1500);

/// One call of several kinds, so reads and writes are both bounded.
async fn some_call(b: &dyn StorageBackend, n: usize) -> aiecs_storage::Result<()> {
    let session = format!("hung-{n}");
    match n % 3 {
        0 => b.get_session(&session).await.map(drop),
        1 => b
            .create_session(&session, "u", &Metadata::new())
            .await
            .map(drop),
        _ => b
            .add_conversation_message(&session, &NewMessage::new("user", "x"))
            .await
            .map(drop),
    }
}

/// Asserts a call timed out within the bound; returns how long it took.
fn timed_out(what: &str, result: aiecs_storage::Result<()>, took: Duration) -> Duration {
    match result {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Timeout, "{what}: {e}"),
        Ok(()) => panic!("{what}: a hung server answered"),
    }
    assert!(took < BOUND, "{what} took {took:?} (bound {BOUND:?})");
    took
}

/// Several calls one after another, then several at once: every one a `Timeout` within
/// the bound. Returns the slowest.
async fn all_time_out(what: &str, b: &Arc<dyn StorageBackend>) -> Duration {
    let mut slowest = Duration::ZERO;
    for n in 0..5 {
        let started = Instant::now();
        let r = some_call(b.as_ref(), n).await;
        slowest = slowest.max(timed_out(what, r, started.elapsed()));
    }
    let started = Instant::now();
    let calls: Vec<_> = (0..8)
        .map(|n| {
            let b = b.clone();
            tokio::spawn(async move { some_call(b.as_ref(), n).await })
        })
        .collect();
    for c in calls {
        let r = c.await.unwrap();
        slowest = slowest.max(timed_out(what, r, started.elapsed()));
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_server_calls_time_out_within_bound() {
    let hung = HungServer::start().await;
    let redis = TimeoutLayer::new(DEADLINE);
    let postgres = TimeoutLayer::new(DEADLINE);
    let backends: [(&str, Arc<dyn StorageBackend>, &TimeoutLayer); 2] = [
        (
            "redis",
            Arc::new(redis.layer(RedisBackend::new(&format!("redis://{}", hung.addr)).unwrap())),
            &redis,
        ),
        (
            "postgres",
            Arc::new(postgres.layer(
                PostgresBackend::new(&format!("postgres://postgres@{}/test", hung.addr)).unwrap(),
            )),
            &postgres,
        ),
    ];
    for (name, backend, layer) in &backends {
        let slowest = all_time_out(name, backend).await;
        println!(
            "hung {name}: 13 calls (5 in a row, 8 at once) all failed with Timeout; slowest \
             {:.0} ms (deadline {} ms, bound {} ms); layer timeouts {}",
            slowest.as_secs_f64() * 1000.0,
            DEADLINE.as_millis(),
            BOUND.as_millis(),
            layer.timeouts()
        );
        assert_eq!(layer.timeouts(), 13);
    }
    println!("hung server: {} connections accepted", hung.accepted());
    // The calls reached the server: it hung, it did not refuse.
    assert!(hung.accepted() >= 2);
}

/// Drives one backend instance behind a proxy: hung from the start, forwarding, hung
/// again with its connections open, forwarding again. Returns the calls each recovery
/// took before the first success.
async fn hang_and_recover(
    name: &str,
    backend: Arc<dyn StorageBackend>,
    proxy: &Proxy,
) -> (u32, u32) {
    async fn until_ok<T, F: std::future::Future<Output = aiecs_storage::Result<T>>>(
        name: &str,
        mut call: impl FnMut() -> F,
    ) -> (T, u32) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut attempts = 0;
        loop {
            attempts += 1;
            match call().await {
                Ok(v) => return (v, attempts),
                Err(e) => {
                    assert!(e.is_transient(), "{name}: {e}");
                    assert!(
                        Instant::now() < deadline,
                        "{name}: no success within 15 s of the server resuming: {e}"
                    );
                }
            }
        }
    }
    let session = "recovering";
    let probe = |what: &'static str| {
        let backend = backend.clone();
        async move {
            for _ in 0..3 {
                let started = Instant::now();
                let r = backend.get_session(session).await.map(drop);
                timed_out(what, r, started.elapsed());
            }
        }
    };

    probe("hung before any connection").await;
    proxy.set_hang(false);
    let metadata = Metadata::new();
    let (_, first) = until_ok(name, || backend.create_session(session, "u", &metadata)).await;
    let message = NewMessage::new("user", "before the stall").with_id("m1");
    backend
        .add_conversation_message(session, &message)
        .await
        .unwrap();

    proxy.set_hang(true);
    probe("hung with open connections").await;
    proxy.set_hang(false);
    let (found, second) = until_ok(name, || backend.get_session(session)).await;
    assert!(
        found.is_some(),
        "{name}: the session written before the stall"
    );
    let message = NewMessage::new("user", "after the stall").with_id("m2");
    backend
        .add_conversation_message(session, &message)
        .await
        .unwrap();
    for _ in 0..5 {
        let history = backend.get_conversation_history(session, 10).await.unwrap();
        let ids: Vec<&str> = history.iter().map(|m| m.message_id.as_str()).collect();
        assert_eq!(ids, ["m1", "m2"], "{name}");
    }
    assert!(backend.delete_session(session).await.unwrap());
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_redis_recovers_the_same_instance_when_the_server_resumes() {
    let Some(url) = common::server_url("AIECS_TEST_REDIS_URL", "reliability_faults") else {
        return;
    };
    let proxy = Proxy::start(host_port(&url, 6379), true).await;
    let layer = TimeoutLayer::new(DEADLINE);
    let backend = RedisBackend::new(&with_address(&url, proxy.addr))
        .unwrap()
        .with_prefix(format!("{}:", common::unique_name("hung")))
        .with_session_ttl(Some(Duration::from_secs(3600)));
    let (first, second) = hang_and_recover("redis", Arc::new(layer.layer(backend)), &proxy).await;
    println!(
        "hung redis: 6 calls timed out within {} ms; calls to the first success: {first} \
         after the first connect hung, {second} after open connections stalled; layer \
         timeouts {}",
        BOUND.as_millis(),
        layer.timeouts()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_postgres_recovers_the_same_instance_when_the_server_resumes() {
    let Some(url) = common::server_url("AIECS_TEST_POSTGRES_URL", "reliability_faults") else {
        return;
    };
    let schema = common::unique_name("pghung");
    // The schema is created over a direct connection first, so the proxied backend's
    // first connection only checks the schema version: what is under test is recovery,
    // not how fast a migration runs through a 300 ms deadline.
    let direct = PostgresBackend::new(&url)
        .unwrap()
        .with_schema(schema.as_str())
        .unwrap()
        .with_pool_size(1);
    direct.initialize().await.unwrap();
    direct.close().await.unwrap();

    let proxy = Proxy::start(host_port(&url, 5432), true).await;
    let layer = TimeoutLayer::new(DEADLINE);
    let backend = PostgresBackend::new(&with_address(&url, proxy.addr))
        .unwrap()
        .with_schema(schema.as_str())
        .unwrap()
        .with_pool_size(2)
        .with_max_overflow(2);
    let backend: Arc<dyn StorageBackend> = Arc::new(layer.layer(backend));
    let outcome = tokio::spawn({
        let backend = backend.clone();
        async move {
            let proxy = proxy;
            hang_and_recover("postgres", backend, &proxy).await
        }
    })
    .await;
    let _ = backend.close().await;
    drop_schema(&admin(&url).await, &schema).await;
    let (first, second) = outcome.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    println!(
        "hung postgres: 6 calls timed out within {} ms; calls to the first success: \
         {first} after the first connect hung, {second} after open connections stalled; \
         layer timeouts {}",
        BOUND.as_millis(),
        layer.timeouts()
    );
}

/// Polls `done` every 10 ms for up to 30 s.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "waited 30 s for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
