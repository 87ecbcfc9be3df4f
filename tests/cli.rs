//! The `aiecs-storage` binary on real servers: migrations SQLite -> PostgreSQL ->
//! Redis of 5 000 sessions x 20 messages, 200 threads x 20 checkpoints with writes, and
//! task contexts; `stats` and `--verify` agree; a migration killed part way finishes on
//! a rerun without duplicates; no password in any output.
#![cfg(feature = "cli")]

mod common;

use common::pg::drop_schema;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use aiecs_storage::prelude::*;
use aiecs_storage::{
    Message, Metadata, Session, SessionMetrics, SqliteBackend, TaskWrites, WriteInput,
};
use serde_json::{json, Value};

const SESSIONS: usize = 5_000;
const MESSAGES: usize = 20;
const THREADS: usize = 200;
const CHECKPOINTS: usize = 20;
const CONTEXTS: usize = 1_000;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_aiecs-storage"))
}

fn run(args: &[&str]) -> Output {
    let out = bin().args(args).output().expect("run aiecs-storage");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("cli-secret-pw"),
        "a password reached the output of {args:?}: {text}"
    );
    out
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Fills a SQLite file through the library's restore path (fast, exact timestamps).
async fn seed(path: &Path) {
    let db = SqliteBackend::new(path);
    let t0 = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let sessions: Vec<Session> = (0..SESSIONS)
        .map(|i| Session {
            session_id: format!("s{i:05}"),
            user_id: format!("u{}", i % 37),
            created_at: t0,
            updated_at: t0 + chrono::Duration::seconds(i as i64),
            status: if i % 3 == 0 { "completed" } else { "active" }.into(),
            metadata: Metadata::from_iter([("i".to_owned(), json!(i))]),
            metrics: SessionMetrics {
                request_count: i as u64,
                total_processing_time: i as f64 / 4.0,
                error_count: (i % 5) as u64,
            },
        })
        .collect();
    for chunk in sessions.chunks(1_000) {
        db.restore_sessions(chunk).await.unwrap();
    }
    for s in &sessions {
        let messages: Vec<Message> = (0..MESSAGES)
            .map(|m| Message {
                message_id: format!("{}-m{m:02}", s.session_id),
                role: if m % 2 == 0 { "user" } else { "assistant" }.into(),
                content: format!("message {m} of {} with a few words of text", s.session_id),
                timestamp: t0 + chrono::Duration::milliseconds(m as i64),
                metadata: Metadata::new(),
            })
            .collect();
        db.restore_messages(&s.session_id, &messages).await.unwrap();
    }
    for i in 0..CONTEXTS {
        db.store_task_context(
            &format!("s{:05}", i * 5),
            &json!({"step": i, "plan": ["a", "b"]}),
        )
        .await
        .unwrap();
    }
    let mut writes = Vec::new();
    for t in 0..THREADS {
        let thread = format!("thread-{t:03}");
        for c in 0..CHECKPOINTS {
            let mut cp = aiecs_storage::NewCheckpoint::new(
                thread.as_str(),
                format!("cp{c}"),
                json!({"step": c, "payload": "x".repeat(64)}),
            );
            if c > 0 {
                cp = cp.with_parent(format!("cp{}", c - 1));
            }
            db.store_checkpoint(&cp).await.unwrap();
            writes.push(TaskWrites {
                thread_id: thread.clone(),
                checkpoint_ns: String::new(),
                checkpoint_id: format!("cp{c}"),
                task_id: "task".into(),
                writes: vec![
                    WriteInput::new("a", json!(c)),
                    WriteInput::new("b", json!({"t": t})),
                ],
            });
        }
    }
    for chunk in writes.chunks(1_000) {
        db.batch_put_writes(chunk).await.unwrap();
    }
    db.close().await.unwrap();
}

fn stats(url: &str) -> Value {
    json_of(&run(&["stats", "--json", url]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_across_three_backends_verify_equal_and_resume_after_a_kill() {
    let Some(pg) = common::server_url("AIECS_TEST_POSTGRES_URL", "cli") else {
        return;
    };
    let Some(redis) = common::server_url("AIECS_TEST_REDIS_URL", "cli") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("source.db");
    seed(&db).await;
    let sqlite = format!("sqlite://{}", db.display());
    let expected = json!({
        "sessions": SESSIONS, "messages": SESSIONS * MESSAGES,
        "checkpoints": THREADS * CHECKPOINTS, "pending_writes": THREADS * CHECKPOINTS * 2,
        "task_contexts": CONTEXTS,
    });
    assert_eq!(stats(&sqlite), expected);

    // SQLite -> PostgreSQL, killed part way, then rerun to completion.
    let schema = common::unique_name("cli");
    let postgres = format!("{pg}?schema={schema}");
    let state = dir.path().join("migrate-state.json");
    let mut child = bin()
        .args([
            "migrate",
            "--from",
            &sqlite,
            "--to",
            &postgres,
            "--batch-size",
            "50",
        ])
        .arg("--state-file")
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it has recorded progress past the first sessions, then kill it.
    let mut killed_mid_run = false;
    for _ in 0..600 {
        let progressed = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|s| s["records"].as_u64().unwrap_or(0) > 5_000);
        if progressed {
            child.kill().unwrap();
            killed_mid_run = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.wait();
    assert!(
        killed_mid_run,
        "the migration finished before it could be killed"
    );
    let partial = stats(&postgres);
    assert!(partial["sessions"].as_u64().unwrap() < SESSIONS as u64);

    let done = json_of(&run(&[
        "migrate",
        "--json",
        "--verify",
        "--from",
        &sqlite,
        "--to",
        &postgres,
        "--batch-size",
        "200",
        "--state-file",
        state.to_str().unwrap(),
    ]));
    assert!(done["migration"]["resumed_from"].is_object(), "{done}");
    assert_eq!(done["verify"]["clean"], true, "{}", done["verify"]);
    assert_eq!(
        stats(&postgres),
        expected,
        "no duplicates after the resumed run"
    );
    assert!(
        !state.exists(),
        "the state file is removed when the run completes"
    );

    // PostgreSQL -> Redis, with a password-free URL and a prefix of its own.
    let prefix = format!("{}:", common::unique_name("cli"));
    let redis_url = format!("{redis}/?prefix={prefix}");
    let done = json_of(&run(&[
        "migrate",
        "--json",
        "--verify",
        "--from",
        &postgres,
        "--to",
        &redis_url,
        "--batch-size",
        "500",
    ]));
    assert_eq!(done["verify"]["clean"], true, "{}", done["verify"]);
    assert_eq!(stats(&redis_url), expected);

    // Rerunning a finished migration stores nothing twice.
    let again = json_of(&run(&[
        "migrate",
        "--json",
        "--from",
        &postgres,
        "--to",
        &redis_url,
        "--batch-size",
        "500",
    ]));
    assert_eq!(again["migration"]["copied"]["new_messages"], 0, "{again}");
    assert_eq!(stats(&redis_url), expected);

    drop_schema(&pg, &schema).await;
}

#[test]
fn bad_arguments_and_unreachable_servers_fail_without_showing_passwords() {
    let out = run(&["stats", "redis://:cli-secret-pw@127.0.0.1:1/"]);
    assert!(!out.status.success());
    let out = run(&[
        "stats",
        "--json",
        "postgres://u:cli-secret-pw@127.0.0.1:1/db",
    ]);
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Refused before anything was sent.
    assert_eq!(err["kind"], "unavailable");
    assert!(
        err["error"].as_str().unwrap().contains("cannot connect to"),
        "{err}"
    );
    assert!(!err.to_string().contains("cli-secret-pw"), "{err}");
    let out = run(&[
        "diagnose",
        "--timeout",
        "1",
        "redis://:cli-secret-pw@127.0.0.1:1/",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused"));
    let out = run(&["cleanup", "memory://", "--max-idle-hours", "-1"]);
    assert!(!out.status.success());
    let out = run(&["frobnicate"]);
    assert!(!out.status.success());
}

#[test]
fn export_and_import_round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!("sqlite://{}", dir.path().join("a.db").display());
    let dst = format!("sqlite://{}", dir.path().join("b.db").display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = aiecs_storage::open(&src).unwrap();
        a.create_session("s1", "u", &Metadata::new()).await.unwrap();
        a.add_conversation_message("s1", &aiecs_storage::NewMessage::new("user", "hi"))
            .await
            .unwrap();
        a.store_task_context("s1", &json!({"k": 1})).await.unwrap();
        a.close().await.unwrap();
    });
    let file = dir.path().join("dump.jsonl");
    let out = run(&["export", &src, "--output", file.to_str().unwrap()]);
    assert!(out.status.success());
    let imported = json_of(&run(&["import", "--json", &dst, file.to_str().unwrap()]));
    assert_eq!(imported["sessions"], 1);
    assert_eq!(imported["messages"], 1);
    assert_eq!(stats(&dst), stats(&src));
    let out = run(&["export", &src, "--session", "s1"]);
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(lines, 5, "header, session, messages, context, trailer");
}

/// `export -o FILE` replaces FILE only once the export has succeeded: an export that
/// fails (a missing session, an unreachable server) leaves an existing FILE
/// byte-identical and no temporary file behind.
#[test]
fn a_failed_export_leaves_an_existing_output_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!("sqlite://{}", dir.path().join("a.db").display());
    with_one_session(&src);
    // The output sits apart from the database, whose journal files come and go.
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let file = out_dir.join("backup.jsonl");
    let precious = b"{\"an\":\"earlier backup\"}\n".repeat(100);
    let listing = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let failing: [Vec<&str>; 2] = [
        vec!["export", &src, "--session", "nope"],
        vec!["export", "postgres://postgres@127.0.0.1:1/x"],
    ];
    for args in failing {
        std::fs::write(&file, &precious).unwrap();
        let before = listing(&out_dir);
        let mut args = args.clone();
        args.extend(["--output", file.to_str().unwrap()]);
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let after = std::fs::read(&file).unwrap();
        assert!(
            after == precious,
            "{args:?} changed the existing file to: {}",
            String::from_utf8_lossy(&after)
        );
        assert_eq!(listing(&out_dir), before, "{args:?} left a file behind");
    }
    // A successful export does replace it.
    let out = run(&["export", &src, "--output", file.to_str().unwrap()]);
    assert!(out.status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"session_id\":\"s1\""), "{text}");
    assert!(!text.contains("earlier backup"), "{text}");
}

/// `import` of an export that lost its last lines (a killed export, a short copy)
/// fails naming the last line read, and writes nothing.
#[test]
fn import_refuses_a_truncated_export_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!("sqlite://{}", dir.path().join("a.db").display());
    let dst = format!("sqlite://{}", dir.path().join("b.db").display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = aiecs_storage::open(&src).unwrap();
        for s in ["s1", "s2", "s3"] {
            a.create_session(s, "u", &Metadata::new()).await.unwrap();
            a.add_conversation_message(s, &aiecs_storage::NewMessage::new("user", "hi"))
                .await
                .unwrap();
        }
        a.close().await.unwrap();
    });
    let file = dir.path().join("dump.jsonl");
    assert!(run(&["export", &src, "--output", file.to_str().unwrap()])
        .status
        .success());
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let keep = lines.len() - 1;
    let cut: String = lines[..keep].iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, cut).unwrap();
    let out = run(&["import", &dst, file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a truncated export was imported: {err}"
    );
    assert!(err.contains(&format!("line {keep}")), "{err}");
    assert!(err.contains("truncated"), "{err}");
    let after = stats(&dst);
    for key in ["sessions", "messages"] {
        assert_eq!(after[key], 0, "{key} were written: {after}");
    }
}

/// A version 1 export (no trailer) is refused unless `--accept-v1` vouches for it, and
/// then imported with a warning.
#[test]
fn import_takes_a_version_1_export_only_with_accept_v1() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!("sqlite://{}", dir.path().join("a.db").display());
    let dst = format!("sqlite://{}", dir.path().join("b.db").display());
    with_one_session(&src);
    let file = dir.path().join("dump.jsonl");
    assert!(run(&["export", &src, "--output", file.to_str().unwrap()])
        .status
        .success());
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.pop().unwrap()["type"], "trailer");
    lines[0]["version"] = json!(1);
    let v1: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, v1).unwrap();
    let out = run(&["import", &dst, file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--accept-v1"), "{err}");
    assert_eq!(stats(&dst)["sessions"], 0);
    let imported = json_of(&run(&[
        "import",
        "--json",
        "--accept-v1",
        &dst,
        file.to_str().unwrap(),
    ]));
    assert_eq!(imported["sessions"], 1);
    assert!(
        imported["warning"].as_str().unwrap().contains("truncation"),
        "{imported}"
    );
}

/// Every numeric flag, given a negative, NaN, infinite or huge value, is refused as
/// bad input naming the flag: never a panic (exit 101) and never a run.
#[test]
fn out_of_range_numeric_flags_are_input_errors_naming_the_flag() {
    let bad = ["-1", "NaN", "inf", "-inf", "1e16", "1e300"];
    let mut cases: Vec<(Vec<&str>, &str)> = Vec::new();
    for v in bad {
        cases.push((
            vec!["cleanup", "memory://", "--max-idle-hours", v],
            "--max-idle-hours",
        ));
        cases.push((vec!["diagnose", "memory://", "--timeout", v], "--timeout"));
    }
    for v in ["-1", "0", "1e16", "99999999999999999999999", "10001"] {
        cases.push((
            vec![
                "migrate",
                "--from",
                "memory://",
                "--to",
                "memory://",
                "--batch-size",
                v,
            ],
            "--batch-size",
        ));
    }
    for (args, flag) in cases {
        let out = bin().args(&args).output().expect("run aiecs-storage");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} does not name {flag}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// An `AIECS_STORAGE_URL` set for an application must not redirect either side of a
/// migration: with it naming the source, both sides used to resolve to the source, and
/// the run copied the store onto itself and reported success.
#[test]
fn migrate_ignores_the_url_override_and_refuses_the_same_store_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let old_db = dir.path().join("old.db");
    let old = format!("sqlite://{}", old_db.display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = aiecs_storage::open(&old).unwrap();
        for s in ["s1", "s2", "s3"] {
            a.create_session(s, "u", &Metadata::new()).await.unwrap();
        }
        a.close().await.unwrap();
    });
    let config = |name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        let db = dir.path().join(format!("{name}.db"));
        std::fs::write(&path, format!("url = \"sqlite://{}\"\n", db.display())).unwrap();
        (path.to_str().unwrap().to_owned(), db)
    };
    let (old_toml, _) = config("old");
    let (new_toml, new_db) = config("new");
    let (other_toml, other_db) = config("other");
    let migrate = |args: &[&str]| {
        let out = bin()
            .arg("migrate")
            .args(args)
            .env("AIECS_STORAGE_URL", &old)
            .output()
            .expect("run aiecs-storage");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    };
    for (args, db) in [
        (
            vec![
                "--from-config",
                &old_toml,
                "--to-config",
                &new_toml,
                "--verify",
            ],
            &new_db,
        ),
        (
            vec!["--from", &old, "--to-config", &other_toml, "--verify"],
            &other_db,
        ),
    ] {
        let (status, text) = migrate(&args);
        assert!(status.success(), "{args:?}: {text}");
        assert!(db.exists(), "{args:?} never created the target: {text}");
        let target = format!("sqlite://{}", db.display());
        assert_eq!(stats(&target)["sessions"], 3, "{args:?}: {text}");
    }

    // The same store on both sides, however it is spelt, is refused before any copy.
    let dotted = format!("sqlite://{}/./old.db", dir.path().display());
    for (from, to) in [
        (old.as_str(), dotted.as_str()),
        ("redis://:pw@127.0.0.1:1/0", "redis://127.0.0.1:1"),
        (
            "redis://127.0.0.1:1/2?prefix=app:",
            "redis://u:pw@127.0.0.1:1/2?prefix=app%3A",
        ),
        (
            "redis+cluster://:p%2Fw@127.0.0.1:2,127.0.0.1:1/?prefix=x:",
            "rediss+cluster://127.0.0.1:1,127.0.0.1:2?prefix=x:",
        ),
        (
            "postgres://a:pw@127.0.0.1:1/db",
            "postgresql://b@127.0.0.1:1/db?sslmode=disable",
        ),
    ] {
        let (status, text) = migrate(&["--from", from, "--to", to]);
        assert_eq!(status.code(), Some(1), "{from} -> {to}: {text}");
        assert!(text.contains("same store"), "{from} -> {to}: {text}");
        assert!(!text.contains("pw") && !text.contains("p%2Fw"), "{text}");
    }
    let (status, text) = migrate(&["--from-config", &old_toml, "--to", &old]);
    assert!(!status.success() && text.contains("same store"), "{text}");
    // Different databases, prefixes or schemas are different stores.
    for (from, to) in [
        ("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1"),
        ("redis://127.0.0.1:1/0?prefix=a:", "redis://127.0.0.1:1/0"),
        (
            "postgres://127.0.0.1:1/db?schema=a",
            "postgres://127.0.0.1:1/db?schema=b",
        ),
    ] {
        let (_, text) = migrate(&["--from", from, "--to", to]);
        assert!(!text.contains("same store"), "{from} -> {to}: {text}");
    }
}

#[cfg(unix)]
#[test]
fn migrate_keeps_its_default_state_file_in_a_private_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let from = format!("sqlite://{}", dir.path().join("a.db").display());
    let to = format!("sqlite://{}", dir.path().join("b.db").display());
    let migrate = |envs: &[(&str, &Path)]| {
        let mut cmd = bin();
        cmd.args(["migrate", "--from", &from, "--to", &to])
            .env_remove("HOME")
            .env_remove("XDG_STATE_HOME")
            .env("TMPDIR", dir.path().join("tmp"));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run aiecs-storage");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    };
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    std::fs::create_dir(dir.path().join("tmp")).unwrap();

    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (status, text) = migrate(&[("HOME", &home)]);
    assert!(status.success(), "{text}");
    let state_dir = home.join(".local/state/aiecs-storage");
    assert_eq!(mode(&state_dir), 0o700);
    assert_eq!(
        std::fs::read_dir(&state_dir).unwrap().count(),
        0,
        "removed when done"
    );

    // Without HOME: a per-user directory in the temp directory.
    let (status, text) = migrate(&[]);
    assert!(status.success(), "{text}");
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(tmp.len(), 1, "{tmp:?}");
    assert!(tmp[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("aiecs-storage-"));
    assert_eq!(mode(&tmp[0]), 0o700);

    // A directory others can write to (made by someone else in a shared place) is
    // refused rather than used.
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(shared.join("aiecs-storage")).unwrap();
    std::fs::set_permissions(
        shared.join("aiecs-storage"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let (status, text) = migrate(&[("XDG_STATE_HOME", &shared)]);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("writable by other users") && text.contains("--state-file"),
        "{text}"
    );
    let link = dir.path().join("linked");
    std::fs::create_dir(&link).unwrap();
    std::os::unix::fs::symlink(&shared, link.join("aiecs-storage")).unwrap();
    let (status, text) = migrate(&[("XDG_STATE_HOME", &link)]);
    assert!(
        !status.success() && text.contains("not a directory"),
        "{text}"
    );
}

/// Stores session `s1` in the store at `url`.
fn with_one_session(url: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = aiecs_storage::open(url).unwrap();
        a.create_session("s1", "u", &Metadata::new()).await.unwrap();
        a.close().await.unwrap();
    });
}

/// Writes `create_session` and an increment through a failover stack whose primary is
/// down: two entries in the journal at `journal`, the fallback a SQLite file.
async fn journal_two_writes(journal: &Path, fallback: &Path) {
    use aiecs_storage::layer::FailoverLayer;
    use tower::Layer;
    let (primary, faults) = common::fault::Faults::wrap(aiecs_storage::MemoryBackend::new());
    faults.set_down(true);
    let layer = FailoverLayer::new(std::sync::Arc::new(SqliteBackend::new(fallback)))
        .with_failure_threshold(1)
        .with_journal(journal)
        .unwrap();
    let storage = layer.layer(primary);
    storage
        .create_session("j", "u", &Metadata::new())
        .await
        .unwrap();
    let increment = aiecs_storage::SessionUpdate::new().increment_requests();
    assert!(storage.update_session("j", &increment).await.unwrap());
    assert_eq!(layer.pending_writes(), 2);
}

#[tokio::test]
async fn health_and_diagnose_warn_of_a_failover_journal_holding_writes() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("failover.journal");
    let fallback = dir.path().join("fallback.db");
    let stack = dir.path().join("stack.toml");
    std::fs::write(
        &stack,
        format!(
            "url = \"memory://\"\n[[layers]]\ntype = \"failover\"\nfallback = \"sqlite://{}\"\njournal = {:?}\n",
            fallback.display(),
            journal.display().to_string()
        ),
    )
    .unwrap();
    let stack = stack.to_str().unwrap();
    let journal_path = journal.display().to_string();

    // Each command's `close` replays the journal to the (memory) primary, which is up:
    // the journal is filled again before each.
    journal_two_writes(&journal, &fallback).await;
    let report = json_of(&run(&["health", "--json", "--config", stack]));
    assert_eq!(report["status"], "degraded", "{report}");
    let issues: Vec<&str> = report["issues"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let issue = issues
        .iter()
        .find(|i| i.contains("journal"))
        .unwrap_or_else(|| panic!("no journal issue in {issues:?}"));
    assert!(issue.starts_with("failover: "), "{issue}");
    assert!(issue.contains("holds 2 write(s)"), "{issue}");
    assert!(issue.contains(&journal_path), "{issue}");
    assert_eq!(
        issues.len(),
        1,
        "the journal explains the degraded failover: {issues:?}"
    );

    journal_two_writes(&journal, &fallback).await;
    let out = run(&["health", "--config", stack]);
    assert!(out.status.success(), "degraded is not a failure");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status: degraded"), "{text}");
    assert!(
        text.contains("issue: failover: the failover journal"),
        "{text}"
    );

    journal_two_writes(&journal, &fallback).await;
    let report = json_of(&run(&["diagnose", "--json", "--config", stack]));
    let findings = report["layers"]["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{report}");
    let finding = &findings[0];
    assert_eq!(finding["severity"], "warning");
    assert_eq!(finding["component"], "failover");
    assert_eq!(finding["details"]["journal_depth"], 2);
    assert_eq!(finding["details"]["journal_path"], journal_path.as_str());
    assert!(
        finding["details"]["journal_oldest_age_seconds"]
            .as_f64()
            .unwrap()
            >= 0.0
    );
    assert_eq!(report["consistency"]["ok"], true, "{report}");

    journal_two_writes(&journal, &fallback).await;
    let out = run(&["diagnose", "--config", stack]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning: failover: the failover journal"),
        "{text}"
    );
}
