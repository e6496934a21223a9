//! Timestamps: nanoseconds since the Unix epoch inside, RFC 3339 with nine fractional digits outside.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A point in time with nanosecond precision, as `sent`, `registered` and `created` carry it.
///
/// On the wire it is an RFC 3339 string with nine fractional digits in UTC
/// (`2022-12-22T14:33:59.579746716+00:00`); any offset is accepted when parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Timestamp(Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX))
    }

    /// Nanoseconds since the Unix epoch.
    pub fn nanos(self) -> i64 {
        self.0
    }

    /// Parses an RFC 3339 timestamp with any offset; `None` if it is not one. Instants outside
    /// what nanoseconds in an `i64` hold (before 1677-09-21 or after 2262-04-11) are clamped to
    /// the nearest representable one: a client asking for "everything before 2999" means now.
    pub fn parse(text: &str) -> Option<Self> {
        let parsed = DateTime::parse_from_rfc3339(text.trim()).ok()?;
        Some(Timestamp(parsed.timestamp_nanos_opt().unwrap_or_else(|| {
            if parsed.timestamp() > 0 {
                i64::MAX
            } else {
                i64::MIN
            }
        })))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = DateTime::<Utc>::from_timestamp_nanos(self.0);
        f.write_str(&at.to_rfc3339_opts(SecondsFormat::Nanos, false))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Timestamp::parse(&text).ok_or_else(|| de::Error::custom("expected an RFC 3339 timestamp"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_nine_digits_in_utc() {
        let ts = Timestamp::parse("2022-12-22T14:33:59.579746716+08:00").unwrap();
        assert_eq!(ts.to_string(), "2022-12-22T06:33:59.579746716+00:00");
        let round = Timestamp(1_000_000_000);
        assert_eq!(round.to_string(), "1970-01-01T00:00:01.000000000+00:00");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Timestamp::parse("yesterday"), None);
        assert_eq!(Timestamp::parse(""), None);
        assert_eq!(Timestamp::parse("99999-01-01T00:00:00Z"), None);
    }

    #[test]
    fn clamps_what_nanoseconds_cannot_hold() {
        assert_eq!(
            Timestamp::parse("2999-01-01T00:00:00Z"),
            Some(Timestamp(i64::MAX))
        );
        assert_eq!(
            Timestamp::parse("9999-12-31T23:59:59+14:00"),
            Some(Timestamp(i64::MAX))
        );
        assert_eq!(
            Timestamp::parse("1000-01-01T00:00:00Z"),
            Some(Timestamp(i64::MIN))
        );
        assert_eq!(
            Timestamp::parse("2262-04-11T23:47:16.854775807Z"),
            Some(Timestamp(i64::MAX))
        );
        assert!(Timestamp::parse("2262-04-11T00:00:00Z").unwrap().0 < i64::MAX);
    }
}
