//! Opening a backend from a URL (the spec's StorageFactory and StorageType), and building
//! a whole stack of layers from a configuration file.
//!
//! - [`open`]: one backend from a URL.
//! - [`StorageConfig`]: a backend URL and an ordered list of [`LayerConfig`]s, read from
//!   TOML ([`StorageConfig::from_toml_str`], [`StorageConfig::from_file`]) or any serde
//!   format, adjusted by environment variables ([`StorageConfig::with_env_overrides`]),
//!   and built into an `Arc<dyn StorageBackend>` ([`StorageConfig::build`]).

//!
//! `mod.rs` holds the stack document and the dispatch by layer `type`; `open` the
//! backend named by a URL; `reader` the serde reader that gives each layer's settings
//! type its table and names the key path of any error.

mod env;
mod open;
mod reader;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::layer::fields::shown;
use crate::layer::{
    BatchLayer, CacheLayer, DynLayer, FailoverLayer, LoggingLayer, MetricsLayer, RetryLayer,
    StackBuilder, TimeoutLayer,
};
use crate::redact::{redact_url, scrub};
use crate::storage::StorageBackend;
use crate::validate;

pub use open::open;
use reader::{allowed_keys, check, overlay, read, type_of, Raw, Table};

// Each layer's settings type lives with its layer (adding an option is one edit there);
// they are shown here, next to the stack file they make up.
pub use crate::layer::batch::BatchSettings;
pub use crate::layer::cache::CacheSettings;
pub use crate::layer::failover::FailoverSettings;
pub use crate::layer::fields::parse_duration;
pub use crate::layer::logging::LoggingSettings;
pub use crate::layer::metrics::MetricsSettings;
pub use crate::layer::retry::RetrySettings;
pub use crate::layer::timeout::TimeoutSettings;

// ---------------------------------------------------------------------------------------
// Stack configuration
// ---------------------------------------------------------------------------------------

/// The prefix of the environment variables read by
/// [`StorageConfig::with_env_overrides`].
pub const ENV_PREFIX: &str = "AIECS_STORAGE_";

/// A whole storage stack: the backend URL and the layers around it, outermost first.
///
/// Read it from TOML with [`StorageConfig::from_toml_str`] or [`StorageConfig::from_file`]
/// (or from any serde format: it implements [`Deserialize`]), let the environment adjust
/// it with [`StorageConfig::with_env_overrides`], and turn it into a backend with
/// [`StorageConfig::build`].
///
/// # Format
///
/// ```toml
/// # The backend, as `open()` takes it. AIECS_STORAGE_URL overrides it.
/// url = "redis://:secret@cache.internal:6379/0"
///
/// # Layers, outermost first: the first one sees a call first (tower's order).
/// [[layers]]
/// type = "logging"
/// slow_threshold = "250ms"
///
/// [[layers]]
/// type = "metrics"
/// backend_label = "sessions"
///
/// [[layers]]
/// type = "retry"          # each attempt below gets the timeout's deadline
/// max_attempts = 4
/// min_delay = "20ms"
/// max_delay = "1s"
/// max_elapsed = "5s"
///
/// [[layers]]
/// type = "timeout"
/// timeout = "2s"          # required
///
/// [[layers]]
/// type = "cache"
/// max_entries = 10000     # or max_bytes, not both
/// time_to_live = "5m"
/// coherent = true         # follow the backend's change feed, if it has one
///
/// [[layers]]
/// type = "failover"
/// fallback = "sqlite:///var/lib/app/fallback.db"   # required
/// failure_threshold = 5
/// cooldown = "10s"
/// primary_timeout = "1s"   # a primary call past it counts as failed
/// journal = "/var/lib/app/failover.journal"   # optional: acknowledged writes survive a restart
///
/// [[layers]]
/// type = "batch"
/// max_batch = 128
/// linger = "2ms"
/// ```
///
/// Every key of every layer is optional unless marked required; an unset key keeps the
/// layer's own default (see [`CacheSettings`], [`RetrySettings`], [`TimeoutSettings`],
/// [`BatchSettings`], [`FailoverSettings`], [`MetricsSettings`], [`LoggingSettings`]).
///
/// **Durations** are strings with a unit: `"500ms"`, `"2s"`, `"5m"`, `"1h"`, `"1d"`, a
/// decimal such as `"1.5s"`, or a sum such as `"1m30s"`. A bare number is refused
/// (seconds or milliseconds?), and so are `*_ms` keys such as `timeout_ms`.
///
/// # Errors
///
/// Unknown keys, unknown layer types, missing required keys and bad values are all
/// [`StorageError::InvalidInput`] with `field: "config"` and a reason that names the key
/// path (for example `layers[2].max_entries`) and says what is allowed. No error, and no
/// `Debug` output, shows a password: URLs are shown as `redis://:***@host`.
///
/// ```
/// # fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::StorageConfig;
///
/// let err = StorageConfig::from_toml_str(
///     "url = \"memory://\"\n[[layers]]\ntype = \"cache\"\nmax_entriez = 5\n",
/// )
/// .unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid input for `config`: layers[0]: unknown key `max_entriez` for a `cache` \
///      layer; allowed keys: type, max_entries, max_bytes, time_to_live, time_to_idle, \
///      unknown_outcome_window, coherent"
/// );
/// # Ok(()) }
/// ```
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use aiecs_storage::{prelude::*, StorageConfig};
///
/// let config = StorageConfig::from_toml_str(
///     r#"
///     url = "sqlite::memory:"
///
///     [[layers]]
///     type = "retry"
///     max_attempts = 3
///
///     [[layers]]
///     type = "timeout"
///     timeout = "2s"
///
///     [[layers]]
///     type = "failover"
///     fallback = "memory://"
///     "#,
/// )?
/// .with_env_overrides()?; // AIECS_STORAGE_URL, AIECS_STORAGE_TIMEOUT__TIMEOUT, ...
/// let storage = config.build()?;
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// assert_eq!(storage.get_session("s1").await?.unwrap().user_id, "alice");
/// # Ok(()) }
/// ```
#[derive(Clone, PartialEq)]
pub struct StorageConfig {
    /// The backend URL, in any form [`open`] takes.
    pub url: String,
    /// The layers, outermost first (the first one sees a call first).
    pub layers: Vec<LayerConfig>,
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("url", &redact_url(&self.url))
            .field("layers", &self.layers)
            .finish()
    }
}

/// Declares [`LayerConfig`] and [`LAYER_TYPES`] from one list of `type` names and
/// settings types, and the dispatch by `type`, so that none of them can miss a layer.
macro_rules! layer_types {
    ($($(#[$doc:meta])* $name:literal => $variant:ident($settings:ty),)*) => {
        /// The layer types a [`LayerConfig`] can name, in the order error messages list
        /// them.
        pub const LAYER_TYPES: [&str; [$($name),*].len()] = [$($name),*];

        /// One layer of a [`StorageConfig`], with its settings. In TOML, a `[[layers]]`
        /// table whose `type` key names the variant (`cache`, `retry`, `timeout`,
        /// `batch`, `failover`, `metrics` or `logging`).
        #[derive(Debug, Clone, PartialEq)]
        #[non_exhaustive]
        pub enum LayerConfig {
            $($(#[$doc])* $variant($settings),)*
        }

        impl LayerConfig {
            /// The layer's `type` name: `cache`, `retry`, `timeout`, `batch`, `failover`,
            /// `metrics` or `logging`.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(LayerConfig::$variant(_) => $name,)*
                }
            }

            /// The keys a layer of this type accepts (besides `type`).
            pub fn allowed_keys(&self) -> &'static [&'static str] {
                match self {
                    $(LayerConfig::$variant(_) => allowed_keys::<$settings>(),)*
                }
            }

            /// The layer of type `kind` a table describes; `None` if no layer has that
            /// type.
            fn read(kind: &str, path: &str, table: Table<'_>) -> Option<Result<Self, String>> {
                match kind {
                    $($name => Some(read(path, kind, table).map(LayerConfig::$variant)),)*
                    _ => None,
                }
            }

            /// Checks the rules no single key states, and values set in code.
            fn check(&self, path: &str) -> Result<(), String> {
                match self {
                    $(LayerConfig::$variant(s) => check(s, path),)*
                }
            }

            /// Sets `key` from an environment variable's text.
            fn set(&mut self, path: &str, key: &str, value: &str) -> Result<(), String> {
                match self {
                    $(LayerConfig::$variant(s) => *s = overlay(s, path, $name, key, value)?,)*
                }
                Ok(())
            }
        }
    };
}

layer_types! {
    /// `type = "cache"`: a [`CacheLayer`].
    "cache" => Cache(CacheSettings),
    /// `type = "retry"`: a [`RetryLayer`].
    "retry" => Retry(RetrySettings),
    /// `type = "timeout"`: a [`TimeoutLayer`].
    "timeout" => Timeout(TimeoutSettings),
    /// `type = "batch"`: a [`BatchLayer`].
    "batch" => Batch(BatchSettings),
    /// `type = "failover"`: a [`FailoverLayer`] whose fallback is opened from a URL.
    "failover" => Failover(FailoverSettings),
    /// `type = "metrics"`: a [`MetricsLayer`].
    "metrics" => Metrics(MetricsSettings),
    /// `type = "logging"`: a [`LoggingLayer`].
    "logging" => Logging(LoggingSettings),
}

const TOP_KEYS: &[&str] = &["url", "layers"];

fn config_error(reason: impl Into<String>) -> StorageError {
    StorageError::invalid_input("config", reason)
}

impl StorageConfig {
    /// A configuration of `url` with no layers.
    pub fn new(url: impl Into<String>) -> Self {
        StorageConfig {
            url: url.into(),
            layers: Vec::new(),
        }
    }

    /// Adds a layer inside the ones added before it.
    pub fn with_layer(mut self, layer: LayerConfig) -> Self {
        self.layers.push(layer);
        self
    }

    /// Parses a TOML document (see the type docs for the format).
    ///
    /// A syntax error names its line and column; neither it nor any other error
    /// shows a password written in the document.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let value: Value = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let before = text.get(..span.start).unwrap_or(text);
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    format!(" at line {line}, column {column}")
                })
                .unwrap_or_default();
            let message = e.message().trim_end().replace('\n', "; ");
            config_error(scrub_document(
                &format!("TOML syntax error{at}: {message}"),
                text,
            ))
        })?;
        Self::from_value(&value).map_err(|reason| config_error(scrub_document(&reason, text)))
    }

    /// Reads and parses a TOML file (see [`StorageConfig::from_toml_str`]). An unreadable
    /// file is [`StorageError::InvalidInput`] on `config` too, naming the path.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            config_error(format!(
                "cannot read the config file {}: {e}",
                path.display()
            ))
        })?;
        Self::from_toml_str(&text).map_err(|e| match e {
            StorageError::InvalidInput { field, reason } => StorageError::InvalidInput {
                field,
                reason: format!("{}: {reason}", path.display()),
            },
            other => other,
        })
    }

    /// Checks what the parser checks, for a configuration built in code: a URL is set,
    /// every layer's values are in range, required keys are set.
    pub fn validate(&self) -> Result<()> {
        check_url("url", &self.url).map_err(config_error)?;
        for (i, layer) in self.layers.iter().enumerate() {
            layer.check(&format!("layers[{i}]")).map_err(config_error)?;
        }
        Ok(())
    }

    /// Opens the backend with [`open`] and wraps it in the layers, the first one
    /// outermost (with [`StackBuilder`]). Nothing connects yet: call `initialize()` on
    /// the result, or let the first call do it.
    ///
    /// A URL [`open`] refuses (an unknown scheme, a feature this build lacks) is
    /// [`StorageError::InvalidInput`] on `config`, naming `url` or
    /// `layers[i].fallback`.
    pub fn build(&self) -> Result<Arc<dyn StorageBackend>> {
        self.validate()?;
        let backend = open(&self.url).map_err(|e| within("url", e))?;
        let mut stack = StackBuilder::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let layer = layer
                .layer()
                .map_err(|e| within(&format!("layers[{i}].fallback"), e))?;
            stack = stack.boxed_layer(layer);
        }
        Ok(stack.build(backend))
    }

    fn from_value(value: &Value) -> Result<Self, String> {
        let Value::Object(top) = value else {
            return Err(format!(
                "expected a table with the keys {}",
                TOP_KEYS.join(", ")
            ));
        };
        if let Some(key) = top.keys().find(|k| !TOP_KEYS.contains(&k.as_str())) {
            return Err(format!(
                "unknown key `{key}`; allowed keys: {}",
                TOP_KEYS.join(", ")
            ));
        }
        let url = match top.get("url") {
            Some(Value::String(url)) => url.clone(),
            Some(other) => {
                return Err(format!(
                    "url: expected a string (a backend URL), got {}",
                    type_of(other)
                ))
            }
            None => {
                return Err(
                    "url is missing: the backend URL, e.g. \"sqlite://data.db\" or \
                     \"redis://host:6379\""
                        .into(),
                )
            }
        };
        check_url("url", &url)?;
        let layers = match top.get("layers") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| LayerConfig::from_value(&format!("layers[{i}]"), item))
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(format!(
                    "layers: expected an array of tables ([[layers]] in TOML), got {}",
                    type_of(other)
                ))
            }
        };
        Ok(StorageConfig { url, layers })
    }
}

impl<'de> Deserialize<'de> for StorageConfig {
    /// Reads the form described on [`StorageConfig`] from any self-describing format.
    /// Prefer [`StorageConfig::from_toml_str`] for TOML: `toml::from_str` quotes the
    /// offending document line in its errors, which may hold a password.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        StorageConfig::from_value(&value).map_err(serde::de::Error::custom)
    }
}

fn within(key: &str, e: StorageError) -> StorageError {
    match e {
        StorageError::InvalidInput { reason, .. } => config_error(format!("{key}: {reason}")),
        other => other,
    }
}

fn check_url(key: &str, url: &str) -> Result<(), String> {
    validate::backend_url(url).map_err(|why| format!("{key}: {why}"))
}

impl LayerConfig {
    /// The configured layer, ready for a [`StackBuilder`]. A `failover` layer opens its
    /// fallback with [`open`] (nothing connects yet); its URL errors are returned.
    pub fn layer(&self) -> Result<Box<dyn DynLayer>> {
        Ok(match self {
            LayerConfig::Cache(s) => Box::new(CacheLayer::from_settings(s)),
            LayerConfig::Retry(s) => Box::new(RetryLayer::from_settings(s)),
            LayerConfig::Timeout(s) => Box::new(TimeoutLayer::from_settings(s)),
            LayerConfig::Batch(s) => Box::new(BatchLayer::from_settings(s)),
            LayerConfig::Failover(s) => {
                Box::new(FailoverLayer::from_settings(s, open(&s.fallback)?)?)
            }
            LayerConfig::Metrics(s) => Box::new(MetricsLayer::from_settings(s)),
            LayerConfig::Logging(s) => Box::new(LoggingLayer::from_settings(s)),
        })
    }

    fn from_value(path: &str, value: &Value) -> Result<Self, String> {
        let Value::Object(table) = value else {
            return Err(format!(
                "{path}: expected a table ([[layers]] in TOML) with a `type` key, got {}",
                type_of(value)
            ));
        };
        let kind = match table.get("type") {
            Some(Value::String(kind)) => kind.as_str(),
            Some(other) => {
                return Err(format!(
                    "{path}.type: expected a string, one of {}; got {}",
                    LAYER_TYPES.join(", "),
                    type_of(other)
                ))
            }
            None => {
                return Err(format!(
                    "{path}.type is missing; allowed types: {}",
                    LAYER_TYPES.join(", ")
                ))
            }
        };
        let entries = table
            .iter()
            .filter(|(key, _)| key.as_str() != "type")
            .map(|(key, value)| (key.as_str(), Raw::Json(value)));
        LayerConfig::read(kind, path, Table::new(entries)).unwrap_or_else(|| {
            Err(format!(
                "{path}.type: unknown layer type `{}`; allowed types: {}",
                shown(kind),
                LAYER_TYPES.join(", ")
            ))
        })
    }
}

// ---------------------------------------------------------------------------------------
// Keeping passwords out of output
// ---------------------------------------------------------------------------------------

/// `text` with the secrets of every URL found in `document` replaced.
fn scrub_document(text: &str, document: &str) -> String {
    let mut out = text.to_owned();
    for candidate in document.split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'')) {
        if candidate.contains("://") || candidate.contains('?') {
            out = scrub(&out, candidate);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(open("memory://").unwrap().kind(), "memory");
        let err = open("mysql://u:hunter2@h/db").err().unwrap();
        assert!(matches!(
            err,
            StorageError::InvalidInput { field: "url", .. }
        ));
        assert!(!err.to_string().contains("hunter2"));
        #[cfg(feature = "sqlite")]
        {
            assert_eq!(open("sqlite::memory:").unwrap().kind(), "sqlite");
            assert!(open("sqlite://").is_err());
        }
    }
}
