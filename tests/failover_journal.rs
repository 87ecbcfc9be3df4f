//! The failover layer's durable journal: writes acknowledged during an outage outlive the
//! layer and the process, are replayed once, and are bounded.
//!
//! The SIGKILL test runs this test binary again as its child: with `AIECS_JOURNAL_CHILD`
//! set, `journal_child` acts as the writer or the replayer instead of a test.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::layer::{Failover, FailoverLayer, Operation};
use aiecs_storage::{
    prelude::*, ErrorKind, MemoryBackend, Metadata, NewCheckpoint, NewMessage, SessionUpdate,
    SqliteBackend,
};
use common::fault::{Faults, Point, Target};
use tower::Layer;

fn increment() -> SessionUpdate {
    SessionUpdate {
        add_requests: 1,
        ..Default::default()
    }
}

/// Waits, however long the replay takes, until `layer` has nothing left to replay; a
/// replay that never finishes fails the test after a minute.
async fn drained(layer: &FailoverLayer) {
    for _ in 0..6000 {
        if !layer.is_degraded() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the journal was not replayed: {} pending",
        layer.pending_writes()
    );
}

/// The number of the replay figure `name` of a failover stack.
async fn figure<B: StorageBackend + 'static>(storage: &Failover<B>, name: &str) -> u64 {
    let metrics = storage.get_metrics().await.unwrap();
    metrics.values[name].as_u64().unwrap()
}

/// Writes through a failover layer whose primary is down: a session, three increments
/// and a message, all acknowledged from the fallback and journaled.
async fn write_during_outage(
    journal: &Path,
    primary: &Arc<MemoryBackend>,
    fallback: &Arc<MemoryBackend>,
) {
    let (p, faults) = Faults::wrap(primary.clone());
    faults.set_down(true);
    let layer = FailoverLayer::new(fallback.clone())
        .with_failure_threshold(1)
        .with_cooldown(Duration::from_secs(600))
        .with_journal(journal)
        .unwrap();
    let storage = layer.layer(p);
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(storage.update_session("s", &increment()).await.unwrap());
    }
    let message = NewMessage::new("user", "hello").with_id("m1");
    storage
        .add_conversation_message("s", &message)
        .await
        .unwrap();
    assert_eq!(layer.pending_writes(), 5);
    assert!(primary.get_session("s").await.unwrap().is_none());
}

#[tokio::test]
async fn a_new_layer_over_the_journal_replays_what_a_dropped_one_acknowledged_once() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("failover.journal");
    let primary = Arc::new(MemoryBackend::new());
    let fallback = Arc::new(MemoryBackend::new());
    write_during_outage(&journal, &primary, &fallback).await;

    // As a restarted process would: a new layer over the same file, the primary back.
    let (p, _faults) = Faults::wrap(primary.clone());
    let layer = FailoverLayer::new(fallback.clone())
        .with_journal(&journal)
        .unwrap();
    assert!(layer.is_degraded(), "a non-empty journal starts degraded");
    assert_eq!(layer.pending_writes(), 5);
    let storage = layer.layer(p);
    // Served from the fallback until the primary caught up.
    assert!(storage.get_session("s").await.unwrap().is_some());
    drained(&layer).await;

    let session = primary.get_session("s").await.unwrap().unwrap();
    assert_eq!(session.metrics.request_count, 3);
    let history = primary.get_conversation_history("s", 50).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].message_id, "m1");
    assert_eq!(figure(&storage, "replayed_writes").await, 5);
    assert_eq!(figure(&storage, "journal_depth").await, 0);
    drop(storage);
    drop(layer);

    // Replayed entries are gone from the file: a third layer has nothing to send.
    let layer = FailoverLayer::new(fallback).with_journal(&journal).unwrap();
    assert!(!layer.is_degraded());
    assert_eq!(layer.pending_writes(), 0);
}

#[tokio::test]
async fn a_full_journal_refuses_writes_with_unavailable_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("failover.journal");
    let primary = Arc::new(MemoryBackend::new());
    let fallback = Arc::new(MemoryBackend::new());
    let open = |max_pending: usize, max_bytes: u64| {
        let (p, faults) = Faults::wrap(primary.clone());
        faults.set_down(true);
        let layer = FailoverLayer::new(fallback.clone())
            .with_failure_threshold(1)
            .with_cooldown(Duration::from_secs(600))
            .with_max_pending(max_pending)
            .with_journal_max_bytes(max_bytes)
            .with_journal(&journal)
            .unwrap();
        (layer.layer(p), faults)
    };

    // Entries: two fit. The second layer counts what the first one left in the file.
    let (storage, _f) = open(2, u64::MAX);
    storage
        .create_session("s", "u", &Metadata::new())
        .await
        .unwrap();
    drop(storage);
    let (storage, _f) = open(2, u64::MAX);
    assert!(storage.update_session("s", &increment()).await.unwrap());
    let refused = storage.update_session("s", &increment()).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unavailable, "{refused}");
    drop(storage);

    // Bytes: a large message does not fit in what is left of 4 KiB.
    let (storage, _f) = open(100, 4096);
    let big = NewMessage::new("user", "x".repeat(8192)).with_id("big");
    let refused = storage
        .add_conversation_message("s", &big)
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unavailable, "{refused}");
    // Refused means not acknowledged: the fallback does not hold it either.
    assert!(fallback
        .get_conversation_history("s", 50)
        .await
        .unwrap()
        .is_empty());
    let small = NewMessage::new("user", "hi").with_id("small");
    storage.add_conversation_message("s", &small).await.unwrap();
}

#[tokio::test]
async fn two_layers_over_one_journal_never_replay_an_entry_twice() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("failover.journal");
    let primary = Arc::new(MemoryBackend::new());
    let fallback = Arc::new(MemoryBackend::new());
    write_during_outage(&journal, &primary, &fallback).await;

    let open = || {
        let (p, faults) = Faults::wrap(primary.clone());
        let layer = FailoverLayer::new(fallback.clone())
            .with_failure_threshold(1)
            .with_cooldown(Duration::from_secs(600))
            .with_journal(&journal)
            .unwrap();
        (layer.layer(p), layer, faults)
    };
    let (first, first_layer, first_faults) = open();
    let (second, second_layer, _second_faults) = open();

    // The first replayer holds the front entry on its way to the primary...
    let gate = first_faults.gate(Target::Op(Operation::CreateSession), Point::Before);
    first.get_session("s").await.unwrap();
    gate.arrived(1).await;
    // ...while the second tries: it must find the journal leased and wait its turn.
    second.get_session("s").await.unwrap();
    for _ in 0..6000 {
        if second_layer.breaker_state() == "open" || !second_layer.is_degraded() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.open();
    drained(&first_layer).await;

    let session = primary.get_session("s").await.unwrap().unwrap();
    assert_eq!(session.metrics.request_count, 3);
    let replayed =
        figure(&first, "replayed_writes").await + figure(&second, "replayed_writes").await;
    assert_eq!(replayed, 5, "each entry is sent once");
    assert_eq!(figure(&first, "unreplayed_increments").await, 0);
    assert_eq!(figure(&second, "unreplayed_increments").await, 0);
}

// ---------------------------------------------------------------------------------
// A process killed during the outage, and the next one.

const CHILD: &str = "AIECS_JOURNAL_CHILD";
const SESSIONS: usize = 3;

/// The stack both children open: failover from the SQLite primary to the SQLite
/// fallback, with the journal, all files in `dir`. The writer's primary is down.
fn child_stack(dir: &Path, primary_down: bool) -> (Failover<impl StorageBackend>, FailoverLayer) {
    let (p, faults) = Faults::wrap(SqliteBackend::new(dir.join("primary.db")));
    faults.set_down(primary_down);
    let layer = FailoverLayer::new(Arc::new(SqliteBackend::new(dir.join("fallback.db"))))
        .with_failure_threshold(1)
        .with_cooldown(Duration::from_millis(50))
        // The killed writer's last, unacknowledged entry is taken as abandoned this soon.
        .with_journal_lease(Duration::from_millis(200))
        .with_journal(dir.join("failover.journal"))
        .unwrap();
    (layer.layer(p), layer)
}

/// Not a test on its own: the child process of the SIGKILL test, when `CHILD` is set.
#[tokio::test]
async fn journal_child() {
    let Ok(role) = std::env::var(CHILD) else {
        return;
    };
    let dir = std::path::PathBuf::from(std::env::var("AIECS_JOURNAL_DIR").unwrap());
    match role.as_str() {
        "writer" => {
            let (storage, _layer) = child_stack(&dir, true);
            storage.initialize().await.unwrap();
            for s in 0..SESSIONS {
                storage
                    .create_session(&format!("s{s}"), "u", &Metadata::new())
                    .await
                    .unwrap();
            }
            println!("READY");
            // Until killed: alternately an increment and a message, each announced
            // before the call and acknowledged after it.
            for i in 0.. {
                let session = format!("s{}", i % SESSIONS);
                if i % 2 == 0 {
                    println!("TRY inc {session}");
                    assert!(storage
                        .update_session(&session, &increment())
                        .await
                        .unwrap());
                    println!("ACK inc {session}");
                } else {
                    let id = format!("m{i}");
                    println!("TRY msg {session} {id}");
                    let message = NewMessage::new("user", "hi").with_id(&id);
                    storage
                        .add_conversation_message(&session, &message)
                        .await
                        .unwrap();
                    println!("ACK msg {session} {id}");
                }
            }
        }
        "replayer" => {
            let (storage, layer) = child_stack(&dir, false);
            storage.initialize().await.unwrap();
            assert!(layer.is_degraded(), "the killed writer left a journal");
            storage.get_session("s0").await.unwrap();
            drained(&layer).await;
            println!(
                "REPLAYED {} UNREPLAYED {}",
                figure(&storage, "replayed_writes").await,
                figure(&storage, "unreplayed_increments").await
            );
            storage.close().await.unwrap();
        }
        other => panic!("unknown child role {other}"),
    }
}

fn child(dir: &Path, role: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "journal_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, role)
        .env("AIECS_JOURNAL_DIR", dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn writes_acknowledged_before_a_sigkill_reach_the_primary_exactly_once() {
    let dir = tempfile::tempdir().unwrap();

    // The writer, killed mid-run with the primary down.
    let mut writer = child(dir.path(), "writer");
    let mut lines = BufReader::new(writer.stdout.take().unwrap()).lines();
    let mut acked_increments: HashMap<String, u64> = HashMap::new();
    let mut acked_messages: HashSet<(String, String)> = HashSet::new();
    let mut in_flight: Option<Vec<String>> = None;
    let mut acks = 0;
    while acks < 200 {
        let line = lines.next().expect("the writer ended early").unwrap();
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        match words.first().map(String::as_str) {
            Some("TRY") => in_flight = Some(words[1..].to_vec()),
            Some("ACK") => {
                acks += 1;
                in_flight = None;
                match words[1].as_str() {
                    "inc" => *acked_increments.entry(words[2].clone()).or_default() += 1,
                    _ => {
                        acked_messages.insert((words[2].clone(), words[3].clone()));
                    }
                }
            }
            _ => {}
        }
    }
    writer.kill().unwrap(); // SIGKILL
    writer.wait().unwrap();
    // Lines written before the kill and not yet read: each is an answer the writer had.
    for line in lines {
        let Ok(line) = line else { break };
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        match words.first().map(String::as_str) {
            Some("TRY") => in_flight = Some(words[1..].to_vec()),
            Some("ACK") => {
                in_flight = None;
                match words[1].as_str() {
                    "inc" => *acked_increments.entry(words[2].clone()).or_default() += 1,
                    _ => {
                        acked_messages.insert((words[2].clone(), words[3].clone()));
                    }
                }
            }
            _ => {}
        }
    }

    // The primary is back; the next process replays the journal.
    let replayer = child(dir.path(), "replayer").wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&replayer.stdout);
    assert!(replayer.status.success(), "replayer failed:\n{out}");
    // libtest may print its own words before ours on the line.
    let figures = out
        .lines()
        .find_map(|l| l.split_once("REPLAYED ").map(|(_, f)| f));
    let figures = figures.unwrap_or_else(|| panic!("no figures from the replayer:\n{out}"));
    let replayed: usize = figures.split_whitespace().next().unwrap().parse().unwrap();
    let acked = acked_increments.values().sum::<u64>() as usize + acked_messages.len();
    assert!(
        replayed >= SESSIONS + acked,
        "replayed {figures}, {acked} acknowledged"
    );

    let primary = SqliteBackend::new(dir.path().join("primary.db"));
    primary.initialize().await.unwrap();
    for s in 0..SESSIONS {
        let id = format!("s{s}");
        let session = primary
            .get_session(&id)
            .await
            .unwrap()
            .expect("session replayed");
        let acked = acked_increments.get(&id).copied().unwrap_or(0);
        // The call the kill cut short was never acknowledged: it may count or not.
        let maybe = matches!(&in_flight, Some(w) if w[0] == "inc" && w[1] == id) as u64;
        let count = session.metrics.request_count;
        assert!(
            count == acked || count == acked + maybe,
            "{id}: {count} increments on the primary, {acked} acknowledged"
        );
        let history = primary.get_conversation_history(&id, 1000).await.unwrap();
        let mut seen = HashSet::new();
        for m in &history {
            assert!(
                seen.insert(m.message_id.clone()),
                "{id}: message {} twice",
                m.message_id
            );
        }
        for (_, m) in acked_messages.iter().filter(|(sid, _)| *sid == id) {
            assert!(seen.contains(m), "{id}: acknowledged message {m} missing");
        }
        let maybe = matches!(&in_flight, Some(w) if w[0] == "msg" && w[1] == id) as usize;
        let acked = acked_messages.iter().filter(|(sid, _)| *sid == id).count();
        assert!(history.len() == acked || history.len() == acked + maybe);
    }
}

// ---------------------------------------------------------------------------------
// Replay against a primary that other replicas wrote to after the outage.

/// Writes journaled by replica A while the primary is down, then written anew on the
/// primary by replica B (a second stack over it) before A's replay runs: B's values
/// must survive the replay, while what B did not touch, and A's counter increments,
/// still reach the primary. With `journal` false, the same through the in-memory queue.
async fn newer_primary_data_survives_the_replay(journal: bool) {
    let dir = tempfile::tempdir().unwrap();
    let primary = Arc::new(MemoryBackend::new());
    let fallback = Arc::new(MemoryBackend::new());
    for s in ["s", "t", "gone"] {
        primary
            .create_session(s, "u", &Metadata::new())
            .await
            .unwrap();
        fallback
            .create_session(s, "u", &Metadata::new())
            .await
            .unwrap();
    }
    let (p, faults) = Faults::wrap(primary.clone());
    faults.set_down(true);
    let mut layer = FailoverLayer::new(fallback.clone())
        .with_failure_threshold(1)
        .with_cooldown(Duration::from_millis(20));
    if journal {
        layer = layer
            .with_journal(dir.path().join("failover.journal"))
            .unwrap();
    }
    let a = layer.layer(p);

    // Replica A, during the outage, which a read found (so no write of A reached the
    // primary and may have landed there).
    a.get_session("s").await.unwrap();
    assert_eq!(layer.breaker_state(), "open");
    let update = SessionUpdate::new()
        .increment_requests()
        .metadata_entry("who", "a")
        .status("a-status");
    assert!(a.update_session("s", &update).await.unwrap());
    assert!(a.end_session("t", "failed").await.unwrap());
    assert!(a.delete_session("gone").await.unwrap());
    a.store_checkpoint(&NewCheckpoint::new("th", "c1", serde_json::json!("a")))
        .await
        .unwrap();
    a.delete_thread("th2").await.unwrap();
    // Entries nobody else touches: replayed, one on top of the other.
    let mut meta = Metadata::new();
    meta.insert("who".into(), "a".into());
    a.create_session("fresh", "u", &meta).await.unwrap();
    a.update_session("fresh", &SessionUpdate::new().metadata_entry("n", 1))
        .await
        .unwrap();
    a.add_conversation_message("fresh", &NewMessage::new("user", "hi").with_id("m1"))
        .await
        .unwrap();
    assert!(a.end_session("fresh", "done").await.unwrap());
    assert_eq!(layer.pending_writes(), 9);

    // The primary returns; A's replay is held at its first call while B writes.
    let gate = faults.gate(Target::Op(Operation::HealthCheck), Point::Before);
    faults.set_down(false);
    a.get_session("s").await.unwrap();
    gate.arrived(1).await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let b = FailoverLayer::new(Arc::new(MemoryBackend::new())).layer(primary.clone());
    let newer = SessionUpdate::new()
        .metadata_entry("who", "b")
        .status("b-status");
    assert!(b.update_session("s", &newer).await.unwrap());
    assert!(b.end_session("t", "completed").await.unwrap());
    b.create_session("gone", "u", &Metadata::new())
        .await
        .unwrap();
    b.store_checkpoint(&NewCheckpoint::new("th", "c1", serde_json::json!("b")))
        .await
        .unwrap();
    b.store_checkpoint(&NewCheckpoint::new("th2", "c9", serde_json::json!("b")))
        .await
        .unwrap();
    gate.open();
    drained(&layer).await;

    let s = primary.get_session("s").await.unwrap().unwrap();
    assert_eq!(
        s.metadata["who"], "b",
        "an older update overwrote a newer one"
    );
    assert_eq!(s.status, "b-status");
    assert_eq!(
        s.metrics.request_count, 1,
        "the increment still counts, once"
    );
    let t = primary.get_session("t").await.unwrap().unwrap();
    assert_eq!(t.status, "completed");
    assert!(
        primary.get_session("gone").await.unwrap().is_some(),
        "an older delete removed a session written after it"
    );
    let c1 = primary
        .get_checkpoint("th", "", Some("c1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c1.data, "b");
    assert!(
        primary
            .get_checkpoint("th2", "", Some("c9"))
            .await
            .unwrap()
            .is_some(),
        "an older delete_thread removed a checkpoint stored after it"
    );

    let fresh = primary.get_session("fresh").await.unwrap().unwrap();
    assert_eq!(fresh.metadata["who"], "a");
    assert_eq!(fresh.metadata["n"], 1);
    assert_eq!(fresh.status, "done");
    assert_eq!(
        primary
            .get_conversation_history("fresh", 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // Skipped: the update's metadata and status (its increment was sent), the end, the
    // delete, the checkpoint and the delete_thread. Sent: that increment and `fresh`'s 4.
    assert_eq!(figure(&a, "replay_skipped_newer").await, 5);
    assert_eq!(figure(&a, "replayed_writes").await, 5);
}

#[tokio::test]
async fn a_journal_replay_never_overwrites_what_another_replica_wrote_after_it() {
    newer_primary_data_survives_the_replay(true).await;
}

#[tokio::test]
async fn an_in_memory_replay_never_overwrites_what_another_replica_wrote_after_it() {
    newer_primary_data_survives_the_replay(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_taking_over_a_replay_knows_what_the_first_one_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("failover.journal");
    let primary = Arc::new(MemoryBackend::new());
    let fallback = Arc::new(MemoryBackend::new());
    {
        let (p, faults) = Faults::wrap(primary.clone());
        faults.set_down(true);
        let layer = FailoverLayer::new(fallback.clone())
            .with_failure_threshold(1)
            .with_cooldown(Duration::from_secs(600))
            .with_journal(&journal)
            .unwrap();
        let storage = layer.layer(p);
        storage.get_session("fresh").await.unwrap();
        storage
            .create_session("fresh", "u", &Metadata::new())
            .await
            .unwrap();
        let update = SessionUpdate::new().metadata_entry("n", 1);
        assert!(storage.update_session("fresh", &update).await.unwrap());
    }

    // The first replayer sends the create, then hangs sending the update...
    let lease = Duration::from_millis(100);
    let (p, faults) = Faults::wrap(primary.clone());
    let gate = faults.gate(Target::Op(Operation::UpdateSession), Point::Before);
    let first_layer = FailoverLayer::new(fallback.clone())
        .with_journal_lease(lease)
        .with_journal(&journal)
        .unwrap();
    let first = first_layer.layer(p);
    first.get_session("fresh").await.unwrap();
    gate.arrived(1).await;
    assert!(primary.get_session("fresh").await.unwrap().is_some());

    // ...and a second takes over once its lease ran out. The session's `updated_at` is
    // the first replayer's clock, later than the update was acknowledged: only the
    // first one's mark, kept in the file, shows the update is not older than the data.
    let (p, _faults) = Faults::wrap(primary.clone());
    let second_layer = FailoverLayer::new(fallback.clone())
        .with_cooldown(Duration::from_millis(20))
        .with_journal_lease(lease)
        .with_journal(&journal)
        .unwrap();
    let second = second_layer.layer(p);
    second.get_session("fresh").await.unwrap();
    drained(&second_layer).await;
    let fresh = primary.get_session("fresh").await.unwrap().unwrap();
    assert_eq!(fresh.metadata["n"], 1, "the update was taken as older");
    assert_eq!(figure(&second, "replay_skipped_newer").await, 0);
    gate.open();
}
