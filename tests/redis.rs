//! Redis-specific behaviour on real servers: credentials never leak, the key layout keeps
//! a session in one slot, TTLs are per session and refreshed, corrupt hashes are
//! reported as such.
//!
//! Needs `AIECS_TEST_REDIS_URL` (and `AIECS_TEST_REDIS_CLUSTER_URL` for the slot test);
//! without them each test prints a notice and passes, except under `CI=true`.
#![cfg(feature = "redis")]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::prelude::*;
use aiecs_storage::{Metadata, RedisBackend, SessionUpdate, StorageError};

mod common;

fn url(var: &str) -> Option<String> {
    common::server_url(var, "redis")
}

fn prefix() -> String {
    format!("{}:", common::unique_name("redis"))
}

fn raw(url: &str) -> redis::Client {
    redis::Client::open(url).unwrap()
}

/// A password-protected redis-server on a free loopback port, stopped on drop.
struct ProtectedRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ProtectedRedis {
    fn start(password: &str) -> ProtectedRedis {
        let port = free_port();
        Self::start_with(password, port, &["--port".into(), port.to_string()])
    }

    fn start_with(password: &str, port: u16, listen: &[String]) -> ProtectedRedis {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--requirepass", password])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
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

impl Drop for ProtectedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn passwords_never_show_in_errors_or_debug() {
    if url("AIECS_TEST_REDIS_URL").is_none() {
        return;
    }
    const SECRET: &str = "s3cr3t-hunter2";
    let server = ProtectedRedis::start("the-right-one");
    let closed_port = free_port();
    for (case, url, refused) in [
        (
            "wrong password",
            format!("redis://:{SECRET}@127.0.0.1:{}", server.port),
            false,
        ),
        (
            "wrong user and password",
            format!("redis://someone:{SECRET}@127.0.0.1:{}/0", server.port),
            false,
        ),
        (
            "refused",
            format!("redis://:{SECRET}@127.0.0.1:{closed_port}"),
            true,
        ),
        (
            "cluster refused",
            format!("redis+cluster://:{SECRET}@127.0.0.1:{closed_port},127.0.0.1:{closed_port}"),
            true,
        ),
    ] {
        let backend = RedisBackend::new(&url).unwrap();
        let debug = format!("{backend:?}");
        assert!(!debug.contains(SECRET), "{case}: Debug shows it: {debug}");
        assert!(debug.contains("***"), "{case}: {debug}");
        let err = backend.initialize().await.expect_err(case);
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!text.contains(SECRET), "{case}: error shows it: {text}");
        }
        if refused {
            // Refused before any command was sent.
            assert!(
                matches!(err, StorageError::Unavailable { .. }),
                "{case}: {err:?}"
            );
            assert!(err.is_transient());
            assert!(!err.may_have_applied());
        } else {
            assert!(
                matches!(err, StorageError::Authentication { .. }),
                "{case}: {err:?}"
            );
            assert!(!err.is_transient());
        }
        let err = backend.get_session("s").await.expect_err(case);
        assert!(!format!("{err:?}").contains(SECRET), "{case}");
    }
    // The right password works, so the failures above were the password's doing.
    let ok = RedisBackend::new(&format!("redis://:the-right-one@127.0.0.1:{}", server.port))
        .unwrap()
        .with_prefix(prefix());
    ok.initialize().await.unwrap();
    ok.create_session("s", "u", &Metadata::new()).await.unwrap();
    assert!(!format!("{:?}", ok.health_check().await.unwrap()).contains("the-right-one"));
}

/// A write that never left the client: `Unavailable` (refused before it ran), so no
/// layer takes it for one that may have applied; transient; its message says what
/// failed and names the redacted URL, never the password.
#[track_caller]
fn assert_never_sent(err: &StorageError, secret: &str) {
    assert!(
        matches!(err, StorageError::Unavailable { .. }),
        "expected Unavailable, got {err:?}"
    );
    assert!(!err.may_have_applied(), "{err:?}");
    assert!(err.is_transient(), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("cannot connect to redis at "), "{text}");
    assert!(text.contains(":***@127.0.0.1:"), "{text}");
    assert!(text.to_lowercase().contains("refused"), "{text}");
    for shown in [text, format!("{err:?}"), format!("{err:#?}")] {
        assert!(!shown.contains(secret), "password shown in: {shown}");
    }
}

/// Nothing listens on the port: no connection, so no write was sent. A node and a
/// cluster answer `Unavailable`, for a plain write and for a counter increment.
#[tokio::test]
async fn a_closed_port_answers_unavailable_for_a_write_never_sent() {
    const SECRET: &str = "n0t-sent-pw";
    let port = free_port();
    for url in [
        format!("redis://:{SECRET}@127.0.0.1:{port}"),
        format!("redis+cluster://:{SECRET}@127.0.0.1:{port},127.0.0.1:{port}"),
    ] {
        let backend = RedisBackend::new(&url).unwrap();
        let create = backend.create_session("s", "u", &Metadata::new()).await;
        assert_never_sent(&create.unwrap_err(), SECRET);
        let increment = SessionUpdate::new().increment_requests();
        let update = backend.update_session("s", &increment).await;
        assert_never_sent(&update.unwrap_err(), SECRET);
    }
}

/// The server of a connected backend goes away. A call may still go out on the dead
/// connection (its outcome unknown: `Connection`); it makes the client reconnect, and
/// the calls after it wait for a connection that cannot be made: never sent.
#[tokio::test]
async fn a_server_gone_away_answers_unavailable_once_the_client_reconnects() {
    if url("AIECS_TEST_REDIS_URL").is_none() {
        return;
    }
    const SECRET: &str = "g0ne-away-pw";
    let mut server = ProtectedRedis::start(SECRET);
    let backend = RedisBackend::new(&format!("redis://:{SECRET}@127.0.0.1:{}", server.port))
        .unwrap()
        .with_prefix(prefix());
    backend
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let increment = SessionUpdate::new().increment_requests();
    let first = backend.update_session("s", &increment).await.unwrap_err();
    assert!(
        matches!(
            first,
            StorageError::Connection { .. } | StorageError::Unavailable { .. }
        ),
        "{first:?}"
    );
    for _ in 0..2 {
        let err = backend.update_session("s", &increment).await.unwrap_err();
        assert_never_sent(&err, SECRET);
    }
}

#[tokio::test]
async fn bad_urls_are_invalid_input_without_the_password() {
    for bad in [
        "http://:pw-123@localhost",
        "redis+cluster://:pw-123@",
        "redis://:pw-123@[::1",
    ] {
        let err = RedisBackend::new(bad).unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidInput { field: "url", .. }),
            "{bad}: {err:?}"
        );
        assert!(!err.to_string().contains("pw-123"), "{err}");
    }
}

#[tokio::test]
async fn session_ttl_is_per_session_and_refreshed() {
    let Some(url) = url("AIECS_TEST_REDIS_URL") else {
        return;
    };
    let prefix = prefix();
    let backend = RedisBackend::new(&url)
        .unwrap()
        .with_prefix(prefix.clone())
        .with_session_ttl(Some(Duration::from_secs(100)));
    backend
        .create_session("a", "u", &Metadata::new())
        .await
        .unwrap();
    backend
        .store_checkpoint(&aiecs_storage::NewCheckpoint::new(
            "t",
            "c",
            serde_json::json!(1),
        ))
        .await
        .unwrap();
    let conn = raw(&url).get_multiplexed_async_connection().await.unwrap();
    let pttl = |key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("PTTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    let session_key = format!("{prefix}{{s:a}}:session");
    let first = pttl(session_key.clone()).await;
    assert!(first > 0 && first <= 100_000, "ttl {first}");
    // Shorten it by hand, then any write to the session must restore the full TTL.
    redis::cmd("PEXPIRE")
        .arg(&session_key)
        .arg(5_000)
        .query_async::<()>(&mut conn.clone())
        .await
        .unwrap();
    backend
        .update_session("a", &SessionUpdate::new().increment_requests())
        .await
        .unwrap();
    assert!(pttl(session_key).await > 5_000);
    // Checkpoints keep no TTL unless asked.
    assert_eq!(pttl(format!("{prefix}{{t:t}}:ns::checkpoints")).await, -1);
}

#[tokio::test]
async fn wrong_typed_hash_fields_are_serialization_errors() {
    let Some(url) = url("AIECS_TEST_REDIS_URL") else {
        return;
    };
    let prefix = prefix();
    let backend = RedisBackend::new(&url).unwrap().with_prefix(prefix.clone());
    backend
        .create_session("a", "u", &Metadata::new())
        .await
        .unwrap();
    let mut conn = raw(&url).get_multiplexed_async_connection().await.unwrap();
    redis::cmd("HSET")
        .arg(format!("{prefix}{{s:a}}:session"))
        .arg("request_count")
        .arg("not-a-number")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    match backend.get_session("a").await {
        Err(StorageError::Serialization { message, .. }) => {
            assert!(message.contains("request_count"), "{message}")
        }
        other => panic!("expected a serialization error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_session_and_a_thread_each_live_in_one_cluster_slot() {
    let Some(url) = url("AIECS_TEST_REDIS_CLUSTER_URL") else {
        return;
    };
    let prefix = prefix();
    let backend = RedisBackend::new(&url).unwrap().with_prefix(prefix.clone());
    let id = "odd}{id:with*glob?[chars]";
    backend
        .create_session(id, "u", &Metadata::new())
        .await
        .unwrap();
    backend
        .add_conversation_message(id, &aiecs_storage::NewMessage::new("user", "x"))
        .await
        .unwrap();
    backend
        .store_task_context(id, &serde_json::json!({"k": 1}))
        .await
        .unwrap();
    let seed = url
        .trim_start_matches("redis+cluster://")
        .split(',')
        .next()
        .unwrap()
        .to_owned();
    let mut conn = raw(&format!("redis://{seed}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let escaped = "odd%7D%7Bid%3Awith*glob?[chars]";
    let mut slots = std::collections::HashSet::new();
    for suffix in ["session", "messages", "message_ids", "context"] {
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("{prefix}{{s:{escaped}}}:{suffix}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        slots.insert(slot);
    }
    assert_eq!(slots.len(), 1, "session keys span slots {slots:?}");
    let s = backend.get_session(id).await.unwrap().unwrap();
    assert_eq!(s.session_id, id);
}

#[tokio::test]
async fn tls_with_a_private_root_certificate() {
    if url("AIECS_TEST_REDIS_URL").is_none() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let path = |name: &str| certs.path().join(name).display().to_string();
    std::fs::write(
        path("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    // A private CA and a server certificate it signs, as a real deployment would have.
    for args in [
        vec![
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ]
        .into_iter()
        .map(String::from)
        .chain(["-subj".into(), "/CN=aiecs-test-ca".into()])
        .chain([
            "-keyout".into(),
            path("ca.key"),
            "-out".into(),
            path("ca.pem"),
        ])
        .collect::<Vec<_>>(),
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            "-keyout".into(),
            path("key.pem"),
            "-out".into(),
            path("srv.csr"),
        ])
        .collect(),
        ["x509", "-req", "-days", "1", "-CAcreateserial"]
            .into_iter()
            .map(String::from)
            .chain(["-in".into(), path("srv.csr"), "-CA".into(), path("ca.pem")])
            .chain([
                "-CAkey".into(),
                path("ca.key"),
                "-out".into(),
                path("cert.pem"),
            ])
            .chain(["-extfile".into(), path("ext.cnf")])
            .collect(),
    ] {
        let status = Command::new("openssl")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl must be installed for the TLS test");
        assert!(status.success(), "openssl {args:?}");
    }
    let (cert, key) = (path("cert.pem"), path("key.pem"));
    let port = free_port();
    let listen: Vec<String> = vec![
        "--port".into(),
        "0".into(),
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        cert,
        "--tls-key-file".into(),
        key,
        "--tls-auth-clients".into(),
        "no".into(),
    ];
    let _server = ProtectedRedis::start_with("tls-pass-99", port, &listen);
    let url = format!("rediss://:tls-pass-99@127.0.0.1:{port}");

    // The server's certificate is not in the public roots: refused, without the password.
    let untrusted = RedisBackend::new(&url).unwrap();
    let err = untrusted.initialize().await.unwrap_err();
    assert!(!format!("{err:?}").contains("tls-pass-99"), "{err:?}");

    let trusted = RedisBackend::new(&url)
        .unwrap()
        .with_prefix(prefix())
        .with_root_certificate(std::fs::read(path("ca.pem")).unwrap());
    trusted
        .create_session("tls", "u", &Metadata::new())
        .await
        .unwrap();
    assert_eq!(
        trusted.get_session("tls").await.unwrap().unwrap().user_id,
        "u"
    );
}

/// The servers configured for this run: (name, URL).
fn servers() -> Vec<(&'static str, String)> {
    [
        ("node", "AIECS_TEST_REDIS_URL"),
        ("cluster", "AIECS_TEST_REDIS_CLUSTER_URL"),
    ]
    .into_iter()
    .filter_map(|(name, var)| url(var).map(|url| (name, url)))
    .collect()
}

/// A plain client connection to a test server, node or cluster, to look at keys behind
/// the backend's back.
enum Raw {
    Node(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Raw {
    async fn connect(url: &str) -> Raw {
        match url.strip_prefix("redis+cluster://") {
            Some(seeds) => {
                let seeds: Vec<String> = seeds.split(',').map(|s| format!("redis://{s}")).collect();
                let client = redis::cluster::ClusterClient::new(seeds).unwrap();
                Raw::Cluster(client.get_async_connection().await.unwrap())
            }
            None => Raw::Node(raw(url).get_multiplexed_async_connection().await.unwrap()),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        match self {
            Raw::Node(c) => cmd.query_async(&mut c.clone()).await.unwrap(),
            Raw::Cluster(c) => cmd.query_async(&mut c.clone()).await.unwrap(),
        }
    }

    async fn exists(&self, key: &str) -> bool {
        self.query::<i64>(redis::cmd("EXISTS").arg(key)).await == 1
    }
}

async fn restored_history_expires_with_its_session(server: &str, url: &str) {
    let prefix = prefix();
    let backend = RedisBackend::new(url)
        .unwrap()
        .with_prefix(prefix.clone())
        .with_session_ttl(Some(Duration::from_secs(1)));
    let now = chrono::Utc::now();
    let session = aiecs_storage::Session {
        session_id: "restored".into(),
        user_id: "u".into(),
        created_at: now,
        updated_at: now,
        status: "active".into(),
        metadata: Metadata::new(),
        metrics: aiecs_storage::SessionMetrics::default(),
    };
    backend.restore_sessions(&[session]).await.unwrap();
    let old = |id: &str, content: &str| aiecs_storage::Message {
        message_id: id.into(),
        role: "user".into(),
        content: content.into(),
        timestamp: now,
        metadata: Metadata::new(),
    };
    let restored = backend
        .restore_messages("restored", &[old("m-1", "old one"), old("m-2", "old two")])
        .await
        .unwrap();
    assert_eq!(restored, 2, "{server}");

    let raw = Raw::connect(url).await;
    let key = |suffix: &str| format!("{prefix}{{s:restored}}:{suffix}");
    for suffix in ["session", "messages", "message_ids"] {
        let ttl: i64 = raw.query(redis::cmd("PTTL").arg(key(suffix))).await;
        assert!(
            ttl > 0 && ttl <= 1_000,
            "{server}: `{suffix}` has PTTL {ttl} after a restore with a 1 s session TTL"
        );
    }
    // Waits for the server to expire the session (bounded, so a key that never expires
    // fails the test rather than hanging it).
    let mut polls = 0;
    while raw.exists(&key("session")).await {
        polls += 1;
        assert!(polls < 400, "{server}: the restored session never expired");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for suffix in ["messages", "message_ids"] {
        assert!(
            !raw.exists(&key(suffix)).await,
            "{server}: `{suffix}` outlived its expired session"
        );
    }
    // A new session under the same id starts empty and stores an id the old one used.
    backend
        .create_session("restored", "someone-else", &Metadata::new())
        .await
        .unwrap();
    let history = backend
        .get_conversation_history("restored", 50)
        .await
        .unwrap();
    assert!(history.is_empty(), "{server}: inherited {history:?}");
    backend
        .add_conversation_message(
            "restored",
            &aiecs_storage::NewMessage::new("user", "new one").with_id("m-1"),
        )
        .await
        .unwrap();
    let history = backend
        .get_conversation_history("restored", 50)
        .await
        .unwrap();
    let stored: Vec<(&str, &str)> = history
        .iter()
        .map(|m| (m.message_id.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(stored, [("m-1", "new one")], "{server}");
}

/// Migration and import restore a session, then its messages: the message keys must
/// expire with the session, or a later session under the same id inherits the history
/// and silently drops messages whose ids the old one used.
#[tokio::test]
async fn restored_messages_expire_with_their_session() {
    for (server, url) in servers() {
        restored_history_expires_with_its_session(server, &url).await;
    }
}

async fn batch_items_fail_alone(server: &str, url: &str) {
    use aiecs_storage::{NewMessage, TaskWrites, WriteInput};
    let prefix = prefix();
    let backend = RedisBackend::new(url).unwrap().with_prefix(prefix.clone());
    let raw = Raw::connect(url).await;
    for id in ["a", "broken", "b"] {
        backend
            .create_session(id, "u", &Metadata::new())
            .await
            .unwrap();
    }
    // A key of the wrong type makes this session's append script fail on the server.
    raw.query::<()>(
        redis::cmd("SET")
            .arg(format!("{prefix}{{s:broken}}:message_ids"))
            .arg("not a set"),
    )
    .await;
    let batch: Vec<(String, NewMessage)> = [
        ("a", "to a"),
        ("missing", "to nobody"),
        ("broken", "to broken"),
        ("b", "to b"),
    ]
    .into_iter()
    .map(|(s, text)| (s.to_owned(), NewMessage::new("user", text)))
    .collect();
    let results = backend
        .batch_add_conversation_messages(&batch)
        .await
        .unwrap_or_else(|e| panic!("{server}: one bad item failed the whole batch: {e:?}"));
    assert_eq!(results.len(), 4, "{server}");
    assert!(results[0].is_ok(), "{server}: {:?}", results[0]);
    assert!(
        matches!(results[1], Err(StorageError::NotFound { .. })),
        "{server}: {:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(StorageError::Backend { .. })),
        "{server}: {:?}",
        results[2]
    );
    assert!(results[3].is_ok(), "{server}: {:?}", results[3]);
    for (session, text) in [("a", "to a"), ("b", "to b")] {
        let history = backend.get_conversation_history(session, 50).await.unwrap();
        let contents: Vec<&str> = history.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, [text], "{server}: session {session}");
    }

    // Pending writes: the middle thread's order key has the wrong type.
    raw.query::<()>(
        redis::cmd("SET")
            .arg(format!("{prefix}{{t:t2}}:ns::writes:cp:order"))
            .arg("not a sorted set"),
    )
    .await;
    let items: Vec<TaskWrites> = ["t1", "t2", "t3"]
        .into_iter()
        .map(|thread| TaskWrites {
            thread_id: thread.into(),
            checkpoint_ns: String::new(),
            checkpoint_id: "cp".into(),
            task_id: "task".into(),
            writes: vec![WriteInput::new("channel", serde_json::json!(thread))],
        })
        .collect();
    let results = backend
        .batch_put_writes(&items)
        .await
        .unwrap_or_else(|e| panic!("{server}: one bad item failed the whole batch: {e:?}"));
    assert!(results[0].is_ok(), "{server}: {:?}", results[0]);
    assert!(
        matches!(results[1], Err(StorageError::Backend { .. })),
        "{server}: {:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{server}: {:?}", results[2]);
    for thread in ["t1", "t3"] {
        let writes = backend.get_writes(thread, "", "cp").await.unwrap();
        assert_eq!(writes.len(), 1, "{server}: thread {thread}");
        assert_eq!(writes[0].value, serde_json::json!(thread), "{server}");
    }
}

/// The batch calls answer per item: an item whose script fails on the server (or whose
/// session is missing) fails alone, and the others, whose scripts ran, are reported Ok.
#[tokio::test]
async fn one_failing_item_does_not_fail_the_rest_of_a_batch() {
    for (server, url) in servers() {
        batch_items_fail_alone(server, &url).await;
    }
}

/// A server that lost its script cache (restart, failover, SCRIPT FLUSH) refuses every
/// script of a batch without running it; the batch reloads them and runs each once.
#[tokio::test]
async fn a_batch_survives_a_flushed_script_cache() {
    if url("AIECS_TEST_REDIS_URL").is_none() {
        return;
    }
    // A private server: flushing the shared one's scripts would disturb other runs.
    let server = ProtectedRedis::start("flush-pass");
    let url = format!("redis://:flush-pass@127.0.0.1:{}", server.port);
    let backend = RedisBackend::new(&url).unwrap().with_prefix(prefix());
    for id in ["a", "b"] {
        backend
            .create_session(id, "u", &Metadata::new())
            .await
            .unwrap();
    }
    let raw = Raw::connect(&url).await;
    raw.query::<()>(redis::cmd("SCRIPT").arg("FLUSH")).await;
    let batch: Vec<(String, aiecs_storage::NewMessage)> = ["a", "b", "a"]
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let message = aiecs_storage::NewMessage::new("user", format!("m{i}"));
            (s.to_owned(), message)
        })
        .collect();
    let results = backend
        .batch_add_conversation_messages(&batch)
        .await
        .unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let contents = |history: Vec<aiecs_storage::Message>| -> Vec<String> {
        history.into_iter().map(|m| m.content).collect()
    };
    let a = backend.get_conversation_history("a", 50).await.unwrap();
    assert_eq!(contents(a), ["m0", "m2"]);
    let b = backend.get_conversation_history("b", 50).await.unwrap();
    assert_eq!(contents(b), ["m1"]);
}

impl Raw {
    /// Runs `cmd` on the master that serves `key` (on a node, the node).
    async fn on_master_of(&self, key: &str, cmd: &redis::Cmd) -> redis::Value {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        match self {
            Raw::Node(_) => self.query(cmd).await,
            Raw::Cluster(c) => {
                let slot: u16 = self
                    .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
                    .await;
                let master =
                    SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                c.clone()
                    .route_command(cmd.clone(), RoutingInfo::SingleNode(master))
                    .await
                    .unwrap()
            }
        }
    }
}

/// An increment whose reply times out may still run (here: the server runs it when it
/// resumes). The client must not send it again on its own, or one call counts twice;
/// RetryLayer decides (and does not retry an increment after a timeout).
async fn a_timed_out_increment_runs_once(server: &str, url: &str) {
    let prefix = prefix();
    let backend = RedisBackend::new(url)
        .unwrap()
        .with_prefix(prefix.clone())
        .with_response_timeout(Duration::from_millis(250));
    backend
        .create_session("counted", "u", &Metadata::new())
        .await
        .unwrap();
    let raw = Raw::connect(url).await;
    let key = format!("{prefix}{{s:counted}}:session");
    // Scripts wait while their master is paused for writes; the pause outlasts every
    // attempt the client could make, and ends only when the test ends it.
    let pause = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(20_000)
        .arg("WRITE")
        .clone();
    raw.on_master_of(&key, &pause).await;
    let increment = SessionUpdate::new().increment_requests();
    let update = backend.update_session("counted", &increment).await;
    raw.on_master_of(&key, redis::cmd("CLIENT").arg("UNPAUSE"))
        .await;
    assert!(
        matches!(update, Err(StorageError::Timeout { .. })),
        "{server}: {update:?}"
    );
    // Sent after every copy of the first, on the same connection: it runs after them.
    assert!(backend.update_session("counted", &increment).await.unwrap());
    let count = backend
        .get_session("counted")
        .await
        .unwrap()
        .unwrap()
        .metrics
        .request_count;
    assert_eq!(
        count,
        2,
        "{server}: the timed-out increment ran {} times",
        count.saturating_sub(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_counter_update_is_not_sent_again() {
    if let Some(url) = url("AIECS_TEST_REDIS_CLUSTER_URL") {
        a_timed_out_increment_runs_once("cluster", &url).await;
    }
    if url("AIECS_TEST_REDIS_URL").is_some() {
        // A private server: pausing the shared one would stall other runs.
        let server = ProtectedRedis::start("pause-pass");
        let url = format!("redis://:pause-pass@127.0.0.1:{}", server.port);
        a_timed_out_increment_runs_once("node", &url).await;
    }
}

/// A loopback TCP proxy to a Redis server. Armed, it swallows the next reply that any
/// of its connections carries and closes that connection: the server ran the command,
/// the client sees its connection drop without an answer.
struct ReplyDropper {
    port: u16,
    armed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplyDropper {
    /// Its listener, bound first so a server can be told to announce its port.
    async fn bind() -> tokio::net::TcpListener {
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    fn serve(listener: tokio::net::TcpListener, upstream: u16) -> ReplyDropper {
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let armed = armed.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(Self::relay(client, upstream, armed.clone()));
                }
            }
        });
        ReplyDropper { port, armed, task }
    }

    async fn relay(client: tokio::net::TcpStream, upstream: u16, armed: Arc<AtomicBool>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
            return;
        };
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        let requests = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
        });
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if armed.swap(false, AtomicOrdering::SeqCst)
                || to_client.write_all(&buf[..n]).await.is_err()
            {
                break;
            }
        }
        // Dropping both halves closes the client's socket.
        requests.abort();
    }

    fn arm(&self) {
        self.armed.store(true, AtomicOrdering::SeqCst);
    }
}

impl Drop for ReplyDropper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One `update_session` whose reply is lost after the server ran it must count once:
/// the client library may not send it again on its own (RetryLayer does not retry an
/// increment after a dropped connection either), and the caller gets the error.
async fn an_increment_whose_reply_is_lost_counts_once(
    server: &str,
    url: &str,
    proxy: &ReplyDropper,
) {
    let backend = RedisBackend::new(url).unwrap().with_prefix(prefix());
    backend
        .create_session("counted", "u", &Metadata::new())
        .await
        .unwrap();
    proxy.arm();
    let update = backend
        .update_session("counted", &SessionUpdate::new().increment_requests())
        .await;
    let count = backend
        .get_session("counted")
        .await
        .unwrap()
        .unwrap()
        .metrics
        .request_count;
    assert_eq!(
        count, 1,
        "{server}: one update_session call counted {count} times (it answered {update:?})"
    );
    assert!(
        matches!(update, Err(StorageError::Connection { .. })),
        "{server}: {update:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_increment_is_not_sent_again_after_its_connection_drops() {
    if url("AIECS_TEST_REDIS_URL").is_none() {
        return;
    }
    // A single-master cluster of its own, announcing the proxy's port, so the cluster
    // client reaches its node only through the proxy.
    let listener = ReplyDropper::bind().await;
    let announced = listener.local_addr().unwrap().port();
    let (port, bus) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let cluster_args: Vec<String> = vec![
        "--port".into(),
        port.to_string(),
        "--cluster-enabled".into(),
        "yes".into(),
        "--cluster-port".into(),
        bus.to_string(),
        "--cluster-config-file".into(),
        dir.path().join("nodes.conf").display().to_string(),
        "--cluster-announce-ip".into(),
        "127.0.0.1".into(),
        "--cluster-announce-port".into(),
        announced.to_string(),
    ];
    let _node = ProtectedRedis::start_with("drop-pass", port, &cluster_args);
    let direct = raw(&format!("redis://:drop-pass@127.0.0.1:{port}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query_async::<()>(&mut direct.clone())
        .await
        .unwrap();
    let mut polls = 0;
    loop {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut direct.clone())
            .await
            .unwrap();
        if info.contains("cluster_state:ok") {
            break;
        }
        polls += 1;
        assert!(
            polls < 200,
            "the one-node cluster never became ready: {info}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let proxy = ReplyDropper::serve(listener, port);
    let url = format!("redis+cluster://:drop-pass@127.0.0.1:{}", proxy.port);
    an_increment_whose_reply_is_lost_counts_once("cluster", &url, &proxy).await;

    let server = ProtectedRedis::start("drop-pass");
    let proxy = ReplyDropper::serve(ReplyDropper::bind().await, server.port);
    let url = format!("redis://:drop-pass@127.0.0.1:{}", proxy.port);
    an_increment_whose_reply_is_lost_counts_once("node", &url, &proxy).await;
}

/// The masters of a test cluster, each on a plain connection, to move a slot by hand.
struct Masters {
    /// (node id, host, port, connection)
    nodes: Vec<(String, String, u16, redis::aio::MultiplexedConnection)>,
}

impl Masters {
    async fn of(cluster_url: &str) -> Masters {
        let seed = cluster_url
            .trim_start_matches("redis+cluster://")
            .split(',')
            .next()
            .unwrap();
        let mut conn = raw(&format!("redis://{seed}"))
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut nodes = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 8 || !fields[2].split(',').any(|f| f == "master") {
                continue;
            }
            let address = fields[1].split('@').next().unwrap();
            let (host, port) = address.rsplit_once(':').unwrap();
            let port: u16 = port.parse().unwrap();
            let conn = raw(&format!("redis://{host}:{port}"))
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            nodes.push((fields[0].to_owned(), host.to_owned(), port, conn));
        }
        assert!(nodes.len() >= 2, "a slot move needs two masters: {text}");
        Masters { nodes }
    }

    async fn on(&self, node: usize, cmd: &redis::Cmd) -> redis::Value {
        cmd.query_async(&mut self.nodes[node].3.clone())
            .await
            .unwrap_or_else(|e| panic!("{cmd:?} on {}: {e}", self.nodes[node].2))
    }

    async fn owner_of(&self, slot: u16) -> usize {
        let reply: Vec<Vec<redis::Value>> =
            redis::from_redis_value(self.on(0, redis::cmd("CLUSTER").arg("SLOTS")).await).unwrap();
        for range in reply {
            let start: u16 = redis::from_redis_value(range[0].clone()).unwrap();
            let end: u16 = redis::from_redis_value(range[1].clone()).unwrap();
            if (start..=end).contains(&slot) {
                let master: Vec<redis::Value> = redis::from_redis_value(range[2].clone()).unwrap();
                let port: u16 = redis::from_redis_value(master[1].clone()).unwrap();
                return self.nodes.iter().position(|n| n.2 == port).unwrap();
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// Moves the slot's keys from `source` to `target` while `source` still owns the
    /// slot: `source` answers ASK for them.
    async fn begin_move(&self, slot: u16, source: usize, target: usize) {
        let setslot = |state: &str, node: usize| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(&self.nodes[node].0)
                .clone()
        };
        self.on(target, &setslot("IMPORTING", source)).await;
        self.on(source, &setslot("MIGRATING", target)).await;
        let keys: Vec<String> = redis::from_redis_value(
            self.on(
                source,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(1000),
            )
            .await,
        )
        .unwrap();
        if !keys.is_empty() {
            let (_, host, port, _) = &self.nodes[target];
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg(host)
                .arg(*port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(keys);
            self.on(source, &migrate).await;
        }
    }

    /// Gives the slot to `target` on every master: others answer MOVED for it.
    async fn end_move(&self, slot: u16, target: usize) {
        let mut setslot = redis::cmd("CLUSTER");
        setslot
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&self.nodes[target].0);
        self.on(target, &setslot).await;
        for node in (0..self.nodes.len()).filter(|&n| n != target) {
            self.on(node, &setslot).await;
        }
    }
}

/// A cluster client that does not send a command again on its own must still follow
/// ASK and MOVED, which say the command did not run: a counter update lands while its
/// slot moves to another master, and after it moved.
#[tokio::test]
async fn counter_updates_follow_a_slot_moving_between_masters() {
    let Some(url) = url("AIECS_TEST_REDIS_CLUSTER_URL") else {
        return;
    };
    let prefix = prefix();
    let backend = RedisBackend::new(&url).unwrap().with_prefix(prefix.clone());
    let id = "moving";
    backend
        .create_session(id, "u", &Metadata::new())
        .await
        .unwrap();
    // With every session key present, the importing master runs a script sent with
    // ASKING; with some missing it would answer TRYAGAIN (Unavailable), which is not
    // what this test is about.
    backend
        .add_conversation_message(id, &aiecs_storage::NewMessage::new("user", "hi"))
        .await
        .unwrap();
    backend
        .store_task_context(id, &serde_json::json!({"k": 1}))
        .await
        .unwrap();
    let masters = Masters::of(&url).await;
    let slot: u16 = redis::from_redis_value(
        masters
            .on(
                0,
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(format!("{prefix}{{s:{id}}}:session")),
            )
            .await,
    )
    .unwrap();
    let source = masters.owner_of(slot).await;
    let target = (source + 1) % masters.nodes.len();
    let increment = SessionUpdate::new().increment_requests();

    masters.begin_move(slot, source, target).await;
    let during = backend.update_session(id, &increment).await;
    masters.end_move(slot, target).await;
    let after = backend.update_session(id, &increment).await;
    let count = backend
        .get_session(id)
        .await
        .map(|s| s.map(|s| s.metrics.request_count));
    // Back where it was, before any assertion can end the test.
    masters.begin_move(slot, target, source).await;
    masters.end_move(slot, source).await;

    assert!(
        matches!(during, Ok(true)),
        "during the move (ASK): {during:?}"
    );
    assert!(
        matches!(after, Ok(true)),
        "after the move (MOVED): {after:?}"
    );
    assert_eq!(count.unwrap(), Some(2));
}

/// A store written by an earlier version (context and thread indexes as plain sets, no
/// session id index) is moved to the id-ordered indexes when a backend connects, and
/// lists everything it holds.
#[tokio::test]
async fn a_store_of_the_older_index_layout_lists_everything_after_connecting() {
    let Some(url) = url("AIECS_TEST_REDIS_URL") else {
        return;
    };
    let prefix = prefix();
    let writer = RedisBackend::new(&url).unwrap().with_prefix(prefix.clone());
    let ids: Vec<String> = (0..40).map(|i| format!("id-{i:02}")).collect();
    for id in &ids {
        writer
            .create_session(id, "u", &Metadata::new())
            .await
            .unwrap();
        writer
            .store_task_context(id, &serde_json::json!({}))
            .await
            .unwrap();
        writer
            .store_checkpoint(&aiecs_storage::NewCheckpoint::new(
                id,
                "c",
                serde_json::json!(1),
            ))
            .await
            .unwrap();
    }
    // Turn the indexes back into the older layout, bucket by bucket.
    let mut conn = raw(&url).get_multiplexed_async_connection().await.unwrap();
    for n in 0..16 {
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}{{idx:{n}}}:sessions_by_id"))
            .query_async(&mut conn)
            .await
            .unwrap();
        for (tag, old) in [("cidx", "contexts"), ("tidx", "threads")] {
            let new = format!("{prefix}{{{tag}:{n}}}:{old}_by_id");
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(&new)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            if members.is_empty() {
                continue;
            }
            let _: () = redis::cmd("SADD")
                .arg(format!("{prefix}{{{tag}:{n}}}:{old}"))
                .arg(&members)
                .query_async(&mut conn)
                .await
                .unwrap();
            let _: () = redis::cmd("DEL")
                .arg(&new)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    let reader = RedisBackend::new(&url).unwrap().with_prefix(prefix.clone());
    let page = reader
        .list_sessions(&aiecs_storage::SessionQuery::new().limit(1000))
        .await
        .unwrap();
    let sessions: Vec<String> = page.sessions.into_iter().map(|s| s.session_id).collect();
    assert_eq!(sessions, ids);
    assert_eq!(reader.list_threads(None, 1000).await.unwrap().ids, ids);
    assert_eq!(
        reader.list_task_contexts(None, 1000).await.unwrap().ids,
        ids
    );
    let old: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}{{tidx:0}}:threads"))
        .arg(format!("{prefix}{{cidx:0}}:contexts"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(old, 0, "the older sets are removed once copied");
    for id in &ids {
        reader.delete_session(id).await.unwrap();
        reader.delete_thread(id).await.unwrap();
    }
}

/// Polls `call` `polls` times, a moment apart (without polling it in between, so a step
/// whose answer came is not followed by the next), then drops it: a caller that gave up
/// (a timeout, a `select!`) somewhere between the steps of a write.
async fn give_up_after<F: std::future::Future>(call: F, polls: usize) {
    let mut call = std::pin::pin!(call);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    for _ in 0..polls {
        if call.as_mut().poll(&mut cx).is_ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Issue 23: a record and its listing-index entry live in different slots, written by
/// separate steps. Whichever step the caller gives up after, a record that is stored is
/// listed (the listings migration, export and cleanup rely on).
async fn a_write_given_up_between_its_steps_is_listed_if_stored(server: &str, url: &str) {
    let storage = RedisBackend::new(url).unwrap().with_prefix(prefix());
    storage.initialize().await.unwrap();
    let mut ctx_ids = Vec::new();
    for polls in 1..=4 {
        let s = format!("s{polls}");
        give_up_after(storage.create_session(&s, "u", &Metadata::new()), polls).await;
        let t = format!("t{polls}");
        let cp = aiecs_storage::NewCheckpoint::new(t.as_str(), "c1", serde_json::json!({}));
        give_up_after(storage.store_checkpoint(&cp), polls).await;
        let w = format!("w{polls}");
        let writes = [aiecs_storage::WriteInput::new("ch", serde_json::json!(1))];
        give_up_after(storage.put_writes(&w, "", "c1", "task", &writes), polls).await;
        let c = format!("c{polls}");
        give_up_after(
            storage.store_task_context(&c, &serde_json::json!({"n": polls})),
            polls,
        )
        .await;
        ctx_ids.push((s, t, w, c));
    }
    // What was sent before the caller gave up has landed by now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sessions = common::listed_session_ids(&storage).await;
    let threads = storage.list_threads(None, 100).await.unwrap().ids;
    let contexts = storage.list_task_contexts(None, 100).await.unwrap().ids;
    let mut stored = 0;
    for (s, t, w, c) in &ctx_ids {
        if storage.get_session(s).await.unwrap().is_some() {
            stored += 1;
            assert!(
                sessions.contains(s),
                "{server}: session {s} stored, not listed"
            );
        }
        if storage.get_checkpoint(t, "", None).await.unwrap().is_some() {
            stored += 1;
            assert!(
                threads.contains(t),
                "{server}: thread {t} stored, not listed"
            );
        }
        if !storage.get_writes(w, "", "c1").await.unwrap().is_empty() {
            stored += 1;
            assert!(
                threads.contains(w),
                "{server}: thread {w} stored, not listed"
            );
        }
        if storage.get_task_context(c).await.unwrap().is_some() {
            stored += 1;
            assert!(
                contexts.contains(c),
                "{server}: context {c} stored, not listed"
            );
        }
    }
    // Given up at every step, some writes landed (the later ones) and some did not.
    assert!(stored > 0, "{server}: nothing stored at all");
    println!("{server}: {stored} of 16 writes given up midway were stored, each listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_given_up_between_its_steps_is_listed_if_stored_everywhere() {
    for (server, url) in servers() {
        a_write_given_up_between_its_steps_is_listed_if_stored(server, &url).await;
    }
}
