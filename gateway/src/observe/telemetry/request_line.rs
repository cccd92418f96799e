//! The one log line per request, written without `tracing`'s formatter.
//!
//! Every request leaves a line, so its cost is paid at the gateway's full request rate. Made
//! as a `tracing` event, the line went through the event's dynamic field visitors, the
//! formatter's per-field `Debug` calls and its timestamp — about 4% of the gateway's CPU
//! under load, as much as its policy decision. Here the line is written straight into the
//! batched stderr writer, in exactly the format `tracing_subscriber` would give it (text or
//! JSON, tested side by side), so an operator's parser sees no difference.
//!
//! The `RUST_LOG` filter still decides whether the line is written: it is asked about an
//! event of the same target, level and fields. The line goes through `tracing` as before when something else must
//! see it as an event: when OTLP exports request lines as log records, when stderr is a
//! terminal (colours), and in a process that never installed the direct writer.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::Level;

use super::{StderrLog, REQUEST_LOG_TARGET};

/// A request's log line: its message and its fields, in the order they are written.
pub struct RequestLine<'a> {
    /// The agent's id, or `-`.
    pub agent: &'a str,
    /// The open tool call's id, or `-`.
    pub tool_call: &'a str,
    /// The request's method (or the method it was made to count as).
    pub method: &'a str,
    /// The origin's `host:port`, or `-`.
    pub host: &'a str,
    /// The path, never its query.
    pub path: &'a str,
    /// The policy decision, or `-`.
    pub decision: &'a str,
    /// The provider of the injected token (never the token), or `-`.
    pub credential: &'a str,
    /// The policies that decided, comma-separated.
    pub policies: &'a str,
    /// The approval's id, or `-`.
    pub approval: &'a str,
    /// The status answered (0: none was).
    pub status: u16,
    /// From arrival to the end of the answer, in microseconds (the line says milliseconds,
    /// to the microsecond).
    pub elapsed_us: u64,
    /// The request's trace id.
    pub trace_id: &'a str,
    /// Why the gateway refused the request (its error code) and what it told the client.
    pub refusal: Option<(&'a str, &'a str)>,
    /// Why the request failed, when it was not refused by the gateway.
    pub error: Option<&'a str>,
}

/// The format of the lines written directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineFormat {
    /// `tracing_subscriber`'s default text format, without colours.
    Text,
    /// `tracing_subscriber`'s JSON format with the event's fields flattened.
    Json,
}

/// Where request lines go when they are written directly.
struct Direct {
    log: StderrLog,
    format: LineFormat,
}

static DIRECT: OnceLock<Direct> = OnceLock::new();

/// From now on, request lines are written straight to `log` in `format` (see the module
/// documentation for when this must not be called). Only the first call has an effect.
pub fn write_request_lines_directly(log: StderrLog, format: LineFormat) {
    let _ = DIRECT.set(Direct { log, format });
}

impl RequestLine<'_> {
    /// Logs the line at info level under [`REQUEST_LOG_TARGET`], if `RUST_LOG` lets it.
    pub fn log(&self) {
        let Some(direct) = DIRECT.get() else {
            self.event();
            return;
        };
        if !self.enabled() {
            return;
        }
        LINE.with_borrow_mut(|buf| {
            buf.clear();
            self.write(buf, direct.format);
            direct.log.append(buf, false);
            // A huge line (a long path) does not keep its memory in every thread.
            buf.shrink_to(LINE_CAPACITY);
        });
    }

    /// Whether `RUST_LOG` lets the event through: asked with the event's own fields, so that
    /// a directive on a field name (`tollgate_gateway::request[{error}]=off`) selects the
    /// same lines as it does for the event.
    fn enabled(&self) -> bool {
        match (self.refusal, self.error) {
            (Some(_), _) => tracing::event_enabled!(
                target: REQUEST_LOG_TARGET, Level::INFO,
                message, agent, tool_call, method, host, path, decision, credential, policies,
                approval, status, elapsed_ms, trace_id, refusal, detail
            ),
            (None, Some(_)) => tracing::event_enabled!(
                target: REQUEST_LOG_TARGET, Level::INFO,
                message, agent, tool_call, method, host, path, decision, credential, policies,
                approval, status, elapsed_ms, trace_id, error
            ),
            (None, None) => tracing::event_enabled!(
                target: REQUEST_LOG_TARGET, Level::INFO,
                message, agent, tool_call, method, host, path, decision, credential, policies,
                approval, status, elapsed_ms, trace_id
            ),
        }
    }

    /// Appends the line, stamped now, to `buf` as `tracing_subscriber` would write it in
    /// `format`.
    pub fn write(&self, buf: &mut Vec<u8>, format: LineFormat) {
        match format {
            LineFormat::Text => self.text(buf, SystemTime::now()),
            LineFormat::Json => self.json(buf, SystemTime::now()),
        }
    }

    /// The message `tracing` would give the event.
    fn message(&self) -> &'static str {
        match (self.refusal, self.error) {
            (Some(_), _) => "request refused",
            (None, Some(_)) => "request failed",
            (None, None) => "request",
        }
    }

    /// The fields after the message, as (name, value); the last ones depend on how the
    /// request ended.
    fn strings(&self) -> [(&'static str, &str); 9] {
        [
            ("agent", self.agent),
            ("tool_call", self.tool_call),
            ("method", self.method),
            ("host", self.host),
            ("path", self.path),
            ("decision", self.decision),
            ("credential", self.credential),
            ("policies", self.policies),
            ("approval", self.approval),
        ]
    }

    /// The ending fields, after `trace_id`.
    fn ending(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let fields = match (self.refusal, self.error) {
            (Some((error, detail)), _) => [Some(("refusal", error)), Some(("detail", detail))],
            (None, Some(error)) => [Some(("error", error)), None],
            (None, None) => [None, None],
        };
        fields.into_iter().flatten()
    }

    /// `2026-12-06T17:40:24.365794Z  INFO tollgate_gateway::request: request agent="a" …`
    fn text(&self, buf: &mut Vec<u8>, now: SystemTime) {
        timestamp(buf, now);
        buf.extend_from_slice(b"  INFO ");
        buf.extend_from_slice(REQUEST_LOG_TARGET.as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(self.message().as_bytes());
        for (name, value) in self.strings() {
            text_field(buf, name, value);
        }
        let _ = write!(buf, " status={} elapsed_ms=", self.status);
        milliseconds(buf, self.elapsed_us);
        text_field(buf, "trace_id", self.trace_id);
        for (name, value) in self.ending() {
            text_field(buf, name, value);
        }
        buf.push(b'\n');
    }

    /// `{"timestamp":"…","level":"INFO","message":"request","agent":"a",…,"target":"…"}`
    fn json(&self, buf: &mut Vec<u8>, now: SystemTime) {
        buf.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(buf, now);
        buf.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"");
        buf.extend_from_slice(self.message().as_bytes());
        buf.push(b'"');
        for (name, value) in self.strings() {
            json_field(buf, name, value);
        }
        let _ = write!(buf, ",\"status\":{},\"elapsed_ms\":", self.status);
        milliseconds(buf, self.elapsed_us);
        json_field(buf, "trace_id", self.trace_id);
        for (name, value) in self.ending() {
            json_field(buf, name, value);
        }
        buf.extend_from_slice(b",\"target\":\"");
        buf.extend_from_slice(REQUEST_LOG_TARGET.as_bytes());
        buf.extend_from_slice(b"\"}\n");
    }

    /// The line as a `tracing` event, for the subscriber's layers to format and export.
    fn event(&self) {
        let (agent, tool_call, method, host, path) = (
            self.agent,
            self.tool_call,
            self.method,
            self.host,
            self.path,
        );
        let (decision, credential, policies, approval) =
            (self.decision, self.credential, self.policies, self.approval);
        let elapsed_ms = self.elapsed_us as f64 / 1e3;
        let (status, trace_id) = (self.status, self.trace_id);
        match (self.refusal, self.error) {
            (Some((refusal, detail)), _) => tracing::info!(
                target: REQUEST_LOG_TARGET,
                agent, tool_call, method, host, path, decision, credential, policies, approval,
                status, elapsed_ms, trace_id, refusal, detail, "request refused"
            ),
            (None, Some(error)) => tracing::info!(
                target: REQUEST_LOG_TARGET,
                agent, tool_call, method, host, path, decision, credential, policies, approval,
                status, elapsed_ms, trace_id, error, "request failed"
            ),
            (None, None) => tracing::info!(
                target: REQUEST_LOG_TARGET,
                agent, tool_call, method, host, path, decision, credential, policies, approval,
                status, elapsed_ms, trace_id, "request"
            ),
        }
    }
}

/// `micros` as milliseconds, exactly as `tracing` writes the `f64` `micros / 1e3` in its
/// shortest form (`2.18`, `0.005`, `12.0`; for any time under 31 years), from integers:
/// formatting the float itself was a quarter of a microsecond per line.
fn milliseconds(buf: &mut Vec<u8>, micros: u64) {
    let _ = write!(buf, "{}.", micros / 1000);
    let fraction = micros % 1000;
    let digits = [fraction / 100, fraction / 10 % 10, fraction % 10].map(|d| b'0' + d as u8);
    // At least one digit; no zeros after the last significant one.
    let kept = 3 - digits[1..].iter().rev().take_while(|&&d| d == b'0').count();
    let kept = if fraction == 0 { 1 } else { kept };
    buf.extend_from_slice(&digits[..kept]);
}

/// The room each thread keeps for formatting a line.
const LINE_CAPACITY: usize = 1024;

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(LINE_CAPACITY));
    /// The last second written, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// ` name="value"`, the value escaped as `Debug` escapes a string.
fn text_field(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.push(b' ');
    buf.extend_from_slice(name.as_bytes());
    buf.push(b'=');
    quoted(buf, value, |buf, value| {
        let _ = write!(buf, "{value:?}");
    });
}

/// `,"name":"value"`, the value escaped as JSON.
fn json_field(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b"\":");
    quoted(buf, value, json_value::<str>);
}

/// `"value"` as it is when nothing in it needs escaping, else as `escape` writes it.
fn quoted(buf: &mut Vec<u8>, value: &str, escape: fn(&mut Vec<u8>, &str)) {
    if plain(value) {
        buf.push(b'"');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'"');
    } else {
        escape(buf, value);
    }
}

fn json_value<T: serde::Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) {
    // Writing to a Vec fails only for a value JSON cannot hold (none of these).
    let _ = serde_json::to_writer(&mut *buf, value);
}

/// Whether `value` reads the same escaped as `Debug` and JSON escape it: printable ASCII
/// without a quote or a backslash (nearly every value; the others take the slow way).
fn plain(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

/// `now` as `tracing_subscriber` writes it: UTC, RFC 3339, microseconds.
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *second = secs;
            *text = date_time(secs);
        }
        buf.extend_from_slice(text);
    });
    let micros = since.subsec_micros();
    buf.push(b'.');
    for div in [100_000, 10_000, 1_000, 100, 10, 1] {
        buf.push(b'0' + ((micros / div) % 10) as u8);
    }
    buf.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time in seconds (UTC, proleptic Gregorian calendar).
fn date_time(secs: u64) -> [u8; 19] {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days);
    let mut out = [0u8; 19];
    let mut cursor = std::io::Cursor::new(&mut out[..]);
    let _ = write!(
        cursor,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
    out
}

/// The (year, month, day) of a count of days since 1970-01-01: the days are counted in
/// 400-year eras of 146,097 days, with years starting on March 1st so that the leap day
/// comes last.
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// What `tracing_subscriber` writes, for the comparison.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn through_tracing(line: &RequestLine, format: LineFormat) -> String {
        let captured = Captured::default();
        let writer = {
            let captured = captured.clone();
            move || captured.clone()
        };
        // The gateway's own `fmt` layer, as `main` builds it (stderr is no terminal here).
        let layer = super::super::fmt_layer(writer, format, false);
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
        tracing::dispatcher::with_default(&dispatch, || line.event());
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn direct(line: &RequestLine, format: LineFormat) -> String {
        let mut buf = Vec::new();
        line.write(&mut buf, format);
        String::from_utf8(buf).unwrap()
    }

    /// The line without its timestamp (the two are written at different instants).
    fn untimed(line: &str) -> String {
        let at = line.find("Z").expect("a timestamp");
        let stamp = &line[..=at];
        let stamp = stamp.trim_start_matches("{\"timestamp\":\"");
        assert_eq!(stamp.len(), 27, "RFC 3339 with microseconds: {line}");
        line.replacen(stamp, "<time>", 1)
    }

    fn line<'a>(
        path: &'a str,
        refusal: Option<(&'a str, &'a str)>,
        error: Option<&'a str>,
    ) -> RequestLine<'a> {
        RequestLine {
            agent: "agent-1",
            tool_call: "-",
            method: "GET",
            host: "api.example.com:443",
            path,
            decision: "allow",
            credential: "entra",
            policies: "p1,p2",
            approval: "-",
            status: 200,
            elapsed_us: 300,
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            refusal,
            error,
        }
    }

    #[test]
    fn a_direct_line_reads_exactly_as_tracing_would_write_it() {
        let paths = [
            "/plain/path",
            "",
            "/a \"quoted\" \\ path",
            "/it's ~ {} [] <> = ,",
            "/ctl\u{1}\t\n\r\u{1b}[31m\u{7f}",
            "/ünïcödé/\u{200b}/\u{301}/\u{9b}/\u{2028}",
        ];
        let endings = [
            (None, None),
            (Some(("policy_denied", "denied by policy")), None),
            (None, Some("ConnectTimedout")),
        ];
        for format in [LineFormat::Text, LineFormat::Json] {
            for path in paths {
                for (refusal, error) in endings {
                    let line = line(path, refusal, error);
                    let expected = through_tracing(&line, format);
                    assert_eq!(
                        untimed(&direct(&line, format)),
                        untimed(&expected),
                        "{format:?}"
                    );
                    if format == LineFormat::Json {
                        let parsed: serde_json::Value =
                            serde_json::from_str(&direct(&line, format)).unwrap();
                        assert_eq!(parsed["path"], path);
                    }
                }
            }
        }
    }

    #[test]
    fn the_elapsed_time_reads_as_tracing_writes_the_milliseconds() {
        let micros = [
            0,
            1,
            5,
            10,
            20,
            100,
            120,
            300,
            999,
            1_000,
            1_001,
            1_010,
            2_180,
            2_181,
            12_000,
            2_181_234,
            60_000_000,
            123_456_789_012,
            // 31 years: past this, the float has fewer digits than the microseconds.
            999_999_999_999_999,
        ];
        for format in [LineFormat::Text, LineFormat::Json] {
            for elapsed_us in micros {
                let line = RequestLine {
                    elapsed_us,
                    ..line("/p", None, None)
                };
                assert_eq!(
                    untimed(&direct(&line, format)),
                    untimed(&through_tracing(&line, format)),
                    "{format:?}, {elapsed_us} µs"
                );
            }
        }
    }

    #[test]
    fn rust_log_selects_the_same_lines_as_it_did_for_the_event() {
        let request = line("/p", None, None);
        let refused = line("/p", Some(("policy_denied", "denied")), None);
        let failed = line("/p", None, Some("ConnectTimedout"));
        // What each filter lets through: (request, refused, failed).
        let cases = [
            ("info", (true, true, true)),
            ("warn", (false, false, false)),
            ("info,tollgate_gateway::request=off", (false, false, false)),
            // A directive on a field name picks the lines that have that field.
            (
                "info,tollgate_gateway::request[{error}]=off",
                (true, true, false),
            ),
            (
                "warn,tollgate_gateway::request[{refusal}]=info",
                (false, true, false),
            ),
        ];
        for (filter, expected) in cases {
            let subscriber =
                tracing_subscriber::registry().with(tracing_subscriber::EnvFilter::new(filter));
            let got = tracing::subscriber::with_default(subscriber, || {
                (request.enabled(), refused.enabled(), failed.enabled())
            });
            assert_eq!(got, expected, "RUST_LOG={filter}");
            // The event itself, for comparison: the same lines are written.
            let written = |line: &RequestLine| {
                let captured = Captured::default();
                let writer = {
                    let captured = captured.clone();
                    move || captured.clone()
                };
                let subscriber = tracing_subscriber::registry()
                    .with(tracing_subscriber::EnvFilter::new(filter))
                    .with(super::super::fmt_layer(writer, LineFormat::Text, false));
                tracing::subscriber::with_default(subscriber, || line.event());
                let written = !captured.0.lock().unwrap().is_empty();
                written
            };
            assert_eq!(
                (written(&request), written(&refused), written(&failed)),
                expected,
                "the event under RUST_LOG={filter}"
            );
        }
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = |secs: u64| String::from_utf8(date_time(secs).to_vec()).unwrap();
        assert_eq!(at(0), "1970-01-01T00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59");
        assert_eq!(at(1_796_601_624), "2026-12-07T00:00:24");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00");
        // Every day for 500 years, against a plain count of days per month.
        let mut days = 0u64;
        for year in 1970u64..2470 {
            let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
            for month in 1u64..=12 {
                let length = match month {
                    2 if leap => 29,
                    2 => 28,
                    4 | 6 | 9 | 11 => 30,
                    _ => 31,
                };
                for day in 1..=length {
                    assert_eq!(civil_date(days), (year, month, day));
                    days += 1;
                }
            }
        }
        let mut buf = Vec::new();
        timestamp(
            &mut buf,
            UNIX_EPOCH + std::time::Duration::from_micros(1_796_601_624_000_042),
        );
        assert_eq!(buf, b"2026-12-07T00:00:24.000042Z");
    }
}
