//! The Redis client's own ceiling: what redis-rs alone (the client this crate uses)
//! reaches on the main commands of loadgen's read operations, replies parsed into
//! `redis::Value` and then dropped, nothing decoded. It shares one multiplexed
//! connection between C tasks, as `RedisBackend` does.
//!
//! ```text
//! cargo run --release --example redis_client_floor --all-features -- [--url URL] [--n N] [--concurrency C]
//! ```
//!
//! Data are the sizes `scripts/baselines.sh` gives redis-benchmark (a 7-field hash, a
//! list of 200 messages of 215 bytes, ten values of 1 KiB), under `floor:` keys that it
//! removes at the end. One line per command:
//! `floor=<command> n=<N> conc=<C> ops_per_s=<x>`. Put beside redis-benchmark's rate of
//! the same command, it bounds what any operation built on that command can reach
//! through this client on this machine; put beside loadgen's rate, it shows what the
//! library adds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use redis::aio::MultiplexedConnection;
use redis::{Cmd, Value};

const HASH: &str = "floor:hash";
const LIST: &str = "floor:list";

fn checkpoint_key(i: usize) -> String {
    format!("floor:cp{i}")
}

/// Runs `n` copies of `cmd` on `c` tasks sharing `conn`; returns calls per second.
async fn drive(conn: &MultiplexedConnection, cmd: Cmd, n: usize, c: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let cmd = Arc::new(cmd);
    let start = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let (mut conn, next, cmd) = (conn.clone(), next.clone(), cmd.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let reply: Value = cmd.query_async(&mut conn).await.expect("command failed");
                    std::hint::black_box(reply);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task panicked");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> redis::RedisResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = arg(&args, "--url").unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let n: usize = arg(&args, "--n").map_or(200_000, |v| v.parse().expect("--n: a number"));
    let c: usize =
        arg(&args, "--concurrency").map_or(32, |v| v.parse().expect("--concurrency: a number"));
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;

    // The same record sizes as scripts/baselines.sh.
    let message = format!(
        r#"{{"message_id":"0193a1b2-c3d4-7e5f-a7b8-c9d0e1f2a3b4","role":"user","content":"{}","timestamp":"2026-11-26T11:22:33.123456Z","metadata":{{"turn":1}}}}"#,
        "x".repeat(70)
    );
    let kilo = "x".repeat(1024);
    let keys: Vec<String> = (0..10).map(checkpoint_key).collect();
    let mut setup = redis::pipe();
    setup.del(HASH).del(LIST).del(&keys);
    setup.hset_multiple(
        HASH,
        &[
            ("user_id", "u"),
            ("status", "active"),
            ("created_at", "1"),
            ("updated_at", "1"),
            ("request_count", "0"),
            ("total_processing_time", "0"),
            ("error_count", "0"),
        ],
    );
    setup.rpush(LIST, vec![message; 200]);
    for k in &keys {
        setup.set(k, &kilo);
    }
    setup.query_async::<()>(&mut conn).await?;

    let mut hgetall = redis::cmd("HGETALL");
    hgetall.arg(HASH);
    let mut lrange = redis::cmd("LRANGE");
    lrange.arg(LIST).arg(-50).arg(-1);
    let mut mget = redis::cmd("MGET");
    mget.arg(&keys);
    for (name, cmd) in [
        ("hgetall", hgetall),
        ("lrange_50_of_messages", lrange),
        ("mget_10_of_1k", mget),
    ] {
        let rate = drive(&conn, cmd, n, c).await;
        println!("floor={name} n={n} conc={c} ops_per_s={rate:.0}");
    }

    redis::pipe()
        .del(HASH)
        .del(LIST)
        .del(&keys)
        .query_async::<()>(&mut conn)
        .await
}
