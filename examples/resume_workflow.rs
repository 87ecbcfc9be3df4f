//! Workflow recovery, as in the spec's ICheckpointerBackend: a multi-step workflow
//! checkpoints each step and records the pending writes of each task; when it crashes
//! part way, a second run resumes from the latest checkpoint, reapplies the writes of the
//! tasks that already finished (without running them again) and finishes with the same
//! result as an uninterrupted run.
//!
//! ```text
//! cargo run --example resume_workflow                 # crash, reopen, resume, compare
//! cargo run --example resume_workflow -- --crash-at 3 # run until step 3 crashes
//! cargo run --example resume_workflow -- --resume     # resume what the crash left
//! ```
//!
//! The file defaults to `<tmp>/aiecs-resume-workflow.db`; set `AIECS_STORAGE_PATH` to
//! choose another.

use std::path::PathBuf;
use std::sync::Arc;

use aiecs_storage::prelude::*;
use aiecs_storage::{Metadata, NewCheckpoint, SqliteBackend, WriteInput};
use serde_json::{json, Value};

const STEPS: u64 = 5;
/// Each step runs these tasks in order; each task's output is recorded as pending writes
/// before the step's checkpoint is stored.
const TASKS: [&str; 2] = ["compute", "log"];

/// What a task of `step` writes, given the state before the step. Deterministic, so the
/// interrupted and uninterrupted runs can be compared.
fn run_task(task: &str, step: u64, state: &Value) -> Vec<WriteInput> {
    let total = state["total"].as_u64().unwrap_or(0);
    match task {
        "compute" => vec![WriteInput::new("total", json!(total * 3 + step))],
        _ => vec![WriteInput::new("log", json!(format!("step {step} done")))],
    }
}

/// Applies a step's writes to the state, producing the next checkpoint's data.
fn apply(state: &Value, step: u64, writes: &[(String, Value)]) -> Value {
    let mut next = state.clone();
    next["step"] = json!(step);
    for (channel, value) in writes {
        match channel.as_str() {
            "log" => next["log"]
                .as_array_mut()
                .expect("log is an array")
                .push(value.clone()),
            other => next[other] = value.clone(),
        }
    }
    next
}

fn checkpoint_id(step: u64) -> String {
    format!("step-{step:03}")
}

/// Runs the workflow on `thread` from its latest checkpoint (or from the start), and
/// stops right after the first task of `crash_at` has recorded its writes.
async fn run(
    storage: &dyn StorageBackend,
    thread: &str,
    crash_at: Option<u64>,
) -> aiecs_storage::Result<Option<Value>> {
    let (mut step, mut state) = match storage.get_checkpoint(thread, "", None).await? {
        Some(cp) => {
            println!("  resuming {thread} from checkpoint {}", cp.checkpoint_id);
            (cp.data["step"].as_u64().unwrap_or(0), cp.data)
        }
        None => {
            let state = json!({"step": 0, "total": 1, "log": []});
            storage
                .store_checkpoint(&NewCheckpoint::new(thread, checkpoint_id(0), state.clone()))
                .await?;
            (0, state)
        }
    };
    while step < STEPS {
        let current = checkpoint_id(step);
        let next = step + 1;
        // Tasks that already recorded writes against this checkpoint finished before a
        // crash: their writes are reused instead of running them again.
        let pending = storage.get_writes(thread, "", &current).await?;
        for task in TASKS {
            if pending.iter().any(|w| w.task_id == task) {
                println!("  step {next}: task {task} already done, reapplying its writes");
                continue;
            }
            let writes = run_task(task, next, &state);
            storage
                .put_writes(thread, "", &current, task, &writes)
                .await?;
            println!("  step {next}: task {task} ran");
            if crash_at == Some(next) {
                println!("  step {next}: crash!");
                return Ok(None);
            }
        }
        let writes: Vec<(String, Value)> = storage
            .get_writes(thread, "", &current)
            .await?
            .into_iter()
            .map(|w| (w.channel, w.value))
            .collect();
        state = apply(&state, next, &writes);
        let metadata = Metadata::from_iter([("step".to_owned(), json!(next))]);
        storage
            .store_checkpoint(
                &NewCheckpoint::new(thread, checkpoint_id(next), state.clone())
                    .with_parent(current)
                    .with_metadata(metadata),
            )
            .await?;
        step = next;
    }
    Ok(Some(state))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path: PathBuf = std::env::var_os("AIECS_STORAGE_PATH")
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join("aiecs-resume-workflow.db"));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let crash_at = args
        .iter()
        .position(|a| a == "--crash-at")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse::<u64>())
        .transpose()?;
    let resume_only = args.iter().any(|a| a == "--resume");
    println!("storage file: {}", path.display());
    let thread = "workflow-demo";

    let open = || -> Arc<dyn StorageBackend> { Arc::new(SqliteBackend::new(&path)) };

    if let Some(step) = crash_at {
        let storage = open();
        storage.delete_thread(thread).await?;
        println!("running {thread}, crashing in step {step}");
        run(storage.as_ref(), thread, Some(step)).await?;
        // A real crash: no close, no flush.
        std::process::exit(3);
    }

    if !resume_only {
        let storage = open();
        storage.delete_thread(thread).await?;
        println!("first run of {thread}, crashing in step 3");
        run(storage.as_ref(), thread, Some(3)).await?;
        storage.close().await?;
    }

    println!("second run: reopening the file");
    let storage = open();
    let resumed = run(storage.as_ref(), thread, None)
        .await?
        .expect("no crash requested");

    let reference_thread = "workflow-demo-uninterrupted";
    storage.delete_thread(reference_thread).await?;
    println!("reference run without a crash");
    let reference = run(storage.as_ref(), reference_thread, None)
        .await?
        .expect("no crash requested");
    storage.close().await?;

    println!("resumed result:       {resumed}");
    println!("uninterrupted result: {reference}");
    if resumed == reference {
        println!("results match");
        Ok(())
    } else {
        Err("the resumed workflow differs from the uninterrupted one".into())
    }
}
