//! The `batch` layer of a stack file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BatchLayer, MAX_QUEUE};
use crate::layer::fields::{self, Invalid, LayerSettings, WithSome};
use crate::validate::MAX_LIMIT;

/// Settings of a `batch` layer ([`BatchLayer`]); unset keys keep its defaults (128
/// items, no linger, 10 000 queued).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSettings {
    /// `max_batch`: items per batch at most (1 to 10 000).
    #[serde(deserialize_with = "fields::int::<1, { MAX_LIMIT as u64 }, _, _>")]
    pub max_batch: Option<usize>,
    /// `linger`: how long the first item waits for others (may be `"0s"`).
    #[serde(with = "fields::AnyDuration")]
    pub linger: Option<Duration>,
    /// `max_queue`: items that may wait at most (1 to 16 777 216).
    #[serde(deserialize_with = "fields::int::<1, { MAX_QUEUE as u64 }, _, _>")]
    pub max_queue: Option<usize>,
}

impl LayerSettings for BatchSettings {
    fn check(&self) -> Result<(), Invalid> {
        fields::within("max_batch", self.max_batch, 1, MAX_LIMIT as u64)?;
        fields::within("max_queue", self.max_queue, 1, MAX_QUEUE as u64)
    }
}

impl BatchLayer {
    /// The layer the settings describe; unset keys keep [`BatchLayer::new`]'s values.
    pub(crate) fn from_settings(s: &BatchSettings) -> Self {
        BatchLayer::new()
            .with_some(s.max_batch, BatchLayer::with_max_batch)
            .with_some(s.linger, BatchLayer::with_linger)
            .with_some(s.max_queue, BatchLayer::with_max_queue)
    }
}
