//! Nothing acknowledged is lost when the writing process is SIGKILLed.
//!
//! A child process (this test binary re-executed on the `#[ignore]`d test
//! `child_writer`) writes through the batching layer (`BatchLayer`) over SQLite (a WAL
//! file) or PostgreSQL: 16 concurrent appenders, one per session, plus a task storing
//! checkpoints and their pending writes. It prints one `ACK ...` line per call only
//! after that call returned `Ok`. The parent SIGKILLs it mid-write after a given number
//! of acknowledged appends, reads the complete lines left in the pipe, reopens the store
//! with a fresh backend and checks that every acknowledged message, checkpoint and
//! pending write is stored, in order, and that the killed SQLite file passes
//! `PRAGMA integrity_check` and serves every read of the crate.
//!
//! PostgreSQL needs `AIECS_TEST_POSTGRES_URL`; unset, that test prints a notice and
//! passes, except under `CI=true` where it fails. It works in a schema of its own,
//! dropped at the end.
#![cfg(all(unix, feature = "sqlite"))]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiecs_storage::layer::BatchLayer;
use aiecs_storage::{
    prelude::*, CheckpointFilter, Message, NewCheckpoint, NewMessage, SessionQuery, SqliteBackend,
    WriteInput,
};
use serde_json::json;
use tower::Layer;

/// Carries the store (`sqlite:<path>` or `postgres:<url>`) to the child; its absence
/// makes `child_writer` a no-op.
const CHILD_ENV: &str = "AIECS_CRASH_CHILD";
/// Carries the round number, which keeps checkpoint threads and message contents of
/// successive children on one store apart.
const ROUND_ENV: &str = "AIECS_CRASH_ROUND";

const APPENDERS: usize = 16;
const USER: &str = "crash-user";
/// Checkpoints (with writes) stored before the appenders start, so even an early kill
/// leaves checkpoint data to read.
const EARLY_CHECKPOINTS: u64 = 3;
/// A stray child (parent gone without killing it) stops on its own after this.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
/// The failure mode of a child that stops acknowledging: far beyond any batch.
const LINE_TIMEOUT: Duration = Duration::from_secs(20);

fn session_id(task: usize) -> String {
    format!("crash-s{task:02}")
}

fn thread_id(round: u32) -> String {
    format!("crash-t-r{round}")
}

fn checkpoint_id(round: u32, step: u64) -> String {
    format!("r{round}-cp{step:06}")
}

fn task_id(step: u64) -> String {
    format!("task-{step}")
}

fn writes_for(step: u64) -> Vec<WriteInput> {
    vec![
        WriteInput::new("channel-a", json!({ "step": step })),
        WriteInput::new("channel-b", json!(step)),
    ]
}

// ---------------------------------------------------------------------------------
// The child.
// ---------------------------------------------------------------------------------

/// Writes one line and flushes it; the lock keeps concurrent lines whole. If the parent
/// is gone (broken pipe) there is nobody to acknowledge to, so the child ends.
fn ack(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ACK {line}")
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(3);
    }
}

/// Not a test: the writer process the crash tests spawn and kill. Ignored so that a
/// normal run skips it, and a no-op without its environment variable.
#[ignore = "spawned by the crash tests with AIECS_CRASH_CHILD set"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_writer() {
    let Ok(target) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u32 = std::env::var(ROUND_ENV)
        .expect("round")
        .parse()
        .expect("round number");
    if let Some(path) = target.strip_prefix("sqlite:") {
        run_child(SqliteBackend::new(path), round).await;
    } else if let Some(url) = target.strip_prefix("postgres:") {
        #[cfg(feature = "postgres")]
        run_child(
            aiecs_storage::PostgresBackend::new(url).expect("postgres url"),
            round,
        )
        .await;
        #[cfg(not(feature = "postgres"))]
        panic!("built without the postgres feature: {url}");
    } else {
        panic!("unknown crash target {target}");
    }
}

async fn run_child<B: StorageBackend + 'static>(backend: B, round: u32) {
    let deadline = Instant::now() + CHILD_LIFETIME;
    // libtest may have printed `test child_writer ... ` without a newline: end that line
    // so that the first acknowledgement starts a line of its own.
    {
        let mut out = std::io::stdout().lock();
        writeln!(out).and_then(|()| out.flush()).expect("stdout");
    }
    // A linger makes batches gather from several appenders, so a kill can land while a
    // multi-item batch is in its transaction.
    let storage = Arc::new(
        BatchLayer::new()
            .with_max_batch(64)
            .with_linger(Duration::from_millis(1))
            .layer(backend),
    );
    storage.initialize().await.expect("initialize");
    for task in 0..APPENDERS {
        let id = session_id(task);
        storage
            .create_session(&id, USER, &Default::default())
            .await
            .expect("create session");
        ack(&format!("SESSION {id}"));
    }

    let mut parent = None;
    for step in 0..EARLY_CHECKPOINTS {
        parent = Some(checkpoint_step(&*storage, round, step, parent).await);
    }
    let checkpoints = {
        let storage = storage.clone();
        tokio::spawn(async move {
            let mut step = EARLY_CHECKPOINTS;
            while Instant::now() < deadline {
                parent = Some(checkpoint_step(&*storage, round, step, parent).await);
                step += 1;
                // Leaves most of the single SQLite writer to the appenders.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let mut appenders = Vec::new();
    for task in 0..APPENDERS {
        let storage = storage.clone();
        appenders.push(tokio::spawn(async move {
            let session = session_id(task);
            let mut n = 0u64;
            while Instant::now() < deadline {
                let content = format!("r{round}-t{task}-{n}");
                let id = storage
                    .add_conversation_message(&session, &NewMessage::new("user", &content))
                    .await
                    .expect("append");
                ack(&format!("MSG {session} {id} {content}"));
                n += 1;
            }
        }));
    }
    for a in appenders {
        a.await.expect("appender");
    }
    checkpoints.await.expect("checkpoints");
}

/// Stores checkpoint `step` (child of `parent`) and then its task's pending writes,
/// acknowledging each once it returned. Returns the checkpoint id.
async fn checkpoint_step<S: StorageBackend + ?Sized>(
    storage: &S,
    round: u32,
    step: u64,
    parent: Option<String>,
) -> String {
    let thread = thread_id(round);
    let id = checkpoint_id(round, step);
    let mut checkpoint = NewCheckpoint::new(&thread, &id, json!({ "step": step }))
        .with_metadata([("step".to_owned(), json!(step))].into_iter().collect());
    if let Some(p) = &parent {
        checkpoint = checkpoint.with_parent(p);
    }
    storage
        .store_checkpoint(&checkpoint)
        .await
        .expect("store checkpoint");
    ack(&format!(
        "CKPT {thread} {id} {} {step}",
        parent.as_deref().unwrap_or("-")
    ));
    storage
        .put_writes(&thread, "", &id, &task_id(step), &writes_for(step))
        .await
        .expect("put writes");
    ack(&format!("WRITES {thread} {id} {} {step}", task_id(step)));
    id
}

// ---------------------------------------------------------------------------------
// The parent: spawn, kill, collect what was acknowledged.
// ---------------------------------------------------------------------------------

/// An acknowledged checkpoint.
#[derive(Debug, Clone)]
struct AckedCheckpoint {
    id: String,
    parent: Option<String>,
    step: u64,
}

/// Everything the children acknowledged on one store, over all rounds.
#[derive(Debug, Default)]
struct Acks {
    sessions: BTreeSet<String>,
    /// Per session, `(message id, content)` in acknowledgement order, which is the order
    /// of the session's single appender.
    messages: BTreeMap<String, Vec<(String, String)>>,
    /// Per thread, in acknowledgement order.
    checkpoints: BTreeMap<String, Vec<AckedCheckpoint>>,
    /// `(thread, checkpoint id, task id, step)`.
    writes: Vec<(String, String, String, u64)>,
    rounds: u32,
}

impl Acks {
    fn message_count(&self) -> usize {
        self.messages.values().map(Vec::len).sum()
    }

    fn checkpoint_count(&self) -> usize {
        self.checkpoints.values().map(Vec::len).sum()
    }

    /// Records one line of the child; anything but an `ACK` line (test harness framing)
    /// is ignored. Returns whether it was a message acknowledgement.
    fn record(&mut self, line: &str) -> bool {
        let Some(rest) = line.strip_prefix("ACK ") else {
            return false;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        match f.as_slice() {
            ["SESSION", id] => {
                self.sessions.insert((*id).to_owned());
            }
            ["MSG", session, id, content] => {
                self.messages
                    .entry((*session).to_owned())
                    .or_default()
                    .push(((*id).to_owned(), (*content).to_owned()));
                return true;
            }
            ["CKPT", thread, id, parent, step] => {
                self.checkpoints
                    .entry((*thread).to_owned())
                    .or_default()
                    .push(AckedCheckpoint {
                        id: (*id).to_owned(),
                        parent: (*parent != "-").then(|| (*parent).to_owned()),
                        step: step.parse().expect("step"),
                    });
            }
            ["WRITES", thread, id, task, step] => self.writes.push((
                (*thread).to_owned(),
                (*id).to_owned(),
                (*task).to_owned(),
                step.parse().expect("step"),
            )),
            _ => panic!("malformed acknowledgement line {line:?}"),
        }
        false
    }
}

/// Runs one child on `target`, SIGKILLs it once `kill_after` appends of this round were
/// acknowledged, and records every complete line it printed, including those still in
/// the pipe when it died.
fn kill_round(target: &str, round: u32, kill_after: usize, acks: &mut Acks) {
    use std::os::unix::process::ExitStatusExt;

    let exe = std::env::current_exe().expect("test binary path");
    // libtest arguments in both harnesses: nextest also runs this libtest binary.
    let mut child = Command::new(exe)
        .args([
            "child_writer",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, target)
        .env(ROUND_ENV, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child writer");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match stdout.read_line(&mut line) {
                // A line cut by the kill has no newline: it was never fully printed.
                Ok(n) if n > 0 && line.ends_with('\n') => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });

    let messages_before = acks.message_count();
    let mut acked = 0usize;
    while acked < kill_after {
        match rx.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => acked += usize::from(acks.record(line.trim_end())),
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("round {round}: the child stopped after {acked} acknowledged appends ({e:?}, {status:?})");
            }
        }
    }
    // SIGKILL on Unix: no destructor, flush or close runs in the child.
    child.kill().expect("kill the child");
    let status = child.wait().expect("reap the child");
    let mut after_kill = 0usize;
    loop {
        match rx.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => after_kill += usize::from(acks.record(line.trim_end())),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the dead child's pipe never closed"),
        }
    }
    reader.join().expect("reader thread");
    acks.rounds += 1;
    println!(
        "round {round}: killed after {acked} acknowledged appends ({after_kill} more were still in the pipe), \
         {} appends acknowledged this round, child status {status}",
        acks.message_count() - messages_before
    );
    assert_eq!(
        status.signal(),
        Some(9),
        "the child must die of our SIGKILL while still writing, not exit on its own"
    );
}

// ---------------------------------------------------------------------------------
// Checks on the reopened store.
// ---------------------------------------------------------------------------------

/// The whole history of a session, paged by position.
async fn all_messages<S: StorageBackend + ?Sized>(storage: &S, session: &str) -> Vec<Message> {
    let mut out = Vec::new();
    loop {
        let page = storage
            .get_conversation_range(session, out.len() as u64, 1_000)
            .await
            .expect("get_conversation_range");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// Every acknowledged message, checkpoint and pending write is stored.
async fn check_no_loss<S: StorageBackend + ?Sized>(storage: &S, acks: &Acks, label: &str) {
    let (mut stored, mut missing) = (0usize, Vec::new());
    for (session, acked) in &acks.messages {
        let ids: BTreeSet<String> = all_messages(storage, session)
            .await
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        stored += ids.len();
        missing.extend(acked.iter().filter(|(id, _)| !ids.contains(id)).cloned());
    }
    println!(
        "{label}: appends acknowledged {}, stored {stored}, missing {}",
        acks.message_count(),
        missing.len()
    );

    let (mut stored_checkpoints, mut missing_checkpoints) = (0usize, Vec::new());
    for (thread, acked) in &acks.checkpoints {
        let ids: BTreeSet<String> = storage
            .list_checkpoints(thread, "", &CheckpointFilter::new().limit(10_000))
            .await
            .expect("list_checkpoints")
            .into_iter()
            .map(|c| c.checkpoint_id)
            .collect();
        stored_checkpoints += ids.len();
        missing_checkpoints.extend(acked.iter().filter(|c| !ids.contains(&c.id)).cloned());
    }
    println!(
        "{label}: checkpoints acknowledged {}, stored {stored_checkpoints}, missing {}",
        acks.checkpoint_count(),
        missing_checkpoints.len()
    );

    let mut missing_writes = Vec::new();
    for (thread, checkpoint, task, step) in &acks.writes {
        let writes = storage
            .get_writes(thread, "", checkpoint)
            .await
            .expect("get_writes");
        let mine: Vec<_> = writes
            .iter()
            .filter(|w| &w.task_id == task)
            .map(|w| (w.idx, w.channel.clone(), w.value.clone()))
            .collect();
        let expected: Vec<_> = writes_for(*step)
            .into_iter()
            .enumerate()
            .map(|(i, w)| (i as u32, w.channel, w.value))
            .collect();
        if mine != expected {
            missing_writes.push((checkpoint.clone(), task.clone()));
        }
    }
    println!(
        "{label}: put_writes acknowledged {}, missing or altered {}",
        acks.writes.len(),
        missing_writes.len()
    );

    assert!(acks.message_count() > 0 && !acks.writes.is_empty());
    assert!(
        missing.is_empty(),
        "{label}: acknowledged appends lost: {missing:?}"
    );
    assert!(
        missing_checkpoints.is_empty(),
        "{label}: acknowledged checkpoints lost: {missing_checkpoints:?}"
    );
    assert!(
        missing_writes.is_empty(),
        "{label}: acknowledged pending writes lost: {missing_writes:?}"
    );
}

/// The crate's reads work on the store and agree with what was acknowledged: sessions,
/// the session list, history (two read paths), the checkpoint chain, the latest
/// checkpoint and the pending writes.
async fn check_reads<S: StorageBackend + ?Sized>(storage: &S, acks: &Acks, label: &str) {
    for id in &acks.sessions {
        let session = storage
            .get_session(id)
            .await
            .expect("get_session")
            .unwrap_or_else(|| panic!("{label}: acknowledged session {id} is gone"));
        assert_eq!(session.user_id, USER);
        assert_eq!(session.status, "active");
    }
    let listed: BTreeSet<String> = storage
        .list_sessions(&SessionQuery::new().user(USER).limit(1_000))
        .await
        .expect("list_sessions")
        .sessions
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(listed, acks.sessions, "{label}: list_sessions");

    let mut unacknowledged_stored = 0usize;
    for (session, acked) in &acks.messages {
        let all = all_messages(storage, session).await;
        let history = storage
            .get_conversation_history(session, 10_000)
            .await
            .expect("get_conversation_history");
        let tail = &all[all.len().saturating_sub(10_000)..];
        assert_eq!(
            history.iter().map(|m| &m.message_id).collect::<Vec<_>>(),
            tail.iter().map(|m| &m.message_id).collect::<Vec<_>>(),
            "{label}: history and range of {session} disagree"
        );
        // One appender per session, one call at a time: the acknowledged messages are
        // stored in acknowledgement order, and each killed child can have left at most
        // one stored but unacknowledged message per session (the call in flight).
        let by_id: HashMap<&str, &Message> =
            all.iter().map(|m| (m.message_id.as_str(), m)).collect();
        let positions: Vec<usize> = acked
            .iter()
            .map(|(id, content)| {
                let m = by_id[id.as_str()];
                assert_eq!(&m.content, content, "{label}: content of {id}");
                all.iter()
                    .position(|s| &s.message_id == id)
                    .expect("position")
            })
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{label}: {session} stores its acknowledged messages out of order"
        );
        let extra = all.len() - acked.len();
        assert!(
            extra <= acks.rounds as usize,
            "{label}: {session} holds {extra} unacknowledged messages after {} kills",
            acks.rounds
        );
        unacknowledged_stored += extra;
    }
    println!(
        "{label}: {} sessions read and listed; history == range on each; \
         {unacknowledged_stored} stored-but-unacknowledged appends (at most 1 per session per kill)",
        acks.sessions.len()
    );

    for (thread, acked) in &acks.checkpoints {
        let mut list = storage
            .list_checkpoints(thread, "", &CheckpointFilter::new().limit(10_000))
            .await
            .expect("list_checkpoints");
        let latest = storage
            .get_checkpoint(thread, "", None)
            .await
            .expect("get_checkpoint latest")
            .expect("a latest checkpoint");
        assert_eq!(
            Some(&latest),
            list.first(),
            "{label}: latest is the list head"
        );
        list.reverse();
        // One sequential writer per thread: the stored chain is the acknowledged chain
        // plus at most the one in flight.
        assert!(
            list.len() == acked.len() || list.len() == acked.len() + 1,
            "{label}: {thread} stores {} checkpoints, {} acknowledged",
            list.len(),
            acked.len()
        );
        for (i, c) in list.iter().enumerate() {
            let step = i as u64;
            assert_eq!(
                c.data,
                json!({ "step": step }),
                "{label}: data of {}",
                c.checkpoint_id
            );
            assert_eq!(c.metadata.get("step"), Some(&json!(step)));
            assert_eq!(
                c.parent_checkpoint_id,
                i.checked_sub(1).map(|p| list[p].checkpoint_id.clone()),
                "{label}: parent of {}",
                c.checkpoint_id
            );
            if let Some(a) = acked.get(i) {
                assert_eq!(
                    (&c.checkpoint_id, &c.parent_checkpoint_id, step),
                    (&a.id, &a.parent, a.step)
                );
            }
        }
        let last = acked.last().expect("acknowledged checkpoints");
        let by_id = storage
            .get_checkpoint(thread, "", Some(&last.id))
            .await
            .expect("get_checkpoint by id")
            .expect("last acknowledged checkpoint");
        assert_eq!(by_id.data, json!({ "step": last.step }));
        println!(
            "{label}: thread {thread}: {} checkpoints acknowledged, {} listed, latest {}",
            acked.len(),
            list.len(),
            latest.checkpoint_id
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// `PRAGMA integrity_check` (and the foreign key check) on the file as the killed child
/// left it, opened read-only so that nothing of the crate touches it first.
fn integrity_check(path: &Path) {
    let wal = path.with_extension("db-wal");
    let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the killed file read-only");
    let integrity: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let foreign_key_violations = conn
        .prepare("PRAGMA foreign_key_check")
        .unwrap()
        .query_map([], |_| Ok(()))
        .unwrap()
        .count();
    let journal: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    println!(
        "integrity_check: {integrity:?}, foreign key violations {foreign_key_violations}, \
         journal_mode {journal}, WAL left by the killed child {wal_bytes} bytes"
    );
    assert_eq!(integrity, ["ok"]);
    assert_eq!(foreign_key_violations, 0);
    assert_eq!(journal, "wal");
}

// ---------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------

/// Three children in turn on one SQLite file, killed after 50, 300 and 1 000
/// acknowledged appends (early, mid-run, late; the later ones also start on a file a
/// killed child left behind): after each kill a fresh backend finds every acknowledged
/// append, checkpoint and pending write.
#[test]
fn sqlite_sigkill_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let target = format!("sqlite:{}", path.display());
    let rt = runtime();
    let mut acks = Acks::default();
    for (round, kill_after) in [50, 300, 1_000].into_iter().enumerate() {
        let round = round as u32 + 1;
        kill_round(&target, round, kill_after, &mut acks);
        rt.block_on(async {
            let reopened = SqliteBackend::new(&path);
            check_no_loss(&reopened, &acks, &format!("sqlite after kill {round}")).await;
            reopened.close().await.unwrap();
        });
    }
}

/// The file a child was killed in the middle of writing passes `PRAGMA
/// integrity_check`, and a fresh `SqliteBackend` serves every read consistently with
/// what was acknowledged, then accepts new writes.
#[test]
fn sqlite_file_after_sigkill_passes_integrity_check_and_serves_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let mut acks = Acks::default();
    kill_round(&format!("sqlite:{}", path.display()), 1, 200, &mut acks);
    integrity_check(&path);
    runtime().block_on(async {
        let reopened = SqliteBackend::new(&path);
        check_reads(&reopened, &acks, "sqlite reopened").await;
        check_no_loss(&reopened, &acks, "sqlite reopened").await;
        let session = session_id(0);
        let id = reopened
            .add_conversation_message(&session, &NewMessage::new("user", "after the crash"))
            .await
            .expect("append after recovery");
        let history = reopened
            .get_conversation_history(&session, 1)
            .await
            .unwrap();
        assert_eq!(history[0].message_id, id);
        reopened.close().await.unwrap();
    });
    integrity_check(&path);
}

/// The same over PostgreSQL: a child killed after 500 acknowledged appends loses none,
/// and the reads agree with what was acknowledged.
#[cfg(feature = "postgres")]
#[test]
fn postgres_sigkill_loses_no_acknowledged_write() {
    let Some(url) = common::server_url("AIECS_TEST_POSTGRES_URL", "postgres") else {
        return;
    };
    let schema = common::unique_name("crash");
    let separator = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{separator}schema={schema}");
    let mut acks = Acks::default();
    kill_round(&format!("postgres:{scoped}"), 1, 500, &mut acks);
    runtime().block_on(async {
        let reopened = aiecs_storage::PostgresBackend::new(&scoped)
            .unwrap()
            .with_pool_size(2);
        check_no_loss(&reopened, &acks, "postgres after kill").await;
        check_reads(&reopened, &acks, "postgres after kill").await;
        reopened.close().await.unwrap();

        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("raw connection to drop the schema");
        tokio::spawn(connection);
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .expect("drop the test schema");
    });
}
