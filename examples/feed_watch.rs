//! Follows a backend's change feed and counts what it reports: the follower process of
//! the README's change-feed figures, and a way to watch a shared store's writes.
//!
//! ```text
//! cargo run --release --example feed_watch --all-features -- URL [SECONDS]
//! cargo run --release --example feed_watch --all-features -- 'postgres://postgres@127.0.0.1:5432/test?schema=loadgen' 60
//! ```
//!
//! Opens `URL` as [`aiecs_storage::open`] does, subscribes to
//! [`StorageBackend::changes`], and after `SECONDS` (default 60) or on Ctrl-C (SIGINT)
//! prints one line (`downs` does not count the state a subscription starts in):
//!
//! ```text
//! feed=<up|down> changes=<n> missed=<n> ups=<n> downs=<n>
//! ```
//!
//! With `-v` before the URL it also prints each event as it arrives. Exits with status 2
//! if the URL cannot be opened or the backend offers no feed.
//!
//! A Redis feed reports only keys its own process read while following (tracking in its
//! default mode), and this program reads nothing: over Redis it shows the feed's state
//! and missed changes, not other processes' writes.

use std::time::Duration;

use aiecs_storage::feed::{ChangeFeed, FeedEvent};
use aiecs_storage::prelude::*;

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let verbose = args.first().is_some_and(|a| a == "-v");
    if verbose {
        args.remove(0);
    }
    let Some(url) = args.first() else {
        eprintln!("usage: feed_watch [-v] URL [SECONDS]");
        std::process::exit(2);
    };
    let seconds: u64 = match args.get(1).map(|s| s.parse()) {
        None => 60,
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            eprintln!("feed_watch: SECONDS: {e}");
            std::process::exit(2);
        }
    };
    let storage = match aiecs_storage::open(url) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("feed_watch: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = storage.initialize().await {
        eprintln!("feed_watch: {e}");
        std::process::exit(2);
    }
    let Some(feed) = storage.changes() else {
        eprintln!("feed_watch: this backend offers no change feed");
        std::process::exit(2);
    };
    let mut counts = Counts::default();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = watch(feed, &mut counts, verbose) => {}
    }
    println!(
        "feed={} changes={} missed={} ups={} downs={}",
        if counts.up { "up" } else { "down" },
        counts.changes,
        counts.missed,
        counts.ups,
        counts.downs
    );
    let _ = storage.close().await;
}

#[derive(Default)]
struct Counts {
    up: bool,
    changes: u64,
    missed: u64,
    ups: u64,
    downs: u64,
}

async fn watch(mut feed: ChangeFeed, counts: &mut Counts, verbose: bool) {
    let mut first = true;
    while let Some(event) = feed.next().await {
        if verbose {
            println!("{event:?}");
        }
        match event {
            FeedEvent::Up => {
                counts.up = true;
                counts.ups += 1;
            }
            FeedEvent::Down => {
                counts.up = false;
                counts.downs += u64::from(!first);
            }
            FeedEvent::Changed(_) => counts.changes += 1,
            FeedEvent::Missed => counts.missed += 1,
        }
        first = false;
    }
}
