//! One layer's table, read by its settings type with serde, errors naming the key path.

use std::fmt;

use serde::de::{self, Unexpected, Visitor};
use serde_json::Value;

use crate::error::Result;
use crate::layer::fields::{shown, Invalid, LayerSettings};

/// Reads a layer's settings from its table (without `type`) and checks them.
pub(super) fn read<S: LayerSettings>(
    path: &str,
    kind: &str,
    mut table: Table<'_>,
) -> Result<S, String> {
    table.secret_keys = S::URL_KEYS;
    let settings = S::deserialize(table).map_err(|e| e.describe::<S>(path, kind))?;
    check(&settings, path)?;
    Ok(settings)
}

pub(super) fn check<S: LayerSettings>(settings: &S, path: &str) -> Result<(), String> {
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
pub(super) fn overlay<S: LayerSettings>(
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
pub(super) fn allowed_keys<S: LayerSettings>() -> &'static [&'static str] {
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
pub(super) enum Raw<'a> {
    Json(&'a Value),
    Env(&'a str),
}

impl Raw<'_> {
    /// The value as an error shows it. A URL-valued key's value never is: it may hold a
    /// password.
    pub(super) fn shown(self, secret: bool) -> String {
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
pub(super) struct Table<'a> {
    pub(super) entries: Vec<(&'a str, Raw<'a>)>,
    pub(super) next: usize,
    pub(super) secret_keys: &'static [&'static str],
}

impl<'a> Table<'a> {
    pub(super) fn new(entries: impl IntoIterator<Item = (&'a str, Raw<'a>)>) -> Self {
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
pub(super) struct FieldError {
    pub(super) problem: Problem,
    /// The key whose value was wrong.
    pub(super) key: Option<String>,
    /// That value, as it may be shown.
    pub(super) got: Option<String>,
}

#[derive(Debug)]
pub(super) enum Problem {
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
    pub(super) fn describe<S: LayerSettings>(self, path: &str, kind: &str) -> String {
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
pub(super) fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}
