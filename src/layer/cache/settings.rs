//! The `cache` layer of a stack file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::CacheLayer;
use crate::layer::fields::{self, Invalid, LayerSettings, WithSome};

/// Settings of a `cache` layer ([`CacheLayer`]); unset keys keep its defaults (10 000
/// entries, 5 minutes time to live, a 30 s unknown-outcome window, coherent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    /// `max_entries`: bound by number of entries (at least 1). Not with `max_bytes`.
    #[serde(deserialize_with = "fields::int::<1, { u64::MAX }, _, _>")]
    pub max_entries: Option<u64>,
    /// `max_bytes`: bound by estimated size in bytes (at least 1). Not with
    /// `max_entries`.
    #[serde(deserialize_with = "fields::int::<1, { u64::MAX }, _, _>")]
    pub max_bytes: Option<u64>,
    /// `time_to_live`: how long an entry is kept after it was loaded (more than 0).
    #[serde(with = "fields::PositiveDuration")]
    pub time_to_live: Option<Duration>,
    /// `time_to_idle`: how long an entry is kept without being read (more than 0).
    #[serde(with = "fields::PositiveDuration")]
    pub time_to_idle: Option<Duration>,
    /// `unknown_outcome_window`: how long reads of a session or thread bypass the cache
    /// after a write to it ended with its outcome unknown (`"0s"`: not at all).
    #[serde(with = "fields::AnyDuration")]
    pub unknown_outcome_window: Option<Duration>,
    /// `coherent`: whether the cache follows the backend's change feed, dropping what
    /// other processes write (default true; no effect over a backend without a feed).
    pub coherent: Option<bool>,
}

impl LayerSettings for CacheSettings {
    fn check(&self) -> Result<(), Invalid> {
        if self.max_entries.is_some() && self.max_bytes.is_some() {
            return Err(Invalid::settings(
                "set `max_entries` or `max_bytes`, not both (a cache has one bound)",
            ));
        }
        if self.max_entries == Some(0) || self.max_bytes == Some(0) {
            return Err(Invalid::settings("a cache bound must be at least 1"));
        }
        fields::positive("time_to_live", self.time_to_live)?;
        fields::positive("time_to_idle", self.time_to_idle)
    }
}

impl CacheLayer {
    /// The layer the settings describe; unset keys keep [`CacheLayer::new`]'s values.
    pub(crate) fn from_settings(s: &CacheSettings) -> Self {
        CacheLayer::new()
            .with_some(s.max_entries, CacheLayer::with_max_entries)
            .with_some(s.max_bytes, CacheLayer::with_max_bytes)
            .with_some(s.time_to_live, CacheLayer::with_time_to_live)
            .with_some(
                s.unknown_outcome_window,
                CacheLayer::with_unknown_outcome_window,
            )
            .with_some(s.time_to_idle, CacheLayer::with_time_to_idle)
            .with_some(s.coherent, CacheLayer::with_coherence)
    }
}
