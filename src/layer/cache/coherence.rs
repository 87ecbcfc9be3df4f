//! Following the backend's change feed, so what other processes write drops out of this
//! cache as it commits, and nothing cached is trusted while the feed is down.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::shared::{Shared, FEED_DOWN, FEED_UP};
use super::Cached;
use crate::feed::{Change, ChangeFeed, FeedEvent};
use crate::storage::StorageBackend;

impl<B: StorageBackend> Cached<B> {
    /// Subscribes to the backend's change feed on first use, when the layer is coherent
    /// and the backend has a feed. Reads bypass the cache until the feed reports it is
    /// up, so nothing is cached that a missed change could have outdated.
    pub(super) fn follow(&self) {
        if !self.shared.config.coherent || self.following.get().is_some() {
            return;
        }
        // A backend's listener is a task: without a runtime, try again on a later call.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.following.get_or_init(|| {
            if let Some(feed) = self.inner.changes() {
                self.shared.feed.store(FEED_DOWN, Ordering::SeqCst);
                runtime.spawn(consume(feed, Arc::downgrade(&self.shared)));
            }
        });
    }
}

/// Applies the feed's events to the cache until the feed or the cache is gone.
async fn consume(mut feed: ChangeFeed, shared: Weak<Shared>) {
    while let Some(event) = feed.next().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match event {
            FeedEvent::Changed(Change::Session(id))
            | FeedEvent::Changed(Change::TaskContext(id))
            | FeedEvent::Changed(Change::Thread(id)) => shared.changed_elsewhere(&id),
            // Entries loaded while the feed was down, or before a missed change, may
            // be stale: empty the cache, then trust it again.
            FeedEvent::Up => {
                shared.invalidate_everything();
                shared.feed.store(FEED_UP, Ordering::SeqCst);
            }
            FeedEvent::Down => {
                shared.feed.store(FEED_DOWN, Ordering::SeqCst);
                shared.invalidate_everything();
                shared.counters.feed_losses.add(1);
            }
            FeedEvent::Missed => {
                shared.invalidate_everything();
                shared.counters.feed_losses.add(1);
            }
        }
    }
    // The backend dropped its feed (it closed): never trust the cache again.
    if let Some(shared) = shared.upgrade() {
        shared.feed.store(FEED_DOWN, Ordering::SeqCst);
        shared.invalidate_everything();
    }
}
