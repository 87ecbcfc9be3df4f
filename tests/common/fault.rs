//! A fault-injecting wrapper for testing layers: it sits under a layer in place of a
//! misbehaving server and fails, slows or counts calls on command. Built on the crate's
//! own forwarding wrapper, so it intercepts every operation of the contract.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiecs_storage::layer::{Call, Layered, Operation, Policy};
use aiecs_storage::{ErrorKind, Result, StorageError};

/// Which calls a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every operation.
    All,
    /// Operations that only read.
    Reads,
    /// Operations that write (and lifecycle calls).
    Writes,
    /// One operation.
    Op(Operation),
}

impl Target {
    fn matches(self, op: Operation) -> bool {
        match self {
            Target::All => true,
            Target::Reads => op.is_read(),
            Target::Writes => !op.is_read(),
            Target::Op(o) => o == op,
        }
    }
}

/// The handle a test keeps to steer the faults and read the counts.
#[derive(Clone, Default)]
pub struct Faults(Arc<State>);

/// Where a gate holds a call: before it reaches the inner backend (nothing applied), or
/// after the inner backend answered (applied, the answer not yet handed back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    Before,
    After,
}

/// Holds every call matching its target at its point until opened, so a test can drop
/// the caller's future there (the caller gives up) and check what the layers above left.
#[derive(Clone)]
pub struct Gate(Arc<GateState>);

struct GateState {
    target: Target,
    point: Point,
    arrived: AtomicUsize,
    arrival: tokio::sync::Notify,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    /// Waits until `n` calls in all have reached the gate (held or let through).
    pub async fn arrived(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let notified = self.0.arrival.notified();
                if self.0.arrived.load(Ordering::SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {n} calls reached the gate"));
    }

    /// Calls that reached the gate so far.
    pub fn count(&self) -> usize {
        self.0.arrived.load(Ordering::SeqCst)
    }

    /// Lets held calls go on, and later ones pass.
    pub fn open(&self) {
        self.0.open.send_replace(true);
    }

    async fn pass(&self) {
        self.0.arrived.fetch_add(1, Ordering::SeqCst);
        self.0.arrival.notify_waiters();
        let mut open = self.0.open.subscribe();
        // An error means the gate was dropped with the faults: let the call go on.
        let _ = open.wait_for(|open| *open).await;
    }
}

#[derive(Default)]
struct State {
    gate: Mutex<Option<Gate>>,
    /// Yields before and after each inner call: await points where a caller can give up.
    yields: AtomicUsize,
    down: AtomicBool,
    latency_ms: AtomicU64,
    plan: Mutex<Vec<(Target, u64, ErrorKind)>>,
    calls: Mutex<HashMap<Operation, u64>>,
    failed: AtomicU64,
    /// A change feed the wrapped backend offers, standing for other processes' writes.
    feed: Mutex<Option<aiecs_storage::feed::FeedHub>>,
}

/// The error a fault of `kind` raises.
pub fn error_of(kind: ErrorKind) -> StorageError {
    match kind {
        ErrorKind::Connection => StorageError::Connection {
            message: "injected: connection refused".into(),
            source: None,
        },
        ErrorKind::Timeout => StorageError::Timeout {
            operation: "injected",
            after: Duration::from_millis(1),
        },
        ErrorKind::Unavailable => StorageError::Unavailable {
            message: "injected: unavailable".into(),
        },
        ErrorKind::NotFound => StorageError::not_found("session", "injected"),
        ErrorKind::Serialization => StorageError::Serialization {
            message: "injected: corrupt".into(),
            source: None,
        },
        ErrorKind::InvalidInput => StorageError::invalid_input("injected", "bad"),
        _ => StorageError::Backend {
            message: "injected: backend error".into(),
            transient: false,
            source: None,
        },
    }
}

impl Faults {
    /// Makes the wrapped backend offer a change feed (down until the test says it is
    /// up), as a store shared with other processes does, and returns its hub.
    #[allow(dead_code)]
    pub fn offer_feed(&self) -> aiecs_storage::feed::FeedHub {
        self.0
            .feed
            .lock()
            .unwrap()
            .get_or_insert_with(aiecs_storage::feed::FeedHub::new)
            .clone()
    }

    /// Wraps `inner`; the returned handle steers its faults.
    pub fn wrap<B>(inner: B) -> (Layered<B, FaultPolicy>, Faults) {
        let faults = Faults::default();
        let policy = FaultPolicy(faults.clone());
        (Layered::new(inner, Arc::new(policy)), faults)
    }

    /// Fails the next `n` calls matching `target` with an error of `kind`.
    pub fn fail_next(&self, target: Target, n: u64, kind: ErrorKind) {
        self.0.plan.lock().unwrap().push((target, n, kind));
    }

    /// While down, every call fails with a transient connection error.
    pub fn set_down(&self, down: bool) {
        self.0.down.store(down, Ordering::SeqCst);
    }

    /// Forgets every planned failure (`fail_next`) not yet raised.
    pub fn clear_plan(&self) {
        self.0.plan.lock().unwrap().clear();
    }

    /// Delays every call by `latency` before it reaches the inner backend.
    pub fn set_latency(&self, latency: Duration) {
        self.0
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// Holds calls matching `target` at `point` until the returned gate is opened
    /// (replaces any earlier gate).
    pub fn gate(&self, target: Target, point: Point) -> Gate {
        let gate = Gate(Arc::new(GateState {
            target,
            point,
            arrived: AtomicUsize::new(0),
            arrival: tokio::sync::Notify::new(),
            open: tokio::sync::watch::channel(false).0,
        }));
        *self.0.gate.lock().unwrap() = Some(gate.clone());
        gate
    }

    /// Removes the gate (held calls stay held until it is opened).
    pub fn ungate(&self) {
        self.0.gate.lock().unwrap().take();
    }

    /// Makes every call yield to the scheduler `n` times before and after the inner
    /// call, giving a caller that many more points to give up at.
    pub fn set_yields(&self, n: usize) {
        self.0.yields.store(n, Ordering::SeqCst);
    }

    fn gate_at(&self, op: Operation, point: Point) -> Option<Gate> {
        let gate = self.0.gate.lock().unwrap();
        gate.as_ref()
            .filter(|g| g.0.point == point && g.0.target.matches(op))
            .cloned()
    }

    /// Calls of `op` that reached the inner backend.
    pub fn calls(&self, op: Operation) -> u64 {
        *self.0.calls.lock().unwrap().get(&op).unwrap_or(&0)
    }

    /// Calls of any operation that reached the inner backend.
    pub fn total_calls(&self) -> u64 {
        self.0.calls.lock().unwrap().values().sum()
    }

    /// Calls failed by an injected fault.
    pub fn injected(&self) -> u64 {
        self.0.failed.load(Ordering::SeqCst)
    }

    fn fault_for(&self, op: Operation) -> Option<StorageError> {
        if self.0.down.load(Ordering::SeqCst) {
            return Some(error_of(ErrorKind::Connection));
        }
        let mut plan = self.0.plan.lock().unwrap();
        let slot = plan.iter_mut().find(|(t, n, _)| *n > 0 && t.matches(op))?;
        slot.1 -= 1;
        Some(error_of(slot.2))
    }
}

/// The [`Policy`] behind [`Faults::wrap`].
pub struct FaultPolicy(Faults);

impl Policy for FaultPolicy {
    fn name(&self) -> &'static str {
        "faults"
    }

    fn changes(&self) -> Option<aiecs_storage::feed::ChangeFeed> {
        self.0
             .0
            .feed
            .lock()
            .unwrap()
            .as_ref()
            .map(|hub| hub.subscribe())
    }

    async fn call<'a, T, F, Fut>(&'a self, call: Call<'a>, run: F) -> Result<T>
    where
        T: Send + 'a,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<T>> + Send + 'a,
    {
        let faults = &self.0;
        let yields = faults.0.yields.load(Ordering::SeqCst);
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        if let Some(gate) = faults.gate_at(call.operation, Point::Before) {
            gate.pass().await;
        }
        let latency = self.0 .0.latency_ms.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        if let Some(e) = self.0.fault_for(call.operation) {
            self.0 .0.failed.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        *self
            .0
             .0
            .calls
            .lock()
            .unwrap()
            .entry(call.operation)
            .or_default() += 1;
        let result = run().await;
        if let Some(gate) = faults.gate_at(call.operation, Point::After) {
            gate.pass().await;
        }
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        result
    }
}
