//! The `failover` layer of a stack file.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::FailoverLayer;
use crate::layer::fields::{self, Invalid, LayerSettings, WithSome};
use crate::redact::redact_url;
use crate::storage::StorageBackend;

/// Settings of a `failover` layer ([`FailoverLayer`]); unset keys keep its defaults (5
/// failures open the breaker for 10 s, a primary call past 1 s counts as failed, 10 000
/// writes wait for replay). `Debug` shows the
/// fallback URL without its password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverSettings {
    /// `fallback` (required): the fallback backend's URL, in any form
    /// [`open`](crate::open) takes.
    pub fallback: String,
    /// `failure_threshold`: consecutive transient primary failures that open the breaker
    /// (at least 1).
    #[serde(
        default,
        deserialize_with = "fields::int::<1, { u32::MAX as u64 }, _, _>"
    )]
    pub failure_threshold: Option<u32>,
    /// `cooldown`: how long an open breaker keeps the primary out before probing it.
    #[serde(default, with = "fields::AnyDuration")]
    pub cooldown: Option<Duration>,
    /// `max_pending`: writes that may wait for replay before new ones are refused.
    #[serde(
        default,
        deserialize_with = "fields::int::<0, { usize::MAX as u64 }, _, _>"
    )]
    pub max_pending: Option<usize>,
    /// `primary_timeout`: the deadline of each call to the primary, past which it counts
    /// as failed (`"0s"`: no deadline of its own).
    #[serde(default, with = "fields::AnyDuration")]
    pub primary_timeout: Option<Duration>,
    /// `journal`: a file keeping the writes acknowledged from the fallback until they
    /// reach the primary, across restarts (see [`FailoverLayer::with_journal`]; needs
    /// the `sqlite` feature).
    #[serde(default)]
    pub journal: Option<std::path::PathBuf>,
}

impl fmt::Debug for FailoverSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverSettings")
            .field("fallback", &redact_url(&self.fallback))
            .field("failure_threshold", &self.failure_threshold)
            .field("cooldown", &self.cooldown)
            .field("max_pending", &self.max_pending)
            .field("primary_timeout", &self.primary_timeout)
            .field("journal", &self.journal)
            .finish()
    }
}

impl LayerSettings for FailoverSettings {
    const URL_KEYS: &'static [&'static str] = &["fallback"];

    fn hint(key: &str) -> &'static str {
        match key {
            "fallback" => "the fallback backend's URL, e.g. \"sqlite://fallback.db\"",
            _ => "",
        }
    }

    fn check(&self) -> Result<(), Invalid> {
        crate::validate::backend_url(&self.fallback)
            .map_err(|why| Invalid::key("fallback", why))?;
        if self.failure_threshold == Some(0) {
            return Err(Invalid::key("failure_threshold", "must be at least 1"));
        }
        Ok(())
    }
}

impl FailoverLayer {
    /// The layer the settings describe, failing over to `fallback`: the backend the
    /// caller opened from `settings.fallback` (opening URLs is the config's business,
    /// not a layer's). Unset keys keep [`FailoverLayer::new`]'s values.
    pub(crate) fn from_settings(
        s: &FailoverSettings,
        fallback: Arc<dyn StorageBackend>,
    ) -> crate::error::Result<Self> {
        // `"0s"` is how a file says "no deadline of its own".
        let primary_timeout = s.primary_timeout.map(|d| (!d.is_zero()).then_some(d));
        let layer = FailoverLayer::new(fallback)
            .with_some(s.failure_threshold, FailoverLayer::with_failure_threshold)
            .with_some(s.cooldown, FailoverLayer::with_cooldown)
            .with_some(primary_timeout, FailoverLayer::with_primary_timeout)
            .with_some(s.max_pending, FailoverLayer::with_max_pending);
        match &s.journal {
            None => Ok(layer),
            #[cfg(feature = "sqlite")]
            Some(path) => layer.with_journal(path),
            #[cfg(not(feature = "sqlite"))]
            Some(_) => Err(crate::error::StorageError::invalid_input(
                "journal",
                "a failover journal needs the `sqlite` feature of aiecs-storage",
            )),
        }
    }
}
