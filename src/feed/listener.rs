//! The life of a backend's listener task, the same for every backend whose feed needs a
//! connection of its own: it starts with the first subscription, stops when the backend
//! closes or is dropped or when nobody subscribes any more (the next subscription starts
//! it again), and reports the feed down whenever it stops following.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{ChangeFeed, FeedHub};

/// Why a listener stopped following.
pub(crate) enum Ended {
    /// The backend closed or was dropped.
    Stopped,
    /// No subscription is left.
    Unwatched,
}

/// What a listener follows for: the hub it publishes to, and the backend's stop signal.
#[derive(Clone)]
pub(crate) struct Listening {
    pub(crate) hub: FeedHub,
    stop: watch::Receiver<bool>,
}

impl Listening {
    /// Whether the backend closed or was dropped.
    pub(crate) fn stopped(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Resolves when the backend closes or is dropped: for a `select!` beside the work.
    pub(crate) async fn stop_signal(&self) {
        let mut stop = self.stop.clone();
        while !*stop.borrow_and_update() {
            if stop.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether nobody subscribes any more.
    pub(crate) fn unwatched(&self) -> bool {
        self.hub.subscribers() == 0
    }

    /// Reports the feed down if it was up: every `Down` empties the caches that follow
    /// it, and a repeated one would count as another loss.
    pub(crate) fn down(&self) {
        if self.hub.is_up() {
            self.hub.down();
        }
    }

    /// Sleeps for `wait`; false if the backend closed meanwhile.
    pub(crate) async fn pause(&self, wait: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(wait) => !self.stopped(),
            _ = self.stop_signal() => false,
        }
    }
}

/// How one connection of a listener ended.
pub(crate) enum Session {
    /// The backend closed, or nobody subscribes any more.
    Ended(Ended),
    /// The connection failed or was lost; whether the feed had been reported up on it.
    Lost {
        /// Whether the feed was up on it: the next attempt then waits the first backoff.
        was_up: bool,
    },
}

/// A backend's listener: one connection at a time, reconnected by [`run`] with backoff
/// until the backend stops or nobody subscribes.
pub(crate) trait Follow: Send + 'static {
    /// The first wait before reconnecting, and the longest (see [`Backoff`]).
    const BACKOFF: (Duration, Duration);

    /// Connects, reports the feed up, and follows until the connection is lost or the
    /// listener should end.
    fn session(&mut self) -> impl Future<Output = Session> + Send;
}

/// The backend's side of its feed: the hub subscriptions come from, and whether a
/// listener runs.
#[derive(Debug)]
pub(crate) struct Listener {
    hub: FeedHub,
    running: Arc<AtomicBool>,
    /// Set when the backend closes; dropped with it. Either stops the listener.
    stop: watch::Sender<bool>,
}

impl Default for Listener {
    fn default() -> Self {
        Listener {
            hub: FeedHub::new(),
            running: Arc::new(AtomicBool::new(false)),
            stop: watch::channel(false).0,
        }
    }
}

impl Listener {
    /// A subscription, starting a listener made by `start` if none runs. Without a
    /// tokio runtime the subscription stays down until a later call starts one.
    pub(crate) fn subscribe<F: Follow>(&self, start: impl FnOnce(Listening) -> F) -> ChangeFeed {
        // Subscribe before looking at `running`: a listener that is stopping for want of
        // subscribers then either sees this one or has cleared `running` for us.
        let feed = self.hub.subscribe();
        if *self.stop.borrow() || self.running.swap(true, Ordering::SeqCst) {
            return feed;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let on = Listening {
                    hub: self.hub.clone(),
                    stop: self.stop.subscribe(),
                };
                let follower = start(on.clone());
                runtime.spawn(run(follower, on, self.running.clone()));
            }
            Err(_) => self.running.store(false, Ordering::SeqCst),
        }
        feed
    }

    /// The feed's state for a health report: `up`, `down` or `off`.
    pub(crate) fn state_name(&self) -> &'static str {
        self.hub.state_name(self.running.load(Ordering::SeqCst))
    }

    /// Stops the listener for good: the backend is closed.
    pub(crate) fn close(&self) {
        self.stop.send_replace(true);
    }
}

async fn run<F: Follow>(mut follower: F, on: Listening, running: Arc<AtomicBool>) {
    loop {
        let ended = follow(&mut follower, &on).await;
        on.down();
        running.store(false, Ordering::SeqCst);
        // A subscription made since the last check found `running` set and started no
        // listener: carry on for it, unless another listener has started since.
        if matches!(ended, Ended::Stopped)
            || on.stopped()
            || on.unwatched()
            || running.swap(true, Ordering::SeqCst)
        {
            return;
        }
    }
}

/// Follows one connection after another, reporting the feed down after each that was
/// up and waiting with backoff between them, until stopped or unwatched.
async fn follow<F: Follow>(follower: &mut F, on: &Listening) -> Ended {
    let (first, most) = F::BACKOFF;
    let mut backoff = Backoff::new(first, most);
    loop {
        if on.stopped() {
            return Ended::Stopped;
        }
        if on.unwatched() {
            return Ended::Unwatched;
        }
        match follower.session().await {
            Session::Ended(ended) => return ended,
            Session::Lost { was_up } => {
                if was_up {
                    on.down();
                    backoff.reset();
                }
            }
        }
        if !on.pause(backoff.next()).await {
            return Ended::Stopped;
        }
    }
}

/// Waits between reconnection attempts: from `first`, doubling after each failure up to
/// `most`, back to `first` once a connection was up.
struct Backoff {
    first: Duration,
    most: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, most: Duration) -> Backoff {
        Backoff {
            first,
            most,
            next: first,
        }
    }

    /// The wait before the next attempt; the one after will be twice as long.
    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.most);
        wait
    }

    /// After a connection that was up: the next wait is the first again.
    fn reset(&mut self) {
        self.next = self.first;
    }
}
