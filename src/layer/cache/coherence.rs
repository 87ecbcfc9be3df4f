//! Following the backend's change feed, so what other processes write drops out of this
//! cache as it commits, and nothing cached is trusted while the feed is down.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::shared::{Shared, FEED_DOWN, FEED_UP};
use super::Cached;
use crate::feed::{Change, ChangeFeed, FeedEvent};
use crate::layer::names;
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
            let feed = self.inner.changes()?;
            self.shared.feed_state(FEED_DOWN);
            runtime.spawn(consume(feed, Arc::downgrade(&self.shared)));
            Some(Instant::now())
        });
    }

    /// Waits, up to [`FEED_SETTLE`] after the subscription, for a feed that has never
    /// come up: a health check that starts the feed itself (the first call of a new
    /// stack) should not report a healthy store degraded because its feed is still
    /// connecting. A feed that was up once, or stays down past that, is reported as it is.
    pub(super) async fn settle_feed(&self) {
        let Some(Some(since)) = self.following.get() else {
            return;
        };
        while self.shared.feed_is_down()
            && !self.shared.feed_was_up.load(Ordering::SeqCst)
            && since.elapsed() < FEED_SETTLE
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// How long after subscribing a health check waits for the feed to come up.
const FEED_SETTLE: Duration = Duration::from_secs(2);

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
                shared.feed_state(FEED_UP);
            }
            FeedEvent::Down => {
                // A feed that starts down has lost nothing yet.
                let was_up = shared.feed.load(Ordering::SeqCst) == FEED_UP;
                shared.feed_state(FEED_DOWN);
                shared.invalidate_everything();
                if was_up {
                    shared.counters.feed_losses.add(1);
                }
            }
            FeedEvent::Missed => {
                shared.invalidate_everything();
                shared.counters.feed_losses.add(1);
            }
        }
    }
    // The backend dropped its feed (it closed): never trust the cache again.
    if let Some(shared) = shared.upgrade() {
        shared.feed_state(FEED_DOWN);
        shared.invalidate_everything();
    }
}

impl Shared {
    /// Sets the feed's state, and its gauge.
    fn feed_state(&self, state: u8) {
        self.feed.store(state, Ordering::SeqCst);
        if state == FEED_UP {
            self.feed_was_up.store(true, Ordering::SeqCst);
        }
        let up = if state == FEED_UP { 1.0 } else { 0.0 };
        self.counters.feed_up.set(names::CACHE_FEED_UP, up);
    }
}
