//! Diagnostics: a connection check that tells refused, timed out, DNS, auth and TLS
//! failures apart, and a write-read-compare round trip that cleans up after itself.
//!
//! The Redis cases need `AIECS_TEST_REDIS_URL` (and `redis-server` on the PATH for the
//! password case); without it they print a notice and pass, except under `CI=true`.
//! Built with the default `sqlite` feature.
#![cfg(feature = "sqlite")]

use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::Operation;
use aiecs_storage::ops::diagnose::{
    diagnose_connection, diagnose_consistency, diagnose_consistency_within, CheckOutcome,
    ConnectionDiagnosis, ConnectionOutcome, ConsistencyDiagnosis, DIAGNOSE_PREFIX,
};
use aiecs_storage::prelude::*;
use aiecs_storage::{ErrorKind, MemoryBackend, SessionQuery, SqliteBackend, StorageConfig};

mod common;

use common::fault::{Faults, Target};

const SECRET: &str = "pw-hunter2-s3cret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Nothing in the report, serialized or debugged, shows the secret.
fn assert_no_secret(report: &ConnectionDiagnosis) {
    let json = serde_json::to_string(report).unwrap();
    let debug = format!("{report:?}");
    assert!(!json.contains(SECRET), "{json}");
    assert!(!debug.contains(SECRET), "{debug}");
}

#[tokio::test]
async fn local_backends_just_initialize() {
    let dir = tempfile::tempdir().unwrap();
    let file = format!("sqlite://{}", dir.path().join("d.db").display());
    for url in ["memory://", "sqlite::memory:", file.as_str()] {
        let report = diagnose_connection(url, Duration::from_secs(5)).await;
        assert_eq!(report.outcome, ConnectionOutcome::Ok, "{url}: {report:#?}");
        assert!(report.is_ok());
        let steps: Vec<_> = report.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(steps, ["open", "initialize", "health_check"], "{url}");
        assert!(report.message.contains("initialized"), "{}", report.message);
    }
}

#[tokio::test]
async fn a_closed_port_is_refused() {
    let port = free_port();
    for url in [
        format!("redis://:{SECRET}@127.0.0.1:{port}/0"),
        format!("postgres://app:{SECRET}@127.0.0.1:{port}/db"),
        format!("redis+cluster://:{SECRET}@127.0.0.1:{port},127.0.0.1:{port}"),
    ] {
        let report = diagnose_connection(&url, Duration::from_secs(5)).await;
        assert_eq!(report.outcome, ConnectionOutcome::Refused, "{report:#?}");
        assert!(report.target.contains(":***@"), "{}", report.target);
        assert!(report.advice.contains("server runs"), "{}", report.advice);
        assert_eq!(report.steps.last().unwrap().step, "tcp_connect");
        assert_no_secret(&report);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["outcome"], "refused");
        assert!(json["latency_ms"].is_number());
    }
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_a_dns_failure() {
    let url = format!("redis://:{SECRET}@no-such-host.invalid:6379");
    let report = diagnose_connection(&url, Duration::from_secs(5)).await;
    assert_eq!(report.outcome, ConnectionOutcome::DnsFailed, "{report:#?}");
    assert_no_secret(&report);
}

#[tokio::test]
async fn urls_that_cannot_be_opened_are_invalid() {
    let report = diagnose_connection(
        &format!("mysql://root:{SECRET}@127.0.0.1/x"),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(report.outcome, ConnectionOutcome::InvalidUrl, "{report:#?}");
    assert_no_secret(&report);
    let report = diagnose_connection("sqlite://", Duration::from_secs(1)).await;
    assert_eq!(report.outcome, ConnectionOutcome::InvalidUrl, "{report:#?}");
}

/// A redis:// URL on a port that accepts connections and never answers: the TCP step
/// works, the backend's handshake hangs, the deadline turns it into a timeout.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("redis://:{SECRET}@127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let report = diagnose_connection(&url, Duration::from_millis(300)).await;
    assert_eq!(report.outcome, ConnectionOutcome::TimedOut, "{report:#?}");
    assert!(report.steps[0].ok, "the TCP connection worked: {report:#?}");
    assert!(
        report.message.contains("accepted the TCP connection"),
        "{}",
        report.message
    );
    // Bounded by the timeout (plus the close of the half-open backend).
    assert!(started.elapsed() < Duration::from_secs(5), "{report:#?}");
    assert_no_secret(&report);
    drop(listener);
}

#[cfg(feature = "redis")]
fn redis_url() -> Option<String> {
    common::server_url("AIECS_TEST_REDIS_URL", "redis diagnose")
}

/// The `host:port` of a `redis://[user:pass@]host:port[/db]` URL.
#[cfg(feature = "redis")]
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    }
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_reachable_redis_is_ok() {
    let Some(url) = redis_url() else { return };
    let report = diagnose_connection(&url, Duration::from_secs(5)).await;
    assert_eq!(report.outcome, ConnectionOutcome::Ok, "{report:#?}");
    assert_eq!(report.backend, "redis");
}

/// TLS spoken to a plain Redis port: the handshake fails.
#[cfg(feature = "redis")]
#[tokio::test]
async fn tls_to_a_plain_port_is_a_tls_failure() {
    let Some(url) = redis_url() else { return };
    let tls = format!("rediss://:{SECRET}@{}", host_port(&url));
    let report = diagnose_connection(&tls, Duration::from_secs(5)).await;
    assert_eq!(report.outcome, ConnectionOutcome::TlsFailed, "{report:#?}");
    assert!(report.advice.contains("TLS"), "{}", report.advice);
    assert_no_secret(&report);
}

/// A TLS port whose certificate the client does not trust: the handshake fails.
#[cfg(feature = "redis")]
#[tokio::test]
async fn an_untrusted_certificate_is_a_tls_failure() {
    if redis_url().is_none() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let path = |name: &str| certs.path().join(name).display().to_string();
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout", &path("key.pem")])
        .args(["-out", &path("cert.pem")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl must be installed for the TLS test");
    assert!(status.success());
    let port = free_port();
    let listen = [
        "--port".to_owned(),
        "0".to_owned(),
        "--tls-port".to_owned(),
        port.to_string(),
        "--tls-cert-file".to_owned(),
        path("cert.pem"),
        "--tls-key-file".to_owned(),
        path("key.pem"),
        "--tls-auth-clients".to_owned(),
        "no".to_owned(),
    ];
    let _server = ProtectedRedis::start_with("tls-pass", port, &listen);
    let url = format!("rediss://:{SECRET}@127.0.0.1:{port}");
    let report = diagnose_connection(&url, Duration::from_secs(5)).await;
    assert_eq!(report.outcome, ConnectionOutcome::TlsFailed, "{report:#?}");
    assert!(
        report.message.to_lowercase().contains("certificate"),
        "{}",
        report.message
    );
    assert_no_secret(&report);
}

/// A password-protected redis-server on a free loopback port, stopped on drop.
#[cfg(feature = "redis")]
struct ProtectedRedis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

#[cfg(feature = "redis")]
impl ProtectedRedis {
    fn start(password: &str) -> ProtectedRedis {
        let port = free_port();
        Self::start_with(password, port, &["--port".into(), port.to_string()])
    }

    fn start_with(password: &str, port: u16, listen: &[String]) -> ProtectedRedis {
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--requirepass", password])
            .args(["--save", "", "--appendonly", "no"])
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
            child,
            port,
            _dir: dir,
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for ProtectedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_wrong_password_is_an_auth_failure() {
    if redis_url().is_none() {
        return;
    }
    let server = ProtectedRedis::start("the-right-one");
    let url = format!("redis://:{SECRET}@127.0.0.1:{}", server.port);
    let report = diagnose_connection(&url, Duration::from_secs(5)).await;
    assert_eq!(report.outcome, ConnectionOutcome::AuthFailed, "{report:#?}");
    assert!(report.advice.contains("credentials"), "{}", report.advice);
    assert_no_secret(&report);

    let right = format!("redis://:the-right-one@127.0.0.1:{}", server.port);
    let report = diagnose_connection(&right, Duration::from_secs(5)).await;
    assert_eq!(report.outcome, ConnectionOutcome::Ok, "{report:#?}");
    assert!(
        !serde_json::to_string(&report)
            .unwrap()
            .contains("the-right-one"),
        "{report:?}"
    );
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_reachable_postgres_is_ok() {
    let Some(url) = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres diagnose") else {
        return;
    };
    let report = diagnose_connection(&url, Duration::from_secs(10)).await;
    assert_eq!(report.outcome, ConnectionOutcome::Ok, "{report:#?}");
}

// --- consistency ---------------------------------------------------------------------

/// Every check passed, the thread is gone, the session is ended and marked.
async fn assert_clean_and_consistent(storage: &dyn StorageBackend, report: &ConsistencyDiagnosis) {
    assert!(report.consistent, "{report:#?}");
    assert!(report.cleaned_up, "{report:#?}");
    let names: Vec<_> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "session",
            "message",
            "checkpoint",
            "pending_writes",
            "task_context"
        ]
    );
    assert!(report.session_id.starts_with(DIAGNOSE_PREFIX));
    assert!(storage
        .get_checkpoint(&report.thread_id, "", None)
        .await
        .unwrap()
        .is_none());
    assert!(storage
        .get_writes(&report.thread_id, "", "c1")
        .await
        .unwrap()
        .is_empty());
    // The session, its message and its context are gone too.
    assert!(storage
        .get_session(&report.session_id)
        .await
        .unwrap()
        .is_none());
    assert!(storage
        .get_task_context(&report.session_id)
        .await
        .unwrap()
        .is_none());
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
}

#[tokio::test]
async fn memory_and_sqlite_read_back_what_they_store() {
    let dir = tempfile::tempdir().unwrap();
    let backends: Vec<Arc<dyn StorageBackend>> = vec![
        Arc::new(MemoryBackend::new()),
        Arc::new(SqliteBackend::in_memory()),
        Arc::new(SqliteBackend::new(dir.path().join("c.db"))),
    ];
    for storage in backends {
        let report = diagnose_consistency(storage.as_ref()).await;
        assert_clean_and_consistent(storage.as_ref(), &report).await;
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], true);
        assert_eq!(json["consistent"], true);
        assert_eq!(json["checks"][0]["outcome"], "ok");
    }
}

#[tokio::test]
async fn a_configured_stack_reads_back_what_it_stores() {
    let storage = StorageConfig::from_toml_str(
        r#"
        url = "sqlite::memory:"
        [[layers]]
        type = "retry"
        [[layers]]
        type = "timeout"
        timeout = "5s"
        [[layers]]
        type = "cache"
        [[layers]]
        type = "failover"
        fallback = "memory://"
        [[layers]]
        type = "batch"
        "#,
    )
    .unwrap()
    .build()
    .unwrap();
    let report = diagnose_consistency(storage.as_ref()).await;
    assert_clean_and_consistent(storage.as_ref(), &report).await;
    storage.close().await.unwrap();
}

#[tokio::test]
async fn the_diagnosis_leaves_nothing_behind() {
    let storage = MemoryBackend::new();
    storage
        .create_session("keep", "u", &Default::default())
        .await
        .unwrap();
    let report = diagnose_consistency(&storage).await;
    assert!(report.ok, "{report:#?}");
    let listed = storage.list_sessions(&SessionQuery::new()).await.unwrap();
    let ids: Vec<_> = listed
        .sessions
        .iter()
        .map(|s| s.session_id.as_str())
        .collect();
    assert_eq!(ids, ["keep"]);
    assert!(storage.list_threads(None, 10).await.unwrap().ids.is_empty());
    assert!(storage
        .list_task_contexts(None, 10)
        .await
        .unwrap()
        .ids
        .is_empty());
}

#[tokio::test]
async fn a_failure_midway_still_deletes_the_thread() {
    let inner = Arc::new(MemoryBackend::new());
    let (storage, faults) = Faults::wrap(inner.clone());
    faults.fail_next(Target::Op(Operation::GetSession), 1, ErrorKind::Connection);
    let report = diagnose_consistency(&storage).await;

    assert!(!report.consistent, "{report:#?}");
    assert!(!report.ok);
    let session = report.check("session").unwrap();
    assert_eq!(session.outcome, CheckOutcome::Failed, "{report:#?}");
    assert!(
        session
            .details
            .as_deref()
            .unwrap()
            .starts_with("get_session failed: connection error"),
        "{session:?}"
    );
    // The other checks ran all the same.
    for name in ["message", "checkpoint", "pending_writes", "task_context"] {
        assert_eq!(
            report.check(name).unwrap().outcome,
            CheckOutcome::Ok,
            "{name}: {report:#?}"
        );
    }
    assert_eq!(faults.calls(Operation::DeleteThread), 1);
    assert!(report.cleaned_up, "{report:#?}");
    assert!(inner
        .get_checkpoint(&report.thread_id, "", None)
        .await
        .unwrap()
        .is_none());
    assert!(inner
        .get_session(&report.session_id)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn failed_writes_skip_what_depends_on_them_and_still_clean_up() {
    let inner = Arc::new(MemoryBackend::new());
    let (storage, faults) = Faults::wrap(inner.clone());
    faults.fail_next(Target::Op(Operation::CreateSession), 1, ErrorKind::Backend);
    faults.fail_next(
        Target::Op(Operation::StoreCheckpoint),
        1,
        ErrorKind::Timeout,
    );
    let report = diagnose_consistency(&storage).await;
    let outcome = |name: &str| report.check(name).unwrap().outcome;
    assert_eq!(outcome("session"), CheckOutcome::Failed);
    assert_eq!(outcome("message"), CheckOutcome::Skipped);
    assert_eq!(outcome("task_context"), CheckOutcome::Skipped);
    assert_eq!(outcome("checkpoint"), CheckOutcome::Failed);
    assert_eq!(outcome("pending_writes"), CheckOutcome::Skipped);
    // Cleanup still ran: the thread is deleted, and deleting the missing session is fine.
    assert_eq!(faults.calls(Operation::DeleteThread), 1);
    assert_eq!(faults.calls(Operation::DeleteSession), 1);
    assert_eq!(outcome("delete_thread"), CheckOutcome::Ok);
    assert_eq!(outcome("delete_session"), CheckOutcome::Ok);
    assert!(report.cleaned_up);
    assert!(inner
        .get_session(&report.session_id)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_hung_backend_cannot_hang_the_diagnosis() {
    let (storage, faults) = Faults::wrap(MemoryBackend::new());
    faults.set_latency(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let report = diagnose_consistency_within(&storage, Duration::from_millis(50)).await;
    assert!(started.elapsed() < Duration::from_secs(10), "{report:#?}");
    assert!(!report.consistent);
    assert!(!report.cleaned_up);
    let session = report.check("session").unwrap();
    assert_eq!(session.outcome, CheckOutcome::Failed);
    assert!(
        session.details.as_deref().unwrap().contains("timed out"),
        "{session:?}"
    );
    // The cleanup was attempted, and the report says the thread may remain.
    assert_eq!(
        report.check("delete_thread").unwrap().outcome,
        CheckOutcome::Failed
    );
    assert!(
        report
            .leftovers
            .iter()
            .any(|l| l.contains("delete_thread did not complete")),
        "{report:#?}"
    );
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_reads_back_what_it_stores() {
    let Some(url) = redis_url() else { return };
    let prefix = format!("{}:", common::unique_name("diagnose"));
    let storage = aiecs_storage::RedisBackend::new(&url)
        .unwrap()
        .with_prefix(prefix);
    let report = diagnose_consistency(&storage).await;
    assert_clean_and_consistent(&storage, &report).await;
    // Leave nothing behind on the shared server.
    storage
        .cleanup_expired_sessions(Duration::ZERO)
        .await
        .unwrap();
    storage.close().await.unwrap();
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_reads_back_what_it_stores() {
    let Some(url) = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres diagnose") else {
        return;
    };
    let schema = common::unique_name("diagnose");
    let storage = aiecs_storage::PostgresBackend::new(&url)
        .unwrap()
        .with_schema(&schema)
        .unwrap()
        .with_pool_size(2);
    let report = diagnose_consistency(&storage).await;
    assert_clean_and_consistent(&storage, &report).await;
    storage.close().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .unwrap();
}
