//! Durations in the event log and the records as JSON numbers of milliseconds (fields named
//! `*_ms`): what an operator's tools (jq, a dashboard, the page) read without parsing
//! `"51ms 75us 132ns"`. Configs keep human strings (`"30s"`).
//!
//! A duration is written as `nanoseconds / 1e6` in the shortest form that reads back to the
//! same `f64` (`51.075132`, `1500.0`), and read back rounded to the nanosecond: exact for
//! every duration below 2^50 ns (13 days) and for every whole number of milliseconds below
//! 2^53 ms; beyond that, within the `f64`'s 16 significant digits. Reading also takes the
//! humantime strings of earlier versions (`"51ms 75us"`), so that event logs stored before
//! this format read as they were written. A number below zero (or not a number) is an
//! error, not a panic; one past [`Duration::MAX`] (infinity included, which JSON cannot
//! hold anyway) reads as `MAX`.

use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Milliseconds of `d` as an `f64`.
pub(crate) fn of(d: Duration) -> f64 {
    // Whole milliseconds (exact below 2^53) plus the fraction, so that whole milliseconds
    // stay exact at any size a double holds them.
    d.as_millis() as f64 + f64::from(d.subsec_nanos() % 1_000_000) / 1e6
}

/// The duration of `ms` milliseconds, rounded to the nanosecond; `None` if `ms` is
/// negative or not a number. Past [`Duration::MAX`]: `MAX`.
pub(crate) fn from(ms: f64) -> Option<Duration> {
    if ms.is_nan() || ms < 0.0 {
        return None;
    }
    // 2^64: `u64::MAX as f64` rounds up to it; anything below fits a u64.
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    let whole = ms.trunc();
    if whole < TWO_64 {
        // Whole milliseconds in integers (exact), the fraction (exact too) to the nanosecond.
        let whole = whole as u64;
        let frac = ((ms - whole as f64) * 1e6).round() as u64;
        let d = Duration::from_millis(whole).checked_add(Duration::from_nanos(frac));
        return Some(d.unwrap_or(Duration::MAX));
    }
    let secs = (ms / 1e3).trunc();
    if secs >= TWO_64 {
        return Some(Duration::MAX);
    }
    let sub = ((ms - secs * 1e3) * 1e6).round().clamp(0.0, 999_999_999.0);
    Some(Duration::new(secs as u64, sub as u32))
}

/// Serializes `d` as milliseconds (for `#[serde(with = "crate::millis")]`).
pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(of(*d))
}

/// Reads milliseconds, or an earlier version's humantime string.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(Millis)
}

/// `Option<Duration>` as milliseconds or `null` (for `#[serde(with = "crate::millis::option")]`).
pub(crate) mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&super::of(*d)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super")] Duration);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(d)| d))
    }
}

struct Millis;

impl Visitor<'_> for Millis {
    type Value = Duration;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a duration in milliseconds (a number at least 0)")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        from(v).ok_or_else(|| E::invalid_value(de::Unexpected::Float(v), &self))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        // Whole milliseconds: exact, saturated past `MAX`.
        Ok(Duration::from_secs(v / 1000)
            .checked_add(Duration::from_millis(v % 1000))
            .unwrap_or(Duration::MAX))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            .and_then(|v| self.visit_u64(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        humantime::parse_duration(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct T {
        #[serde(with = "super")]
        d_ms: Duration,
    }

    fn back(d: Duration) -> Duration {
        let text = serde_json::to_string(&T { d_ms: d }).expect("write");
        serde_json::from_str::<T>(&text).expect("read").d_ms
    }

    #[test]
    fn numbers_of_milliseconds_and_earlier_strings_read() {
        let read = |s: &str| serde_json::from_str::<T>(s).map(|t| t.d_ms);
        assert_eq!(
            serde_json::to_string(&T {
                d_ms: Duration::from_nanos(51_075_132)
            })
            .expect("write"),
            r#"{"d_ms":51.075132}"#
        );
        assert_eq!(
            read(r#"{"d_ms":1500}"#).ok(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            read(r#"{"d_ms":0.001}"#).ok(),
            Some(Duration::from_micros(1))
        );
        assert_eq!(
            read(r#"{"d_ms":"51ms 75us 132ns"}"#).ok(),
            Some(Duration::from_nanos(51_075_132))
        );
        assert_eq!(read(r#"{"d_ms":1e300}"#).ok(), Some(Duration::MAX));
        assert_eq!(
            read(r#"{"d_ms":18446744073709551615}"#).ok(),
            Some(Duration::new(18_446_744_073_709_551, 615_000_000))
        );
        for bad in [
            r#"{"d_ms":-1}"#,
            r#"{"d_ms":-0.5}"#,
            r#"{"d_ms":"soon"}"#,
            r#"{"d_ms":true}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        assert_eq!(back(Duration::MAX), Duration::MAX);
        assert_eq!(back(Duration::ZERO), Duration::ZERO);
    }

    proptest! {
        #[test]
        fn below_two_to_the_fifty_nanoseconds_every_duration_reads_back_exactly(
            nanos in 0u64..(1 << 50),
        ) {
            let d = Duration::from_nanos(nanos);
            prop_assert_eq!(back(d), d);
        }

        #[test]
        fn whole_milliseconds_read_back_exactly(ms in 0u64..(1 << 53)) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(back(d), d);
        }

        #[test]
        fn any_duration_reads_back_within_the_precision_of_a_double(
            secs in any::<u64>(),
            nanos in 0u32..1_000_000_000,
        ) {
            let d = Duration::new(secs, nanos);
            let b = back(d);
            let diff = b.abs_diff(d);
            // 2^-52 relative, and a nanosecond of rounding.
            let bound = d.as_secs_f64() * 2f64.powi(-50) + 1e-9;
            prop_assert!(diff.as_secs_f64() <= bound, "{:?} -> {:?}", d, b);
        }
    }
}
