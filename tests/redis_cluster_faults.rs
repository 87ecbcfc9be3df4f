//! A Redis Cluster with replicas under its everyday faults, with 32 tasks writing
//! throughout: a master hung (SIGSTOP) past the node timeout, a master killed
//! (SIGKILL), and slots resharded. Afterwards every acknowledged append is there once,
//! every counter holds its acknowledged increments (and no more than were tried), every
//! acknowledged checkpoint is there, and the client served the hung master's slots from
//! the promoted replica while the old master was still hung. Meanwhile a coherent cache
//! over a client of its own (as another replica's) reads a session on the faulty master
//! and a thread after each write a writer of its own acknowledges: no read begun a
//! second after an acknowledgement shows less.
//!
//! Needs the 3-master, 3-replica cluster of `scripts/redis-cluster.sh start replicas`:
//! `AIECS_TEST_REDIS_REPLICAS_URL=redis+cluster://127.0.0.1:7201,...`, and the
//! cluster's directory (the script's default, or `AIECS_REDIS_CLUSTER_DIR`) to find
//! the nodes' pids. Unset, the test prints a notice and passes, except under `CI=true`.
//! The scenarios run one after the other in one test: each changes the cluster the
//! next one starts from.
#![cfg(feature = "redis")]

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiecs_storage::layer::CacheLayer;
use aiecs_storage::prelude::*;
use aiecs_storage::{
    CheckpointFilter, Metadata, NewCheckpoint, NewMessage, RedisBackend, SessionUpdate,
};
use serde_json::json;
use tower::Layer;

const TASKS: usize = 32;

fn cluster_dir() -> String {
    std::env::var("AIECS_REDIS_CLUSTER_DIR").unwrap_or_else(|_| {
        format!(
            "{}/aiecs-redis-cluster-replicas",
            std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into())
        )
    })
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One line of `CLUSTER NODES`: id, port, whether a master, whether flagged failed.
struct Node {
    id: String,
    port: u16,
    master: bool,
    failed: bool,
}

fn nodes(via: &[u16]) -> Vec<Node> {
    for &port in via {
        let text = cli(port, &["cluster", "nodes"]);
        let nodes: Vec<Node> = text
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f.get(1)?.split(['@', ',']).next()?.rsplit_once(':')?.1;
                Some(Node {
                    id: f[0].to_owned(),
                    port: port.parse().ok()?,
                    master: f[2].contains("master"),
                    failed: f[2].contains("fail"),
                })
            })
            .collect();
        if !nodes.is_empty() {
            return nodes;
        }
    }
    panic!("no node answered CLUSTER NODES");
}

fn ports(url: &str) -> Vec<u16> {
    let hosts = url
        .split("://")
        .nth(1)
        .unwrap()
        .split(['/', '?'])
        .next()
        .unwrap();
    hosts
        .split(',')
        .map(|h| h.rsplit_once(':').unwrap().1.parse().unwrap())
        .collect()
}

fn pid(port: u16) -> i32 {
    let path = format!("{}/{port}/redis.pid", cluster_dir());
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

fn signal(port: u16, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid(port).to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} the node on {port}");
}

fn script(args: &[&str]) {
    let status = Command::new("scripts/redis-cluster.sh")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "scripts/redis-cluster.sh {args:?}");
}

/// The master serving session `id`'s keys, by the slot of its hash tag.
fn master_of_session(via: &[u16], id: &str) -> u16 {
    let slot: u16 = cli(via[0], &["cluster", "keyslot", &format!("{{s:{id}}}")])
        .trim()
        .parse()
        .unwrap();
    for line in cli(via[0], &["cluster", "nodes"]).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if !f.get(2).is_some_and(|flags| flags.contains("master")) {
            continue;
        }
        for range in f.iter().skip(8).filter(|r| !r.starts_with('[')) {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            if (a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()).contains(&slot) {
                return f[1]
                    .split(['@', ','])
                    .next()
                    .unwrap()
                    .rsplit_once(':')
                    .unwrap()
                    .1
                    .parse()
                    .unwrap();
            }
        }
    }
    panic!("no master owns slot {slot}");
}

/// How long after an acknowledged write a read through a coherent cache may still miss
/// it: the feed's push takes milliseconds; a lost node is found within a heartbeat.
const FRESH_WITHIN: Duration = Duration::from_secs(1);

/// A coherent cache over a client of its own reading session and thread `id` after each
/// increment and checkpoint that a writer of its own acknowledges.
struct Probe {
    stop: Arc<AtomicBool>,
    /// While set, the probe only reads: what its cache holds then was read before the
    /// fault.
    quiet: Arc<AtomicBool>,
    /// Reads so far.
    reads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<ProbeReport>,
}

#[derive(Debug, Default)]
struct ProbeReport {
    reads: u64,
    acked: u64,
    /// Reads begun [`FRESH_WITHIN`] after an acknowledged write that did not show it.
    stale: Vec<String>,
    /// The cache's hits, to show it cached at all.
    hits: u64,
}

/// A probe's acknowledged writes of one kind: how many, and when the recent ones were.
#[derive(Default)]
struct Acks {
    count: u64,
    /// What was acknowledged more than [`FRESH_WITHIN`] ago, as of the last `due`.
    floor: u64,
    recent: std::collections::VecDeque<(u64, Instant)>,
}

impl Acks {
    fn ack(&mut self) {
        self.count += 1;
        self.recent.push_back((self.count, Instant::now()));
    }

    /// What a read begun at `began` must show: what was acknowledged
    /// [`FRESH_WITHIN`] before.
    fn due(&mut self, began: Instant) -> u64 {
        while let Some(&(n, at)) = self.recent.front() {
            if at + FRESH_WITHIN > began {
                break;
            }
            self.floor = n;
            self.recent.pop_front();
        }
        self.floor
    }
}

/// Starts a probe on a session whose slot `master` serves, and a thread of the same id.
async fn start_probe(
    url: &str,
    writer: Arc<RedisBackend>,
    prefix: &str,
    via: &[u16],
    master: u16,
) -> Probe {
    let id = (0..)
        .map(|n| format!("{prefix}-probe{n}"))
        .find(|id| master_of_session(via, id) == master)
        .unwrap();
    writer
        .create_session(&id, "u", &Metadata::new())
        .await
        .unwrap();
    writer
        .store_checkpoint(&NewCheckpoint::new(id.as_str(), "c0000000", json!({})))
        .await
        .unwrap();
    // Figures from the layer, not the stack's `get_metrics`, which asks the cluster.
    let layer = CacheLayer::new();
    let cache = layer.layer(RedisBackend::new(url).unwrap());
    cache.get_session(&id).await.unwrap();
    common::coherence::until_feed(&cache, "up").await;
    let (stop, quiet) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let reads = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn({
        let (stop, quiet, reads) = (stop.clone(), quiet.clone(), reads.clone());
        async move {
            let mut report = ProbeReport::default();
            let (mut increments, mut checkpoints) = (Acks::default(), Acks::default());
            while !stop.load(Ordering::Relaxed) {
                // Twice: the second read is the cache's to answer.
                for _ in 0..2 {
                    let began = Instant::now();
                    let want = increments.due(began);
                    if let Ok(Some(s)) = cache.get_session(&id).await {
                        report.reads += 1;
                        if s.metrics.request_count < want {
                            report.stale.push(format!(
                                "{} requests, {want} acknowledged",
                                s.metrics.request_count
                            ));
                        }
                    }
                    let want = checkpoints.due(began);
                    if let Ok(Some(c)) = cache.get_checkpoint(&id, "", None).await {
                        report.reads += 1;
                        let n: u64 = c.checkpoint_id[1..].parse().unwrap();
                        if n < want {
                            report.stale.push(format!(
                                "latest {}, c{want:07} acknowledged",
                                c.checkpoint_id
                            ));
                        }
                    }
                }
                reads.store(report.reads, Ordering::Relaxed);
                if quiet.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                let inc = SessionUpdate::new().increment_requests();
                if let Ok(true) = writer.update_session(&id, &inc).await {
                    increments.ack();
                    report.acked += 1;
                }
                let n = checkpoints.count + 1;
                let checkpoint =
                    NewCheckpoint::new(id.as_str(), format!("c{n:07}").as_str(), json!({}));
                if writer.store_checkpoint(&checkpoint).await.is_ok() {
                    checkpoints.ack();
                    report.acked += 1;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            report.hits = layer.stats().hits;
            report
        }
    });
    Probe {
        stop,
        quiet,
        reads,
        task,
    }
}

impl Probe {
    /// Stops writing, and lets the probe read what it wrote into its cache.
    async fn hush(&self) {
        self.quiet.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    fn speak(&self) {
        self.quiet.store(false, Ordering::Relaxed);
    }

    /// Lets the probe go on for three times [`FRESH_WITHIN`] and 200 reads at least (10 s
    /// at most) on the cluster as the fault left it, then stops it.
    async fn stop(self) -> ProbeReport {
        let from = self.reads.load(Ordering::Relaxed);
        let (least, most) = (
            Instant::now() + 3 * FRESH_WITHIN,
            Instant::now() + Duration::from_secs(10),
        );
        while (self.reads.load(Ordering::Relaxed) < from + 200 || Instant::now() < least)
            && Instant::now() < most
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

impl ProbeReport {
    /// Prints the figures; fails if the cache never hit or a read was stale.
    fn check(&self, what: &str) {
        println!(
            "{what}: the coherent cache made {} reads, {} cache hits, of {} acknowledged writes; {} stale",
            self.reads,
            self.hits,
            self.acked,
            self.stale.len()
        );
        assert!(self.hits > 0, "{what}: the probe's cache never hit");
        assert!(
            self.stale.is_empty(),
            "{what}: reads through a coherent cache missed acknowledged writes: {:?}",
            self.stale
        );
    }
}

/// Sends SIGCONT to a stopped node when dropped, so a failing test leaves no node hung
/// for the tests after it.
struct Resume(u16);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

/// What the writers were told: acknowledged and unknown (failed) calls per task.
#[derive(Default)]
struct Ledger {
    messages_acked: Vec<String>,
    messages_unknown: Vec<String>,
    increments_acked: u64,
    increments_unknown: u64,
    checkpoints_acked: Vec<String>,
}

struct Run {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Ledger>>,
    began: Instant,
    /// Per task, when its last call succeeded (ms since `began`).
    progress: Arc<Vec<AtomicU64>>,
}

impl Run {
    /// Whether every task has succeeded since `since`.
    fn all_succeeded_since(&self, since: Duration) -> bool {
        let since = since.as_millis() as u64;
        self.progress
            .iter()
            .all(|t| t.load(Ordering::Relaxed) > since)
    }
}

fn session(prefix: &str, i: usize) -> String {
    format!("{prefix}-s{i}")
}

fn thread(prefix: &str, i: usize) -> String {
    format!("{prefix}-t{i}")
}

async fn start_writers(storage: Arc<RedisBackend>, prefix: &str) -> Run {
    for i in 0..TASKS {
        storage
            .create_session(&session(prefix, i), "u", &Metadata::new())
            .await
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..TASKS).map(|_| AtomicU64::new(0)).collect());
    let tasks = (0..TASKS)
        .map(|i| {
            let (storage, stop, prefix) = (storage.clone(), stop.clone(), prefix.to_owned());
            let progress = progress.clone();
            let succeeded =
                move || progress[i].store(began.elapsed().as_millis() as u64, Ordering::Relaxed);
            tokio::spawn(async move {
                let (s, t) = (session(&prefix, i), thread(&prefix, i));
                let mut ledger = Ledger::default();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("m{n:07}");
                    let mut message = NewMessage::new("user", "hello");
                    message.message_id = Some(id.clone());
                    match storage.add_conversation_message(&s, &message).await {
                        Ok(_) => {
                            ledger.messages_acked.push(id);
                            succeeded();
                        }
                        Err(_) => ledger.messages_unknown.push(id),
                    }
                    let inc = SessionUpdate::new().increment_requests();
                    match storage.update_session(&s, &inc).await {
                        Ok(true) => {
                            ledger.increments_acked += 1;
                            succeeded();
                        }
                        Ok(false) => panic!("session {s} vanished"),
                        Err(_) => ledger.increments_unknown += 1,
                    }
                    let cp = format!("c{n:07}");
                    let checkpoint = NewCheckpoint::new(t.as_str(), cp.as_str(), json!({"n": n}));
                    if storage.store_checkpoint(&checkpoint).await.is_ok() {
                        ledger.checkpoints_acked.push(cp);
                        succeeded();
                    }
                }
                ledger
            })
        })
        .collect();
    Run {
        stop,
        tasks,
        began,
        progress,
    }
}

async fn finish(run: Run) -> Vec<Ledger> {
    run.stop.store(true, Ordering::Relaxed);
    let mut ledgers = Vec::new();
    for task in run.tasks {
        ledgers.push(task.await.unwrap());
    }
    ledgers
}

/// Reads everything back through a client opened now, and checks it against what the
/// writers were told. Returns how many acknowledged writes Redis lost (a failover
/// can lose what replication had not carried yet).
async fn verify(url: &str, prefix: &str, ledgers: &[Ledger], what: &str) -> usize {
    let storage = RedisBackend::new(url).unwrap();
    let mut lost = 0;
    let (mut acked, mut unknown) = (0, 0);
    for (i, ledger) in ledgers.iter().enumerate() {
        let s = session(prefix, i);
        let mut ids = Vec::new();
        loop {
            let page = storage
                .get_conversation_range(&s, ids.len() as u64, 10_000)
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            ids.extend(page.into_iter().map(|m| m.message_id));
        }
        let stored: HashSet<&String> = ids.iter().collect();
        assert_eq!(
            stored.len(),
            ids.len(),
            "{what}: a message stored twice in {s}"
        );
        let tried: HashSet<&String> = ledger
            .messages_acked
            .iter()
            .chain(&ledger.messages_unknown)
            .collect();
        assert!(
            stored.iter().all(|id| tried.contains(id)),
            "{what}: a message nobody sent in {s}"
        );
        lost += ledger
            .messages_acked
            .iter()
            .filter(|id| !stored.contains(id))
            .count();

        let count = storage
            .get_session(&s)
            .await
            .unwrap()
            .expect("the session is there")
            .metrics
            .request_count;
        assert!(
            count <= ledger.increments_acked + ledger.increments_unknown,
            "{what}: {s} counts {count}, more than the {} increments tried",
            ledger.increments_acked + ledger.increments_unknown
        );
        lost += ledger.increments_acked.saturating_sub(count) as usize;

        let t = thread(prefix, i);
        let mut stored = HashSet::new();
        let mut filter = CheckpointFilter {
            limit: 10_000,
            ..Default::default()
        };
        loop {
            let page = storage.list_checkpoints(&t, "", &filter).await.unwrap();
            let Some(last) = page.last() else { break };
            filter.before = Some(last.checkpoint_id.clone());
            stored.extend(page.into_iter().map(|c| c.checkpoint_id));
        }
        lost += ledger
            .checkpoints_acked
            .iter()
            .filter(|id| !stored.contains(*id))
            .count();
        acked += ledger.messages_acked.len() + ledger.checkpoints_acked.len();
        acked += ledger.increments_acked as usize;
        unknown += ledger.messages_unknown.len() + ledger.increments_unknown as usize;
    }
    println!("{what}: {acked} writes acknowledged, {unknown} failed, {lost} acknowledged lost");
    lost
}

/// Waits until the nodes other than `gone` list a replica promoted in its place; the
/// time since the run began.
async fn promoted(run: &Run, via: &[u16], gone: u16) -> Duration {
    let others: Vec<u16> = via.iter().copied().filter(|&p| p != gone).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ns = nodes(&others);
        let failed = ns.iter().any(|n| n.port == gone && n.failed);
        let masters = ns.iter().filter(|n| n.master && !n.failed).count();
        if failed && masters == 3 {
            return run.began.elapsed();
        }
        assert!(Instant::now() < deadline, "no replica was promoted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to 20 s (while the failed master stays down) until every task succeeded
/// after `since`; when, or `None`.
async fn served_again(run: &Run, since: Duration) -> Option<Duration> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if run.all_succeeded_since(since) {
            return Some(run.began.elapsed());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every session and thread the writers used is listed.
async fn listed(storage: &RedisBackend, prefix: &str, what: &str) {
    let sessions = common::listed_session_ids(storage).await;
    let threads: HashSet<String> = storage
        .list_threads(None, 10_000)
        .await
        .unwrap()
        .ids
        .into_iter()
        .collect();
    for i in 0..TASKS {
        assert!(
            sessions.contains(&session(prefix, i)),
            "{what}: a session is not listed"
        );
        assert!(
            threads.contains(&thread(prefix, i)),
            "{what}: a thread is not listed"
        );
    }
}

struct Scenario {
    url: String,
    prefix: String,
    storage: Arc<RedisBackend>,
}

impl Scenario {
    fn new(base: &str, kind: &str) -> Scenario {
        let prefix = common::unique_name(kind);
        let url = format!("{base}?prefix={prefix}:");
        let storage = Arc::new(RedisBackend::new(&url).unwrap());
        Scenario {
            url,
            prefix,
            storage,
        }
    }

    /// Reads back what the writers were told was written; the number of acknowledged
    /// writes lost.
    async fn verify(&self, ledgers: &[Ledger], what: &str) -> usize {
        let lost = verify(&self.url, &self.prefix, ledgers, what).await;
        listed(&self.storage, &self.prefix, what).await;
        lost
    }
}

/// A master that stops answering with its connections open, past the node timeout:
/// its replica is promoted, and the client must serve its slots from the replica while
/// the old master is still hung (it resumes 20 s later at the earliest).
async fn hung_master(base: &str, via: &[u16]) {
    let sc = Scenario::new(base, "hang");
    let hung = master_of_session(via, &session(&sc.prefix, 0));
    let probe = start_probe(&sc.url, sc.storage.clone(), &sc.prefix, via, hung).await;
    let run = start_writers(sc.storage.clone(), &sc.prefix).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    probe.hush().await;
    signal(hung, "-STOP");
    let resume = Resume(hung);
    let stopped_at = run.began.elapsed();
    let promoted_at = promoted(&run, via, hung).await;
    probe.speak();
    let served_at = served_again(&run, promoted_at).await;
    // While the old master is still hung: what the cache had read there is stale now.
    let probed = probe.stop().await;
    drop(resume);
    let ledgers = finish(run).await;
    probed.check("hung master");
    println!(
        "hung master on {hung}: stopped at {stopped_at:?}, replica promoted at \
         {promoted_at:?}, every task served again at {served_at:?}"
    );
    assert!(
        served_at.is_some(),
        "20 s after a replica was promoted, some task was still not served"
    );
    script(&["wait", "replicas"]);
    let lost = sc.verify(&ledgers, "hung master").await;
    assert_eq!(lost, 0, "acknowledged writes lost to a hung master");
}

/// A master killed: its replica is promoted and served; the killed node comes back as a
/// replica. What it had acknowledged but not yet replicated is Redis' to lose; the
/// figure is printed.
async fn killed_master(base: &str, via: &[u16]) {
    let sc = Scenario::new(base, "kill");
    let killed = master_of_session(via, &session(&sc.prefix, 0));
    let probe = start_probe(&sc.url, sc.storage.clone(), &sc.prefix, via, killed).await;
    let run = start_writers(sc.storage.clone(), &sc.prefix).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    probe.hush().await;
    signal(killed, "-KILL");
    let killed_at = run.began.elapsed();
    let promoted_at = promoted(&run, via, killed).await;
    probe.speak();
    let served_at = served_again(&run, promoted_at).await;
    script(&["node-start", &killed.to_string(), "replicas"]);
    let ledgers = finish(run).await;
    probe.stop().await.check("killed master");
    println!(
        "killed master on {killed}: killed at {killed_at:?}, replica promoted at \
         {promoted_at:?}, every task served again at {served_at:?}"
    );
    assert!(
        served_at.is_some(),
        "20 s after a replica was promoted, some task was still not served"
    );
    script(&["wait", "replicas"]);
    sc.verify(&ledgers, "killed master").await;
}

/// Slots moved between masters while the writers run: 2 rounds of 2 000 slots.
async fn resharding(base: &str, via: &[u16]) {
    let sc = Scenario::new(base, "reshard");
    let run = start_writers(sc.storage.clone(), &sc.prefix).await;
    let first = nodes(via)
        .into_iter()
        .find(|n| n.master && !n.failed)
        .unwrap();
    let probe = start_probe(&sc.url, sc.storage.clone(), &sc.prefix, via, first.port).await;
    for round in 0..2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let masters: Vec<Node> = nodes(via)
            .into_iter()
            .filter(|n| n.master && !n.failed)
            .collect();
        let (from, to) = (
            &masters[round % masters.len()],
            &masters[(round + 1) % masters.len()],
        );
        let (seed, from, to) = (
            format!("127.0.0.1:{}", from.port),
            from.id.clone(),
            to.id.clone(),
        );
        let moved = tokio::task::spawn_blocking(move || {
            Command::new("redis-cli")
                .args([
                    "--cluster",
                    "reshard",
                    &seed,
                    "--cluster-from",
                    &from,
                    "--cluster-to",
                    &to,
                ])
                .args(["--cluster-slots", "2000", "--cluster-yes"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            moved.status.success(),
            "reshard: {}",
            String::from_utf8_lossy(&moved.stderr)
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledgers = finish(run).await;
    probe.stop().await.check("resharding");
    script(&["wait", "replicas"]);
    let lost = sc.verify(&ledgers, "resharding").await;
    assert_eq!(lost, 0, "acknowledged writes lost while slots moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_replicas_under_faults_keeps_every_acknowledged_write() {
    let Some(url) = common::server_url(
        "AIECS_TEST_REDIS_REPLICAS_URL",
        "redis cluster with replicas",
    ) else {
        return;
    };
    let via = ports(&url);
    script(&["wait", "replicas"]);
    hung_master(&url, &via).await;
    killed_master(&url, &via).await;
    resharding(&url, &via).await;
}
