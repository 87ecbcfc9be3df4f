//! Serves the crate's metrics to Prometheus while a mixed workload runs through a full
//! stack.
//!
//! ```text
//! cargo run --example prometheus --features prometheus -- --listen 127.0.0.1:9464 --duration 30
//! cargo run --example prometheus --features prometheus,redis -- --url redis://127.0.0.1:6379
//! curl http://127.0.0.1:9464/metrics
//! ```
//!
//! The stack is metrics -> cache -> retry -> timeout -> batch -> backend, over a SQLite
//! file in the temp directory unless `--url` names another backend. The listener binds
//! loopback unless `--listen` says otherwise; Ctrl-C stops it before `--duration` ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiecs_storage::layer::{
    BatchLayer, CacheLayer, MetricsLayer, RetryLayer, StackBuilder, TimeoutLayer,
};
use aiecs_storage::prelude::*;
use aiecs_storage::{Metadata, NewCheckpoint, NewMessage, SessionUpdate, WriteInput};
use serde_json::json;

struct Args {
    listen: SocketAddr,
    duration: Duration,
    url: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        listen: aiecs_storage::prometheus::DEFAULT_LISTEN,
        duration: Duration::from_secs(30),
        url: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => a.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--duration" => {
                a.duration =
                    Duration::from_secs(value()?.parse().map_err(|e| format!("--duration: {e}"))?)
            }
            "--url" => a.url = Some(value()?),
            other => {
                return Err(format!(
                    "unknown argument {other}; use --listen ADDR --duration SECS --url URL"
                ))
            }
        }
    }
    Ok(a)
}

/// One round of the workload on session `n`: a mix of every kind of operation.
async fn round(storage: &dyn StorageBackend, n: u64) -> aiecs_storage::Result<()> {
    let session = format!("demo-{}", n % 500);
    storage
        .create_session(&session, "demo-user", &Metadata::new())
        .await?;
    storage
        .update_session(
            &session,
            &SessionUpdate::new()
                .increment_requests()
                .add_processing_time(0.01),
        )
        .await?;
    storage
        .add_conversation_message(&session, &NewMessage::new("user", format!("hello {n}")))
        .await?;
    storage.get_conversation_history(&session, 20).await?;
    storage.get_session(&session).await?;
    let thread = format!("thread-{}", n % 100);
    let cp = format!("cp-{n}");
    storage
        .store_checkpoint(&NewCheckpoint::new(
            thread.as_str(),
            cp.as_str(),
            json!({"n": n}),
        ))
        .await?;
    storage
        .put_writes(
            &thread,
            "",
            &cp,
            "task",
            &[WriteInput::new("out", json!(n))],
        )
        .await?;
    storage.get_checkpoint(&thread, "", None).await?;
    storage
        .store_task_context(&session, &json!({"step": n}))
        .await?;
    storage.get_task_context(&session).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    aiecs_storage::prometheus::serve(args.listen)?;
    println!(
        "serving http://{}/metrics for {:?}",
        args.listen, args.duration
    );

    let url = args.url.clone().unwrap_or_else(|| {
        let path = std::env::temp_dir().join("aiecs-prometheus-example.db");
        format!("sqlite://{}", path.display())
    });
    let backend = aiecs_storage::open(&url)?;
    let storage = StackBuilder::new()
        .layer(MetricsLayer::new())
        .layer(CacheLayer::new())
        .layer(RetryLayer::new())
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(BatchLayer::new())
        .build(backend);
    storage.initialize().await?;

    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (storage, done) = (storage.clone(), done.clone());
        let deadline = args.duration;
        workers.push(tokio::spawn(async move {
            let mut n = w;
            while started.elapsed() < deadline {
                if let Err(e) = round(storage.as_ref(), n).await {
                    eprintln!("workload error: {e}");
                }
                done.fetch_add(1, Ordering::Relaxed);
                n += 4;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => println!("interrupted"),
        _ = async { for w in workers { let _ = w.await; } } => {}
    }
    println!(
        "ran {} workload rounds in {:.1?}",
        done.load(Ordering::Relaxed),
        started.elapsed()
    );
    storage.close().await?;
    Ok(())
}
