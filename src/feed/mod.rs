//! Change feeds: what other processes wrote to a shared store, as it commits, so a
//! cache in this process can drop what went stale.
//!
//! A backend that several processes can share offers a feed through
//! [`StorageBackend::changes`](crate::StorageBackend::changes). A feed carries the
//! session, task context or thread a write touched, never its content, and says when it
//! is down or missed events, since a cache must then stop trusting what it holds.
//!
//! Backends build their feed on a [`FeedHub`]: one listener task per backend publishes
//! into it, and every subscriber gets a [`ChangeFeed`] that starts with the hub's current
//! state.

pub(crate) mod listener;

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

/// What a write touched.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// A session: its record, counters or history.
    Session(String),
    /// The task context of a session id.
    TaskContext(String),
    /// A thread: its checkpoints or pending writes.
    Thread(String),
}

/// One event of a [`ChangeFeed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// The feed is connected: every change committed from now on is reported.
    Up,
    /// A write committed (by any process, this one included).
    Changed(Change),
    /// Changes may have been missed (a subscriber fell behind, a listener lagged); the
    /// feed is still up.
    Missed,
    /// The feed is down (its connection dropped): changes are not reported until the next
    /// [`FeedEvent::Up`].
    Down,
}

/// A subscription to a backend's changes.
#[derive(Debug)]
pub struct ChangeFeed {
    first: Option<FeedEvent>,
    rx: broadcast::Receiver<FeedEvent>,
}

impl ChangeFeed {
    /// The next event; `None` once the backend is gone. The first event is the feed's
    /// state when the subscription was made ([`FeedEvent::Up`] or [`FeedEvent::Down`]);
    /// a subscriber that falls behind gets [`FeedEvent::Missed`].
    pub async fn next(&mut self) -> Option<FeedEvent> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        match self.rx.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(FeedEvent::Missed),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// Events a subscriber may fall behind by before it is told it missed some.
const FEED_CAPACITY: usize = 4096;

/// The publishing side of a backend's feed: its listener task reports state and changes
/// here, and [`FeedHub::subscribe`] hands out [`ChangeFeed`]s.
#[derive(Debug, Clone)]
pub struct FeedHub {
    inner: Arc<HubInner>,
}

#[derive(Debug)]
struct HubInner {
    tx: broadcast::Sender<FeedEvent>,
    /// Whether the feed is up; a subscriber's first event. Held while publishing a state
    /// so a subscription made meanwhile sees the state and then the events after it.
    up: Mutex<bool>,
}

impl Default for FeedHub {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(FEED_CAPACITY);
        FeedHub {
            inner: Arc::new(HubInner {
                tx,
                up: Mutex::new(false),
            }),
        }
    }
}

impl FeedHub {
    /// A hub whose feed is down until [`FeedHub::up`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A new subscription, starting with the current state.
    pub fn subscribe(&self) -> ChangeFeed {
        let up = self.inner.up.lock().unwrap_or_else(PoisonError::into_inner);
        ChangeFeed {
            first: Some(if *up { FeedEvent::Up } else { FeedEvent::Down }),
            rx: self.inner.tx.subscribe(),
        }
    }

    /// Reports that the feed is connected.
    pub fn up(&self) {
        self.set(true, FeedEvent::Up);
    }

    /// Reports that the feed is down.
    pub fn down(&self) {
        self.set(false, FeedEvent::Down);
    }

    /// Reports that changes may have been missed while the feed stayed up.
    pub fn missed(&self) {
        let _ = self.inner.tx.send(FeedEvent::Missed);
    }

    /// Reports a committed change.
    pub fn changed(&self, change: Change) {
        let _ = self.inner.tx.send(FeedEvent::Changed(change));
    }

    /// Whether the feed is up.
    pub fn is_up(&self) -> bool {
        *self.inner.up.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many subscriptions are open; a listener may stop when none is.
    pub fn subscribers(&self) -> usize {
        self.inner.tx.receiver_count()
    }

    /// The feed's state as a health report shows it: `up`, `down` while a listener runs
    /// (or reconnects) without being connected, `off` while none runs (nobody subscribes).
    pub(crate) fn state_name(&self, listening: bool) -> &'static str {
        match (self.is_up(), listening) {
            (true, _) => "up",
            (false, true) => "down",
            (false, false) => "off",
        }
    }

    fn set(&self, up: bool, event: FeedEvent) {
        let mut state = self.inner.up.lock().unwrap_or_else(PoisonError::into_inner);
        *state = up;
        let _ = self.inner.tx.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_subscription_starts_with_the_state_then_follows_events() {
        let hub = FeedHub::new();
        let mut before = hub.subscribe();
        hub.up();
        hub.changed(Change::Thread("t".into()));
        let mut after = hub.subscribe();
        hub.down();
        assert_eq!(before.next().await, Some(FeedEvent::Down));
        assert_eq!(before.next().await, Some(FeedEvent::Up));
        assert_eq!(
            before.next().await,
            Some(FeedEvent::Changed(Change::Thread("t".into())))
        );
        assert_eq!(after.next().await, Some(FeedEvent::Up));
        assert_eq!(after.next().await, Some(FeedEvent::Down));
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_it_missed_changes() {
        let hub = FeedHub::new();
        let mut feed = hub.subscribe();
        hub.up();
        for i in 0..FEED_CAPACITY + 10 {
            hub.changed(Change::Session(format!("s{i}")));
        }
        assert_eq!(feed.next().await, Some(FeedEvent::Down));
        assert_eq!(feed.next().await, Some(FeedEvent::Missed));
    }
}
