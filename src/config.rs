//! Opening a backend from a URL (the spec's StorageFactory and StorageType), and building
//! a whole stack of layers from a configuration file.
//!
//! - [`open`]: one backend from a URL.
//! - [`StorageConfig`]: a backend URL and an ordered list of [`LayerConfig`]s, read from
//!   TOML ([`StorageConfig::from_toml_str`], [`StorageConfig::from_file`]) or any serde
//!   format, adjusted by environment variables ([`StorageConfig::with_env_overrides`]),
//!   and built into an `Arc<dyn StorageBackend>` ([`StorageConfig::build`]).

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::{Result, StorageError};
use crate::layer::{
    BatchLayer, CacheLayer, DynLayer, FailoverLayer, LoggingLayer, MetricsLayer, RetryLayer,
    StackBuilder, TimeoutLayer,
};
use crate::redact::{redact_url, scrub};
use crate::storage::StorageBackend;

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

/// The layer types a [`LayerConfig`] can name, in the order error messages list them.
pub const LAYER_TYPES: [&str; 7] = [
    "cache", "retry", "timeout", "batch", "failover", "metrics", "logging",
];

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

/// One layer of a [`StorageConfig`], with its settings. In TOML, a `[[layers]]` table
/// whose `type` key names the variant (`cache`, `retry`, `timeout`, `batch`,
/// `failover`, `metrics` or `logging`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum LayerConfig {
    /// `type = "cache"`: a [`CacheLayer`].
    Cache(CacheSettings),
    /// `type = "retry"`: a [`RetryLayer`].
    Retry(RetrySettings),
    /// `type = "timeout"`: a [`TimeoutLayer`].
    Timeout(TimeoutSettings),
    /// `type = "batch"`: a [`BatchLayer`].
    Batch(BatchSettings),
    /// `type = "failover"`: a [`FailoverLayer`] whose fallback is opened from a URL.
    Failover(FailoverSettings),
    /// `type = "metrics"`: a [`MetricsLayer`].
    Metrics(MetricsSettings),
    /// `type = "logging"`: a [`LoggingLayer`].
    Logging(LoggingSettings),
}

/// Settings of a `cache` layer ([`CacheLayer`]); unset keys keep its defaults (10 000
/// entries, 5 minutes time to live, a 30 s unknown-outcome window).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheSettings {
    /// `max_entries`: bound by number of entries (at least 1). Not with `max_bytes`.
    pub max_entries: Option<u64>,
    /// `max_bytes`: bound by estimated size in bytes (at least 1). Not with
    /// `max_entries`.
    pub max_bytes: Option<u64>,
    /// `time_to_live`: how long an entry is kept after it was loaded (more than 0).
    pub time_to_live: Option<Duration>,
    /// `time_to_idle`: how long an entry is kept without being read (more than 0).
    pub time_to_idle: Option<Duration>,
    /// `unknown_outcome_window`: how long reads of a session or thread bypass the cache
    /// after a write to it ended with its outcome unknown (`"0s"`: not at all).
    pub unknown_outcome_window: Option<Duration>,
}

/// Settings of a `retry` layer ([`RetryLayer`]); unset keys keep its defaults (3
/// attempts, 10 ms to 1 s delays, 10 s in all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetrySettings {
    /// `max_attempts`: runs of a call at most, the first included (1 to 100).
    pub max_attempts: Option<usize>,
    /// `min_delay`: the first backoff delay.
    pub min_delay: Option<Duration>,
    /// `max_delay`: the longest backoff delay.
    pub max_delay: Option<Duration>,
    /// `max_elapsed`: no attempt starts after this.
    pub max_elapsed: Option<Duration>,
    /// `retry_non_idempotent`: also retry counter increments after ambiguous failures.
    pub retry_non_idempotent: Option<bool>,
}

/// Settings of a `timeout` layer ([`TimeoutLayer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeoutSettings {
    /// `timeout` (required): the deadline of each operation (more than 0).
    pub timeout: Duration,
}

/// Settings of a `batch` layer ([`BatchLayer`]); unset keys keep its defaults (128
/// items, 2 ms linger, 10 000 queued).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchSettings {
    /// `max_batch`: items per batch at most (1 to 10 000).
    pub max_batch: Option<usize>,
    /// `linger`: how long the first item waits for others (may be `"0s"`).
    pub linger: Option<Duration>,
    /// `max_queue`: items that may wait at most (1 to 16 777 216).
    pub max_queue: Option<usize>,
}

/// Settings of a `failover` layer ([`FailoverLayer`]); unset keys keep its defaults (5
/// failures open the breaker for 10 s, a primary call past 1 s counts as failed, 10 000
/// writes wait for replay). `Debug` shows the
/// fallback URL without its password.
#[derive(Clone, PartialEq, Eq)]
pub struct FailoverSettings {
    /// `fallback` (required): the fallback backend's URL, in any form [`open`] takes.
    pub fallback: String,
    /// `failure_threshold`: consecutive transient primary failures that open the breaker
    /// (at least 1).
    pub failure_threshold: Option<u32>,
    /// `cooldown`: how long an open breaker keeps the primary out before probing it.
    pub cooldown: Option<Duration>,
    /// `max_pending`: writes that may wait for replay before new ones are refused.
    pub max_pending: Option<usize>,
    /// `primary_timeout`: the deadline of each call to the primary, past which it counts
    /// as failed (`"0s"`: no deadline of its own).
    pub primary_timeout: Option<Duration>,
}

impl fmt::Debug for FailoverSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverSettings")
            .field("fallback", &redact_url(&self.fallback))
            .field("failure_threshold", &self.failure_threshold)
            .field("cooldown", &self.cooldown)
            .field("max_pending", &self.max_pending)
            .field("primary_timeout", &self.primary_timeout)
            .finish()
    }
}

/// Settings of a `metrics` layer ([`MetricsLayer`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSettings {
    /// `backend_label`: the `backend` label of every metric (default: the backend's
    /// kind). A bounded name such as `primary`, never an id.
    pub backend_label: Option<String>,
}

/// Settings of a `logging` layer ([`LoggingLayer`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoggingSettings {
    /// `backend_label`: the `db.system.name` of every event (default: the backend's
    /// kind).
    pub backend_label: Option<String>,
    /// `slow_threshold`: successful calls at least this slow are logged at `WARN`
    /// (default 100 ms).
    pub slow_threshold: Option<Duration>,
}

const TOP_KEYS: &[&str] = &["url", "layers"];
const CACHE_KEYS: &[&str] = &[
    "max_entries",
    "max_bytes",
    "time_to_live",
    "time_to_idle",
    "unknown_outcome_window",
];
const RETRY_KEYS: &[&str] = &[
    "max_attempts",
    "min_delay",
    "max_delay",
    "max_elapsed",
    "retry_non_idempotent",
];
const TIMEOUT_KEYS: &[&str] = &["timeout"];
const BATCH_KEYS: &[&str] = &["max_batch", "linger", "max_queue"];
const FAILOVER_KEYS: &[&str] = &[
    "fallback",
    "failure_threshold",
    "cooldown",
    "max_pending",
    "primary_timeout",
];
const METRICS_KEYS: &[&str] = &["backend_label"];
const LOGGING_KEYS: &[&str] = &["backend_label", "slow_threshold"];
/// Keys whose values are URLs: never echoed in an error.
const URL_KEYS: &[&str] = &["url", "fallback"];

/// Largest `max_attempts` accepted.
const MAX_ATTEMPTS: u64 = 100;
/// Largest `max_queue` accepted: the batching layer's own bound.
const MAX_QUEUE: u64 = crate::layer::BATCH_MAX_QUEUE as u64;

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
            let path = format!("layers[{index}]");
            let field = Field {
                path: &path,
                key: &key,
                raw: Raw::Env(value),
            };
            let layer = &mut self.layers[index];
            layer
                .set(&field)
                .and_then(|()| layer.check(&path))
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

    fn from_value(value: &Value) -> std::result::Result<Self, String> {
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
                .collect::<std::result::Result<_, _>>()?,
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
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
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

fn check_url(key: &str, url: &str) -> std::result::Result<(), String> {
    if url.trim().is_empty() || !url.contains(':') {
        return Err(format!(
            "{key}: expected a backend URL such as \"memory://\", \"sqlite://data.db\", \
             \"redis://host:6379\" or \"postgres://user@host/db\""
        ));
    }
    Ok(())
}

impl LayerConfig {
    /// The layer's `type` name: `cache`, `retry`, `timeout`, `batch`, `failover`,
    /// `metrics` or `logging`.
    pub fn type_name(&self) -> &'static str {
        match self {
            LayerConfig::Cache(_) => "cache",
            LayerConfig::Retry(_) => "retry",
            LayerConfig::Timeout(_) => "timeout",
            LayerConfig::Batch(_) => "batch",
            LayerConfig::Failover(_) => "failover",
            LayerConfig::Metrics(_) => "metrics",
            LayerConfig::Logging(_) => "logging",
        }
    }

    /// The keys a layer of this type accepts (besides `type`).
    pub fn allowed_keys(&self) -> &'static [&'static str] {
        keys_of(self.type_name())
    }

    /// The configured layer, ready for a [`StackBuilder`]. A `failover` layer opens its
    /// fallback with [`open`] (nothing connects yet); its URL errors are returned.
    pub fn layer(&self) -> Result<Box<dyn DynLayer>> {
        Ok(match self {
            LayerConfig::Cache(s) => {
                let mut layer = CacheLayer::new();
                if let Some(n) = s.max_entries {
                    layer = layer.with_max_entries(n);
                }
                if let Some(n) = s.max_bytes {
                    layer = layer.with_max_bytes(n);
                }
                if let Some(d) = s.time_to_live {
                    layer = layer.with_time_to_live(d);
                }
                if let Some(d) = s.unknown_outcome_window {
                    layer = layer.with_unknown_outcome_window(d);
                }
                if let Some(d) = s.time_to_idle {
                    layer = layer.with_time_to_idle(d);
                }
                Box::new(layer)
            }
            LayerConfig::Retry(s) => {
                let mut layer = RetryLayer::new();
                if let Some(n) = s.max_attempts {
                    layer = layer.with_max_attempts(n);
                }
                if let Some(d) = s.min_delay {
                    layer = layer.with_min_delay(d);
                }
                if let Some(d) = s.max_delay {
                    layer = layer.with_max_delay(d);
                }
                if let Some(d) = s.max_elapsed {
                    layer = layer.with_max_elapsed(d);
                }
                if let Some(b) = s.retry_non_idempotent {
                    layer = layer.with_retry_non_idempotent(b);
                }
                Box::new(layer)
            }
            LayerConfig::Timeout(s) => Box::new(TimeoutLayer::new(s.timeout)),
            LayerConfig::Batch(s) => {
                let mut layer = BatchLayer::new();
                if let Some(n) = s.max_batch {
                    layer = layer.with_max_batch(n);
                }
                if let Some(d) = s.linger {
                    layer = layer.with_linger(d);
                }
                if let Some(n) = s.max_queue {
                    layer = layer.with_max_queue(n);
                }
                Box::new(layer)
            }
            LayerConfig::Failover(s) => {
                let mut layer = FailoverLayer::new(open(&s.fallback)?);
                if let Some(n) = s.failure_threshold {
                    layer = layer.with_failure_threshold(n);
                }
                if let Some(d) = s.cooldown {
                    layer = layer.with_cooldown(d);
                }
                if let Some(d) = s.primary_timeout {
                    layer = layer.with_primary_timeout((!d.is_zero()).then_some(d));
                }
                if let Some(n) = s.max_pending {
                    layer = layer.with_max_pending(n);
                }
                Box::new(layer)
            }
            LayerConfig::Metrics(s) => {
                let mut layer = MetricsLayer::new();
                if let Some(label) = &s.backend_label {
                    layer = layer.with_backend_label(label.clone());
                }
                Box::new(layer)
            }
            LayerConfig::Logging(s) => {
                let mut layer = LoggingLayer::new();
                if let Some(label) = &s.backend_label {
                    layer = layer.with_backend_label(label.clone());
                }
                if let Some(d) = s.slow_threshold {
                    layer = layer.with_slow_threshold(d);
                }
                Box::new(layer)
            }
        })
    }

    fn from_value(path: &str, value: &Value) -> std::result::Result<Self, String> {
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
        let mut layer = LayerConfig::empty(kind).ok_or_else(|| {
            format!(
                "{path}.type: unknown layer type `{}`; allowed types: {}",
                shown(kind),
                LAYER_TYPES.join(", ")
            )
        })?;
        let mut seen = BTreeSet::new();
        for (key, value) in table.iter().filter(|(k, _)| k.as_str() != "type") {
            layer.set(&Field {
                path,
                key,
                raw: Raw::Json(value),
            })?;
            seen.insert(key.as_str());
        }
        for required in layer.required_keys() {
            if !seen.contains(required) {
                return Err(format!(
                    "{path}.{required} is missing: a `{}` layer requires it ({})",
                    layer.type_name(),
                    layer.hint(required)
                ));
            }
        }
        layer.check(path)?;
        Ok(layer)
    }

    /// A layer of `kind` with every key unset (required keys hold placeholders that
    /// `from_value` replaces or rejects).
    fn empty(kind: &str) -> Option<Self> {
        Some(match kind {
            "cache" => LayerConfig::Cache(CacheSettings::default()),
            "retry" => LayerConfig::Retry(RetrySettings::default()),
            "timeout" => LayerConfig::Timeout(TimeoutSettings {
                timeout: Duration::ZERO,
            }),
            "batch" => LayerConfig::Batch(BatchSettings::default()),
            "failover" => LayerConfig::Failover(FailoverSettings {
                fallback: String::new(),
                failure_threshold: None,
                cooldown: None,
                max_pending: None,
                primary_timeout: None,
            }),
            "metrics" => LayerConfig::Metrics(MetricsSettings::default()),
            "logging" => LayerConfig::Logging(LoggingSettings::default()),
            _ => return None,
        })
    }

    fn required_keys(&self) -> &'static [&'static str] {
        match self {
            LayerConfig::Timeout(_) => &["timeout"],
            LayerConfig::Failover(_) => &["fallback"],
            _ => &[],
        }
    }

    fn hint(&self, key: &str) -> &'static str {
        match key {
            "fallback" => "the fallback backend's URL, e.g. \"sqlite://fallback.db\"",
            _ => "a duration such as \"500ms\" or \"2s\"",
        }
    }

    /// Sets one key from a file or an environment variable.
    fn set(&mut self, f: &Field<'_>) -> std::result::Result<(), String> {
        match self {
            LayerConfig::Cache(s) => match f.key {
                "max_entries" => s.max_entries = Some(f.integer(1, u64::MAX)?),
                "max_bytes" => s.max_bytes = Some(f.integer(1, u64::MAX)?),
                "time_to_live" => s.time_to_live = Some(f.duration(false)?),
                "time_to_idle" => s.time_to_idle = Some(f.duration(false)?),
                "unknown_outcome_window" => s.unknown_outcome_window = Some(f.duration(true)?),
                _ => return Err(f.unknown("cache", CACHE_KEYS)),
            },
            LayerConfig::Retry(s) => match f.key {
                "max_attempts" => s.max_attempts = Some(f.integer(1, MAX_ATTEMPTS)? as usize),
                "min_delay" => s.min_delay = Some(f.duration(true)?),
                "max_delay" => s.max_delay = Some(f.duration(true)?),
                "max_elapsed" => s.max_elapsed = Some(f.duration(true)?),
                "retry_non_idempotent" => s.retry_non_idempotent = Some(f.boolean()?),
                _ => return Err(f.unknown("retry", RETRY_KEYS)),
            },
            LayerConfig::Timeout(s) => match f.key {
                "timeout" => s.timeout = f.duration(false)?,
                _ => return Err(f.unknown("timeout", TIMEOUT_KEYS)),
            },
            LayerConfig::Batch(s) => match f.key {
                "max_batch" => {
                    s.max_batch = Some(f.integer(1, crate::validate::MAX_LIMIT as u64)? as usize)
                }
                "linger" => s.linger = Some(f.duration(true)?),
                "max_queue" => s.max_queue = Some(f.integer(1, MAX_QUEUE)? as usize),
                _ => return Err(f.unknown("batch", BATCH_KEYS)),
            },
            LayerConfig::Failover(s) => match f.key {
                "fallback" => {
                    let url = f.string()?;
                    check_url(&format!("{}.fallback", f.path), &url)?;
                    s.fallback = url;
                }
                "failure_threshold" => {
                    s.failure_threshold = Some(f.integer(1, u64::from(u32::MAX))? as u32)
                }
                "cooldown" => s.cooldown = Some(f.duration(true)?),
                "max_pending" => s.max_pending = Some(f.integer(0, usize::MAX as u64)? as usize),
                "primary_timeout" => s.primary_timeout = Some(f.duration(true)?),
                _ => return Err(f.unknown("failover", FAILOVER_KEYS)),
            },
            LayerConfig::Metrics(s) => match f.key {
                "backend_label" => s.backend_label = Some(f.label()?),
                _ => return Err(f.unknown("metrics", METRICS_KEYS)),
            },
            LayerConfig::Logging(s) => match f.key {
                "backend_label" => s.backend_label = Some(f.label()?),
                "slow_threshold" => s.slow_threshold = Some(f.duration(true)?),
                _ => return Err(f.unknown("logging", LOGGING_KEYS)),
            },
        }
        Ok(())
    }

    /// Checks the rules that involve several keys, or values set in code.
    fn check(&self, path: &str) -> std::result::Result<(), String> {
        let positive = |key: &str, d: Duration| {
            if d.is_zero() {
                Err(format!("{path}.{key}: must be more than 0, e.g. \"500ms\""))
            } else {
                Ok(())
            }
        };
        match self {
            LayerConfig::Cache(s) => {
                if s.max_entries.is_some() && s.max_bytes.is_some() {
                    return Err(format!(
                        "{path}: set `max_entries` or `max_bytes`, not both (a cache has one \
                         bound)"
                    ));
                }
                if s.max_entries == Some(0) || s.max_bytes == Some(0) {
                    return Err(format!("{path}: a cache bound must be at least 1"));
                }
                if let Some(d) = s.time_to_live {
                    positive("time_to_live", d)?;
                }
                if let Some(d) = s.time_to_idle {
                    positive("time_to_idle", d)?;
                }
            }
            LayerConfig::Retry(s) => {
                if let Some(n) = s.max_attempts {
                    if n == 0 || n as u64 > MAX_ATTEMPTS {
                        return Err(format!(
                            "{path}.max_attempts: must be from 1 to {MAX_ATTEMPTS}"
                        ));
                    }
                }
                if let (Some(min), Some(max)) = (s.min_delay, s.max_delay) {
                    if min > max {
                        return Err(format!(
                            "{path}: min_delay ({min:?}) is longer than max_delay ({max:?})"
                        ));
                    }
                }
            }
            LayerConfig::Timeout(s) => positive("timeout", s.timeout)?,
            LayerConfig::Batch(s) => {
                if let Some(n) = s.max_batch {
                    if n == 0 || n > crate::validate::MAX_LIMIT {
                        return Err(format!(
                            "{path}.max_batch: must be from 1 to {}",
                            crate::validate::MAX_LIMIT
                        ));
                    }
                }
                if let Some(n) = s.max_queue {
                    if n == 0 || n as u64 > MAX_QUEUE {
                        return Err(format!("{path}.max_queue: must be from 1 to {MAX_QUEUE}"));
                    }
                }
            }
            LayerConfig::Failover(s) => {
                check_url(&format!("{path}.fallback"), &s.fallback)?;
                if s.failure_threshold == Some(0) {
                    return Err(format!("{path}.failure_threshold: must be at least 1"));
                }
            }
            LayerConfig::Metrics(_) | LayerConfig::Logging(_) => {}
        }
        Ok(())
    }
}

fn keys_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "cache" => CACHE_KEYS,
        "retry" => RETRY_KEYS,
        "timeout" => TIMEOUT_KEYS,
        "batch" => BATCH_KEYS,
        "failover" => FAILOVER_KEYS,
        "metrics" => METRICS_KEYS,
        "logging" => LOGGING_KEYS,
        _ => &[],
    }
}

/// Where a value comes from: a parsed document, or an environment variable's text.
enum Raw<'a> {
    Json(&'a Value),
    Env(&'a str),
}

/// One `key = value` of a layer, with the path used in its errors.
struct Field<'a> {
    path: &'a str,
    key: &'a str,
    raw: Raw<'a>,
}

impl Field<'_> {
    fn fail(&self, expected: &str) -> String {
        let got = if URL_KEYS.contains(&self.key) {
            match &self.raw {
                Raw::Json(v) => type_of(v).to_owned(),
                Raw::Env(_) => "another value".to_owned(),
            }
        } else {
            match &self.raw {
                Raw::Json(Value::String(s)) => format!("\"{}\"", shown(s)),
                Raw::Env(s) => format!("\"{}\"", shown(s)),
                Raw::Json(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                Raw::Json(v) => type_of(v).to_owned(),
            }
        };
        format!("{}.{}: expected {expected}, got {got}", self.path, self.key)
    }

    fn unknown(&self, kind: &str, allowed: &[&str]) -> String {
        let mut reason = format!(
            "{}: unknown key `{}` for a `{kind}` layer; allowed keys: type, {}",
            self.path,
            shown(self.key),
            allowed.join(", ")
        );
        if let Some(base) = self.key.strip_suffix("_ms") {
            if allowed.contains(&base) {
                reason.push_str(&format!(
                    " (durations are strings with a unit: write {base} = \"500ms\")"
                ));
            }
        }
        reason
    }

    fn integer(&self, min: u64, max: u64) -> std::result::Result<u64, String> {
        let expected = if max == u64::MAX || max == usize::MAX as u64 {
            format!("an integer of at least {min}")
        } else {
            format!("an integer from {min} to {max}")
        };
        let n = match &self.raw {
            Raw::Json(Value::Number(n)) => n.as_u64(),
            Raw::Env(s) => s.trim().parse::<u64>().ok(),
            Raw::Json(_) => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.fail(&expected)),
        }
    }

    fn duration(&self, allow_zero: bool) -> std::result::Result<Duration, String> {
        let expected = if allow_zero {
            "a duration such as \"500ms\", \"2s\", \"5m\" or \"1h\""
        } else {
            "a duration of more than 0, such as \"500ms\", \"2s\", \"5m\" or \"1h\""
        };
        let text = match &self.raw {
            Raw::Json(Value::String(s)) => s.as_str(),
            Raw::Env(s) => s,
            Raw::Json(n @ Value::Number(_)) => {
                return Err(format!(
                    "{} (a bare number is ambiguous: write \"{n}s\" or \"{n}ms\")",
                    self.fail(expected)
                ))
            }
            Raw::Json(_) => return Err(self.fail(expected)),
        };
        match parse_duration(text) {
            Ok(d) if allow_zero || !d.is_zero() => Ok(d),
            Ok(_) => Err(self.fail(expected)),
            Err(why) => Err(format!("{} ({why})", self.fail(expected))),
        }
    }

    fn boolean(&self) -> std::result::Result<bool, String> {
        match &self.raw {
            Raw::Json(Value::Bool(b)) => Ok(*b),
            Raw::Env(s) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
            Raw::Env(s) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
            _ => Err(self.fail("true or false")),
        }
    }

    fn string(&self) -> std::result::Result<String, String> {
        match &self.raw {
            Raw::Json(Value::String(s)) => Ok(s.clone()),
            Raw::Env(s) => Ok((*s).to_owned()),
            Raw::Json(_) => Err(self.fail("a string")),
        }
    }

    /// A metric or log label: short, printable, not empty.
    fn label(&self) -> std::result::Result<String, String> {
        let expected = "a name of 1 to 64 printable characters";
        let s = self.string().map_err(|_| self.fail(expected))?;
        if s.is_empty() || s.len() > 64 || s.chars().any(char::is_control) {
            return Err(self.fail(expected));
        }
        Ok(s)
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

/// A user-supplied word for an error message: at most 40 characters, control characters
/// escaped.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(40).flat_map(char::escape_default).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// Parses a duration written with units: `"500ms"`, `"2s"`, `"5m"`, `"1h"`, `"1d"`,
/// decimals (`"1.5s"`) and sums (`"1m30s"`, `"1h 30m"`); a space may separate a number
/// from its unit. Units: `ms`, `s`, `m`, `h`, `d`.
///
/// ```
/// use std::time::Duration;
/// use aiecs_storage::config::parse_duration;
/// assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
/// assert!(parse_duration("90").is_err());
/// ```
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    const UNITS: &str = "units: ms, s, m, h, d";
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty duration; {UNITS}"));
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let tail = tail.trim_start();
        let letters = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(letters);
        if number.is_empty() {
            return Err(format!("expected a number before `{}`", shown(unit)));
        }
        let unit_nanos: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            "" => return Err(format!("`{}` has no unit; {UNITS}", shown(number))),
            other => return Err(format!("unknown unit `{}`; {UNITS}", shown(other))),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return Err(format!("`{}` is not a number", shown(number)));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| "number too large".to_owned())?
        };
        let mut nanos = whole
            .checked_mul(unit_nanos)
            .ok_or_else(|| "duration too large".to_owned())?;
        if !fraction.is_empty() {
            let digits = fraction.len().min(18);
            let scale = 10u128.pow(digits as u32);
            let fraction: u128 = fraction[..digits]
                .parse()
                .map_err(|_| format!("`{}` is not a number", shown(number)))?;
            nanos += fraction * unit_nanos / scale;
        }
        total = total
            .checked_add(nanos)
            .ok_or_else(|| "duration too large".to_owned())?;
        rest = tail.trim_start();
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| "duration too large")?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
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
