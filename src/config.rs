//! Opening a backend from a URL (the spec's StorageFactory and StorageType), and building
//! a whole stack of layers from a configuration file.
//!
//! - [`open`]: one backend from a URL.
//! - [`StorageConfig`]: a backend URL and an ordered list of [`LayerConfig`]s, read from
//!   TOML ([`StorageConfig::from_toml_str`], [`StorageConfig::from_file`]) or any serde
//!   format, adjusted by environment variables ([`StorageConfig::with_env_overrides`]),
//!   and built into an `Arc<dyn StorageBackend>` ([`StorageConfig::build`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::layer::fields::{shown, Invalid, LayerSettings};
use crate::layer::{
    BatchLayer, CacheLayer, DynLayer, FailoverLayer, LoggingLayer, MetricsLayer, RetryLayer,
    StackBuilder, TimeoutLayer,
};
use crate::redact::{redact_url, scrub};
use crate::storage::StorageBackend;
use crate::validate;

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

/// Opens the backend a URL names; nothing connects until `initialize()` or the first
/// call.
///
/// | URL | backend |
/// | --- | --- |
/// | `memory://` | [`MemoryBackend`](crate::MemoryBackend) |
/// | `sqlite://path/to/file.db`, `sqlite:///abs/path.db`, `sqlite::memory:` | [`SqliteBackend`](crate::SqliteBackend) (feature `sqlite`) |
/// | `redis://`, `rediss://`, `redis+cluster://h1:7000,h2:7001` | `RedisBackend` (feature `redis`) |
/// | `postgres://`, `postgresql://` | `PostgresBackend` (feature `postgres`) |
///
/// A scheme this build cannot open is [`StorageError::InvalidInput`] on `url`, naming
/// the feature to enable; the password never appears in the error.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// let storage = aiecs_storage::open("sqlite::memory:")?;
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// # Ok(()) }
/// ```
pub fn open(url: &str) -> Result<Arc<dyn StorageBackend>> {
    let scheme = url.split_once(':').map_or("", |(s, _)| s);
    match scheme {
        "memory" => Ok(Arc::new(crate::MemoryBackend::new())),
        "sqlite" => sqlite(url),
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => redis(url),
        "postgres" | "postgresql" => postgres(url),
        _ => Err(StorageError::invalid_input(
            "url",
            format!(
                "unknown scheme `{scheme}`; expected memory://, sqlite://, redis://, \
                 rediss://, redis+cluster://, postgres://"
            ),
        )),
    }
}

#[cfg_attr(
    all(feature = "sqlite", feature = "redis", feature = "postgres"),
    allow(dead_code)
)]
fn missing_feature(feature: &str) -> StorageError {
    StorageError::invalid_input(
        "url",
        format!("this build cannot open it: enable the `{feature}` feature of aiecs-storage"),
    )
}

#[cfg(feature = "sqlite")]
fn sqlite(url: &str) -> Result<Arc<dyn StorageBackend>> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or_default();
    if path.is_empty() {
        return Err(StorageError::invalid_input(
            "url",
            "sqlite URL names no file; use sqlite://path/to/file.db or sqlite::memory:",
        ));
    }
    Ok(Arc::new(crate::SqliteBackend::new(path)))
}

#[cfg(not(feature = "sqlite"))]
fn sqlite(_: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature("sqlite"))
}

#[cfg(feature = "redis")]
fn redis(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Ok(Arc::new(crate::RedisBackend::new(url)?))
}

#[cfg(not(feature = "redis"))]
fn redis(_: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature("redis"))
}

#[cfg(feature = "postgres")]
fn postgres(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Ok(Arc::new(crate::PostgresBackend::new(url)?))
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature("postgres"))
}

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
///
/// [[layers]]
/// type = "failover"
/// fallback = "sqlite:///var/lib/app/fallback.db"   # required
/// failure_threshold = 5
/// cooldown = "10s"
/// primary_timeout = "1s"   # a primary call past it counts as failed
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
///      unknown_outcome_window"
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

    /// Applies the `AIECS_STORAGE_*` environment variables on top of the configuration:
    ///
    /// | variable | effect |
    /// | --- | --- |
    /// | `AIECS_STORAGE_URL` | replaces `url` |
    /// | `AIECS_STORAGE_<TYPE>__<KEY>` | sets `KEY` of the layer of type `TYPE`, e.g. `AIECS_STORAGE_CACHE__MAX_ENTRIES=5000`, `AIECS_STORAGE_TIMEOUT__TIMEOUT=500ms`, `AIECS_STORAGE_FAILOVER__FALLBACK=sqlite://fallback.db`, `AIECS_STORAGE_RETRY__RETRY_NON_IDEMPOTENT=true` |
    ///
    /// Names are matched without regard to case. A `<TYPE>__<KEY>` variable must name a
    /// layer type the configuration holds exactly once, and a key of that type; it
    /// cannot add or remove layers. Values take the same forms as in the file
    /// (durations with a unit, `true`/`false`, integers). Other `AIECS_STORAGE_*`
    /// variables (without `__`, such as a CLI's `AIECS_STORAGE_CONFIG`) are ignored.
    ///
    /// Errors name the variable and the key, never a URL's value.
    pub fn with_env_overrides(self) -> Result<Self> {
        let mut vars = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if !name.to_ascii_uppercase().starts_with(ENV_PREFIX) {
                continue;
            }
            match value.into_string() {
                Ok(value) => vars.push((name.to_owned(), value)),
                Err(_) => return Err(config_error(format!("{name} is not valid UTF-8"))),
            }
        }
        self.with_overrides(vars)
    }

    /// Applies overrides as [`StorageConfig::with_env_overrides`] does, from the given
    /// `(name, value)` pairs instead of the process environment. Pairs whose name does
    /// not start with `AIECS_STORAGE_` are ignored.
    pub fn with_overrides<I, K, V>(mut self, vars: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .collect();
        // A deterministic order, whatever the environment's.
        vars.sort();
        for (name, value) in &vars {
            let upper = name.to_ascii_uppercase();
            let Some(rest) = upper.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if rest == "URL" {
                if value.trim().is_empty() {
                    return Err(config_error(format!("{name} is empty: set a backend URL")));
                }
                self.url = value.clone();
                continue;
            }
            let Some((kind, key)) = rest.split_once("__") else {
                continue;
            };
            let (kind, key) = (kind.to_ascii_lowercase(), key.to_ascii_lowercase());
            if !LAYER_TYPES.contains(&kind.as_str()) {
                return Err(config_error(format!(
                    "{name}: unknown layer type `{kind}`; allowed types: {}",
                    LAYER_TYPES.join(", ")
                )));
            }
            let matching: Vec<usize> = (0..self.layers.len())
                .filter(|&i| self.layers[i].type_name() == kind)
                .collect();
            let index = match matching.as_slice() {
                [i] => *i,
                [] => {
                    return Err(config_error(format!(
                        "{name}: the configuration has no `{kind}` layer to set `{key}` on; \
                         add it to the file (environment variables cannot add layers)"
                    )))
                }
                many => {
                    return Err(config_error(format!(
                        "{name}: the configuration has {} `{kind}` layers; set `{key}` in \
                         the file instead",
                        many.len()
                    )))
                }
            };
            self.layers[index]
                .set(&format!("layers[{index}]"), &key, value)
                .map_err(|reason| config_error(format!("{name}: {reason}")))?;
        }
        Ok(self)
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
                Box::new(FailoverLayer::from_settings(s, open(&s.fallback)?))
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
// One layer's table, read by its settings type
// ---------------------------------------------------------------------------------------

/// Reads a layer's settings from its table (without `type`) and checks them.
fn read<S: LayerSettings>(path: &str, kind: &str, mut table: Table<'_>) -> Result<S, String> {
    table.secret_keys = S::URL_KEYS;
    let settings = S::deserialize(table).map_err(|e| e.describe::<S>(path, kind))?;
    check(&settings, path)?;
    Ok(settings)
}

fn check<S: LayerSettings>(settings: &S, path: &str) -> Result<(), String> {
    settings
        .check()
        .map_err(|Invalid { key, reason }| match key {
            Some(key) => format!("{path}.{key}: {reason}"),
            None => format!("{path}: {reason}"),
        })
}

/// The settings with `key` set from an environment variable: they are written out as a
/// file would hold them, `key` replaced, and read again, so an override takes exactly
/// the forms and checks a file does.
fn overlay<S: LayerSettings>(
    settings: &S,
    path: &str,
    kind: &str,
    key: &str,
    value: &str,
) -> Result<S, String> {
    let current = serde_json::to_value(settings).map_err(|e| format!("{path}: {e}"))?;
    let kept = current
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| !v.is_null() && k.as_str() != key)
        .map(|(k, v)| (k.as_str(), Raw::Json(v)));
    read(path, kind, Table::new(kept.chain([(key, Raw::Env(value))])))
}

/// The keys `deny_unknown_fields` lets through, as serde derived them from the settings
/// type: asked for by offering a key no settings type has.
fn allowed_keys<S: LayerSettings>() -> &'static [&'static str] {
    match S::deserialize(Table::new([("\0", Raw::Env(""))])) {
        Err(FieldError {
            problem: Problem::UnknownKey { allowed, .. },
            ..
        }) => allowed,
        _ => &[],
    }
}

/// One value of a layer's table: from the parsed document, or an environment
/// variable's text, which stands for any type (`"5000"` is an integer there, not in a
/// file).
#[derive(Clone, Copy)]
enum Raw<'a> {
    Json(&'a Value),
    Env(&'a str),
}

impl Raw<'_> {
    /// The value as an error shows it. A URL-valued key's value never is: it may hold a
    /// password.
    fn shown(self, secret: bool) -> String {
        match self {
            Raw::Json(v) if secret => type_of(v).to_owned(),
            Raw::Env(_) if secret => "another value".to_owned(),
            Raw::Json(Value::String(s)) => format!("\"{}\"", shown(s)),
            Raw::Env(s) => format!("\"{}\"", shown(s)),
            Raw::Json(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            Raw::Json(v) => type_of(v).to_owned(),
        }
    }
}

impl<'de> de::Deserializer<'de> for Raw<'_> {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self {
            Raw::Env(s) => visitor.visit_str(s),
            Raw::Json(Value::String(s)) => visitor.visit_str(s),
            Raw::Json(Value::Number(n)) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(n), _, _) => visitor.visit_u64(n),
                (None, Some(n), _) => visitor.visit_i64(n),
                (None, None, n) => visitor.visit_f64(n.unwrap_or(f64::NAN)),
            },
            Raw::Json(Value::Bool(b)) => visitor.visit_bool(*b),
            Raw::Json(Value::Null) => visitor.visit_unit(),
            Raw::Json(Value::Array(_)) => Err(de::Error::invalid_type(Unexpected::Seq, &visitor)),
            Raw::Json(Value::Object(_)) => Err(de::Error::invalid_type(Unexpected::Map, &visitor)),
        }
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self {
            Raw::Env(s) => match s.trim().parse() {
                Ok(n) => visitor.visit_u64(n),
                Err(_) => Err(de::Error::invalid_type(Unexpected::Str(s), &visitor)),
            },
            json => json.deserialize_any(visitor),
        }
    }

    // Said as a file writes it, not as serde's "a boolean".
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self {
            Raw::Json(Value::Bool(b)) => visitor.visit_bool(*b),
            Raw::Env(s) if s.trim().eq_ignore_ascii_case("true") => visitor.visit_bool(true),
            Raw::Env(s) if s.trim().eq_ignore_ascii_case("false") => visitor.visit_bool(false),
            _ => Err(Problem::Invalid {
                expected: "true or false".to_owned(),
                note: None,
            }
            .into()),
        }
    }

    // A key that is there has a value: `null` is refused by the value's type, not taken
    // for an unset key.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

/// A layer's table as serde sees it: a map, whose values' errors are given the key they
/// belong to and the value as it may be shown.
struct Table<'a> {
    entries: Vec<(&'a str, Raw<'a>)>,
    next: usize,
    secret_keys: &'static [&'static str],
}

impl<'a> Table<'a> {
    fn new(entries: impl IntoIterator<Item = (&'a str, Raw<'a>)>) -> Self {
        Table {
            entries: entries.into_iter().collect(),
            next: 0,
            secret_keys: &[],
        }
    }
}

impl<'de> de::Deserializer<'de> for Table<'_> {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_map(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map struct
        enum identifier ignored_any
    }
}

impl<'de> de::MapAccess<'de> for Table<'_> {
    type Error = FieldError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, FieldError> {
        let Some(&(key, _)) = self.entries.get(self.next) else {
            return Ok(None);
        };
        seed.deserialize(de::value::StrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, FieldError> {
        let (key, raw) = *self
            .entries
            .get(self.next)
            .ok_or_else(|| Problem::Other("a value asked for past the last key".to_owned()))?;
        self.next += 1;
        seed.deserialize(raw).map_err(|mut e| {
            e.key = Some(key.to_owned());
            e.got = Some(raw.shown(self.secret_keys.contains(&key)));
            e
        })
    }
}

/// What went wrong reading a layer's table, kept in serde's terms until
/// [`FieldError::describe`] says it with the key path.
#[derive(Debug)]
struct FieldError {
    problem: Problem,
    /// The key whose value was wrong.
    key: Option<String>,
    /// That value, as it may be shown.
    got: Option<String>,
}

#[derive(Debug)]
enum Problem {
    Invalid {
        expected: String,
        note: Option<String>,
    },
    UnknownKey {
        key: String,
        allowed: &'static [&'static str],
    },
    Missing(&'static str),
    Other(String),
}

impl From<Problem> for FieldError {
    fn from(problem: Problem) -> Self {
        FieldError {
            problem,
            key: None,
            got: None,
        }
    }
}

impl de::Error for FieldError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Problem::Other(message.to_string()).into()
    }

    fn invalid_type(_: Unexpected<'_>, expected: &dyn de::Expected) -> Self {
        Problem::Invalid {
            expected: expected.to_string(),
            note: None,
        }
        .into()
    }

    // The field helpers send a reason as `Unexpected::Other`; the value itself is shown
    // from the table, where it is known whether it may be.
    fn invalid_value(got: Unexpected<'_>, expected: &dyn de::Expected) -> Self {
        Problem::Invalid {
            expected: expected.to_string(),
            note: match got {
                Unexpected::Other(why) => Some(why.to_owned()),
                _ => None,
            },
        }
        .into()
    }

    fn unknown_field(key: &str, allowed: &'static [&'static str]) -> Self {
        Problem::UnknownKey {
            key: key.to_owned(),
            allowed,
        }
        .into()
    }

    fn missing_field(key: &'static str) -> Self {
        Problem::Missing(key).into()
    }
}

impl std::error::Error for FieldError {}

// Only seen if a message escapes `describe`; it names the key, never the value.
impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {:?}", self.key, self.problem)
    }
}

impl FieldError {
    /// The message for the layer at `path` of type `kind`.
    fn describe<S: LayerSettings>(self, path: &str, kind: &str) -> String {
        let at = match &self.key {
            Some(key) => format!("{path}.{key}"),
            None => path.to_owned(),
        };
        match self.problem {
            Problem::Invalid { expected, note } => {
                let got = self.got.unwrap_or_default();
                let note = note.map(|n| format!(" ({n})")).unwrap_or_default();
                format!("{at}: expected {expected}, got {got}{note}")
            }
            Problem::UnknownKey { key, allowed } => {
                let mut reason = format!(
                    "{path}: unknown key `{}` for a `{kind}` layer; allowed keys: type, {}",
                    shown(&key),
                    allowed.join(", ")
                );
                if let Some(base) = key.strip_suffix("_ms") {
                    if allowed.contains(&base) {
                        reason.push_str(&format!(
                            " (durations are strings with a unit: write {base} = \"500ms\")"
                        ));
                    }
                }
                reason
            }
            Problem::Missing(key) => format!(
                "{path}.{key} is missing: a `{kind}` layer requires it ({})",
                S::hint(key)
            ),
            Problem::Other(message) => format!("{at}: {message}"),
        }
    }
}

/// A JSON type name for error messages.
fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
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
