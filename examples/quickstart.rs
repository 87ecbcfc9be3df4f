//! Quickstart: every part of the contract on the embedded SQLite backend.
//!
//! ```text
//! cargo run --example quickstart
//! AIECS_STORAGE_PATH=/tmp/agent.db cargo run --example quickstart
//! ```
//!
//! The data lives in a file (its path is printed), so a second run finds the first
//! run's session, messages and checkpoints still there and adds to them.

use std::sync::Arc;

use aiecs_storage::prelude::*;
use aiecs_storage::{
    CheckpointFilter, Metadata, NewCheckpoint, NewMessage, SessionUpdate, SqliteBackend, WriteInput,
};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::var_os("AIECS_STORAGE_PATH")
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join("aiecs-quickstart.db"));
    println!("storage file: {}", path.display());

    let storage: Arc<dyn StorageBackend> = Arc::new(SqliteBackend::new(&path));
    storage.initialize().await?;

    // The task context carries a run counter across runs.
    let run = storage
        .get_task_context("quickstart")
        .await?
        .and_then(|c| c["runs"].as_u64())
        .unwrap_or(0)
        + 1;
    println!("run #{run}");

    // create_session on an existing id is an upsert: counters and created_at stay.
    let mut metadata = Metadata::new();
    metadata.insert("app".into(), json!("quickstart"));
    storage
        .create_session("quickstart", "alice", &metadata)
        .await?;

    storage
        .update_session(
            "quickstart",
            &SessionUpdate::new()
                .increment_requests()
                .add_processing_time(0.120),
        )
        .await?;
    storage
        .update_session(
            "quickstart",
            &SessionUpdate::new()
                .increment_requests()
                .add_processing_time(0.480)
                .mark_error()
                .metadata_entry("last_error", "model timeout"),
        )
        .await?;

    // Message ids make the adds idempotent: rerunning this exact call stores nothing new.
    storage
        .add_conversation_message(
            "quickstart",
            &NewMessage::new("user", format!("Hello from run {run}"))
                .with_id(format!("run{run}-q")),
        )
        .await?;
    storage
        .add_conversation_message(
            "quickstart",
            &NewMessage::new("assistant", format!("Hi! This is answer number {run}."))
                .with_id(format!("run{run}-a")),
        )
        .await?;

    // A checkpoint per run, with the pending writes of the task that produced it.
    let thread = "quickstart-thread";
    let checkpoint_id = format!("cp-{run:04}");
    let parent = storage
        .get_checkpoint(thread, "", None)
        .await?
        .map(|c| c.checkpoint_id);
    let mut checkpoint = NewCheckpoint::new(
        thread,
        checkpoint_id.as_str(),
        json!({"run": run, "messages_seen": run * 2}),
    )
    .with_metadata(Metadata::from_iter([("source".to_owned(), json!("loop"))]));
    if let Some(parent) = parent {
        checkpoint = checkpoint.with_parent(parent);
    }
    storage.store_checkpoint(&checkpoint).await?;
    storage
        .put_writes(
            thread,
            "",
            &checkpoint_id,
            "summarize",
            &[
                WriteInput::new("summary", json!(format!("run {run} summarized"))),
                WriteInput::new("tokens", json!(42 * run)),
            ],
        )
        .await?;

    storage
        .store_task_context(
            "quickstart",
            &json!({"runs": run, "plan": ["greet", "answer"]}),
        )
        .await?;

    println!("\nconversation history (newest 50, oldest first):");
    for m in storage.get_conversation_history("quickstart", 50).await? {
        println!("  [{}] {:<9} {}", m.message_id, m.role, m.content);
    }

    let latest = storage
        .get_checkpoint(thread, "", None)
        .await?
        .expect("stored above");
    println!(
        "\nlatest checkpoint: {} (parent {:?}) data={}",
        latest.checkpoint_id, latest.parent_checkpoint_id, latest.data
    );
    for w in storage
        .get_writes(thread, "", &latest.checkpoint_id)
        .await?
    {
        println!(
            "  pending write: task={} channel={} value={}",
            w.task_id, w.channel, w.value
        );
    }
    let listed = storage
        .list_checkpoints(thread, "", &CheckpointFilter::new().limit(3))
        .await?;
    println!(
        "  newest checkpoints: {:?}",
        listed.iter().map(|c| &c.checkpoint_id).collect::<Vec<_>>()
    );

    let session = storage
        .get_session("quickstart")
        .await?
        .expect("created above");
    println!(
        "\nsession metrics: {}",
        serde_json::to_string_pretty(&session)?
    );

    let health = storage.health_check().await?;
    println!("\nhealth: {}", serde_json::to_string_pretty(&health)?);

    storage.close().await?;
    Ok(())
}
