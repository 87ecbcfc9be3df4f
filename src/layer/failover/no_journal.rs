//! Without SQLite there is no journal: the type has no values, so no code path reaches
//! these methods; they keep the callers free of feature gates.

use std::time::Duration;

use super::newer::{Mark, Marks, Micros};
use super::replay::Hint;
use crate::error::Result;

pub(super) enum Journal {}

// Matched by the replay, never built: there is no journal to find entries in.
#[allow(dead_code)]
pub(super) enum Next {
    Empty,
    Entry {
        seq: i64,
        hint: Hint,
        unknown: bool,
        acked: Micros,
        marks: Marks,
    },
    Busy(&'static str),
}

pub(super) type Depth = (u64, Option<Duration>);

impl Journal {
    pub(super) fn path(&self) -> &std::path::Path {
        match *self {}
    }

    pub(super) async fn push(&self, _: &Hint, _: usize, _: u64) -> Result<(i64, Depth)> {
        match *self {}
    }

    pub(super) async fn ack(&self, _: i64) -> Result<()> {
        match *self {}
    }

    pub(super) async fn remove(&self, _: i64) -> Result<Depth> {
        match *self {}
    }

    pub(super) async fn complete(&self, _: i64, _: Vec<(String, Mark)>) -> Result<Depth> {
        match *self {}
    }

    pub(super) async fn put_back(&self, _: i64, _: &Hint) -> Result<()> {
        match *self {}
    }

    pub(super) async fn next(&self, _: Duration) -> Result<Next> {
        match *self {}
    }

    pub(super) async fn depth(&self) -> Result<Depth> {
        match *self {}
    }
}
