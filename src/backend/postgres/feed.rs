//! The change feed of the PostgreSQL backend: the triggers of migration 3 notify the
//! schema's channel as each write commits, and one listener task per backend receives
//! the notifications on a connection of its own, outside the pool (a pooled connection
//! is shared and recycled: a `LISTEN` on it would be lost or leak to other callers).
//!
//! The listener starts with the first subscription and stops when the backend closes
//! or is dropped, or when no subscription is left (the next one starts it again). It
//! reconnects after a loss, reporting the feed down meanwhile, and checks the
//! connection every [`HEARTBEAT`], since a connection cut without a word (a partition, a
//! dead host) would otherwise look idle while changes go unreported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Notification, Socket};

use super::connect::{self, ConnectOptions, SslMode};
use crate::feed::{Change, ChangeFeed, FeedHub};

/// The first wait before reconnecting; it doubles after each failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the listener checks that its connection still answers, and that someone
/// still subscribes; also how long the check may take.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Notifications received but not yet published; beyond it the connection is not read,
/// and the server holds the rest in its queue.
const BACKLOG: usize = 1024;

/// The backend's side of its feed: the hub subscriptions come from, and whether a
/// listener runs.
#[derive(Debug)]
pub(super) struct Feed {
    hub: FeedHub,
    running: Arc<AtomicBool>,
    /// Set when the backend closes; dropped with it. Either stops the listener.
    stop: watch::Sender<bool>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            hub: FeedHub::new(),
            running: Arc::new(AtomicBool::new(false)),
            stop: watch::channel(false).0,
        }
    }
}

impl Feed {
    /// A subscription, starting the listener on `channel` if none runs. Without a tokio
    /// runtime the subscription stays down until a later call starts the listener.
    pub(super) fn subscribe(&self, options: &ConnectOptions, channel: &str) -> ChangeFeed {
        // Subscribe before looking at `running`: a listener that is stopping for want of
        // subscribers then either sees this one or has cleared `running` for us.
        let feed = self.hub.subscribe();
        if *self.stop.borrow() || self.running.swap(true, Ordering::SeqCst) {
            return feed;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let listener = Listener {
                    hub: self.hub.clone(),
                    running: self.running.clone(),
                    stop: self.stop.subscribe(),
                    config: options.config.clone(),
                    ssl_mode: options.ssl_mode,
                    target: options.redacted.clone(),
                    listen: format!("LISTEN \"{channel}\""),
                    channel: channel.to_owned(),
                };
                runtime.spawn(listener.run());
            }
            Err(_) => self.running.store(false, Ordering::SeqCst),
        }
        feed
    }

    /// Stops the listener for good: the backend is closed.
    pub(super) fn close(&self) {
        self.stop.send_replace(true);
    }
}

/// How one connection's session ended.
enum Ended {
    /// The backend closed or was dropped.
    Stopped,
    /// No subscription is left.
    Unwatched,
    /// The connection failed or was lost; whether it had been up.
    Lost { was_up: bool },
}

struct Listener {
    hub: FeedHub,
    running: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
    /// The pool's settings, password included; never printed.
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    /// The redacted URL, the only form logged.
    target: String,
    channel: String,
    listen: String,
}

impl Listener {
    fn stopped(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    async fn run(mut self) {
        loop {
            let ended = self.follow().await;
            self.down();
            self.running.store(false, Ordering::SeqCst);
            // A subscription made since the last check found `running` set and started
            // no listener: carry on for it, unless another listener has started since.
            if matches!(ended, Ended::Stopped)
                || self.stopped()
                || self.hub.subscribers() == 0
                || self.running.swap(true, Ordering::SeqCst)
            {
                return;
            }
        }
    }

    /// Connects, and reconnects with backoff after each loss, until stopped or
    /// unwatched.
    async fn follow(&mut self) -> Ended {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if self.stopped() {
                return Ended::Stopped;
            }
            if self.hub.subscribers() == 0 {
                return Ended::Unwatched;
            }
            let ended = match self.ssl_mode {
                SslMode::Require => self.session(connect::rustls_connector()).await,
                SslMode::Disable | SslMode::Prefer => self.session(tokio_postgres::NoTls).await,
            };
            match ended {
                Ended::Lost { was_up } => {
                    if was_up {
                        self.down();
                        backoff = FIRST_BACKOFF;
                    }
                }
                ended => return ended,
            }
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return Ended::Stopped,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: `LISTEN`, report the feed up, publish what arrives.
    async fn session<T>(&mut self, tls: T) -> Ended
    where
        T: MakeTlsConnect<Socket>,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let (client, mut connection) = match self.config.connect(tls).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(
                    target = %self.target,
                    error = %connect::describe(&e),
                    "postgres change feed: cannot connect"
                );
                return Ended::Lost { was_up: false };
            }
        };
        // The connection is driven by a task of its own, so the client's statements
        // (the LISTEN, the heartbeat) progress while notifications are awaited here.
        let (tx, mut rx) = mpsc::channel::<Notification>(BACKLOG);
        let mut driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n).await.is_err() {
                            return None;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Some(e),
                    None => return None,
                }
            }
        });
        let ended = self.listen_on(&client, &mut rx, &mut driver).await;
        // Left to itself, the driver says goodbye to the server once the client is gone;
        // a lost connection cannot, and its socket could linger until the OS gives up.
        drop(client);
        if let Ended::Lost { .. } = ended {
            driver.abort();
        }
        ended
    }

    /// Runs `LISTEN` on a connection its driver task serves, reports the feed up, and
    /// publishes what arrives until the session ends.
    async fn listen_on(
        &mut self,
        client: &tokio_postgres::Client,
        rx: &mut mpsc::Receiver<Notification>,
        driver: &mut tokio::task::JoinHandle<Option<tokio_postgres::Error>>,
    ) -> Ended {
        if let Err(e) = client.batch_execute(&self.listen).await {
            tracing::debug!(
                target = %self.target,
                error = %connect::describe(&e),
                "postgres change feed: LISTEN failed"
            );
            return Ended::Lost { was_up: false };
        }
        self.hub.up();
        tracing::debug!(target = %self.target, channel = %self.channel, "postgres change feed up");

        let start = tokio::time::Instant::now() + HEARTBEAT;
        let mut heartbeat = tokio::time::interval_at(start, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                received = rx.recv() => match received {
                    Some(n) => self.publish(&n),
                    None => break,
                },
                _ = heartbeat.tick() => {
                    if self.hub.subscribers() == 0 {
                        return Ended::Unwatched;
                    }
                    // Repeating the LISTEN is a no-op for the server, and keeps it the
                    // query `pg_stat_activity` shows for this connection.
                    let answer = tokio::time::timeout(HEARTBEAT, client.batch_execute(&self.listen));
                    match answer.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            self.lost(&connect::describe(&e));
                            return Ended::Lost { was_up: true };
                        }
                        Err(_) => {
                            self.lost("the connection stopped answering");
                            return Ended::Lost { was_up: true };
                        }
                    }
                }
                _ = stop.changed() => return Ended::Stopped,
            }
        }
        // The driver ended: the connection closed or failed.
        let why = match driver.await {
            Ok(Some(e)) => connect::describe(&e),
            _ => "the server closed the connection".to_owned(),
        };
        self.lost(&why);
        Ended::Lost { was_up: true }
    }

    /// Reports the feed down, once: every `Down` empties the caches that follow it.
    fn down(&self) {
        if self.hub.is_up() {
            self.hub.down();
        }
    }

    fn lost(&self, why: &str) {
        tracing::warn!(
            target = %self.target,
            error = %why,
            "postgres change feed lost its connection; reconnecting"
        );
    }

    fn publish(&self, n: &Notification) {
        match (n.channel() == self.channel)
            .then(|| change(n.payload()))
            .flatten()
        {
            Some(change) => self.hub.changed(change),
            // Not a payload the triggers send: whatever it meant went unreported.
            None => self.hub.missed(),
        }
    }
}

/// The change a trigger's payload reports: `s:`, `t:` or `c:` and the id.
fn change(payload: &str) -> Option<Change> {
    let (kind, id) = payload.split_once(':')?;
    let id = id.to_owned();
    match kind {
        "s" => Some(Change::Session(id)),
        "t" => Some(Change::TaskContext(id)),
        "c" => Some(Change::Thread(id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_the_kind_and_the_whole_id() {
        assert_eq!(change("s:a:b"), Some(Change::Session("a:b".into())));
        assert_eq!(change("t:x"), Some(Change::TaskContext("x".into())));
        assert_eq!(change("c:"), Some(Change::Thread(String::new())));
        assert_eq!(change("q:x"), None);
        assert_eq!(change("nothing"), None);
    }
}
