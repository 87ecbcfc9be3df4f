//! Without SQLite there is no journal: the type has no values, so no code path reaches
//! these methods; they keep the callers free of feature gates.

use std::time::Duration;

use super::breaker::FailoverState;
use super::replay::Hint;
use crate::error::Result;

pub(super) enum Journal {}

// Matched by the replay, never built: there is no journal to find entries in.
#[allow(dead_code)]
pub(super) enum Next {
    Empty,
    Entry { seq: i64, hint: Hint },
    Busy(&'static str),
}

impl Journal {
    pub(super) fn push(&self, _: &Hint, _: usize, _: u64) -> Result<i64> {
        match *self {}
    }

    pub(super) fn ack(&self, _: i64) -> Result<()> {
        match *self {}
    }

    pub(super) fn remove(&self, _: i64) -> Result<()> {
        match *self {}
    }

    pub(super) fn put_back(&self, _: i64, _: &Hint) -> Result<()> {
        match *self {}
    }

    pub(super) fn next(&self, _: &FailoverState, _: Duration) -> Result<Next> {
        match *self {}
    }

    pub(super) fn depth(&self) -> Result<(u64, Option<Duration>)> {
        match *self {}
    }
}
