//! Passwords given in backend URLs never leave the process's memory: they appear in no
//! error (Display, Debug, source chain), no `Debug` of a backend or stack, no log line of
//! the logging layer or the health checker, no health or metrics report, no diagnosis,
//! no Prometheus exposition and no output of the `aiecs-storage` binary, whether the
//! server works, refuses the credentials or cannot be reached, and whether the password
//! is written plainly or percent-encoded (checked in both forms). Also: the Prometheus
//! exporter's default address is loopback, and serving on it binds loopback only.
//!
//! The unreachable cases (port 1) need no server. The live cases read
//! `AIECS_TEST_POSTGRES_URL` (trust authentication: any password is accepted, so the
//! password travels on a working connection) and `AIECS_TEST_REDIS_URL` (no password
//! configured, so a password is refused), and start password-protected `redis-server`s
//! of their own on free loopback ports; unset, they print a notice and pass, except
//! under `CI=true`.
#![cfg(all(feature = "redis", feature = "postgres"))]

mod common;

use common::pg::drop_schema_and_disconnect as drop_schema;

use std::error::Error as _;
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::{
    BatchLayer, CacheLayer, FailoverLayer, LoggingLayer, MetricsLayer, RetryLayer, StackBuilder,
    TimeoutLayer,
};
use aiecs_storage::ops::diagnose::{diagnose_connection, diagnose_consistency_within};
use aiecs_storage::ops::run_cleanup;
use aiecs_storage::prelude::*;
use aiecs_storage::{
    CheckpointFilter, HealthChecker, HealthStatus, MemoryBackend, Metadata, NewCheckpoint,
    NewMessage, PostgresBackend, RedisBackend, SessionUpdate, StorageConfig, StorageError,
    WriteInput,
};
use serde::Serialize;
use serde_json::json;
use tower::Layer;
use tracing::level_filters::LevelFilter;

/// The password, as written in most URLs.
const SECRET: &str = "s3cr3t-P4ss-xyz";
/// A password that needs percent-encoding, as written in the URL ...
const ENCODED: &str = "s3cr%40t-P4ss%2Fxyz";
/// ... and as the server receives it.
const DECODED: &str = "s3cr@t-P4ss/xyz";
/// The core every form shares: any piece of a password long enough to hold it shows.
const CORE: &str = "P4ss";
const FORBIDDEN: [&str; 4] = [SECRET, ENCODED, DECODED, CORE];

/// URLs whose server cannot be reached (nothing listens on port 1 of loopback).
fn unreachable_urls() -> Vec<String> {
    vec![
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/test"),
        format!("postgres://postgres:{ENCODED}@127.0.0.1:1/test"),
        format!("postgresql://app:{SECRET}@127.0.0.1:1/test?sslmode=require"),
        format!("redis://:{SECRET}@127.0.0.1:1/"),
        format!("redis://user:{SECRET}@127.0.0.1:1/"),
        format!("redis://:{ENCODED}@127.0.0.1:1/0"),
        format!("rediss://user:{SECRET}@127.0.0.1:1/"),
        format!("redis+cluster://:{SECRET}@127.0.0.1:1,127.0.0.1:2/"),
    ]
}

/// URLs that do not parse, or that `open` refuses before connecting.
fn malformed_urls() -> Vec<String> {
    vec![
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/test?password={SECRET}"),
        format!("postgres://postgres@127.0.0.1:1/test?password={ENCODED}"),
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/test?sslmode=bogus"),
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/a/b"),
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/test?schema=Not-A-Schema"),
        format!("postgres://postgres:{SECRET}@[::1/test"),
        "postgres://postgres:s3cr%ZZt-P4ss@127.0.0.1:1/test".to_owned(),
        format!("redis://:{SECRET}@127.0.0.1:notaport/"),
        format!("redis+cluster://:{SECRET}@/"),
        format!("mysql://root:{SECRET}@127.0.0.1/db"),
        // A raw '@' in the password.
        "redis://:s3cr@t-P4ss@127.0.0.1:1/".to_owned(),
        format!("postgres://postgres:{DECODED}@127.0.0.1:1/test"),
    ]
    .into_iter()
    .chain(raw_delimiter_urls())
    .collect()
}

/// Passwords with a raw `#` or `?`: a URL parser reads the rest as a fragment or query,
/// so redaction that trusts it shows them.
fn raw_delimiter_urls() -> Vec<String> {
    vec![
        "redis://:s3cr#t-P4ss@127.0.0.1:1/".to_owned(),
        "redis://:s3cr?t-P4ss@127.0.0.1:1/0".to_owned(),
        "redis://user:s3?cr#t-P4ss@127.0.0.1:1/".to_owned(),
        "rediss://:P4ss#word@127.0.0.1:1/".to_owned(),
        "redis+cluster://:s3cr#t-P4ss@127.0.0.1:1,127.0.0.1:2/".to_owned(),
        "postgres://app:s3cr#t-P4ss@127.0.0.1:1/test".to_owned(),
        "postgres://app:s3cr?t-P4ss@127.0.0.1:1/test".to_owned(),
        // Parses, with `1234?x-P4ss@127.0.0.1:1/test` read as port and query.
        "postgres://app:1234?x-P4ss@127.0.0.1:1/test".to_owned(),
    ]
}

/// Counts what a test scanned and fails on the first text showing a password form.
/// Shared by reference between concurrent cases, hence the atomics.
#[derive(Default)]
struct Scanner {
    texts: AtomicUsize,
    bytes: AtomicUsize,
}

impl Scanner {
    fn check(&self, what: &str, text: &str) {
        for form in FORBIDDEN {
            assert!(
                !text.contains(form),
                "{what} shows the password form `{form}`:\n{text}"
            );
        }
        self.texts.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(text.len(), Ordering::Relaxed);
    }

    fn debug(&self, what: &str, value: &impl Debug) {
        self.check(what, &format!("{value:?}"));
        self.check(what, &format!("{value:#?}"));
    }

    fn json(&self, what: &str, value: &(impl Serialize + Debug)) {
        self.check(what, &serde_json::to_string_pretty(value).unwrap());
        self.debug(what, value);
    }

    /// The error's Display and Debug, and those of every error in its source chain.
    fn error(&self, what: &str, e: &StorageError) {
        self.check(what, &e.to_string());
        self.debug(what, e);
        let mut source = e.source();
        let mut depth = 1;
        while let Some(s) = source {
            self.check(&format!("{what} (source {depth})"), &s.to_string());
            self.check(&format!("{what} (source {depth})"), &format!("{s:?}"));
            source = s.source();
            depth += 1;
        }
    }

    fn result<T: Debug>(&self, what: &str, r: &aiecs_storage::Result<T>) {
        match r {
            Ok(v) => self.debug(what, v),
            Err(e) => self.error(what, e),
        }
    }

    fn done(&self, test: &str) {
        println!(
            "{test}: scanned {} texts ({} bytes); no form of the password in any",
            self.texts.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed)
        );
    }
}

/// Every URL under test must really carry one of the forbidden forms, or scanning
/// its output proves nothing.
fn carries_password(url: &str) {
    assert!(
        FORBIDDEN.iter().any(|f| url.contains(f)),
        "test URL without a password: {url}"
    );
}

/// A stack with every layer, so each layer's error path, report and log line is
/// covered. Retries stop after 500 ms: an unreachable Redis takes about a second to give
/// up (the client reconnects three times), and retrying that only slows the test.
fn stack(backend: Arc<dyn StorageBackend>) -> Arc<dyn StorageBackend> {
    StackBuilder::new()
        .layer(MetricsLayer::new())
        .layer(LoggingLayer::new())
        .layer(CacheLayer::new())
        .layer(
            RetryLayer::new()
                .with_max_attempts(2)
                .with_min_delay(Duration::from_millis(1))
                .with_max_elapsed(Duration::from_millis(500)),
        )
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(BatchLayer::new())
        .build(backend)
}

/// Calls of every kind, each result scanned; returns how many failed. `Short::Yes` makes
/// only the calls whose paths differ for a backend that cannot connect (every operation
/// goes through the same connect step there, and each costs a second on Redis).
async fn calls(scan: &Scanner, url: &str, s: &dyn StorageBackend, id: &str, short: bool) -> usize {
    let mut failed = 0;
    macro_rules! call {
        ($name:literal, $e:expr) => {{
            let r = $e.await;
            failed += usize::from(r.is_err());
            scan.result(&format!("{} on {url}", $name), &r);
        }};
    }
    call!("initialize", s.initialize());
    call!(
        "create_session",
        s.create_session(id, "user-1", &Metadata::new())
    );
    call!("get_session", s.get_session(id));
    call!(
        "add_conversation_message",
        s.add_conversation_message(id, &NewMessage::new("user", "hello"))
    );
    call!(
        "put_writes",
        s.put_writes(id, "", "cp-1", "task-1", &[WriteInput::new("ch", json!(1))])
    );
    call!("get_task_context", s.get_task_context(id));
    if !short {
        call!(
            "update_session",
            s.update_session(id, &SessionUpdate::new().increment_requests())
        );
        call!(
            "get_conversation_history",
            s.get_conversation_history(id, 10)
        );
        call!(
            "store_checkpoint",
            s.store_checkpoint(&NewCheckpoint::new(id, "cp-1", json!({"step": 1})))
        );
        call!("get_checkpoint", s.get_checkpoint(id, "", None));
        call!(
            "list_checkpoints",
            s.list_checkpoints(id, "", &CheckpointFilter::default())
        );
        call!("get_writes", s.get_writes(id, "", "cp-1"));
        call!(
            "store_task_context",
            s.store_task_context(id, &json!({"k": 1}))
        );
        // Failures the server itself reports (live backends) or that never reach it.
        call!(
            "add_conversation_message (missing session)",
            s.add_conversation_message(&format!("{id}-missing"), &NewMessage::new("user", "x"))
        );
        call!("get_session (bad input)", s.get_session(""));
    }
    match s.health_check().await {
        Ok(report) => scan.json(&format!("health_check of {url}"), &report),
        Err(e) => {
            failed += 1;
            scan.error(&format!("health_check of {url}"), &e);
        }
    }
    match s.get_metrics().await {
        Ok(report) => scan.json(&format!("get_metrics of {url}"), &report),
        Err(e) => {
            failed += 1;
            scan.error(&format!("get_metrics of {url}"), &e);
        }
    }
    failed
}

/// The number of calls `calls` makes when `short`.
const SHORT_CALLS: usize = 8;

/// Removes what `calls` wrote under `id`.
async fn remove(s: &dyn StorageBackend, id: &str) {
    s.delete_thread(id).await.unwrap();
    s.delete_session(id).await.unwrap();
    assert!(s.get_session(id).await.unwrap().is_none());
}

#[test]
fn the_scanner_catches_every_form_of_the_password() {
    // The scan must be able to fail, or every test below passes vacuously.
    let scan = Scanner::default();
    let leaks = [
        format!("redis://:{SECRET}@h"),
        format!("postgres://u:{ENCODED}@h/db"),
        format!("auth failed for {DECODED}"),
        "only a piece: xx-P4ss-yy".to_owned(),
    ];
    for leak in &leaks {
        let caught = std::panic::catch_unwind(|| scan.check("leak", leak)).is_err();
        assert!(caught, "not caught: {leak}");
    }
    let nested = StorageError::Connection {
        message: "redis at redis://:***@h".into(),
        source: Some(format!("io error talking to {DECODED}").into()),
    };
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scan.error("nested", &nested)
    }))
    .is_err();
    assert!(caught, "a password in the source chain was not caught");
    println!(
        "scanner: {} leaks and a source-chain leak caught",
        leaks.len()
    );
}

#[test]
fn default_prometheus_address_is_loopback() {
    #[cfg(feature = "prometheus")]
    {
        let addr = aiecs_storage::prometheus::DEFAULT_LISTEN;
        println!("prometheus::DEFAULT_LISTEN = {addr}");
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr, "127.0.0.1:9464".parse().unwrap());
    }
}

#[tokio::test]
async fn constructors_and_open_never_show_the_password() {
    let scan = Scanner::default();
    let mut opened = 0;
    let mut refused = 0;
    for url in unreachable_urls().iter().chain(&malformed_urls()) {
        carries_password(url);
        match aiecs_storage::open(url) {
            Ok(storage) => {
                opened += 1;
                scan.check("kind", storage.kind());
            }
            Err(e) => {
                refused += 1;
                scan.error(&format!("open({url})"), &e);
            }
        }
        if url.starts_with("postgres") {
            match PostgresBackend::new(url) {
                Ok(b) => {
                    scan.check("redacted_url", b.redacted_url());
                    assert!(b.redacted_url().contains("***"), "{}", b.redacted_url());
                    scan.debug("PostgresBackend", &b);
                    // Wrappers over the concrete backend print it too.
                    let wrapped = LoggingLayer::new().layer(RetryLayer::new().layer(b));
                    scan.debug("Layered<PostgresBackend>", &wrapped);
                }
                Err(e) => scan.error(&format!("PostgresBackend::new({url})"), &e),
            }
        }
        if url.starts_with("redis") {
            match RedisBackend::new(url) {
                Ok(b) => {
                    scan.check("redacted_url", b.redacted_url());
                    assert!(b.redacted_url().contains("***"), "{}", b.redacted_url());
                    scan.debug("RedisBackend", &b);
                    let fallback = aiecs_storage::open(&unreachable_urls()[0]).unwrap();
                    let wrapped = CacheLayer::new()
                        .layer(FailoverLayer::new(fallback).layer(MetricsLayer::new().layer(b)));
                    scan.debug("Cached<Failover<Layered<RedisBackend>>>", &wrapped);
                }
                Err(e) => scan.error(&format!("RedisBackend::new({url})"), &e),
            }
        }
        // The same URL in a stack file, good and bad.
        let toml = format!(
            "url = \"{url}\"\n[[layers]]\ntype = \"retry\"\n[[layers]]\ntype = \"failover\"\nfallback = \"{url}\"\n"
        );
        match StorageConfig::from_toml_str(&toml) {
            Ok(config) => {
                scan.debug("StorageConfig", &config);
                if let Err(e) = config.build() {
                    scan.error("StorageConfig::build", &e);
                }
            }
            Err(e) => scan.error("StorageConfig::from_toml_str", &e),
        }
        let bad = format!("url = \"{url}\"\n[[layers]]\ntype = \"retry\"\nmax_attempts = \"x\"\n");
        let e = StorageConfig::from_toml_str(&bad).unwrap_err();
        scan.error("StorageConfig::from_toml_str (bad key)", &e);
        let broken = format!("url = \"{url}\n[[layers]]\n");
        let e = StorageConfig::from_toml_str(&broken).unwrap_err();
        scan.error("StorageConfig::from_toml_str (syntax)", &e);
    }
    // The CLI's health and diagnose paths on the same URLs, whether or not they open.
    for url in raw_delimiter_urls() {
        let diagnosis = diagnose_connection(&url, Duration::from_millis(500)).await;
        scan.json(&format!("diagnose_connection({url})"), &diagnosis);
        assert!(diagnosis.target.contains("***"), "{}", diagnosis.target);
        if let Ok(storage) = aiecs_storage::open(&url) {
            let checker = HealthChecker::new(stack(storage)).with_timeout(Duration::from_secs(3));
            scan.json(&format!("HealthChecker of {url}"), &checker.check().await);
        }
    }
    println!("open(): {opened} URLs opened, {refused} refused");
    assert!(opened >= unreachable_urls().len() && refused >= 8);
    scan.done("constructors_and_open");
}

/// Everything a caller can see of one unreachable URL: calls through a full stack, the
/// health checker, both diagnoses, a cleanup run, and failover pairs with it on either
/// side. Returns how many calls failed.
async fn unreachable_case(scan: &Scanner, url: &str) -> usize {
    carries_password(url);
    let storage = stack(aiecs_storage::open(url).unwrap());
    let failed = calls(scan, url, storage.as_ref(), "unreachable-1", true).await;
    assert_eq!(failed, SHORT_CALLS, "{url}: every call must fail");

    let checker = HealthChecker::new(storage.clone()).with_timeout(Duration::from_secs(5));
    let report = checker.check().await;
    scan.json(&format!("HealthChecker of {url}"), &report);
    scan.debug("HealthChecker", &checker);
    assert_eq!(report.status, HealthStatus::Unhealthy, "{url}");
    assert!(report.checks.connection.error.is_some(), "{report:?}");

    let diagnosis = diagnose_connection(url, Duration::from_secs(3)).await;
    scan.json(&format!("diagnose_connection({url})"), &diagnosis);
    assert!(!diagnosis.is_ok(), "{diagnosis:?}");
    assert!(diagnosis.target.contains("***"), "{}", diagnosis.target);
    let consistency = diagnose_consistency_within(storage.as_ref(), Duration::from_secs(3)).await;
    scan.json(&format!("diagnose_consistency({url})"), &consistency);
    assert!(!consistency.consistent, "{consistency:?}");

    let cleanup = run_cleanup(storage.as_ref(), Duration::from_secs(3600)).await;
    scan.result(&format!("run_cleanup on {url}"), &cleanup);
    assert!(cleanup.is_err());
    let _ = storage.close().await;

    // As a failover fallback behind a working primary (its failures are logged, not
    // returned), and as a primary whose fallback works.
    let behind = FailoverLayer::new(aiecs_storage::open(url).unwrap())
        .with_failure_threshold(1)
        .layer(MemoryBackend::new());
    scan.debug("Failover<MemoryBackend>", &behind);
    let r = behind
        .create_session("failover-1", "u", &Metadata::new())
        .await;
    scan.result("create_session (failing fallback)", &r);
    r.unwrap();
    scan.result(
        "health_check (failing fallback)",
        &behind.health_check().await,
    );
    let before = FailoverLayer::new(Arc::new(MemoryBackend::new()))
        .with_failure_threshold(1)
        .layer(aiecs_storage::open(url).unwrap());
    let r = before.get_session("failover-1").await;
    scan.result("get_session (failing primary)", &r);
    r.unwrap();
    scan.result(
        "health_check (failing primary)",
        &before.health_check().await,
    );
    scan.result("get_metrics (failing primary)", &before.get_metrics().await);
    failed
}

#[tokio::test]
async fn unreachable_servers_never_show_the_password() {
    let (cap, _guard) = common::capture::capture(LevelFilter::TRACE);
    let scan = Scanner::default();
    let started = std::time::Instant::now();
    // Concurrently, on this thread (the capture is the thread's subscriber).
    let urls = unreachable_urls();
    let failed: usize =
        futures_util::future::join_all(urls.iter().map(|u| unreachable_case(&scan, u)))
            .await
            .into_iter()
            .sum();
    let text = cap.text();
    scan.check("captured logs", &text);
    let failed_lines = text.matches("storage operation failed").count();
    let redacted = text.matches(":***@").count();
    println!(
        "unreachable: {} URLs, {failed} failed calls in {:.1} s, {} log bytes, {failed_lines} 'storage operation failed' lines, {redacted} redacted URLs in logs",
        urls.len(),
        started.elapsed().as_secs_f64(),
        text.len()
    );
    // The logs did quote the errors and the URLs (redacted), so there was something to
    // miss: the logging layer, the health checker, the diagnosis, cleanup and failover.
    for line in [
        "storage operation failed",
        "storage health check: unhealthy",
        "storage connection diagnosis: refused",
        "storage cleanup failed",
        "failover: fallback write failed",
    ] {
        assert!(text.contains(line), "no `{line}` in the logs:\n{text}");
    }
    assert!(failed_lines >= failed / 2, "{text}");
    assert!(redacted > 0, "{text}");
    scan.done("unreachable_servers");
}

/// The test server's URL with a password, a user and `?schema=`.
fn pg_url(base: &str, user: &str, password: &str, db: Option<&str>, schema: &str) -> String {
    let mut u = url::Url::parse(base).unwrap();
    u.set_username(user).unwrap();
    u.set_password(Some("PLACEHOLDER")).unwrap();
    if let Some(db) = db {
        u.set_path(&format!("/{db}"));
    }
    u.query_pairs_mut().append_pair("schema", schema);
    // set_password would encode '%': put the form under test in as written.
    let url = u.to_string().replace("PLACEHOLDER", password);
    assert!(url.contains(password), "{url}");
    url
}

#[tokio::test]
async fn live_postgres_never_shows_the_password() {
    let Some(base) = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres") else {
        return;
    };
    let (cap, _guard) = common::capture::capture(LevelFilter::TRACE);
    let scan = Scanner::default();
    let schema = common::unique_name("secrets_pg");
    for password in [SECRET, ENCODED] {
        let url = pg_url(&base, "postgres", password, None, &schema);
        carries_password(&url);
        let backend = PostgresBackend::new(&url).unwrap();
        scan.debug("PostgresBackend", &backend);
        let metrics = MetricsLayer::new();
        let storage = StackBuilder::new()
            .layer(metrics.clone())
            .layer(LoggingLayer::new())
            .layer(CacheLayer::new())
            .layer(RetryLayer::new())
            .layer(TimeoutLayer::new(Duration::from_secs(5)))
            .layer(BatchLayer::new())
            .build(Arc::new(backend));
        let id = format!("secrets-{}", uuid::Uuid::now_v7().simple());
        let failed = calls(&scan, &url, storage.as_ref(), &id, false).await;
        // The live server answers: only the missing-session and bad-input calls fail.
        assert_eq!(failed, 2, "{url}");
        scan.debug("performance report", &metrics.performance_report());

        let report = HealthChecker::new(storage.clone()).check().await;
        scan.json("HealthChecker (live postgres)", &report);
        assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
        let details = serde_json::to_string(&report.report).unwrap();
        assert!(
            details.contains(":***@"),
            "the report names the URL: {details}"
        );

        let diagnosis = diagnose_connection(&url, Duration::from_secs(5)).await;
        scan.json("diagnose_connection (live postgres)", &diagnosis);
        assert!(diagnosis.is_ok(), "{diagnosis:?}");
        let consistency =
            diagnose_consistency_within(storage.as_ref(), Duration::from_secs(5)).await;
        scan.json("diagnose_consistency (live postgres)", &consistency);
        assert!(consistency.consistent, "{consistency:?}");
        remove(storage.as_ref(), &id).await;
        storage.close().await.unwrap();
    }

    // The server refuses: an unknown database (3D000) and an unknown role (28000), both
    // answered by the server with its own message.
    for (user, db) in [
        ("postgres", "aiecs_no_such_db"),
        ("aiecs_no_such_role", "test"),
    ] {
        let url = pg_url(&base, user, SECRET, Some(db), &schema);
        let storage = stack(aiecs_storage::open(&url).unwrap());
        let e = storage.initialize().await.unwrap_err();
        println!("{user}@{db}: {:?}: {e}", e.kind());
        scan.error(&url, &e);
        let report = HealthChecker::new(storage.clone()).check().await;
        scan.json("HealthChecker (refused)", &report);
        let diagnosis = diagnose_connection(&url, Duration::from_secs(5)).await;
        scan.json("diagnose_connection (refused)", &diagnosis);
        assert!(!diagnosis.is_ok(), "{diagnosis:?}");
        let _ = storage.close().await;
    }
    drop_schema(&base, &schema).await;

    let text = cap.text();
    scan.check("captured logs", &text);
    let lines = text.lines().count();
    println!("live postgres: {lines} log lines captured");
    assert!(text.contains("db.operation.name"), "{text}");
    assert!(text.contains("storage operation failed"), "{text}");
    scan.done("live_postgres");
}

/// A password-protected redis-server on a free loopback port, stopped on drop.
struct ProtectedRedis {
    child: Option<std::process::Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl ProtectedRedis {
    fn start(password: &str) -> ProtectedRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--requirepass",
                password,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed for the Redis tests");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        ProtectedRedis {
            child: Some(child),
            port,
            _dir: dir,
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ProtectedRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `host:port` of the shared test Redis.
fn host_port(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(6379))
}

/// The shared server, which has no password, refuses one given in `url`.
async fn refused_redis_case(scan: &Scanner, url: &str) {
    carries_password(url);
    let storage = stack(aiecs_storage::open(url).unwrap());
    let failed = calls(scan, url, storage.as_ref(), "refused-1", true).await;
    assert_eq!(failed, SHORT_CALLS, "{url}: every call must fail");
    let e = storage.initialize().await.unwrap_err();
    let shown = url.replace(SECRET, "<pw>").replace(ENCODED, "<pw>");
    println!("{shown}: {:?}: {e}", e.kind());
    let report = HealthChecker::new(storage.clone()).check().await;
    scan.json("HealthChecker (refused)", &report);
    assert_eq!(report.status, HealthStatus::Unhealthy);
    let diagnosis = diagnose_connection(url, Duration::from_secs(5)).await;
    scan.json("diagnose_connection (refused)", &diagnosis);
    assert!(!diagnosis.is_ok(), "{diagnosis:?}");
    let _ = storage.close().await;
}

/// A server that wants the password in `url`: everything works; then the server stops
/// under the open connection and every call fails.
async fn protected_redis_case(scan: &Scanner, server: &mut ProtectedRedis, url: &str) {
    carries_password(url);
    let metrics = MetricsLayer::new();
    let backend = RedisBackend::new(url).unwrap();
    scan.debug("RedisBackend", &backend);
    let storage = StackBuilder::new()
        .layer(metrics.clone())
        .layer(LoggingLayer::new())
        .layer(CacheLayer::new())
        .layer(RetryLayer::new().with_max_elapsed(Duration::from_millis(500)))
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(BatchLayer::new())
        .build(Arc::new(backend));
    let id = format!("secrets-{}", uuid::Uuid::now_v7().simple());
    let failed = calls(scan, url, storage.as_ref(), &id, false).await;
    // Only the missing-session and bad-input calls fail: the password was accepted.
    assert_eq!(failed, 2, "{url}");
    scan.debug("performance report", &metrics.performance_report());
    let report = HealthChecker::new(storage.clone()).check().await;
    scan.json("HealthChecker (live redis)", &report);
    assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
    let diagnosis = diagnose_connection(url, Duration::from_secs(5)).await;
    scan.json("diagnose_connection (live redis)", &diagnosis);
    assert!(diagnosis.is_ok(), "{diagnosis:?}");
    let consistency = diagnose_consistency_within(storage.as_ref(), Duration::from_secs(5)).await;
    scan.json("diagnose_consistency (live redis)", &consistency);
    assert!(consistency.consistent, "{consistency:?}");
    remove(storage.as_ref(), &id).await;

    server.stop();
    let failed = calls(scan, url, storage.as_ref(), &id, true).await;
    println!("after the server stopped: {failed} of {SHORT_CALLS} calls failed");
    // Reads the cache still holds may succeed; the rest must fail.
    assert!(failed >= SHORT_CALLS - 2, "{failed}");
    let report = HealthChecker::new(storage.clone())
        .with_timeout(Duration::from_secs(5))
        .check()
        .await;
    scan.json("HealthChecker (server gone)", &report);
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    let _ = storage.close().await;
}

#[tokio::test]
async fn live_redis_never_shows_the_password() {
    let Some(shared) = common::server_url("AIECS_TEST_REDIS_URL", "redis") else {
        return;
    };
    let (cap, _guard) = common::capture::capture(LevelFilter::TRACE);
    let scan = Scanner::default();
    let started = std::time::Instant::now();

    let hp = host_port(&shared);
    let refused = [
        format!("redis://:{SECRET}@{hp}/"),
        format!("redis://someuser:{SECRET}@{hp}/"),
        format!("redis://:{ENCODED}@{hp}/0"),
    ];
    futures_util::future::join_all(refused.iter().map(|u| refused_redis_case(&scan, u))).await;

    // The plain form with the ACL user named, and the percent-encoded form, which must
    // reach the server decoded.
    let mut plain = ProtectedRedis::start(SECRET);
    let mut encoded = ProtectedRedis::start(DECODED);
    let plain_url = format!("redis://default:{SECRET}@127.0.0.1:{}/", plain.port);
    let encoded_url = format!("redis://:{ENCODED}@127.0.0.1:{}/0", encoded.port);
    tokio::join!(
        protected_redis_case(&scan, &mut plain, &plain_url),
        protected_redis_case(&scan, &mut encoded, &encoded_url),
    );

    let text = cap.text();
    scan.check("captured logs", &text);
    println!(
        "live redis: {} log lines captured in {:.1} s",
        text.lines().count(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        text.contains("storage operation failed") && text.contains(":***@"),
        "{text}"
    );
    scan.done("live_redis");
}

/// The listening TCP sockets on `port`, as `file:hex address` read from the kernel.
fn listeners(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((addr, p)) = local.split_once(':') else {
                continue;
            };
            if *state == "0A" && u16::from_str_radix(p, 16).ok() == Some(port) {
                found.push(format!("{file}:{addr}"));
            }
        }
    }
    found
}

/// The one test of this binary that installs the process-global metrics recorder.
#[cfg(feature = "prometheus")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_exposition_never_shows_the_password_and_binds_loopback() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let default = aiecs_storage::prometheus::DEFAULT_LISTEN;
    // The default's address with a free port: serving on 9464 itself could collide with
    // anything else on the machine.
    let port = std::net::TcpListener::bind((default.ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = std::net::SocketAddr::new(default.ip(), port);
    aiecs_storage::prometheus::serve(addr).unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bound = listeners(port);
    println!("listening sockets on port {port}: {bound:?} (0100007F = 127.0.0.1)");
    assert_eq!(bound, ["/proc/net/tcp:0100007F"], "not loopback only");

    let scan = Scanner::default();
    let base = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres");
    let schema = common::unique_name("secrets_prom");
    let mut cases: Vec<(String, bool)> =
        unreachable_urls().into_iter().map(|u| (u, false)).collect();
    if let Some(base) = &base {
        cases.push((pg_url(base, "postgres", SECRET, None, &schema), true));
    }
    let case = |url: &str, live: bool| {
        let scan = &scan;
        let url = url.to_owned();
        async move {
            let storage = StackBuilder::new()
                .layer(MetricsLayer::new())
                .layer(CacheLayer::new())
                .layer(RetryLayer::new().with_max_elapsed(Duration::from_millis(500)))
                .layer(TimeoutLayer::new(Duration::from_secs(5)))
                .layer(BatchLayer::new())
                .build(aiecs_storage::open(&url).unwrap());
            let id = format!("secrets-{}", uuid::Uuid::now_v7().simple());
            let failed = calls(scan, &url, storage.as_ref(), &id, !live).await;
            if live {
                assert_eq!(failed, 2, "{url}");
                remove(storage.as_ref(), &id).await;
            } else {
                assert_eq!(failed, SHORT_CALLS, "{url}");
            }
            let _ = storage.close().await;
        }
    };
    futures_util::future::join_all(cases.iter().map(|(u, live)| case(u, *live))).await;
    if let Some(base) = &base {
        drop_schema(base, &schema).await;
    }

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    scan.check("Prometheus exposition", &text);
    let samples = text.lines().filter(|l| !l.starts_with('#')).count();
    let errors = text
        .lines()
        .filter(|l| l.starts_with("aiecs_storage_errors_total"))
        .count();
    println!(
        "prometheus: {} bytes, {samples} sample lines, {errors} error series, {} backends",
        text.len(),
        cases.len()
    );
    // The unreachable servers refuse the connection before any call is sent.
    assert!(
        errors > 0 && text.contains("kind=\"unavailable\""),
        "{text}"
    );
    scan.done("prometheus");
}

#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use std::process::{Command, Output};

    /// Runs the binary; every byte it prints is scanned.
    fn run(scan: &Scanner, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_aiecs-storage"))
            .args(args)
            .env("RUST_LOG", "trace")
            .output()
            .expect("run aiecs-storage");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.trim().is_empty(), "{args:?} printed nothing");
        scan.check(&format!("aiecs-storage {}", args.join(" ")), &text);
        out
    }

    /// `health`, `stats` and `diagnose`, in text and JSON; returns how many succeeded.
    fn commands(scan: &Scanner, target: &[&str]) -> usize {
        let mut ok = 0;
        for command in ["health", "stats", "diagnose"] {
            for json in [false, true] {
                let mut args = vec![command];
                args.extend_from_slice(target);
                if command == "diagnose" {
                    args.extend(["--timeout", "3"]);
                }
                if json {
                    args.push("--json");
                }
                ok += usize::from(run(scan, &args).status.success());
            }
        }
        ok
    }

    #[test]
    fn cli_on_unreachable_servers_never_shows_the_password() {
        let scan = Scanner::default();
        let started = std::time::Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let url = &unreachable_urls()[0];
        let mut configs = Vec::new();
        // A good stack file, one with a misspelt key, one that is not TOML.
        for (name, toml) in [
            (
                "good.toml",
                format!("url = \"{url}\"\n[[layers]]\ntype = \"retry\"\n"),
            ),
            (
                "bad.toml",
                format!("url = \"{url}\"\n[[layers]]\ntype = \"retry\"\nmax_atempts = 2\n"),
            ),
            ("broken.toml", format!("url = \"{url}\n")),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, toml).unwrap();
            configs.push(vec![
                "--config".to_owned(),
                path.to_str().unwrap().to_owned(),
            ]);
        }
        let mut targets: Vec<Vec<String>> = unreachable_urls()
            .into_iter()
            .chain(malformed_urls().into_iter().take(4))
            .chain(raw_delimiter_urls())
            .map(|u| vec![u])
            .collect();
        targets.extend(configs);
        // One thread per target: an unreachable Redis costs a second per call.
        std::thread::scope(|threads| {
            for target in &targets {
                let scan = &scan;
                threads.spawn(move || {
                    let args: Vec<&str> = target.iter().map(String::as_str).collect();
                    assert_eq!(commands(scan, &args), 0, "{target:?}");
                });
            }
        });
        let out = run(&scan, &["diagnose", url, "--timeout", "2"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(":***@"),
            "diagnose names the redacted URL: {text}"
        );
        println!(
            "cli: {} failing runs in {:.1} s",
            targets.len() * 6 + 1,
            started.elapsed().as_secs_f64()
        );
        scan.done("cli_unreachable");
    }

    #[tokio::test]
    async fn cli_on_live_servers_never_shows_the_password() {
        let scan = Scanner::default();
        if let Some(base) = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres") {
            let schema = common::unique_name("secrets_cli");
            let url = pg_url(&base, "postgres", SECRET, None, &schema);
            assert_eq!(commands(&scan, &[&url]), 6, "{url}");
            let url = pg_url(&base, "postgres", ENCODED, None, &schema);
            assert_eq!(commands(&scan, &[&url]), 6, "{url}");
            let url = pg_url(&base, "aiecs_no_such_role", SECRET, None, &schema);
            assert_eq!(commands(&scan, &[&url]), 0, "{url}");
            drop_schema(&base, &schema).await;
            println!("cli: postgres runs done");
        }
        if let Some(shared) = common::server_url("AIECS_TEST_REDIS_URL", "redis") {
            let url = format!("redis://:{SECRET}@{}/", host_port(&shared));
            assert_eq!(commands(&scan, &[&url]), 0, "{url}");
            let plain = ProtectedRedis::start(SECRET);
            let url = format!("redis://default:{SECRET}@127.0.0.1:{}/", plain.port);
            assert_eq!(commands(&scan, &[&url]), 6, "{url}");
            let encoded = ProtectedRedis::start(DECODED);
            let url = format!("redis://:{ENCODED}@127.0.0.1:{}/", encoded.port);
            assert_eq!(commands(&scan, &[&url]), 6, "{url}");
            println!("cli: redis runs done");
        }
        scan.done("cli_live");
    }
}
