//! Adjusting a stack configuration from `AIECS_STORAGE_*` environment variables.

use super::{config_error, StorageConfig, ENV_PREFIX, LAYER_TYPES};
use crate::error::Result;

impl StorageConfig {
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
}
