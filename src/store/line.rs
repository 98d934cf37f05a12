//! Event lines: one event of an `event_chunks` row (SQLite and PostgreSQL alike) as a line
//! of JSON, and back.
//!
//! A line leaves out the session and harvester ids, which the row and the session already
//! hold (a third of the bytes of an event):
//! `{"seq":..,"at":"..","kind":"..",<the kind's fields>}`, the bytes a struct of `seq`,
//! `at` and the `#[serde(flatten)]`ed kind serializes to (a test holds them equal).
//!
//! Every resource writes two or more events, so their lines are written by hand: through
//! serde, an internally tagged enum goes through its map machinery, a time is formatted
//! through `core::fmt`, and (when durations were humantime strings) a duration through
//! `core::fmt` into a temporary string. Together that was an eighth of a durable session's instructions, on
//! the runtime threads. The per-session kinds, rare, still go through serde.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};

use crate::error::StoreError;
use crate::events::{EventKind, SessionEvent};
use crate::model::{HarvesterId, ResourceId, SessionId};

/// The line of `e`.
#[cfg(test)]
pub(crate) fn event_line(e: &SessionEvent) -> serde_json::Result<String> {
    let mut line = Vec::with_capacity(128);
    write_event_line(&mut line, e)?;
    String::from_utf8(line).map_err(|e| serde::ser::Error::custom(e.to_string()))
}

/// Appends the line of `e` to `out` (nothing if it fails). What it appends is UTF-8.
pub(crate) fn write_event_line(out: &mut Vec<u8>, e: &SessionEvent) -> serde_json::Result<()> {
    let start = out.len();
    let written = Line(out).event(e);
    if written.is_err() {
        out.truncate(start);
    }
    written
}

impl Line<'_> {
    fn event(&mut self, e: &SessionEvent) -> serde_json::Result<()> {
        let line = self;
        line.raw("{\"seq\":");
        line.uint(e.seq);
        line.raw(",\"at\":\"");
        line.time(&e.at);
        line.raw("\"");
        if !line.worker_kind(&e.kind)? {
            let ours = line.0.len();
            serde_json::to_writer(&mut *line.0, &e.kind)?;
            // An internally tagged enum is a JSON object: its entries follow ours.
            if line.0.get(ours..) == Some(b"{}") {
                line.0.truncate(ours);
                line.0.push(b'}');
            } else if let Some(open) = line.0.get_mut(ours) {
                *open = b',';
            }
        }
        Ok(())
    }
}

/// A line being written. Everything written is UTF-8: ASCII of our own, and strings
/// through serde_json.
struct Line<'a>(&'a mut Vec<u8>);

impl Line<'_> {
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    /// `v` in decimal.
    fn uint(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        for d in digits.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            start -= 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.0
            .extend_from_slice(digits.get(start..).unwrap_or_default());
    }

    /// `v` in decimal, zero-padded to `width` digits (`v` has at most `width`).
    fn padded(&mut self, mut v: u32, width: usize) {
        let mut digits = [b'0'; 9];
        let width = width.min(digits.len());
        for d in digits.iter_mut().take(width).rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        self.0
            .extend_from_slice(digits.get(..width).unwrap_or_default());
    }

    /// A JSON string.
    fn string(&mut self, s: &str) -> serde_json::Result<()> {
        serde_json::to_writer(&mut *self.0, s)
    }

    /// `at` as RFC 3339 in UTC with `Z` and as many fractional digits as it needs (0, 3, 6
    /// or 9): chrono's `to_rfc3339_opts(SecondsFormat::AutoSi, true)`, which is also what
    /// its `Serialize` writes.
    fn time(&mut self, at: &DateTime<Utc>) {
        // The naive parts once: each accessor of a `DateTime` adds its offset again.
        let (date, time) = (at.date_naive(), at.time());
        let Ok(year @ 0..=9999) = u32::try_from(date.year()) else {
            // Signed and wider: chrono knows how.
            let _ = write!(
                Utf8Writer(self.0),
                "{}",
                at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
            return;
        };
        self.padded(year, 4);
        self.raw("-");
        self.padded(date.month(), 2);
        self.raw("-");
        self.padded(date.day(), 2);
        self.raw("T");
        self.padded(time.hour(), 2);
        self.raw(":");
        self.padded(time.minute(), 2);
        self.raw(":");
        let (mut second, mut nanos) = (time.second(), time.nanosecond());
        if nanos >= 1_000_000_000 {
            // A leap second: chrono keeps it in the nanoseconds and writes second 60.
            second += 1;
            nanos -= 1_000_000_000;
        }
        self.padded(second, 2);
        if nanos == 0 {
        } else if nanos % 1_000_000 == 0 {
            self.raw(".");
            self.padded(nanos / 1_000_000, 3);
        } else if nanos % 1_000 == 0 {
            self.raw(".");
            self.padded(nanos / 1_000, 6);
        } else {
            self.raw(".");
            self.padded(nanos, 9);
        }
        self.raw("Z");
    }

    /// `,"kind":"<name>","resource_id":<id>`
    fn worker(&mut self, name: &str, resource_id: &ResourceId) -> serde_json::Result<()> {
        self.raw(",\"kind\":\"");
        self.raw(name);
        self.raw("\",\"resource_id\":");
        self.string(resource_id)
    }

    /// `,"<key>":<n>`
    fn number(&mut self, key: &str, n: u32) {
        self.raw(",\"");
        self.raw(key);
        self.raw("\":");
        self.uint(u64::from(n));
    }

    /// `,"<key>":<milliseconds>` as [`crate::millis`] writes them (serde_json's shortest
    /// form of the `f64`).
    fn millis(&mut self, key: &str, d: Duration) -> serde_json::Result<()> {
        self.raw(",\"");
        self.raw(key);
        self.raw("\":");
        serde_json::to_writer(&mut *self.0, &crate::millis::of(d))
    }

    /// `,"<key>":<s>`
    fn text(&mut self, key: &str, s: &str) -> serde_json::Result<()> {
        self.raw(",\"");
        self.raw(key);
        self.raw("\":");
        self.string(s)
    }

    /// The entries and closing brace of a per-resource kind; false (nothing written) for
    /// the other kinds. Field names and order are those of [`EventKind`]'s derive.
    fn worker_kind(&mut self, kind: &EventKind) -> serde_json::Result<bool> {
        match kind {
            EventKind::WorkerStarted {
                resource_id,
                attempt,
            } => {
                self.worker("WorkerStarted", resource_id)?;
                self.number("attempt", *attempt);
            }
            EventKind::WorkerSucceeded {
                resource_id,
                attempt,
                elapsed,
            } => {
                self.worker("WorkerSucceeded", resource_id)?;
                self.number("attempt", *attempt);
                self.millis("elapsed_ms", *elapsed)?;
            }
            EventKind::WorkerFailed {
                resource_id,
                attempt,
                error,
            } => {
                self.worker("WorkerFailed", resource_id)?;
                self.number("attempt", *attempt);
                self.text("error", error)?;
            }
            EventKind::WorkerPanicked {
                resource_id,
                attempt,
                message,
            } => {
                self.worker("WorkerPanicked", resource_id)?;
                self.number("attempt", *attempt);
                self.text("message", message)?;
            }
            EventKind::WorkerTimedOut {
                resource_id,
                attempt,
                heartbeat_silent,
            } => {
                self.worker("WorkerTimedOut", resource_id)?;
                self.number("attempt", *attempt);
                if *heartbeat_silent {
                    self.raw(",\"heartbeat_silent\":true");
                }
            }
            EventKind::WorkerRetrying {
                resource_id,
                next_attempt,
                delay,
            } => {
                self.worker("WorkerRetrying", resource_id)?;
                self.number("next_attempt", *next_attempt);
                self.millis("delay_ms", *delay)?;
            }
            EventKind::WorkerCancelled {
                resource_id,
                attempt,
            } => {
                self.worker("WorkerCancelled", resource_id)?;
                self.number("attempt", *attempt);
            }
            _ => return Ok(false),
        }
        self.raw("}");
        Ok(true)
    }
}

/// `fmt::Write` into the line's bytes.
struct Utf8Writer<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Utf8Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// An event line read back (lines of schema v2, which held both ids, read the same).
#[derive(serde::Deserialize)]
struct ReadLine {
    seq: u64,
    at: DateTime<Utc>,
    #[serde(flatten)]
    kind: EventKind,
}

/// The event of `line`, stored for session `session_id` of harvester `harvester_id`.
pub(crate) fn event_of_line(
    line: &str,
    session_id: SessionId,
    harvester_id: &HarvesterId,
) -> Result<SessionEvent, StoreError> {
    let l: ReadLine = serde_json::from_str(line).map_err(|e| StoreError::Backend(Box::new(e)))?;
    Ok(SessionEvent {
        seq: l.seq,
        at: l.at,
        session_id,
        harvester_id: harvester_id.clone(),
        kind: l.kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::samples::kinds;
    use proptest::prelude::*;

    /// The line as a struct with `#[serde(flatten)]` writes it (the format of schema v3).
    #[derive(serde::Serialize)]
    struct Flattened<'a> {
        seq: u64,
        at: &'a DateTime<Utc>,
        #[serde(flatten)]
        kind: &'a EventKind,
    }

    fn flattened(e: &SessionEvent) -> String {
        serde_json::to_string(&Flattened {
            seq: e.seq,
            at: &e.at,
            kind: &e.kind,
        })
        .expect("flattened")
    }

    fn event(seq: u64, at: DateTime<Utc>, kind: EventKind) -> SessionEvent {
        SessionEvent {
            seq,
            at,
            session_id: SessionId::new(),
            harvester_id: "h".into(),
            kind,
        }
    }

    /// Written by hand and through serde, a line is the same bytes, and reads back whole.
    fn same_and_back(e: &SessionEvent) {
        let want = flattened(e);
        assert_eq!(event_line(e).expect("line"), want);
        let back = event_of_line(&want, e.session_id, &e.harvester_id).expect("read");
        assert_eq!(&back, e);
    }

    #[test]
    fn event_lines_are_the_bytes_of_the_flattened_struct() {
        let parsed = [
            "2026-11-25T20:01:02Z",
            "2026-11-25T20:01:02.120Z",
            "2026-11-25T20:01:02.123456Z",
            "2026-11-25T20:01:02.123456789Z",
            "2026-11-25T20:01:02.000000001Z",
            "2026-11-25T20:01:02.000001Z",
            "2016-12-31T23:59:60.5Z",
            "2016-12-31T23:59:60Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
        ]
        .map(|t| DateTime::parse_from_rfc3339(t).expect("time").to_utc());
        let built = [
            // Years RFC 3339 cannot write in four digits.
            (10_000, 0),
            (-1, 500_000_000),
            // A leap second as chrono keeps it: in the nanoseconds of second 59.
            (2016, 1_000_000_000),
        ]
        .map(|(year, nanos)| {
            chrono::NaiveDate::from_ymd_opt(year, 12, 31)
                .and_then(|d| d.and_hms_nano_opt(23, 59, 59, nanos))
                .expect("instant")
                .and_utc()
        });
        let durations = [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_nanos(12_345),
            Duration::from_micros(1),
            Duration::from_millis(1500),
            Duration::from_secs(60),
            Duration::from_secs(3600 * 25 + 61),
            Duration::from_secs(31_557_600 * 2 + 2_630_016 + 86_400 * 2 + 1),
            // Exact to the nanosecond below 2^50 ns; past that, whole milliseconds are.
            Duration::new(31_557_600, 1_000_000),
            Duration::from_nanos((1 << 50) - 1),
            Duration::MAX,
        ];
        let texts = ["r1", "r\"1\n\t\\", "\u{e9}\u{1}\u{7f}/\u{2028}", ""];
        for (i, at) in parsed.into_iter().chain(built).enumerate() {
            for (j, d) in durations.into_iter().enumerate() {
                for text in texts {
                    for kind in kinds(text, d, (i * j) as u32) {
                        same_and_back(&event(7 + i as u64, at, kind));
                    }
                }
            }
        }
    }

    #[test]
    fn lines_of_earlier_versions_with_durations_as_text_read_the_same() {
        let id = SessionId::new();
        let h: HarvesterId = "h".into();
        let old = [
            (
                r#"{"seq":3,"at":"2026-11-25T20:01:02Z","kind":"WorkerSucceeded","resource_id":"r","attempt":1,"elapsed":"51ms 75us 132ns"}"#,
                r#"{"seq":3,"at":"2026-11-25T20:01:02Z","kind":"WorkerSucceeded","resource_id":"r","attempt":1,"elapsed_ms":51.075132}"#,
            ),
            (
                r#"{"seq":1,"at":"2026-11-25T20:01:02Z","kind":"SessionStarted","total":2,"workflow_time":"1year 2days 1h"}"#,
                r#"{"seq":1,"at":"2026-11-25T20:01:02Z","kind":"SessionStarted","total":2,"workflow_time_ms":31734000000.0,"budget":{"source":"static"}}"#,
            ),
            (
                r#"{"seq":4,"at":"2026-11-25T20:01:02Z","kind":"MonitorScheduled","interval":"1s","deadline_in":"20m"}"#,
                r#"{"seq":4,"at":"2026-11-25T20:01:02Z","kind":"MonitorScheduled","interval_ms":1000.0,"deadline_in_ms":1200000.0}"#,
            ),
        ];
        for (before, now) in old {
            let read = event_of_line(before, id, &h).expect("an old line reads");
            assert_eq!(read, event_of_line(now, id, &h).expect("a new line reads"));
            assert_eq!(flattened(&read), now, "written in the new form");
        }
    }

    proptest! {
        #[test]
        fn any_worker_event_line_is_the_flattened_bytes(
            seq in any::<u64>(),
            secs in -62_000_000_000i64..250_000_000_000,
            nanos in 0u32..2_000_000_000,
            text in any::<String>(),
            d_secs in any::<u64>(),
            d_nanos in 0u32..1_000_000_000,
            n in any::<u32>(),
        ) {
            let Some(at) = DateTime::from_timestamp(secs, nanos) else {
                return Ok(());
            };
            for kind in kinds(&text, Duration::new(d_secs, d_nanos), n) {
                let e = event(seq, at, kind);
                prop_assert_eq!(event_line(&e).expect("line"), flattened(&e));
            }
        }
    }
}
