//! What the settings types of all layers share: the way a stack file writes durations,
//! bounded integers and labels (serde helpers for their fields), and the rules a
//! settings type states about itself ([`LayerSettings`]).
//!
//! Each layer's settings type lives with its layer and derives `Deserialize` with
//! `deny_unknown_fields` and these helpers; [`crate::config`] reads the stack document,
//! picks the type by the layer's `type` and names the key path in errors.

use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeOwned, Deserializer, Unexpected, Visitor};
use serde::{Serialize, Serializer};

/// A layer's settings as a stack file writes them.
pub(crate) trait LayerSettings: Serialize + DeserializeOwned {
    /// Keys whose values are URLs: an error never echoes them, they may hold a password.
    const URL_KEYS: &'static [&'static str] = &[];

    /// What a required key holds, for the error that says it is missing.
    fn hint(_key: &str) -> &'static str {
        ""
    }

    /// The rules no single field states (one key against another), and the ranges
    /// again for settings built in code, which no deserializer has seen.
    fn check(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

/// Applies a layer's `with_*` setter for a key the settings set, so that an unset key
/// keeps the layer's own default.
pub(crate) trait WithSome: Sized {
    fn with_some<T>(self, value: Option<T>, set: impl FnOnce(Self, T) -> Self) -> Self {
        match value {
            Some(value) => set(self, value),
            None => self,
        }
    }
}

impl<L> WithSome for L {}

/// What [`LayerSettings::check`] found wrong: the key, when one key is to blame.
#[derive(Debug)]
pub(crate) struct Invalid {
    pub(crate) key: Option<&'static str>,
    pub(crate) reason: String,
}

impl Invalid {
    /// `key` is wrong.
    pub(crate) fn key(key: &'static str, reason: impl Into<String>) -> Self {
        Invalid {
            key: Some(key),
            reason: reason.into(),
        }
    }

    /// The settings are wrong as a whole.
    pub(crate) fn settings(reason: impl Into<String>) -> Self {
        Invalid {
            key: None,
            reason: reason.into(),
        }
    }
}

/// Refuses a zero duration set in code where the file refuses `"0s"`.
pub(crate) fn positive(key: &'static str, value: Option<Duration>) -> Result<(), Invalid> {
    match value {
        Some(d) if d.is_zero() => Err(Invalid::key(key, "must be more than 0, e.g. \"500ms\"")),
        _ => Ok(()),
    }
}

/// Refuses an integer set in code outside the range the file accepts.
pub(crate) fn within<T>(
    key: &'static str,
    value: Option<T>,
    min: u64,
    max: u64,
) -> Result<(), Invalid>
where
    T: Copy + TryInto<u64>,
{
    match value.map(|n| n.try_into().is_ok_and(|n| (min..=max).contains(&n))) {
        Some(false) => Err(Invalid::key(key, format!("must be from {min} to {max}"))),
        _ => Ok(()),
    }
}

/// Durations in [`parse_duration`]'s forms (`"500ms"`, `"1.5s"`, `"1m30s"`), for
/// `#[serde(with = ...)]` on a `Duration` or `Option<Duration>` field; written back in a
/// form that reads again to the nanosecond.
pub(crate) struct DurationField<const ALLOW_ZERO: bool>;

/// A duration that may be zero (`"0s"`).
pub(crate) type AnyDuration = DurationField<true>;
/// A duration of more than zero, for keys where zero means nothing sensible.
pub(crate) type PositiveDuration = DurationField<false>;

impl<const ALLOW_ZERO: bool> DurationField<ALLOW_ZERO> {
    pub(crate) fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: From<Duration>,
    {
        let visitor = DurationVisitor {
            allow_zero: ALLOW_ZERO,
        };
        d.deserialize_str(visitor).map(T::from)
    }

    pub(crate) fn serialize<S, T>(value: &T, s: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        T: Copy + Into<Option<Duration>>,
    {
        match (*value).into() {
            Some(d) => s.serialize_str(&duration_text(d)),
            None => s.serialize_none(),
        }
    }
}

/// An integer from `MIN` to `MAX`, for an `Option` field of any integer type holding
/// `MAX`.
pub(crate) fn int<'de, const MIN: u64, const MAX: u64, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let range = IntVisitor::<MIN, MAX>;
    let n = d.deserialize_u64(range)?;
    T::try_from(n)
        .map(Some)
        .map_err(|_| de::Error::invalid_value(Unexpected::Unsigned(n), &range))
}

/// A metric or log label: short, printable, not empty.
pub(crate) fn label<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: From<String>,
{
    d.deserialize_str(LabelVisitor).map(T::from)
}

struct DurationVisitor {
    allow_zero: bool,
}

impl DurationVisitor {
    /// A bare number is refused, but with the two readings spelled out; the number is
    /// written as the document's JSON form shows it (`2.0`, not `2`).
    fn bare<E: de::Error>(&self, number: impl fmt::Display) -> Result<Duration, E> {
        let why = format!("a bare number is ambiguous: write \"{number}s\" or \"{number}ms\"");
        Err(E::invalid_value(Unexpected::Other(&why), self))
    }
}

// A reason travels as `Unexpected::Other`: what was wrong with the value, which
// `config` prints after the value itself and serde_json prints as the value.
impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allow_zero {
            f.write_str("a duration such as \"500ms\", \"2s\", \"5m\" or \"1h\"")
        } else {
            f.write_str("a duration of more than 0, such as \"500ms\", \"2s\", \"5m\" or \"1h\"")
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        match parse_duration(text) {
            Ok(d) if self.allow_zero || !d.is_zero() => Ok(d),
            Ok(_) => Err(E::invalid_value(Unexpected::Str(text), &self)),
            Err(why) => Err(E::invalid_value(Unexpected::Other(&why), &self)),
        }
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
        self.bare(n)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
        self.bare(n)
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
        match serde_json::Number::from_f64(n) {
            Some(n) => self.bare(n),
            None => self.bare(n),
        }
    }
}

#[derive(Clone, Copy)]
struct IntVisitor<const MIN: u64, const MAX: u64>;

impl<const MIN: u64, const MAX: u64> Visitor<'_> for IntVisitor<MIN, MAX> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if MAX == u64::MAX || MAX == usize::MAX as u64 {
            write!(f, "an integer of at least {MIN}")
        } else {
            write!(f, "an integer from {MIN} to {MAX}")
        }
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
        if (MIN..=MAX).contains(&n) {
            Ok(n)
        } else {
            Err(E::invalid_value(Unexpected::Unsigned(n), &self))
        }
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
        }
    }
}

struct LabelVisitor;

impl Visitor<'_> for LabelVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a name of 1 to 64 printable characters")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<String, E> {
        if s.is_empty() || s.len() > 64 || s.chars().any(char::is_control) {
            return Err(E::invalid_value(Unexpected::Str(s), &self));
        }
        Ok(s.to_owned())
    }
}

/// `d` in a form [`parse_duration`] reads back to the same nanosecond.
fn duration_text(d: Duration) -> String {
    match d.subsec_nanos() {
        0 => format!("{}s", d.as_secs()),
        n if n % 1_000_000 == 0 => format!("{}ms", d.as_millis()),
        n => format!("{}.{n:09}s", d.as_secs()),
    }
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
pub fn parse_duration(text: &str) -> Result<Duration, String> {
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

/// A user-supplied word for an error message: at most 40 characters, control characters
/// escaped.
pub(crate) fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(40).flat_map(char::escape_default).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_durations_read_back_exactly() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_millis(1500),
            Duration::from_nanos(1),
            Duration::new(90, 123_456_789),
            Duration::MAX,
        ] {
            assert_eq!(parse_duration(&duration_text(d)), Ok(d), "{d:?}");
        }
    }
}
