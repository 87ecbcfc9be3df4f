//! Callers who give up at random points, over random stacks, with the memory backend as
//! the model.
//!
//! Each proptest case builds a stack of 1 to 4 layers (cache, retry, batch, failover, in
//! any order) over a fault-injecting wrapper of a `MemoryBackend` (the store, and the
//! failover's primary), then runs a random sequence of writes and reads on two sessions
//! and a thread. Any call may be given up after a random number of polls (the caller's
//! future is dropped at whatever await it stood on: before the store was called, while
//! it was, or after it answered), and the store may be made to fail the next call or to
//! go down. Afterwards the faults are cleared, the stack settles (replay, flush), and:
//!
//! - nothing acknowledged is lost: every acknowledged append is in the history once;
//!   the request count is at least the acknowledged increments (less those a failover
//!   replay could not know had landed, which it reports);
//! - nothing applies twice: no message appears twice, and the request count is at most
//!   the increments attempted;
//! - nothing stale is served: the session, task context and latest checkpoint read
//!   through the stack equal what the store holds, and that is the last acknowledged
//!   value or one written by a call that was given up or failed after it.

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use aiecs_storage::layer::{BatchLayer, CacheLayer, FailoverLayer, RetryLayer, StackBuilder};
use aiecs_storage::{
    prelude::*, ErrorKind, MemoryBackend, Metadata, NewCheckpoint, NewMessage, SessionUpdate,
};
use common::fault::{Faults, Target};
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layer {
    Cache,
    Retry,
    Batch,
    Failover,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Increment(usize),
    Append(usize),
    StoreContext(usize),
    StoreCheckpoint,
    GetSession(usize),
    GetContext(usize),
    GetLatest,
    History(usize),
    /// The store fails its next call with this error (transient: its outcome unknown).
    Fail(ErrorKind),
    Down(bool),
    /// The store applies the oldest write whose caller got no clear answer, as a server
    /// does with a write it received before its caller gave up.
    Land,
}

#[derive(Debug, Clone, Copy)]
struct Step {
    op: Op,
    /// The caller gives up after this many polls (`None`: it waits for the answer).
    give_up_after: Option<u8>,
}

fn layer() -> impl Strategy<Value = Layer> {
    prop_oneof![
        Just(Layer::Cache),
        Just(Layer::Retry),
        Just(Layer::Batch),
        Just(Layer::Failover)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..2usize;
    prop_oneof![
        4 => s.clone().prop_map(Op::Increment),
        4 => s.clone().prop_map(Op::Append),
        3 => s.clone().prop_map(Op::StoreContext),
        3 => Just(Op::StoreCheckpoint),
        2 => s.clone().prop_map(Op::GetSession),
        2 => s.clone().prop_map(Op::GetContext),
        2 => Just(Op::GetLatest),
        1 => s.prop_map(Op::History),
        1 => prop_oneof![Just(ErrorKind::Timeout), Just(ErrorKind::Connection)].prop_map(Op::Fail),
        1 => any::<bool>().prop_map(Op::Down),
        2 => Just(Op::Land),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (op(), prop::option::weighted(0.4, 1u8..12))
        .prop_map(|(op, give_up_after)| Step { op, give_up_after })
}

/// Polls `call` at most `polls` times, yielding to the scheduler in between, then drops
/// it; `None` runs it to the end.
async fn call_or_give_up<F: Future>(call: F, polls: Option<u8>) -> Option<F::Output> {
    let mut call = std::pin::pin!(call);
    let Some(polls) = polls else {
        return Some(
            tokio::time::timeout(Duration::from_secs(20), call)
                .await
                .expect("a call hung"),
        );
    };
    for _ in 0..polls {
        let polled = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        if let Poll::Ready(out) = polled {
            return Some(out);
        }
        tokio::task::yield_now().await;
    }
    None
}

const SESSIONS: [&str; 2] = ["s0", "s1"];

/// What the calls were told, and what calls that got no clear answer may have done.
#[derive(Default)]
struct Model {
    increments_acked: [u64; 2],
    increments_tried: [u64; 2],
    messages_acked: [HashSet<String>; 2],
    messages_maybe: [HashSet<String>; 2],
    /// The last acknowledged context, and values written by unanswered calls since.
    context: [Option<i64>; 2],
    context_maybe: [Vec<i64>; 2],
    latest: Option<String>,
    latest_maybe: Vec<String>,
    next: i64,
    /// Keyed writes with no clear answer, which the store may still apply.
    unanswered: std::collections::VecDeque<Late>,
}

enum Late {
    Append(usize, NewMessage),
    Context(usize, i64),
    Checkpoint(NewCheckpoint),
}

enum Outcome {
    Acked,
    /// Given up, or failed with an error after which it may have applied.
    Unknown,
    /// Failed with an error that says it did not apply.
    NotApplied,
}

fn outcome<T>(r: &Option<aiecs_storage::Result<T>>) -> Outcome {
    match r {
        Some(Ok(_)) => Outcome::Acked,
        Some(Err(e)) if !e.may_have_applied() => Outcome::NotApplied,
        _ => Outcome::Unknown,
    }
}

async fn run_case(layers: Vec<Layer>, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let store = Arc::new(MemoryBackend::new());
    let (faulty, faults) = Faults::wrap(store.clone());
    faults.set_yields(2);
    let mut failovers = Vec::new();
    let mut batch = None;
    let mut stack = StackBuilder::new();
    for l in &layers {
        stack = match l {
            Layer::Cache => stack.layer(CacheLayer::new()),
            Layer::Retry => stack.layer(RetryLayer::new().with_min_delay(Duration::from_millis(1))),
            Layer::Batch => {
                let b = BatchLayer::new();
                batch = Some(b.clone());
                stack.layer(b)
            }
            Layer::Failover => {
                let f = FailoverLayer::new(Arc::new(MemoryBackend::new()))
                    .with_failure_threshold(1)
                    .with_cooldown(Duration::from_millis(1));
                failovers.push(f.clone());
                stack.layer(f)
            }
        };
    }
    let storage = stack.build(Arc::new(faulty));
    for s in SESSIONS {
        storage
            .create_session(s, "u", &Metadata::new())
            .await
            .unwrap();
    }

    let mut m = Model::default();
    for step in &steps {
        let polls = step.give_up_after;
        match step.op {
            Op::Increment(i) => {
                let u = SessionUpdate::new().increment_requests();
                let r = call_or_give_up(storage.update_session(SESSIONS[i], &u), polls).await;
                m.increments_tried[i] += 1;
                match outcome(&r) {
                    Outcome::Acked => m.increments_acked[i] += 1,
                    Outcome::Unknown => {}
                    Outcome::NotApplied => m.increments_tried[i] -= 1,
                }
            }
            Op::Append(i) => {
                m.next += 1;
                let id = format!("m{}", m.next);
                let msg = NewMessage::new("user", "hi").with_id(id.clone());
                let r = call_or_give_up(storage.add_conversation_message(SESSIONS[i], &msg), polls)
                    .await;
                match outcome(&r) {
                    Outcome::Acked => {
                        m.messages_acked[i].insert(id);
                    }
                    Outcome::Unknown => {
                        m.messages_maybe[i].insert(id);
                        m.unanswered.push_back(Late::Append(i, msg));
                    }
                    Outcome::NotApplied => {}
                }
            }
            Op::StoreContext(i) => {
                m.next += 1;
                let v = m.next;
                let r = call_or_give_up(storage.store_task_context(SESSIONS[i], &json!(v)), polls)
                    .await;
                match outcome(&r) {
                    Outcome::Acked => {
                        m.context[i] = Some(v);
                        m.context_maybe[i].clear();
                    }
                    Outcome::Unknown => {
                        m.context_maybe[i].push(v);
                        m.unanswered.push_back(Late::Context(i, v));
                    }
                    Outcome::NotApplied => {}
                }
            }
            Op::StoreCheckpoint => {
                m.next += 1;
                let id = format!("cp{}", m.next);
                let cp = NewCheckpoint::new("t", id.clone(), json!(m.next));
                let r = call_or_give_up(storage.store_checkpoint(&cp), polls).await;
                match outcome(&r) {
                    Outcome::Acked => {
                        m.latest = Some(id);
                        m.latest_maybe.clear();
                    }
                    Outcome::Unknown => {
                        m.latest_maybe.push(id);
                        m.unanswered.push_back(Late::Checkpoint(cp));
                    }
                    Outcome::NotApplied => {}
                }
            }
            Op::GetSession(i) => {
                call_or_give_up(storage.get_session(SESSIONS[i]), polls).await;
            }
            Op::GetContext(i) => {
                call_or_give_up(storage.get_task_context(SESSIONS[i]), polls).await;
            }
            Op::GetLatest => {
                call_or_give_up(storage.get_checkpoint("t", "", None), polls).await;
            }
            Op::History(i) => {
                call_or_give_up(storage.get_conversation_history(SESSIONS[i], 1000), polls).await;
            }
            Op::Fail(kind) => faults.fail_next(Target::All, 1, kind),
            Op::Down(down) => faults.set_down(down),
            Op::Land => match m.unanswered.pop_front() {
                Some(Late::Append(i, msg)) => {
                    store
                        .add_conversation_message(SESSIONS[i], &msg)
                        .await
                        .unwrap();
                }
                Some(Late::Context(i, v)) => {
                    store
                        .store_task_context(SESSIONS[i], &json!(v))
                        .await
                        .unwrap();
                    // Landing late, it may be the value that stays.
                    if !m.context_maybe[i].contains(&v) {
                        m.context_maybe[i].push(v);
                    }
                }
                Some(Late::Checkpoint(cp)) => {
                    store.store_checkpoint(&cp).await.unwrap();
                    if m.latest.as_deref() != Some(cp.checkpoint_id.as_str())
                        && !m.latest_maybe.contains(&cp.checkpoint_id)
                    {
                        m.latest_maybe.push(cp.checkpoint_id.clone());
                    }
                }
                None => {}
            },
        }
    }

    // Settle: no more faults; failover replays and serves from the store again; the
    // batch writer has stored everything queued (a history read flushes it).
    faults.set_down(false);
    faults.clear_plan();
    for f in &failovers {
        for _ in 0..2000 {
            storage.get_session(SESSIONS[0]).await.unwrap();
            if f.breaker_state() == "closed" && !f.is_degraded() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        prop_assert!(!f.is_degraded(), "failover never left the fallback");
    }
    let unreplayed = match failovers.is_empty() {
        true => 0,
        false => find_figure(
            &storage.get_metrics().await.unwrap(),
            "unreplayed_increments",
        ),
    };

    for (i, s) in SESSIONS.iter().enumerate() {
        let history = storage.get_conversation_history(s, 1000).await.unwrap();
        let ids: Vec<String> = history.iter().map(|h| h.message_id.clone()).collect();
        let distinct: HashSet<String> = ids.iter().cloned().collect();
        prop_assert_eq!(
            distinct.len(),
            ids.len(),
            "a message stored twice in {}: {:?}",
            s,
            ids
        );
        for id in &m.messages_acked[i] {
            prop_assert!(
                distinct.contains(id),
                "acknowledged {} missing from {}: {:?}",
                id,
                s,
                ids
            );
        }
        for id in &ids {
            prop_assert!(
                m.messages_acked[i].contains(id) || m.messages_maybe[i].contains(id),
                "{} holds {} that no call wrote",
                s,
                id
            );
        }
        let in_store: Vec<String> = store
            .get_conversation_history(s, 1000)
            .await
            .unwrap()
            .iter()
            .map(|h| h.message_id.clone())
            .collect();
        prop_assert_eq!(&ids, &in_store);

        let through = storage.get_session(s).await.unwrap().unwrap();
        let held = store.get_session(s).await.unwrap().unwrap();
        let count = held.metrics.request_count as u64;
        // A count the fallback took while the primary may or may not have (not
        // replayed) can stay in a cache in front of failover: the two sides differ.
        let shown = through.metrics.request_count as u64;
        prop_assert!(
            shown >= count && shown <= count + unreplayed,
            "stale {}: {} shown, {} held",
            s,
            shown,
            count
        );
        prop_assert!(
            count + unreplayed >= m.increments_acked[i],
            "{}: {} counted, {} acknowledged ({} not replayed)",
            s,
            count,
            m.increments_acked[i],
            unreplayed
        );
        prop_assert!(
            count <= m.increments_tried[i],
            "{}: {} counted, {} tried",
            s,
            count,
            m.increments_tried[i]
        );

        let through = storage.get_task_context(s).await.unwrap();
        let held = store.get_task_context(s).await.unwrap();
        prop_assert_eq!(&through, &held, "stale context of {}", s);
        let allowed: Vec<Option<serde_json::Value>> =
            std::iter::once(m.context[i].map(|v| json!(v)))
                .chain(m.context_maybe[i].iter().map(|v| Some(json!(v))))
                .collect();
        prop_assert!(
            allowed.contains(&held),
            "context of {} is {:?}, allowed {:?}",
            s,
            held,
            allowed
        );
    }
    let through = storage
        .get_checkpoint("t", "", None)
        .await
        .unwrap()
        .map(|c| c.checkpoint_id);
    let held = store
        .get_checkpoint("t", "", None)
        .await
        .unwrap()
        .map(|c| c.checkpoint_id);
    prop_assert_eq!(&through, &held, "stale latest checkpoint");
    let allowed: Vec<Option<String>> = std::iter::once(m.latest.clone())
        .chain(m.latest_maybe.iter().cloned().map(Some))
        .collect();
    prop_assert!(
        allowed.contains(&held),
        "latest is {:?}, allowed {:?}",
        held,
        allowed
    );
    if let Some(b) = &batch {
        prop_assert_eq!(b.stats().pending, 0);
    }
    storage.close().await.unwrap();
    Ok(())
}

/// The sum of a figure over a report and every report nested in it.
fn find_figure(report: &aiecs_storage::MetricsReport, name: &str) -> u64 {
    let own = report
        .values
        .get(name)
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    own + report
        .components
        .iter()
        .map(|c| find_figure(c, name))
        .sum::<u64>()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn callers_giving_up_break_no_promise(
        layers in prop::collection::vec(layer(), 1..=4),
        steps in prop::collection::vec(step(), 1..40),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_case(layers, steps))?;
    }
}
